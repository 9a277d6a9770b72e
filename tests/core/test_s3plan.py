"""The S3 offloading decisions, without any I/O: keys, paths, plans, errors.

These tests drive ``rca_core._s3plan`` through its public functions only and
cover it 100 % by branch. Hypothesis checks the invariants that matter for
safety: no key or file name, however hostile, maps outside the task folder;
``substitute`` never mutates its input; result keys stay in their task's
namespace.
"""

from __future__ import annotations

import copy
import posixpath
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rca_core._errors import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    ConfigError,
    TaskFailure,
)
from rca_core._s3plan import (
    INPUTS_DIRNAME,
    MAX_DEPTH,
    MAX_LISTED_OBJECTS,
    DownloadItem,
    FileKind,
    InputRef,
    Location,
    OutputRef,
    S3Settings,
    UploadItem,
    chunk_budget,
    classify_transfer_error,
    failure_from_exception,
    find_inputs,
    find_outputs,
    first_failure,
    local_path_for_object,
    map_listed_keys,
    parse_s3_uri,
    part_size_for,
    plan_downloads,
    plan_uploads,
    substitute,
    transfer_error_kind,
    unconfigured_failure,
    upload_key,
)

TASK = "/work/tasks/task-1"
MiB = 1 << 20


def inside(root: str, path: str) -> bool:
    return posixpath.commonpath([root, path]) == root and posixpath.normpath(path) == path


# -- settings -----------------------------------------------------------------


def test_settings_defaults_and_repr_hide_the_keys() -> None:
    settings = S3Settings(access_key="AKIAEXAMPLE", secret_key="very-secret")
    text = repr(settings)
    assert "AKIAEXAMPLE" not in text and "very-secret" not in text
    assert settings.secrets == ("AKIAEXAMPLE", "very-secret")
    assert S3Settings().secrets == ()
    assert (settings.key_prefix, settings.max_concurrency) == ("results", 4)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"endpoint_url": "ftp://x"}, "endpoint_url"),
        ({"endpoint_url": "http://host/path"}, "endpoint_url"),
        ({"access_key": "a"}, "access_key"),
        ({"secret_key": "s"}, "access_key"),
        ({"region": ""}, "region"),
        ({"region": "eu/1"}, "region"),
        ({"region": "eu\n"}, "region"),
        ({"default_bucket": "a/b"}, "default_bucket"),
        ({"default_bucket": ".."}, "default_bucket"),
        ({"key_prefix": "a/../b"}, "key_prefix"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"parts_in_flight": 1000}, "parts_in_flight"),
        ({"max_retries": -1}, "max_retries"),
        ({"chunk_size": 1024}, "chunk_size"),
        ({"part_size": MiB}, "part_size"),
        ({"read_timeout": 0}, "read_timeout"),
        ({"connect_timeout": "5"}, "connect_timeout"),
        ({"retry_timeout": 10**9}, "retry_timeout"),
    ],
)
def test_settings_name_the_bad_value(overrides: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        S3Settings(**overrides)


def test_settings_never_echo_a_key_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        S3Settings(secret_key="hunter2")
    assert "hunter2" not in str(info.value)


def test_store_kwargs_for_an_http_endpoint_pin_everything() -> None:
    settings = S3Settings(
        endpoint_url="http://127.0.0.1:9000/",
        access_key="ak",
        secret_key="sk",
        region="eu-west-1",
        read_timeout=2.5,
        max_retries=2,
    )
    kwargs = settings.store_kwargs("bucket")
    assert kwargs["bucket"] == "bucket"
    assert kwargs["endpoint"] == "http://127.0.0.1:9000"
    assert kwargs["region"] == "eu-west-1"
    assert kwargs["virtual_hosted_style_request"] is False
    assert kwargs["skip_signature"] is False and kwargs["s3_express"] is False
    assert kwargs["client_options"] == {
        "allow_http": True,
        "connect_timeout": "5000ms",
        "read_timeout": "2500ms",
        "timeout": "3600000ms",
    }
    assert kwargs["retry_config"]["max_retries"] == 2
    assert kwargs["retry_config"]["retry_timeout"] == timedelta(seconds=60)
    provider = kwargs["credential_provider"]
    assert provider() == {
        "access_key_id": "ak",
        "secret_access_key": "sk",
        "token": None,
        "expires_at": None,
    }
    assert "sk" not in repr(provider) and "ak" not in repr(provider)


def test_store_kwargs_for_aws_spell_out_the_endpoint_and_use_ambient_credentials() -> None:
    kwargs = S3Settings(region="eu-central-1").store_kwargs("b")
    assert kwargs["endpoint"] == "https://s3.eu-central-1.amazonaws.com"
    assert kwargs["client_options"]["allow_http"] is False
    assert "credential_provider" not in kwargs


# -- URIs and inputs ----------------------------------------------------------


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://bucket/a/b.txt") == ("bucket", "a/b.txt")
    assert parse_s3_uri("s3://bucket/") == ("bucket", "")
    assert parse_s3_uri("s3://bucket") == ("bucket", "")
    for bad in ("http://x/y", "s3:///key", "s3://bad bucket/k", "s3://../k"):
        with pytest.raises(TaskFailure) as info:
            parse_s3_uri(bad)
        assert info.value.code == INVALID_INPUT_ERROR
        assert repr(bad) in info.value.message


def test_find_inputs_everywhere_with_locations() -> None:
    params = {
        "image": "s3://b/photo.jpg",
        "list": ["plain", "s3://b/data/", {"deep": ("x", "s3://c/")}],
        "S3://b/upper": "S3://not/ours",
        "number": 5,
        "none": None,
    }
    refs = find_inputs(params)
    assert refs == [
        InputRef(location=("image",), uri="s3://b/photo.jpg", bucket="b", key="photo.jpg",
                 is_prefix=False),
        InputRef(location=("list", 1), uri="s3://b/data/", bucket="b", key="data/",
                 is_prefix=True),
        InputRef(location=("list", 2, "deep", 1), uri="s3://c/", bucket="c", key="",
                 is_prefix=True),
    ]  # fmt: skip
    assert find_inputs("s3://b/k") == [
        InputRef(location=(), uri="s3://b/k", bucket="b", key="k", is_prefix=False)
    ]


@pytest.mark.parametrize(
    ("uri", "says"),
    [
        ("s3://bucket", "names a bucket"),
        ("s3://b/a//b", "empty segment"),
        ("s3://b/a/../b", "'..' segment"),
        ("s3://b/./x/", "'.' segment"),
        ("s3://b/x\ny", "control character"),
        ("s3://b/data//", "empty segment"),
    ],
)
def test_find_inputs_refuses_unusable_uris(uri: str, says: str) -> None:
    with pytest.raises(TaskFailure) as info:
        find_inputs({"x": uri})
    assert info.value.code == INVALID_INPUT_ERROR
    assert says in info.value.message


def test_find_inputs_stops_at_absurd_nesting() -> None:
    deep: Any = "s3://b/k"
    for _ in range(MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(TaskFailure) as info:
        find_inputs(deep)
    assert info.value.code == INVALID_INPUT_ERROR
    cyclic: list[Any] = []
    cyclic.append(cyclic)
    with pytest.raises(TaskFailure):
        find_inputs(cyclic)


# -- local paths ----------------------------------------------------------------


def test_local_path_for_object() -> None:
    assert local_path_for_object(TASK, "b", "a/b.txt") == f"{TASK}/inputs/b/a/b.txt"
    assert local_path_for_object(TASK + "/", "b", "") == f"{TASK}/inputs/b"
    with pytest.raises(TaskFailure, match="invalid bucket"):
        local_path_for_object(TASK, "..", "k")
    with pytest.raises(ValueError, match="absolute"):
        local_path_for_object("relative/task", "b", "k")


@pytest.mark.parametrize(
    ("key", "says"),
    [
        ("/etc/passwd", "absolute"),
        ("a/\x00b", "NUL"),
        ("a\x7fb", "control character"),
        ("a\udcffb", "not UTF-8"),
        ("x" * 256, "longer than 255"),
        ("a/" * 600, "longer than 1024"),
        ("../../etc/passwd", "'..' segment"),
    ],
)
def test_local_path_for_object_names_the_key(key: str, says: str) -> None:
    with pytest.raises(TaskFailure) as info:
        local_path_for_object(TASK, "b", key)
    assert info.value.code == INVALID_INPUT_ERROR
    assert says in info.value.message
    assert repr(key)[:40] in info.value.message


KEY_ALPHABET = st.sampled_from(["a", "b", ".", "..", "/", "\x00", "\n", "\\", "é", " ", "~"])
keys = st.lists(KEY_ALPHABET, max_size=12).map("".join) | st.text(max_size=40)


@given(bucket=st.sampled_from(["b", "my.bucket", "x_y"]), key=keys)
def test_no_key_ever_maps_outside_the_task_folder(bucket: str, key: str) -> None:
    try:
        path = local_path_for_object(TASK, bucket, key)
    except TaskFailure as failure:
        assert failure.code == INVALID_INPUT_ERROR
        return
    assert inside(f"{TASK}/{INPUTS_DIRNAME}/{bucket}", path)
    if key:
        assert path == f"{TASK}/{INPUTS_DIRNAME}/{bucket}/{key}", "never silently rewritten"


def test_map_listed_keys_skips_markers_and_maps_the_rest() -> None:
    listed = [
        ("data", 0),  # the folder's own marker, as obstore lists 'data/'
        ("data/a.txt", 3),
        ("data/sub", 0),  # marker with content below it
        ("data/sub/b.txt", 5),
        ("data/sub/", 0),  # a marker as some servers list it
        ("data/empty", 0),  # nothing below: an empty file
    ]
    root = f"{TASK}/inputs/b/data"
    assert map_listed_keys("data/", listed, root) == [
        ("data/a.txt", f"{root}/a.txt"),
        ("data/empty", f"{root}/empty"),
        ("data/sub/b.txt", f"{root}/sub/b.txt"),
    ]
    assert map_listed_keys("", [("k", 1)], root) == [("k", f"{root}/k")]
    assert map_listed_keys("data/", [], root) == []


@pytest.mark.parametrize(
    ("listed", "says"),
    [
        ([("data", 4)], "both an object and the folder"),
        ([("other/x", 1)], "foreign key"),
        ([("data/x/", 3)], "empty segment"),
        ([("data/x", 1), ("data/x/y", 1)], "collide"),
        ([("data/../evil", 1)], "'..' segment"),
        ([("data/a\x01", 1)], "control character"),
    ],
)
def test_map_listed_keys_names_the_bad_key(listed: list[tuple[str, int]], says: str) -> None:
    with pytest.raises(TaskFailure) as info:
        map_listed_keys("data/", listed, f"{TASK}/in")
    assert info.value.code == INVALID_INPUT_ERROR
    assert says in info.value.message
    assert repr(listed[0][0]) in info.value.message


def test_map_listed_keys_refuses_a_bad_prefix_and_huge_listings() -> None:
    with pytest.raises(ValueError, match="end with '/'"):
        map_listed_keys("data", [], TASK)
    too_many = [(f"p/{i}", 1) for i in range(MAX_LISTED_OBJECTS + 1)]
    with pytest.raises(TaskFailure, match="more than"):
        map_listed_keys("p/", too_many, TASK)


@given(listed=st.lists(st.tuples(keys.map(lambda k: "p/" + k), st.integers(0, 3)), max_size=12))
def test_no_listed_key_ever_maps_outside_the_folder(listed: list[tuple[str, int]]) -> None:
    root = f"{TASK}/inputs/b/p"
    try:
        mapped = map_listed_keys("p/", listed, root)
    except TaskFailure as failure:
        assert failure.code == INVALID_INPUT_ERROR
        return
    paths = [path for _, path in mapped]
    assert len(set(paths)) == len(paths)
    for key, path in mapped:
        assert inside(root, path) and path != root
        assert path == f"{root}/{key[2:]}"
    for path in paths:  # no file is another file's folder
        assert not any(other.startswith(path + "/") for other in paths)


# -- substitute ---------------------------------------------------------------


def test_substitute_rebuilds_and_replaces() -> None:
    params = {"a": ["s3://x", ("s3://y", 1)], "b": {"c": "s3://z"}, "n": 1}
    before = copy.deepcopy(params)
    result = substitute(params, {("a", 0): "/p/x", ("a", 1, 0): "/p/y", ("b", "c"): "/p/z"})
    assert result == {"a": ["/p/x", ("/p/y", 1)], "b": {"c": "/p/z"}, "n": 1}
    assert params == before
    assert substitute("s3://k", {(): "/p/k"}) == "/p/k"
    assert substitute(params, {}) == params and substitute(params, {}) is not params
    with pytest.raises(KeyError, match="not found"):
        substitute(params, {("missing",): "x"})


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=5),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=3), children, max_size=4)
    ),
    max_leaves=20,
)


def _leaf_locations(value: Any, location: Location = ()) -> list[Location]:
    if isinstance(value, dict):
        return [loc for k, v in value.items() for loc in _leaf_locations(v, (*location, k))]
    if isinstance(value, list):
        return [loc for i, v in enumerate(value) for loc in _leaf_locations(v, (*location, i))]
    return [location]


@given(value=json_values, data=st.data())
def test_substitute_never_mutates(value: Any, data: st.DataObject) -> None:
    before = copy.deepcopy(value)
    locations = _leaf_locations(value)
    chosen: list[Location] = []
    if locations:
        chosen = data.draw(st.lists(st.sampled_from(locations), unique=True, max_size=4))
    result = substitute(value, {loc: f"/new/{i}" for i, loc in enumerate(chosen)})
    assert value == before
    for i, loc in enumerate(chosen):
        node = result
        for step in loc:
            node = node[step]
        assert node == f"/new/{i}"


# -- download plan --------------------------------------------------------------


def test_plan_downloads_dedupes_and_creates_folders_parents_first() -> None:
    refs = find_inputs(
        {"one": "s3://b/data/x.txt", "dir": "s3://b/data/", "again": "s3://b/data/x.txt"}
    )
    plan = plan_downloads(refs, TASK, {("b", "data/"): [("data/x.txt", 2), ("data/y/z", 0)]})
    base = f"{TASK}/inputs/b/data"
    assert plan.items == (
        DownloadItem(bucket="b", key="data/x.txt", local_path=f"{base}/x.txt", size=2),
        DownloadItem(bucket="b", key="data/y/z", local_path=f"{base}/y/z", size=0),
    )
    assert plan.folders == (f"{TASK}/inputs", f"{TASK}/inputs/b", base, f"{base}/y")
    assert plan.replacements == {
        ("one",): f"{base}/x.txt",
        ("dir",): base,
        ("again",): f"{base}/x.txt",
    }


def test_plan_downloads_single_objects_have_unknown_size() -> None:
    plan = plan_downloads(find_inputs(["s3://b/k", "s3://c/"]), TASK, {("c", ""): []})
    assert plan.items == (
        DownloadItem(bucket="b", key="k", local_path=f"{TASK}/inputs/b/k", size=None),
    )
    assert plan.replacements == {(0,): f"{TASK}/inputs/b/k", (1,): f"{TASK}/inputs/c"}
    assert f"{TASK}/inputs/c" in plan.folders


def test_plan_downloads_file_and_folder_collision() -> None:
    refs = find_inputs(["s3://b/data", "s3://b/data/"])
    with pytest.raises(TaskFailure) as info:
        plan_downloads(refs, TASK, {("b", "data/"): [("data/x", 1)]})
    assert info.value.code == INVALID_INPUT_ERROR
    assert "'data'" in info.value.message


def test_plan_downloads_empty_prefix_policy() -> None:
    refs = find_inputs(["s3://b/none/"])
    plan = plan_downloads(refs, TASK, {("b", "none/"): [("none", 0)]})
    assert plan.items == () and f"{TASK}/inputs/b/none" in plan.folders
    with pytest.raises(TaskFailure, match="matched no objects") as info:
        plan_downloads(refs, TASK, {("b", "none/"): []}, empty_prefix_is_error=True)
    assert info.value.code == INVALID_INPUT_ERROR


def test_unconfigured_failure_lists_a_few_uris() -> None:
    few = unconfigured_failure(find_inputs(["s3://b/1"]))
    many = unconfigured_failure(find_inputs([f"s3://b/{i}" for i in range(5)]))
    assert few.code == PERMANENT_ERROR and "s3://b/1" in few.message and "…" not in few.message
    assert "s3://b/2" in many.message and "s3://b/3" not in many.message and "…" in many.message


def test_chunk_budget_and_part_size() -> None:
    assert chunk_budget(10 * MiB, 4 * MiB) == 4
    assert chunk_budget(None, MiB) == 1 << 40
    assert part_size_for(1, 8 * MiB) == 8 * MiB
    assert part_size_for(200 * 1024 * MiB, 8 * MiB) == 21 * MiB
    assert part_size_for(1, MiB) == 5 * MiB


# -- outputs ----------------------------------------------------------------------


class FakeDisk:
    """A dict-backed filesystem: paths, symlinks, kinds and sizes."""

    def __init__(
        self,
        files: dict[str, int],
        dirs: Sequence[str] = (),
        links: dict[str, str] | None = None,
        others: Sequence[str] = (),
    ) -> None:
        self.files = files
        self.dirs = set(dirs)
        self.links = links or {}
        self.others = set(others)

    def resolve(self, path: str) -> str | None:
        path = posixpath.normpath(path)
        for _ in range(10):
            for link, target in self.links.items():
                if path == link or path.startswith(link + "/"):
                    path = target + path[len(link) :]
                    break
            else:
                break
        exists = path in self.files or path in self.dirs or path in self.others
        return path if exists else None

    def stat(self, path: str) -> tuple[FileKind, int]:
        if path in self.files:
            return "file", self.files[path]
        if path in self.dirs:
            return "dir", 0
        if path in self.others:
            return "other", 0
        return "missing", 0

    def walk(self, folder: str, limit: int) -> Sequence[str]:
        below = [
            p[len(folder) + 1 :]
            for p in sorted({*self.files, *self.others, *self.links})
            if p.startswith(folder + "/")
        ]
        return below[:limit]


def test_find_outputs_by_resolved_path_never_by_string_prefix() -> None:
    disk = FakeDisk(
        files={f"{TASK}/out.txt": 3, f"{TASK}0/evil": 1, "/etc/passwd": 9, f"{TASK}/real": 1},
        dirs=[TASK],
        links={f"{TASK}/link": "/etc/passwd", "/tmp/into": f"{TASK}/real"},
    )
    data = {
        "a": f"{TASK}/out.txt",
        "b": f"{TASK}0/evil",  # a string prefix match, but another folder
        "c": f"{TASK}/link",  # inside by name, outside once resolved
        "d": "/tmp/into",  # outside by name, inside once resolved
        "e": f"{TASK}/missing",
        "f": "relative/out.txt",
        "g": TASK,  # the task folder itself is not an output
        "h": "/bad\x00path",
        "i": "/" + "x" * 5000,
        "j": ["s3://b/k", 3],
    }
    assert find_outputs(data, TASK, disk.resolve) == [
        OutputRef(location=("a",), path=f"{TASK}/out.txt", resolved=f"{TASK}/out.txt",
                  relative="out.txt"),
        OutputRef(location=("d",), path="/tmp/into", resolved=f"{TASK}/real", relative="real"),
    ]  # fmt: skip
    assert find_outputs(data, "/no/such/task", disk.resolve) == []


def test_plan_uploads_files_and_folders() -> None:
    disk = FakeDisk(
        files={f"{TASK}/out.txt": 3, f"{TASK}/frames/1.png": 10, f"{TASK}/frames/d/2.png": 20},
        dirs=[TASK, f"{TASK}/frames", f"{TASK}/frames/d"],
        links={f"{TASK}/frames/alias.png": f"{TASK}/out.txt"},
    )
    data = {
        "file": f"{TASK}/out.txt",
        "folder": f"{TASK}/frames",
        "again": f"{TASK}/frames/1.png",
        "note": "text",
    }
    plan = plan_uploads(
        data, TASK, disk, bucket="res", key_prefix="/results/", job_id="j1", task_id="t1"
    )
    base = "results/j1/t1"
    assert plan.items == (
        UploadItem(source=f"{TASK}/frames/1.png", bucket="res", key=f"{base}/frames/1.png",
                   size=10),
        UploadItem(source=f"{TASK}/out.txt", bucket="res", key=f"{base}/frames/alias.png",
                   size=3),
        UploadItem(source=f"{TASK}/frames/d/2.png", bucket="res", key=f"{base}/frames/d/2.png",
                   size=20),
        UploadItem(source=f"{TASK}/out.txt", bucket="res", key=f"{base}/out.txt", size=3),
    )  # fmt: skip
    assert plan.replacements == {
        ("file",): f"s3://res/{base}/out.txt",
        ("folder",): f"s3://res/{base}/frames/",
        ("again",): f"s3://res/{base}/frames/1.png",
    }
    empty = plan_uploads({"x": "y"}, TASK, disk, bucket="r", key_prefix="", job_id="j", task_id="t")
    assert empty.items == () and empty.replacements == {}


@pytest.mark.parametrize(
    ("disk", "says"),
    [
        (FakeDisk({}, dirs=[TASK], others=[f"{TASK}/out"]), "not a regular file or folder"),
        (
            FakeDisk({"/etc/passwd": 1}, dirs=[TASK, f"{TASK}/out"],
                     links={f"{TASK}/out/leak": "/etc/passwd"}),
            "outside the task folder",
        ),
        (
            FakeDisk({}, dirs=[TASK, f"{TASK}/out"], links={f"{TASK}/out/dead": "/gone"}),
            "broken link",
        ),
        (FakeDisk({}, dirs=[TASK, f"{TASK}/out"], others=[f"{TASK}/out/fifo"]), "not a regular"),
        (
            FakeDisk({f"{TASK}/out/{i}": 1 for i in range(4)}, dirs=[TASK, f"{TASK}/out"]),
            "more than 3 files",
        ),
    ],
)  # fmt: skip
def test_plan_uploads_refuses_what_it_cannot_upload_safely(disk: FakeDisk, says: str) -> None:
    with pytest.raises(TaskFailure) as info:
        plan_uploads(
            {"out": f"{TASK}/out"},
            TASK,
            disk,
            bucket="b",
            key_prefix="r",
            job_id="j",
            task_id="t",
            max_files=3,
        )
    assert info.value.code == PERMANENT_ERROR
    assert says in info.value.message


def test_upload_key() -> None:
    assert upload_key("results", "job", "task", "a/b.png") == "results/job/task/a/b.png"
    assert upload_key("", "job", "task", "x") == "job/task/x"
    assert upload_key("/a/b/", "j", "t", "x") == "a/b/j/t/x"


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("a/../b", "j", "t", "x"), PERMANENT_ERROR, "prefix"),
        (("r", "..", "t", "x"), INVALID_INPUT_ERROR, "job_id"),
        (("r", "j/k", "t", "x"), INVALID_INPUT_ERROR, "job_id"),
        (("r", "j", "", "x"), INVALID_INPUT_ERROR, "task_id"),
        (("r", "j", "a\\b", "x"), INVALID_INPUT_ERROR, "task_id"),
        (("r", "j", "t\n", "x"), INVALID_INPUT_ERROR, "task_id"),
        (("r", "j", "\udc80", "x"), INVALID_INPUT_ERROR, "task_id"),
        (("r", "j", "t", "a//b"), PERMANENT_ERROR, "result path"),
        (("r" * 250 + "/" + "r" * 250, "j" * 250, "t" * 250, "x" * 250), PERMANENT_ERROR,
         "exceed 1024"),
    ],
)  # fmt: skip
def test_upload_key_refuses_ids_that_could_steer_it(
    args: tuple[str, str, str, str], code: str, says: str
) -> None:
    with pytest.raises(TaskFailure) as info:
        upload_key(*args)
    assert info.value.code == code
    assert says in info.value.message


ids = st.text(max_size=12) | st.sampled_from(["..", ".", "a/b", "../x", "x/..", "", "ok"])


@given(job_id=ids, task_id=ids, relative=keys)
def test_result_keys_stay_in_their_task_namespace(job_id: str, task_id: str, relative: str) -> None:
    try:
        key = upload_key("results", job_id, task_id, relative)
    except TaskFailure as failure:
        assert failure.code in (INVALID_INPUT_ERROR, PERMANENT_ERROR)
        return
    assert key == f"results/{job_id}/{task_id}/{relative}"
    segments = key.split("/")
    assert segments[:3] == ["results", job_id, task_id]
    assert all(s not in ("", ".", "..") for s in segments)


@given(names=st.lists(keys, max_size=6))
def test_no_returned_name_escapes_once_resolved(names: list[str]) -> None:
    files = {}
    for name in names:
        path = posixpath.normpath(posixpath.join(TASK, name)) if name else TASK
        assume("\x00" not in path)
        files[path] = 1
    disk = FakeDisk(files, dirs=[TASK])
    outputs = find_outputs({"n": list(files)}, TASK, disk.resolve)
    for ref in outputs:
        assert inside(TASK, ref.resolved) and ref.resolved != TASK
        assert posixpath.join(TASK, ref.relative) == ref.resolved


# -- errors ---------------------------------------------------------------------


def _error(name: str, message: str, base: type[BaseException] = Exception) -> BaseException:
    """An exception whose class is called ``name`` (as obstore's would be)."""
    cls: type[BaseException] = type(name, (base,), {})
    return cls(message)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (_error("InvalidPathError", "x"), "invalid_key"),
        (_error("PermissionDeniedError", "x"), "denied"),
        (_error("UnauthenticatedError", "x"), "denied"),
        (PermissionError("local"), "denied"),
        (FileNotFoundError("gone"), "not_found"),
        (_error("NotFoundError", "x"), "not_found"),
        (TimeoutError(), "network"),
        (ConnectionResetError(), "network"),
        (_error("GenericError", "Server returned non-2xx status code: 404 Not Found"), "not_found"),
        (_error("GenericError", "status code: 403 Forbidden"), "denied"),
        (_error("GenericError", "status code: 401"), "denied"),
        (_error("GenericError", "status code: 503 Slow Down"), "network"),
        (_error("GenericError", "status code: 429"), "network"),
        (_error("GenericError", "status code: 400 Bad Request"), "other"),
        (_error("GenericError", "HTTP error: error sending request"), "network"),
        (_error("GenericError", "operation timed out"), "network"),
        (_error("GenericError", "Invalid Zone suffix"), "other"),
        (ValueError("Could not parse path"), "invalid_key"),
        (OSError(28, "No space left on device"), "other"),
        (RuntimeError("?"), "other"),
    ],
)
def test_transfer_error_kind(exc: BaseException, kind: str) -> None:
    assert transfer_error_kind(exc) == kind


@pytest.mark.parametrize(
    ("operation", "kind", "code"),
    [
        ("download", "not_found", INVALID_INPUT_ERROR),
        ("download", "denied", PERMANENT_ERROR),
        ("download", "network", TRANSIENT_ERROR),
        ("download", "invalid_key", INVALID_INPUT_ERROR),
        ("download", "other", TRANSIENT_ERROR),
        ("download", "something new", TRANSIENT_ERROR),
        ("upload", "not_found", PERMANENT_ERROR),
        ("upload", "denied", PERMANENT_ERROR),
        ("upload", "network", TRANSIENT_ERROR),
        ("upload", "invalid_key", PERMANENT_ERROR),
        ("upload", "other", TRANSIENT_ERROR),
    ],
)
def test_classify_transfer_error_codes(operation: Any, kind: str, code: str) -> None:
    failure = classify_transfer_error(kind, "detail", operation=operation, target="s3://b/k")
    assert failure.code == code
    assert failure.message.startswith(f"S3 {operation} of s3://b/k: ")
    assert failure.message.endswith(": detail")


def test_classify_transfer_error_redacts_and_trims() -> None:
    detail = (
        "GET http://h/b/k failed for AKIAXYZ with hunter2: "
        "X-Amz-Signature=abcdef0123 Authorization: AWS4-HMAC-SHA256\n\n"
        "Debug source:\nGeneric { secret: hunter2 }"
    )
    failure = classify_transfer_error("denied", detail, secrets=("AKIAXYZ", "hunter2", ""))
    assert "AKIAXYZ" not in failure.message and "hunter2" not in failure.message
    assert "abcdef0123" not in failure.message and "AWS4-HMAC" not in failure.message
    assert "Debug source" not in failure.message and "\n" not in failure.message
    assert failure.message.startswith("S3 download: access denied")
    long = classify_transfer_error("other", "x" * 5000)
    assert len(long.message) < 500 and long.message.endswith("…")
    assert classify_transfer_error("other", "  ").message == "S3 download: failed"


def test_failure_from_exception_names_the_invalid_key() -> None:
    exc = _error(
        "InvalidPathError",
        'Encountered object with invalid path: Error parsing Path "data/../evil": ..',
    )
    failure = failure_from_exception(exc, operation="download", target="s3://b/data/")
    assert failure.code == INVALID_INPUT_ERROR
    assert "'data/../evil'" in failure.message
    plain = failure_from_exception(ValueError("bad"), operation="upload", target="s3://b/k")
    assert plain.code == PERMANENT_ERROR and plain.message.endswith(": bad")
    quiet = failure_from_exception(TimeoutError(), operation="download", target="s3://b/k")
    assert quiet.code == TRANSIENT_ERROR and quiet.message.endswith("TimeoutError")


def test_first_failure_prefers_a_task_failure() -> None:
    failure = TaskFailure(INVALID_INPUT_ERROR, "bad")
    nested = BaseExceptionGroup("outer", [RuntimeError("x"), ExceptionGroup("in", [failure])])
    assert first_failure(nested) is failure
    plain = RuntimeError("first")
    assert first_failure(ExceptionGroup("g", [plain, KeyError("k")])) is plain
