"""Constructor arguments checked by their type hints, and options named in the caller's terms.

Python callers get `MLMError`s that name the argument and what it expects (`MLMDataModule(batch_size='ten'):
expects int, got str`), not the `TypeError` of the first comparison that meets it. On the command line
jsonargparse has already checked the same hints, so this costs nothing there.

`option("data.tokenizer")` names an option as the caller knows it: `--data.tokenizer` on the command line (the CLI
calls `use_cli_terms()`), `MLMDataModule(tokenizer=...)` from Python. One rule can then be refused in both terms.
"""

from __future__ import annotations

import inspect
import numbers
import os
import types
import typing
from datetime import timedelta

from mlm_lightning.errors import MLMError

_CLASSES = {"model": "MLMModule", "data": "MLMDataModule", "trainer": "Trainer", "checkpoint": "MLMCheckpoint"}
_cli_terms = False


def use_cli_terms(on: bool = True) -> None:
    """Messages name options as command-line flags (the CLI's `main`, for as long as a command runs)."""
    global _cli_terms
    _cli_terms = on


def option(key: str, value: object = ...) -> str:
    """`data.tokenizer` as the caller knows it: `--data.tokenizer [value]` or `MLMDataModule(tokenizer=[value])`."""
    group, _, name = key.partition(".")
    if _cli_terms:
        shown = "" if value is ... else f" {_flag_value(value)}"
        return f"--{key}{shown}"
    shown = "..." if value is ... else repr(value)
    return f"{_CLASSES.get(group, group)}({name}={shown})"


class RecordsGivenArguments:
    """Records, as `given_arguments`, the names of the arguments a constructor call passed: options the caller gave
    always win over what another object brings (`MLMModule.pair_data`). A base class's `__new__`, so that
    jsonargparse still reads the options from `__init__` (it reads a class's own `__new__` instead)."""

    given_arguments: frozenset[str] = frozenset()

    def __new__(cls, *args, **kwargs):
        instance = super().__new__(cls)
        instance.__dict__["given_arguments"] = given_arguments(cls, args, kwargs)
        return instance


def given_arguments(cls, args: tuple, kwargs: dict) -> frozenset[str]:
    """The names of the arguments a constructor call passed (positional or by keyword), its defaults left out."""
    try:
        signature = inspect.signature(cls.__init__)
        bound = signature.bind_partial(None, *args, **kwargs).arguments
    except TypeError:  # (the constructor itself reports the bad call)
        return frozenset()
    names = set()
    for name, value in bound.items():
        kind = signature.parameters[name].kind
        # a subclass's `**kwargs` passed on to ours: the names inside it
        names |= set(value) if kind is inspect.Parameter.VAR_KEYWORD else {name}
    return frozenset(names - {"self"})


def fspaths(value):
    """A path argument as a str (and each item of a list of them): `pathlib.Path` works wherever a path does."""
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        return [fspaths(v) for v in value]
    return value


def _flag_value(value) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def check_arguments(owner: str, function, values: dict) -> None:
    """Raise `MLMError` for the first argument of `function` whose value does not fit its type hint."""
    hints = typing.get_type_hints(function)
    for name in inspect.signature(function).parameters:
        if name in hints and name in values and not fits(values[name], hints[name]):
            value = values[name]
            shown = repr(value) if len(repr(value)) <= 60 else f"{type(value).__name__} of {len(repr(value))} chars"
            raise MLMError(f"{owner}({name}={shown}): expects {describe(hints[name])}, got {type(value).__name__}")


def fits(value, hint) -> bool:
    """Does `value` fit `hint`? Numbers of any kind fit int/float (an int a float), a list fits a tuple; a bool is
    no number here. Hints this does not know are taken as fitting (the code checks what it needs)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is typing.Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(fits(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if hint is timedelta:
        return isinstance(value, timedelta)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(fits(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else typing.Any
        return all(fits(v, item) for v in value)
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is type(None):
        return "None"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(describe(a) for a in args)}]" if args else origin.__name__
    return getattr(hint, "__name__", str(hint))
