"""Every config field, given a wrong type or an out-of-range value (cases
generated from the schema), is a clear error: from the schema for all of them,
and through the config file and ``--set`` overrides the CLI reads for one case of
each kind.  (Every rank of a real job exiting 2 with one message:
tests/test_cli_errors.py.)"""
from __future__ import annotations

import copy
import typing

import pytest
import yaml

from helpers import small_config
from qmlhfl_mpi.config import ConfigError, apply_overrides, from_dict, load_config, schema

BASE = {"topology": {"branching": [2, 3]}, "tau": [2, 2], "quantizer": {"levels": [4, 8]}}


def _base_type(tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if args and type(None) in args:  # Optional[X]
        tp = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(tp), typing.get_args(tp)
    return ("tuple", args[0]) if origin is tuple else (tp, None)


def bad_values(key, tp, field):
    """(kind, value) pairs that must be rejected for ``key``."""
    base, elem = _base_type(tp)
    m = field.metadata
    out = []
    if key == "quantizer.bucket":  # an integer >= 0 or 'tensor'
        return [("type", "tensors"), ("range", -1), ("type", 1.5)]
    if base is typing.Any:  # the explicit tree
        return [("type", "a string"), ("range", 0), ("range", [[1], 2])]
    if base == "tuple":
        out.append(("type", {"a": 1}))
        out.append(("type", ["x"]))
        if m.get("lo") is not None:
            out.append(("range", [m["lo"] - 1]))
        if m.get("hi") is not None:
            out.append(("range", [m["hi"] + 1]))
        return out
    wrong = {int: ["seven", 1.5, True], float: ["fast", [1.0], True], bool: ["yes", 2], str: [3, ["a"]]}[base]
    out += [("type", w) for w in wrong]
    if m.get("choices"):
        out.append(("range", "not-a-choice"))
    if m.get("lo") is not None:
        out.append(("range", m["lo"] if m.get("lo_open") else m["lo"] - 1))
    if m.get("hi") is not None:
        out.append(("range", m["hi"] + 1))
    return out


def with_value(key, value):
    raw = copy.deepcopy(BASE)
    if key.startswith("topology."):
        raw["topology"] = {}  # the tree keys exclude each other
        if key != "topology.branching":
            raw["topology"]["branching"] = [2, 3]
    node = raw
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return raw


CASES = [(key, kind, value) for key, tp, f in schema() for kind, value in bad_values(key, tp, f)]


def test_cases_cover_every_key():
    keys = {k for k, _, _ in schema()}
    assert {k for k, _, _ in CASES} == keys
    assert len(CASES) > 2 * len(keys)


@pytest.mark.parametrize("key,kind,value", CASES, ids=[f"{k}-{kind}-{i}" for i, (k, kind, _) in enumerate(CASES)])
def test_bad_value_is_a_clear_config_error(key, kind, value):
    with pytest.raises(ConfigError) as err:
        from_dict(with_value(key, value))
    msg = str(err.value)
    leaf = key.split(".")[-1]
    assert leaf in msg or "topology" in msg, msg  # the message names the key
    assert len(msg) < 600


def test_base_config_is_valid():
    assert from_dict(BASE).N == 2


# one case per kind of field, through a config file and an override, as the CLI loads them
MPI_CASES = ["train.rounds=seven", "train.lr=-1", "train.device=tpu", "data.download=2",
             "quantizer.levels=[4, 40000]", "topology.tree=[[1], 2]", "output.checkpoint_every=-3",
             "data.partition.alpha=0"]


@pytest.mark.parametrize("override", MPI_CASES)
def test_bad_value_in_a_config_file_or_an_override(tmp_path, override):
    key = override.split("=")[0]
    raw = yaml.safe_load(small_config(tmp_path).read_text())
    if override.startswith("topology."):
        raw["topology"].pop("branching")
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(yaml.safe_dump(apply_overrides(raw, [override])))
    for how in (lambda: load_config(str(cfg)), lambda: load_config(str(cfg.with_name("ok.yaml")), [override])):
        (tmp_path / "ok.yaml").write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError) as err:
            how()
        assert key.split(".")[-1] in str(err.value), str(err.value)
    assert not (tmp_path / "out.h5").exists()
