"""S3 payload offloading, decided without doing any I/O.

The worker downloads every ``s3://`` string in a task's ``params`` before the
handler runs, and uploads every local file or folder the handler returns in
``data``. Everything that can go wrong in that business is decided here, where
it is cheap to test exhaustively: which strings are inputs, where an object
lands on disk (and why it can never land outside the task folder), which
listed objects are folder markers or collide, which returned paths are
outputs (by *resolved* path, so a symlink cannot smuggle ``/etc/passwd`` out),
which key a result gets, how a storage error becomes a ``TaskFailure`` with
the orchestrator's error code, and how the obstore ``S3Store`` is configured.

The adapters (``rca_aiohttp._s3``, ``rca_httpx._s3``) only move bytes: they
list prefixes, stream objects into temporary files, call ``put`` and answer
the few questions about the local disk that this module asks through
:class:`LocalDisk`. Keeping the decisions here means both adapters behave
identically and neither duplicates a rule.

Layout decisions (documented for handler authors):

* An input ``s3://bucket/a/b.txt`` lands at ``<task_dir>/inputs/bucket/a/b.txt``;
  a prefix ``s3://bucket/data/`` becomes the folder
  ``<task_dir>/inputs/bucket/data`` holding the objects below it. Keeping the
  bucket and the full key makes two inputs with the same file name distinct,
  and the ``inputs`` folder keeps them apart from the handler's own files.
* A prefix that lists **no objects** becomes an **empty folder**, not an
  error, unless :attr:`S3Settings.empty_prefix_is_error` is set. S3 has no
  folders: an empty result folder uploaded by this SDK is stored as nothing at
  all, so refusing an empty prefix would make the SDK reject URIs it produced
  itself. Set the flag to catch mistyped prefixes instead.
* Zero-size objects that have other objects below them (``data/sub`` next to
  ``data/sub/x``) are folder markers and are skipped, as is a marker for the
  listed folder itself. A zero-size object with nothing below it becomes an
  empty file: once the trailing ``/`` is stripped by obstore, an empty-folder
  marker cannot be told from an empty file, and an empty file is the reading
  that loses nothing. Zero-size objects are created without a request.
* Results are stored under ``<key_prefix>/<job_id>/<task_id>/<path relative to
  the task folder>``: unique per task, stable across retries of the same task.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal, Protocol, cast

from ._errors import (
    INVALID_INPUT_ERROR,
    PERMANENT_ERROR,
    TRANSIENT_ERROR,
    ConfigError,
    TaskFailure,
)

__all__ = [
    "INPUTS_DIRNAME",
    "MAX_DEPTH",
    "MAX_FOLDER_FILES",
    "MAX_LISTED_OBJECTS",
    "DownloadItem",
    "DownloadPlan",
    "FileKind",
    "InputRef",
    "LocalDisk",
    "Location",
    "OutputRef",
    "S3Settings",
    "TransferKind",
    "TransferOperation",
    "UploadItem",
    "UploadPlan",
    "chunk_budget",
    "classify_transfer_error",
    "failure_from_exception",
    "find_inputs",
    "find_outputs",
    "first_failure",
    "local_path_for_object",
    "map_listed_keys",
    "parse_s3_uri",
    "part_size_for",
    "plan_downloads",
    "plan_uploads",
    "substitute",
    "transfer_error_kind",
    "unconfigured_failure",
    "upload_key",
]

Location = tuple[str | int, ...]
"""Where a value sits in a nested structure: dict keys and list indices."""

TransferKind = Literal["not_found", "denied", "network", "invalid_key", "other"]
TransferOperation = Literal["download", "upload"]
FileKind = Literal["file", "dir", "other", "missing"]

INPUTS_DIRNAME = "inputs"
"""Downloads go below ``<task_dir>/inputs/<bucket>/``."""

MAX_DEPTH = 64
"""Deepest nesting of params/data that is searched (also stops on cycles)."""

MAX_LISTED_OBJECTS = 100_000
"""More objects than this under one input prefix is refused, not downloaded."""

MAX_FOLDER_FILES = 100_000
"""More files than this in one returned folder is refused, not uploaded."""

_S3_SCHEME = "s3://"
_MAX_SEGMENT_BYTES = 255  # NAME_MAX on Linux and macOS
_MAX_KEY_BYTES = 1024  # S3's limit on a key
_MAX_PATH_CHARS = 4096  # PATH_MAX: longer strings are not paths we could resolve
_MIN_PART = 5 * 1024 * 1024  # S3's smallest multipart part
_MAX_PARTS = 10_000  # S3's largest multipart part count
_DETAIL_CHARS = 400
_BUCKET_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_STATUS_RE = re.compile(r"status code: (\d{3})")
_BAD_PATH_RE = re.compile(r'Path "((?:[^"\\]|\\.)*)"')
_NETWORK_RE = re.compile(
    r"error sending request|timed ?out|connect|connection|dns|broken pipe|reset by peer",
    re.IGNORECASE,
)
_SECRET_RE = re.compile(
    r"(?i)\b(signature|x-amz-security-token|authorization|x-amz-credential)([=:]\s*)\S+"
)


# --------------------------------------------------------------------------
# Settings and the obstore store recipe


def _duration(seconds: float) -> str:
    """obstore (humantime) duration string; milliseconds keep fractions exact."""
    return f"{round(seconds * 1000)}ms"


@dataclass(frozen=True, slots=True, repr=False)
class _StaticCredentials:
    """obstore credential provider that pins the configured key pair.

    Passing a provider (instead of ``access_key_id``/``secret_access_key``)
    is what stops ``AWS_SESSION_TOKEN`` or ``AWS_ACCESS_KEY_ID`` in the
    environment from being mixed into the signature: a stray session token
    makes every request fail with 403. obstore calls it once and caches the
    result because ``expires_at`` is ``None``.
    """

    access_key: str
    secret_key: str

    def __call__(self) -> dict[str, Any]:
        return {
            "access_key_id": self.access_key,
            "secret_access_key": self.secret_key,
            "token": None,
            "expires_at": None,
        }

    def __repr__(self) -> str:
        return "_StaticCredentials(<redacted>)"


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Settings:
    """Everything the S3 transfers need, validated once at startup.

    ``endpoint_url`` ``None`` means AWS itself (``https://s3.<region>.amazonaws.com``,
    spelled out so an ``AWS_ENDPOINT`` variable cannot redirect the worker).
    With both keys ``None`` obstore's own credential chain (instance role,
    ``AWS_*`` variables) is used; with both set they are the only credentials.
    The keys never appear in ``repr`` or in error messages.

    Transfer tuning (measured on SeaweedFS, see the adapters): ``chunk_size``
    is the download stream chunk and disk write unit (2 MiB was the fastest
    of 1/2/4 MiB on every adapter; peak memory per download is a few chunks,
    never the object); ``part_size`` and ``parts_in_flight`` bound one
    upload's memory at about ``(parts_in_flight + 1) * part_size``;
    ``max_concurrency`` objects or files move at once across the whole
    worker, so the worst case is roughly ``max_concurrency`` times either.
    ``empty_prefix_is_error`` turns a prefix that lists no objects into
    ``INVALID_INPUT_ERROR`` instead of an empty folder (see the module notes).
    """

    endpoint_url: str | None = None
    access_key: str | None = field(default=None, repr=False)
    secret_key: str | None = field(default=None, repr=False)
    region: str = "us-east-1"
    default_bucket: str = "avtomatika-payloads"
    key_prefix: str = "results"
    max_concurrency: int = 4
    chunk_size: int = 2 * 1024 * 1024
    part_size: int = 8 * 1024 * 1024
    parts_in_flight: int = 4
    max_retries: int = 3
    connect_timeout: float = 5.0
    read_timeout: float = 60.0
    request_timeout: float = 3600.0
    retry_timeout: float = 60.0
    empty_prefix_is_error: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, value: object, expected: str) -> ConfigError:
            return ConfigError(f"S3Settings.{name}={value!r}: expected {expected}")

        if self.endpoint_url is not None and not re.fullmatch(
            r"https?://[^/\s?#]+/?", self.endpoint_url
        ):
            raise bad("endpoint_url", self.endpoint_url, "http(s)://host[:port] or None for AWS")
        if (self.access_key is None) != (self.secret_key is None):
            # The values themselves are never echoed.
            raise ConfigError(
                "S3Settings.access_key/secret_key: set both or neither "
                "(neither uses the ambient AWS credential chain)"
            )
        if not self.region or _CONTROL_RE.search(self.region) or "/" in self.region:
            raise bad("region", self.region, "a region name such as 'us-east-1'")
        if not _BUCKET_RE.fullmatch(self.default_bucket) or self.default_bucket in (".", ".."):
            raise bad("default_bucket", self.default_bucket, "a bucket name")
        prefix = self.key_prefix.strip("/")
        if prefix and _key_problem(prefix) is not None:
            raise bad("key_prefix", self.key_prefix, "'/'-separated key segments")
        integers = {
            "max_concurrency": (1, 256, "an integer from 1 to 256"),
            "parts_in_flight": (1, 256, "an integer from 1 to 256"),
            "max_retries": (0, 100, "an integer from 0 to 100"),
            "chunk_size": (64 * 1024, 1 << 30, "bytes from 64 KiB to 1 GiB"),
            "part_size": (_MIN_PART, 5 << 30, "bytes from 5 MiB to 5 GiB"),
        }
        for name, (low, high, expected) in integers.items():
            value = getattr(self, name)
            if type(value) is not int or not low <= value <= high:
                raise bad(name, value, expected)
        for name in ("connect_timeout", "read_timeout", "request_timeout", "retry_timeout"):
            value = getattr(self, name)
            if type(value) not in (int, float) or not 0 < value <= 7 * 86400:
                raise bad(name, value, "seconds, more than 0 and at most a week")

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never reach a message (for redaction)."""
        return tuple(s for s in (self.access_key, self.secret_key) if s)

    def store_kwargs(self, bucket: str) -> dict[str, Any]:
        """Keyword arguments for ``obstore.store.S3Store(**kwargs)``.

        Every setting that changes where or how requests are signed is passed
        explicitly, because obstore silently fills unset ones from ``AWS_*``
        environment variables (``AWS_SESSION_TOKEN``, ``AWS_SKIP_SIGNATURE``,
        ``AWS_S3_EXPRESS``, ``AWS_ENDPOINT`` were all observed to change the
        requests). ``allow_http`` is on only for an ``http://`` endpoint. The
        whole-request ``timeout`` is long because it covers the entire body
        of a streamed download; ``read_timeout`` catches a stalled one.
        """
        endpoint = (self.endpoint_url or f"https://s3.{self.region}.amazonaws.com").rstrip("/")
        kwargs: dict[str, Any] = {
            "bucket": bucket,
            "endpoint": endpoint,
            "region": self.region,
            "virtual_hosted_style_request": False,
            "skip_signature": False,
            "s3_express": False,
            "request_payer": False,
            "client_options": {
                "allow_http": endpoint.startswith("http://"),
                "connect_timeout": _duration(self.connect_timeout),
                "read_timeout": _duration(self.read_timeout),
                "timeout": _duration(self.request_timeout),
            },
            "retry_config": {
                "max_retries": self.max_retries,
                "retry_timeout": timedelta(seconds=self.retry_timeout),
                "backoff": {
                    "init_backoff": timedelta(milliseconds=100),
                    "max_backoff": timedelta(seconds=5),
                    "base": 2,
                },
            },
        }
        if self.access_key is not None and self.secret_key is not None:
            kwargs["credential_provider"] = _StaticCredentials(self.access_key, self.secret_key)
        return kwargs


# --------------------------------------------------------------------------
# Keys and paths


def _key_problem(path: str) -> str | None:
    """Why a ``/``-separated key (or key suffix) cannot be a relative file path.

    ``None`` means every segment is a plain, non-empty, portable file name.
    """
    if not path:
        return "it is empty"
    if path.startswith("/"):
        return "it is absolute"
    if "\x00" in path:
        return "it contains a NUL byte"
    if _CONTROL_RE.search(path):
        return "it contains a control character"
    if _encoded_len(path) > _MAX_KEY_BYTES:
        return f"it is not UTF-8 or longer than {_MAX_KEY_BYTES} bytes"
    for segment in path.split("/"):
        if segment == "":
            return "it has an empty segment ('//' or a trailing '/')"
        if segment in (".", ".."):
            return f"it has a {segment!r} segment"
        if _encoded_len(segment) > _MAX_SEGMENT_BYTES:
            return f"a segment is longer than {_MAX_SEGMENT_BYTES} bytes"
    return None


def _inside(root: str, path: str) -> bool:
    """``path`` is ``root`` or below it; both absolute and normalised."""
    return posixpath.commonpath([root, path]) == root


def _normal_root(task_dir: str) -> str:
    if not posixpath.isabs(task_dir):
        raise ValueError(f"task_dir must be an absolute path, got {task_dir!r}")
    return posixpath.normpath(task_dir)


def _safe_join(root: str, relative: str, *, key: str, code: str, what: str) -> str:
    """Join ``relative`` below ``root`` or raise ``TaskFailure`` naming ``key``.

    Two independent guards: the segments are checked one by one, and the
    joined path must be unchanged by normalisation and stay inside ``root``.
    """
    problem = _key_problem(relative)
    joined = posixpath.join(root, relative)
    if problem is not None or posixpath.normpath(joined) != joined or not _inside(root, joined):
        reason = problem or "it would leave the task folder"
        raise TaskFailure(code, f"{what} {key!r} cannot be mapped to a local file: {reason}")
    return joined


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """Split ``s3://bucket/key`` into ``(bucket, key)``.

    The key is returned verbatim (S3 URIs are not percent-encoded) and may be
    empty (``s3://bucket/`` is the whole bucket). Raises ``TaskFailure``
    (``INVALID_INPUT_ERROR``) for anything that is not such a URI.
    """
    if not uri.startswith(_S3_SCHEME):
        raise TaskFailure(INVALID_INPUT_ERROR, f"{uri!r} is not an s3:// URI")
    bucket, _, key = uri[len(_S3_SCHEME) :].partition("/")
    if not _BUCKET_RE.fullmatch(bucket) or bucket in (".", ".."):
        raise TaskFailure(
            INVALID_INPUT_ERROR,
            f"{uri!r} does not name a valid bucket (letters, digits, '.', '-', '_')",
        )
    return bucket, key


def local_path_for_object(task_dir: str, bucket: str, key: str) -> str:
    """Where object ``key`` of ``bucket`` is stored for a task.

    ``<task_dir>/inputs/<bucket>/<key>``; an empty ``key`` gives the bucket's
    folder (for ``s3://bucket/``). Raises ``TaskFailure``
    (``INVALID_INPUT_ERROR``) naming the key if it could not stay inside.
    """
    root = _normal_root(task_dir)
    if not _BUCKET_RE.fullmatch(bucket) or bucket in (".", ".."):
        raise TaskFailure(INVALID_INPUT_ERROR, f"invalid bucket name {bucket!r}")
    bucket_dir = posixpath.join(root, INPUTS_DIRNAME, bucket)
    if key == "":
        return bucket_dir
    return _safe_join(bucket_dir, key, key=key, code=INVALID_INPUT_ERROR, what="S3 key")


def _map_listing(
    prefix: str, listed: Sequence[tuple[str, int]], local_root: str
) -> list[tuple[str, str, int]]:
    """:func:`map_listed_keys` with sizes kept (zero-size objects need no GET)."""
    if prefix and not prefix.endswith("/"):
        raise ValueError(f"a listing prefix must be empty or end with '/', got {prefix!r}")
    root = _normal_root(local_root)
    if len(listed) > MAX_LISTED_OBJECTS:
        raise TaskFailure(
            INVALID_INPUT_ERROR,
            f"prefix {prefix!r} holds more than {MAX_LISTED_OBJECTS} objects; refusing to "
            "download it",
        )
    folder_key = prefix[:-1]
    entries: dict[str, tuple[str, int]] = {}
    for key, size in listed:
        if prefix and key == folder_key:
            if size == 0:
                continue  # the marker of the listed folder itself
            raise TaskFailure(
                INVALID_INPUT_ERROR,
                f"S3 key {key!r} is both an object and the folder {prefix!r} being downloaded",
            )
        if not key.startswith(prefix):
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"S3 listing of {prefix!r} returned foreign key {key!r}"
            )
        relative = key[len(prefix) :]
        if relative.endswith("/") and size == 0:
            continue  # a 'dir/' marker as some servers list it
        entries[relative] = (key, size)
    folders: set[str] = set()
    for relative in entries:
        parts = relative.split("/")
        folders.update("/".join(parts[:i]) for i in range(1, len(parts)))
    mapped: list[tuple[str, str, int]] = []
    for relative, (key, size) in sorted(entries.items()):
        if relative in folders:
            if size == 0:
                continue  # a folder marker with content below it
            raise TaskFailure(
                INVALID_INPUT_ERROR,
                f"S3 keys {key!r} and {key + '/…'!r} collide: the same local name would be "
                "a file and a folder",
            )
        path = _safe_join(root, relative, key=key, code=INVALID_INPUT_ERROR, what="S3 key")
        mapped.append((key, path, size))
    return mapped


def map_listed_keys(
    prefix: str, listed: Sequence[tuple[str, int]], local_root: str
) -> list[tuple[str, str]]:
    """Map the ``(key, size)`` pairs listed under ``prefix`` to local paths.

    ``prefix`` is the listed key prefix, empty or ending in ``/``; the result
    keeps only real files, as ``(key, local_path)`` sorted by key, each inside
    ``local_root``. Folder markers are skipped; names that would leave the
    folder, contain control characters or collide as file and folder raise
    ``TaskFailure`` (``INVALID_INPUT_ERROR``) naming the key.
    """
    return [(key, path) for key, path, _ in _map_listing(prefix, listed, local_root)]


# --------------------------------------------------------------------------
# Walking params and results


def _strings(value: object, what: str, code: str) -> Iterator[tuple[Location, str]]:
    """Every string value in nested dicts/lists/tuples, depth first, in order."""
    stack: list[tuple[Location, object]] = [((), value)]
    while stack:
        location, item = stack.pop()
        if isinstance(item, str):
            yield location, item
            continue
        if len(location) >= MAX_DEPTH and isinstance(item, Mapping | list | tuple):
            raise TaskFailure(code, f"{what} nest deeper than {MAX_DEPTH} levels")
        children: list[tuple[Location, object]]
        if isinstance(item, Mapping):
            children = [((*location, k), v) for k, v in item.items()]
        elif isinstance(item, list | tuple):
            children = [((*location, i), v) for i, v in enumerate(item)]
        else:
            continue
        stack.extend(reversed(children))


@dataclass(frozen=True, slots=True, kw_only=True)
class InputRef:
    """An ``s3://`` string found in params: what to fetch and where it was."""

    location: Location
    uri: str
    bucket: str
    key: str
    is_prefix: bool


def find_inputs(params: object) -> list[InputRef]:
    """Every string starting with ``s3://`` anywhere in ``params``.

    Only values are searched, not dict keys, and only the lower-case scheme.
    A URI ending in ``/`` is a prefix (a folder to download recursively).
    Malformed URIs raise ``TaskFailure`` (``INVALID_INPUT_ERROR``) instead of
    reaching the handler as an unusable string.
    """
    found: list[InputRef] = []
    for location, text in _strings(params, "params", INVALID_INPUT_ERROR):
        if not text.startswith(_S3_SCHEME):
            continue
        bucket, key = parse_s3_uri(text)
        is_prefix = text.endswith("/")
        if not is_prefix and key == "":
            raise TaskFailure(
                INVALID_INPUT_ERROR,
                f"{text!r} names a bucket, not an object; end it with '/' to download the "
                "whole bucket",
            )
        checked = key[:-1] if is_prefix else key
        if checked:
            _safe_join("/", checked, key=key, code=INVALID_INPUT_ERROR, what=f"{text}: S3 key")
        found.append(
            InputRef(location=location, uri=text, bucket=bucket, key=key, is_prefix=is_prefix)
        )
    return found


def substitute(params: object, replacements: Mapping[Location, str]) -> Any:
    """A copy of ``params`` with the value at each location replaced.

    Dicts and lists along the way are rebuilt (tuples stay tuples, other
    mappings become dicts), so the caller's structure is never mutated. A
    location that does not exist raises ``KeyError``: it is a bug, not input.
    """
    pending = dict(replacements)

    def rebuild(location: Location, item: object) -> object:
        if location in pending:
            return pending.pop(location)
        if isinstance(item, Mapping):
            return {k: rebuild((*location, k), v) for k, v in item.items()}
        if isinstance(item, list):
            return [rebuild((*location, i), v) for i, v in enumerate(item)]
        if isinstance(item, tuple):
            return tuple(rebuild((*location, i), v) for i, v in enumerate(item))
        return item

    result = rebuild((), params)
    if pending:
        raise KeyError(f"locations not found in the structure: {sorted(map(str, pending))}")
    return result


# --------------------------------------------------------------------------
# Download plan


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadItem:
    """One object to fetch into ``local_path``; ``size`` is known when listed."""

    bucket: str
    key: str
    local_path: str
    size: int | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DownloadPlan:
    """What to create and fetch, and what each params location becomes.

    ``folders`` must exist before the downloads start (parents first);
    ``items`` are unique by local path; ``replacements`` feeds :func:`substitute`.
    """

    folders: tuple[str, ...]
    items: tuple[DownloadItem, ...]
    replacements: Mapping[Location, str]


def plan_downloads(
    refs: Sequence[InputRef],
    task_dir: str,
    listings: Mapping[tuple[str, str], Sequence[tuple[str, int]]],
    *,
    empty_prefix_is_error: bool = False,
) -> DownloadPlan:
    """Combine the inputs and the prefix listings into one collision-free plan.

    ``listings`` maps ``(bucket, prefix_key)`` of every prefix input to the
    ``(key, size)`` pairs the adapter listed. The same object named twice is
    fetched once; a file in one input that is a folder in another (``s3://b/data``
    and ``s3://b/data/``) raises ``TaskFailure`` (``INVALID_INPUT_ERROR``).
    """
    root = _normal_root(task_dir)
    items: dict[str, DownloadItem] = {}
    roots: set[str] = {posixpath.join(root, INPUTS_DIRNAME)}
    replacements: dict[Location, str] = {}
    for ref in refs:
        local = local_path_for_object(root, ref.bucket, ref.key.rstrip("/"))
        replacements[ref.location] = local
        if not ref.is_prefix:
            items.setdefault(
                local, DownloadItem(bucket=ref.bucket, key=ref.key, local_path=local, size=None)
            )
            continue
        roots.add(local)
        listed = listings[(ref.bucket, ref.key)]
        mapped = _map_listing(ref.key, listed, local)
        if not mapped and empty_prefix_is_error:
            raise TaskFailure(INVALID_INPUT_ERROR, f"{ref.uri} matched no objects")
        for key, path, size in mapped:
            items[path] = DownloadItem(bucket=ref.bucket, key=key, local_path=path, size=size)
    folders: set[str] = set()
    starts = [posixpath.dirname(path) for path in items] + sorted(roots)
    for start in starts:
        parent = start
        while parent != root and parent not in folders and _inside(root, parent):
            folders.add(parent)
            parent = posixpath.dirname(parent)
    files = sorted(items)
    for path in files:
        if path in folders:
            raise TaskFailure(
                INVALID_INPUT_ERROR,
                f"inputs collide: {items[path].key!r} would be both a file and a folder at {path}",
            )
    return DownloadPlan(
        folders=tuple(sorted(folders, key=lambda p: (p.count("/"), p))),
        items=tuple(items[p] for p in files),
        replacements=replacements,
    )


def unconfigured_failure(refs: Sequence[InputRef]) -> TaskFailure:
    """The failure for ``s3://`` inputs on a worker without S3 settings.

    ``PERMANENT_ERROR``: the task cannot run here and retrying on the same
    worker would fail the same way; someone must configure storage.
    """
    uris = ", ".join(ref.uri for ref in refs[:3]) + (" …" if len(refs) > 3 else "")
    return TaskFailure(
        PERMANENT_ERROR,
        f"params reference S3 ({uris}) but this worker has no S3 storage configured "
        "(set S3_ENDPOINT_URL / S3_ACCESS_KEY / S3_SECRET_KEY)",
    )


def chunk_budget(size: int | None, chunk_size: int) -> int:
    """Upper bound on the chunks a stream of ``size`` bytes may yield.

    Adapters loop over obstore's stream at most this many times, so even a
    misbehaving server cannot keep a download loop running forever.
    """
    if size is None:
        return 1 << 40
    return size // chunk_size + 2


def part_size_for(size: int, preferred: int) -> int:
    """Multipart part size: ``preferred`` unless the file needs bigger parts.

    S3 allows 10,000 parts of at least 5 MiB, so a big file gets parts of
    ``size / 10,000`` rounded up to a whole MiB.
    """
    needed = -(-size // _MAX_PARTS)
    needed = -(-needed // (1 << 20)) << 20
    return max(preferred, needed, _MIN_PART)


# --------------------------------------------------------------------------
# Outputs and the upload plan


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputRef:
    """A returned string that is a path inside the task folder.

    ``path`` is the string as returned, ``resolved`` the real path (symlinks
    resolved), ``relative`` the resolved path relative to the resolved task
    folder, always with ``/`` separators.
    """

    location: Location
    path: str
    resolved: str
    relative: str


def find_outputs(
    data: object, task_dir: str, resolve: Callable[[str], str | None]
) -> list[OutputRef]:
    """Strings in ``data`` whose resolved path lies inside the resolved task folder.

    ``resolve(path)`` (supplied by the adapter: ``os.path.realpath`` plus an
    existence check, run in a thread) returns the absolute real path or
    ``None`` when nothing is there. Only absolute paths are candidates;
    containment is decided by ``commonpath`` on resolved paths, never by a
    string prefix, so ``/task-10`` is not inside ``/task-1`` and a symlink to
    ``/etc/passwd`` is not an output. The task folder itself is not an output.
    """
    root = resolve(task_dir)
    if root is None:
        return []
    found: list[OutputRef] = []
    for location, text in _strings(data, "result data", PERMANENT_ERROR):
        if not text.startswith("/") or "\x00" in text or len(text) > _MAX_PATH_CHARS:
            continue
        real = resolve(text)
        if real is None or real == root or not _inside(root, real):
            continue
        relative = posixpath.relpath(real, root)
        found.append(OutputRef(location=location, path=text, resolved=real, relative=relative))
    return found


def _encoded_len(text: str) -> int:
    """UTF-8 length, or more than any limit if ``text`` cannot be encoded."""
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return _MAX_KEY_BYTES + 1


def _safe_id(name: str, value: str) -> str:
    if (
        not value
        or value in (".", "..")
        or "/" in value
        or "\\" in value
        or _CONTROL_RE.search(value)
        or _encoded_len(value) > _MAX_SEGMENT_BYTES
    ):
        raise TaskFailure(
            INVALID_INPUT_ERROR,
            f"{name} {value!r} cannot be used in an S3 key (empty, '.', '..', '/', '\\', "
            "control characters or too long)",
        )
    return value


def upload_key(key_prefix: str, job_id: str, task_id: str, relative_path: str) -> str:
    """The S3 key for a result file: ``<key_prefix>/<job_id>/<task_id>/<relative_path>``.

    The ids must each be a single safe segment, so an id such as ``../x`` or
    ``a/b`` cannot move the key out of its task's namespace (raises
    ``TaskFailure(INVALID_INPUT_ERROR)``); a result path that is no valid key
    raises ``TaskFailure(PERMANENT_ERROR)`` naming it.
    """
    prefix = key_prefix.strip("/")
    if prefix and _key_problem(prefix) is not None:
        raise TaskFailure(PERMANENT_ERROR, f"S3 key prefix {key_prefix!r} is not a valid key")
    _safe_id("job_id", job_id)
    _safe_id("task_id", task_id)
    problem = _key_problem(relative_path)
    if problem is not None:
        raise TaskFailure(
            PERMANENT_ERROR, f"result path {relative_path!r} cannot be an S3 key: {problem}"
        )
    key = "/".join(part for part in (prefix, job_id, task_id, relative_path) if part)
    if _encoded_len(key) > _MAX_KEY_BYTES:
        raise TaskFailure(
            PERMANENT_ERROR, f"S3 key for {relative_path!r} would exceed {_MAX_KEY_BYTES} bytes"
        )
    return key


class LocalDisk(Protocol):
    """The facts about the local disk that planning an upload needs.

    Implemented by each adapter with plain ``os`` calls and run in a worker
    thread; the core never touches the disk itself.
    """

    def resolve(self, path: str) -> str | None:
        """The real absolute path (symlinks resolved), or ``None`` if absent."""

    def stat(self, path: str) -> tuple[FileKind, int]:
        """Kind of the thing at ``path`` (following symlinks) and its size."""

    def walk(self, folder: str, limit: int) -> Sequence[str]:
        """Relative ``/`` paths of every non-folder entry below ``folder``.

        Folders are descended, symlinked folders are *not* (they are listed
        as entries, so the plan can refuse them); stops after ``limit`` entries.
        """


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadItem:
    """One local file (``source``, resolved) to store at ``key``."""

    source: str
    bucket: str
    key: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UploadPlan:
    """Files to upload (unique by key) and what each data location becomes."""

    items: tuple[UploadItem, ...]
    replacements: Mapping[Location, str]


def plan_uploads(
    data: object,
    task_dir: str,
    disk: LocalDisk,
    *,
    bucket: str,
    key_prefix: str,
    job_id: str,
    task_id: str,
    max_files: int = MAX_FOLDER_FILES,
) -> UploadPlan:
    """Decide which returned paths to upload, under which keys, as which URIs.

    A file becomes ``s3://bucket/<key>``; a folder is uploaded recursively and
    becomes ``s3://bucket/<key>/``. Inside a folder, every entry must resolve
    to a regular file inside the task folder: a symlink that escapes, a
    symlinked folder, a FIFO or a vanished file raise
    ``TaskFailure(PERMANENT_ERROR)`` rather than being silently skipped or
    read forever.
    """
    outputs = find_outputs(data, task_dir, disk.resolve)
    if not outputs:
        return UploadPlan(items=(), replacements={})
    root = disk.resolve(task_dir) or task_dir
    items: dict[str, UploadItem] = {}
    replacements: dict[Location, str] = {}
    for ref in outputs:
        base_key = upload_key(key_prefix, job_id, task_id, ref.relative)
        kind, size = disk.stat(ref.resolved)
        if kind == "file":
            items[base_key] = UploadItem(
                source=ref.resolved, bucket=bucket, key=base_key, size=size
            )
            replacements[ref.location] = f"s3://{bucket}/{base_key}"
            continue
        if kind != "dir":
            raise TaskFailure(
                PERMANENT_ERROR, f"result path {ref.path!r} is not a regular file or folder"
            )
        entries = disk.walk(ref.resolved, max_files + 1)
        if len(entries) > max_files:
            raise TaskFailure(
                PERMANENT_ERROR,
                f"result folder {ref.path!r} holds more than {max_files} files; refusing to "
                "upload it",
            )
        for entry in entries:
            source = disk.resolve(posixpath.join(ref.resolved, entry))
            if source is None or not _inside(root, source):
                raise TaskFailure(
                    PERMANENT_ERROR,
                    f"{entry!r} in result folder {ref.path!r} is a broken link or resolves "
                    "outside the task folder",
                )
            entry_kind, entry_size = disk.stat(source)
            if entry_kind != "file":
                raise TaskFailure(
                    PERMANENT_ERROR,
                    f"{entry!r} in result folder {ref.path!r} is not a regular file "
                    "(symlinked folders, FIFOs and devices are not uploaded)",
                )
            key = upload_key(key_prefix, job_id, task_id, f"{ref.relative}/{entry}")
            items[key] = UploadItem(source=source, bucket=bucket, key=key, size=entry_size)
        replacements[ref.location] = f"s3://{bucket}/{base_key}/"
    return UploadPlan(items=tuple(items[k] for k in sorted(items)), replacements=replacements)


# --------------------------------------------------------------------------
# Errors

_CODES: Mapping[TransferOperation, Mapping[TransferKind, str]] = {
    # A missing object or an unusable key in the *input* is the input's fault;
    # an unknown failure is retried because storage hiccups are the common case.
    "download": {
        "not_found": INVALID_INPUT_ERROR,
        "denied": PERMANENT_ERROR,
        "network": TRANSIENT_ERROR,
        "invalid_key": INVALID_INPUT_ERROR,
        "other": TRANSIENT_ERROR,
    },
    # On upload a missing bucket or result file is this worker's problem.
    "upload": {
        "not_found": PERMANENT_ERROR,
        "denied": PERMANENT_ERROR,
        "network": TRANSIENT_ERROR,
        "invalid_key": PERMANENT_ERROR,
        "other": TRANSIENT_ERROR,
    },
}

_DESCRIPTIONS: Mapping[TransferKind, str] = {
    "not_found": "not found",
    "denied": "access denied (check the S3 credentials and bucket policy)",
    "network": "storage unreachable or failing",
    "invalid_key": "key cannot be used as a local file name",
    "other": "failed",
}


def _clean_detail(detail: str, secrets: Sequence[str]) -> str:
    """Redact credentials and trim obstore's long debug dump to one line."""
    for secret in secrets:
        if secret:
            detail = detail.replace(secret, "***")
    detail = _SECRET_RE.sub(r"\1\2***", detail)
    detail = detail.split("Debug source:", 1)[0]
    detail = " ".join(detail.split())
    if len(detail) > _DETAIL_CHARS:
        detail = detail[: _DETAIL_CHARS - 1] + "…"
    return detail


def classify_transfer_error(
    kind: str,
    detail: str,
    *,
    operation: TransferOperation = "download",
    target: str = "",
    secrets: Sequence[str] = (),
) -> TaskFailure:
    """Turn a transfer failure of ``kind`` into the orchestrator's error code.

    Downloads: ``not_found`` and ``invalid_key`` → ``INVALID_INPUT_ERROR``,
    ``denied`` → ``PERMANENT_ERROR``, ``network`` and ``other`` →
    ``TRANSIENT_ERROR``. Uploads: ``not_found``, ``denied`` and
    ``invalid_key`` → ``PERMANENT_ERROR``, the rest transient. ``detail`` is
    redacted (``secrets``, signatures, tokens) and shortened.
    """
    known: TransferKind = cast(TransferKind, kind) if kind in _DESCRIPTIONS else "other"
    what = f" of {target}" if target else ""
    message = f"S3 {operation}{what}: {_DESCRIPTIONS[known]}"
    cleaned = _clean_detail(detail, secrets)
    if cleaned:
        message = f"{message}: {cleaned}"
    return TaskFailure(_CODES[operation][known], message)


def transfer_error_kind(exc: BaseException) -> TransferKind:
    """Classify an obstore (or OS) exception without importing obstore.

    Decided by class name along the MRO (obstore's classes live in
    ``obstore.exceptions``; missing objects are the builtin
    ``FileNotFoundError``) and, for obstore's catch-all ``GenericError``, by
    the HTTP status in its message: listings report 403 and 404 that way.
    """
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "InvalidPathError" in names:
        return "invalid_key"
    if names & {"PermissionDeniedError", "UnauthenticatedError", "PermissionError"}:
        return "denied"
    if names & {"FileNotFoundError", "NotFoundError"}:
        return "not_found"
    if names & {"TimeoutError", "ConnectionError"}:
        return "network"
    if "GenericError" in names:
        message = str(exc)
        status = _STATUS_RE.search(message)
        if status is not None:
            code = int(status.group(1))
            if code == 404:
                return "not_found"
            if code in (401, 403):
                return "denied"
            if code >= 500 or code in (408, 429):
                return "network"
            return "other"
        return "network" if _NETWORK_RE.search(message) else "other"
    if "ValueError" in names:
        return "invalid_key"  # obstore refuses an unrepresentable key this way
    return "other"


def failure_from_exception(
    exc: BaseException,
    *,
    operation: TransferOperation,
    target: str,
    secrets: Sequence[str] = (),
) -> TaskFailure:
    """The ``TaskFailure`` for an exception raised by an obstore call.

    When obstore refuses a listing because of one bad key, the message names
    that key (obstore quotes it as ``Path "…"``).
    """
    kind = transfer_error_kind(exc)
    detail = str(exc) or type(exc).__name__
    if kind == "invalid_key":
        bad = _BAD_PATH_RE.search(detail)
        if bad is not None:
            detail = f"S3 key {bad.group(1)!r} is not a usable file name. {detail}"
    return classify_transfer_error(
        kind, detail, operation=operation, target=target, secrets=secrets
    )


def first_failure(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The exception to re-raise from a task group that ran several transfers.

    The first ``TaskFailure`` (so the orchestrator hears a real error code),
    else the first exception; nested groups are searched depth first.
    """
    leaves: list[BaseException] = []
    stack: list[BaseException] = [group]
    while stack:
        current = stack.pop()
        if isinstance(current, BaseExceptionGroup):
            stack.extend(reversed(current.exceptions))
        else:
            leaves.append(current)
    failures = [exc for exc in leaves if isinstance(exc, TaskFailure)]
    return (failures or leaves)[0]
