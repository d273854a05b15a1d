"""Checkpoint manifests: the size and sha256 of every file of a directory, written last.

A directory whose manifest matches its files is complete and undamaged; `verify_manifest`
names the first file that is missing, truncated or changed. The manifest carries a digest of
its own entries, so damage to the manifest itself is named too. Directories written before
manifests existed have none: they are read unverified.

    step-0000100/  config.json  model.safetensors  ...  manifest.json
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from moekit.errors import CheckpointError

MANIFEST_FILE = "manifest.json"
_FORMAT = "moekit.manifest"


def file_sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _entries_digest(files: dict[str, Any]) -> str:
    """sha256 of the entries in one canonical JSON form (key order and spacing fixed)."""
    text = json.dumps(files, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(directory: str | Path) -> Path:
    """Record every visible file of `directory`; the manifest lands by an atomic rename."""
    directory = Path(directory)
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST_FILE and not p.name.startswith(".")
    }
    payload = {"format": _FORMAT, "version": 1, "files": files, "digest": _entries_digest(files)}
    tmp = directory / f".{MANIFEST_FILE}.tmp"
    with open(tmp, "w") as fh:
        fh.write(json.dumps(payload, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    final = directory / MANIFEST_FILE
    os.replace(tmp, final)
    return final


def _read_entries(directory: Path) -> dict[str, Any] | None:
    """The manifest's file entries, None without a manifest; a damaged one is refused."""
    path = directory / MANIFEST_FILE
    try:
        payload = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError) as err:  # JSON syntax or bytes that are not text
        raise CheckpointError(f"{path}: damaged, not readable JSON ({err})") from None
    files = payload.get("files") if isinstance(payload, dict) else None
    if not isinstance(files, dict) or payload.get("digest") != _entries_digest(files):
        raise CheckpointError(f"{path}: damaged, its entries do not match their digest")
    return files


def verify_manifest(directory: str | Path) -> bool:
    """True when every listed file matches; False when there is no manifest (unverified).

    Raises CheckpointError naming the first file that is missing, of the wrong size or
    whose sha256 differs. Sizes are checked first: a truncated file is found without hashing.
    """
    directory = Path(directory)
    files = _read_entries(directory)
    if files is None:
        return False
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(
                f"{path}: damaged, {size} bytes where {MANIFEST_FILE} records {entry['bytes']}"
            )
    for name, entry in files.items():
        if file_sha256(directory / name) != entry["sha256"]:
            raise CheckpointError(
                f"{directory / name}: damaged, its sha256 differs from {MANIFEST_FILE}"
            )
    return True
