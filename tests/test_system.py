"""moekit.System: training step, knowledge queries, and that each switch does what it says."""

import pytest
import torch
from torch import nn

import moekit
from moekit.system import MoENetwork, SystemOutput


def make_cfg(**kw):
    moe = moekit.MoEConfig(d_model=16, d_hidden=12, n_experts=4, k=2, backend="torch")
    return moekit.SystemConfig(moe=moe, **{"d_in": 6, "d_out": 3, **kw})


def make_system(seed=0, **kw):
    torch.manual_seed(seed)
    return moekit.System(make_cfg(**kw))


def batch(seed=1, shape=(4, 5)):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, 6, generator=g)
    return x, x[..., :3].sin() * 2.0


def test_training_step_learns_and_reports():
    system = make_system()
    opt = torch.optim.Adam(system.parameters(), lr=3e-2)
    data = batch()
    first = system.training_step(data, opt, nn.MSELoss())
    for _ in range(15):
        last = system.training_step(data, opt, nn.MSELoss())
    assert set(first) == {"loss", "task_loss", "aux_loss", "metrics"}
    assert last["task_loss"] < 0.2 * first["task_loss"]
    assert torch.allclose(first["loss"], first["task_loss"] + first["aux_loss"])
    assert first["aux_loss"] > 0  # load balance and z-loss of both layers
    assert first["metrics"]["layer1/expert_load"].shape == (4,)
    assert system.steps == 16


def test_knowledge_recorded_every_n_steps_and_queried(tmp_path):
    system = make_system(
        knowledge_path=str(tmp_path / "kg.db"), knowledge_every=2, knowledge_dedup=1.0
    )
    opt = torch.optim.SGD(system.parameters(), lr=1e-3)
    for step in range(5):  # recorded on steps 1, 3, 5: 4 sequences each
        system.training_step(batch(seed=step), opt, nn.MSELoss())
    assert len(system.store) == 12
    node = system.store.get(1)
    assert node.layer == 1 and node.step == 1 and 1 <= len(node.experts) <= 2
    hits = system.query_knowledge_graph(node.embedding, top_k=3)
    assert [h.node_id for h in hits][0] == 1 and hits[0].similarity == pytest.approx(1.0)
    assert len(hits) == 3 and hits[0].similarity >= hits[1].similarity >= hits[2].similarity
    # the stored embedding is the pooled hidden state entering the recorded layer at step 1
    torch.manual_seed(0)
    fresh = moekit.System(make_cfg())
    expected = fresh(batch(seed=0)[0]).hiddens[1][0].mean(0)
    assert torch.allclose(node.embedding, expected, atol=1e-5)
    system.close()


def test_query_without_store_says_how_to_get_one():
    with pytest.raises(ValueError, match="knowledge_path"):
        make_system().query_knowledge_graph(torch.randn(16))


def test_compile_switch_runs_a_compiled_graph():
    torch._dynamo.reset()
    eager, compiled = make_system(), make_system(compile=True, compile_backend="eager")
    assert eager.forward_fn is eager.model
    assert isinstance(compiled.forward_fn, torch._dynamo.eval_frame.OptimizedModule)
    assert compiled.forward_fn._orig_mod is compiled.model
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    x = batch()[0]
    y = compiled(x).y
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > before
    assert torch.allclose(y, eager(x).y, atol=1e-6)
    # parameters are listed once, not again under the compiled wrapper
    assert len(list(compiled.parameters())) == len(list(eager.parameters()))


def test_amp_switch_autocasts_to_bfloat16():
    seen = {}
    for amp in (None, "bfloat16"):
        system = make_system(amp_dtype=amp)
        hook = system.model.layers[0].register_forward_hook(
            lambda m, i, o, amp=amp: seen.__setitem__(amp, (i[0].dtype, o[0].dtype))
        )
        out = system(batch()[0])
        hook.remove()
        expected = torch.float32 if amp is None else torch.bfloat16
        assert out.y.dtype == expected
        assert seen[amp] == (expected, expected)  # the MoE layer ran in the autocast dtype
    opt = torch.optim.SGD(system.parameters(), lr=1e-2)
    stats = system.training_step(batch(), opt, nn.MSELoss())
    assert stats["loss"].dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in system.parameters())


def test_amp_dtype_takes_either_precision_spelling():
    x, target = batch()
    losses = []
    for amp in ("bfloat16", "bf16"):
        system = make_system(amp_dtype=amp)
        opt = torch.optim.SGD(system.parameters(), lr=1e-2)
        losses.append([system.training_step((x, target), opt, nn.MSELoss())["loss"] for _ in "ab"])
    assert all(torch.equal(a, b) for a, b in zip(*losses, strict=True))
    with pytest.raises(ValueError, match="amp_dtype='int8' is not one of fp32, bf16, fp16"):
        make_cfg(amp_dtype="int8")


def _saved_bytes(system, x):
    """Bytes autograd keeps for backward during one forward pass."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = system(x)
    return total, out


def test_checkpointing_saves_less_and_computes_the_same():
    x, target = batch(shape=(8, 32))
    results = {}
    for on in (False, True):
        system = make_system(checkpointing=on, n_layers=3).train()
        saved, out = _saved_bytes(system, x)
        (nn.functional.mse_loss(out.y, target) + out.aux_loss).backward()
        grads = [p.grad.clone() for p in system.parameters()]
        results[on] = (saved, out.y.detach(), grads)
    (saved_off, y_off, g_off), (saved_on, y_on, g_on) = results[False], results[True]
    assert saved_on < 0.5 * saved_off
    assert torch.equal(y_on, y_off)
    for a, b in zip(g_on, g_off, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


def test_wraps_a_bare_moe_layer():
    torch.manual_seed(2)
    cfg = make_cfg()
    layer = moekit.MoE(cfg.moe)
    system = moekit.System(cfg, model=layer)
    x = torch.randn(10, 16)
    out = system(x)
    y, info = layer(x)
    assert isinstance(out, SystemOutput) and torch.equal(out.y, y)
    assert torch.equal(out.aux_loss, info.aux_loss)
    stats = system.training_step(
        (x, torch.zeros(10, 16)), torch.optim.SGD(layer.parameters(), lr=0.1), nn.MSELoss()
    )
    assert "layer0/expert_load" in stats["metrics"]


def test_network_shape_and_config_checks():
    net = MoENetwork(make_cfg(n_layers=3))
    assert len(net.layers) == 3 and net(torch.randn(2, 7, 6)).y.shape == (2, 7, 3)
    for kw, field in (
        ({"amp_dtype": "int8"}, "amp_dtype"),
        ({"n_layers": 0}, "n_layers"),
        ({"knowledge_every": 0}, "knowledge_every"),
        ({"knowledge_layer": 2}, "knowledge_layer"),
        ({"d_in": 0}, "d_in"),
    ):
        with pytest.raises(ValueError, match=field):
            make_cfg(**kw)
