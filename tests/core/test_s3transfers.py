"""The S3 transfer flow shared by the adapters, driven against an in-memory store."""

from __future__ import annotations

import asyncio
import pathlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from rca_core import INVALID_INPUT_ERROR, PERMANENT_ERROR, TRANSIENT_ERROR, TaskFailure
from rca_core._s3plan import DownloadItem, S3Settings, UploadItem
from rca_core._s3transfers import S3TransfersBase

T = TypeVar("T")

SETTINGS = S3Settings(endpoint_url="http://127.0.0.1:9", access_key="AK", secret_key="SK-secret", default_bucket="out")


class MemoryTransfers(S3TransfersBase):
    """Objects live in a dict; blocking calls run inline: the flow is what is tested."""

    def __init__(self, settings: S3Settings | None, objects: dict[tuple[str, str], bytes] | None = None) -> None:
        super().__init__(settings)
        self.objects = dict(objects or {})
        self.uploaded: dict[tuple[str, str], bytes] = {}
        self.listed: list[tuple[str, str]] = []

    async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
        return func(*args)

    async def _each(self, items: Sequence[T], run: Callable[[T], Awaitable[None]]) -> None:
        for item in items:
            await run(item)

    async def _list(self, bucket: str, prefix: str, uri: str) -> list[tuple[str, int]]:
        self.listed.append((bucket, prefix))
        return [(key, len(data)) for (b, key), data in sorted(self.objects.items()) if b == bucket and key.startswith(prefix)]

    async def _download(self, item: DownloadItem) -> None:
        pathlib.Path(item.local_path).write_bytes(self.objects[(item.bucket, item.key)])

    async def _upload(self, item: UploadItem) -> None:
        self.uploaded[(item.bucket, item.key)] = pathlib.Path(item.source).read_bytes()


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def test_inputs_are_fetched_and_replaced(tmp_path: pathlib.Path) -> None:
    transfers = MemoryTransfers(SETTINGS, {("in", "a/x.txt"): b"x", ("in", "d/1.txt"): b"1", ("in", "d/s/2.txt"): b"2"})
    params = {"one": "s3://in/a/x.txt", "folder": ["s3://in/d/", "s3://in/d/"], "plain": "text"}
    out = run(transfers.download_inputs(params, tmp_path))
    assert params["one"] == "s3://in/a/x.txt"  # never mutated
    assert pathlib.Path(out["one"]).read_bytes() == b"x"
    folder = pathlib.Path(out["folder"][0])
    assert (folder / "1.txt").read_bytes() == b"1" and (folder / "s" / "2.txt").read_bytes() == b"2"
    assert out["plain"] == "text"
    assert transfers.listed == [("in", "d/")]  # one listing per distinct prefix
    assert run(transfers.download_inputs({"no": "uris"}, tmp_path)) == {"no": "uris"}
    assert transfers.enabled


def test_a_disk_failure_is_a_transient_task_failure(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    transfers = MemoryTransfers(SETTINGS, {("in", "d/1.txt"): b"1"})
    with pytest.raises(TaskFailure) as info:
        run(transfers.download_inputs({"f": "s3://in/d/"}, blocker))
    assert info.value.code == TRANSIENT_ERROR and "local disk" in info.value.message


def test_outputs_are_uploaded_under_the_job_and_task(tmp_path: pathlib.Path) -> None:
    (tmp_path / "report.txt").write_text("r")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "a.txt").write_text("a")
    transfers = MemoryTransfers(SETTINGS)
    data = {"report": str(tmp_path / "report.txt"), "dir": str(tmp_path / "dir"), "n": 1}
    out = run(transfers.upload_outputs(data, tmp_path, job_id="j1", task_id="t1"))
    assert out["report"] == "s3://out/results/j1/t1/report.txt"
    assert out["dir"] == "s3://out/results/j1/t1/dir/"
    assert out["n"] == 1
    assert transfers.uploaded == {("out", "results/j1/t1/report.txt"): b"r", ("out", "results/j1/t1/dir/a.txt"): b"a"}
    nothing = {"path": "/etc/passwd"}
    assert run(transfers.upload_outputs(nothing, tmp_path, job_id="j1", task_id="t1")) is nothing


def test_an_unreadable_folder_fails_the_upload(tmp_path: pathlib.Path) -> None:
    class Broken(MemoryTransfers):
        async def _in_thread(self, func: Callable[..., T], *args: Any) -> T:
            raise PermissionError(13, "Permission denied", str(tmp_path))

    with pytest.raises(TaskFailure) as info:
        run(Broken(SETTINGS).upload_outputs({"p": str(tmp_path)}, tmp_path, job_id="j", task_id="t"))
    assert "SK-secret" not in info.value.message


def test_without_s3_inputs_fail_clearly_and_outputs_pass_through(tmp_path: pathlib.Path) -> None:
    transfers = MemoryTransfers.disabled()
    assert not transfers.enabled
    with pytest.raises(TaskFailure) as info:
        run(transfers.download_inputs({"i": "s3://in/k"}, tmp_path))
    assert info.value.code == PERMANENT_ERROR and "S3" in info.value.message
    data = {"p": str(tmp_path)}
    assert run(transfers.upload_outputs(data, tmp_path, job_id="j", task_id="t")) is data
    failure = transfers._failure(FileNotFoundError("gone"), "download", "s3://in/k")
    assert failure.code == INVALID_INPUT_ERROR


def test_closed_transfers_refuse_new_work(tmp_path: pathlib.Path) -> None:
    transfers = MemoryTransfers(SETTINGS)
    transfers._closed = True
    with pytest.raises(TaskFailure) as info:
        run(transfers.download_inputs({"i": "s3://in/k"}, tmp_path))
    assert info.value.code == TRANSIENT_ERROR and "closed" in info.value.message


@pytest.mark.parametrize("method", ["_in_thread", "_each", "_list", "_download", "_upload"])
def test_the_base_class_needs_an_adapter(method: str) -> None:
    base = S3TransfersBase(SETTINGS)
    args: dict[str, tuple[Any, ...]] = {
        "_in_thread": (print,), "_each": ((), print), "_list": ("b", "p", "u"), "_download": (None,), "_upload": (None,),
    }
    with pytest.raises(NotImplementedError):
        run(getattr(base, method)(*args[method]))
