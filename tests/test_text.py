"""Every string reaches HDF5 clean: NULs removed, control characters escaped, newlines and tabs kept --
checked on the function and on a real results file and checkpoint (Open MPI's library version ends in NUL)."""
from __future__ import annotations

import h5py
import numpy as np
import pytest

from qmlhfl_mpi.core.text import clean_text
from qmlhfl_mpi.results import ResultsWriter, read_checkpoint, write_checkpoint

pytestmark = pytest.mark.portable
OPEN_MPI = "Open MPI v4.1.4, package: Debian OpenMPI, ident: 4.1.4, repo rev: v4.1.4, May 26, 2022\x00"


def test_clean_text_rules():
    assert clean_text(OPEN_MPI) == OPEN_MPI[:-1]
    assert clean_text("a\x00b") == "ab"
    assert clean_text("tab\tand\nnewline") == "tab\tand\nnewline"
    assert clean_text("esc\x1b[31mred\r\x7f\x85") == "esc\\x1b[31mred\\x0d\\x7f\\x85"
    assert clean_text("file-\udcff.h5") == "file-\\udcff.h5"  # an undecodable byte of a file name
    assert clean_text("ünïcödé ✓") == "ünïcödé ✓"
    assert clean_text(np.str_("x\x00")) == "x" and type(clean_text(np.str_("y"))) is str
    assert clean_text(3) == "3"


def test_results_file_and_checkpoint_store_dirty_strings_clean(tmp_path):
    attrs = {"mpi_library": OPEN_MPI, "config_yaml": "a: 1\nb: 'x\x01'\n", "host": "n\udcff\x00de"}
    w = ResultsWriter(tmp_path / "r.h5", overwrite=False, attrs=attrs, topology={"samples": np.arange(3)},
                      quantizer={"kind": np.array(["qsgd\x00", "none"], dtype=object)}, num_links=2)
    w.close("failed", "rank 1 failed: boom\x00\x07")
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["mpi_library"] == OPEN_MPI[:-1]
        assert f.attrs["config_yaml"] == "a: 1\nb: 'x\\x01'\n"
        assert f.attrs["host"] == "n\\udcffde"
        assert f.attrs["status_message"] == "rank 1 failed: boom\\x07"
        assert [v.decode() for v in f["quantizer/kind"][()]] == ["qsgd", "none"]
    write_checkpoint(tmp_path / "c.ckpt", model=np.ones(4, np.float32), rounds_done=1, config_yaml="a: '\x00'\n")
    assert read_checkpoint(tmp_path / "c.ckpt").config_yaml == "a: ''\n"  # the digest covers the cleaned text
