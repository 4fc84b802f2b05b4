"""Write a small Hugging Face data set with writers (owners) to disk, for examples/arrow.yaml.

    .venv/bin/python examples/make_arrow.py                       # into results/examples/arrow-data
    .venv/bin/python examples/make_arrow.py DIR --writers 80      # elsewhere, more writers

A ``DatasetDict`` with a ``train`` and a ``test`` split, saved with
``save_to_disk`` (Arrow IPC stream files that the ``arrow`` data set
memory-maps).  Columns:

* ``x``: 20 float32 features (``Sequence(Value("float32"), length=20)``, a fixed-size list);
* ``label``: one of 5 classes (``ClassLabel``);
* ``writer``: the writer's id, a string such as ``"w007"`` (the owner column
  of the natural split).

Samples are generated the way examples/natural_data.py does it: every writer
has its own feature shift (its "style") and its own class proportions
(Dirichlet(0.5)), so the natural split over the writers is non-IID in labels
and features.  80% of each writer's samples are for training, the rest for
the test split.  Deterministic for a seed; takes about a second.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def generate(writers: int = 50, samples: int = 5000, dim: int = 20, classes: int = 5,
             seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """The columns of both splits as numpy arrays: ``{"train": {"x", "label", "writer"}, "test": {...}}``."""
    if writers < 1 or samples < 2 * writers or dim < 1 or classes < 2:
        raise ValueError(f"need writers >= 1, samples >= 2 * writers, dim >= 1 and classes >= 2; got writers={writers}, "
                         f"samples={samples}, dim={dim}, classes={classes}")
    rng = np.random.default_rng([seed, 0])
    centres = rng.normal(0.0, 1.0, size=(classes, dim))
    style = rng.normal(0.0, 1.0, size=(writers, dim))             # each writer's feature shift
    mix = rng.dirichlet(np.full(classes, 0.5), size=writers)      # each writer's label proportions
    writer = np.sort(rng.integers(0, writers, size=samples - 2 * writers))
    writer = np.sort(np.concatenate([np.repeat(np.arange(writers), 2), writer]))  # every writer >= 2 samples
    label = np.array([rng.choice(classes, p=mix[w]) for w in writer], dtype=np.int64)
    x = (centres[label] + style[writer] + 0.5 * rng.normal(0.0, 1.0, size=(samples, dim))).astype(np.float32)
    test = np.zeros(samples, dtype=bool)
    for w in range(writers):  # the last fifth (at least one) of each writer's samples
        mine = np.flatnonzero(writer == w)
        test[mine[len(mine) - max(1, len(mine) // 5):]] = True
    order = rng.permutation(samples)  # interleave the writers: the split must come from the owner column
    x, label, writer, test = x[order], label[order], writer[order], test[order]
    names = np.array([f"w{w:03d}" for w in range(writers)])
    return {split: {"x": x[keep], "label": label[keep], "writer": names[writer[keep]]}
            for split, keep in (("train", ~test), ("test", test))}


def write(out: Path, writers: int = 50, samples: int = 5000, dim: int = 20, classes: int = 5, seed: int = 0) -> Path:
    """Generate the data set and ``save_to_disk`` it into ``out`` (a DatasetDict); returns ``out``."""
    import datasets
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Sequence, Value

    datasets.disable_progress_bars()
    features = Features({"x": Sequence(Value("float32"), length=dim),
                         "label": ClassLabel(names=[f"class{c}" for c in range(classes)]),
                         "writer": Value("string")})
    splits = generate(writers, samples, dim, classes, seed)
    dd = DatasetDict({name: Dataset.from_dict({k: list(v) if k == "x" else v.tolist() for k, v in cols.items()},
                                              features=features)
                      for name, cols in splits.items()})
    out.parent.mkdir(parents=True, exist_ok=True)
    dd.save_to_disk(str(out))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", nargs="?", default="results/examples/arrow-data", help="directory to write")
    ap.add_argument("--writers", type=int, default=50)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--dim", type=int, default=20)
    ap.add_argument("--classes", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = write(Path(a.out), a.writers, a.samples, a.dim, a.classes, a.seed)
    print(f"wrote {out}: {a.samples} samples of {a.dim} features from {a.writers} writers, {a.classes} classes "
          "(splits train and test)")


if __name__ == "__main__":
    main()
