"""What the parser is given: a command's own argv rewrite, and old config files migrated.

`moekit train CONFIG` becomes `train --config CONFIG`; a YAML that still holds old keys (flat
router or task options) is handed on as the text of the new ones, each move warned in one line.
"""

from __future__ import annotations

import dataclasses
import sys
import warnings
from pathlib import Path

import yaml
from jsonargparse import get_loader

from moekit.commands import command_spec
from moekit.config import migrated


def prepare_argv(argv: list[str]) -> list[str]:
    """argv after its command's rewrite, with old config files migrated."""
    return _migrate_config_files(_rewrite(argv))


def _rewrite(argv: list[str]) -> list[str]:
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
