"""Any one byte of a checkpoint changed: `moekit.load` refuses naming that file, or (a change
that keeps every file's meaning, such as JSON whitespace) gives the very same weights."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import moekit
from moekit.errors import CheckpointError


@pytest.fixture(scope="module")
def pristine(text_ckpt) -> tuple[Path, dict[str, torch.Tensor]]:
    return text_ckpt, moekit.load(text_ckpt).state_dict()


@given(data=st.data())
def test_a_changed_byte_is_named_or_harmless(pristine, tmp_path_factory, data):
    source, weights = pristine
    ckpt = Path(shutil.copytree(source, tmp_path_factory.mktemp("flip") / source.name))
    files = sorted(p for p in ckpt.iterdir() if p.stat().st_size)
    target = data.draw(st.sampled_from(files), label="file")
    raw = bytearray(target.read_bytes())
    at = data.draw(st.integers(0, len(raw) - 1), label="offset")
    raw[at] = data.draw(st.integers(0, 255).filter(lambda b: b != raw[at]), label="byte")
    target.write_bytes(bytes(raw))
    try:
        loaded = moekit.load(ckpt).state_dict()
    except CheckpointError as err:
        assert f"{target}:" in str(err) and "\n" not in str(err)
        return
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
