"""Config validation of the engine options (participation.*, server.*, quantizer.topk_fraction /
error_feedback / downlink / bucket 'tensor', train.momentum / nesterov / lr_schedule), through
``load_config`` (pure) and a few real ``mpiexec -n 2`` runs."""
from __future__ import annotations

import copy

import h5py
import numpy as np
import pytest
import yaml

from helpers import run_cli, small_config
from qmlhfl_mpi.config import ConfigError, build, load_config

BASE = {"topology": {"branching": [2, 3]}, "tau": [2, 2], "quantizer": {"levels": [3, 8]}}


def _raw(**sections):
    raw = copy.deepcopy(BASE)
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
    return raw


N_VALUES = r"the tree has N=2 layers, so give 2 values \(one per link/layer 1..2\) or leave it empty"
BETAS = r"expected \[b1, b2\] with 0 <= b < 1 for every layer, or 2 such pairs \(one per layer\)"


@pytest.mark.parametrize("sections,match", [
    # participation.fraction outside (0, 1]
    ({"participation": {"fraction": [0, 1]}}, r"'participation.fraction\[0\]' = 0: expected a number > 0 and <= 1"),
    ({"participation": {"fraction": [1, 1.5]}}, r"'participation.fraction\[1\]' = 1.5: expected a number > 0 and <= 1"),
    ({"participation": {"fraction": [-0.1, 1]}},
     r"'participation.fraction\[0\]' = -0.1: expected a number > 0 and <= 1"),
    ({"participation": {"availability": [0, 1]}},
     r"'participation.availability\[0\]' = 0: expected a number > 0 and <= 1"),
    ({"participation": {"availability": [1, 1.01]}},
     r"'participation.availability\[1\]' = 1.01: expected a number > 0 and <= 1"),
    # N values required
    ({"participation": {"fraction": [0.5]}}, r"'participation.fraction' = \[0.5\]: " + N_VALUES),
    ({"participation": {"fraction": [0.5, 1, 1]}}, r"'participation.fraction' = \[0.5, 1.0, 1.0\]: " + N_VALUES),
    ({"participation": {"availability": [0.9]}}, r"'participation.availability' = \[0.9\]: " + N_VALUES),
    ({"server": {"optimizer": ["adam"]}}, r"'server.optimizer' = \['adam'\]: " + N_VALUES),
    ({"server": {"lr": [0.1, 0.1, 0.1]}}, r"'server.lr' = \[0.1, 0.1, 0.1\]: " + N_VALUES),
    ({"server": {"momentum": [0.9]}}, r"'server.momentum' = \[0.9\]: " + N_VALUES),
    ({"server": {"eps": [0.001]}}, r"'server.eps' = \[0.001\]: " + N_VALUES),
    ({"quantizer": {"downlink": [16]}}, r"'quantizer.downlink' = \[16\]: " + N_VALUES),
    ({"quantizer": {"error_feedback": [True]}}, r"'quantizer.error_feedback' = \[True\]: " + N_VALUES),
    ({"quantizer": {"topk_fraction": [0.1, 0.1, 0.1]}},
     r"'quantizer.topk_fraction' = \[0.1, 0.1, 0.1\]: " + N_VALUES),
    # per-entry ranges and types of the new lists
    ({"quantizer": {"topk_fraction": [0, 0.1]}}, r"'quantizer.topk_fraction\[0\]' = 0: expected a number > 0 and <= 1"),
    ({"quantizer": {"topk_fraction": [0.1, 2]}}, r"'quantizer.topk_fraction\[1\]' = 2: expected a number > 0 and <= 1"),
    ({"quantizer": {"downlink": [4, 40000]}}, r"'quantizer.downlink\[1\]' = 40000: expected an integer from 0 to 32767"),
    ({"quantizer": {"downlink": [4, -1]}}, r"'quantizer.downlink\[1\]' = -1: expected an integer from 0 to 32767"),
    ({"quantizer": {"error_feedback": [1, 0]}}, r"'quantizer.error_feedback\[0\]' = 1: expected true or false"),
    ({"server": {"lr": [0, 1]}}, r"'server.lr\[0\]' = 0: expected a number > 0"),
    ({"server": {"eps": [1e-3, 0]}}, r"'server.eps\[1\]' = 0: expected a number > 0"),
    ({"server": {"momentum": [0.9, 1.0]}}, r"'server.momentum\[1\]' = 1.0: expected a number from 0 to 0.999999"),
    # error feedback on a link that sends float32
    ({"quantizer": {"kind": ["none", "qsgd"], "error_feedback": [True, False]}},
     r"'quantizer.error_feedback\[0\]' = true on link 1, which sends float32 \(kind 'none'.*set it to false or "
     r"quantize the link"),
    ({"quantizer": {"levels": [3, 0], "error_feedback": [False, True]}},
     r"'quantizer.error_feedback\[1\]' = true on link 2, which sends float32 \(kind 'qsgd', levels 0\)"),
    ({"quantizer": {"levels": [3, "none"], "error_feedback": [True, True]}},
     r"'quantizer.error_feedback\[1\]' = true on link 2, which sends float32 \(kind 'qsgd', levels 0\)"),
    # server optimizer names and betas
    ({"server": {"optimizer": ["avg", "sgdm"]}},
     r"'server.optimizer\[1\]' = 'sgdm': expected one of 'avg', 'momentum', 'adam', 'yogi', or a plug-in"),
    ({"server": {"betas": [0.9, 1.0]}}, r"'server.betas' = \[0.9, 1.0\]: " + BETAS),
    ({"server": {"betas": [-0.1, 0.9]}}, r"'server.betas' = \[-0.1, 0.9\]: " + BETAS),
    ({"server": {"betas": [[0.9, 0.99], [0.9, 1.5]]}}, r"'server.betas' = \[\[0.9, 0.99\], \[0.9, 1.5\]\]: " + BETAS),
    ({"server": {"betas": [0.9]}}, r"'server.betas' = \[0.9\]: " + BETAS),
    ({"server": {"betas": [0.9, 0.99, 0.5]}}, r"'server.betas' = \[0.9, 0.99, 0.5\]: " + BETAS),
    ({"server": {"betas": [[0.9, 0.99]]}}, r"'server.betas' = \[\[0.9, 0.99\]\]: " + BETAS),
    ({"server": {"betas": [[0.9, 0.99], [0.9, 0.99], [0.9, 0.99]]}}, r"'server.betas' = .*: " + BETAS),
    ({"server": {"betas": [[0.9], [0.9, 0.99]]}}, r"'server.betas' = .*: " + BETAS),
    ({"server": {"betas": 0.9}}, r"'server.betas' = 0.9: " + BETAS),
    ({"server": {"betas": [True, 0.5]}}, r"'server.betas' = \[True, 0.5\]: " + BETAS),
    # bucket
    ({"quantizer": {"bucket": "tensors"}},
     r"'quantizer.bucket' = 'tensors': expected an integer >= 0 \(values per norm; 0 = one global norm\) or "
     r"'tensor'"),
    ({"quantizer": {"bucket": -3}}, r"'quantizer.bucket' = -3: expected an integer >= 0 .* or 'tensor'"),
    ({"quantizer": {"bucket": True}}, r"'quantizer.bucket' = True: expected an integer >= 0"),
    # client optimiser and schedule
    ({"train": {"nesterov": True}}, r"'train.nesterov' = true needs train.momentum > 0"),
    ({"train": {"nesterov": True, "momentum": 0}}, r"'train.nesterov' = true needs train.momentum > 0"),
    ({"train": {"lr": 0.1, "lr_schedule": "cosine", "lr_min": 0.2}},
     r"'train.lr_min' = 0.2: the cosine schedule goes from train.lr = 0.1 down to lr_min, so give 0 <= lr_min <= 0.1"),
    ({"train": {"lr_gamma": 1.5, "lr_schedule": "step"}}, r"'train.lr_gamma' = 1.5: expected a number > 0 and <= 1"),
    ({"train": {"lr_gamma": 0}}, r"'train.lr_gamma' = 0: expected a number > 0 and <= 1"),
    ({"train": {"lr_schedule": "linear"}}, r"'train.lr_schedule' = 'linear': expected one of 'constant'"),
    ({"train": {"momentum": 1.0}}, r"'train.momentum' = 1.0: expected a number from 0 to 0.999999"),
    ({"train": {"weight_decay": -1}}, r"'train.weight_decay' = -1: expected a number >= 0"),
    ({"train": {"prox_mu": -0.5}}, r"'train.prox_mu' = -0.5: expected a number >= 0"),
    ({"train": {"lr_step_rounds": 0}}, r"'train.lr_step_rounds' = 0: expected an integer >= 1"),
    # weighting
    ({"participation": {"weighting": "fair"}},
     r"'participation.weighting' = 'fair': expected one of 'renormalize', 'unbiased'"),
    ({"participation": {"sample": [1, 1]}},
     r"unknown config key\(s\) 'participation.sample'.*valid keys there: fraction, availability, weighting"),
    ({"server": {"optimiser": ["avg", "avg"]}},
     r"unknown config key\(s\) 'server.optimiser'.*valid keys there: optimizer, lr, momentum, betas, eps"),
])
def test_bad_option_names_key_and_valid_values(sections, match):
    with pytest.raises(ConfigError, match=match):
        load_config(_raw(**sections))


def test_good_options_load():
    cfg = load_config(_raw(
        quantizer={"levels": [3, 8], "kind": ["topk", "qsgd"], "topk_fraction": [0.1, 0.01],
                   "error_feedback": [True, False], "downlink": ["none", 16], "bucket": "tensor"},
        participation={"fraction": [0.5, 1], "availability": [0.9, 1], "weighting": "unbiased"},
        server={"optimizer": ["momentum", "adam"], "lr": [1, 0.01], "momentum": [0.9, 0], "betas": [0.8, 0.9],
                "eps": [1e-3, "1e-6"]},
        train={"momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "prox_mu": 0.01, "lr": 0.1,
               "lr_schedule": "cosine", "lr_min": 0.1},
    ))
    q = cfg.quantizer
    assert q.downlink == (0, 16) and q.error_feedback == (True, False) and q.topk_fraction == (0.1, 0.01)
    assert q.bucket == "tensor" and q.kind == ("topk", "qsgd")
    assert cfg.participation.fraction == (0.5, 1.0) and cfg.participation.availability == (0.9, 1.0)
    assert cfg.server.eps == (1e-3, 1e-6)
    assert cfg.train.nesterov and cfg.train.lr_min == cfg.train.lr  # lr_min == lr is allowed
    # the built pieces
    part = build.participation(cfg)
    assert part.fraction == (0.5, 1.0) and part.availability == (0.9, 1.0) and part.weighting == "unbiased"
    opts = build.server_optimizers(cfg)
    assert [type(o).__name__ for o in opts] == ["Momentum", "Adam"]
    assert (opts[0].lr, opts[0].momentum) == (1.0, 0.9)
    assert (opts[1].lr, opts[1].betas, opts[1].eps) == (0.01, (0.8, 0.9), 1e-6)
    down = build.downlink_codecs(cfg, sizes=(20, 5))
    assert down[0] is None and down[1] is not None and "qsgd" in down[1].name
    links = build.links(cfg, sizes=(20, 5))
    assert [lk.error_feedback for lk in links] == [True, False] and links[0].downlink is None
    assert links[1].downlink is not None and [type(lk.server).__name__ for lk in links] == ["Momentum", "Adam"]


def test_betas_as_one_pair_or_one_pair_per_layer():
    one = load_config(_raw(server={"optimizer": ["adam", "yogi"], "betas": [0.5, 0.6]}))
    assert [o.betas for o in build.server_optimizers(one)] == [(0.5, 0.6), (0.5, 0.6)]
    per = load_config(_raw(server={"optimizer": ["adam", "yogi"], "betas": [[0.5, 0.6], [0.0, 0.99]]}))
    assert [o.betas for o in build.server_optimizers(per)] == [(0.5, 0.6), (0.0, 0.99)]
    default = load_config(_raw(server={"optimizer": ["yogi", "adam"]}))
    assert [o.betas for o in build.server_optimizers(default)] == [(0.9, 0.99), (0.9, 0.99)]
    assert [type(o).__name__ for o in build.server_optimizers(load_config(BASE))] == ["Average", "Average"]


def test_downlink_none_entries_map_to_zero():
    assert load_config(_raw(quantizer={"downlink": ["none", 16]})).quantizer.downlink == (0, 16)
    assert load_config(_raw(quantizer={"downlink": [8, "None"]})).quantizer.downlink == (8, 0)
    assert load_config(_raw(quantizer={"downlink": ["none", "none"]})).quantizer.downlink == (0, 0)
    assert build.downlink_codecs(load_config(_raw(quantizer={"downlink": ["none", "none"]}))) == [None, None]
    assert load_config(BASE, ["quantizer.downlink=[none, 4]"]).quantizer.downlink == (0, 4)


def test_error_feedback_allowed_on_quantized_links():
    for q in ({"kind": ["topk", "qsgd"], "levels": [0, 8], "error_feedback": [True, True]},  # topk ignores levels
              {"levels": [3, 8], "error_feedback": [True, True]},
              {"kind": ["none", "qsgd"], "levels": [3, 8], "error_feedback": [False, True]}):
        assert load_config(_raw(quantizer=q)).quantizer.error_feedback == tuple(q["error_feedback"])


def test_defaults_are_the_papers_algorithm():
    cfg = load_config(BASE)
    assert build.participation(cfg).is_full
    links = build.links(cfg)
    assert [(lk.error_feedback, lk.downlink, lk.stateful) for lk in links] == [(False, None, False)] * 2
    assert cfg.train.lr_schedule == "constant" and build.lr_schedule(cfg) is None
    assert cfg.train.momentum == 0.0 and not cfg.train.nesterov


def test_yaml_round_trip_keeps_the_options():
    cfg = load_config(_raw(participation={"fraction": [0.5, 1]}, server={"betas": [[0.5, 0.6], [0.1, 0.2]]},
                           quantizer={"downlink": ["none", 16], "bucket": "tensor"}))
    again = load_config(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


# ---- under mpiexec -n 2 --------------------------------------------------------------
def _assert_clean_usage_error(proc, key: str) -> None:
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.count("qmlhfl-mpi: error:") == 1, proc.stderr  # once per job, not once per rank
    assert key in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("sections,key", [
    ({"participation": {"fraction": [1.5, 1]}}, "'participation.fraction[0]' = 1.5"),
    ({"quantizer": {"kind": ["none", "qsgd"], "error_feedback": [True, False]}}, "'quantizer.error_feedback[0]'"),
], ids=["fraction-1.5", "error-feedback-on-none"])
def test_bad_option_under_mpiexec(tmp_path, sections, key):
    cfg = small_config(tmp_path, **sections)
    proc, secs = run_cli(2, ["run", str(cfg), "--quiet"], timeout=120)
    _assert_clean_usage_error(proc, key)
    assert secs < 30
    assert not (tmp_path / "out.h5").exists()


def test_all_options_together_on_two_ranks(tmp_path):
    rounds = 3
    cfg = small_config(
        tmp_path,
        participation={"fraction": [0.5, 1], "availability": [0.9, 1]},
        server={"optimizer": ["avg", "adam"]},
        quantizer={"kind": ["topk", "qsgd"], "topk_fraction": [0.1, 0.01], "error_feedback": [True, False],
                   "downlink": [0, 16]},
        train={"momentum": 0.9, "rounds": rounds},
    )
    proc, _ = run_cli(2, ["run", str(cfg), "--quiet"], timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    with h5py.File(tmp_path / "out.h5", "r") as f:
        assert f.attrs["status"] == "completed"
        q = {k: f["quantizer"][k][()] for k in f["quantizer"]}
        msgs = f["metrics/messages"][()]
        down = f["metrics/downlink_bytes"][()]
        up = f["metrics/uplink_bytes"][()]
        d = int(f.attrs["num_params"])
    full = q["messages_per_round"]
    assert list(full) == [12, 2]  # 6 devices x tau_2 = 2 edge aggregations; 2 edges
    assert msgs.shape == (rounds, 2) and down.shape == (rounds, 2)
    # link 1: each edge draws m = 2 of its 3 devices, each up with 0.9 -> at most 2 x 2 x 2 = 8 < 12
    assert np.all(msgs[:, 0] < full[0]) and np.all(msgs[:, 0] <= 8) and np.all(msgs[:, 0] >= 0)
    assert np.all(msgs[:, 1] == full[1])  # the cloud takes both edges every time
    assert np.allclose(q["expected_messages_per_round"], [2 * 2 * 2 * 0.9, 2.0])
    assert np.array_equal(up, msgs * q["message_bytes"][None, :])
    # downlink: link 1 float32, link 2 qsgd(16); the cloud broadcasts to its 2 children every round
    assert list(q["error_feedback"]) == [True, False]
    assert q["downlink_bytes"][0] == 4 * d and 0 < q["downlink_bytes"][1] < 4 * d
    assert np.all(down[:, 1] == 2 * q["downlink_bytes"][1])
    assert int(down[:, 1].sum()) == rounds * 2 * int(q["downlink_bytes"][1])
