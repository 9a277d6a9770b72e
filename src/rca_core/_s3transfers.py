"""The S3 transfer flow, written once for both adapters.

What to fetch, where it lands, what to upload and under which key is the pure
plan (``_s3plan``); this class strings the plan's steps together. What differs
between adapters is only how a step runs: how a blocking call reaches a thread,
how transfers are bounded, how one object is listed, fetched or stored (each
adapter's ``S3Transfers`` implements those). No event loop library and no
obstore import here.
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from ._errors import TRANSIENT_ERROR, TaskFailure
from ._localdisk import DiskError, LocalDisk, make_folders
from ._s3plan import (
    DownloadItem,
    InputRef,
    S3Settings,
    TransferOperation,
    UploadItem,
    failure_from_exception,
    find_inputs,
    plan_downloads,
    plan_uploads,
    substitute,
    unconfigured_failure,
)

__all__ = ["S3TransfersBase"]

_T = TypeVar("_T")


class S3TransfersBase:
    """Download a task's ``s3://`` inputs and upload its returned files.

    One instance per worker (its bounds are the worker's transfer budget).
    Without settings (:meth:`disabled`) an ``s3://`` input fails the task with
    ``PERMANENT_ERROR`` instead of reaching the handler as a string, and
    returned paths are left as they are.
    """

    def __init__(self, settings: S3Settings | None) -> None:
        self._settings = settings
        self._closed = False

    # -- what adapters implement -----------------------------------------------------

    async def _in_thread(self, func: Callable[..., _T], *args: Any) -> _T:
        raise NotImplementedError

    async def _each(self, items: Sequence[_T], run: Callable[[_T], Awaitable[None]]) -> None:
        raise NotImplementedError

    async def _list(self, bucket: str, prefix: str, uri: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    async def _download(self, item: DownloadItem) -> None:
        raise NotImplementedError

    async def _upload(self, item: UploadItem) -> None:
        raise NotImplementedError

    # -- the flow ------------------------------------------------------------------------

    @classmethod
    def disabled(cls) -> Any:
        """Transfers for a worker without S3: inputs fail clearly, outputs pass."""
        return cls(None)

    @property
    def enabled(self) -> bool:
        return self._settings is not None

    async def download_inputs(self, params: Any, task_dir: pathlib.Path) -> Any:
        """Fetch every ``s3://`` value in ``params`` below ``task_dir``.

        Returns a new params structure in which each URI is replaced by the
        local file (or folder, for a prefix); ``params`` itself is untouched.
        Raises ``TaskFailure`` with the orchestrator's error code.
        """
        refs = find_inputs(params)
        if not refs:
            return params
        settings = self._require(refs)
        listings: dict[tuple[str, str], Sequence[tuple[str, int]]] = {}
        for ref in refs:
            if ref.is_prefix and (ref.bucket, ref.key) not in listings:
                listings[(ref.bucket, ref.key)] = await self._list(ref.bucket, ref.key, ref.uri)
        # In a thread: a listing of 100,000 keys is real CPU work.
        plan = await self._in_thread(
            functools.partial(
                plan_downloads,
                refs,
                str(task_dir),
                listings,
                empty_prefix_is_error=settings.empty_prefix_is_error,
            )
        )
        try:
            await self._in_thread(make_folders, plan.folders)
        except DiskError as exc:
            raise self._failure(exc, "download", str(task_dir)) from None
        await self._each(plan.items, self._download)
        return substitute(params, plan.replacements)

    async def upload_outputs(
        self, data: Any, task_dir: pathlib.Path, *, job_id: str, task_id: str
    ) -> Any:
        """Upload every file or folder path in ``data`` that lies in ``task_dir``.

        Returns a new structure with each path replaced by ``s3://bucket/key``
        (a folder by ``s3://bucket/prefix/``). Without S3, ``data`` is
        returned unchanged.
        """
        if self._settings is None:
            return data
        settings = self._require(())
        try:
            plan = await self._in_thread(
                functools.partial(
                    plan_uploads,
                    data,
                    str(task_dir),
                    LocalDisk(),
                    bucket=settings.default_bucket,
                    key_prefix=settings.key_prefix,
                    job_id=job_id,
                    task_id=task_id,
                )
            )
        except OSError as exc:
            raise self._failure(exc, "upload", str(task_dir)) from None
        if not plan.replacements:
            return data
        await self._each(plan.items, self._upload)
        return substitute(data, plan.replacements)

    def _require(self, refs: Sequence[InputRef]) -> S3Settings:
        if self._settings is None:
            raise unconfigured_failure(refs)
        if self._closed:
            raise TaskFailure(TRANSIENT_ERROR, "S3 transfers are closed (worker shutting down)")
        return self._settings

    def _failure(
        self, exc: BaseException, operation: TransferOperation, target: str
    ) -> TaskFailure:
        secrets = self._settings.secrets if self._settings is not None else ()
        return failure_from_exception(exc, operation=operation, target=target, secrets=secrets)
