"""What a user pays for one MoE layer on CUDA: the whole layer, the span after the router's
top-k, and each stage alone, against the sort + grouped_mm pipeline and the naive loop.

Timed spans (bf16 weights and inputs, float32 router): `layer` is `MoE.__call__` (router, plan,
experts, finish; inference reads no losses or metrics, so none are computed); `layer + losses
and metrics` also reads them, as a training step does; `from top-k` is plan + experts +
combine given the router's experts and weights. The
sort + grouped_mm pipeline is written here as torchtitan does it (argsort by expert, gather,
two `torch._grouped_mm`, index_add), sharing no code with moekit's backends. Used by
`moekit bench kernels --layer true`.

Shape legend: T tokens, K slots per token, S = T * K, E experts, D model dim, H expert hidden.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.bench.baselines import naive_loop
from moekit.config import MoEConfig
from moekit.dispatch import make_plan
from moekit.layer import MoE


def copy_bandwidth(n_bytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write) on the current GPU."""
    from triton.testing import do_bench

    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = float(do_bench(lambda: dst.copy_(src), warmup=10, rep=100, return_mode="median"))
    return 2 * n_bytes / (ms * 1e-3)


def build_layer(shape: dict[str, int], dtype: torch.dtype, seed: int = 0) -> MoE:
    """An inference MoE of the shape (softmax top-k, renormalised as Mixtral / Qwen3)."""
    torch.manual_seed(seed)
    cfg = MoEConfig(
        d_model=shape["D"],
        d_hidden=shape["H"],
        n_experts=shape["E"],
        k=shape["K"],
        backend="triton",
    )
    return MoE(cfg).to("cuda", dtype).eval()


def sorted_grouped_mm(
    x_TD: Tensor, experts_TK: Tensor, weights_TK: Tensor, w1: Tensor, w2: Tensor
) -> Tensor:
    """Sort slots by expert, gather, up GEMM, SwiGLU, down GEMM, weighted index_add."""
    T, K = experts_TK.shape
    E = w1.shape[0]
    order_S = torch.argsort(experts_TK.reshape(-1), stable=True)
    token_S = order_S // K
    counts_E = torch.bincount(experts_TK.reshape(-1), minlength=E)
    ends_E = torch.cumsum(counts_E, 0).to(torch.int32)
    x_SD = x_TD.index_select(0, token_S)
    h_S2H = torch._grouped_mm(x_SD, w1, offs=ends_E)
    gate, up = h_S2H.chunk(2, dim=-1)
    out_SD = torch._grouped_mm(F.silu(gate) * up, w2, offs=ends_E)
    weight_S = weights_TK.reshape(-1)[order_S].to(out_SD.dtype)
    y_TD = torch.zeros_like(x_TD)
    return y_TD.index_add_(0, token_S, out_SD * weight_S[:, None])


def grouped_mm_layer(x_TD: Tensor, router_w: Tensor, w1: Tensor, w2: Tensor, k: int) -> Tensor:
    """The whole pipeline: float32 logits, softmax, top-k, renormalise, then the above."""
    probs_TE = F.linear(x_TD.float(), router_w.float()).softmax(-1)
    top_TK, experts_TK = probs_TE.topk(k, dim=-1)
    weights_TK = top_TK / top_TK.sum(-1, keepdim=True)
    return sorted_grouped_mm(x_TD, experts_TK, weights_TK, w1, w2)


def spans(moe: MoE, x_TD: Tensor) -> dict[str, Callable[[], object]]:
    """Named callables, one per timed span, over one layer and one input."""
    e = moe.experts
    backend = moe.backend(x_TD)
    with torch.no_grad():
        routing = moe.router(x_TD, backend.select)
        E = e.w1.shape[0]
        plan = make_plan(routing.experts, routing.weights, routing.priority, E, backend=backend)
        y_TD, shared_TD, _, _ = moe.compute(x_TD, plan, backend)
    experts_TK, weights_TK = routing.experts, routing.weights
    k = experts_TK.shape[1]

    def top_k_moekit() -> Tensor:
        p = make_plan(experts_TK, weights_TK, weights_TK, e.w1.shape[0], backend=backend)
        return moe.compute(x_TD, p, backend)[0]

    def with_metrics() -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        y, info = moe(x_TD)
        return y, info.aux_loss, info.metrics

    def naive() -> Tensor:
        r = moe.router(x_TD)
        return naive_loop(x_TD, r.experts, r.weights, e.w1, e.w2, "swiglu")

    return {
        "layer: moekit": lambda: moe(x_TD)[0],
        "layer: moekit + losses and metrics": with_metrics,
        "layer: sort + grouped_mm": lambda: grouped_mm_layer(
            x_TD, moe.router.weight, e.w1, e.w2, k
        ),
        "layer: naive loop": naive,
        "from top-k: moekit": top_k_moekit,
        "from top-k: sort + grouped_mm": lambda: sorted_grouped_mm(
            x_TD, experts_TK, weights_TK, e.w1, e.w2
        ),
        "stage 1 router": lambda: moe.router(x_TD, backend.select),
        "stage 2 plan (counting sort)": lambda: make_plan(
            experts_TK, weights_TK, weights_TK, e.w1.shape[0], backend=backend
        ),
        "stage 3 experts": lambda: moe.compute(x_TD, plan, backend)[0],
        "stage 4 finish": lambda: moe.finish(x_TD, y_TD, shared_TD, plan),
    }


GRAPH_SPANS = (
    "layer: moekit",
    "layer: sort + grouped_mm",
    "from top-k: moekit",
    "from top-k: sort + grouped_mm",
    "stage 1 router",
    "stage 2 plan (counting sort)",
    "stage 3 experts",
)


def bench_layer(
    shape: dict[str, int],
    T: int,
    graph: bool,
    median_ms: Callable[[Callable[[], object], bool], float],
) -> list[dict]:
    """Eager (and graph-replay, when `graph`) ms of every span at one (shape, T)."""
    moe = build_layer(shape, torch.bfloat16)
    x_TD = torch.randn(T, shape["D"], device="cuda", dtype=torch.bfloat16)
    rows = []
    with torch.no_grad():
        for name, fn in spans(moe, x_TD).items():
            if name == "layer: naive loop" and T > 4096:
                continue  # minutes of Python loop at this size; the smaller T tell the story
            rows.append({"span": name, "mode": "eager", "ms": median_ms(fn, False)})
            if graph and name in GRAPH_SPANS:
                try:
                    rows.append({"span": name, "mode": "graph", "ms": median_ms(fn, True)})
                except RuntimeError as err:  # a span that does not capture says why
                    print(f"graph capture of {name!r} failed: {err}", flush=True)
    del moe
    return rows
