"""Every benchmark is a config dataclass registered in the one CLI."""

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest

from moekit import cli
from moekit.bench import (
    Table,
    available_benches,
    bench_command,
    bench_spec,
    option,
    register_bench,
    write_report,
)

EVERY = {
    "layer",
    "kernels",
    "tune",
    "tune-backward",
    "profile",
    "serve",
    "memory",
    "librarian",
    "expert-parallel",
}


def test_every_benchmark_is_registered_and_its_config_fits_its_function():
    assert set(available_benches()) >= EVERY
    for name in available_benches():
        spec = bench_spec(name)
        params = inspect.signature(spec.run).parameters
        for f in dataclasses.fields(spec.config):
            assert f.name in params, (name, f.name)
            assert f.metadata.get("help"), (name, f.name)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["serve", "ck", "--concurrency", "[1,8]"], {"ckpt": "ck", "concurrency": [1, 8]}),
        (["memory", "--sizes", "[50, 300]", "--top-k", "3"], {"sizes": [50, 300], "top_k": 3}),
        (["kernels", "--graph", "--shapes", "[mixtral]"], {"graph": True, "shapes": ["mixtral"]}),
        (["kernels", "--no-graph", "--tokens", "[1,16]"], {"graph": False, "tokens": [1, 16]}),
        (["tune-backward", "--classes", "[large]"], {"classes": ["large"]}),
        (["profile", "--tokens", "128"], {"tokens": 128}),
        (["tune", "--out", "t.json"], {"out": "t.json"}),
        (["expert-parallel", "--small", "--out-dir", ""], {"small": True, "out_dir": ""}),
        (["layer", "--device", "cuda", "--repeats", "3"], {"device": "cuda", "repeats": 3}),
    ],
)
def test_options_parse_with_one_list_syntax(argv, expected):
    args = cli.build_parser().parse_args(["bench", *argv])
    parsed = args.bench[argv[0]].as_dict()
    assert {k: parsed[k] for k in expected} == expected
    bench_spec(argv[0]).config(**parsed)  # and the config accepts them


def test_the_recorded_command_parses_back_to_the_same_options():
    options = {"ckpt": "runs/x", "concurrency": [1, 4], "random_init": True, "threads": 2}
    command = bench_command("serve", **options)
    assert command == "moekit bench serve runs/x --concurrency [1,4] --threads 2 --random-init"
    args = cli.build_parser().parse_args(command.split()[1:])
    assert {k: args.bench.serve[k] for k in options} == options


@pytest.mark.parametrize(
    "argv, named",
    [
        (["layer", "--repeats", "0"], "repeats=0"),
        (["layer", "--shapes", "[huge]"], "shapes=['huge']"),
        (["memory", "--sizes", "[]"], "sizes=[]"),
        (["kernels", "--shapes", "[gpt]"], "shapes=['gpt']"),
        (["expert-parallel", "--dtype", "fp8"], "dtype='fp8'"),
    ],
)
def test_bad_options_stop_before_running_naming_the_option(capsys, argv, named):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", *argv])
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err


@dataclass
class CountBench:
    """Counts to n (a benchmark defined outside moekit)."""

    n: int = option(3, "how far to count")
    out_dir: str = option("", "directory of the .md and .json ('' writes none)")


@register_bench("test-count", CountBench)
def count(n: int = 3, out_dir: str = "") -> dict:
    table = Table(("i", "square"), [(i, i * i) for i in range(n)])
    return write_report(
        "count", "Count", bench_command("test-count", n=n), [table], {"n": n}, out_dir=out_dir
    )


def test_a_benchmark_registered_outside_runs_through_the_cli(tmp_path, capsys):
    cli.main(["bench", "test-count", "--n", "4", "--out-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| 3 | 9 |" in out and "`moekit bench test-count --n 4`" in out
    (js,) = tmp_path.glob("count-*.json")
    assert f"wrote {js}" in out and json.loads(js.read_text())["n"] == 4


def test_python_m_module_is_the_cli_subcommand(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "moekit.bench.librarian", "--tokens", "16", "--out-dir", ""],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "`moekit bench librarian --tokens 16`" in r.stdout
    assert "| pairs, noise 0 | 0.99 |" in r.stdout and "wrote" not in r.stdout


def test_the_cli_builds_without_the_optional_extras():
    blocked = ("httpx", "fastapi", "uvicorn", "scipy", "triton", "pandas", "arch")
    code = (
        "import builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        f"    if name.split('.')[0] in {blocked!r}:\n"
        "        raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "from moekit.cli import build_parser\n"
        "build_parser().parse_args(['bench', 'serve', 'ck'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
