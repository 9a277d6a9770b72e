"""Handler signatures read at declaration; params bound per task; keyword arguments chosen."""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rca_core._errors import INVALID_INPUT_ERROR, TaskFailure
from rca_core._params import (
    HANDLER_KWARGS,
    HandlerSpec,
    bind_params,
    handler_kwargs,
    inspect_handler,
)

if TYPE_CHECKING:
    from decimal import Decimal as Phantom  # only for type checkers: unresolvable at run time


class TaskFiles:
    """Stands in for an adapter's TaskFiles class."""


class SpecialFiles(TaskFiles):
    pass


FILES = (TaskFiles,)


def spec_of(func: Any, name: str = "h") -> HandlerSpec:
    return inspect_handler(func, name=name, task_type=None, files_types=FILES)


@dataclass
class Resize:
    width: int
    height: int
    mode: str = "fit"
    tags: list[str] = field(default_factory=list)
    computed: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.width <= 0 or self.height <= 0:
            raise ValueError("Width and height must be positive.")
        if self.mode == "typeerror":
            raise TypeError("mode cannot be 'typeerror'")
        if self.mode == "assert":
            raise AssertionError("mode cannot be 'assert'")
        if self.mode == "keyerror":
            raise KeyError("a bug, not bad input")


@dataclass
class Point:
    x: int
    y: int

    def __post_init__(self) -> None:
        if self.x < 0:
            raise ValueError("x must be >= 0")


@dataclass
class Shape:
    name: str
    origin: Point
    corner: Point | None = None
    points: list[Point] = field(default_factory=list)
    plain: list[int] = field(default_factory=list)
    raw: dict[str, Any] = field(default_factory=dict)


@dataclass
class WithInitVar:
    a: int
    scale: InitVar[int]

    def __post_init__(self, scale: int) -> None:
        self.a *= scale


@dataclass
class WithPhantom:
    amount: Phantom  # does not resolve at run time: no nesting, no failure


@dataclass(init=False)
class OpenEnded:
    known: int = 0

    def __init__(self, known: int = 0, **extra: Any) -> None:
        self.known = known
        self.extra = extra


class ResizeModel(pydantic.BaseModel):
    width: int = pydantic.Field(gt=0)
    height: int = pydantic.Field(gt=0)
    source_url: str


class Inner(pydantic.BaseModel):
    values: list[int]


class Outer(pydantic.BaseModel):
    inner: Inner

    @pydantic.model_validator(mode="after")
    def check(self) -> Outer:
        if sum(self.inner.values) > 100:
            raise ValueError("too much in total")
        return self


class Picky(pydantic.BaseModel):
    a: int

    @pydantic.field_validator("a")
    @classmethod
    def no_seven(cls, v: int) -> int:
        if v == 7:
            raise TypeError("seven is a type of its own")
        return v


class PlainValueError(pydantic.BaseModel):
    @classmethod
    def model_validate(cls, obj: Any, **kwargs: Any) -> PlainValueError:
        raise ValueError("rejected without pydantic's help")


# --------------------------------------------------------------------------- inspect_handler


async def dict_handler(params: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
    return {}


async def resize_handler(params: Resize, files: TaskFiles, *, task_id: str) -> dict[str, Any]:
    return {}


def sync_handler(params, task_id, job_id=None):  # type: ignore[no-untyped-def]
    return {}


def test_a_reference_style_handler() -> None:
    spec = inspect_handler(dict_handler, name="resize", task_type="gpu", files_types=FILES)
    assert spec == HandlerSpec(
        name="resize",
        task_type="gpu",
        func=dict_handler,
        is_async=True,
        params_type=dict[str, Any],
        files_arg=None,
        accepts_var_kwargs=True,
        accepted_kwargs=frozenset(),
        params_arg="params",
    )


def test_string_annotations_are_resolved_and_files_found_by_type() -> None:
    spec = spec_of(resize_handler)
    assert spec.params_type is Resize
    assert spec.files_arg == "files"
    assert spec.accepted_kwargs == {"files", "task_id"}
    assert not spec.accepts_var_kwargs


def test_sync_handler_without_annotations() -> None:
    spec = spec_of(sync_handler)
    assert spec.is_async is False
    assert spec.params_type is dict
    assert spec.accepted_kwargs == {"task_id", "job_id"}


def test_a_subclass_of_the_files_type_is_recognised() -> None:
    def handler(params: dict[str, Any], out: SpecialFiles) -> None: ...

    assert spec_of(handler).files_arg == "out"


def test_an_unresolvable_files_annotation_is_matched_by_class_name() -> None:
    def handler(params: dict[str, Any], files: Any) -> None: ...

    handler.__annotations__["files"] = "somewhere_else.TaskFiles"
    assert spec_of(handler).files_arg == "files"
    handler.__annotations__["files"] = "NotFiles"
    with pytest.raises(TypeError, match="parameter 'files' has no default"):
        spec_of(handler)


def test_an_unrelated_unresolvable_annotation_does_not_matter() -> None:
    def handler(
        params: dict[str, Any], task_id: Phantom, files: TaskFiles | None = None
    ) -> None: ...

    spec = spec_of(handler)
    assert spec.files_arg is None  # an Optional[TaskFiles] is not looked into
    assert spec.accepted_kwargs == {"task_id", "files"}


def test_two_files_parameters_are_refused() -> None:
    def handler(params: dict[str, Any], a: TaskFiles, b: TaskFiles) -> None: ...

    with pytest.raises(TypeError, match="handler 'h' has more than one TaskFiles parameter: a, b"):
        spec_of(handler)


def test_an_unresolvable_params_annotation_is_reported_at_declaration() -> None:
    def handler(params: Phantom) -> None: ...

    with pytest.raises(TypeError, match=r"handler 'h': cannot resolve the annotation 'Phantom'"):
        spec_of(handler)


@pytest.mark.parametrize(
    "func",
    [
        lambda: None,
        lambda *, params: None,
        lambda **kwargs: None,
    ],
)
def test_a_handler_without_a_positional_params_parameter_is_refused(func: Any) -> None:
    with pytest.raises(TypeError, match="handler 'h' must take the task's params as its first"):
        spec_of(func)


def test_star_args_takes_the_params() -> None:
    def handler(*args: Any, **kwargs: Any) -> None: ...

    spec = spec_of(handler)
    assert spec.params_type is dict
    assert spec.params_arg is None
    assert spec.accepts_var_kwargs


def test_a_required_argument_the_worker_does_not_supply_is_refused() -> None:
    def handler(params: dict[str, Any], database: Any) -> None: ...

    with pytest.raises(TypeError, match="handler 'h': parameter 'database' has no default"):
        spec_of(handler)


def test_a_required_positional_only_argument_is_refused() -> None:
    def handler(params: dict[str, Any], task_id: str, /) -> None: ...

    with pytest.raises(TypeError, match="positional-only parameter 'task_id' has no default"):
        spec_of(handler)


def test_optional_extra_arguments_are_fine() -> None:
    def handler(params: dict[str, Any], extra: int = 1, /, *rest: Any, opt: int = 2) -> None: ...

    assert spec_of(handler).accepted_kwargs == {"opt"}


def test_every_known_kwarg_may_be_required() -> None:
    def handler(
        params: dict[str, Any],
        task_id: str,
        job_id: str,
        priority: int,
        send_progress: Any,
        add_to_hot_cache: Any,
        remove_from_hot_cache: Any,
        tracing_context: Any,
        params_metadata: Any,
    ) -> None: ...

    assert spec_of(handler).accepted_kwargs == HANDLER_KWARGS


def test_not_callable_and_generators_are_refused() -> None:
    with pytest.raises(TypeError, match="handler 'h': 5 is not callable"):
        spec_of(5)

    def gen(params: dict[str, Any]) -> Any:
        yield 1

    async def agen(params: dict[str, Any]) -> Any:
        yield 1

    for func in (gen, agen):
        with pytest.raises(TypeError, match="is a generator: it must return its result"):
            spec_of(func)


def test_an_unreadable_signature_is_reported() -> None:
    with pytest.raises(TypeError, match="handler 'h': cannot read its signature"):
        spec_of(int)


class AsyncCallable:
    async def __call__(self, params: Resize) -> None: ...


class SyncCallable:
    def __call__(self, params: Resize) -> None: ...

    def method(self, params: Resize) -> None: ...


def _decorate(func: Any) -> Any:
    @functools.wraps(func)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        return await func(*args, **kwargs)

    return wrapper


@_decorate
async def decorated(params: Resize, files: TaskFiles) -> None: ...


async def _partial_target(params: Resize, scale: int) -> None: ...


@pytest.mark.parametrize(
    ("func", "is_async"),
    [
        (AsyncCallable(), True),
        (SyncCallable(), False),
        (SyncCallable().method, False),
        (decorated, True),
        (functools.partial(_partial_target, scale=2), True),
    ],
)
def test_other_callables_resolve_against_their_module(func: Any, is_async: bool) -> None:
    spec = spec_of(func)
    assert spec.params_type is Resize
    assert spec.is_async is is_async


def test_a_builtin_callable_has_no_globals_and_takes_dicts() -> None:
    spec = spec_of(len)
    assert spec.params_type is dict
    assert spec.is_async is False


# --------------------------------------------------------------------------- bind_params


def bind(handler: Any, params: object) -> Any:
    return bind_params(spec_of(handler), params)


def invalid(handler: Any, params: object) -> str:
    with pytest.raises(TaskFailure) as info:
        bind(handler, params)
    assert info.value.code == INVALID_INPUT_ERROR
    return info.value.message


def untyped(params):  # type: ignore[no-untyped-def]
    return None


def any_typed(params: Any) -> None: ...


def mapping_typed(params: Mapping[str, Any]) -> None: ...


def str_typed(params: str) -> None: ...


def resize(params: Resize) -> None: ...


def shape(params: Shape) -> None: ...


def with_initvar(params: WithInitVar) -> None: ...


def with_phantom(params: WithPhantom) -> None: ...


def open_ended(params: OpenEnded) -> None: ...


def resize_model(params: ResizeModel) -> None: ...


def outer_model(params: Outer) -> None: ...


def picky_model(params: Picky) -> None: ...


def plain_value_error(params: PlainValueError) -> None: ...


@pytest.mark.parametrize("handler", [dict_handler, untyped, any_typed, mapping_typed, str_typed])
def test_dict_like_and_unknown_annotations_get_the_object_itself(handler: Any) -> None:
    params = {"a": 1}
    assert bind(handler, params) is params


def test_null_params_are_an_empty_object() -> None:
    assert bind(untyped, None) == {}
    assert (
        invalid(resize, None) == "handler 'h': invalid params: missing field(s) 'width', 'height'"
    )


@pytest.mark.parametrize(
    ("params", "kind"),
    [
        ([1], "an array"),
        ("x", "a string"),
        (3, "a number"),
        (1.5, "a number"),
        (True, "a boolean"),
        ({1}, "a set"),
    ],
)
def test_params_that_are_not_an_object_are_invalid_input(params: object, kind: str) -> None:
    assert invalid(untyped, params) == f"handler 'h': params must be a JSON object, got {kind}"


def test_a_dataclass_is_instantiated() -> None:
    bound = bind(resize, {"width": 2, "height": 3, "tags": ["a"]})
    assert bound == Resize(width=2, height=3, tags=["a"])


def test_missing_and_unknown_fields_are_all_reported() -> None:
    message = invalid(resize, {"width": 1, "depth": 3, "computed": 5, 7: "x"})
    assert message == (
        "handler 'h': invalid params: missing field(s) 'height'; "
        "unknown field(s) 'depth', 'computed', '7'"
    )


@pytest.mark.parametrize(
    ("mode", "text"),
    [
        ("fit", "Resize: Width and height must be positive."),
        ("typeerror", "Resize: mode cannot be 'typeerror'"),
        ("assert", "Resize: mode cannot be 'assert'"),
    ],
)
def test_post_init_errors_are_invalid_input(mode: str, text: str) -> None:
    width = 0 if mode == "fit" else 1
    assert invalid(resize, {"width": width, "height": 1, "mode": mode}) == (
        f"handler 'h': invalid params: {text}"
    )


def test_other_post_init_exceptions_are_bugs_and_propagate() -> None:
    with pytest.raises(KeyError):
        bind(resize, {"width": 1, "height": 1, "mode": "keyerror"})


def test_nested_dataclasses_are_built() -> None:
    bound = bind(
        shape,
        {
            "name": "tri",
            "origin": {"x": 0, "y": 0},
            "corner": {"x": 1, "y": 1},
            "points": [{"x": 2, "y": 3}, "not-an-object"],
            "plain": [1, 2],
            "raw": {"x": 1},
        },
    )
    assert bound.origin == Point(x=0, y=0)
    assert bound.corner == Point(x=1, y=1)
    assert bound.points == [Point(x=2, y=3), "not-an-object"]
    assert bound.plain == [1, 2]
    assert bound.raw == {"x": 1}
    assert bind(shape, {"name": "n", "origin": {"x": 0, "y": 0}, "corner": None}).corner is None


def test_nested_problems_name_the_path() -> None:
    message = invalid(
        shape,
        {
            "name": "tri",
            "origin": {"x": 0},
            "corner": {"x": 0, "y": 0, "z": 1},
            "points": [{"x": 1, "y": 1}, {"x": -1, "y": 0}],
        },
    )
    assert message == (
        "handler 'h': invalid params: missing field(s) 'origin.y'; unknown field(s) 'corner.z'; "
        "Point (at 'points[1]'): x must be >= 0"
    )


def test_init_vars_are_parameters_too() -> None:
    assert bind(with_initvar, {"a": 2, "scale": 3}).a == 6
    assert "missing field(s) 'scale'" in invalid(with_initvar, {"a": 2})


def test_a_dataclass_whose_hints_do_not_resolve_is_still_built() -> None:
    assert bind(with_phantom, {"amount": "1.5"}).amount == "1.5"


def test_a_dataclass_with_its_own_var_keyword_init_takes_any_field() -> None:
    bound = bind(open_ended, {"known": 1, "other": 2})
    assert (bound.known, bound.extra) == (1, {"other": 2})


def test_a_pydantic_model_is_validated() -> None:
    bound = bind(resize_model, {"width": "5", "height": 2, "source_url": "s3://b/k"})
    assert bound == ResizeModel(width=5, height=2, source_url="s3://b/k")


def test_pydantic_errors_are_summarised_without_input_values() -> None:
    message = invalid(resize_model, {"width": 0, "height": 2, "secret": "hunter2"})
    assert message == (
        "handler 'h': invalid params: width: Input should be greater than 0; "
        "source_url: Field required"
    )
    message = invalid(outer_model, {"inner": {"values": [1, "x"]}})
    assert message.endswith(
        "inner.values[1]: Input should be a valid integer, unable to parse string as an integer"
    )
    message = invalid(outer_model, {"inner": {"values": [60, 50]}})
    assert message == "handler 'h': invalid params: Value error, too much in total"


def test_other_pydantic_exceptions_are_invalid_input() -> None:
    assert (
        invalid(picky_model, {"a": 7}) == "handler 'h': invalid params: seven is a type of its own"
    )
    assert (
        invalid(plain_value_error, {})
        == "handler 'h': invalid params: rejected without pydantic's help"
    )


def test_pydantic_is_only_looked_up_never_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "pydantic")
    params = {"width": 0}
    assert bind(resize_model, params) is params  # cannot be a model if pydantic is not loaded
    assert "pydantic" not in sys.modules
    monkeypatch.setitem(sys.modules, "pydantic", types.SimpleNamespace())  # no BaseModel
    assert bind(resize_model, params) is params


@given(st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=4), max_size=5))
def test_binding_a_dataclass_either_builds_it_or_fails_as_invalid_input(
    params: dict[str, Any],
) -> None:
    spec = spec_of(resize)
    try:
        bound = bind_params(spec, params)
    except TaskFailure as exc:
        assert exc.code == INVALID_INPUT_ERROR
        assert exc.message.startswith("handler 'h': ")
    else:
        assert isinstance(bound, Resize)


# --------------------------------------------------------------------------- handler_kwargs

AVAILABLE: dict[str, object] = {name: f"<{name}>" for name in sorted(HANDLER_KWARGS)}


def test_var_kwargs_handlers_get_everything() -> None:
    assert handler_kwargs(spec_of(dict_handler), AVAILABLE) == AVAILABLE


def test_the_params_name_is_never_passed_as_a_keyword() -> None:
    def handler(task_id: dict[str, Any], **kwargs: Any) -> None: ...

    chosen = handler_kwargs(spec_of(handler), AVAILABLE)
    assert "task_id" not in chosen
    assert len(chosen) == len(AVAILABLE) - 1


def test_other_handlers_get_only_what_they_declare_and_the_files_object() -> None:
    files = TaskFiles()
    spec = spec_of(resize_handler)
    assert handler_kwargs(spec, AVAILABLE, files=files) == {"task_id": "<task_id>", "files": files}
    assert handler_kwargs(spec, AVAILABLE) == {"task_id": "<task_id>"}
    assert handler_kwargs(spec, {**AVAILABLE, "files": files}) == {
        "task_id": "<task_id>",
        "files": files,
    }


def test_the_files_object_is_not_passed_to_a_handler_without_a_files_parameter() -> None:
    assert handler_kwargs(spec_of(sync_handler), AVAILABLE, files=TaskFiles()) == {
        "task_id": "<task_id>",
        "job_id": "<job_id>",
    }


def test_annotations_that_are_already_objects_are_used_as_they_are() -> None:
    def handler(params, files):  # type: ignore[no-untyped-def]
        return None

    handler.__annotations__.update(params=Resize, files=TaskFiles)
    spec = spec_of(handler)
    assert spec.params_type is Resize
    assert spec.files_arg == "files"
