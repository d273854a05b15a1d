"""The `moekit` command: a parser built from each registered command's config dataclass.

Commands register themselves beside what they run (`moekit.commands.command`). A user's
mistake (a bad option, config, file or checkpoint, a missing extra) ends the command with one
line `moekit: error: ...` and exit code 2; usage text only with --help. Ctrl-C ends it with one
line saying what was interrupted and exit code 130, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import sys
import typing
from collections.abc import Iterator, Sequence
from typing import Any

from jsonargparse import ActionYesNo, ArgumentParser, Namespace

from moekit.commands import Command, command_spec, commands, groups, top_names
from moekit.commands.argv import prepare_argv
from moekit.commands.failures import error_line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _add_options(p: ArgumentParser, config: type) -> None:
    """One option per field of `config`: required fields positional, switches --x / --no-x."""
    hints = typing.get_type_hints(config)
    for f in dataclasses.fields(config):
        meta, hint = f.metadata, hints[f.name]
        help_text = meta.get("help", "")
        if "nested" in meta:  # a YAML file and dotted options: --task.name, --model.moe.k
            p.add_argument("--config", action="config", help=help_text)
            p.add_class_arguments(meta["nested"], None)
        elif "given" in meta:  # each field a flag; one left out keeps the dataclass default
            of_hints = typing.get_type_hints(meta["given"])
            for g in dataclasses.fields(meta["given"]):
                g_type, g_help = of_hints[g.name] | None, f"default {g.default}"
                p.add_argument(_flag(g.name), type=g_type, default=None, help=g_help)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if meta.get("flag"):
                p.add_argument(_flag(f.name), type=hint, required=True, help=help_text)
            else:
                p.add_argument(f.name, type=hint, help=help_text)
        elif meta.get("repeat"):
            p.add_argument(_flag(f.name), action="append", help=help_text)
        else:
            default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
            if hint is bool:
                action = ActionYesNo(no_prefix="no-")
                p.add_argument(_flag(f.name), action=action, default=default, help=help_text)
            else:
                p.add_argument(_flag(f.name), type=hint, default=default, help=help_text)


def _plain(value: Any) -> Any:
    """Parsed values -> plain dicts, so every dataclass is (re)built and validated here."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value.as_dict() if hasattr(value, "as_dict") else value


def _build(config: type, ns: Namespace) -> Any:
    """The command's config from what was parsed; its own checks raise ValueError."""
    values = {}
    for f in dataclasses.fields(config):
        if "nested" in f.metadata:
            of = f.metadata["nested"]
            values[f.name] = of(**{g.name: _plain(ns[g.name]) for g in dataclasses.fields(of)})
        elif "given" in f.metadata:
            names = (g.name for g in dataclasses.fields(f.metadata["given"]))
            values[f.name] = {n: ns[n] for n in names if ns[n] is not None}
        else:
            values[f.name] = ns[f.name]
    return config(**values)


def version() -> str:
    """The installed distribution's version; from a source tree, the package's own."""
    try:
        return importlib.metadata.version("moekit")
    except importlib.metadata.PackageNotFoundError:
        # moekit/__init__ ran before this module (a parent package loads first): no import edge
        return sys.modules["moekit"].__version__


def build_parser(argv: Sequence[str] | None = None) -> ArgumentParser:
    """`moekit` and a subcommand per registered command, groups ("bench", "convert") nesting.

    Given `argv`, only the command it names gets its options and only its group's commands
    load (the others keep their line of help), so `moekit --help` starts fast.
    """
    parser = ArgumentParser(prog="moekit", description="Mixture-of-Experts on PyTorch.")
    parser.add_argument(
        "--version",
        action="version",
        version=f"moekit {version()}",
        help="Show the version and exit.",
    )
    levels = {(): parser.add_subcommands(dest="command")}
    known_groups = groups()
    words = None if argv is None else [w for w in argv if not w.startswith("-")]

    def level(path: tuple[str, ...]) -> Any:
        if path not in levels:
            g = known_groups[" ".join(path)]
            p = ArgumentParser(description=g.help)
            level(path[:-1]).add_subcommand(path[-1], p, help=g.help)
            levels[path] = p.add_subcommands(dest=path[-1])  # after attaching p: jsonargparse
        return levels[path]

    specs = commands(None if words is None else tuple(words[:1]))
    for first in top_names():  # a group in its place of the listing, loaded or not
        if first in known_groups:
            level((first,))
        for spec in (s for s in specs if s.name.split()[0] == first):
            *path, name = spec.name.split()
            p = ArgumentParser(description=spec.help)
            if words is None or words[: len(path) + 1] == [*path, name]:
                _add_options(p, spec.config)
            level(tuple(path)).add_subcommand(name, p, help=spec.help)
    return parser


def _chosen(args: Namespace) -> tuple[Command, Namespace]:
    """The command the parsed arguments name, and its own options."""
    path, key, ns, nesting = [], "command", args, groups()
    while True:
        path.append(ns[key])
        key, ns = path[-1], ns[path[-1]]
        if " ".join(path) not in nesting:
            return command_spec(" ".join(path)), ns


def _parsers(parser: ArgumentParser) -> Iterator[ArgumentParser]:
    """`parser` and every subcommand parser below it."""
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    spec = None
    try:
        prepared = prepare_argv(argv)
        parser = build_parser(prepared)
        for p in _parsers(parser):  # errors come back here, not as usage text and exit
            p.exit_on_error = False
        spec, options = _chosen(parser.parse_args(prepared))
        spec.run(_build(spec.config, options))
    except KeyboardInterrupt as stop:  # a command's own message says what to run to resume
        print(f"moekit: {stop}" if str(stop) else "moekit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = error_line(err, spec, argv[0] if argv else None)
        if line is None:
            raise
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
