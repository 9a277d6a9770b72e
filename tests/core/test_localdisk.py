"""The blocking disk helpers the adapters run in threads during S3 transfers."""

from __future__ import annotations

import os
import pathlib

import pytest

from rca_core._localdisk import (
    DiskError,
    PartFile,
    make_folders,
    on_disk,
    write_empty,
)


def test_local_disk_facts(tmp_path: pathlib.Path) -> None:
    """The answers both adapters give to the core's questions about the disk."""
    from rca_core._localdisk import LocalDisk

    disk = LocalDisk()
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "a.txt").write_bytes(b"abc")
    (tmp_path / "d" / "sub" / "b.txt").write_bytes(b"b")
    (tmp_path / "d" / "linked").symlink_to(tmp_path / "d" / "sub")
    (tmp_path / "d" / "dead").symlink_to(tmp_path / "nowhere")
    os.mkfifo(tmp_path / "fifo")
    root = str(tmp_path / "d")
    assert disk.resolve(str(tmp_path / "d" / "linked" / "b.txt")) == f"{root}/sub/b.txt"
    assert disk.resolve(str(tmp_path / "d" / "dead")) is None
    assert disk.stat(f"{root}/a.txt") == ("file", 3)
    assert disk.stat(root) == ("dir", 0)
    assert disk.stat(str(tmp_path / "fifo")) == ("other", 0)
    assert disk.stat(str(tmp_path / "nowhere")) == ("missing", 0)
    assert disk.walk(root, 100) == ["a.txt", "dead", "linked", "sub/b.txt"]
    assert disk.walk(root, 2) == ["a.txt", "dead"]
    with pytest.raises(FileNotFoundError):
        disk.walk(str(tmp_path / "nowhere"), 10)


def test_part_file_appears_only_when_committed(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "out.bin"
    part = PartFile(str(dest))
    part.write(b"abc")
    part.write(b"def")
    assert not dest.exists()
    (only,) = tmp_path.iterdir()
    assert only.name.endswith(".part")
    part.commit()
    assert dest.read_bytes() == b"abcdef"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_part_file_discard_leaves_nothing_and_drops_late_writes(tmp_path: pathlib.Path) -> None:
    dest = tmp_path / "out.bin"
    part = PartFile(str(dest))
    part.write(b"abc")
    part.discard()
    part.write(b"late")  # a write queued before the discard is dropped, not an error
    assert list(tmp_path.iterdir()) == []
    part.discard()  # twice is harmless


def test_disk_failures_are_disk_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(DiskError, match="local disk: cannot create a file next to"):
        PartFile(str(tmp_path / "missing" / "x.bin"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(DiskError, match="cannot create folder"):
        make_folders([str(blocker / "sub")])
    with pytest.raises(DiskError, match="cannot do it"):
        on_disk(lambda: os.stat(tmp_path / "nope"), "do it")
    make_folders([str(tmp_path / "a" / "b")])
    assert (tmp_path / "a" / "b").is_dir()


def test_write_empty_creates_an_empty_file(tmp_path: pathlib.Path) -> None:
    write_empty(str(tmp_path / "empty"))
    assert (tmp_path / "empty").read_bytes() == b""


def test_walk_errors_are_not_skipped(tmp_path: pathlib.Path) -> None:
    from rca_core._localdisk import LocalDisk

    with pytest.raises(OSError):
        LocalDisk().walk(str(tmp_path / "does-not-exist"), 10)


def test_walk_stops_at_the_limit(tmp_path: pathlib.Path) -> None:
    from rca_core._localdisk import LocalDisk

    for n in range(5):
        (tmp_path / f"{n}.txt").write_text("x")
    assert len(LocalDisk().walk(str(tmp_path), 3)) == 3
