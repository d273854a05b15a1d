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
import re
import sys
import typing
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse import ActionYesNo, ArgumentParser, Namespace, get_loader

from moekit.commands import Command, command_spec, commands, groups, top_names
from moekit.config import migrated
from moekit.errors import missing_extra

# what a user can cause and fix: printed as one line, never as a traceback
USER_ERRORS = (
    argparse.ArgumentError,
    ValueError,  # bad values, configs and damaged checkpoints (CheckpointError) name the field
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    IsADirectoryError,
    PermissionError,
)


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


def _prepare_argv(argv: list[str]) -> list[str]:
    """The argv a command's own rewrite (`train CONFIG` -> `train --config CONFIG`) gives."""
    if not argv or argv[0].startswith("-"):
        return argv
    try:
        rewrite = command_spec(argv[0]).argv
    except ValueError:  # a group or an unknown name: the parser tells
        return argv
    return [argv[0], *rewrite(argv[1:])] if rewrite else argv


def _migrate_config_files(argv: list[str]) -> list[str]:
    """argv with each `--config FILE` of a nested config (`train`) that holds old keys (flat
    router or task options) given as the text of the new ones; each move warned in one line."""
    try:
        spec = command_spec(argv[0]) if argv and not argv[0].startswith("-") else None
    except ValueError:  # a group or an unknown name: the parser tells
        return argv
    fields = dataclasses.fields(spec.config) if spec else ()
    of = next((f.metadata["nested"] for f in fields if "nested" in f.metadata), None)
    if of is None:
        return argv
    out = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            out[i + 1] = _migrated_text(of, argv[i + 1])
        elif arg.startswith("--config="):
            out[i] = "--config=" + _migrated_text(of, arg.removeprefix("--config="))
    return out


def _migrated_text(of: type, given: str) -> str:
    """A config file of `of` with old keys -> YAML text of the new ones; else `given` as is."""
    path = Path(given)
    if not path.is_file():
        return given
    try:
        data = get_loader("yaml")(path.read_text())  # read as the parser reads it
    except yaml.YAMLError:  # the parser names what is wrong
        return given
    with warnings.catch_warnings(record=True) as moved:
        warnings.simplefilter("always")
        new = migrated(of, data)
    for warning in moved:
        print(f"moekit: warning: {given}: {warning.message}", file=sys.stderr)
    return given if new == data else yaml.safe_dump(new, sort_keys=False)


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


def _one_line(err: BaseException) -> str:
    """An error message on one line; a parser's long type report cut to what was expected."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    given = [line for line in lines if line.startswith("Given value:")]
    expected = re.findall(r"Expected a <class '([\w.]+)'>", text)
    if given and expected:
        return f"{lines[0]} expected {' or '.join(expected)}; {given[0].lower()}"
    return " ".join(lines) or type(err).__name__


def _no_cuda(err: Exception) -> str | None:
    """What to say when a command asked for CUDA on a machine where torch sees none."""
    torch = sys.modules.get("torch")
    if (
        torch is None
        or not isinstance(err, AssertionError | RuntimeError)
        or "CUDA" not in str(err)
    ):
        return None
    if torch.cuda.is_available():
        return None
    return (
        f"this needs a CUDA GPU and torch {torch.__version__} sees none here; "
        "run it where there is one, or on the CPU (--device cpu, --train.device cpu)"
    )


def _os_error(err: OSError) -> str | None:
    """'PATH: exists and is not a directory' where a folder was asked for and a file is there."""
    if isinstance(err, FileExistsError | NotADirectoryError) and err.filename is not None:
        return f"{err.filename}: exists and is not a directory (a folder is needed here)"
    return None


def _error_line(err: Exception, spec: Command | None, command: str | None) -> str | None:
    """The one line for what a user can fix (a missing extra too); None for a bug."""
    advice = missing_extra(err, command) if isinstance(err, ModuleNotFoundError) else None
    advice = advice or _no_cuda(err) or (_os_error(err) if isinstance(err, OSError) else None)
    if advice is not None:
        return f"moekit: error: {advice}"
    if spec is not None and isinstance(err, spec.refusals):
        return f"moekit {spec.name}: error: {err}"
    return f"moekit: error: {_one_line(err)}" if isinstance(err, USER_ERRORS) else None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(argv) if argv is not None else sys.argv[1:]
    spec = None
    try:
        prepared = _migrate_config_files(_prepare_argv(argv))
        parser = build_parser(prepared)
        for p in _parsers(parser):  # errors come back here, not as usage text and exit
            p.exit_on_error = False
        spec, options = _chosen(parser.parse_args(prepared))
        spec.run(_build(spec.config, options))
    except KeyboardInterrupt as stop:  # a command's own message says what to run to resume
        print(f"moekit: {stop}" if str(stop) else "moekit: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        line = _error_line(err, spec, argv[0] if argv else None)
        if line is None:
            raise
        print(line, file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
