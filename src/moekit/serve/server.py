"""`run_server`: load a checkpoint and serve it with uvicorn until SIGINT / SIGTERM."""

from __future__ import annotations

import argparse
import errno
import importlib.metadata
import logging
import socket
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
import uvicorn

from moekit.model.codec import load_codec
from moekit.model.store import CONFIG_FILE, DTYPES, load, pick_checkpoint
from moekit.serve.app import create_app, default_device
from moekit.serve.config import EngineConfig
from moekit.serve.limits import DrainingServer
from moekit.serve.security import SecurityConfig, check_bind, tls_options

DRAIN_TIMEOUT_S = 300  # SIGTERM: in-flight requests get this long to finish
INTERRUPTED = 130  # exit status of a stop that cut requests short (128 + SIGINT)
log = logging.getLogger(__name__)


class PortInUse(ValueError):
    """The port asked for is held by another process (the message is one line)."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A socket bound to host:port; port 0 gets a free one. A port another process holds
    raises PortInUse: a server asked to listen somewhere must not move elsewhere silently."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restart over TIME_WAIT
    try:
        sock.bind(addr)
    except OSError as err:
        sock.close()
        if err.errno == errno.EADDRINUSE and port != 0:
            raise PortInUse(
                f"port {port} on {host} is already in use; stop what holds it, choose another"
                " port, or give port 0 for a free one"
            ) from None
        raise
    sock.set_inheritable(True)
    return sock


def _checkpoint_dir(ckpt: str) -> Path:
    """The checkpoint a path names: itself, or a run directory's pick (as `load` does)."""
    path = Path(ckpt)
    if (path / CONFIG_FILE).exists():
        return path
    return pick_checkpoint(path)


def run_server(
    ckpt: str,
    host: str = "127.0.0.1",
    port: int = 8080,
    device: str = "auto",
    threads: int | None = None,
    log_level: str = "info",
    security: SecurityConfig | None = None,
    allow_unauthenticated: bool = False,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    dtype: str | None = None,
    cors_origins: tuple[str, ...] | list[str] = (),
    served_model_name: str | None = None,
    **engine_options: Any,
) -> None:
    """Serve a checkpoint (directory or run dir) over HTTP(S); OpenAPI docs at /docs.

    engine_options are `EngineConfig` fields (max_batch, kv_memory, max_model_len...).
    threads sets torch's CPU threads (1 is often fastest on a busy machine). dtype ('bf16',
    'fp16', 'fp32') casts the weights as they load. port 0 serves on a free one (the address
    is printed); a port already taken raises PortInUse. served_model_name (default: the
    checkpoint directory's name) is the name /v1/models lists and answers carry. security
    defaults to the keys in $MOEKIT_API_KEY (none: no authentication, refused off loopback
    unless allow_unauthenticated). Raises SecurityConfigError or PortInUse before loading.
    SIGTERM or Ctrl-C drains (returns once in-flight requests finished); a second one stops
    at once and exits with status 130.
    """
    if not 0 <= port <= 65535:  # the resolver would wrap it silently (99999 -> 34463)
        raise ValueError(f"port={port} must be in [0, 65535] (0: a free port)")
    security = security or SecurityConfig.from_options()
    check_bind(host, security, allow_unauthenticated)
    tls = tls_options(ssl_certfile, ssl_keyfile)
    cfg = EngineConfig.from_options(engine_options)
    logging.basicConfig(level=log_level.upper())
    if threads is not None:
        torch.set_num_threads(threads)
    sock = bind_socket(host, port)
    scheme = "https" if tls else "http"
    shown = f"[{host}]" if ":" in host else host
    print(f"moekit serve: {scheme}://{shown}:{sock.getsockname()[1]}", flush=True)
    try:
        path = _checkpoint_dir(ckpt)
        model = load(path, default_device(device), dtype)
        codec = load_codec(model, path)
    except KeyboardInterrupt:  # Ctrl-C while loading: nothing to drain yet
        sock.close()
        print(f"moekit serve: interrupted while loading {ckpt}", file=sys.stderr)
        raise SystemExit(INTERRUPTED) from None
    app = create_app(
        model,
        name=Path(ckpt).resolve().name,
        engine=cfg,
        security=security,
        codec=codec,
        cors_origins=cors_origins,
        served_model_name=served_model_name,
    )
    config = uvicorn.Config(
        app,
        log_level=log_level,
        timeout_graceful_shutdown=DRAIN_TIMEOUT_S,
        access_log=False,  # its lines carry query strings; the app logs its own without them
        **tls,
    )
    # SIGTERM / Ctrl-C: new requests get 503 while those in flight finish, then exit
    server = DrainingServer(config, app.state.drain, DRAIN_TIMEOUT_S)
    server.run(sockets=[sock])
    if server.forced:  # a second signal cut requests short: say so, no traceback
        print("moekit serve: stopped at once; requests in flight were cut", file=sys.stderr)
        raise SystemExit(INTERRUPTED)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.serve", description=run_server.__doc__)
    p.add_argument("ckpt", help="checkpoint or run directory")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="weights dtype")
    p.add_argument(
        "--cors-origin",
        dest="cors_origins",
        action="append",
        default=[],
        help="origin browsers may call from (repeatable; * for any)",
    )
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--served-model-name", default=None, help="the model name answers and /v1/models carry"
    )
    p.add_argument("--version", action="version", version=f"moekit {_version()}")
    _add_security_arguments(p)
    defaults = EngineConfig()
    hints = typing.get_type_hints(EngineConfig)
    for f in fields(EngineConfig):
        value = getattr(defaults, f.name)
        kind = type(value) if value is not None else _optional(hints[f.name])
        p.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=value)
    args = vars(p.parse_args(argv))
    try:
        security = SecurityConfig.from_options(
            args.pop("api_key") or (),
            args.pop("api_key_file"),
            rate_limit=args.pop("rate_limit"),
            metrics_public=args.pop("metrics_public"),
            log_prompts=args.pop("log_prompts"),
        )
        run_server(**args, security=security)
    except (ValueError, FileNotFoundError, OverflowError) as err:  # one line, no traceback
        p.exit(2, f"{p.prog}: error: {err}\n")  # a refused setting, checkpoint or port


def _optional(hint: Any) -> type:
    """The type inside `X | None`."""
    return next(t for t in typing.get_args(hint) if t is not type(None))


def _version() -> str:
    try:
        return importlib.metadata.version("moekit")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _add_security_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--api-key", action="append", help="accepted Bearer key (repeatable)")
    p.add_argument("--api-key-file", default=None, help="file of keys, one a line")
    p.add_argument("--rate-limit", default=None, help="per key, e.g. 5/s or 300/min")
    p.add_argument("--metrics-public", action="store_true", help="/metrics without a key")
    p.add_argument("--log-prompts", action="store_true", help="log prompt and completion text")
    p.add_argument(
        "--allow-unauthenticated", action="store_true", help="serve off loopback without keys"
    )
    p.add_argument("--ssl-certfile", default=None, help="PEM certificate: serve HTTPS")
    p.add_argument("--ssl-keyfile", default=None, help="PEM private key of the certificate")
