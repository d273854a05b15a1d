"""Bad command-line input: one line `moekit: error: ...` and exit code 2, no usage text."""

import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from tests.faults.conftest import CONFIG, ROOT, one_error, run_cli, train_args
from tests.tiny import tiny_model

from moekit.model.sampling_rules import SAMPLING_BOUNDS, check_sampling
from moekit.serve.schemas import GenerateRequest
from moekit.train.checkpoint import save_checkpoint


# generate ------------------------------------------------------------------------------------
def test_generate_on_a_continuous_model_asks_for_values_not_its_text_default(trained_run, capsys):
    code, _, err = run_cli(capsys, "generate", str(trained_run))
    assert code == 2 and "continuous model (d_in=1)" in one_error(err)
    code, _, err = run_cli(capsys, "generate", str(trained_run), "--prompt", "def ")
    assert code == 2 and "is not numbers" in one_error(err)


@pytest.mark.parametrize(
    "prompt, named",
    [("\udcff\udcfe", "not valid UTF-8"), ("", "--prompt is empty")],  # argv bytes 0xff 0xfe
    ids=["not-utf8", "empty"],
)
def test_text_prompt_that_is_not_text_is_refused(text_ckpt, capsys, prompt, named):
    code, _, err = run_cli(capsys, "generate", str(text_ckpt), "--prompt", prompt)
    assert code == 2 and named in one_error(err)


@pytest.mark.parametrize(
    "option, value",
    [
        ("--temperature", "-1"),
        ("--top-k", "0"),
        ("--max-new", "-3"),
        ("--top-p", "2"),
        ("--samples", "0"),
    ],
)
def test_sampling_options_are_checked(text_ckpt, capsys, option, value):
    code, out, err = run_cli(capsys, "generate", str(text_ckpt), "--prompt", "ab", option, value)
    assert code == 2 and one_error(err).startswith(f"moekit: error: {option}=") and not out


def test_generate_accepts_what_the_checks_allow(text_ckpt, capsys):
    argv = ["generate", str(text_ckpt), "--prompt", "ab", "--max-new", "3", "--samples", "2"]
    code, out, err = run_cli(capsys, *argv, "--top-k", "5", "--top-p", "1", "--temperature", "0")
    assert code == 0 and out.count("--- sample") == 2 and not err


def test_max_new_past_the_context_is_capped_with_one_note(text_ckpt, capsys, monkeypatch):
    from moekit.commands import run

    shown = []
    real = run._printer
    monkeypatch.setattr(run, "_printer", lambda first: shown.append(first) or real(first))
    argv = ["generate", str(text_ckpt), "--prompt", "ab", "--max-new", "100000000"]
    code, out, err = run_cli(capsys, *argv, "--temperature", "0")
    assert code == 0 and err.strip().splitlines() == [
        "moekit generate: --max-new 100000000 capped at 30: the prompt (2) and the "
        "continuation fit max_seq_len=32"
    ]
    assert shown == ["ab"]  # the prompt printed before the first token was sampled
    greedy = run.generate(run.Generate(str(text_ckpt), prompt="ab", max_new=30, temperature=0))
    assert out == greedy[0] + "\n" and len(greedy[0].encode()) >= 3


def test_a_prompt_that_fills_the_context_is_refused(text_ckpt, capsys):
    code, _, err = run_cli(capsys, "generate", str(text_ckpt), "--prompt", "x" * 32)
    assert code == 2 and "nothing is left to generate" in one_error(err)


_FIELDS = list(SAMPLING_BOUNDS)


@given(
    field=st.sampled_from(_FIELDS),
    value=st.one_of(st.integers(-(2**64), 2**64), st.floats(allow_nan=True)),
)
def test_cli_and_server_refuse_the_same_sampling_values(field, value):
    if field in ("max_new_tokens", "top_k", "seed"):
        value = int(value) if isinstance(value, int) else None
    if value is None:
        return
    try:
        GenerateRequest(prompt="a", **{field: value})
        server_ok = True
    except ValidationError:
        server_ok = False
    try:
        check_sampling({field: value})
        cli_ok = True
    except ValueError:
        cli_ok = False
    assert cli_ok == server_ok, (field, value)


# serve ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options, named",
    [
        (["--port", "99999"], "--port=99999"),
        (["--max-batch", "0"], "max_batch=0"),
        (["--device", "cuda"], "--device=cuda"),
        (["--device", "tpu9"], "--device='tpu9'"),
        (["--threads", "0"], "--threads=0"),
    ],
)
def test_serve_options_are_checked_first(trained_run, capsys, monkeypatch, options, named):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # as on a machine without a GPU
    code, _, err = run_cli(capsys, "serve", str(trained_run), *options)
    assert code == 2 and named in one_error(err)


def test_serve_a_checkpoint_that_is_not_there(tmp_path, capsys):
    code, _, err = run_cli(capsys, "serve", str(tmp_path / "nope"), "--port", "0")
    assert code == 2 and "no such checkpoint or run directory" in one_error(err)


def _without(monkeypatch, modules: list[str], prefix: str) -> None:
    """Make `modules` uninstalled and forget moekit's modules under `prefix` (all restored,
    their attributes on the parent package too, when the test ends)."""
    for name in [m for m in sys.modules if m.startswith(prefix)]:
        parent, _, child = name.rpartition(".")
        if hasattr(sys.modules.get(parent), child):
            monkeypatch.setattr(sys.modules[parent], child, sys.modules[name])
        monkeypatch.delitem(sys.modules, name)
    for name in modules:
        monkeypatch.setitem(sys.modules, name, None)  # import raises ModuleNotFoundError


def test_serve_without_the_serve_extra_names_the_install(trained_run, capsys, monkeypatch):
    _without(monkeypatch, ["fastapi", "uvicorn", "starlette", "prometheus_client"], "moekit.serve")
    code, _, err = run_cli(capsys, "serve", str(trained_run), "--port", "0")
    assert code == 2 and "pip install 'moekit[serve]'" in one_error(err)


def test_finance_without_its_extra_names_the_install(tmp_path, capsys, monkeypatch):
    _without(monkeypatch, ["pandas", "arch"], "moekit.tasks.finance")
    code, _, err = run_cli(capsys, "finance", "demo", "--out", str(tmp_path))
    assert code == 2 and "pip install 'moekit[finance]'" in one_error(err)


# configs and the command itself --------------------------------------------------------------
@pytest.mark.parametrize(
    "text, named",
    [("task:\n  name: [signals\n", "Problems parsing config"), ("tsak:\n  name: x\n", "tsak")],
    ids=["malformed", "unknown-key"],
)
def test_bad_yaml_is_one_line_without_usage(tmp_path, capsys, text, named):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    code, out, err = run_cli(capsys, "train", str(bad), "--out", str(tmp_path / "run"))
    assert code == 2 and named in one_error(err) and "usage" not in out + err


def test_usage_text_only_with_help(capsys):
    code, out, _ = run_cli(capsys, "eval", "--help")
    assert code == 0 and "usage" in out
    code, out, err = run_cli(capsys, "eval")
    assert code == 2 and "eval.path" in one_error(err) and not out


def test_python_dash_m_moekit_runs_the_command():
    r = subprocess.run(
        [sys.executable, "-m", "moekit", "train", CONFIG, "--train.steps=abc"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert one_error(r.stderr).endswith("Got value: abc") and not r.stdout


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine")
    code, _, err = run_cli(capsys, *train_args(taken, 1))
    assert code == 2 and f"{taken}: exists and is not a directory" in one_error(err)
    assert taken.read_text() == "mine"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize(
    "argv",
    [
        ["--train.device", "cuda"],
        ["bench", "layer", "--device", "cuda"],
        ["bench", "kernels"],
        ["bench", "profile"],
    ],
    ids=["train", "bench layer", "bench kernels", "bench profile"],
)
def test_cuda_without_a_gpu_is_one_line(tmp_path, capsys, argv):
    if argv[0] != "bench":
        argv = [*train_args(tmp_path / "run", 1), *argv]
    else:
        argv = [*argv, "--out-dir", str(tmp_path)]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2 and "needs a CUDA GPU" in one_error(err)


def test_a_checkpoint_without_a_tokenizer_says_so_and_takes_token_ids(tmp_path, capsys):
    model = tiny_model(0, vocab_size=300)  # not bytes, and no tokenizer files beside it
    ckpt = save_checkpoint(tmp_path, model, None, step=1)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--prompt", "hi")
    line = one_error(err)
    assert code == 2 and "has no tokenizer" in line and "--prompt-ids" in line
    argv = ["generate", str(ckpt), "--prompt-ids", "5,299,7", "--max-new", "4"]
    code, out, err = run_cli(capsys, *argv, "--temperature", "0")
    ids = [int(i) for i in out.strip().split(",")]
    assert code == 0 and not err and ids[:3] == [5, 299, 7] and len(ids) == 7
    assert all(0 <= i < 300 for i in ids)
    code, _, err = run_cli(capsys, "generate", str(ckpt), "--prompt-ids", "5,x")
    assert code == 2 and "--prompt-ids='5,x' is not integers" in one_error(err)
