"""routing_report on HF MoE models, and the convert / route-report commands."""

import math

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from tests.integrations.hf_models import VOCAB, WORDS, hf_model, save_hf  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.integrations.hf import load_hf, load_tokenizer  # noqa: E402
from moekit.integrations.hf.report import routing_report  # noqa: E402
from moekit.viz.routing import plot_expert_load  # noqa: E402


def test_counts_match_moekits_own_routing_of_the_converted_model(tmp_path):
    hf = hf_model("mixtral")
    save_hf(hf, tmp_path)
    x = torch.randint(0, VOCAB, (3, 11), generator=torch.Generator().manual_seed(0))
    report = routing_report(hf, x, console=False)
    plot_expert_load(*report.loads(), tmp_path / "load.png")
    with torch.no_grad():
        infos = load_hf(tmp_path)(x).layers
    assert [layer.name for layer in report.layers] == [
        "model.layers.0.mlp.gate",
        "model.layers.1.mlp.gate",
    ]
    for layer, info in zip(report.layers, infos, strict=True):
        want = torch.bincount(info.routing.experts.flatten(), minlength=4)
        assert layer.counts == want.tolist() and layer.tokens == 33
        assert 0 < layer.entropy < math.log(4)
    assert (tmp_path / "load.png").stat().st_size > 0


def test_uniform_router_has_full_entropy_and_dead_experts():
    hf = hf_model("qwen3_moe")
    for layer in hf.model.layers:
        torch.nn.init.zeros_(layer.mlp.gate.weight)
    report = routing_report(hf, torch.zeros(1, 5, dtype=torch.long), console=False)
    for layer in report.layers:
        assert layer.entropy == pytest.approx(math.log(4))
        assert sum(layer.counts) == 10 and len(layer.dead) == 2  # ties always pick the same 2
        assert layer.max_over_mean == pytest.approx(2.0)


def test_convert_and_route_report_commands(tmp_path, capsys):
    save_hf(hf_model("olmoe"), tmp_path / "hf")
    main(["convert", "hf-to-moekit", str(tmp_path / "hf"), str(tmp_path / "m")])
    assert load_tokenizer(tmp_path / "m") is not None
    main(["convert", "moekit-to-hf", str(tmp_path / "m"), str(tmp_path / "back")])
    assert (tmp_path / "back" / "config.json").is_file()
    text = tmp_path / "text.txt"
    text.write_text(" ".join(WORDS * 4))
    plot = tmp_path / "r.png"
    main(["route-report", str(tmp_path / "hf"), "--text", str(text), "--plot", str(plot)])
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.gate" in out and plot.is_file()
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", "moekit-to-hf", str(tmp_path / "m"), str(tmp_path / "back")])
    assert exit_info.value.code == 2
    assert "exists and is not empty" in capsys.readouterr().err
