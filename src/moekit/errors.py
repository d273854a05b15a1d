"""Errors a user can act on: each message is one line naming the file, option or field.

The `moekit` command prints them as `moekit: error: ...` and exits with code 2.
"""

from __future__ import annotations

# import name -> the extras of `pip install 'moekit[EXTRA]'` that bring it (pyproject.toml)
EXTRAS_OF_MODULE = {
    "fastapi": ("serve",),
    "starlette": ("serve",),
    "pydantic": ("serve",),
    "uvicorn": ("serve",),
    "httpx": ("serve",),
    "prometheus_client": ("serve",),
    "arch": ("finance",),
    "pandas": ("finance",),
    "scipy": ("memory", "finance"),
    "triton": ("triton",),
    "transformers": ("hf",),
    "tokenizers": ("hf",),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is (missing, truncated, damaged or unreadable);
    the message names the file."""


def missing_extra(err: ModuleNotFoundError, command: str | None = None) -> str | None:
    """The one-line advice for an optional dependency that is not installed, else None."""
    module = (err.name or "").partition(".")[0]
    extras = EXTRAS_OF_MODULE.get(module)
    if extras is None:
        return None
    extra = command if command in extras else extras[0]  # the command's own extra first
    what = f"`moekit {command}`" if command else "this"
    return f"{what} needs {module}, which is not installed: pip install 'moekit[{extra}]'"
