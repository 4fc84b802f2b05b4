"""Rank 0's checks of the output (and of the checkpoint when resuming) before any work."""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ..config import Config, config_diff, input_files
from ..results import (
    CheckpointError,
    checkpoint_path,
    output_problem,
    read_checkpoint,
    read_status,
)
from ..results.space import require_space
from .errors import RunError
from .lock import OutputLock


@dataclass(frozen=True)
class Start:
    """Where a run starts: 0 rounds done and no model, or a checkpoint's (its model, per-node state and
    metric rows); ``rebuild``: the results file is missing or damaged and is to be written anew from them."""

    rounds_done: int = 0
    model: np.ndarray | None = None
    state: dict[str, np.ndarray] | None = None
    metrics: dict[str, np.ndarray] | None = None
    rebuild: bool = False


def preflight(cfg: Config, overwrite: bool, resume: bool, rebuild_results: bool = False) -> Start:
    """Raise :class:`RunError` if the run cannot start; nothing is changed on disk.  With ``resume`` and
    ``rebuild_results``, a missing or unreadable results file is to be rebuilt from the checkpoint."""
    out = Path(cfg.output.path)
    ck = checkpoint_path(out)
    if not resume:
        if ck.exists() and not overwrite:
            raise RunError(f"{str(out)!r} belongs to an interrupted run (its checkpoint {str(ck)!r} exists): "
                           "pass --resume to continue it, or --overwrite to start over")
        problem = output_problem(out, overwrite)
        if problem:
            raise RunError(problem)
        return Start()
    problem = None
    if not out.exists():
        problem = f"--resume: {str(out)!r} does not exist"
    else:
        try:
            status, rows, _ = read_status(out)
        except Exception as e:  # noqa: BLE001 - any h5py failure means unreadable
            problem = f"--resume: results file {str(out)!r} is unreadable ({e})"
        else:
            if status == "completed" and not (ck.exists() and rows < cfg.train.rounds):
                kept = (f"raise train.rounds above {rows} to train it longer" if ck.exists() else
                        "a run with output.keep_checkpoint: true keeps its checkpoint and can be trained longer")
                raise RunError(f"--resume: {str(out)!r} already holds a completed run of {rows} rounds; nothing "
                               f"to do ({kept}). Choose a new output.path to train again")
    if problem and not ck.exists():
        raise RunError(f"{problem} and it has no checkpoint {str(ck)!r}, so there is nothing to resume; nothing "
                       "was changed. Start a new run (move the file away, or --overwrite)")
    if problem and not rebuild_results:
        raise RunError(f"{problem}; nothing was changed. Its checkpoint {str(ck)!r} can rebuild it: continue with "
                       "--resume --rebuild-results (a new results file with every round up to the checkpoint; "
                       "the damaged file is kept beside it as .damaged)")
    try:
        ckpt = read_checkpoint(ck)
    except CheckpointError as e:
        raise RunError(f"cannot resume {str(out)!r}: {e}. Nothing was changed") from None
    if problem and not ckpt.metrics:
        raise RunError(f"{problem}, and its checkpoint {str(ck)!r} was written by an older version that did not "
                       "keep the metrics, so the results cannot be rebuilt from it; nothing was changed. Move "
                       "the damaged file away and start a new run")
    diff = config_diff(ckpt.config_yaml, cfg)
    if diff:
        raise RunError(f"cannot resume {str(out)!r}: the config differs from the checkpoint's in keys that change "
                       f"results: {'; '.join(diff)}. Use the original config (the file's config_yaml attribute) "
                       "or start a new run with another output.path")
    changed = changed_inputs(ckpt.inputs, cfg)
    if changed:
        raise RunError(f"cannot resume {str(out)!r}: {'; '.join(changed)}, so the rounds still to run would not "
                       "continue the ones in the checkpoint. Restore the file as it was, or start a new run with "
                       "another output.path")
    old_rounds = (yaml.safe_load(ckpt.config_yaml) or {}).get("train", {}).get("rounds")
    if cfg.train.lr_schedule == "cosine" and old_rounds is not None and old_rounds != cfg.train.rounds:
        raise RunError(f"cannot resume {str(out)!r} with train.rounds={cfg.train.rounds}: the cosine learning-rate "
                       f"schedule spans the run's train.rounds={old_rounds}, so the remaining rounds would train "
                       f"at other rates. Resume with --set train.rounds={old_rounds}")
    if ckpt.rounds_done >= cfg.train.rounds:
        raise RunError(f"cannot resume {str(out)!r}: the checkpoint already has {ckpt.rounds_done} rounds and "
                       f"train.rounds={cfg.train.rounds}; raise train.rounds to train longer")
    if not os.access(out.parent if str(out.parent) else ".", os.W_OK):
        raise RunError(f"cannot resume {str(out)!r}: its directory is not writable")
    return Start(ckpt.rounds_done, ckpt.model, ckpt.state, ckpt.metrics, rebuild=problem is not None)


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def input_digests(cfg: Config) -> str:
    """JSON ``{key: {"path": ..., "sha256": ...}}`` of the trace and matrix files the config names (what a
    checkpoint keeps; "" when it names none)."""
    files = input_files(cfg)
    return json.dumps({k: {"path": p, "sha256": _sha256(p)} for k, p in files.items()}, sort_keys=True) \
        if files else ""


def changed_inputs(recorded: str, cfg: Config) -> list[str]:
    """What changed in the input files a checkpoint recorded (``recorded``: :func:`input_digests`' JSON)."""
    if not recorded:
        return []
    out = []
    for key, was in sorted(json.loads(recorded).items()):
        path = input_files(cfg).get(key, was["path"])
        try:
            now = _sha256(path)
        except OSError as e:
            out.append(f"the file {path!r} of config key '{key}' cannot be read ({e.strerror or e})")
            continue
        if now != was["sha256"]:
            out.append(f"the file {path!r} of config key '{key}' changed since the checkpoint (SHA-256 "
                       f"{was['sha256'][:12]}... then, {now[:12]}... now)")
    return out


def claim_output(cfg: Config, lock: OutputLock, overwrite: bool, resume: bool, rebuild: bool,
                 needed: Callable[[Start], int]) -> Start:
    """On rank 0: take the output's lock, check the output (and the checkpoint) with :func:`preflight`, and the
    free space for ``needed(start)`` bytes.  The lock is released again if anything fails."""
    if lock.path.exists():  # a holder to name (or a stale lock to explain) comes first
        lock.acquire(take_over_stale=resume or overwrite)
    try:
        start = preflight(cfg, overwrite, resume, rebuild)  # also says what is wrong with the output's location
        if not lock.held:
            lock.acquire(take_over_stale=resume or overwrite)
        out = Path(cfg.output.path)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            require_space(out.parent, needed(start), "this run's results file, checkpoint and final model")
        except OSError as e:
            raise OSError(f"cannot start the run in {str(out.parent)!r}: {e.strerror or e}. Free disk space "
                          "there or choose another output.path; nothing was written") from None
    except BaseException:
        lock.release()
        raise
    return start
