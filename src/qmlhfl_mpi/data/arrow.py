"""Arrow and Parquet data sets on disk: Hugging Face ``save_to_disk`` directories, Parquet, Feather.

A pooled data set (``data.name: arrow``)::

    data:
      name: arrow
      root: /scratch/me/data          # relative paths below are taken from here
      args: {path: speech-commands, features: [f0, f1, f2], label: label, owner: speaker}
      partition: {kind: natural}      # the owner column's ids, dealt to the devices

``path`` (and ``test_path``) may name

* a directory written by Hugging Face ``Dataset.save_to_disk`` (``state.json``
  and ``data-*.arrow`` files in Arrow IPC *stream* format);
* a directory written by ``DatasetDict.save_to_disk`` (``dataset_dict.json``
  and one such directory per split);
* a ``.parquet`` file, or a directory of ``.parquet`` files;
* an ``.arrow`` / ``.feather`` / ``.ipc`` file (Arrow IPC file or stream format);
* a directory of ``.arrow`` files named the way the Hugging Face cache names
  them (``<name>-<split>.arrow``, ``<name>-<split>-00000-of-00003.arrow``) or
  of Parquet files named the way the Hub names them
  (``<split>-00000-of-00001.parquet``): the files of the wanted split are read.

Splits: the training split is split ``train_split`` (default ``train``) of
``path`` when that is a DatasetDict or a directory of split-named files, else
all of ``path``.  The test split is ``test_split`` (default ``test``) of
``test_path`` if given, else of ``path``; a ``path`` that is a single data set
has no test split, and reading one is refused with a message that names
``test_path`` and ``test_split`` (nothing is split off silently).

Arrow files are opened with :func:`pyarrow.memory_map`: nothing is read into
memory up front, and ``x[idx]`` (:class:`ArrowFeatures`) decodes only the rows
``idx`` (``Table.take``).  Parquet cannot be mapped raw: the needed columns
are read and decompressed into memory (``pyarrow.parquet``, ``memory_map=True``).
Labels and owner ids are read into numpy arrays (8 bytes a sample each).

Nothing is downloaded: the files must be on disk.  Every problem is a
:class:`~qmlhfl_mpi.data.source.DataError` that quotes the bad value and says
what to do.  pyarrow is imported on first use (``pip install 'qmlhfl_mpi[arrow]'``).
"""
from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .source import DataError

__all__ = ["ArrowFeatures", "arrow", "arrow_sizes"]

ARROW_SUFFIXES = (".arrow", ".feather", ".ipc")
PARQUET_SUFFIXES = (".parquet", ".pq")
SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "eval")  # split names HF file names carry
_SHARD = re.compile(r"-\d{5}-of-\d{5}(-[0-9a-f]+)?$")  # "-00000-of-00003" (and the Hub's "-<hash>")
_INSTALL = "pip install 'qmlhfl_mpi[arrow]'"
_SAVE = ("write it with Hugging Face datasets: ds.save_to_disk(DIR) for one data set, DatasetDict({'train': ..., "
         "'test': ...}).save_to_disk(DIR) for splits, or ds.to_parquet(FILE)")
_IMAGE_MODES = ("L", "LA", "RGB", "RGBA", "I;16")


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401 - loads the submodule for pyarrow.parquet below
    except ImportError as e:
        raise DataError(f"data.name 'arrow' needs pyarrow, which is not installed ({e}): {_INSTALL}") from None
    return pyarrow


# --------------------------------------------------------------------------- where the files are
@dataclass(frozen=True)
class _Files:
    """The data files of one split, all of one kind, and how to name them in messages."""

    files: tuple[Path, ...]
    parquet: bool
    where: str


def _kind(path: Path) -> bool | None:
    """True for Parquet, False for Arrow, None for any other file."""
    suffix = path.suffix.lower()
    return True if suffix in PARQUET_SUFFIXES else False if suffix in ARROW_SUFFIXES else None


def _split_of(path: Path) -> str:
    """The split a Hugging Face file name carries: ``mnist-train-00000-of-00002.arrow`` -> ``train``."""
    return _SHARD.sub("", path.stem).rsplit("-", 1)[-1]


def _resolve(root: Any, value: Any, key: str) -> Path:
    if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
        raise DataError(f"arrow data set: data.args.{key} must be a path (a file or directory, relative to "
                        f"data.root or absolute), got {value!r}")
    path = Path(os.path.expanduser(os.fspath(value)))
    base = Path(os.path.expanduser(os.fspath(root))) if root is not None else Path()
    full = path if path.is_absolute() else base / path
    if not full.exists():
        how = "" if path.is_absolute() else f" (relative paths are taken from data.root={os.fspath(root or '.')!r})"
        raise DataError(f"arrow data set: data.args.{key}={os.fspath(value)!r}: {str(full.absolute())!r} does not "
                        f"exist{how}; point it at a save_to_disk directory, a DatasetDict, a .parquet file or "
                        f"directory, or an .arrow/.feather file")
    return full


def _no_split(path: Path, what: str, split: str) -> DataError:
    return DataError(f"arrow data set: {str(path)!r} is {what}, which has no {split!r} split for the test set; set "
                     f"data.args.test_path to the test data (a path of the same kinds), or point data.args.path at a "
                     f"DatasetDict (dataset_dict.json) with a {split!r} split (data.args.test_split names it)")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"arrow data set: cannot read {str(path)!r}: {e}; {_SAVE}") from None


def _plain_name(name: str, listed_in: Path) -> None:
    """A file or split name from a JSON file must stay inside its directory."""
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise DataError(f"arrow data set: {str(listed_in)!r} lists {name!r}, which is not a plain name inside its "
                        f"directory; {_SAVE}")


def _files(path: Path, split: str, own: bool, split_key: str) -> _Files:
    """The files of split ``split`` of ``path``.  ``own``: ``path`` was given for this split, so a single data
    set is the split itself; else only a DatasetDict or split-named files have it."""
    if path.is_file():
        parquet = _kind(path)
        if parquet is None:
            raise DataError(f"arrow data set: {str(path)!r} is neither a .parquet nor an .arrow/.feather/.ipc file; "
                            f"{_SAVE}")
        if not own:
            raise _no_split(path, "one file", split)
        return _Files((path,), parquet, str(path))
    if (path / "dataset_dict.json").is_file():
        splits = _read_json(path / "dataset_dict.json").get("splits")
        if not isinstance(splits, list):
            raise DataError(f"arrow data set: {str(path / 'dataset_dict.json')!r} has no list of 'splits'; {_SAVE}")
        for name in splits:
            _plain_name(str(name), path / "dataset_dict.json")
        if split not in splits:
            raise DataError(f"arrow data set: the DatasetDict {str(path)!r} has the splits {splits} but no {split!r}; "
                            f"set data.args.{split_key} to one of them")
        sub = _files(path / split, split, True, split_key)
        return _Files(sub.files, sub.parquet, f"split {split!r} of the DatasetDict {str(path)!r}")
    if (path / "state.json").is_file():
        if not own:
            raise _no_split(path, "one data set (a save_to_disk directory)", split)
        state = _read_json(path / "state.json")
        entries = state.get("_data_files") if isinstance(state, dict) else None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) and "filename" in e
                                                                     for e in entries):
            raise DataError(f"arrow data set: {str(path / 'state.json')!r} lists no '_data_files'; {_SAVE}")
        names = [str(e["filename"]) for e in entries]
        for name in names:
            _plain_name(name, path / "state.json")
        files = tuple(path / name for name in names)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataError(f"arrow data set: the save_to_disk directory {str(path)!r} is incomplete: {missing} "
                            "listed in state.json are missing; copy the whole directory again")
        return _Files(files, False, str(path))
    data = sorted(p for p in path.iterdir() if p.is_file() and _kind(p) is not None)
    if not data:
        raise DataError(f"arrow data set: the directory {str(path)!r} holds no .arrow, .feather or .parquet files "
                        "and is neither a save_to_disk directory (state.json) nor a DatasetDict (dataset_dict.json); "
                        f"{_SAVE}")
    mine = [p for p in data if _split_of(p) == split]
    tags = sorted({_split_of(p) for p in data} & {*SPLIT_NAMES, split})
    if mine:
        data, where = mine, f"the {split!r} files of {str(path)!r}"
    elif tags:
        raise DataError(f"arrow data set: the directory {str(path)!r} has files of the split(s) {tags} (by their "
                        f"names, e.g. {data[0].name!r}) but none of {split!r}; set data.args.{split_key} to one of them")
    elif not own:
        raise _no_split(path, "one data set (a directory of files without split names)", split)
    else:
        where = str(path)
    kinds = {_kind(p) for p in data}
    if len(kinds) > 1:
        raise DataError(f"arrow data set: {where} mixes Arrow and Parquet files ({[p.name for p in data]}); keep "
                        "one kind per directory")
    return _Files(tuple(data), kinds.pop() is True, where)


def _split_files(root: Any, train: bool, path: Any, test_path: Any, train_split: str, test_split: str) -> _Files:
    if train:
        return _files(_resolve(root, path, "path"), train_split, True, "train_split")
    if test_path is not None:
        return _files(_resolve(root, test_path, "test_path"), test_split, True, "test_split")
    return _files(_resolve(root, path, "path"), test_split, False, "test_split")


# --------------------------------------------------------------------------- reading
def _read_arrow(pa: Any, path: Path) -> Any:
    """The table of an Arrow IPC file or stream, memory-mapped (zero copy for uncompressed buffers)."""
    try:
        source = pa.memory_map(str(path), "r")
    except OSError as e:
        raise DataError(f"arrow data set: cannot open {str(path)!r}: {e}") from None
    errors = []
    for opener in (pa.ipc.open_file, pa.ipc.open_stream):
        try:
            source.seek(0)
            return opener(source).read_all()
        except (pa.ArrowInvalid, OSError) as e:
            errors.append(str(e))
    raise DataError(f"arrow data set: {str(path)!r} is neither an Arrow IPC file nor an Arrow IPC stream "
                    f"({'; '.join(errors)}): the file is truncated or not Arrow; {_SAVE}")


def _columns(schema: Any) -> str:
    return ", ".join(f"{f.name} ({f.type})" for f in schema)


def _check_names(schema: Any, names: Sequence[str], key: str, where: str) -> None:
    present = set(schema.names)
    for name in names:
        if name not in present:
            raise DataError(f"arrow data set ({where}): no column {name!r} (data.args.{key}); the columns are: "
                            f"{_columns(schema)}")


def _read(pa: Any, src: _Files, wanted: dict[str, Sequence[str]], first: bool = False) -> Any:
    """The columns ``wanted`` (data.args key -> names) of the split's files as one table (``first``: only the
    first row of the first file, for its shapes)."""
    names = list(dict.fromkeys(n for cols in wanted.values() for n in cols))
    tables = []
    for path in src.files[:1] if first else src.files:
        if src.parquet:
            try:
                schema = pa.parquet.read_schema(str(path), memory_map=True)
                for key, cols in wanted.items():
                    _check_names(schema, cols, key, src.where)
                if first:
                    batches = pa.parquet.ParquetFile(str(path), memory_map=True).iter_batches(1, columns=names)
                    tables.append(pa.Table.from_batches([next(batches)]))
                else:
                    tables.append(pa.parquet.read_table(str(path), columns=names, memory_map=True))
            except StopIteration:
                tables.append(schema.empty_table().select(names))
            except (pa.ArrowException, OSError) as e:
                raise DataError(f"arrow data set: cannot read the Parquet file {str(path)!r}: {e}; {_SAVE}") from None
        else:
            table = _read_arrow(pa, path)
            for key, cols in wanted.items():
                _check_names(table.schema, cols, key, src.where)
            tables.append(table.select(names).slice(0, 1) if first else table.select(names))
    try:
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables)
    except pa.ArrowInvalid as e:
        raise DataError(f"arrow data set ({src.where}): its files {[p.name for p in src.files]} have different "
                        f"columns: {e}") from None
    if table.num_rows == 0:
        raise DataError(f"arrow data set ({src.where}) is an empty split (0 rows); check data.args.path / test_path "
                        "and the split names (train_split, test_split)")
    return table


def _plain(pa: Any, col: Any) -> Any:
    """``col`` without Hugging Face's extension types (Array2D ...) and dictionary encoding (zero copy)."""
    if isinstance(col.type, pa.ExtensionType):
        col = pa.chunked_array([c.storage for c in col.chunks], type=col.type.storage_type)
    if pa.types.is_dictionary(col.type):
        col = pa.chunked_array([c.dictionary_decode() for c in col.chunks], type=col.type.value_type)
    return col


def _numeric(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_integer(t) or pa.types.is_floating(t))


def _is_list(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t))


def _is_image(pa: Any, t: Any) -> bool:
    return bool(pa.types.is_struct(t) and {t.field(i).name for i in range(t.num_fields)} == {"bytes", "path"})


_FEATURE_TYPES = ("numbers (int, float) in one or more scalar columns, equal-length lists of numbers (fixed-size "
                  "list, HF Sequence), nested lists or HF Array2D/Array3D of one shape, or one HF Image column")


def _unsupported(pa: Any, name: str, t: Any, where: str) -> DataError:
    if pa.types.is_boolean(t):
        fix = f"cast it to integers, e.g. ds.cast_column({name!r}, Value('int8'))"
    elif pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_binary(t):
        fix = "encode it as numbers first (e.g. ds.class_encode_column, or a map to token ids), or leave it out"
    else:
        fix = "convert it to numbers first, or leave it out"
    return DataError(f"arrow data set ({where}): feature column {name!r} has the type {t}, which cannot be made a "
                     f"float32 tensor; {fix}. Supported: {_FEATURE_TYPES}")


def _list_shape(pa: Any, name: str, col: Any, where: str) -> tuple[int, ...]:
    """The shape of every row of the (nested) list column ``col``; rows of another shape are an error."""
    import pyarrow.compute as pc

    dims: list[int] = []
    level = list(col.chunks)
    t = col.type
    while _is_list(pa, t):
        if any(c.null_count for c in level):
            raise DataError(f"arrow data set ({where}): column {name!r} has missing (null) lists; every row needs "
                            "a value: drop or fill those rows")
        if pa.types.is_fixed_size_list(t):
            dims.append(int(t.list_size))
        else:
            lengths = np.concatenate([pc.list_value_length(c).to_numpy(zero_copy_only=False) for c in level])
            first = int(lengths[0]) if lengths.size else 0
            bad = np.flatnonzero(lengths != first)
            if bad.size:
                at = f"entry {int(bad[0])} at depth {len(dims) + 1}" if dims else f"row {int(bad[0])}"
                raise DataError(f"arrow data set ({where}): column {name!r} holds lists of different lengths "
                                f"({first} in the first, {int(lengths[bad[0]])} in {at}); every row "
                                "must have one shape: pad or truncate them, or store them with a fixed shape "
                                "(HF Sequence(length=...), Array2D)")
            dims.append(first)
        level = [c.flatten() for c in level]
        t = t.value_type
    if not _numeric(pa, t):
        raise _unsupported(pa, name, col.type, where)
    if any(c.null_count for c in level):
        raise DataError(f"arrow data set ({where}): column {name!r} has missing (null) numbers; fill or drop them")
    if 0 in dims:
        raise DataError(f"arrow data set ({where}): column {name!r} holds empty lists (shape {tuple(dims)}); every "
                        "input dimension must be >= 1")
    return tuple(dims)


def _image_mode(mode: str) -> str:
    """What an image of PIL mode ``mode`` is decoded as: one of :data:`_IMAGE_MODES`."""
    if mode in _IMAGE_MODES:
        return mode
    if mode.startswith("I;16"):
        return "I;16"
    return {"1": "L", "P": "RGB", "PA": "RGBA", "La": "LA", "RGBa": "RGBA", "RGBX": "RGB", "CMYK": "RGB",
            "YCbCr": "RGB", "LAB": "RGB", "HSV": "RGB"}.get(mode, "")


@dataclass(frozen=True)
class _Plan:
    """How the feature columns become one float32 tensor per row."""

    kind: str                          # "vector" (columns concatenated), "tensor" (one list column), "image"
    shape: tuple[int, ...]             # a row's shape
    widths: tuple[int, ...] = ()       # vector: values per column
    depth: int = 0                     # tensor: list levels
    mode: str = ""                     # image: the PIL mode images are converted to
    base: Path | None = None           # image: where relative image paths are taken from


class ArrowFeatures:
    """The feature columns of one split, as an array ``(rows, *input_shape)`` that decodes on demand.

    ``x[idx]`` (an integer index array) takes the rows ``idx`` from the
    (memory-mapped) table and returns them as float32 numpy ``(len(idx),
    *input_shape)``; nothing else is read or decoded.
    """

    def __init__(self, table: Any, plan: _Plan, where: str) -> None:
        self._table = table
        self._plan = plan
        self.where = where

    @property
    def shape(self) -> tuple[int, ...]:
        return (int(self._table.num_rows), *self._plan.shape)

    def __len__(self) -> int:
        return int(self._table.num_rows)

    def __getitem__(self, idx: Any) -> np.ndarray:
        rows = np.asarray(idx)
        if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
            raise IndexError(f"ArrowFeatures[idx]: idx must be a 1-D integer array, got dtype={rows.dtype} "
                             f"shape={rows.shape}")
        rows = rows.astype(np.int64, copy=False)
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            raise IndexError(f"ArrowFeatures[idx]: indices must lie in [0, {n - 1}], got min={rows.min()} "
                             f"max={rows.max()}")
        rows = np.where(rows < 0, rows + n, rows)
        part = self._table.take(rows)
        plan = self._plan
        if plan.kind == "image":
            out = self._images(part.column(0), rows)
        elif plan.kind == "tensor":
            arr = part.column(0).combine_chunks()
            for _ in range(plan.depth):
                arr = arr.flatten()
            out = arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(rows.size, *plan.shape)
        else:
            cols = []
            for i, width in enumerate(plan.widths):
                arr = part.column(i).combine_chunks()
                if width:  # a list column (0: a scalar one)
                    arr = arr.flatten()
                cols.append(arr.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
                            .reshape(rows.size, max(width, 1)))
            out = cols[0] if len(cols) == 1 else np.concatenate(cols, axis=1)
        out = np.ascontiguousarray(out, dtype=np.float32)
        if not out.flags.writeable:  # a view of Arrow's buffer: torch wants memory it may write
            out = out.copy()
        if not np.isfinite(out).all():
            bad = np.flatnonzero(~np.isfinite(out.reshape(rows.size, -1)).all(axis=1))
            raise DataError(f"arrow data set ({self.where}): row {int(rows[bad[0]])} has NaN or infinite features; "
                            "every feature must be finite: fill or drop those rows")
        return out

    def _images(self, col: Any, rows: np.ndarray) -> np.ndarray:
        from PIL import Image

        plan = self._plan
        c, h, w = plan.shape
        out = np.empty((rows.size, c, h, w), dtype=np.float32)
        scale = np.float32(65535.0 if plan.mode == "I;16" else 255.0)
        for i, cell in enumerate(col.to_pylist()):
            img = _open_image(Image, cell, plan.base, self.where, int(rows[i]))
            with img:
                mode = _image_mode(img.mode)
                if mode != plan.mode and (mode == "I;16" or plan.mode == "I;16" or not mode):
                    raise DataError(f"arrow data set ({self.where}): the image in row {int(rows[i])} has the PIL mode "
                                    f"{img.mode!r} but the first image {plan.mode!r}; all images must be 8-bit or all "
                                    "16-bit: convert them to one mode first")
                if img.size != (w, h):
                    raise DataError(f"arrow data set ({self.where}): the image in row {int(rows[i])} is {img.size[0]}x"
                                    f"{img.size[1]} (width x height) but the first image {w}x{h}; all images must "
                                    "have one size: resize them first (e.g. ds.map with PIL's Image.resize)")
                pixels = np.asarray(img if img.mode == plan.mode else img.convert(plan.mode))
            pixels = pixels.reshape(h, w, -1).transpose(2, 0, 1)
            out[i] = pixels.astype(np.float32) / scale
        return out


def _open_image(image_mod: Any, cell: Any, base: Path | None, where: str, row: int) -> Any:
    """The PIL image of a Hugging Face Image cell ``{bytes, path}`` (bytes first, else the file at path)."""
    cell = cell or {}
    data, path = cell.get("bytes"), cell.get("path")
    try:
        if data is not None:
            img = image_mod.open(io.BytesIO(data))
        elif path:
            full = Path(path) if Path(path).is_absolute() or base is None else base / path
            img = image_mod.open(full)
        else:
            raise DataError(f"arrow data set ({where}): the image in row {row} has neither bytes nor a path; every "
                            "row needs an image: drop those rows")
        img.load()
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, UnidentifiedImageError, DecompressionBombError ...
        what = f"bytes ({len(data)})" if data is not None else f"file {path!r}"
        raise DataError(f"arrow data set ({where}): the image in row {row} cannot be decoded from its {what}: "
                        f"{type(e).__name__}: {e}") from None
    return img


def _plan(pa: Any, table: Any, names: Sequence[str], where: str, base: Path | None) -> _Plan:
    """How the columns ``names`` of ``table`` decode (their shapes checked on every row of ``table``)."""
    kinds: list[tuple[str, tuple[int, ...]]] = []
    for name in names:
        col = table.column(name)
        t = col.type
        if _numeric(pa, t):
            if col.null_count:
                raise DataError(f"arrow data set ({where}): feature column {name!r} has {col.null_count} missing "
                                "(null) values; fill or drop those rows")
            kinds.append(("scalar", ()))
        elif _is_list(pa, t):
            kinds.append(("list", _list_shape(pa, name, col, where)))
        elif _is_image(pa, t):
            kinds.append(("image", ()))
        else:
            raise _unsupported(pa, name, t, where)
    if any(k == "image" for k, _ in kinds):
        if len(names) > 1:
            raise DataError(f"arrow data set ({where}): data.args.features {list(names)} mixes the image column "
                            f"{names[[k for k, _ in kinds].index('image')]!r} with other columns; an image column "
                            "must be the only feature")
        return _image_plan(pa, table.column(names[0]), where, base)
    multi = [(name, shape) for name, (k, shape) in zip(names, kinds) if len(shape) > 1]
    if multi and len(names) > 1:
        raise DataError(f"arrow data set ({where}): column {multi[0][0]!r} has rows of shape {multi[0][1]}; a column "
                        "with more than one dimension must be the only feature (data.args.features: "
                        f"{multi[0][0]!r}); only scalar and 1-D list columns are concatenated")
    if multi:
        return _Plan("tensor", multi[0][1], depth=len(multi[0][1]))
    widths = tuple(shape[0] if shape else 0 for _, shape in kinds)
    return _Plan("vector", (sum(max(w, 1) for w in widths),), widths=widths)


def _image_plan(pa: Any, col: Any, where: str, base: Path | None) -> _Plan:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - torchvision depends on Pillow
        raise DataError(f"arrow data set ({where}): decoding the image column needs Pillow ({e}): pip install "
                        "pillow") from None
    cell = col.slice(0, 1).to_pylist()[0]
    with _open_image(Image, cell, base, where, 0) as img:
        mode = _image_mode(img.mode)
        if not mode:
            raise DataError(f"arrow data set ({where}): the first image has the PIL mode {img.mode!r}, which is not "
                            f"decoded here; convert the images to one of {list(_IMAGE_MODES)} first")
        w, h = img.size
    return _Plan("image", (len(Image.new(mode, (1, 1)).getbands()), h, w), mode=mode, base=base)


def _labels(pa: Any, col: Any, name: str, where: str) -> np.ndarray:
    col = _plain(pa, col)
    t = col.type
    if col.null_count:
        raise DataError(f"arrow data set ({where}): the label column {name!r} has {col.null_count} missing (null) "
                        "values; every sample needs a label: drop or fill those rows")
    if pa.types.is_integer(t):
        y = np.array(col.to_numpy(), dtype=np.int64)  # a copy: not a view of the file
        if y.size and y.min() < 0:
            row = int(np.argmin(y))
            raise DataError(f"arrow data set ({where}): the label column {name!r} holds the negative value "
                            f"{int(y[row])} (row {row}); class labels must be 0, 1, ..., C-1: remap them (e.g. "
                            "ds.class_encode_column or ds.map) or drop those rows")
        return y
    if pa.types.is_floating(t):
        y = np.array(col.to_numpy(), dtype=np.float32)
        if not np.isfinite(y).all():
            row = int(np.flatnonzero(~np.isfinite(y))[0])
            raise DataError(f"arrow data set ({where}): the label column {name!r} (float: regression targets) holds "
                            f"{float(y[row])} (row {row}); targets must be finite: drop or fill those rows")
        return y
    sample = col.slice(0, 1).to_pylist()[0] if len(col) else None
    raise DataError(f"arrow data set ({where}): the label column {name!r} has the non-numeric type {t} (e.g. "
                    f"{sample!r}); labels must be integers >= 0 (classes, e.g. HF ClassLabel) or floats (regression "
                    "targets): encode them first, e.g. ds.class_encode_column(" + repr(name) + ")")


def _owners(pa: Any, col: Any, name: str, where: str) -> np.ndarray:
    col = _plain(pa, col)
    t = col.type
    if col.null_count:
        raise DataError(f"arrow data set ({where}): the owner column {name!r} has {col.null_count} missing (null) "
                        "ids; every training sample needs an owner: drop or fill those rows")
    if pa.types.is_integer(t):
        return np.array(col.to_numpy(), dtype=np.int64)
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return np.asarray(col.to_numpy(zero_copy_only=False), dtype=str)
    raise DataError(f"arrow data set ({where}): the owner column {name!r} has the type {t}; owner ids must be "
                    "integers or strings")


# --------------------------------------------------------------------------- the data set
def _check_args(path: Any, features: Any, label: Any, owner: Any, train_split: Any, test_split: Any,
                unknown: dict[str, Any]) -> list[str]:
    valid = "path, features, label, owner, test_path, train_split, test_split"
    if unknown:
        raise DataError(f"arrow data set: unknown data.args {sorted(unknown)}; the keys are {valid}")
    if path is None:
        raise DataError("arrow data set: data.args.path is required: the data set's file or directory (relative to "
                        "data.root or absolute)")
    names = [features] if isinstance(features, str) else features
    if not isinstance(names, (list, tuple)) or not names or not all(isinstance(n, str) and n for n in names):
        raise DataError(f"arrow data set: data.args.features must be a column name or a non-empty list of column "
                        f"names, got {features!r}")
    if len(set(names)) != len(names):
        raise DataError(f"arrow data set: data.args.features {list(names)} names a column twice")
    if not isinstance(label, str) or not label:
        raise DataError(f"arrow data set: data.args.label must be a column name, got {label!r}")
    if label in names:
        raise DataError(f"arrow data set: the label column {label!r} is also in data.args.features {list(names)}; "
                        "leave it out of the features")
    if owner is not None and (not isinstance(owner, str) or not owner):
        raise DataError(f"arrow data set: data.args.owner must be a column name (or left out), got {owner!r}")
    for key, value in (("train_split", train_split), ("test_split", test_split)):
        if not isinstance(value, str) or not value:
            raise DataError(f"arrow data set: data.args.{key} must be a split name, got {value!r}")
    return list(names)


def _open_split(pa: Any, src: _Files, names: list[str], label: str | None, owner: str | None
                ) -> tuple[ArrowFeatures, Any]:
    """The split's features and its table (holding the label and owner columns); ``label`` None: the features of
    the first row only, for their shape."""
    wanted: dict[str, Sequence[str]] = {"features": names}
    if label is not None:
        wanted["label"] = [label]
    if owner is not None:
        wanted["owner"] = [owner]
    table = _read(pa, src, wanted, first=label is None)
    feats = pa.table({n: _plain(pa, table.column(n)) for n in names})
    return ArrowFeatures(feats, _plan(pa, feats, names, src.where, src.files[0].parent), src.where), table


def arrow(root: Any, train: bool, path: Any = None, features: Any = None, label: str = "label",
          owner: str | None = None, test_path: Any = None, train_split: str = "train", test_split: str = "test",
          download: bool = False, **unknown: Any) -> tuple[Any, ...]:
    """``(x, y, owner)`` (training split, with ``owner``) or ``(x, y)`` of an Arrow/Parquet data set on disk.

    ``x`` is an :class:`ArrowFeatures` (decoded on demand), ``y`` int64 class
    labels or float32 targets, ``owner`` int64 or str ids (training split only).
    See the module doc for ``path``, the splits and the column types.
    """
    names = _check_args(path, features, label, owner, train_split, test_split, unknown)
    if download:
        raise DataError("arrow data set: nothing is downloaded (data.download: true); fetch the data set on a machine "
                        "with internet (datasets.load_dataset(...).save_to_disk(DIR)), copy DIR next to data.root and "
                        "set data.download: false")
    pa = _pyarrow()
    src = _split_files(root, train, path, test_path, train_split, test_split)
    x, table = _open_split(pa, src, names, label, owner if train else None)
    y = _labels(pa, table.column(label), label, src.where)
    if not train:
        train_src = _split_files(root, True, path, test_path, train_split, test_split)
        train_x, _ = _open_split(pa, train_src, names, None, None)
        if train_x.shape[1:] != x.shape[1:]:
            raise DataError(f"arrow data set: the features {names} have the shape {x.shape[1:]} in the test split "
                            f"({src.where}) but {train_x.shape[1:]} in the training split ({train_src.where}); both "
                            "splits must hold the same kind of samples: check data.args.test_path / test_split")
        return x, y
    if owner is None:
        return x, y
    return x, y, _owners(pa, table.column(owner), owner, src.where)


def arrow_sizes(root: Any, **args: Any) -> tuple[int, int, int]:
    """(training rows, test rows, bytes every rank holds besides its devices' samples) of the ``arrow`` data set
    with ``data.args`` ``args``, for the memory estimate: labels 8 bytes a row, owner ids 8 more a training row,
    and a Parquet split's feature columns (their uncompressed size); memory-mapped Arrow features are page cache,
    not counted."""
    pa = _pyarrow()
    names = _check_args(args.get("path"), args.get("features"), args.get("label", "label"), args.get("owner"),
                        args.get("train_split", "train"), args.get("test_split", "test"), {})
    rows, held = [], 0
    for train in (True, False):
        src = _split_files(root, train, args.get("path"), args.get("test_path"), args.get("train_split", "train"),
                           args.get("test_split", "test"))
        n = 0
        for path in src.files:
            if src.parquet:
                meta = pa.parquet.ParquetFile(str(path), memory_map=True).metadata
                n += meta.num_rows
                held += sum(meta.row_group(g).column(c).total_uncompressed_size for g in range(meta.num_row_groups)
                            for c in range(meta.num_columns)
                            if meta.row_group(g).column(c).path_in_schema.split(".")[0] in names)
            else:
                n += _read_arrow(pa, path).num_rows
        rows.append(n)
    held += 8 * (rows[0] + rows[1]) + (8 * rows[0] if args.get("owner") else 0)
    return rows[0], rows[1], held
