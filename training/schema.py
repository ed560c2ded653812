"""Check a resolved config against a recipe's schema before any work starts.

A recipe declares its top-level keys as a dataclass (see `TrainConfig`). A key that is not in
it, a value of the wrong type, or a missing required value is a `ConfigError`. Keys holding a
`_component_` are checked against the component's own signature: an argument it does not take,
a required argument that neither the config nor the recipe supplies, or a value whose type
contradicts the annotation fails too, naming the full key (`optimizer.lrr`) and the file.

Ranges are declared once, in the annotation, so every schema (and every component whose
signature uses them) is checked the same way: `batch_size: Annotated[int, Range(ge=1)] = 2`.
A value outside its range is a `ConfigError` naming the key, the bound and the file.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import inspect
import operator
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from tunewright.training.config import ConfigError
from tunewright.training.instantiate import COMPONENT_KEY, is_component, resolve_component


def component(*, supplied: tuple[str, ...] = (), required: bool = False) -> Any:
    """A schema field holding a `_component_` node; `supplied` are the arguments the recipe
    passes at run time (e.g. `params` for an optimizer), so the config need not set them."""
    meta = {"component": True, "supplied": supplied}
    if required:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=None, metadata=meta)


def needs(key: str, default: Any) -> Any:
    """A schema field that only means something when `key` is set (not null): setting it
    without `key` is a `ConfigError`, e.g. `lora_alpha` on a full fine-tune (no `lora_rank`)."""
    return dataclasses.field(default=default, metadata={"needs": key})


@dataclass(frozen=True)
class Range:
    """Bounds of a number: `Annotated[int, Range(ge=1)]`. `hint` says what to write instead,
    e.g. "null: no limit" for a key where null, not 0, turns a limit off."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    hint: str = ""

    def problem(self, value: float) -> str | None:
        """Why `value` is out of range (None when it is in range); NaN is never in range."""
        bounds = [(sign, bound, test) for sign, bound, test in (
            (">=", self.ge, operator.ge), (">", self.gt, operator.gt),
            ("<=", self.le, operator.le), ("<", self.lt, operator.lt)) if bound is not None]
        if all(test(value, bound) for _, bound, test in bounds) and value == value:  # NaN != NaN
            return None
        text = " and ".join(f"{sign} {bound if isinstance(bound, int) else f'{bound:g}'}"
                            for sign, bound, _ in bounds) or "a number"
        return f"must be {text}" + (f" ({self.hint})" if self.hint else "")


@dataclass(frozen=True)
class Matches:
    """A string of a given form: `Annotated[str, Matches(r"cpu|cuda(:\\d+)?", "cpu or cuda:N")]`."""

    pattern: str
    description: str

    def problem(self, value: str) -> str | None:
        return None if re.fullmatch(self.pattern, value) else f"must be {self.description}"


PositiveInt = Annotated[int, Range(ge=1)]  # sizes, counts, steps, cadences


def out_of_range(value: Any, tp: Any) -> str | None:
    """Why `value` (which `matches(value, tp)`) breaks a `Range`/`Matches` in `tp`, or None."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        base, *extras = typing.get_args(tp)
        for extra in extras:
            problem = getattr(extra, "problem", None)
            found = problem(value) if callable(problem) else None
            if found:
                return found
        return out_of_range(value, base)
    if origin in (Union, types.UnionType):
        arms = typing.get_args(tp)
        arm = next((a for a in arms if matches(value, a)), None)
        problem = None if arm is None else out_of_range(value, arm)
        if problem and type(None) in arms and "null" not in problem:
            problem += " or null"
        return problem
    if origin in (list, tuple, collections.abc.Sequence) and isinstance(value, (list, tuple)):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if len(args) == 1:
            return next((p for v in value if (p := out_of_range(v, args[0]))), None)
    return None


def _check_value(value: Any, tp: Any, key: str, source: str) -> None:
    if not matches(value, tp):
        raise ConfigError(f"{source}: key '{key}' must be {_type_name(tp)}, got {value!r}")
    problem = out_of_range(value, tp)
    if problem:
        raise ConfigError(f"{source}: key '{key}' {problem}, got {value!r}")


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if typing.get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def matches(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a type annotation; unknown annotations are accepted."""
    if tp is Any or tp is inspect.Parameter.empty or isinstance(tp, (str, typing.ForwardRef)):
        return True
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return matches(value, typing.get_args(tp)[0])
    if origin in (Union, types.UnionType):
        return any(matches(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if tp is type(None) or tp is None:
        return value is None
    if is_component(value):
        return True  # built at run time; its own signature is checked separately
    if getattr(tp, "__name__", "") == "Tensor":
        # torch annotates hyper-parameters as `float | Tensor`; from YAML only a number fits.
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (str, bool):
        return isinstance(value, tp)
    if origin in (list, tuple, collections.abc.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        return len(args) != 1 or all(matches(v, args[0]) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # torch types, callables, modules: cannot come from YAML, let the call decide


def _hints(obj: Any) -> dict[str, Any]:
    target = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable forward references in third-party code
        return {}


def check_component(node: dict, key: str, source: str, supplied: tuple[str, ...] = ()) -> None:
    fn = resolve_component(node[COMPONENT_KEY], where=f"{source}: key '{key}._component_'")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: the call itself will check
    params = sig.parameters
    takes_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    hints = _hints(fn)
    for arg, value in node.items():
        if arg == COMPONENT_KEY:
            continue
        full = f"{key}.{arg}"
        if arg not in params and not takes_kwargs:
            raise ConfigError(
                f"{source}: unknown key '{full}': {node[COMPONENT_KEY]} takes no argument "
                f"'{arg}'{_suggest(arg, named)}"
            )
        if arg in supplied:
            raise ConfigError(f"{source}: key '{full}' is set by the recipe; remove it")
        tp = hints.get(arg, params[arg].annotation if arg in params else Any)
        _check_value(value, tp, full, source)
        _check_nested(value, full, source)
    for name, p in params.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is not p.empty:
            continue
        if name not in node and name not in supplied:
            raise ConfigError(f"{source}: missing required key '{key}.{name}'")


def _check_nested(value: Any, key: str, source: str) -> None:
    if is_component(value):
        check_component(value, key, source)
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_nested(v, f"{key}.{k}", source)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_nested(v, f"{key}[{i}]", source)


def validate(cfg: dict[str, Any], schema: type, source: str) -> None:
    """Raise `ConfigError` on the first problem of `cfg` (a resolved plain dict) against `schema`."""
    fields = {f.name: f for f in dataclasses.fields(schema)}
    hints = typing.get_type_hints(schema, include_extras=True)
    for key in cfg:
        if key not in fields:
            raise ConfigError(f"{source}: unknown key '{key}'{_suggest(key, list(fields))}")
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if name not in cfg or cfg[name] is None:
            if required:
                raise ConfigError(f"{source}: missing required key '{name}'")
            continue
        value = cfg[name]
        if f.metadata.get("component"):
            if not is_component(value):
                raise ConfigError(
                    f"{source}: key '{name}' must be a mapping with a '{COMPONENT_KEY}' key"
                )
            check_component(value, name, source, f.metadata.get("supplied", ()))
        else:
            _check_value(value, hints[name], name, source)
        needed = f.metadata.get("needs")
        if needed is not None and cfg.get(needed) is None:
            raise ConfigError(f"{source}: key '{name}' needs '{needed}' to be set (it is null); "
                              f"set {needed} or remove {name}")


def build(cfg: dict[str, Any], schema: type) -> Any:
    """The validated config as the schema dataclass (component nodes stay plain dicts)."""
    return schema(**{k: v for k, v in cfg.items()})
