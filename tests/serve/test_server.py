"""Start-up pieces: the listening port, the serve command's options, weights in a chosen dtype."""

from __future__ import annotations

import pytest
import torch

import moekit
from moekit import cli
from moekit.model import save_model_files
from moekit.serve.server import PortInUse, bind_socket, run_server

from .conftest import make_model


def test_port_zero_gets_a_free_one_and_a_taken_port_is_refused():
    sock = bind_socket("127.0.0.1", 0)
    port = sock.getsockname()[1]
    assert port > 0
    sock.listen()
    try:
        with pytest.raises(PortInUse, match=f"port {port} on 127.0.0.1 is already in use") as err:
            bind_socket("127.0.0.1", port)  # taken: never moved elsewhere silently
        assert "\n" not in str(err.value)
    finally:
        sock.close()
    with pytest.raises(OSError):
        bind_socket("203.0.113.7", 0)  # an address this machine does not have


def test_serve_command_passes_new_options(monkeypatch):
    seen = {}
    import moekit.serve

    monkeypatch.setattr(moekit.serve, "run_server", lambda ckpt, **kw: seen.update(kw))
    cli.main(
        [
            "serve",
            "ck",
            "--port",
            "0",
            "--dtype",
            "bf16",
            "--kv-memory",
            "2GiB",
            "--cors-origin",
            "https://a.org",
            "--cors-origin",
            "https://b.org",
            "--prefill-chunk",
            "512",
            "--decode-mode",
            "eager",
        ]
    )
    assert seen["port"] == 0 and seen["dtype"] == "bf16" and seen["kv_memory"] == "2GiB"
    assert seen["cors_origins"] == ["https://a.org", "https://b.org"]
    assert seen["prefill_chunk"] == 512 and seen["decode_mode"] == "eager"
    with pytest.raises(SystemExit) as exit_info:  # refused in one line, before loading
        cli.main(["serve", "ck", "--kv-memory", "plenty"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("dtype", ["bf16", "float16", torch.float32])
def test_load_in_a_dtype(tmp_path, dtype):
    model = make_model()
    save_model_files(model, tmp_path)
    loaded = moekit.load(tmp_path, dtype=dtype)
    want = {"bf16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {want}
    ref = model.state_dict()["blocks.0.ffn.experts.w1"]
    assert torch.equal(loaded.state_dict()["blocks.0.ffn.experts.w1"], ref.to(want))
    with pytest.raises(ValueError, match="dtype"):
        moekit.load(tmp_path, dtype="int8")


def test_run_server_refuses_a_taken_port_before_loading(tmp_path):
    sock = bind_socket("127.0.0.1", 0)
    sock.listen()
    try:
        with pytest.raises(PortInUse):  # the checkpoint does not even exist: never loaded
            run_server(str(tmp_path / "missing"), port=sock.getsockname()[1])
    finally:
        sock.close()
