"""Names from the network stay inside the task folder (pure path arithmetic, no disk)."""

from __future__ import annotations

import pytest

from rca_core import INVALID_INPUT_ERROR, TaskFailure
from rca_core._paths import is_within, join_inside, task_dir_name


@pytest.mark.parametrize("task_id", ["task-1", "a.b_c-D9", "0" * 128, "x..y"])
def test_a_harmless_task_id_is_its_own_folder_name(task_id: str) -> None:
    assert task_dir_name(task_id) == task_id


@pytest.mark.parametrize(
    "task_id",
    [
        "",
        ".",
        "..",
        "../etc",
        "a/b",
        "a\\b",
        "/abs",
        ".hidden",
        "-flag",
        "0" * 129,
        "é",
        "t\x00",
        "\udcff",
    ],
)
def test_any_other_task_id_becomes_a_stable_digest(task_id: str) -> None:
    folder = task_dir_name(task_id)
    assert folder.startswith("task-")
    assert len(folder) == len("task-") + 32
    assert folder == task_dir_name(task_id)
    assert set(folder[5:]) <= set("0123456789abcdef")


def test_distinct_ids_get_distinct_digests() -> None:
    assert task_dir_name("a/b") != task_dir_name("a\\b")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("out.txt", "/data/t1/out.txt"),
        ("sub/dir/out.txt", "/data/t1/sub/dir/out.txt"),
        ("sub/../out.txt", "/data/t1/out.txt"),
        ("./a//b", "/data/t1/a/b"),
        ("..x", "/data/t1/..x"),
    ],
)
def test_relative_names_are_joined_inside(name: str, expected: str) -> None:
    assert join_inside("/data/t1/", name) == expected


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "invalid file name"),
        ("a\x00b", "invalid file name"),
        (None, "invalid file name"),
        (b"bytes", "invalid file name"),
        ("/etc/passwd", "is absolute"),
        ("\\share\\x", "is absolute"),
        ("..", "escapes"),
        ("../t2/x", "escapes"),
        ("a/../../x", "escapes"),
        (".", "escapes"),
        ("a/..", "escapes"),
    ],
)
def test_names_that_leave_the_folder_are_refused(name: object, why: str) -> None:
    with pytest.raises(TaskFailure, match=why) as caught:
        join_inside("/data/t1", name)  # type: ignore[arg-type]
    assert caught.value.code == INVALID_INPUT_ERROR


def test_relative_roots_work_too() -> None:
    assert join_inside("payloads/t1", "x") == "payloads/t1/x"
    with pytest.raises(TaskFailure):
        join_inside("payloads/t1", "../t2")


@pytest.mark.parametrize(
    ("root", "path", "inside"),
    [
        ("/data/t1", "/data/t1", True),
        ("/data/t1", "/data/t1/x/y", True),
        ("/data/t1", "/data/t10", False),
        ("/data/t1", "/data", False),
        ("/data/t1", "relative/path", False),  # mixing absolute and relative: not inside
    ],
)
def test_is_within(root: str, path: str, inside: bool) -> None:
    assert is_within(root, path) is inside
