"""write_atomic: complete files only, permissions kept, no temp files left behind."""

import os

import pytest

from engine.atomic import write_atomic


def test_replaces_content_and_keeps_mode(tmp_path):
    target = tmp_path / "memory.md"
    target.write_text("old")
    os.chmod(target, 0o600)
    write_atomic(target, "new text")
    assert target.read_text() == "new text"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["memory.md"]


def test_failed_write_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "analysis.md"
    target.write_text("kept")


    with pytest.raises(TypeError):
        write_atomic(target, 12345)  # type: ignore[arg-type]
    assert target.read_text() == "kept"
    assert [p.name for p in tmp_path.iterdir()] == ["analysis.md"]
