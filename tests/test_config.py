"""Config loading, strict validation and overrides (no MPI)."""
import dataclasses

import pytest
import yaml

from qmlhfl_mpi import config
from qmlhfl_mpi.config import ConfigError, apply_overrides, from_dict, schema

BASE = {"topology": {"branching": [2, 3]}, "tau": [2, 2], "quantizer": {"levels": [4, "none"]}}


def test_minimal_config_and_defaults():
    cfg = from_dict(BASE)
    assert cfg.N == 2 and cfg.tau == (2, 2) and cfg.quantizer.levels == (4, 0)
    assert cfg.train.lr == 0.05 and cfg.quantizer.bucket == 512
    assert cfg.build_tree().num_devices == 6
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key.*'train.learning_rate'.*valid keys there: lr, lr_schedule"):
        from_dict({**BASE, "train": {"learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"'tua'.*valid keys there: topology, tau"):
        from_dict({**BASE, "tua": [1]})


@pytest.mark.parametrize("patch,match", [
    ({"tau": [2]}, r"'tau' = \[2\].*N=2.*give 2 values"),
    ({"tau": [2, 0]}, r"'tau\[1\]' = 0.*>= 1"),
    ({"quantizer": {"levels": [4, -1]}}, r"'quantizer.levels\[1\]' = -1.*from 0 to 32767"),
    ({"quantizer": {"levels": [4]}}, r"quantizer.levels.*give 2 values"),
    ({"train": {"lr": 0}}, r"'train.lr' = 0.*> 0"),
    ({"train": {"lr": "fast"}}, r"'train.lr' = 'fast'.*a number"),
    ({"train": {"rounds": 2.5}}, r"'train.rounds' = 2.5.*an integer"),
    ({"train": {"batch_size": True}}, r"'train.batch_size' = True"),
    ({"model": {"name": "resnet"}}, r"'model.name' = 'resnet'.*one of 'logreg'"),
    ({"topology": {"branching": [2, 3], "tree": [1, 2]}}, r"exactly one of"),
    ({"topology": {}}, r"exactly one of"),
    ({"topology": {"tree": [[1], 2]}}, r"different depths"),
    ({"quantizer": {"levels": [4, 8], "kind": ["qsgd"]}}, r"'quantizer.kind'.*give 2 codecs.*'qsgd', 'none'"),
    ({"quantizer": {"levels": [4, 8], "kind": ["qsgd", "zip"]}}, r"'quantizer.kind\[1\]' = 'zip'.*one of 'qsgd'"),
    ({"data": {"partition": {"kind": "stripes"}}}, r"'data.partition.kind' = 'stripes'.*'natural'"),
    ({"data": {"name": "imagenet"}}, r"'data.name' = 'imagenet'.*'fashion-mnist'.*plug-in"),
    ({"model": {"args": [1, 2]}}, r"'model.args' = \[1, 2\].*mapping"),
    ({"model": {"init": "xavier"}}, r"'model.init' = 'xavier'.*'seeded', 'module'"),
    ({"callbacks": "x.py:C"}, r"'callbacks' = 'x.py:C'.*list"),
    ({"callbacks": [{"ref": "x.py:C", "arg": {}}]}, r"'callbacks\[0\]' has unknown key\(s\) \['arg'\]"),
    ({"callbacks": ["nocolon"]}, r"'callbacks\[0\]' = 'nocolon'"),
    ({"latency": {"uplink_rate": [1.0]}}, r"latency.uplink_rate.*give 2 values"),
])
def test_invalid_values_name_key_and_range(patch, match):
    raw = {**BASE, **patch}
    with pytest.raises(ConfigError, match=match):
        from_dict(raw)


def test_overrides_parse_yaml_values():
    raw = apply_overrides(BASE, ["train.lr=0.2", "tau=[3, 1]", "data.synthetic.dim=7", "quantizer.levels=[none, 8]"])
    cfg = from_dict(raw)
    assert cfg.train.lr == 0.2 and cfg.tau == (3, 1) and cfg.data.synthetic.dim == 7
    assert cfg.quantizer.levels == (0, 8)
    assert from_dict(apply_overrides(BASE, ["train.lr=1e-3"])).train.lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    assert BASE["tau"] == [2, 2]  # the input is not modified
    with pytest.raises(ConfigError, match="dotted.key=value"):
        apply_overrides(BASE, ["train.lr"])


def test_yaml_round_trip(tmp_path):
    cfg = from_dict({**BASE, "topology": {"tree": [[3, 2], [1]]}, "tau": [1, 2, 3], "quantizer": {"levels": [2, 4, 0]}})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = config.load(p)
    assert again == cfg


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        config.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("topology: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(bad)


def test_schema_lists_every_leaf_with_a_rule():
    keys = {k for k, _, _ in schema()}
    assert {"train.lr", "tau", "quantizer.levels", "data.partition.kind", "output.path"} <= keys
    assert all("doc" in f.metadata for _, _, f in schema())


def test_shipped_configs_are_valid():
    from pathlib import Path
    for p in sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml")):
        cfg = config.load(p)
        assert cfg.N >= 1, p
        yaml.safe_load(cfg.to_yaml())


def test_on_and_off_survive_yaml_booleans():
    for text, want in (("on", "on"), ("off", "off"), ("auto", "auto"), ("true", "on")):
        assert from_dict(apply_overrides(BASE, [f"train.vectorize={text}"])).train.vectorize == want
    with pytest.raises(ConfigError, match=r"'train.vectorize' = 'sometimes'.*'auto', 'on', 'off'"):
        from_dict(apply_overrides(BASE, ["train.vectorize=sometimes"]))
