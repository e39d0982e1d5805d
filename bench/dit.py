"""An equal-size diffusion-transformer baseline for the HART benchmarks (compute model only).

HART's paper compares its latency, throughput and MACs with diffusion transformers. To make
that comparison on the same machine, with the same latent grid, text encoder and decoder,
this module builds a DiT-style text-conditioned denoiser whose size is tied to a given HART
transformer configuration:

* width C, depth and number of heads equal the HART transformer's;
* patch size 1 on HART's latent grid: a P x P latent of `token_dim` channels becomes P^2
  tokens (`x_embed`: Linear(token_dim, C)), plus fixed 2D sin-cos positions (no parameters),
  so the same weights run every resolution of the HART model;
* conditioning: the diffusion step goes through a sinusoid + MLP embedder; the text states
  are projected to C (`context_embed`) and max-pooled over the slots (HART pools its head
  condition the same way); their sum c drives adaLN-zero modulation (shift, scale, gate for
  the self-attention and for the MLP; gates start at zero, so every block starts as the
  identity), and the projected states are the keys/values of a cross-attention in every block
  (computed once per sample by `encode_text`, not at every step: the text does not change);
* block: x += gate1 * SelfAttn(mod(LN(x))); x += CrossAttn(LN(x), text); x += gate2 * MLP(mod(LN(x)))
  with a GELU MLP (fc1, fc2) whose hidden width is solved for so that the *total* parameter
  count equals the HART transformer's (which includes its residual diffusion head);
* output: epsilon for each latent channel (no learned variance), sampled with deterministic
  DDIM over a respaced cosine schedule and classifier-free guidance run as one batch of
  cond + uncond rows (2B rows per step), the unconditional rows seeing all-zero text states
  as HART's do.

Modulation. DiT proper gives every block its own Linear(C, 6C) (`modulation="block"`).
That alone costs 6 C^2 per block, and with the 8 C^2 of self- plus cross-attention it leaves
no room for an MLP at HART's shapes (at 0.7B: 14 C^2 x 24 blocks = 793M > the 732M HART
transformer). The default is therefore PixArt-alpha's "adaLN-single": one shared
Linear(C, 6C) on c, plus a learned per-block [6, C] offset table; the zero-initialised gates
are kept (adaLN-zero). Its cost per denoiser call is one C x 6C product per sample, which is
negligible next to the token work, so the MAC comparison does not depend on this choice.

The weights are random: the model exists to measure cost (time, MACs, memory) at equal size,
not image quality.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from hart.diffusion import Schedule
from hart.layers import TimestepEmbedder, modulate
from hart.transformer import TransformerConfig

MODULATIONS = ("single", "block")


@dataclass
class DiTConfig:
    token_dim: int            # latent channels per token (HART's token_dim / Cvae)
    context_dim: int          # width of the text-encoder states
    embed_dim: int            # C, equal to the HART transformer's
    depth: int
    num_heads: int
    mlp_hidden: int           # solved by `match_hart` for equal parameter count
    modulation: str = "single"  # "single" (adaLN-single, shared) or "block" (DiT, per block)
    freq_dim: int = 256       # sinusoid width of the step embedder

    def __post_init__(self):
        if self.modulation not in MODULATIONS:
            raise ValueError(f"modulation must be one of {MODULATIONS}, got {self.modulation!r}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.mlp_hidden < 1:
            raise ValueError(f"mlp_hidden must be >= 1, got {self.mlp_hidden}")


def sincos_2d(side: int, dim: int, device=None) -> torch.Tensor:
    """Fixed 2D sin-cos position features [side^2, dim] (half for rows, half for columns)."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    coords = torch.arange(side, dtype=torch.float32, device=device)
    rows, cols = coords.repeat_interleave(side), coords.repeat(side)
    parts = []
    for axis in (rows, cols):
        angles = axis[:, None] * omega[None]
        parts += [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=1)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class CrossAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def project_text(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, H, Lc, d] of the text states: fixed for a whole sample."""
        B, Lc, C = context.shape
        return self.kv(context).view(B, Lc, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)

    def forward(self, x: torch.Tensor, text_kv: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        B, L, C = x.shape
        q = self.q(x).view(B, L, self.heads, C // self.heads).transpose(1, 2)
        k, v = text_kv
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        C = cfg.embed_dim
        self.norm1 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(C, cfg.num_heads)
        self.norm2 = nn.LayerNorm(C, eps=1e-6)
        self.cross_attn = CrossAttention(C, cfg.num_heads)
        self.norm3 = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(C, cfg.mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(cfg.mlp_hidden, C))
        if cfg.modulation == "block":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        else:
            self.scale_shift_table = nn.Parameter(torch.zeros(6, C))

    def modulation(self, c: torch.Tensor, shared: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        """Six [B, 1, C] vectors: shift, scale, gate (self-attention), shift, scale, gate (MLP)."""
        if shared is None:
            mod = self.adaLN_modulation(c)[:, None]                 # [B, 1, 6C]
        else:
            mod = (shared + self.scale_shift_table.flatten())[:, None]
        return mod.chunk(6, dim=-1)

    def forward(self, x, c, shared, text_kv):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c, shared)
        x = x + gate1 * self.attn(modulate(self.norm1(x), shift1, scale1))
        x = x + self.cross_attn(self.norm2(x), text_kv)
        return x + gate2 * self.mlp(modulate(self.norm3(x), shift2, scale2))


class FinalLayer(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        C = cfg.embed_dim
        self.norm = nn.LayerNorm(C, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(C, cfg.token_dim)
        if cfg.modulation == "block":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(C, 2 * C))
        else:
            self.scale_shift_table = nn.Parameter(torch.zeros(2, C))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "adaLN_modulation"):
            shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)
        else:  # adaLN-single: the final layer modulates with c itself plus its own table
            shift, scale = (c[:, None] + self.scale_shift_table[None]).chunk(2, dim=1)  # [B, 1, C] each
        return self.linear(modulate(self.norm(x), shift, scale))


class DiT(nn.Module):
    """epsilon = DiT(x_t [B, token_dim, P, P], t [B] (0..999), text states [B, Lc, context_dim])."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        C = cfg.embed_dim
        self.x_embed = nn.Linear(cfg.token_dim, C)
        self.t_embed = TimestepEmbedder(C, cfg.freq_dim)
        self.context_embed = nn.Linear(cfg.context_dim, C)
        if cfg.modulation == "single":
            self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)
        self._positions: dict[tuple, torch.Tensor] = {}
        self.initialize_weights()

    def initialize_weights(self):
        """DiT's init: Xavier linears, N(0, 0.02) step MLP, zero modulations and output."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embed.mlp[2].weight, std=0.02)
        zero = [self.final_layer.linear]
        if self.config.modulation == "single":
            zero.append(self.t_block[-1])
        else:
            zero += [b.adaLN_modulation[-1] for b in self.blocks] + [self.final_layer.adaLN_modulation[-1]]
        for m in zero:
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)

    def positions(self, side: int, like: torch.Tensor) -> torch.Tensor:
        key = (side, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_2d(side, self.config.embed_dim, like.device).to(like.dtype)
        return self._positions[key]

    def encode_text(self, context: torch.Tensor) -> dict:
        """Everything the denoiser needs from the text states [B, Lc, Dt] that does not change
        across diffusion steps: the pooled condition and every block's cross-attention keys and
        values. Computed once per sample (a fair baseline does not redo it every step)."""
        text = self.context_embed(context.to(self.x_embed.weight.dtype))  # [B, Lc, C]
        return {"pooled": text.max(dim=1).values, "kv": [b.cross_attn.project_text(text) for b in self.blocks]}

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor | None = None,
                text: dict | None = None) -> torch.Tensor:
        """Give either the text states `context` or their `encode_text` output `text`."""
        B, D, P, _ = x.shape
        if text is None:
            text = self.encode_text(context)
        h = self.x_embed(x.flatten(2).transpose(1, 2).to(self.x_embed.weight.dtype))  # [B, P^2, C]
        h = h + self.positions(P, h)
        c = self.t_embed(t) + text["pooled"]                        # [B, C]
        shared = self.t_block(c) if self.config.modulation == "single" else None
        for block, kv in zip(self.blocks, text["kv"]):
            h = block(h, c, shared, kv)
        out = self.final_layer(h, c)                                # [B, P^2, D]
        return out.transpose(1, 2).reshape(B, D, P, P)


# --------------------------------------------------------------------------- sizing

def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _meta_count(cfg: DiTConfig) -> int:
    with torch.device("meta"):
        return count_params(DiT(cfg))


def hart_param_count(cfg: TransformerConfig) -> int:
    """Parameters of a HARTTransformer (its residual diffusion head included), built on meta."""
    from hart.transformer import HARTTransformer
    with torch.device("meta"):
        return count_params(HARTTransformer(cfg))


def match_hart(cfg: TransformerConfig, modulation: str = "single", target: int | None = None) -> DiTConfig:
    """DiT config with the HART transformer's width, depth and heads, and the MLP hidden width
    for which its parameter count is closest to `target` (default: the HART transformer's).

    The count is affine in the hidden width, so two meta-device builds give it exactly."""
    target = hart_param_count(cfg) if target is None else int(target)
    base = DiTConfig(token_dim=cfg.token_dim, context_dim=cfg.context_dim, embed_dim=cfg.embed_dim,
                     depth=cfg.depth, num_heads=cfg.num_heads, mlp_hidden=1, modulation=modulation)
    at1, at2 = _meta_count(base), _meta_count(replace(base, mlp_hidden=2))
    per_unit = at2 - at1
    hidden = round((target - at1) / per_unit) + 1
    if hidden < 1:
        raise ValueError(f"a DiT with modulation={modulation!r} at width {cfg.embed_dim} and depth {cfg.depth} "
                         f"already has {at1 - per_unit:,} parameters without its MLP, more than the "
                         f"{target:,} to match")
    return replace(base, mlp_hidden=hidden)


# --------------------------------------------------------------------------- sampling

class DDIMSampler:
    """Deterministic DDIM over a `steps`-step respacing of the 1000-step cosine schedule (the
    same respacing the HART residual head uses), with batched classifier-free guidance:
    eps = eps_u + s (eps_c - eps_u), s = 1 + cfg (HART's convention (1 + cfg) c - cfg u)."""

    def __init__(self, model: DiT, steps: int, cfg: float):
        self.model, self.steps, self.cfg = model, int(steps), float(cfg)
        sched = Schedule.cosine(self.steps)
        self.timesteps = [int(t) for t in sched.timesteps]
        self.alpha_bar = [float(a) for a in sched.alphas_cumprod]
        self.alpha_bar_prev = [float(a) for a in sched.alphas_cumprod_prev]

    def rows(self, context: torch.Tensor) -> dict:
        """The per-sample text part (`DiT.encode_text`) for conditional rows followed by
        unconditional rows (all-zero states), as every step's denoiser call sees them."""
        rows = torch.cat([context, torch.zeros_like(context)]) if self.cfg != 0 else context
        return self.model.encode_text(rows)

    def step(self, x: torch.Tensor, n: int, text_rows: dict) -> torch.Tensor:
        """Denoising step n (0 = the noisiest) of x [B, D, P, P]; text_rows from `rows`."""
        i = self.steps - 1 - n
        B = x.shape[0]
        guided = text_rows["pooled"].shape[0] == 2 * B
        inp = torch.cat([x, x]) if guided else x
        t = torch.full((inp.shape[0],), self.timesteps[i], dtype=torch.long, device=x.device)
        eps = self.model(inp, t, text=text_rows).to(x.dtype)
        if guided:
            eps = eps[B:] + (1 + self.cfg) * (eps[:B] - eps[B:])
        a, a_prev = self.alpha_bar[i], self.alpha_bar_prev[i]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps

    def noise(self, batch: int, side: int, generator: torch.Generator | None = None, device=None,
              dtype=torch.float32) -> torch.Tensor:
        D = self.model.config.token_dim
        return torch.randn(batch, D, side, side, generator=generator, device=device, dtype=dtype)

    @torch.inference_mode()
    def sample(self, context: torch.Tensor, side: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """All `steps` steps for text states [B, Lc, Dt] -> latent [B, token_dim, side, side]."""
        rows = self.rows(context)
        x = self.noise(context.shape[0], side, generator, context.device)
        for n in range(self.steps):
            x = self.step(x, n, rows)
        return x
