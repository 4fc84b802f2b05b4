"""Clean text for the results files: every string attribute passes through :func:`clean_text`.

Strings reach the HDF5 files from MPI (``MPI_Get_library_version``: Open MPI's
ends in a NUL character), torch, the host, the config and error messages.
HDF5's variable-length strings cannot hold NUL, and control characters make
files unreadable in other tools, so before any string is written:

* NUL characters are removed;
* tab and newline stay (the config's YAML text is multi-line);
* every other control character (C0, DEL, C1) becomes the visible escape
  ``\\xNN``, e.g. ``"\\x1b"`` for ESC;
* a lone surrogate (undecodable bytes of a file name, kept by Python as
  ``\\udcNN``) becomes ``\\udcNN`` spelled out, so the text is valid UTF-8.

Pure: no I/O.  Documented for users in docs/results.md.
"""
from __future__ import annotations

__all__ = ["clean_text"]

_KEEP = frozenset("\t\n")


def _escape(ch: str) -> str:
    code = ord(ch)
    if code == 0:
        return ""
    if 0xD800 <= code <= 0xDFFF:
        return f"\\u{code:04x}"
    if ch in _KEEP:
        return ch
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return f"\\x{code:02x}"
    return ch


def clean_text(value: object) -> str:
    """``str(value)`` fit for an HDF5 string attribute (see the module doc)."""
    text = str(value)  # also a numpy str_, which h5py would store as fixed-length unicode (unsupported)
    if text.isprintable():  # the common case: nothing to do
        return text
    return "".join(_escape(ch) for ch in text)
