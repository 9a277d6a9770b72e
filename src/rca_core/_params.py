"""What a task handler wants, read from its signature once, and how to call it.

``@worker.task`` inspects the handler when it is declared, so that a handler
the worker could never call (no parameter for the params, a required argument
the worker does not supply, a params annotation that does not resolve) fails
at import time, naming the handler, rather than on the first task in
production. Each task then only has to ``bind_params`` (the JSON object to the
type the handler asked for: a dict, a dataclass or a pydantic model) and pick
the keyword arguments the handler declares.

Binding failures are the sender's fault, not the worker's: they surface as
``TaskFailure(INVALID_INPUT_ERROR, ...)`` so that the orchestrator fails the job
without retrying it, with a message that names the handler and the fields.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import sys
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ._errors import INVALID_INPUT_ERROR, TaskFailure

__all__ = [
    "HANDLER_KWARGS",
    "HandlerSpec",
    "bind_params",
    "handler_kwargs",
    "inspect_handler",
]

HANDLER_KWARGS: frozenset[str] = frozenset(
    {
        "task_id",
        "job_id",
        "priority",
        "send_progress",
        "add_to_hot_cache",
        "remove_from_hot_cache",
        "tracing_context",
        "params_metadata",
    }
)
"""The keyword arguments the worker can pass to a handler (besides the files object)."""

_KEYWORD_KINDS = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
_VAR_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


@dataclass(frozen=True, slots=True, kw_only=True)
class HandlerSpec:
    """A registered handler and what its signature asks for.

    ``params_type`` is the resolved annotation of the first parameter (``dict``
    when there is none); ``files_arg`` names the parameter annotated with the
    TaskFiles type, if any; ``accepted_kwargs`` are the keyword names the
    handler declares, and ``accepts_var_kwargs`` says whether it takes
    ``**kwargs`` (then it gets every keyword the worker has). ``params_arg`` is
    the first parameter's name, never passed as a keyword (None for
    ``*args``).
    """

    name: str
    task_type: str | None
    func: Callable[..., Any]
    is_async: bool
    params_type: Any
    files_arg: str | None
    accepts_var_kwargs: bool
    accepted_kwargs: frozenset[str]
    params_arg: str | None = None


# --------------------------------------------------------------------------- inspection


def _globals_of(func: object) -> dict[str, Any]:
    """The module globals a handler's string annotations were written against."""
    target = func
    while True:
        if isinstance(target, functools.partial):
            target = target.func
        elif hasattr(target, "__wrapped__"):
            target = target.__wrapped__
        elif hasattr(target, "__func__"):
            target = target.__func__
        else:
            break
    found = getattr(target, "__globals__", None)
    if found is None:  # a callable object: its class's __call__ was written there
        found = getattr(type(target).__call__, "__globals__", None)
    return found if isinstance(found, dict) else {}


def _evaluate(annotation: object, globalns: dict[str, Any]) -> object:
    """Resolve one annotation; a string goes through ``typing.get_type_hints``.

    Resolving parameter by parameter (rather than the whole function at once)
    means that an unrelated annotation that does not resolve, such as a type
    imported only under ``TYPE_CHECKING``, does not stop the others.
    """
    if not isinstance(annotation, str):
        return annotation
    holder = types.SimpleNamespace(__annotations__={"value": annotation})
    return typing.get_type_hints(holder, globalns=globalns)["value"]


def _is_files(annotation: object, globalns: dict[str, Any], files_types: tuple[type, ...]) -> bool:
    resolved = annotation
    if isinstance(annotation, str):
        try:
            resolved = _evaluate(annotation, globalns)
        except Exception:
            # Typically ``files: TaskFiles`` with TaskFiles imported under TYPE_CHECKING.
            tail = annotation.strip().rsplit(".", 1)[-1]
            return any(t.__name__ == tail for t in files_types)
    return isinstance(resolved, type) and issubclass(resolved, files_types)


def _is_async(func: Callable[..., Any]) -> bool:
    if inspect.iscoroutinefunction(func):
        return True
    call = getattr(func, "__call__", None)  # noqa: B004 - an object with an async __call__
    return inspect.iscoroutinefunction(call)


def inspect_handler(
    func: Callable[..., Any],
    *,
    name: str,
    task_type: str | None,
    files_types: tuple[type, ...],
) -> HandlerSpec:
    """Read a handler's signature; TypeError, naming the handler, if it cannot be called.

    The first positional parameter receives the params. String annotations
    (``from __future__ import annotations``) are resolved against the
    handler's module globals; a TaskFiles annotation that cannot be resolved
    is recognised by the class name of one of ``files_types``. A params type
    defined inside a function cannot be resolved from a string annotation:
    that is reported here, at declaration, not on the first task.
    """
    if not callable(func):
        raise TypeError(f"handler {name!r}: {func!r} is not callable")
    if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
        raise TypeError(f"handler {name!r} is a generator: it must return its result, not yield it")
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"handler {name!r}: cannot read its signature ({exc})") from None

    parameters = list(signature.parameters.values())
    if not parameters or parameters[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
        inspect.Parameter.VAR_POSITIONAL,
    ):
        raise TypeError(
            f"handler {name!r} must take the task's params as its first positional "
            f"parameter, as in `async def handler(params: dict, **kwargs)`"
        )
    globalns = _globals_of(func)
    first, rest = parameters[0], parameters[1:]

    params_type: object = dict
    params_arg: str | None = None
    if first.kind is not inspect.Parameter.VAR_POSITIONAL:
        params_arg = first.name
        if first.annotation is not inspect.Parameter.empty:
            try:
                params_type = _evaluate(first.annotation, globalns)
            except Exception as exc:
                raise TypeError(
                    f"handler {name!r}: cannot resolve the annotation {first.annotation!r} of "
                    f"its params parameter {first.name!r} ({type(exc).__name__}: {exc}); "
                    f"define the type at module level"
                ) from None

    files = [p.name for p in rest if _is_files(p.annotation, globalns, files_types)]
    if len(files) > 1:
        raise TypeError(
            f"handler {name!r} has more than one TaskFiles parameter: {', '.join(files)}"
        )
    files_arg = files[0] if files else None

    for p in rest:
        if p.default is not inspect.Parameter.empty or p.kind in _VAR_KINDS:
            continue
        if p.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise TypeError(
                f"handler {name!r}: positional-only parameter {p.name!r} has no default, "
                f"and the worker passes nothing but the params positionally"
            )
        if p.name != files_arg and p.name not in HANDLER_KWARGS:
            raise TypeError(
                f"handler {name!r}: parameter {p.name!r} has no default and the worker "
                f"does not supply it (it supplies {', '.join(sorted(HANDLER_KWARGS))} "
                f"and a TaskFiles object)"
            )

    return HandlerSpec(
        name=name,
        task_type=task_type,
        func=func,
        is_async=_is_async(func),
        params_type=params_type,
        files_arg=files_arg,
        accepts_var_kwargs=any(p.kind is inspect.Parameter.VAR_KEYWORD for p in rest),
        accepted_kwargs=frozenset(p.name for p in rest if p.kind in _KEYWORD_KINDS),
        params_arg=params_arg,
    )


# --------------------------------------------------------------------------- binding


class _Problems(Exception):
    """What is wrong with the params, as readable phrases."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _json_kind(value: object) -> str:
    """The JSON name of what arrived, as the sender would say it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "an array"
    return f"a {type(value).__name__}"


def _quoted(names: list[str]) -> str:
    return ", ".join(repr(n) for n in names)


def _dataclass_in(annotation: object) -> type | None:
    """The dataclass an annotation names directly or as ``X | None``, if any."""
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        return _dataclass_in(args[0])
    return None


def _nested(annotation: object, value: object, path: str, problems: list[str]) -> object:
    """Build nested dataclasses: a field typed ``D``, ``D | None`` or ``list[D]``."""
    inner = _dataclass_in(annotation)
    if inner is not None and isinstance(value, Mapping):
        return _build_collecting(inner, value, path, problems)
    if typing.get_origin(annotation) is list and isinstance(value, list):
        (item_type,) = typing.get_args(annotation) or (None,)
        item_class = _dataclass_in(item_type)
        if item_class is not None:
            return [
                _build_collecting(item_class, item, f"{path}[{i}]", problems)
                if isinstance(item, Mapping)
                else item
                for i, item in enumerate(value)
            ]
    return value


def _build_collecting(cls: type, data: Mapping[Any, Any], path: str, problems: list[str]) -> object:
    try:
        return _build(cls, data, path)
    except _Problems as exc:
        problems.extend(exc.problems)
        return None


def _build(cls: type, data: Mapping[Any, Any], path: str) -> object:
    """Instantiate dataclass ``cls`` from ``data`` or raise _Problems listing every fault."""
    prefix = f"{path}." if path else ""
    parameters = inspect.signature(cls).parameters
    accepted = {n: p for n, p in parameters.items() if p.kind in _KEYWORD_KINDS}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # a field annotation that does not resolve: no nesting for this class
        hints = {}

    problems: list[str] = []
    kwargs: dict[str, object] = {}
    unknown: list[str] = []
    for key, value in data.items():
        if isinstance(key, str) and (key in accepted or open_ended):
            kwargs[key] = _nested(hints.get(key), value, prefix + key, problems)
        else:
            unknown.append(prefix + str(key))
    missing = [
        prefix + n
        for n, p in accepted.items()
        if p.default is inspect.Parameter.empty and n not in data
    ]
    if missing:
        problems.append(f"missing field(s) {_quoted(missing)}")
    if unknown:
        problems.append(f"unknown field(s) {_quoted(unknown)}")
    if problems:
        raise _Problems(problems)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, AssertionError) as exc:
        where = f" (at {path!r})" if path else ""
        raise _Problems([f"{cls.__name__}{where}: {exc}"]) from None


def _pydantic_model(annotation: object) -> Any:
    """The annotation if it is a pydantic model class, else None.

    pydantic is optional: it is looked up in ``sys.modules`` rather than
    imported, since a class cannot subclass ``BaseModel`` unless pydantic was
    imported to define it.
    """
    pydantic = sys.modules.get("pydantic")
    if pydantic is None or not isinstance(annotation, type):
        return None
    base = getattr(pydantic, "BaseModel", None)
    if isinstance(base, type) and issubclass(annotation, base):
        return annotation
    return None


def _pydantic_summary(exc: Any) -> str:
    """``loc: message`` for each pydantic error, without echoing the input values."""
    parts: list[str] = []
    for error in exc.errors(include_url=False, include_input=False):
        loc = ""
        for item in error.get("loc", ()):
            loc += f"[{item}]" if isinstance(item, int) else (f".{item}" if loc else str(item))
        parts.append(f"{loc}: {error.get('msg')}" if loc else str(error.get("msg")))
    return "; ".join(parts)


def bind_params(spec: HandlerSpec, params: object) -> object:
    """The params as the handler asked for them; TaskFailure(INVALID_INPUT_ERROR) if they don't fit.

    - ``dict`` (also ``Mapping``, ``Any``, no annotation, or an annotation we
      do not know how to build): the JSON object itself, unchanged.
    - a dataclass: instantiated with the object's fields; missing fields,
      unknown fields and a ``ValueError``/``TypeError``/``AssertionError``
      raised by ``__post_init__`` are all reported, fields named by their
      path (``inner.width``, ``items[2].name``). Fields typed with another
      dataclass, ``D | None`` or ``list[D]`` are built too. Field values are
      not type-checked: that is what pydantic is for.
    - a pydantic model: ``model_validate``, with a ``loc: msg`` summary of
      its errors.

    A missing (null) params is an empty object; anything else that is not a
    JSON object is invalid input.
    """
    if params is None:
        params = {}
    if not isinstance(params, Mapping):
        raise TaskFailure(
            INVALID_INPUT_ERROR,
            f"handler {spec.name!r}: params must be a JSON object, got {_json_kind(params)}",
        )
    target = spec.params_type
    if isinstance(target, type) and dataclasses.is_dataclass(target):
        try:
            return _build(target, params, "")
        except _Problems as exc:
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"handler {spec.name!r}: invalid params: {exc}"
            ) from None
    model = _pydantic_model(target)
    if model is not None:
        try:
            return model.model_validate(dict(params))
        except ValueError as exc:  # pydantic's ValidationError is a ValueError
            detail = _pydantic_summary(exc) if hasattr(exc, "errors") else str(exc)
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"handler {spec.name!r}: invalid params: {detail}"
            ) from None
        except TypeError as exc:
            raise TaskFailure(
                INVALID_INPUT_ERROR, f"handler {spec.name!r}: invalid params: {exc}"
            ) from None
    return params


def handler_kwargs(
    spec: HandlerSpec, available: Mapping[str, object], *, files: object = None
) -> dict[str, object]:
    """The keyword arguments to call the handler with.

    A handler with ``**kwargs`` gets everything in ``available`` (the
    reference SDK's calling convention); any other handler gets only the names
    it declares, so ``async def h(params, task_id)`` works. The files object
    goes to the parameter annotated with the TaskFiles type, whatever its
    name; pass it as ``files`` (or in ``available`` under ``spec.files_arg``).
    The params parameter's own name is never passed as a keyword.
    """
    if spec.accepts_var_kwargs:
        chosen = {k: v for k, v in available.items() if k != spec.params_arg}
    else:
        chosen = {k: v for k, v in available.items() if k in spec.accepted_kwargs}
    if spec.files_arg is not None and files is not None:
        chosen[spec.files_arg] = files
    return chosen
