"""Worker configuration: read once from the environment, validated, then frozen.

``WorkerConfig`` is the object users know from the reference SDK: a mutable bag
of UPPERCASE attributes named after the environment variables, loaded from the
environment when it is created and open to assignments in code afterwards.
``WorkerConfig.resolve()`` checks the attributes as they are at that moment and
returns a ``ResolvedConfig``: frozen, typed, snake_case, with the orchestrator
list and each orchestrator's token worked out. The rest of the SDK only ever
reads a ``ResolvedConfig``, so a value that is wrong stops the worker at
startup, with a message that names the variable, quotes the value and says
what was expected, instead of surfacing as a crash in the middle of a poll.

Constructing a ``WorkerConfig`` is the one place in the SDK that reads
``os.environ``. A variable set to an empty (or blank) string counts as unset,
because ``VAR=`` lines in compose files and CI systems usually mean "no value".
Values are stripped of surrounding whitespace (a token read from a file keeps
no trailing newline).

Variables of the reference SDK (same names, same defaults):

===============================  ============================  ===================================
variable                         default                       accepted values
===============================  ============================  ===================================
WORKER_ID                        ``worker-<uuid4 hex>``        letters, digits, ``_``, ``-`` (the
                                                               orchestrator rejects other ids)
WORKER_TYPE                      ``generic-cpu-worker``        non-empty string
WORKER_PORT                      ``8083``                      0..65535 (health server; 0 = any)
WORKER_TOKEN                     ``your-secret-worker-token``  non-empty string (secret)
WORKER_INDIVIDUAL_TOKEN          unset                         string (secret); wins over
                                                               WORKER_TOKEN
ORCHESTRATOR_URL                 ``http://localhost:8080``     http(s) URL
ORCHESTRATORS_CONFIG             ``[]``                        JSON list of ``{url, priority,
                                                               weight, token}`` objects
MULTI_ORCHESTRATOR_MODE          ``FAILOVER``                  ``FAILOVER`` or ``ROUND_ROBIN``
MAX_CONCURRENT_TASKS             ``10``                        positive integer
COST_PER_SKILL                   ``{}``                        JSON object: skill -> cost >= 0
CPU_CORES                        ``4``                         positive integer
GPU_MODEL                        unset                         string
GPU_VRAM_GB                      ``0``                         integer >= 0
INSTALLED_SOFTWARE               ``{"python": "3.9"}``         JSON object: name -> version
INSTALLED_MODELS                 ``[]``                        JSON list of objects with a
                                                               ``name``
HEARTBEAT_INTERVAL               ``15``                        seconds > 0
WORKER_HEARTBEAT_DEBOUNCE_DELAY  ``0.1``                       seconds >= 0
WORKER_ENABLE_WEBSOCKETS         ``false``                     boolean
RESULT_MAX_RETRIES               ``5``                         integer >= 0
RESULT_RETRY_INITIAL_DELAY       ``1.0``                       seconds > 0
TASK_POLL_TIMEOUT                ``30``                        seconds > 0
TASK_POLL_ERROR_DELAY            ``5.0``                       seconds > 0
IDLE_POLL_DELAY                  ``0.01``                      seconds >= 0
TASK_FILES_DIR                   ``/tmp/payloads``             non-empty path
S3_ENDPOINT_URL                  unset                         http(s) URL
S3_ACCESS_KEY                    unset                         string
S3_SECRET_KEY                    unset                         string (secret)
S3_DEFAULT_BUCKET                ``avtomatika-payloads``       bucket name (no ``/``, no blanks)
S3_REGION                        ``us-east-1``                 non-empty string
===============================  ============================  ===================================

Variables of this SDK only:

===============================  ============================  ===================================
variable                         default                       meaning
===============================  ============================  ===================================
WORKER_HOST                      ``0.0.0.0``                   host the health server binds to
SHUTDOWN_TIMEOUT                 ``30``                        seconds running tasks get to finish
                                                               after SIGTERM before they are
                                                               cancelled (>= 0)
TASK_TIMEOUT                     unset (``0``)                 per-task handler time limit in
                                                               seconds; unset or 0: no limit
RESULT_OUTBOX_LIMIT              ``1000``                      undelivered results kept before
                                                               the worker stops polling (>= 1)
MAX_PARALLEL_POLLS               ``0``                         long polls in flight at once; 0:
                                                               one per free slot
S3_KEY_PREFIX                    ``results``                   key prefix of uploaded results;
                                                               ``/`` for none; no ``.``/``..``
S3_MAX_CONCURRENCY               ``8``                         S3 transfers in flight (>= 1)
LOG_FORMAT                       ``text``                      ``text`` or ``json``
HEALTH_BLOCKED_THRESHOLD         ``5.0``                       seconds of event-loop lag after
                                                               which ``/health`` says "blocked"
RCA_BACKEND                      ``asyncio``                   ``asyncio`` or ``trio`` (the anyio
                                                               adapter only)
===============================  ============================  ===================================

Booleans accept ``true/false/1/0/yes/no`` in any case. ``ORCHESTRATORS_CONFIG``
that is unset, ``[]`` or not JSON at all falls back to ``ORCHESTRATOR_URL`` (the
reference README's documented behaviour; the invalid-JSON case logs a warning),
but JSON that parses and still describes a bad orchestrator is an error: that
is a typo the operator must hear about, not a reason to silently poll
localhost.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn, TypeGuard, cast
from urllib.parse import urlsplit, urlunsplit

from ._errors import ConfigError

__all__ = [
    "OrchestratorSpec",
    "ResolvedConfig",
    "WorkerConfig",
]

_logger = logging.getLogger("rca_core.config")

_MASK = "***"
_PLACEHOLDER_TOKEN = "your-secret-worker-token"
_DEFAULT_ORCHESTRATOR_URL = "http://localhost:8080"
_WORKER_ID_RE = re.compile(r"[A-Za-z0-9_-]+")
_ORCHESTRATOR_KEYS = frozenset({"url", "priority", "weight", "token"})
_MAX_SHOWN = 120


@dataclass(frozen=True, slots=True, kw_only=True)
class OrchestratorSpec:
    """One orchestrator the worker talks to.

    ``priority`` orders orchestrators in FAILOVER mode (lower first) and
    ``weight`` shares the polls in ROUND_ROBIN mode. In a ``ResolvedConfig``
    ``token`` is always the effective token (the entry's own, else
    WORKER_INDIVIDUAL_TOKEN, else WORKER_TOKEN); in ``ORCHESTRATORS_CONFIG`` it
    may be None to mean "use the worker's token". The repr masks it so that a
    spec can be logged.
    """

    url: str
    priority: int = 10
    weight: int = 1
    token: str | None = None

    def __repr__(self) -> str:
        token = None if self.token is None else _MASK
        return (
            f"OrchestratorSpec(url={_mask_url(self.url)!r}, priority={self.priority!r}, "
            f"weight={self.weight!r}, token={token!r})"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ResolvedConfig:
    """The validated configuration the worker runs with.

    Field names are the variable names in lower case (``MAX_CONCURRENT_TASKS``
    becomes ``max_concurrent_tasks``), except that ``ORCHESTRATORS_CONFIG`` and
    ``ORCHESTRATOR_URL`` are summed up in ``orchestrators``: never empty,
    sorted by priority (ties keep their configured order), each with its
    effective token. The JSON-valued fields are fresh copies: changing the
    ``WorkerConfig`` afterwards does not change them. The repr masks secrets.
    """

    worker_id: str
    worker_type: str
    worker_host: str
    worker_port: int
    worker_token: str
    worker_individual_token: str | None
    orchestrator_url: str
    orchestrators: tuple[OrchestratorSpec, ...]
    multi_orchestrator_mode: Literal["FAILOVER", "ROUND_ROBIN"]
    max_concurrent_tasks: int
    max_parallel_polls: int
    cost_per_skill: Mapping[str, float] = field(hash=False)
    cpu_cores: int
    gpu_model: str | None
    gpu_vram_gb: int
    installed_software: Mapping[str, str] = field(hash=False)
    installed_models: tuple[Mapping[str, object], ...] = field(hash=False)
    heartbeat_interval: float
    worker_heartbeat_debounce_delay: float
    worker_enable_websockets: bool
    result_max_retries: int
    result_retry_initial_delay: float
    result_outbox_limit: int
    task_poll_timeout: float
    task_poll_error_delay: float
    idle_poll_delay: float
    task_timeout: float | None
    shutdown_timeout: float
    task_files_dir: str
    s3_endpoint_url: str | None
    s3_access_key: str | None
    s3_secret_key: str | None
    s3_default_bucket: str
    s3_region: str
    s3_key_prefix: str
    s3_max_concurrency: int
    log_format: Literal["text", "json"]
    health_blocked_threshold: float
    rca_backend: Literal["asyncio", "trio"]

    def describe(self) -> dict[str, object]:
        """The effective settings as plain JSON-friendly values, secrets masked.

        Meant for a ``check`` command and for startup logs: every token and the
        S3 secret key show as ``"***"`` (or None when unset), and a password in
        a URL is masked too.
        """
        out: dict[str, object] = {}
        for name in _RESOLVED_FIELDS:
            value = getattr(self, name)
            if name in _SECRET_FIELDS:
                out[name] = None if value is None else _MASK
            elif name == "orchestrators":
                out[name] = [
                    {
                        "url": _mask_url(spec.url),
                        "priority": spec.priority,
                        "weight": spec.weight,
                        "token": None if spec.token is None else _MASK,
                    }
                    for spec in value
                ]
            elif name in ("orchestrator_url", "s3_endpoint_url") and value is not None:
                out[name] = _mask_url(value)
            elif isinstance(value, Mapping):
                out[name] = dict(value)
            elif isinstance(value, tuple):
                out[name] = [dict(item) for item in value]
            else:
                out[name] = value
        return out

    def secret_values(self) -> tuple[str, ...]:
        """Every secret in this configuration, for redacting logs and messages.

        Adapters hand these to whatever formats text that might contain them
        (an exception message, a log record), so that no token leaks even when
        a library quotes a request header back at us.
        """
        found = [
            self.worker_token,
            self.worker_individual_token,
            self.s3_secret_key,
            *(spec.token for spec in self.orchestrators),
        ]
        found.extend(_url_password(spec.url) for spec in self.orchestrators)
        found.extend(_url_password(url) for url in (self.orchestrator_url, self.s3_endpoint_url))
        # Longest first, so that redacting a secret never leaves part of a longer one.
        return tuple(sorted({s for s in found if s}, key=lambda s: (-len(s), s)))

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={v!r}" for k, v in self.describe().items())
        return f"ResolvedConfig({shown})"


_RESOLVED_FIELDS: tuple[str, ...] = tuple(ResolvedConfig.__dataclass_fields__)
_SECRET_FIELDS = frozenset({"worker_token", "worker_individual_token", "s3_secret_key"})


# --------------------------------------------------------------------------- parsing


class _Invalid(Exception):
    """A value does not parse; carries what was expected, never the value."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _show(value: object) -> str:
    """repr of a (non-secret) value, shortened so that a huge JSON blob stays readable."""
    try:
        text = repr(value)
    except Exception:  # a user object with a broken __repr__
        text = f"<{type(value).__name__}>"
    if len(text) > _MAX_SHOWN:
        text = text[: _MAX_SHOWN - 3] + "..."
    return text


def _url_password(url: str | None) -> str | None:
    """The password in a URL's userinfo (``http://user:password@host``), if any."""
    if url is None:
        return None
    try:
        return urlsplit(url).password
    except ValueError:
        return None


def _mask_url(url: str) -> str:
    """The URL with any password in it replaced by ``***``."""
    if not _url_password(url):
        return url
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{userinfo}:{_MASK}@{netloc[1]}"))


def _text(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise _Invalid(what)
    return value.strip()


def _nonempty_string(value: object) -> str:
    text = _text(value, "a non-empty string")
    if not text:
        raise _Invalid("a non-empty string")
    return text


def _optional_string(value: object) -> str | None:
    if value is None:
        return None
    text = _text(value, "a string or None")
    return text or None


def _name_without_blanks(value: object) -> str:
    text = _text(value, "a non-empty string without blanks")
    if not text or any(c.isspace() for c in text):
        raise _Invalid("a non-empty string without blanks")
    return text


def _bucket(value: object) -> str:
    expected = "a bucket name (non-empty, without '/' or blanks)"
    text = _text(value, expected)
    if not text or "/" in text or any(c.isspace() for c in text):
        raise _Invalid(expected)
    return text


def _worker_id(value: object) -> str:
    expected = "letters, digits, '_' and '-' only (the orchestrator rejects other worker ids)"
    text = _text(value, expected)
    if not _WORKER_ID_RE.fullmatch(text):
        raise _Invalid(expected)
    return text


def _key_prefix(value: object) -> str:
    expected = "an S3 key prefix such as 'results' or 'a/b' (no '.' or '..' segments, '/' for none)"
    text = _text(value, expected).strip("/")
    if text and any(seg in ("", ".", "..") for seg in text.split("/")):
        raise _Invalid(expected)
    if any(ord(c) < 32 for c in text):
        raise _Invalid(expected)
    return text


def _http_url(value: object, expected: str = "an http:// or https:// URL with a host") -> str:
    """A base URL the adapters can append ``/_worker/...`` to (trailing ``/`` removed)."""
    text = _text(value, expected)
    if any(c.isspace() for c in text):
        raise _Invalid(expected)
    try:
        parts = urlsplit(text)
        _ = parts.port  # raises ValueError for a port out of range
    except ValueError:
        raise _Invalid(expected) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Invalid(expected)
    if parts.query or parts.fragment:
        raise _Invalid(expected + ", without query or fragment")
    return text.rstrip("/")


def _optional_http_url(value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    return _http_url(value, "an http:// or https:// URL with a host, or None")


def _int_value(value: object, expected: str) -> int:
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    raise _Invalid(expected)


def _int(minimum: int, expected: str, maximum: int | None = None) -> Callable[[object], int]:
    def parse(value: object) -> int:
        number = _int_value(value, expected)
        if number < minimum or (maximum is not None and number > maximum):
            raise _Invalid(expected)
        return number

    return parse


def _float_value(value: object, expected: str) -> float:
    if isinstance(value, bool):
        raise _Invalid(expected)
    if isinstance(value, int | float):
        try:
            number = float(value)
        except OverflowError:
            raise _Invalid(expected) from None
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            raise _Invalid(expected) from None
    else:
        raise _Invalid(expected)
    if not math.isfinite(number):
        raise _Invalid(expected)
    return number


def _seconds(*, positive: bool) -> Callable[[object], float]:
    expected = "a number of seconds > 0" if positive else "a number of seconds >= 0"

    def parse(value: object) -> float:
        number = _float_value(value, expected)
        if number < 0 or (positive and number == 0):
            raise _Invalid(expected)
        return number

    return parse


def _task_timeout(value: object) -> float | None:
    if value is None:
        return None
    number = _float_value(value, "a number of seconds >= 0 (0 or None: no limit)")
    if number < 0:
        raise _Invalid("a number of seconds >= 0 (0 or None: no limit)")
    return number or None


_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        word = value.strip().lower()
        if word in _TRUE:
            return True
        if word in _FALSE:
            return False
    raise _Invalid("a boolean: true/false, 1/0 or yes/no")


def _choice(options: Mapping[str, str]) -> Callable[[object], Any]:
    """Case-insensitive choice; ``-`` and ``_`` are interchangeable."""
    expected = " or ".join(repr(v) for v in dict.fromkeys(options.values()))

    def parse(value: object) -> str:
        if isinstance(value, str):
            key = value.strip().lower().replace("-", "_")
            if key in options:
                return options[key]
        raise _Invalid(expected)

    return parse


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def _json_error(exc: ValueError) -> str:
    """Where a JSON document broke, without quoting it (it may hold tokens)."""
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    return str(exc)


def _json(value: object, expected: str) -> object:
    """A JSON document from the environment, or the object a user assigned in code.

    Parsing is strict (no NaN or Infinity): these values travel to the
    orchestrator, whose JSON they must be.
    """
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value, parse_constant=_reject_constant)
    except RecursionError:
        raise _Invalid(f"{expected} (nested too deeply)") from None
    except ValueError as exc:
        raise _Invalid(f"{expected} (not valid JSON: {_json_error(exc)})") from None


def _finite_number(value: object) -> TypeGuard[float]:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _cost_per_skill(value: object) -> dict[str, float]:
    expected = "a JSON object mapping skill names to costs (numbers >= 0)"
    data = _json(value, expected)
    if not isinstance(data, Mapping):
        raise _Invalid(expected)
    out: dict[str, float] = {}
    for key, cost in data.items():
        if not isinstance(key, str) or not _finite_number(cost) or cost < 0:
            raise _Invalid(expected)
        out[key] = cost
    return out


def _installed_software(value: object) -> dict[str, str]:
    expected = "a JSON object mapping software names to version strings"
    data = _json(value, expected)
    if not isinstance(data, Mapping):
        raise _Invalid(expected)
    out: dict[str, str] = {}
    for key, version in data.items():
        if not isinstance(key, str) or not isinstance(version, str):
            raise _Invalid(expected)
        out[key] = version
    return out


def _plain_json_copy(value: object) -> object:
    """A deep copy made of JSON types only, or _Invalid when there is anything else."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int | float):
        if not _finite_number(value):
            raise _Invalid("JSON values")
        return value
    if isinstance(value, list | tuple):
        return [_plain_json_copy(v) for v in value]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _plain_json_copy(v) for k, v in value.items()}
    raise _Invalid("JSON values")


def _installed_models(value: object) -> list[dict[str, object]]:
    expected = 'a JSON list of objects such as {"name": "...", "version": "..."}'
    data = _json(value, expected)
    if not isinstance(data, list | tuple):
        raise _Invalid(expected)
    out: list[dict[str, object]] = []
    for item in data:
        if not isinstance(item, Mapping):
            raise _Invalid(expected)
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise _Invalid(expected)
        try:
            copy = _plain_json_copy(item)
        except (_Invalid, RecursionError):
            raise _Invalid(expected) from None
        out.append(cast("dict[str, object]", copy))
    return out


# --------------------------------------------------------------------------- orchestrators


def _orchestrator_entry(entry: object, where: str) -> OrchestratorSpec:
    """Validate one ORCHESTRATORS_CONFIG entry; errors name ``where`` and never a token."""
    if isinstance(entry, OrchestratorSpec):
        entry = {
            "url": entry.url,
            "priority": entry.priority,
            "weight": entry.weight,
            "token": entry.token,
        }
    if not isinstance(entry, Mapping):
        raise ConfigError(f"{where}: expected an object with a 'url', got {type(entry).__name__}")
    if "url" not in entry:
        raise ConfigError(f"{where}: 'url' is missing: every orchestrator needs an http(s) URL")
    try:
        url = _http_url(entry["url"])
    except _Invalid as exc:
        shown = _show(_mask_url(url) if isinstance(url := entry["url"], str) else url)
        raise ConfigError(f"{where}: url={shown}: expected {exc.expected}") from None
    priority = entry.get("priority", 10)
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise ConfigError(f"{where}: priority={_show(priority)}: expected an integer")
    weight = entry.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
        raise ConfigError(f"{where}: weight={_show(weight)}: expected a positive integer")
    token = entry.get("token")
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise ConfigError(f"{where}: token=<hidden>: expected a non-empty string or null")
    unknown = sorted(str(k) for k in entry if k not in _ORCHESTRATOR_KEYS)
    if unknown:
        _logger.warning(
            "%s: ignoring unknown key(s) %s (known keys: url, priority, weight, token)",
            where,
            ", ".join(unknown),
        )
    return OrchestratorSpec(
        url=url,
        priority=priority,
        weight=weight,
        token=None if token is None else token.strip(),
    )


def _orchestrators_config(value: object, label: str) -> list[OrchestratorSpec]:
    """Parse ORCHESTRATORS_CONFIG; [] means "use ORCHESTRATOR_URL".

    Not-JSON falls back (with a warning) as the reference README documents;
    JSON that parses but is wrong raises, naming the entry.
    """
    if value is None:
        return []
    if isinstance(value, str):
        if not value.strip():
            return []
        try:
            value = json.loads(value, parse_constant=_reject_constant)
        except RecursionError:
            raise ConfigError(
                f"{label}: expected a JSON list of orchestrators (nested too deeply)"
            ) from None
        except ValueError as exc:
            _logger.warning(
                "%s is not valid JSON (%s); falling back to ORCHESTRATOR_URL",
                label,
                _json_error(exc),
            )
            return []
    if not isinstance(value, list | tuple):
        raise ConfigError(
            f"{label}: expected a JSON list of orchestrator objects, got {type(value).__name__}"
        )
    specs = [_orchestrator_entry(entry, f"{label}[{i}]") for i, entry in enumerate(value)]
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.url in seen:
            raise ConfigError(
                f"{label}[{i}]: url={_show(_mask_url(spec.url))} is already entry {seen[spec.url]}"
            )
        seen[spec.url] = i
    return specs


def _orchestrators_attr(value: object) -> list[dict[str, object]]:
    """The attribute form of ORCHESTRATORS_CONFIG: plain dicts, defaults filled in."""
    return [
        {"url": s.url, "priority": s.priority, "weight": s.weight, "token": s.token}
        for s in _orchestrators_config(value, "ORCHESTRATORS_CONFIG")
    ]


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True, kw_only=True)
class _Setting:
    name: str
    parse: Callable[[object], Any]
    default: Callable[[], Any]
    secret: bool = False


def _const(value: object) -> Callable[[], object]:
    return lambda: value


_SETTINGS: tuple[_Setting, ...] = (
    _Setting(name="WORKER_ID", parse=_worker_id, default=lambda: f"worker-{uuid.uuid4().hex}"),
    _Setting(name="WORKER_TYPE", parse=_nonempty_string, default=_const("generic-cpu-worker")),
    _Setting(name="WORKER_HOST", parse=_name_without_blanks, default=_const("0.0.0.0")),
    _Setting(
        name="WORKER_PORT",
        parse=_int(0, "a port number from 0 to 65535", 65535),
        default=_const(8083),
    ),
    _Setting(
        name="WORKER_TOKEN",
        parse=_nonempty_string,
        default=_const(_PLACEHOLDER_TOKEN),
        secret=True,
    ),
    _Setting(
        name="WORKER_INDIVIDUAL_TOKEN", parse=_optional_string, default=_const(None), secret=True
    ),
    _Setting(name="ORCHESTRATOR_URL", parse=_http_url, default=_const(_DEFAULT_ORCHESTRATOR_URL)),
    _Setting(name="ORCHESTRATORS_CONFIG", parse=_orchestrators_attr, default=list),
    _Setting(
        name="MULTI_ORCHESTRATOR_MODE",
        parse=_choice({"failover": "FAILOVER", "round_robin": "ROUND_ROBIN"}),
        default=_const("FAILOVER"),
    ),
    _Setting(name="MAX_CONCURRENT_TASKS", parse=_int(1, "a positive integer"), default=_const(10)),
    _Setting(
        name="MAX_PARALLEL_POLLS",
        parse=_int(0, "an integer >= 0 (0: one poll per free slot)"),
        default=_const(0),
    ),
    _Setting(name="COST_PER_SKILL", parse=_cost_per_skill, default=dict),
    _Setting(name="CPU_CORES", parse=_int(1, "a positive integer"), default=_const(4)),
    _Setting(name="GPU_MODEL", parse=_optional_string, default=_const(None)),
    _Setting(name="GPU_VRAM_GB", parse=_int(0, "an integer >= 0"), default=_const(0)),
    _Setting(
        name="INSTALLED_SOFTWARE", parse=_installed_software, default=lambda: {"python": "3.9"}
    ),
    _Setting(name="INSTALLED_MODELS", parse=_installed_models, default=list),
    _Setting(name="HEARTBEAT_INTERVAL", parse=_seconds(positive=True), default=_const(15.0)),
    _Setting(
        name="WORKER_HEARTBEAT_DEBOUNCE_DELAY",
        parse=_seconds(positive=False),
        default=_const(0.1),
    ),
    _Setting(name="WORKER_ENABLE_WEBSOCKETS", parse=_bool, default=_const(False)),
    _Setting(name="RESULT_MAX_RETRIES", parse=_int(0, "an integer >= 0"), default=_const(5)),
    _Setting(name="RESULT_RETRY_INITIAL_DELAY", parse=_seconds(positive=True), default=_const(1.0)),
    _Setting(name="RESULT_OUTBOX_LIMIT", parse=_int(1, "a positive integer"), default=_const(1000)),
    _Setting(name="TASK_POLL_TIMEOUT", parse=_seconds(positive=True), default=_const(30.0)),
    _Setting(name="TASK_POLL_ERROR_DELAY", parse=_seconds(positive=True), default=_const(5.0)),
    _Setting(name="IDLE_POLL_DELAY", parse=_seconds(positive=False), default=_const(0.01)),
    _Setting(name="TASK_TIMEOUT", parse=_task_timeout, default=_const(None)),
    _Setting(name="SHUTDOWN_TIMEOUT", parse=_seconds(positive=False), default=_const(30.0)),
    _Setting(name="TASK_FILES_DIR", parse=_nonempty_string, default=_const("/tmp/payloads")),
    _Setting(name="S3_ENDPOINT_URL", parse=_optional_http_url, default=_const(None)),
    _Setting(name="S3_ACCESS_KEY", parse=_optional_string, default=_const(None)),
    _Setting(name="S3_SECRET_KEY", parse=_optional_string, default=_const(None), secret=True),
    _Setting(name="S3_DEFAULT_BUCKET", parse=_bucket, default=_const("avtomatika-payloads")),
    _Setting(name="S3_REGION", parse=_nonempty_string, default=_const("us-east-1")),
    _Setting(name="S3_KEY_PREFIX", parse=_key_prefix, default=_const("results")),
    _Setting(name="S3_MAX_CONCURRENCY", parse=_int(1, "a positive integer"), default=_const(8)),
    _Setting(
        name="LOG_FORMAT",
        parse=_choice({"text": "text", "json": "json"}),
        default=_const("text"),
    ),
    _Setting(name="HEALTH_BLOCKED_THRESHOLD", parse=_seconds(positive=True), default=_const(5.0)),
    _Setting(
        name="RCA_BACKEND",
        parse=_choice({"asyncio": "asyncio", "trio": "trio"}),
        default=_const("asyncio"),
    ),
)
_SETTING_NAMES = frozenset(s.name for s in _SETTINGS)
# Attribute names of the reference SDK's WorkerConfig that have no equivalent here.
_REFERENCE_ONLY = {
    "ORCHESTRATORS": "set ORCHESTRATORS_CONFIG (or ORCHESTRATOR_URL) instead",
    "HOSTNAME": "the adapter reports the host name itself",
    "IP_ADDRESS": "the adapter reports the address itself",
    "RESOURCES": "set CPU_CORES, GPU_MODEL and GPU_VRAM_GB instead",
}


def _fail(label: str, value: object, secret: bool, expected: str) -> NoReturn:
    if secret:
        shown = "<hidden>"
    else:
        shown = _show(_mask_url(value) if isinstance(value, str) else value)
    raise ConfigError(f"{label}={shown}: expected {expected}")


class WorkerConfig:
    """Worker settings as UPPERCASE attributes named after the environment variables.

    ``WorkerConfig()`` reads ``os.environ``; ``WorkerConfig(environ)`` reads the
    given mapping instead (tests, or a settings file loaded by the caller).
    Every variable is parsed and checked here, so a bad environment fails at
    the first line of a worker script. Attributes can then be reassigned in
    code (as in the reference SDK); ``resolve()`` checks them again as they are
    when the worker starts.

    ``HEARTBEAT_DEBOUNCE_DELAY`` and ``ENABLE_WEBSOCKETS``, the reference SDK's
    attribute names, are kept as aliases of ``WORKER_HEARTBEAT_DEBOUNCE_DELAY``
    and ``WORKER_ENABLE_WEBSOCKETS`` so that migrated code keeps working.
    """

    WORKER_ID: str
    WORKER_TYPE: str
    WORKER_HOST: str
    WORKER_PORT: int
    WORKER_TOKEN: str
    WORKER_INDIVIDUAL_TOKEN: str | None
    ORCHESTRATOR_URL: str
    ORCHESTRATORS_CONFIG: list[dict[str, object] | OrchestratorSpec]
    MULTI_ORCHESTRATOR_MODE: str
    MAX_CONCURRENT_TASKS: int
    MAX_PARALLEL_POLLS: int
    COST_PER_SKILL: dict[str, float]
    CPU_CORES: int
    GPU_MODEL: str | None
    GPU_VRAM_GB: int
    INSTALLED_SOFTWARE: dict[str, str]
    INSTALLED_MODELS: list[dict[str, object]]
    HEARTBEAT_INTERVAL: float
    WORKER_HEARTBEAT_DEBOUNCE_DELAY: float
    WORKER_ENABLE_WEBSOCKETS: bool
    RESULT_MAX_RETRIES: int
    RESULT_RETRY_INITIAL_DELAY: float
    RESULT_OUTBOX_LIMIT: int
    TASK_POLL_TIMEOUT: float
    TASK_POLL_ERROR_DELAY: float
    IDLE_POLL_DELAY: float
    TASK_TIMEOUT: float | None
    SHUTDOWN_TIMEOUT: float
    TASK_FILES_DIR: str
    S3_ENDPOINT_URL: str | None
    S3_ACCESS_KEY: str | None
    S3_SECRET_KEY: str | None
    S3_DEFAULT_BUCKET: str
    S3_REGION: str
    S3_KEY_PREFIX: str
    S3_MAX_CONCURRENCY: int
    LOG_FORMAT: str
    HEALTH_BLOCKED_THRESHOLD: float
    RCA_BACKEND: str

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env: Mapping[str, str] = os.environ if environ is None else environ
        for setting in _SETTINGS:
            raw = env.get(setting.name)
            if raw is None or not raw.strip():
                value = setting.default()
            else:
                try:
                    value = setting.parse(raw)
                except _Invalid as exc:
                    _fail(setting.name, raw, setting.secret, exc.expected)
            setattr(self, setting.name, value)

    @property
    def HEARTBEAT_DEBOUNCE_DELAY(self) -> float:
        """Alias of WORKER_HEARTBEAT_DEBOUNCE_DELAY (the reference SDK's attribute name)."""
        return self.WORKER_HEARTBEAT_DEBOUNCE_DELAY

    @HEARTBEAT_DEBOUNCE_DELAY.setter
    def HEARTBEAT_DEBOUNCE_DELAY(self, value: float) -> None:
        self.WORKER_HEARTBEAT_DEBOUNCE_DELAY = value

    @property
    def ENABLE_WEBSOCKETS(self) -> bool:
        """Alias of WORKER_ENABLE_WEBSOCKETS (the reference SDK's attribute name)."""
        return self.WORKER_ENABLE_WEBSOCKETS

    @ENABLE_WEBSOCKETS.setter
    def ENABLE_WEBSOCKETS(self, value: bool) -> None:
        self.WORKER_ENABLE_WEBSOCKETS = value

    def resolve(self) -> ResolvedConfig:
        """Check every attribute as it is now and freeze the result.

        Errors name the attribute (``WorkerConfig.MAX_CONCURRENT_TASKS=0:
        expected a positive integer``). Strings are accepted wherever the
        environment variable would be, so ``cfg.MAX_CONCURRENT_TASKS = "5"``
        works too. The orchestrator list is computed here, not at
        construction, so that ``cfg.ORCHESTRATOR_URL = ...`` in code takes
        effect when ORCHESTRATORS_CONFIG is empty.
        """
        self._warn_unknown_attributes()
        values: dict[str, Any] = {}
        for setting in _SETTINGS:
            label = f"WorkerConfig.{setting.name}"
            raw = getattr(self, setting.name, None)
            if setting.name == "ORCHESTRATORS_CONFIG":
                values["orchestrators"] = _orchestrators_config(raw, label)
                continue
            try:
                values[setting.name.lower()] = setting.parse(raw)
            except _Invalid as exc:
                _fail(label, raw, setting.secret, exc.expected)

        specs: list[OrchestratorSpec] = values["orchestrators"] or [
            OrchestratorSpec(url=values["orchestrator_url"])
        ]
        default_token: str = values["worker_individual_token"] or values["worker_token"]
        resolved = tuple(
            OrchestratorSpec(
                url=s.url,
                priority=s.priority,
                weight=s.weight,
                token=s.token or default_token,
            )
            for s in sorted(specs, key=lambda s: s.priority)
        )
        values["orchestrators"] = resolved
        values["installed_models"] = tuple(values["installed_models"])

        if (values["s3_access_key"] is None) != (values["s3_secret_key"] is None):
            have, missing = (
                ("S3_ACCESS_KEY", "S3_SECRET_KEY")
                if values["s3_access_key"] is not None
                else ("S3_SECRET_KEY", "S3_ACCESS_KEY")
            )
            raise ConfigError(
                f"{have} is set but {missing} is not: expected both S3 credentials or neither"
            )
        if any(spec.token == _PLACEHOLDER_TOKEN for spec in resolved):
            _logger.warning(
                "WORKER_TOKEN is not set: using the placeholder %r, which the orchestrator "
                "rejects unless it was configured with the same placeholder",
                _PLACEHOLDER_TOKEN,
            )
        return ResolvedConfig(**values)

    def _warn_unknown_attributes(self) -> None:
        """Warn about UPPERCASE attributes that no setting reads (usually typos)."""
        for name in sorted(vars(self)):
            if not name.isupper() or name in _SETTING_NAMES:
                continue
            if name in _REFERENCE_ONLY:
                hint = _REFERENCE_ONLY[name]
            else:
                close = difflib.get_close_matches(name, sorted(_SETTING_NAMES), n=1)
                hint = f"did you mean {close[0]}?" if close else "no setting has this name"
            _logger.warning("WorkerConfig.%s is not a setting and is ignored: %s", name, hint)

    def __repr__(self) -> str:
        parts: list[str] = []
        for setting in _SETTINGS:
            value = getattr(self, setting.name, None)
            if setting.secret:
                shown = "None" if value is None else repr(_MASK)
            elif setting.name == "ORCHESTRATORS_CONFIG":
                shown = _show_orchestrators(value)
            elif isinstance(value, str) and setting.name.endswith("_URL"):
                shown = repr(_mask_url(value))
            else:
                shown = _show(value)
            parts.append(f"{setting.name}={shown}")
        return f"WorkerConfig({', '.join(parts)})"


def _show_orchestrators(value: object) -> str:
    """ORCHESTRATORS_CONFIG for a repr: entries with their tokens masked."""
    if not isinstance(value, list | tuple):
        return "<hidden>" if isinstance(value, str) else _show(value)
    shown: list[str] = []
    for entry in value:
        if isinstance(entry, Mapping):
            masked = {k: _mask_entry_value(k, v) for k, v in entry.items()}
            shown.append(repr(masked))
        elif isinstance(entry, OrchestratorSpec):
            shown.append(repr(entry))
        else:
            shown.append(f"<{type(entry).__name__}>")
    return "[" + ", ".join(shown) + "]"


def _mask_entry_value(key: object, value: object) -> object:
    if key == "token" and value is not None:
        return _MASK
    if key == "url" and isinstance(value, str):
        return _mask_url(value)
    return value


#: What each setting means, for the generated configuration reference
#: (docs/configuration.md; a test keeps the page and this table in step).
SETTING_DOCS: dict[str, tuple[str, str]] = {
    "WORKER_ID": ("`worker-<random hex>`", "Unique id of this worker instance (letters, digits, `_`, `-`)."),
    "WORKER_TYPE": ("`generic-cpu-worker`", "The worker's type, sent at registration; `Worker(worker_type=...)` overrides it."),
    "WORKER_HOST": ("`0.0.0.0`", "*(ours)* Address the health server binds."),
    "WORKER_PORT": ("`8083`", "Port of the health server (`/health`, `/ready`)."),
    "WORKER_TOKEN": ("`your-secret-worker-token`", "Token for every orchestrator without its own (`X-Worker-Token`). Never logged."),
    "WORKER_INDIVIDUAL_TOKEN": ("—", "This worker's own token; overrides `WORKER_TOKEN`."),
    "ORCHESTRATOR_URL": ("`http://localhost:8080`", "The orchestrator, when `ORCHESTRATORS_CONFIG` is unset, `[]` or not valid JSON."),
    "ORCHESTRATORS_CONFIG": ("`[]`", "JSON list of `{url, priority=10, weight=1, token}`; a valid list with a bad entry is an error naming the entry."),
    "MULTI_ORCHESTRATOR_MODE": ("`FAILOVER`", "`FAILOVER` (best healthy priority, fall back, return) or `ROUND_ROBIN` (smooth weighted)."),
    "MAX_CONCURRENT_TASKS": ("`10`", "Tasks run at once; `Worker(max_concurrent_tasks=...)` overrides it."),
    "MAX_PARALLEL_POLLS": ("`0`", "*(ours)* Long polls in flight at once; `0`: one per free slot."),
    "COST_PER_SKILL": ("`{}`", "JSON object: skill name to cost per second, sent at registration."),
    "CPU_CORES": ("`4`", "Sent at registration (`resources.cpu_cores`)."),
    "GPU_MODEL": ("—", "Sent at registration (`resources.gpu_info.model`)."),
    "GPU_VRAM_GB": ("`0`", "Sent at registration (`resources.gpu_info.vram_gb`)."),
    "INSTALLED_SOFTWARE": ("`{\"python\": \"3.9\"}`", "JSON object: software name to version, sent at registration."),
    "INSTALLED_MODELS": ("`[]`", "JSON list of `{name, version}`, sent at registration."),
    "HEARTBEAT_INTERVAL": ("`15`", "Seconds between heartbeats to each orchestrator."),
    "WORKER_HEARTBEAT_DEBOUNCE_DELAY": ("`0.1`", "Seconds a heartbeat waits after a state change, so that several changes make one heartbeat."),
    "WORKER_ENABLE_WEBSOCKETS": ("`false`", "Open the command channel (cancellation, progress) and advertise it at registration."),
    "RESULT_MAX_RETRIES": ("`5`", "Attempts after which an undelivered result is logged as an error (it is still retried); also the cap on plain `500` answers to one result."),
    "RESULT_RETRY_INITIAL_DELAY": ("`1.0`", "First delay, in seconds, of a result's backoff (capped at 30 s, full jitter)."),
    "RESULT_OUTBOX_LIMIT": ("`1000`", "*(ours)* Undelivered results kept before polling pauses."),
    "TASK_POLL_TIMEOUT": ("`30`", "The orchestrator's long-poll hold, in seconds; the client waits 15 s longer (at least 45 s)."),
    "TASK_POLL_ERROR_DELAY": ("`5.0`", "Cap, in seconds, of the backoff after a failed poll, registration or heartbeat."),
    "IDLE_POLL_DELAY": ("`0.01`", "Accepted and ignored: there is no sleep between polls (the server holds them)."),
    "TASK_TIMEOUT": ("— (no limit)", "*(ours)* Seconds a handler may run; past it, it is cancelled and reported as `TRANSIENT_ERROR`."),
    "SHUTDOWN_TIMEOUT": ("`30`", "*(ours)* Seconds running tasks get to finish after SIGTERM before they are cancelled."),
    "TASK_FILES_DIR": ("`/tmp/payloads`", "Folder of the per-task folders (`TaskFiles`, S3 downloads)."),
    "S3_ENDPOINT_URL": ("— (AWS)", "S3-compatible endpoint; unset means AWS itself."),
    "S3_ACCESS_KEY": ("—", "S3 access key id."),
    "S3_SECRET_KEY": ("—", "S3 secret key. Never logged."),
    "S3_DEFAULT_BUCKET": ("`avtomatika-payloads`", "Bucket results are uploaded to."),
    "S3_REGION": ("`us-east-1`", "S3 region (honoured; the reference SDK ignores it)."),
    "S3_KEY_PREFIX": ("`results`", "*(ours)* Uploads go under `<prefix>/<job_id>/<task_id>/`."),
    "S3_MAX_CONCURRENCY": ("`8`", "*(ours)* S3 transfers in flight across the whole worker."),
    "LOG_FORMAT": ("`text`", "*(ours)* `text` or `json`, for the CLI's logging setup."),
    "HEALTH_BLOCKED_THRESHOLD": ("`5.0`", "*(ours)* Event-loop lag, in seconds, past which `/health` fails."),
    "RCA_BACKEND": ("`asyncio`", "*(ours)* `rca_httpx` only: `asyncio` or `trio`."),
}


def configuration_reference() -> str:
    """The configuration table as Markdown, one row per setting, in the order they are read."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for setting in _SETTINGS:
        default, meaning = SETTING_DOCS[setting.name]
        rows.append(f"| `{setting.name}` | {default} | {meaning} |")
    return "\n".join(rows) + "\n"
