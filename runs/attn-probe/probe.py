"""Can plain PyTorch beat CPU SDPA in bf16 at the 0.7B last scale? (CFG pair, 24 heads, 1,024 queries
over 2,539 keys, head dim 64.) Variants interleaved, median of ROUNDS after a warm-up.

python runs/attn-probe/probe.py [ROUNDS]
"""
import statistics, sys, time
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
B, H, Q, K, D = 2, 24, 1024, 2539, 64
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(B, H, n, D, generator=g).bfloat16() for n in (Q, K, K))
flops = 4 * B * H * Q * K * D


def sdpa():
    return F.scaled_dot_product_attention(q, k, v)


def per_head(chunk):
    def run():
        out = torch.empty_like(q)
        scale = D ** -0.5
        for b in range(B):
            for h in range(H):
                kt, vh = k[b, h].t(), v[b, h]
                for s in range(0, Q, chunk):
                    scores = torch.mm(q[b, h, s:s + chunk], kt).float().mul_(scale)
                    out[b, h, s:s + chunk] = torch.mm(scores.softmax(-1).bfloat16(), vh)
        return out
    return run


def sdpa_per_head():
    out = torch.empty_like(q)
    for b in range(B):
        out[b] = F.scaled_dot_product_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1])[0]
    return out


def qk_only():
    return torch.matmul(q, k.transpose(-1, -2))


variants = {"sdpa": sdpa, "sdpa_fp32": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float()),
            "per_head_256": per_head(256), "per_head_1024": per_head(1024), "sdpa_per_cfg_row": sdpa_per_head,
            "qk_matmul_only(half the flops)": qk_only}
ref = sdpa().float()
for name, fn in variants.items():
    if "only" not in name:
        err = (fn().float() - ref).abs().max().item()
        print(f"{name}: max |diff| vs sdpa {err:.4f}")
times = {n: [] for n in variants}
for _ in range(rounds):
    for name, fn in variants.items():
        t = time.perf_counter(); fn(); times[name].append(time.perf_counter() - t)
for name, ts in times.items():
    m = statistics.median(ts)
    f = flops / 2 if "only" in name else flops
    print(f"{name}: {m * 1e3:.1f} ms, {f / m / 1e9:.0f} GFLOP/s")
