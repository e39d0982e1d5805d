"""Probe: does fusing the 0.7B block's elementwise work (RMSNorm + cast, RoPE + cast, SiLU * up, residual add
+ next norm) with torch.compile speed up the bf16 AR pass? Random weights, 512 px, batch 1, cfg 4.5, hybrid image
only; eager vs fused interleaved after warm-up; also the largest pixel difference of the two images.

PYTHONPATH=. python runs/ar-profile/fused.py [ROUNDS]
"""
import sys, time
import torch
import torch.nn.functional as F
import hart.transformer as T
from hart.pipeline import HARTPipeline

torch.set_num_threads(2)
rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
LOW = torch.bfloat16


@torch.compile(dynamic=True)
def norm_low(x, w, eps: float):
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * w).to(LOW)


@torch.compile(dynamic=True)
def add_norm_low(x, y, w, eps: float):
    x = x + y
    x32 = x.float()
    return x, (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + eps) * w).to(LOW)


@torch.compile(dynamic=True)
def rope_low(q, k, cos, sin):
    def rot(t):
        a, b = t.float().chunk(2, dim=-1)
        return torch.cat([-b, a], dim=-1)
    return (q.float() * cos + rot(q) * sin).to(LOW), (k.float() * cos + rot(k) * sin).to(LOW)


@torch.compile(dynamic=True)
def silu_mul(g, u):
    return F.silu(g) * u


def attn_fused(self, h, cos, sin, cache, layer):
    B, L, C = h.shape
    bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
    qkv = F.linear(h, self.qkv_proj.weight, bias).view(B, L, 3, self.heads, self.head_dim)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q, k = rope_low(q, k, cos, sin)
    k, v = cache.append(layer, k, v)
    out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
    return self.proj(out.transpose(1, 2).reshape(B, L, C))


def block_fused(self, x, cos, sin, mask=None, cache=None, layer=0):
    if mask is not None or cache is None or not torch.is_autocast_enabled("cpu"):
        return eager_forward(self, x, cos, sin, mask, cache, layer)
    w, eps = self.ln_wo_grad.weight, self.ln_wo_grad.eps
    a = attn_fused(self.attn, norm_low(x, w, eps), cos, sin, cache, layer)
    x, h = add_norm_low(x, a, w, eps)
    f = self.ffn
    return x + f.down_proj(silu_mul(f.gate_proj(h), f.up_proj(h)))


eager_forward = T.Block.forward
pipe = HARTPipeline.from_preset("hart-0.7b")
pipe.autocast_dtype = torch.bfloat16


def gen(fused):
    T.Block.forward = block_fused if fused else eager_forward
    try:
        r = pipe("a red apple", resolution=512, seed=0, decode_discrete=False)
    finally:
        T.Block.forward = eager_forward
    return r


t = time.perf_counter(); img_e = gen(False); print("eager warm-up", round(time.perf_counter() - t, 1), flush=True)
t = time.perf_counter(); img_f = gen(True); print("fused warm-up (compile)", round(time.perf_counter() - t, 1), flush=True)
import numpy as np
diff = np.abs(np.asarray(img_e.images[0], dtype=int) - np.asarray(img_f.images[0], dtype=int)).max()
print("max pixel difference eager vs fused:", diff)
for r in range(rounds):
    order = [False, True] if r % 2 == 0 else [True, False]
    for fused in order:
        res = gen(fused)
        print(f"round {r} {'fused' if fused else 'eager'} ar {res.timings['ar']:.2f} total {res.timings['total']:.2f}", flush=True)
