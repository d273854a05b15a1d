"""The subcommands that wrap other packages parse and reach their library functions."""

import importlib.metadata
import socket

import pytest

from moekit import cli


def test_serve_and_bench_serve_parse():
    args = cli.build_parser().parse_args(["serve", "ck", "--port", "9001", "--max-batch", "4"])
    assert args.command == "serve" and args.serve.port == 9001 and args.serve.max_batch == 4
    args = cli.build_parser().parse_args(["bench", "serve", "ck", "--concurrency", "[1, 8]"])
    assert args.bench.serve.concurrency == [1, 8]


def test_serve_passes_engine_options(monkeypatch):
    seen = {}
    import moekit.serve

    monkeypatch.setattr(moekit.serve, "run_server", lambda ckpt, **kw: seen.update(kw, ckpt=ckpt))
    cli.main(["serve", "ck", "--max-queue", "3", "--threads", "1"])
    assert seen == {
        "ckpt": "ck",
        "host": "127.0.0.1",
        "port": 8080,
        "device": "auto",
        "threads": 1,
        "max_queue": 3,
    }


def test_serve_passes_the_served_model_name(monkeypatch):
    seen = {}
    import moekit.serve

    monkeypatch.setattr(moekit.serve, "run_server", lambda ckpt, **kw: seen.update(kw))
    cli.main(["serve", "ck", "--served-model-name", "tiny-moe"])
    assert seen["served_model_name"] == "tiny-moe"


def test_serve_on_a_taken_port_is_one_line_before_the_checkpoint_loads(tmp_path, capsys):
    with socket.socket() as held:  # another process's listener, as far as the server can tell
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:  # no checkpoint there: never reached
            cli.main(["serve", str(tmp_path / "absent"), "--port", str(port), "--device", "cpu"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"moekit: error: port {port} on 127.0.0.1 is already in use; stop what holds it,"
        " choose another port, or give port 0 for a free one"
    )


def test_version_prints_the_package_version(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"moekit {importlib.metadata.version('moekit')}\n"

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", not_installed)  # a source checkout
    import moekit

    assert cli.version() == moekit.__version__


def test_bench_librarian_writes_its_report(tmp_path):
    cli.main(["bench", "librarian", "--tokens", "64", "--out-dir", str(tmp_path)])
    assert list(tmp_path.glob("librarian-*.md"))


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit):
        cli.main(["bench", "nope"])


def test_grouped_subcommands_parse_their_options():
    parse = cli.build_parser().parse_args
    args = parse(["convert", "hf-to-moekit", "hf", "mk", "--max-seq-len", "8", "--dtype", "bf16"])
    assert args.convert["hf-to-moekit"].as_dict() == {
        "hf_dir": "hf",
        "out": "mk",
        "max_seq_len": 8,
        "dtype": "bf16",
    }
    args = parse(["convert", "moekit-to-hf", "mk", "hf", "--dtype", "fp16"])
    assert args.convert["moekit-to-hf"].as_dict() == {"ckpt": "mk", "out": "hf", "dtype": "fp16"}
    args = parse(["finance", "demo", "--seeds", "2", "--tickers", "[SPY]"])
    assert args.finance.demo.seeds == 2 and args.finance.demo.tickers == ["SPY"]
    assert parse(["bench", "librarian", "--tokens", "64"]).bench.librarian.tokens == 64
