"""Action inputs as a frozen dataclass: declaring them, describing them, building them.

An action declares its inputs as a frozen dataclass. Each field becomes one
``InputField`` of the action's schema: ``str`` -> STRING, ``int`` -> INTEGER,
``float`` -> NUMBER, ``bool`` -> BOOLEAN, ``Literal["a", "b"]`` or an
``enum.Enum`` of string values -> ENUM, and ``X | None`` makes ``X`` optional.
A field is required when it has no default and is not optional. Bounds and the
description come from :func:`Input`. Anything else is refused when the action
is defined, not when it is first called.
"""

from __future__ import annotations

import dataclasses
import enum
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from actionmesh.rpc.convert import python_to_input_value
from actionmesh.rpc.errors import ActionMeshError, FieldViolation, InvalidArgument
from actionmesh.rpc.schema import validate_inputs
from actionmesh.v1 import common_pb2

_META_KEY = "actionmesh.input"


class ProviderDefinitionError(Exception):
    """A provider or action is declared wrongly; raised where it is declared."""


@dataclass(frozen=True)
class InputSpec:
    """What :func:`Input` attaches to a dataclass field."""

    description: str = ""
    min_length: int | None = None
    max_length: int | None = None
    minimum: float | None = None
    maximum: float | None = None


def Input(
    default: Any = dataclasses.MISSING,
    *,
    description: str = "",
    min_length: int | None = None,
    max_length: int | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> Any:
    """Declare one input field with its description and bounds.

    Without ``default`` the input is required (unless annotated ``X | None``)::

        reason: str = Input(description="Why a retry is safe now", min_length=3, max_length=200)
        limit: int = Input(10, description="How many", minimum=1, maximum=100)

    ``min_length``/``max_length`` apply to ``str``; ``minimum``/``maximum`` to
    ``int`` and ``float``; misplaced bounds are refused when the action is defined.
    """
    spec = InputSpec(
        description=description,
        min_length=min_length,
        max_length=max_length,
        minimum=minimum,
        maximum=maximum,
    )
    return dataclasses.field(default=default, metadata={_META_KEY: spec})


@dataclass(frozen=True)
class NoInputs:
    """The inputs of an action that takes none."""


@dataclass(frozen=True)
class InputBinding:
    """How one dataclass field maps onto one declared input."""

    name: str
    proto: common_pb2.InputField
    # Set for enum.Enum fields, so the handler gets a member, not its value.
    enum_type: type[enum.Enum] | None
    has_default: bool
    optional: bool


@dataclass(frozen=True)
class InputModel:
    """The input schema of one action, derived from its inputs dataclass."""

    cls: type[Any]
    bindings: tuple[InputBinding, ...]

    @property
    def fields(self) -> list[common_pb2.InputField]:
        return [b.proto for b in self.bindings]

    def build(self, values: Mapping[str, common_pb2.InputValue]) -> tuple[Any, dict[str, Any]]:
        """Validate proto inputs and build the dataclass (defaults filled in).

        Returns the instance and its plain values (defaults included, enum
        members as their values), so an omitted default and the same value sent
        explicitly describe the same request.
        """
        sent = validate_inputs(self.fields, values)
        kwargs: dict[str, Any] = {}
        for binding in self.bindings:
            if binding.name in sent:
                value: Any = sent[binding.name]
                if binding.enum_type is not None:
                    value = binding.enum_type(value)
                kwargs[binding.name] = value
            elif not binding.has_default and binding.optional:
                kwargs[binding.name] = None
        try:
            instance = self.cls(**kwargs)
        except (ValueError, TypeError) as exc:
            # Cross-field checks in __post_init__: the author's message is shown,
            # so authors must word it as a rule, not echo the values.
            raise InvalidArgument(
                "inputs were rejected by the action's own validation",
                reason="INVALID_INPUT",
                violations=[FieldViolation("inputs", str(exc)[:200] or type(exc).__name__)],
            ) from exc
        plain = {}
        for binding in self.bindings:
            value = getattr(instance, binding.name)
            plain[binding.name] = value.value if isinstance(value, enum.Enum) else value
        return instance, plain


def _unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            return rest[0], True
        return annotation, False
    return annotation, False


def _input_type(
    where: str, annotation: Any
) -> tuple[common_pb2.InputType.ValueType, list[str], type[enum.Enum] | None]:
    """The proto type, allowed values and enum class for one field annotation."""
    if annotation is bool:
        return common_pb2.INPUT_TYPE_BOOLEAN, [], None
    if annotation is int:
        return common_pb2.INPUT_TYPE_INTEGER, [], None
    if annotation is float:
        return common_pb2.INPUT_TYPE_NUMBER, [], None
    if annotation is str:
        return common_pb2.INPUT_TYPE_STRING, [], None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        if not choices or not all(isinstance(c, str) for c in choices):
            raise ProviderDefinitionError(f"{where}: Literal inputs must list strings only")
        return common_pb2.INPUT_TYPE_ENUM, list(choices), None
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        values = [member.value for member in annotation]
        if not values or not all(isinstance(v, str) for v in values):
            raise ProviderDefinitionError(f"{where}: enum {annotation.__name__} needs str values")
        return common_pb2.INPUT_TYPE_ENUM, values, annotation
    raise ProviderDefinitionError(
        f"{where}: unsupported input type {annotation!r}; use str, int, float, bool, "
        "Literal[str, ...], an Enum of str values, or one of these | None"
    )


def _apply_spec(where: str, field: common_pb2.InputField, spec: InputSpec) -> None:
    field.description = spec.description
    is_text = field.type == common_pb2.INPUT_TYPE_STRING
    is_number = field.type in (common_pb2.INPUT_TYPE_INTEGER, common_pb2.INPUT_TYPE_NUMBER)
    for name in ("min_length", "max_length"):
        bound = getattr(spec, name)
        if bound is None:
            continue
        if not is_text:
            raise ProviderDefinitionError(f"{where}: {name} applies to str inputs only")
        if isinstance(bound, bool) or not isinstance(bound, int) or bound < 0:
            raise ProviderDefinitionError(f"{where}: {name} must be a non-negative int")
        setattr(field, name, bound)
    for name in ("minimum", "maximum"):
        bound = getattr(spec, name)
        if bound is None:
            continue
        if not is_number:
            raise ProviderDefinitionError(f"{where}: {name} applies to int and float inputs only")
        if isinstance(bound, bool) or not isinstance(bound, int | float):
            raise ProviderDefinitionError(f"{where}: {name} must be a number")
        setattr(field, name, float(bound))


def _check_default(where: str, binding: InputBinding, default: Any) -> None:
    """A default must itself satisfy the declared type and bounds."""
    if default is None and binding.optional:
        return
    python = default.value if isinstance(default, enum.Enum) else default
    kind = binding.proto.type
    ok_type = {
        common_pb2.INPUT_TYPE_BOOLEAN: isinstance(python, bool),
        common_pb2.INPUT_TYPE_INTEGER: isinstance(python, int) and not isinstance(python, bool),
        common_pb2.INPUT_TYPE_NUMBER: isinstance(python, int | float)
        and not isinstance(python, bool),
        common_pb2.INPUT_TYPE_STRING: isinstance(python, str),
        common_pb2.INPUT_TYPE_ENUM: isinstance(python, str),
    }[kind]
    if not ok_type:
        raise ProviderDefinitionError(f"{where}: default {default!r} does not match its type")
    try:
        validate_inputs([binding.proto], {binding.name: python_to_input_value(python)})
    except ActionMeshError as exc:
        rules = "; ".join(v.description for v in exc.violations)
        raise ProviderDefinitionError(f"{where}: default {default!r} {rules}") from None


def input_model(cls: Any, *, owner: str) -> InputModel:
    """Derive the input schema of ``cls``; raise ProviderDefinitionError if unsupported."""
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise ProviderDefinitionError(f"{owner}: inputs must be a frozen dataclass, got {cls!r}")
    params = getattr(cls, "__dataclass_params__", None)
    if params is None or not params.frozen:
        raise ProviderDefinitionError(
            f"{owner}: inputs dataclass {cls.__name__} must be declared @dataclass(frozen=True)"
        )
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise ProviderDefinitionError(
            f"{owner}: cannot resolve the annotations of {cls.__name__}: {exc}"
        ) from exc

    bindings: list[InputBinding] = []
    for f in dataclasses.fields(cls):
        where = f"{owner}: input {cls.__name__}.{f.name}"
        if not f.init:
            raise ProviderDefinitionError(f"{where}: init=False fields cannot be inputs")
        base, optional = _unwrap_optional(hints[f.name])
        kind, allowed, enum_type = _input_type(where, base)
        has_default = (
            f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        )
        proto = common_pb2.InputField(
            name=f.name,
            type=kind,
            required=not has_default and not optional,
            allowed_values=allowed,
        )
        spec = f.metadata.get(_META_KEY)
        if spec is not None:
            _apply_spec(where, proto, spec)
        binding = InputBinding(
            name=f.name,
            proto=proto,
            enum_type=enum_type,
            has_default=has_default,
            optional=optional,
        )
        if f.default is not dataclasses.MISSING:
            _check_default(where, binding, f.default)
        bindings.append(binding)
    return InputModel(cls=cls, bindings=tuple(bindings))
