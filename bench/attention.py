"""Why the 0.7B AR pass stays far from the bf16 matmul peak: the attention kernel.

    python bench/attention.py --out bench/results/attention.json [--flex] [--repeats 5]

At the 0.7B configuration's last 512 px scale (CFG pair: 2 rows, 24 heads, 1,024 queries over
300 text + 2,239 image keys, head dim 64) this times, interleaved in rounds after a warm-up:
  - sdpa: F.scaled_dot_product_attention (the sampler's path; the CPU flash kernel);
  - math: Q K^T, softmax in fp32, P V as three PyTorch calls;
  - chunked: `chunked_attention` below, 256 queries at a time (per row and head, 2-D matmuls in
    the input dtype, softmax in fp32). Its logits are rounded to the input dtype (the flash kernel
    keeps them in fp32); its error against fp32 SDPA is reported. An experiment only: the model
    always runs SDPA;
  - flex: torch.compile(flex_attention), only with --flex (the first compile took 21 s here, 2 to 4 s from the cache);
  - gemm: the block's feed-forward up projection at the same 2,048 rows (2048 x 1536 x 4096),
    the kind of matmul the rest of the block is made of;
in bf16 and fp32, and reports GFLOP/s for each (attention: 4 L S d FLOPs per row and head).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

if __name__ == "__main__":  # run as a script: the package from the repository root, not bench/'s modules
    _here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _here]
    sys.path.insert(0, str(_here.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.measure import interleave, section_machine, stats  # noqa: E402

ROWS, HEADS, QUERIES, KEYS, HEAD_DIM = 2, 24, 1024, 2539, 64
GEMM = (2048, 1536, 4096)
CHUNK = 256


def chunked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                      chunk: int = CHUNK) -> torch.Tensor:
    """Unmasked attention over [B, H, L, d] as plain 2-D matmuls: for every (row, head) pair and
    every block of `chunk` queries, scores = (Q scale) K^T and out = softmax(scores) V, with the
    matmuls in the inputs' dtype and the softmax accumulated in fp32."""
    B, H, L, d = q.shape
    queries = q.reshape(B * H, L, d)
    keys_t = k.reshape(B * H, k.shape[2], d).transpose(1, 2)
    values = v.reshape(B * H, v.shape[2], v.shape[3])
    out = q.new_empty(B * H, L, v.shape[3])
    for pair in range(B * H):
        for first in range(0, L, chunk):
            block = slice(first, min(first + chunk, L))
            scores = torch.mm(queries[pair, block] * scale, keys_t[pair])
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[pair, block] = torch.mm(weights, values[pair])
    return out.view(B, H, L, v.shape[3])


def variants(dtype: torch.dtype, flex: bool, queries: int = QUERIES, keys: int = KEYS) -> tuple[list, dict]:
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(ROWS, HEADS, queries, HEAD_DIM, generator=gen).to(dtype)
    k = torch.randn(ROWS, HEADS, keys, HEAD_DIM, generator=gen).to(dtype)
    v = torch.randn(ROWS, HEADS, keys, HEAD_DIM, generator=gen).to(dtype)
    a = torch.randn(GEMM[0], GEMM[1], generator=gen).to(dtype)
    b = torch.randn(GEMM[1], GEMM[2], generator=gen).to(dtype)
    scale = HEAD_DIM ** -0.5

    def math_attention():
        scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
        return torch.matmul(scores.softmax(-1).to(dtype), v)

    def chunked():
        return chunked_attention(q, k, v, scale, CHUNK)

    out = [("sdpa", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale)),
           ("math", math_attention),
           ("chunked", chunked),
           ("gemm", lambda: torch.mm(a, b))]
    flops = {"sdpa": 4 * ROWS * HEADS * queries * keys * HEAD_DIM, "gemm": 2 * GEMM[0] * GEMM[1] * GEMM[2]}
    flops["math"] = flops["chunked"] = flops["sdpa"]
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), scale=scale)
    errors = {"math": (math_attention().float() - reference).abs().max().item(),
              "sdpa": (out[0][1]().float() - reference).abs().max().item(),
              "chunked": (chunked().float() - reference).abs().max().item()}
    if flex:
        from torch.nn.attention.flex_attention import flex_attention
        compiled = torch.compile(flex_attention)
        start = time.perf_counter()
        errors["flex"] = (compiled(q, k, v, scale=scale).float() - reference).abs().max().item()
        errors["flex_compile_s"] = time.perf_counter() - start
        out.append(("flex", lambda: compiled(q, k, v, scale=scale)))
        flops["flex"] = flops["sdpa"]
    return out, {"flops": flops, "max_abs_error_vs_fp32_sdpa": errors}


def discard(fn):
    """interleave records what a call returns when it is a dict: drop the tensor."""
    def run() -> None:
        fn()
    return run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--flex", action="store_true", help="also time torch.compile(flex_attention)")
    ap.add_argument("--queries", type=int, default=QUERIES, help="smaller for a smoke test")
    ap.add_argument("--keys", type=int, default=KEYS)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"command": " ".join(sys.argv), "machine": section_machine({}), "shape": {
        "rows": ROWS, "heads": HEADS, "queries": args.queries, "keys": args.keys, "head_dim": HEAD_DIM, "gemm_mnk": GEMM},
        "precisions": {}}
    with torch.inference_mode():
        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            fns, info = variants(dtype, args.flex, args.queries, args.keys)
            timed = [(variant, discard(fn)) for variant, fn in fns]
            rounds = interleave(timed, args.repeats, warmup=1, label=f"attention {name}")
            entry = {"seconds": {}, "gflops": {}, **info}
            for variant, _ in fns:
                seconds = [r["wall"] for r in rounds[variant]]
                entry["seconds"][variant] = stats(seconds)
                entry["gflops"][variant] = stats([info["flops"][variant] / s / 1e9 for s in seconds])
            entry["sdpa_rate_over_gemm_rate"] = entry["gflops"]["sdpa"]["median"] / entry["gflops"]["gemm"]["median"]
            result["precisions"][name] = entry
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    for name, entry in result["precisions"].items():
        print(name, {k: round(v["median"]) for k, v in entry["gflops"].items()}, "GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
