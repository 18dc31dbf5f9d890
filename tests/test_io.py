"""Atomic writes (``robustface.utils.io``)."""

from __future__ import annotations

import re

import pytest

from robustface.utils.io import check_output_dir, write_text_atomic


def test_a_directory_where_a_file_is_meant_is_named(tmp_path):
    """``--out DIR`` for a file output: a one-line user error before anything is written (it was
    os.replace's IsADirectoryError traceback after the work), no temporary file left."""
    out = tmp_path / "results"
    out.mkdir()
    with pytest.raises(FileExistsError, match=re.escape(f"{out} is a directory; name the file")):
        write_text_atomic(out, "{}")
    assert list(tmp_path.iterdir()) == [out] and list(out.iterdir()) == []
    write_text_atomic(out / "r.json", "{}")
    assert (out / "r.json").read_text() == "{}"


def test_a_file_where_an_output_directory_goes_is_named(tmp_path):
    """``--out FILE --overwrite`` for a directory output: refused, the file kept (it was
    pathlib's NotADirectoryError traceback)."""
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    with pytest.raises(FileExistsError, match=re.escape(f"{out} is a file, not an output dir")):
        check_output_dir(out, overwrite=True, marker="manifest.json")
    assert out.read_text() == "mine"
