"""Commands by name: each is a config dataclass and the function that runs it.

`@command("name", NameConfig, help=...)` beside what a command runs makes `moekit name` parse
the fields of NameConfig as options (help from `option(...)`), build the dataclass (its
`__post_init__` refuses bad values) and call the function with it. A name of several words
("bench layer") nests under a `group`. The command modules listed below load on first lookup;
a group's own commands (every benchmark) only when that group is looked into.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

# every module holding a `@command`, in the order `moekit --help` lists them
_BUILTIN = (
    "moekit.demos.demo",
    "moekit.commands.run",
    "moekit.commands.runs",
    "moekit.profiling",
    "moekit.sweep",
    "moekit.commands.serve",
    "moekit.demos.layer_demo",
    "moekit.bench.registry",
    "moekit.demos.finance_demo",
    "moekit.commands.hf",
)
_COMMANDS: dict[str, Command] = {}
_GROUPS: dict[str, Group] = {}
_TOP: dict[str, None] = {}  # first words in the order they were registered
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Command:
    name: str  # words: "train", "bench layer", "convert hf-to-moekit"
    config: type  # a dataclass; its fields are the options
    run: Callable[[Any], Any]  # called with the built config
    help: str
    argv: Callable[[list[str]], list[str]] | None = None  # rewrites what follows the name
    refusals: tuple[type[BaseException], ...] = ()  # errors told as `moekit NAME: error: ...`


@dataclass(frozen=True)
class Group:
    name: str
    help: str
    load: Callable[[], Any] | None = None  # registers the group's built-in commands
    loaded: list[bool] = dataclasses.field(default_factory=list)  # [True] once `load` ran


def option(default: Any, help: str, *, repeat: bool = False) -> Any:
    """A config field given as `--name VALUE`; `repeat`: `--name A --name B` makes a list."""
    meta = {"help": help, "repeat": repeat}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def argument(help: str, *, flag: bool = False) -> Any:
    """A required config field, given positionally (`moekit NAME VALUE`) or as a `flag`."""
    return dataclasses.field(metadata={"help": help, "flag": flag})


def nested(of: type, help: str) -> Any:
    """A field holding a whole config read from YAML (--config) and dotted options."""
    return dataclasses.field(metadata={"help": help, "nested": of})


def given(of: type) -> Any:
    """A field holding those options of dataclass `of` given on the command line (a dict)."""
    return dataclasses.field(default_factory=dict, metadata={"given": of})


def command(
    name: str,
    config: type,
    help: str,
    argv: Callable[[list[str]], list[str]] | None = None,
    refusals: tuple[type[BaseException], ...] = (),
) -> Callable[[F], F]:
    """Function decorator adding `moekit NAME`, configured by the dataclass `config`."""
    require_dataclass("command", name, config)

    def wrap(fn: F) -> F:
        if register_once(_COMMANDS, "command", Command(name, config, fn, help, argv, refusals)):
            _TOP.setdefault(name.split()[0])
        return fn

    return wrap


def require_dataclass(what: str, name: str, config: type) -> None:
    if not dataclasses.is_dataclass(config):
        raise TypeError(f"config of {what} {name!r} must be a dataclass, got {config!r}")


def register_once(table: dict[str, Any], what: str, entry: Any) -> bool:
    """table[entry.name] = entry, unless `entry.run` is a `python -m` copy (False: the
    imported module registers); a name another function holds is a ValueError."""
    if entry.run.__module__ == "__main__":
        return False
    known = table.get(entry.name)
    if known is not None and known.run != entry.run:  # == : a bound method registered again
        raise ValueError(f"{what} {entry.name!r} is already registered by {known.run.__qualname__}")
    table[entry.name] = entry
    return True


def group(name: str, help: str, load: Callable[[], Any] | None = None) -> None:
    """`moekit NAME ...`: a command whose subcommands are registered as "NAME SUB"."""
    _GROUPS[name] = Group(name, help, load)
    _TOP.setdefault(name)


def _load_builtin(groups: tuple[str, ...] | None = None) -> None:
    """Import the command modules, then load the built-in commands of `groups` (None: all)."""
    for module in _BUILTIN:
        importlib.import_module(module)
    for g in list(_GROUPS.values()):
        if g.load is not None and not g.loaded and (groups is None or g.name in groups):
            g.loaded.append(True)
            g.load()


def top_names() -> tuple[str, ...]:
    """The first words of every command and group, in the order `moekit --help` lists them."""
    _load_builtin(())
    return tuple(_TOP)


def commands(groups: tuple[str, ...] | None = None) -> tuple[Command, ...]:
    """Registered commands in the order `moekit --help` lists them: top-level ones as
    registered, the subcommands of a group by name; those of `groups` only when given."""
    _load_builtin(groups)
    top = list(_TOP)

    def order(c: Command) -> tuple[int, str]:
        first, _, rest = c.name.partition(" ")
        return top.index(first), rest

    return tuple(sorted(_COMMANDS.values(), key=order))


def groups() -> dict[str, Group]:
    """The groups by name (their commands not loaded)."""
    _load_builtin(())
    return dict(_GROUPS)


def command_spec(name: str) -> Command:
    """The command registered as `name`; a ValueError naming it otherwise."""
    _load_builtin((name.split()[0],))
    if name not in _COMMANDS:
        raise ValueError(f"command {name!r} is not one of {tuple(_COMMANDS)}")
    return _COMMANDS[name]
