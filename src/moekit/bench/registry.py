"""Benchmarks by name: each is a config dataclass and the function whose keywords it holds.

`@register_bench("name", NameBench)` on a function makes `moekit bench name` a command
(`moekit.commands`): it parses the fields of NameBench as options (help from `option(...)`),
validates them by building the dataclass, calls the function with them and prints the
report. Built-in benchmarks load on first lookup.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from moekit.commands import argument as argument  # a bench's fields: as any command's
from moekit.commands import command, group, register_once, require_dataclass
from moekit.commands import option as option

_BUILTIN = (
    "layer",
    "kernels",
    "tune",
    "serve",
    "memory",
    "librarian",
    "expert_parallel",
    "hf",
    "train",
    "moe_vs_dense",
    "system",
)
_BENCHES: dict[str, BenchSpec] = {}
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class BenchSpec:
    name: str
    config: type  # a dataclass; its fields are the keyword arguments of `run`
    run: Callable[..., dict[str, Any]]

    @property
    def help(self) -> str:
        return (self.config.__doc__ or self.name).strip().splitlines()[0]

    def command(self, cfg: Any) -> None:
        """`moekit bench NAME`: run with a built config, print the table and the files written."""
        report = run_config(self.name, cfg)
        if report.get("markdown"):
            print(report["markdown"])
        for path in report.get("files", []):
            print(f"wrote {path}")
        if report.get("chart"):
            print(f"wrote {report['chart']['file']}")


def register_bench(name: str, config: type) -> Callable[[F], F]:
    """Function decorator adding a benchmark under `name`, configured by `config`."""
    require_dataclass("bench", name, config)

    def wrap(fn: F) -> F:
        register_once(_BENCHES, "bench", BenchSpec(name, config, fn))
        return fn

    return wrap


def _load_builtin() -> None:
    for module in _BUILTIN:
        importlib.import_module(f"moekit.bench.{module}")


def _register_commands() -> None:
    for name in available_benches():
        spec = _BENCHES[name]
        command(f"bench {name}", spec.config, help=spec.help)(spec.command)


group(
    "bench",
    "Benchmarks. Each writes a .md table, a .json (machine, GPU, versions, date, command) "
    "and a .png chart to --out-dir, moekit-out/benchmarks/ by default. Lists are written [1,8,32].",
    load=_register_commands,
)


def available_benches() -> tuple[str, ...]:
    _load_builtin()
    return tuple(sorted(_BENCHES))


def bench_spec(name: str) -> BenchSpec:
    """The benchmark registered as `name`; a ValueError naming it otherwise."""
    _load_builtin()
    if name not in _BENCHES:
        raise ValueError(f"bench {name!r} is not one of {tuple(sorted(_BENCHES))}")
    return _BENCHES[name]


def run_bench(name: str, **options: Any) -> dict[str, Any]:
    """Validates `options` by building the bench's config, then runs the bench with them."""
    return run_config(name, bench_spec(name).config(**options))


def run_config(name: str, cfg: Any) -> dict[str, Any]:
    """Runs bench `name` with the fields of its (already validated) config as keywords."""
    return bench_spec(name).run(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})


def _cli_value(value: Any) -> str:
    if isinstance(value, list | tuple):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    text = str(getattr(value, "name", value))
    return text if text and " " not in text else repr(text)


def bench_command(name: str, **values: Any) -> str:
    """The `moekit bench NAME ...` line that reproduces a run: positionals and changed options."""
    parts = ["moekit", "bench", name]
    for f in dataclasses.fields(bench_spec(name).config):
        if f.name not in values:
            continue
        value = values[f.name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            parts.append(_cli_value(value))
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        flag = f.name.replace("_", "-")
        if _cli_value(value) == _cli_value(default):
            continue
        if isinstance(value, bool):
            parts.append(f"--{flag}" if value else f"--no-{flag}")
        else:
            parts += [f"--{flag}", _cli_value(value)]
    return " ".join(parts)
