"""edgesqz.fileio: the one file writer (checked, atomic, never replacing without --force)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgesqz.errors import EdgesqzError
from edgesqz.fileio import atomic_file, atomic_write, check_output


def test_check_output_refuses_existing_file_without_force(tmp_path: Path) -> None:
    target = tmp_path / "out.jsonl"
    target.write_text("keep me")
    with pytest.raises(EdgesqzError, match="already exists; pass --force"):
        check_output(target)
    assert check_output(target, force=True) == target
    assert target.read_text() == "keep me"


def test_check_output_suffix_folder_and_parent(tmp_path: Path) -> None:
    with pytest.raises(EdgesqzError, match=r"must end in \.csv"):
        check_output(tmp_path / "x.txt", suffixes=(".csv",))
    with pytest.raises(EdgesqzError, match="is a folder"):
        check_output(tmp_path)
    assert check_output(tmp_path / "new" / "deeper" / "x.csv").parent.is_dir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EdgesqzError, match="cannot create folder"):
        check_output(blocker / "x.csv")


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    atomic_write(target, b"one")
    atomic_write(target, "two")
    assert target.read_bytes() == b"two"
    assert os.listdir(tmp_path) == ["m.bin"]


def test_atomic_write_without_force_never_replaces(tmp_path: Path) -> None:
    target = tmp_path / "m.bin"
    target.write_bytes(b"mine")
    with pytest.raises(EdgesqzError, match="appeared while it was being written"):
        atomic_write(target, b"new", force=False)
    assert target.read_bytes() == b"mine"
    assert os.listdir(tmp_path) == ["m.bin"]


def test_atomic_file_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "v.mp4"
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        assert tmp.suffix == ".mp4" and tmp.parent == tmp_path
        tmp.write_bytes(b"half")
        raise RuntimeError("encoder died")
    assert os.listdir(tmp_path) == []


def test_disk_full_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    real_open = open

    def full_open(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        f = real_open(file, mode, *args, **kwargs)
        if "w" in mode:
            def fail(_data: bytes) -> int:
                raise OSError(errno.ENOSPC, "No space left on device")
            f.write = fail  # type: ignore[method-assign]
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(EdgesqzError, match="the disk is full"):
        atomic_write(tmp_path / "r.json", "{}")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []


def test_written_files_get_the_usual_mode_not_a_private_one(tmp_path: Path) -> None:
    """mkstemp makes 0600 files; published files get what open() would give under the umask (snapshots others read)."""
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "snap.jpg", b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "snap.jpg").stat().st_mode & 0o777 == 0o644
