"""Launch-time fallback for configs that exceed shared memory, and the static size check of
every shipped and default config for bf16 and fp32 operands."""

from __future__ import annotations

import logging

import pytest

pytest.importorskip("triton", reason="the triton backend needs the triton package")

import torch  # noqa: E402

from moekit.backends.triton import configs, launch  # noqa: E402

GEMM_CFG = {"block_n": 128, "block_k": 64, "group_m": 8, "num_warps": 8, "num_stages": 4}


@pytest.fixture(autouse=True)
def _fresh_cache():
    launch._WORKING.clear()
    yield
    launch._WORKING.clear()


def _fake(max_stages: int = 2, max_block_k: int = 1 << 30):
    """A launch that fails like Triton's compiler above max_stages / max_block_k."""
    calls: list[dict] = []

    def run(cfg: dict) -> None:
        calls.append(dict(cfg))
        if cfg["num_stages"] > max_stages or cfg["block_k"] > max_block_k:
            raise launch.OutOfResources(278528, 232448, "shared memory")

    return run, calls


def test_retry_lowers_stages_once_per_process(caplog: pytest.LogCaptureFixture) -> None:
    run, calls = _fake(max_stages=2)
    with caplog.at_level(logging.WARNING, logger=launch.__name__):
        used = launch.launch_with_retry("grouped_gemm", GEMM_CFG, run, extra=("bf16",))
        assert used == dict(GEMM_CFG, num_stages=2)
        assert [c["num_stages"] for c in calls] == [4, 3, 2]
        calls.clear()
        for _ in range(3):  # remembered: straight to the working config, no second warning
            assert launch.launch_with_retry("grouped_gemm", GEMM_CFG, run, extra=("bf16",)) == used
        assert [c["num_stages"] for c in calls] == [2, 2, 2]
    assert len(caplog.records) == 1
    message = caplog.records[0].getMessage()
    assert "grouped_gemm" in message and "'num_stages': 2" in message


def test_cache_is_per_kernel_config_and_extra() -> None:
    run, calls = _fake(max_stages=2)
    launch.launch_with_retry("grouped_gemm", GEMM_CFG, run, extra=("bf16",))
    calls.clear()
    launch.launch_with_retry("grouped_gemm", GEMM_CFG, run, extra=("fp32",))
    launch.launch_with_retry("dh", GEMM_CFG, run)
    assert [c["num_stages"] for c in calls] == [4, 3, 2, 4, 3, 2]


def test_retry_halves_blocks_after_one_stage() -> None:
    run, calls = _fake(max_stages=2, max_block_k=16)
    used = launch.launch_with_retry("grouped_gemm", GEMM_CFG, run)
    assert used == dict(GEMM_CFG, num_stages=1, block_k=16)
    assert [(c["num_stages"], c["block_k"]) for c in calls][-3:] == [(1, 64), (1, 32), (1, 16)]


def test_fitting_config_runs_once_without_warning(caplog: pytest.LogCaptureFixture) -> None:
    run, calls = _fake(max_stages=8)
    with caplog.at_level(logging.WARNING, logger=launch.__name__):
        assert launch.launch_with_retry("wgrad", GEMM_CFG, run) == GEMM_CFG
    assert calls == [GEMM_CFG] and not caplog.records and not launch._WORKING


def test_gives_up_when_nothing_smaller_is_left() -> None:
    def run(cfg: dict) -> None:
        raise launch.OutOfResources(1, 0, "shared memory")

    with pytest.raises(launch.OutOfResources):
        launch.launch_with_retry("grouped_gemm", GEMM_CFG, run)


def test_other_errors_propagate_without_retry() -> None:
    calls = []

    def run(cfg: dict) -> None:
        calls.append(cfg)
        raise ValueError("bad operand")

    with pytest.raises(ValueError):
        launch.launch_with_retry("grouped_gemm", GEMM_CFG, run)
    assert len(calls) == 1


def _tables() -> list[tuple[str, dict]]:
    """Every default class, and every class of every shipped file over the defaults."""
    out = [(f"default/{cls}", cfg) for cls, cfg in configs.DEFAULT.items()]
    for path in sorted(configs._DIR.glob("*.json")):
        table = {cls: dict(cfg) for cls, cfg in configs.DEFAULT.items()}
        for cls, cfg in configs._read(path).items():
            table[cls].update(cfg)
        out += [(f"{path.stem}/{cls}", cfg) for cls, cfg in table.items()]
    return out + [("interpreter", configs.INTERPRETER)]


DTYPES = (torch.bfloat16, torch.float32)


@pytest.mark.parametrize(("name", "table"), _tables(), ids=[n for n, _ in _tables()])
def test_every_config_fits_shared_memory(name: str, table: dict) -> None:
    """As the launchers size them: A in the activation dtype, B (weights) in either dtype."""
    block_m = table["block_m"]
    for kernel, n_b in (("up", 2), ("up", 1), ("down", 1), ("dh", 1), ("dx", 1)):
        for a_dtype in DTYPES:
            for b_dtype in DTYPES:
                cfg = configs.for_dtype(table[kernel], a_dtype, b_dtype, block_m, n_b)
                size = configs.gemm_smem(cfg, block_m, a_dtype.itemsize, b_dtype.itemsize, n_b)
                assert size <= configs.SMEM_LIMIT, (name, kernel, a_dtype, b_dtype, cfg, size)
                assert cfg["num_stages"] >= 1 and cfg["block_k"] >= configs.MIN_BLOCK
    for left in DTYPES:
        for right in DTYPES:
            cfg = configs.for_wgrad(table["wgrad"], left, right)
            size = configs.wgrad_smem(cfg, left.itemsize, right.itemsize)
            assert size <= configs.SMEM_LIMIT, (name, "wgrad", left, right, cfg, size)


def test_fp32_master_weights_were_too_big_and_are_now_sized() -> None:
    """The training failure: large class, gated up with bf16 x and fp32 w1 (4 stages of a
    bf16 A tile and two fp32 B tiles: 320 KiB by estimate) is now sized to fit."""
    cfg, block_m = configs.DEFAULT["large"]["up"], configs.DEFAULT["large"]["block_m"]
    assert configs.gemm_smem(cfg, block_m, 2, 4, 2) > configs.SMEM_LIMIT
    fitted = configs.for_dtype(cfg, torch.bfloat16, torch.float32, block_m, 2)
    assert configs.gemm_smem(fitted, block_m, 2, 4, 2) <= configs.SMEM_LIMIT
    assert fitted["block_k"] == cfg["block_k"] and fitted["num_stages"] < cfg["num_stages"]
    # all-bf16 operands keep the tuned config as it is
    assert configs.for_dtype(cfg, torch.bfloat16, torch.bfloat16, block_m, 2) == cfg
