import json

import pytest
import torch

import moekit
from moekit.model import Transformer, load, save_model_files


def test_load_reproduces_outputs_exactly(tmp_path, tiny_cfg):
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(tie_embeddings=True)).eval()
    save_model_files(model, tmp_path)
    assert set(p.name for p in tmp_path.iterdir()) == {"config.json", "model.safetensors"}
    loaded = moekit.load(tmp_path)
    x = torch.randint(0, 37, (2, 9))
    assert torch.equal(model(x).out, loaded(x).out)
    assert loaded.cfg == model.cfg
    assert loaded.head.weight.data_ptr() == loaded.embed.weight.data_ptr()


def test_load_rejects_mismatched_weights(tmp_path, tiny_cfg):
    save_model_files(Transformer(tiny_cfg()), tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    data["model"]["d_ff"] = 64
    (tmp_path / "config.json").write_text(json.dumps(data))
    with pytest.raises(Exception, match="d_ff|size|shape"):
        load(tmp_path)
