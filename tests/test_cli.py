import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import moekit.commands
from moekit.cli import build_parser, main
from moekit.commands import command_spec
from moekit.commands.argv import prepare_argv
from moekit.config import LEGACY_ROUTER_KEYS
from moekit.routing import build_options
from moekit.routing.sinkhorn import SinkhornOptions
from moekit.train import RunConfig, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
TINY = str(ROOT / "configs" / "signals-tiny.yaml")
FAST = [
    "--train.steps",
    "4",
    "--train.eval_interval",
    "2",
    "--train.live",
    "off",
    "--task.val_sequences",
    "16",
]


def _moekit(*args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "moekit.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=kw.get("cwd"),
        timeout=kw.get("timeout", 120),
    )


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses_into_a_valid_run(path):
    args = build_parser().parse_args(["train", "--config", str(path)])
    cfg = RunConfig(**{k: yaml.safe_load(path.read_text())[k] for k in ("task", "model", "train")})
    assert args.train.task.name == cfg.task.name
    assert cfg.model.max_seq_len >= cfg.task.seq_len


def test_names_in_configs_list():
    assert {p.name for p in CONFIGS} >= {
        "signals-tiny.yaml",
        "trajectories-tiny.yaml",
        "text-small.yaml",
    }


@pytest.mark.parametrize(
    "extra, key",
    [
        (["--train.bogus", "1"], "train.bogus"),
        (["--train.steps", "abc"], "train.steps"),
        (["--model.moe.k", "20"], "k=20"),
        (["--train.precision", "fp8"], "train.precision"),
        (["--model.max_seq_len", "8"], "model.max_seq_len"),
        (["--task.options.nois", "0.1"], "task.options.nois"),
        (["--task.options.noise", "2"], "task.options.noise=2"),
        (["--task.name", "nope"], "task.name='nope'"),
    ],
)
def test_bad_values_fail_before_training_naming_the_key(tmp_path, capsys, extra, key):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", TINY, "--out", str(tmp_path / "run"), *extra])
    assert exit_info.value.code != 0
    assert key in capsys.readouterr().err
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_key_in_yaml_is_named(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task:\n  name: signals\n  sequence_len: 3\n")
    with pytest.raises(SystemExit):
        main(["train", str(bad), "--out", str(tmp_path / "run")])
    assert "sequence_len" in capsys.readouterr().err


@pytest.mark.parametrize(
    "router, warning",
    [
        ("sinkhorn_iters: 5", "router.sinkhorn_iters is now router.options.iters"),
        ("options: {iters: 5}", None),
    ],
)
def test_train_reads_a_yaml_with_old_or_new_router_keys(
    tmp_path, monkeypatch, capsys, router, warning
):
    path = tmp_path / "run.yaml"
    path.write_text(
        f"task:\n  name: signals\n  noise: 0.2\nmodel:\n  moe:\n    router:\n"
        f"      kind: sinkhorn\n      {router}\n"
    )
    seen = []  # the built command config, instead of training
    train = dataclasses.replace(command_spec("train"), run=seen.append)
    monkeypatch.setitem(moekit.commands._COMMANDS, "train", train)
    main(["train", str(path), "--out", str(tmp_path / "run"), "--train.steps", "3"])
    run = seen[0].run
    rcfg = run.model.moe.router
    assert build_options(rcfg.kind, rcfg.options) == SinkhornOptions(iters=5)
    assert run.task.options == {"noise": 0.2} and run.train.steps == 3  # flat task key too
    err = capsys.readouterr().err
    assert err == (f"moekit: warning: {path}: {warning}\n" if warning else "")


def test_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for option in ("--train.steps", "--model.moe.n_experts", "--task.name", "--out", "--resume"):
        assert option in text
    assert "default: 1000" in text  # train.steps
    assert "--task.options" in text and "text (max_bytes, val_every" in " ".join(text.split())
    for old in [*LEGACY_ROUTER_KEYS, "task.noise", "task.max_bytes"]:  # migrated, never offered
        assert old not in text


def test_argv_normalisation():
    assert prepare_argv(["train", "c.yaml", "--resume"]) == [
        "train",
        "--config",
        "c.yaml",
        "--resume",
        "auto",
    ]
    assert prepare_argv(["plot", "x"]) == ["plot", "x"]


def test_train_eval_generate_plot_end_to_end(tmp_path):
    run = tmp_path / "run"
    r = _moekit("train", TINY, "--out", str(run), *FAST)
    assert r.returncode == 0, r.stderr
    final = json.loads(r.stdout.splitlines()[0])
    assert final["step"] == 4
    assert [c["step"] for c in list_checkpoints(run / "checkpoints")][-1] == 4
    assert (run / "plots" / "dashboard.png").exists()

    r = _moekit("eval", str(run))
    assert r.returncode == 0, r.stderr
    evaluated = json.loads(r.stdout)
    assert evaluated["mse"] == pytest.approx(
        min(
            json.loads(line)["mse"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
            if '"eval"' in line
        ),
        rel=1e-5,
    )

    r = _moekit("generate", str(run), "--prompt", "0.1,0.2,0.3", "--max-new", "5")
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.strip().split(";")) == 5

    (run / "plots" / "dashboard.png").unlink()
    r = _moekit("plot", str(run))
    assert r.returncode == 0 and (run / "plots" / "dashboard.png").exists()


def test_sigterm_writes_checkpoint_exits_zero_and_resumes(tmp_path):
    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "moekit.cli",
        "train",
        TINY,
        "--out",
        str(run),
        "--train.steps",
        "100000",
        "--train.live",
        "plain",
        "--train.log_interval",
        "1",
        "--task.val_sequences",
        "16",
    ]
    proc = subprocess.Popen(
        args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    for line in proc.stdout:  # wait until a few steps have run
        if "step 3/" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped by signal" in out
    (ckpt,) = list_checkpoints(run / "checkpoints")
    assert ckpt["step"] >= 3
    time.sleep(0.1)
    r = _moekit(
        "train",
        TINY,
        "--out",
        str(run),
        "--train.steps",
        str(ckpt["step"] + 2),
        "--train.live",
        "off",
        "--task.val_sequences",
        "16",
        "--resume",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[0])["step"] == ckpt["step"] + 2


_HELP_IMPORTS = """
import sys
from moekit.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = [m for m in ("matplotlib", "moekit.bench.layer", "moekit.viz") if m in sys.modules]
print("heavy:", heavy, file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]])
def test_help_lists_every_command_with_a_word_and_loads_no_plotting(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-c", _HELP_IMPORTS, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.stderr.strip().splitlines()[-1] == "heavy: []"
    if argv == ["--help"]:
        listed = proc.stdout.split("Available subcommands:")[1].splitlines()
        names = [line.split()[0] for line in listed if line.startswith("    ") and line[4] != " "]
        assert "train" in names and "bench" in names and len(names) >= 13
        for line in listed:  # every name has its help on the same line
            if line.startswith("    ") and line[4] != " ":
                assert len(line.split()) > 1, line


def test_a_parser_for_one_command_builds_only_its_options():
    parser = build_parser(["eval", "ck"])
    usage = {name: sub.format_usage() for name, sub in parser._subcommands_action.choices.items()}
    assert "--batch-size" in usage["eval"] and "--max-new" not in usage["generate"]
    assert build_parser(["eval", "ck"]).parse_args(["eval", "ck"]).eval.batch_size == 64
