import ast
import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import moekit
from moekit.cli import build_parser
from moekit.config import LEGACY_ROUTER_KEYS, RouterOptions, from_dict, migrated
from moekit.model import ModelConfig, Transformer
from moekit.model.store import save_model_files
from moekit.routing import build_options, resolve_router
from moekit.routing.attention import AttentionOptions
from moekit.routing.sinkhorn import SinkhornOptions
from moekit.train.config import RunConfig


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"k": 9, "n_experts": 8}, "k="),
        ({"n_experts": 0}, "n_experts="),
        ({"capacity_factor": 0.0}, "capacity_factor="),
        ({"capacity_factor": -1.0}, "capacity_factor="),
        ({"d_hidden": 0}, "d_hidden="),
        ({"d_model": 0}, "d_model="),
        ({"fallback": "drop"}, "fallback="),
        ({"n_shared_experts": -1}, "n_shared_experts="),
    ],
)
def test_bad_layer_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        moekit.MoEConfig(**kwargs)


def test_unknown_names_list_allowed_values():
    with pytest.raises(ValueError, match=r"expert.activation='tanh'.*'swiglu'"):
        moekit.ExpertConfig(activation="tanh")
    with pytest.raises(ValueError, match="router.noise="):
        moekit.RouterConfig(noise="pink")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"router": moekit.RouterConfig(kind="nope")}, r"router.kind='nope'.*'topk'"),
        ({"expert": moekit.ExpertConfig(kind="nope")}, r"expert.kind='nope'.*'mlp'"),
        ({"backend": "nope"}, r"backend='nope'.*'grouped_mm'"),
        ({"backend": "cuda-magic"}, "backend="),
    ],
)
def test_kind_names_are_checked_where_the_layer_is_built(kwargs, match):
    """The config holds names as plain values; building the layer (or a model) refuses them."""
    cfg = moekit.MoEConfig(d_model=8, d_hidden=4, n_experts=4, **kwargs)
    with pytest.raises(ValueError, match=match):
        moekit.MoE(cfg)
    with pytest.raises(ValueError, match=match):
        Transformer(ModelConfig(vocab_size=11, d_model=16, n_heads=2, moe=cfg))


def test_configs_are_frozen_values():
    cfg = moekit.MoEConfig(router={"kind": "sigmoid"})
    for obj, name in ((cfg, "k"), (cfg.router, "temperature"), (cfg.expert, "init_std")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(obj, name, 1)
    derived = dataclasses.replace(cfg, k=1)
    assert (derived.k, cfg.k) == (1, 2) and derived.router is cfg.router


def test_group_limits_are_checked_against_the_layer():
    with pytest.raises(ValueError, match="router.n_groups=3"):
        moekit.MoEConfig(n_experts=8, router=moekit.RouterConfig(n_groups=3, topk_groups=1))
    with pytest.raises(ValueError, match="router.topk_groups"):
        moekit.RouterConfig(n_groups=2, topk_groups=3)
    with pytest.raises(ValueError, match="k=4 exceeds"):
        moekit.MoEConfig(n_experts=8, k=4, router=moekit.RouterConfig(n_groups=4, topk_groups=1))


def test_capacity_formula_and_dict_round_trip():
    cfg = moekit.MoEConfig(n_experts=8, k=2, capacity_factor=1.25)
    assert cfg.capacity(100) == 32  # ceil(1.25 * 100 * 2 / 8) = ceil(31.25)
    assert moekit.MoEConfig(capacity_factor=None).capacity(100) is None
    again = moekit.MoEConfig.from_dict(cfg.to_dict())
    assert again == cfg
    with pytest.raises(ValueError, match="unknown MoEConfig field"):
        moekit.MoEConfig.from_dict({"d_model": 8, "n_expert": 2})


# a router config as config.json files held it before routers owned their options
OLD_SINKHORN_ROUTER = {
    "kind": "sinkhorn",
    "temperature": 1.0,
    "noise": "none",
    "noise_std": 1.0,
    "renormalize": True,
    "load_balance_weight": 0.01,
    "z_loss_weight": 0.001,
    "entropy_weight": 0.0,
    "seq_balance_weight": 0.0,
    "n_groups": 1,
    "topk_groups": 1,
    "bias_update_rate": 0.001,
    "scaling_factor": 1.0,
    "expert_choice_capacity": 1.0,
    "sinkhorn_iters": 5,
    "sinkhorn_tau": 0.1,
    "sinkhorn_candidates": None,
    "attention_heads": 4,
    "attention_dim": 32,
    "constellations": None,
}


def test_old_flat_router_keys_load_into_the_options_with_a_warning():
    old = {"d_model": 8, "d_hidden": 4, "n_experts": 4, "k": 2, "router": OLD_SINKHORN_ROUTER}
    with pytest.warns(DeprecationWarning) as caught:
        cfg = moekit.MoEConfig.from_dict(old)
    assert build_options("sinkhorn", cfg.router.options) == SinkhornOptions(5, 0.1, None)
    (message,) = [str(w.message) for w in caught]
    assert "router.sinkhorn_iters is now router.options.iters" in message
    assert "attention" not in message  # other routers' defaults carry nothing to warn about
    again = moekit.MoEConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and "sinkhorn_iters" not in cfg.to_dict()["router"]


def test_old_checkpoint_config_loads_with_the_same_model(tmp_path):
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning):
        model = Transformer(ModelConfig.from_dict(_old_model_config()))
    assert model.blocks[0].ffn.router.options == SinkhornOptions(iters=5, tau=0.1)
    save_model_files(model, tmp_path)
    payload = json.loads((tmp_path / "config.json").read_text())
    payload["model"] = _old_model_config()  # as written before the options existed
    (tmp_path / "config.json").write_text(json.dumps(payload))
    with pytest.warns(DeprecationWarning, match="router.options.tau"):
        loaded = moekit.load(tmp_path)
    assert loaded.cfg == model.cfg
    tokens = torch.randint(0, 11, (2, 8))
    assert torch.equal(loaded(tokens).out, model.eval()(tokens).out)


def _old_model_config():
    moe = {"d_model": 16, "d_hidden": 8, "n_experts": 4, "k": 2, "router": OLD_SINKHORN_ROUTER}
    return {"vocab_size": 11, "d_model": 16, "n_layers": 2, "n_heads": 2, "d_ff": 16, "moe": moe}


def _router(data):
    return from_dict(moekit.RouterConfig, data, "router key(s)")


def test_old_keys_are_migrated_by_the_builder():
    with pytest.warns(DeprecationWarning, match="router.options.bias_update_rate"):
        rcfg = _router({"kind": "sigmoid", "bias_update_rate": 0.02})
    assert build_options("sigmoid", rcfg.options).bias_update_rate == 0.02
    with pytest.warns(DeprecationWarning, match="ignored with router.kind='topk'"):
        assert build_options("topk", _router({"sinkhorn_iters": 7}).options) == RouterOptions()
    with pytest.warns(DeprecationWarning):
        rcfg = _router({"kind": "sinkhorn", "sinkhorn_iters": 0})
    with pytest.raises(ValueError, match=r"router\.options\.iters=0"):
        moekit.MoE(moekit.MoEConfig(router=rcfg))
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="iters is also set"):
        _router({"kind": "sinkhorn", "sinkhorn_iters": 7, "options": {"iters": 8}})


def test_legacy_keys_are_not_fields_of_the_config():
    """Old keys are the builder's business: the dataclass neither has nor accepts them."""
    assert not set(LEGACY_ROUTER_KEYS) & {f.name for f in dataclasses.fields(moekit.RouterConfig)}
    with pytest.raises(TypeError):
        moekit.RouterConfig(sinkhorn_iters=7)


@pytest.mark.parametrize(
    ("router", "match"),
    [
        ({"kind": "sinkhorn", "options": {"iter": 5}}, "unknown router.options key.*: iter"),
        ({"kind": "sinkhorn", "options": {"tau": 0.0}}, r"router\.options\.tau=0\.0"),
        ({"kind": "sinkhorn", "options": {"candidates": 0}}, r"router\.options\.candidates=0"),
        ({"kind": "sigmoid", "options": {"bias_update_rate": -1.0}}, "bias_update_rate=-1.0"),
        ({"kind": "expert_choice", "options": {"capacity_factor": 0}}, "capacity_factor=0"),
        ({"kind": "sinkhorn", "options": 5}, "router.options must be a dict"),
        ({"kind": "sinkhorn", "options": AttentionOptions()}, "unknown router.options key"),
        ({"kind": "topk", "sinkhorn_iter": 5}, "unknown router key.*sinkhorn_iter"),
    ],
)
def test_bad_router_options_name_the_key(router, match):
    with pytest.raises(ValueError, match=match):
        moekit.MoE(moekit.MoEConfig(router=router))


def test_options_follow_the_kind_by_name():
    topk = moekit.MoEConfig(router=moekit.RouterConfig())
    sinkhorn = dataclasses.replace(topk, router=dataclasses.replace(topk.router, kind="sinkhorn"))
    assert resolve_router(sinkhorn).router.options == SinkhornOptions()
    heads = moekit.RouterConfig(kind="attention", options=AttentionOptions(heads=2))
    assert build_options("attention", heads.options).heads == 2
    assert build_options("attention", {"heads": 3}) == AttentionOptions(heads=3)


def test_yaml_router_options_through_the_parser(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "model:\n  moe:\n    router:\n      kind: sinkhorn\n      options: {iters: 5}\n"
    )
    args = build_parser().parse_args(["train", "--config", str(path)])
    rcfg = _router(args.train.model.moe.router.as_dict())
    assert build_options(rcfg.kind, rcfg.options) == SinkhornOptions(iters=5)


@pytest.mark.parametrize("router", ["sinkhorn_iters: 5", "options: {iters: 5}"])
def test_yaml_router_keys_old_and_new(tmp_path, router):
    text = f"model:\n  moe:\n    router:\n      kind: sinkhorn\n      {router}\n"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run = from_dict(RunConfig, yaml.safe_load(text), "run key(s)")
    rcfg = run.model.moe.router
    assert build_options(rcfg.kind, rcfg.options) == SinkhornOptions(iters=5)


def test_migrated_moves_old_keys_at_every_depth_and_builds_nothing():
    router = {"kind": "sinkhorn", "sinkhorn_iters": 5}
    old = {"task": {"name": "signals", "noise": 0.2}, "model": {"moe": {"router": router}}}
    with pytest.warns(DeprecationWarning, match="router.sinkhorn_iters is now router.options"):
        new = migrated(RunConfig, old)
    assert new == {
        "task": {"name": "signals", "options": {"noise": 0.2}},
        "model": {"moe": {"router": {"kind": "sinkhorn", "options": {"iters": 5}}}},
    }
    assert router["sinkhorn_iters"] == 5  # the caller's dicts kept
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert RunConfig.from_dict(new) == RunConfig.from_dict(old)


def test_one_builder_recurses_and_names_unknown_keys():
    data = {"model": {"moe": {"router": {"kind": "sigmoid", "schedules": None}}}, "seed": 3}
    run = RunConfig.from_dict(data)
    assert run.model.moe.router.kind == "sigmoid" and run.seed == 3
    assert RunConfig.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    with pytest.raises(ValueError, match=r"unknown run config key\(s\): sed"):
        RunConfig.from_dict({"sed": 3})
    with pytest.raises(ValueError, match=r"model.moe: unknown router key\(s\): kinds"):
        RunConfig.from_dict({"model": {"moe": {"router": {"kinds": "topk"}}}})
    with pytest.raises(ValueError, match=r"train.health.patience=0"):
        RunConfig.from_dict({"train": {"health": {"patience": 0}}})


def test_config_is_pure_data_importing_no_component():
    """Kind names are resolved where components are built: config imports nothing of moekit
    but the types floor, not even inside a function."""
    tree = ast.parse(Path(moekit.config.__file__).read_text())
    imported = [
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    ]
    assert imported and not [
        m for m in imported if m and m.startswith("moekit") and m != "moekit.types"
    ]
