"""Error of bf16 attention paths against fp64 attention on the fp32 q, k, v *before* bf16 rounding (what an
fp32 model computes), relative to the output's RMS. 0.7B last-scale shapes, one CFG row, logits std ~3.

python runs/attn-probe/accuracy.py
"""
import torch
import torch.nn.functional as F

torch.set_num_threads(2)
H, Q, K, D = 24, 1024, 2539, 64
g = torch.Generator().manual_seed(0)
q32 = torch.randn(1, H, Q, D, generator=g) * 3
k32, v32 = (torch.randn(1, H, K, D, generator=g) for _ in range(2))
scale = D ** -0.5
ref = torch.softmax((q32.double() * scale) @ k32.double().transpose(-1, -2), -1) @ v32.double()
q, k, v = q32.bfloat16(), k32.bfloat16(), v32.bfloat16()
rms = ref.square().mean().sqrt().item()


def per_head(chunk=256):
    out = torch.empty_like(q)
    for h in range(H):
        kt, vh = k[0, h].t(), v[0, h]
        for s in range(0, Q, chunk):
            scores = torch.mm(q[0, h, s:s + chunk] * scale, kt)
            out[0, h, s:s + chunk] = torch.mm(scores.softmax(-1, dtype=torch.float32).bfloat16(), vh)
    return out


for name, out in {"fp32 sdpa": F.scaled_dot_product_attention(q32, k32, v32, scale=scale),
                  "bf16 sdpa": F.scaled_dot_product_attention(q, k, v, scale=scale),
                  "bf16 per-head chunked": per_head()}.items():
    err = out.double() - ref
    print(f"{name}: error rms {err.square().mean().sqrt().item() / rms:.4f}, max {err.abs().max().item() / rms:.4f}")
