"""Which tuned configs the Triton backend loads: defaults < shipped file < the user's cache,
and one warning naming the tuning command for a GPU with neither."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package")

from moekit.backends.triton import configs  # noqa: E402
from moekit.bench.tune import merge_tuned  # noqa: E402


@pytest.fixture
def dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """(shipped dir, user cache dir), both empty; the loader's cache cleared around the test."""
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    monkeypatch.setattr(configs, "_DIR", shipped)
    monkeypatch.setenv("MOEKIT_CACHE_DIR", str(tmp_path / "user"))
    configs.tuned_table.cache_clear()
    yield shipped, tmp_path / "user" / "triton"
    configs.tuned_table.cache_clear()


def _write(path: Path, table: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / "GPU_X.json").write_text(json.dumps(table))


def test_cache_dir_follows_the_environment(dirs, tmp_path: Path) -> None:
    assert configs.cache_dir() == tmp_path / "user" / "triton"


def test_user_cache_wins_over_shipped_file_over_defaults(dirs) -> None:
    shipped, user = dirs
    up_shipped = {"block_n": 64, "block_k": 64, "group_m": 1, "num_warps": 4, "num_stages": 2}
    up_user = dict(up_shipped, block_n=256)
    _write(shipped, {"large": {"block_m": 64, "up": up_shipped}, "decode": {"up": up_shipped}})
    _write(user, {"large": {"up": up_user}})
    table = configs.tuned_table("GPU_X")
    assert table["large"]["up"] == up_user  # the user's tuning
    assert table["large"]["block_m"] == 64  # the shipped file where the user said nothing
    assert table["decode"]["up"] == up_shipped
    assert table["large"]["down"] == configs.DEFAULT["large"]["down"]  # defaults underneath
    assert table["small"] == configs.DEFAULT["small"]


def test_user_cache_alone_is_enough(dirs, caplog: pytest.LogCaptureFixture) -> None:
    _, user = dirs
    _write(user, {"medium": {"block_m": 128}})
    with caplog.at_level(logging.WARNING, logger=configs.__name__):
        assert configs.tuned_table("GPU_X")["medium"]["block_m"] == 128
    assert not caplog.records


def test_unknown_gpu_warns_once_naming_the_tuner(dirs, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger=configs.__name__):
        for _ in range(3):
            assert configs.tuned_table("GPU_X") == configs.DEFAULT
    assert len(caplog.records) == 1
    assert "moekit bench tune" in caplog.records[0].getMessage()


def test_bad_tuned_file_names_the_file(dirs) -> None:
    _, user = dirs
    user.mkdir(parents=True)
    (user / "GPU_X.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="GPU_X.json"):
        configs.tuned_table("GPU_X")


def test_tuning_merges_into_the_cache_file(dirs) -> None:
    _, user = dirs
    path = user / "GPU_X.json"
    merge_tuned(path, {"large": {"block_m": 128, "up": {"block_n": 256}}})
    merge_tuned(path, {"large": {"dh": {"block_n": 64}}, "decode": {"block_m": 16}})
    assert json.loads(path.read_text()) == {
        "large": {"block_m": 128, "up": {"block_n": 256}, "dh": {"block_n": 64}},
        "decode": {"block_m": 16},
    }
