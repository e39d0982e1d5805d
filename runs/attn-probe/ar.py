"""The 0.7B AR pass at 512 px in bf16 with the sampler's SDPA against the per-head chunked attention
(bench/attention.py's `chunked`: bf16 logits) swapped in for scales of >= 256 queries; interleaved, with a
2048^3 bf16 GEMM beside them for the peak. Random weights, batch 1, cfg 4.5, hybrid image only.

python runs/attn-probe/ar.py [ROUNDS]
"""
import json, sys
from pathlib import Path
import torch
import torch.nn.functional as F
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import hart.transformer as T
from hart.pipeline import HARTPipeline
from bench.run import column, gemm_timer, hart_runner, interleave, pipeline_macs, stats

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2


def chunked_or_sdpa(q, k, v, attn_mask=None, scale=None, chunk=256):
    if attn_mask is not None or q.dtype != torch.bfloat16 or q.shape[2] < chunk:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, scale=scale)
    out = torch.empty_like(q)
    for row in range(q.shape[0]):
        for head in range(q.shape[1]):
            keys_t, values = k[row, head].t(), v[row, head]
            for start in range(0, q.shape[2], chunk):
                scores = torch.mm(q[row, head, start:start + chunk] * scale, keys_t)
                out[row, head, start:start + chunk] = torch.mm(scores.softmax(-1, dtype=torch.float32).to(q.dtype), values)
    return out


class ChunkedF:
    scaled_dot_product_attention = staticmethod(chunked_or_sdpa)

    def __getattr__(self, name):
        return getattr(F, name)


pipe = HARTPipeline.from_preset("hart-0.7b")
pipe.autocast_dtype = torch.bfloat16
macs = pipeline_macs(pipe, resolution=512, num_images=1, seed=0, decode_discrete=False)
gen = hart_runner(pipe, 512, 1, decode_discrete=False)


def with_attention(module):
    def run():
        T.F = module
        try:
            return gen()
        finally:
            T.F = F
    return run


gemm = gemm_timer(2048, torch.bfloat16)
out = interleave([("sdpa", with_attention(F)), ("chunked", with_attention(ChunkedF())), ("gemm_bf16", gemm)],
                 rounds, warmup=1, label="ar 0.7B bf16")
peak = stats(column(out["gemm_bf16"], "gflops"))
result = {"command": " ".join(sys.argv), "ar_gflop": 2 * macs["ar"] / 1e9, "bf16_gemm_gflops": peak}
for name in ("sdpa", "chunked"):
    ar = stats(column(out[name], "ar"))
    result[name] = {"ar_s": ar, "total_s": stats(column(out[name], "total")),
                    "ar_gflops": 2 * macs["ar"] / ar["median"] / 1e9,
                    "ar_fraction_of_bf16_gemm": 2 * macs["ar"] / ar["median"] / 1e9 / peak["median"]}
print(json.dumps(result, indent=1))
