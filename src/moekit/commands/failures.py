"""One line for each mistake a user can fix; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import re
import sys

from moekit.commands import Command
from moekit.errors import missing_extra

# what a user can cause and fix: printed as one line, never as a traceback
USER_ERRORS = (
    argparse.ArgumentError,
    ValueError,  # bad values, configs and damaged checkpoints (CheckpointError) name the field
    FileNotFoundError,
    NotADirectoryError,
    FileExistsError,
    IsADirectoryError,
    PermissionError,
)


def _one_line(err: BaseException) -> str:
    """An error message on one line; a parser's long type report cut to what was expected."""
    text = str(err)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    given = [line for line in lines if line.startswith("Given value:")]
    expected = re.findall(r"Expected a <class '([\w.]+)'>", text)
    if given and expected:
        return f"{lines[0]} expected {' or '.join(expected)}; {given[0].lower()}"
    return " ".join(lines) or type(err).__name__


def _no_cuda(err: Exception) -> str | None:
    """What to say when a command asked for CUDA on a machine where torch sees none."""
    torch = sys.modules.get("torch")
    if (
        torch is None
        or not isinstance(err, AssertionError | RuntimeError)
        or "CUDA" not in str(err)
    ):
        return None
    if torch.cuda.is_available():
        return None
    return (
        f"this needs a CUDA GPU and torch {torch.__version__} sees none here; "
        "run it where there is one, or on the CPU (--device cpu, --train.device cpu)"
    )


def _os_error(err: OSError) -> str | None:
    """'PATH: exists and is not a directory' where a folder was asked for and a file is there."""
    if isinstance(err, FileExistsError | NotADirectoryError) and err.filename is not None:
        return f"{err.filename}: exists and is not a directory (a folder is needed here)"
    return None


def error_line(err: Exception, spec: Command | None, command: str | None) -> str | None:
    """The one line for what a user can fix (a missing extra too); None for a bug."""
    advice = missing_extra(err, command) if isinstance(err, ModuleNotFoundError) else None
    advice = advice or _no_cuda(err) or (_os_error(err) if isinstance(err, OSError) else None)
    if advice is not None:
        return f"moekit: error: {advice}"
    if spec is not None and isinstance(err, spec.refusals):
        return f"moekit {spec.name}: error: {err}"
    return f"moekit: error: {_one_line(err)}" if isinstance(err, USER_ERRORS) else None
