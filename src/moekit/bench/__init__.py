"""Benchmarks, each a config dataclass registered by name and run as `moekit bench NAME`.

Every benchmark writes its results through `report.write_report`: a Markdown table and a JSON
file with the machine, GPU, versions, date and the command, in moekit-out/benchmarks/ by default.
"""

from typing import Any

from moekit.bench.registry import (
    argument,
    available_benches,
    bench_command,
    bench_spec,
    option,
    register_bench,
    run_bench,
    run_config,
)

_REPORT = ("Table", "machine_info", "write_report")  # matplotlib: loaded when a bench runs


def __getattr__(name: str) -> Any:
    if name in _REPORT:
        from moekit.bench import report

        return getattr(report, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Table",
    "argument",
    "available_benches",
    "bench_command",
    "bench_spec",
    "machine_info",
    "option",
    "register_bench",
    "run_bench",
    "run_config",
    "write_report",
]
