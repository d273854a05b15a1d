"""`moekit serve CKPT`: a checkpoint over HTTP, with its network, security and engine options."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from moekit.commands import argument, command, given, option
from moekit.serve.config import EngineConfig


@dataclass
class Serve:
    """Where to listen, who may call, and the engine's options (unset ones keep its defaults)."""

    ckpt: str = argument("checkpoint or run directory")
    host: str = option("127.0.0.1", "address to listen on")
    port: int = option(8080, "0: a free port; a port that is taken is an error")
    device: str = option("auto", "auto, cpu or cuda")
    dtype: str | None = option(None, "weights: bf16, fp16, fp32")
    threads: int | None = option(None, "torch CPU threads")
    cors_origin: list[str] | None = option(None, "browser origin allowed (repeatable)", repeat=True)
    api_key: list[str] | None = option(None, "accepted Bearer key (repeatable)", repeat=True)
    api_key_file: str | None = option(None, "keys, one a line")
    rate_limit: str | None = option(None, "per key: 5/s, 300/min")
    metrics_public: bool = option(False, "/metrics without a key")
    log_prompts: bool = option(False, "log prompt and completion text")
    allow_unauthenticated: bool = option(False, "serve off loopback without keys")
    ssl_certfile: str | None = option(None, "PEM cert: serve HTTPS")
    ssl_keyfile: str | None = option(None, "PEM key of the cert")
    served_model_name: str | None = option(None, "model name in /v1/models and answers")
    engine: dict[str, Any] = given(EngineConfig)  # --max-batch, --kv-memory, --prefill-chunk...

    def __post_init__(self) -> None:
        """What uvicorn or torch would otherwise refuse with a traceback, named by its option."""
        import torch

        if not 0 <= self.port <= 65535:
            raise ValueError(f"--port={self.port} must be in [0, 65535] (0: a free port)")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads={self.threads} must be >= 1")
        if self.device != "auto":
            try:
                device = torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"--device={self.device!r} is not auto, cpu or cuda[:i]") from None
            gpus = torch.cuda.device_count() if device.type == "cuda" else 0
            if device.type == "cuda" and (gpus == 0 or (device.index or 0) >= gpus):
                raise ValueError(f"--device={self.device}: no such CUDA device ({gpus} visible)")


@command("serve", Serve, help="Serve a checkpoint over HTTP (OpenAPI docs at /docs).")
def serve(args: Serve) -> None:
    from moekit.serve import run_server
    from moekit.serve.security import SecurityConfig

    given = (
        *args.engine.items(),
        ("dtype", args.dtype),
        ("cors_origins", args.cors_origin),
        ("ssl_certfile", args.ssl_certfile),
        ("ssl_keyfile", args.ssl_keyfile),
        ("allow_unauthenticated", args.allow_unauthenticated or None),
        ("served_model_name", args.served_model_name),
    )
    options = {k: v for k, v in given if v is not None}
    EngineConfig.from_options(args.engine)  # a bad option or key: one line, before loading
    policy = (
        args.api_key,
        args.api_key_file,
        args.rate_limit,
        args.metrics_public,
        args.log_prompts,
    )
    if any(policy):  # otherwise run_server reads keys from $MOEKIT_API_KEY alone
        options["security"] = SecurityConfig.from_options(
            args.api_key or (),
            args.api_key_file,
            rate_limit=args.rate_limit,
            metrics_public=args.metrics_public,
            log_prompts=args.log_prompts,
        )
    host, port, device, threads = args.host, args.port, args.device, args.threads
    run_server(args.ckpt, host=host, port=port, device=device, threads=threads, **options)
