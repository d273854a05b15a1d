"""The transformers peer of the serving benchmark: the same weights, generated as users would.

Configurations (`PEERS`):
- dynamic: `generate` on c prompts at once, with transformers' default (dynamic) cache;
- static: the same with a static cache (`cache_implementation="static"`), not compiled;
- static-compile: a static cache, whose decode step `generate` compiles with `torch.compile`;
- continuous: transformers' continuous batching (`generate_batch`), where the version has it.

The model is the moekit checkpoint exported to a Hugging Face one (`export_transformers`) and
read by transformers. Each concurrency level: c prompts of `prompt_len` random tokens,
`max_new` greedy tokens each (no end-of-sequence token), an untimed warm-up run of the same
shape (it compiles), then a timed run; tokens/s = generated tokens / seconds. Each level is a
JSON line in `out` as soon as it ends, so a run stopped at its deadline keeps what it
measured. The first line checks the weights: the peer's logits against moekit's on one prompt.

    python -m moekit.bench.serve_peer CKPT HF_DIR --peer static-compile --concurrency 32,1 \
        --out p.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
import traceback
from pathlib import Path
from typing import Any

import torch

PEERS = ("dynamic", "static", "static-compile", "continuous")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(hf: Any, peer: str, ids: torch.Tensor, max_new: int) -> int:
    """One batched generation; returns the tokens generated."""
    from transformers import GenerationConfig

    if peer == "continuous":
        cfg = GenerationConfig(max_new_tokens=max_new, do_sample=False, eos_token_id=-1)
        out = hf.generate_batch(inputs=ids.tolist(), generation_config=cfg, progress_bar=False)
        return sum(len(r.generated_tokens) for r in out.values())
    kw: dict[str, Any] = dict(max_new_tokens=max_new, min_new_tokens=max_new, do_sample=False)
    kw |= {"pad_token_id": 0, "eos_token_id": None}
    if peer in ("static", "static-compile"):
        kw["cache_implementation"] = "static"
        kw["disable_compile"] = peer == "static"
    out = hf.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    return (out.shape[1] - ids.shape[1]) * ids.shape[0]


def check_weights(model: Any, hf: Any, prompt_len: int) -> dict[str, float]:
    """moekit vs transformers logits on one random prompt: relative error, top-1 agreement."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (1, prompt_len), generator=g).to(
        model.head.weight.device
    )
    with torch.no_grad():
        ours, theirs = model(x).out.float(), hf(x).logits.float()
    rel = ((ours - theirs).norm() / ours.norm()).item()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    return {"relative_error": rel, "top1_agreement": top1}


def run_peer(
    ckpt: str,
    hf_dir: str,
    peer: str,
    concurrency: list[int],
    prompt_len: int,
    max_new: int,
    out: str | Path,
    device: str = "cuda",
    dtype: str = "bf16",
) -> None:
    """Measure `peer` at each concurrency level, appending one JSON line per level to `out`."""
    from moekit.bench.serve_models import load_transformers
    from moekit.model.store import load, parse_dtype

    if peer not in PEERS:
        raise ValueError(f"peer={peer!r} is not one of {PEERS}")
    path = Path(out)

    def write(row: dict[str, Any]) -> None:
        with path.open("a") as f:
            f.write(json.dumps({"peer": peer, **row}) + "\n")

    dev = torch.device(device)
    model = load(ckpt, dev, dtype)
    t0 = time.perf_counter()
    hf = load_transformers(hf_dir, dev, parse_dtype(dtype) or torch.float32)
    check = check_weights(model, hf, min(prompt_len, 128))
    write({"check": check, "load_s": time.perf_counter() - t0})
    vocab = model.cfg.vocab_size
    del model
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    g = torch.Generator().manual_seed(0)
    for c in concurrency:
        ids = torch.randint(0, vocab, (c, prompt_len), generator=g).to(dev)
        try:
            start = time.perf_counter()
            _generate(hf, peer, ids, max_new)  # warm-up: compiles, captures, tunes
            _sync(dev)
            warm = time.perf_counter() - start
            start = time.perf_counter()
            tokens = _generate(hf, peer, ids, max_new)
            _sync(dev)
            wall = time.perf_counter() - start
        except Exception as err:  # a configuration this version cannot run: say so, go on
            write({"concurrency": c, "error": f"{type(err).__name__}: {err}"[:500]})
            traceback.print_exc()
            continue
        write(
            {
                "concurrency": c,
                "tokens": tokens,
                "wall_s": wall,
                "tokens_per_s": tokens / wall,
                "warmup_s": warm,
            }
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m moekit.bench.serve_peer", description=__doc__)
    p.add_argument("ckpt", help="the moekit checkpoint")
    p.add_argument("hf_dir", help="the same weights as a Hugging Face checkpoint")
    p.add_argument("--peer", required=True, choices=PEERS)
    p.add_argument("--concurrency", default="32,1,8,64", help="levels, in the order to run them")
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--max-new", type=int, default=256)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--out", required=True, help="JSON-lines file to append to")
    a = p.parse_args(argv)
    levels = [int(c) for c in a.concurrency.split(",") if c]
    run_peer(a.ckpt, a.hf_dir, a.peer, levels, a.prompt_len, a.max_new, a.out, a.device, a.dtype)


if __name__ == "__main__":
    main()
