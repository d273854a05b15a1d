import resource

import pytest
import torch

from moekit.train.live import LiveView, load_bars
from moekit.train.logging import RunLog, peak_memory_mib, read_log


def test_buffered_records_are_written_once_per_flush_with_nested_tensors(tmp_path):
    log = RunLog(tmp_path)
    for step in (1, 2):
        log.add_step(
            {
                "step": step,
                "loss": torch.tensor(0.5 * step),
                "expert_load": {"0": torch.tensor([0.25, 0.75])},
                "lr": {"rest": 0.1},
            }
        )
    assert not log.path.exists()  # nothing written (nor synced) before the flush
    records = log.flush()
    assert records == read_log(tmp_path)
    assert records[1] == {
        "kind": "train",
        "step": 2,
        "loss": 1.0,
        "expert_load": {"0": [0.25, 0.75]},
        "lr": {"rest": 0.1},
    }
    log.add_eval({"step": 2, "val_loss": 0.3})
    log.truncate_after(1)
    assert [r["step"] for r in read_log(tmp_path)] == [1]


def test_torn_last_line_is_skipped(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert read_log(tmp_path) == [{"step": 1}]


def test_plain_view_prints_lines_when_not_a_tty(capsys):
    view = LiveView(total=10, mode="auto", title="t")
    assert view.mode == "plain"  # pytest captures stdout: not a TTY
    rec = {
        "loss": 1.5,
        "aux_loss": 0.01,
        "lr": {"rest": 1e-3},
        "grad_norm": 0.5,
        "tokens_per_s": 1000.0,
    }
    view.update(3, rec)
    view.eval(3, {"step": 3, "val_loss": 1.25, "routing": {}})
    view.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[t] step 3/10 loss 1.5")
    assert out[1] == "[t] eval step 3: val_loss 1.25"


def test_load_bars_height_tracks_share():
    assert load_bars([0.25, 0.25, 0.25, 0.25]) == "▄▄▄▄"
    assert load_bars([0.5, 0.5, 0.0, 0.0]) == "██  "


def test_peak_memory_on_the_cpu_is_the_process_max_rss_in_mib():
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: KiB
    peak = peak_memory_mib(torch.device("cpu"))
    assert rss_kib / 1024 <= peak <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_peak_memory_on_cuda_is_the_peak_allocation_in_mib():
    x = torch.empty(2**20, device="cuda")  # 4 MiB
    peak = peak_memory_mib(x.device)
    assert peak == torch.cuda.max_memory_allocated(x.device) / 2**20 and peak >= 4
