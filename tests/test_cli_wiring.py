"""The subcommands that wrap other packages parse and reach their library functions."""

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
