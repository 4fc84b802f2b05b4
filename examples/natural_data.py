"""A data-set plug-in with a natural split: samples written by "writers".

Use it in a config as::

    data:
      name: examples/natural_data.py:load
      args: {writers: 12, samples_per_writer: 40, dim: 20, classes: 5, seed: 0}
      partition: {kind: natural}

A data-set plug-in is a function ``f(root, train, **data.args)`` returning
``(x, y)`` or ``(x, y, owner)`` for the training (``train=True``) or test
split.  With ``data.partition.kind: natural`` the training split's ``owner``
array says who owns every sample: the sorted owner ids are dealt to the
tree's ``D`` devices in contiguous blocks (owner ``j`` goes to device
``floor(j * D / O)``), so there must be at least as many writers as devices.

The data are generated, deterministically, with numpy:

* the class centres and every writer's *style* (a feature shift, the same in
  both splits) come from ``np.random.default_rng([seed, 0])``;
* the samples of a split come from ``np.random.default_rng([seed, 1 + train])``.

Each writer labels its samples with its own class proportions (Dirichlet) and
shifts all its features by its style, so the natural split is non-IID in both
labels and features.  The test split has samples of every writer and every
class.  ``root`` is ignored: nothing is read from disk.
"""
from __future__ import annotations

import numpy as np

OWNER_BASE = 100  # owner ids are OWNER_BASE + writer: any integers work, only their sorted order matters


def _check(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    return int(value)


def load(root: str, train: bool, writers: int = 12, samples_per_writer: int = 40, dim: int = 20,
         classes: int = 5, seed: int = 0):
    """``(x, y, owner)`` for the training split, ``(x, y)`` for the test split.

    ``x`` is float32 of shape ``(n, dim)``, ``y`` int64 labels in ``0..classes-1``,
    ``owner`` int64 (one writer id per sample).  ``root`` is ignored.
    """
    del root  # generated data: nothing is read
    writers = _check("writers", writers, 1)
    samples_per_writer = _check("samples_per_writer", samples_per_writer, 1)
    dim = _check("dim", dim, 1)
    classes = _check("classes", classes, 2)
    seed = _check("seed", seed, 0)

    shared = np.random.default_rng([seed, 0])  # the same for both splits
    centres = shared.normal(0.0, 1.0, size=(classes, dim))
    style = shared.normal(0.0, 1.0, size=(writers, dim))          # each writer's feature shift
    mix = shared.dirichlet(np.full(classes, 0.5), size=writers)   # each writer's label proportions

    rng = np.random.default_rng([seed, 1 + int(bool(train))])
    if train:
        writer = np.repeat(np.arange(writers), samples_per_writer)
        y = np.concatenate([rng.choice(classes, size=samples_per_writer, p=mix[w]) for w in range(writers)])
    else:  # every writer, every class: a balanced test set of the same writers' styles
        per_writer = max(-(-classes // writers), samples_per_writer // 4)
        writer = np.repeat(np.arange(writers), per_writer)
        y = np.arange(writer.size) % classes
    x = centres[y] + style[writer] + 0.5 * rng.normal(0.0, 1.0, size=(writer.size, dim))
    order = rng.permutation(writer.size)  # interleave the writers: the split must come from `owner`
    x = x[order].astype(np.float32)
    y = y[order].astype(np.int64)
    if not train:
        return x, y
    return x, y, (OWNER_BASE + writer[order]).astype(np.int64)
