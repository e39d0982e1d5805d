"""Scalable-resolution AR transformer: text-state prefix, next-scale prediction of discrete
tokens, and the condition for the residual diffusion head.

Module names follow the official `HARTForT2I` state dict, so its keys load as they are.
Positions: 1D RoPE over text slots, 2D RoPE for image tokens on the finest grid (coarser
scales sit on it at interpolated coordinates), so one set of weights runs any schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .diffusion import RESIDUAL_SCALE, ResidualDiffusionHead
from .layers import RMSNorm, TimestepEmbedder


@dataclass
class TransformerConfig:
    vocab_size: int = 4096            # codebook size V (from the tokenizer)
    token_dim: int = 32               # latent width Cvae (from the tokenizer)
    context_token: int = 300          # text slots the text encoder pads to
    context_dim: int = 1536           # width of the text-encoder states
    embed_dim: int = 1536             # transformer width C
    depth: int = 24
    num_heads: int = 24
    mlp_ratio: float = 4.0
    mlp_hidden: int = 0               # 0: the official rounding int(2/3 C ratio + 255) // 256 * 256
    norm_eps: float = 1e-6
    use_context_norm: bool = False
    rope_theta: float = 10000.0
    attn_scale: float = 0.25          # softmax scale = attn_scale / sqrt(head_dim), as released
    patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)
    diff_width: int = 1024
    diff_depth: int = 6
    diff_hidden: int = 0              # inner width of the head's block MLPs (0: diff_width, the official head)
    num_sampling_steps: int = 8
    residual_scale: float = RESIDUAL_SCALE  # residual / scale is what the head models: aim for std ~0.2
    resolution_sides: tuple[int, ...] = ()  # finest-grid sides with a learned text-slot vector (text_level)
    # finest-grid sides whose last scale the residual head produces alone: no token is drawn there,
    # the head sees that scale's hidden states with a zero code, and models all the coarser scales
    # leave of the latent (for a last scale too fine for the transformer to predict token by token)
    continuous_last_sides: tuple[int, ...] = ()
    # k > 0: the head's condition also sees a k x k neighbourhood of the last scale's conditions
    # (ResidualDiffusionHead.context_kernel; 0 in the official model)
    head_context: int = 0

    def __post_init__(self):
        self.patch_nums = tuple(self.patch_nums)
        self.resolution_sides = tuple(self.resolution_sides)
        self.continuous_last_sides = tuple(self.continuous_last_sides)
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if (self.embed_dim // self.num_heads) % 4:
            raise ValueError("head_dim must be a multiple of 4 for the 2D RoPE")

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return int(2 * self.embed_dim * self.mlp_ratio / 3 + 255) // 256 * 256


# --------------------------------------------------------------------------- RoPE

def rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def text_rope_angles(position_ids: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Text slots: [B, L] positions -> [B, L, d] angles [p w, p w], w_j = theta^(-2j/d)."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim)
    angles = position_ids.float()[..., None] * inv_freq
    return torch.cat([angles, angles], dim=-1)


def image_rope_angles(side: int, finest: int, offset: torch.Tensor, head_dim: int,
                      theta: float = 10000.0) -> torch.Tensor:
    """Image tokens of a side x side scale -> [B, side^2, d] angles on the finest grid.

    Token (r, c) sits at (r P/side + o, c P/side + o), o = the last text slot's position. The
    angle vector is [a w, a w, b w, b w] with w_j = theta^(-4j/d): the official layout, which
    pairs dimension i with i + d/2 and so mixes the two axes across the halves."""
    quarter = torch.arange(0, head_dim, 4, dtype=torch.float32, device=offset.device)
    omega = theta ** (-quarter / head_dim)
    coords = torch.arange(side, dtype=torch.float32, device=offset.device) * (finest / side)
    rows = coords.repeat_interleave(side)
    cols = coords.repeat(side)
    a = (rows[None] + offset.float()[:, None])[..., None] * omega
    b = (cols[None] + offset.float()[:, None])[..., None] * omega
    return torch.cat([a, a, b, b], dim=-1)


def sequence_rope_angles(position_ids: torch.Tensor, scale_sizes, head_dim: int, theta: float,
                         first_scale: int = 1) -> torch.Tensor:
    """Angles for [text slots ; image tokens of scales first_scale..S-1] (the training layout)."""
    parts = [text_rope_angles(position_ids, head_dim, theta)] if first_scale == 1 else []
    offset = position_ids[:, -1]
    for side in scale_sizes[first_scale:]:
        parts.append(image_rope_angles(side, scale_sizes[-1], offset, head_dim, theta))
    return torch.cat(parts, dim=1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, L, d]; cos/sin [B, 1, L, d]."""
    return x * cos + rotate_half(x) * sin


# --------------------------------------------------------------------------- blocks

class KVCache:
    """Pre-allocated keys/values (after RoPE) for every block, filled scale by scale."""

    def __init__(self, depth: int, batch: int, heads: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, heads, max_len, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(depth)]
        self.length = 0  # filled slots; advanced once per step by the model

    def rows(self, start: int, end: int) -> "KVCache":
        """A cache over batch rows start:end that shares this one's storage (its writes land here)."""
        view = KVCache.__new__(KVCache)
        view.keys = [k[start:end] for k in self.keys]
        view.values = [v[start:end] for v in self.values]
        view.length = self.length
        return view

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length:end] = k
        self.values[layer][:, :, self.length:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        C, self.heads, self.head_dim = cfg.embed_dim, cfg.num_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(C, 3 * C, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(C))
        self.v_bias = nn.Parameter(torch.zeros(C))
        self.register_buffer("zero_k_bias", torch.zeros(C), persistent=False)
        self.proj = nn.Linear(C, C)
        self.scale = cfg.attn_scale / math.sqrt(self.head_dim)

    def forward(self, x, cos, sin, mask=None, cache: KVCache | None = None, layer: int = 0):
        B, L, C = x.shape
        bias = torch.cat([self.q_bias, self.zero_k_bias, self.v_bias])
        qkv = F.linear(x, self.qkv_proj.weight, bias).view(B, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, d]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.append(layer, k, v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(B, L, C))


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm block; one RMSNorm weight (`ln_wo_grad`) serves both sub-layers, as released."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln_wo_grad = RMSNorm(cfg.embed_dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn = SwiGLU(cfg.embed_dim, cfg.ffn_hidden)

    def forward(self, x, cos, sin, mask=None, cache=None, layer=0):
        x = x + self.attn(self.ln_wo_grad(x), cos, sin, mask, cache, layer)
        return x + self.ffn(self.ln_wo_grad(x))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.ln_wo_grad = RMSNorm(dim, eps)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).chunk(2, dim=-1)
        return self.ln_wo_grad(x) * (1 + scale) + shift


# --------------------------------------------------------------------------- model

class HARTTransformer(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.config = cfg
        C = cfg.embed_dim
        self.context_norm = RMSNorm(cfg.context_dim, cfg.norm_eps) if cfg.use_context_norm else nn.Identity()
        self.context_embed = nn.Linear(cfg.context_dim, C)
        self.word_embed = nn.Linear(cfg.token_dim, C)
        self.lvl_embed = TimestepEmbedder(C)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps)
        self.head = nn.Linear(C, cfg.vocab_size)
        self.decoder_norm = RMSNorm(C, cfg.norm_eps)
        self.diffloss = ResidualDiffusionHead(cfg.token_dim, C, cfg.diff_width, cfg.diff_depth,
                                              cfg.num_sampling_steps, cfg.residual_scale, cfg.diff_hidden,
                                              cfg.head_context)
        # not in the official model (none there): one vector per trained resolution, zero at first
        self.resolution_embed = (nn.Parameter(torch.zeros(len(cfg.resolution_sides), C))
                                 if cfg.resolution_sides else None)
        self.initialize_weights()

    def initialize_weights(self):
        """VAR-style init for training from scratch (the diffusion head inits itself)."""
        std = math.sqrt(1 / self.config.embed_dim / 3)
        for name, m in self.named_modules():
            if name.startswith("diffloss"):
                continue
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            block.attn.proj.weight.data.div_(math.sqrt(2 * self.config.depth))
            block.ffn.down_proj.weight.data.div_(math.sqrt(2 * self.config.depth))
        self.head.weight.data.mul_(0.02)
        self.head_nm.ada_lin[-1].weight.data.mul_(0.5)

    # ---- pieces
    def embed_context(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Text states [B, Lc, Dt] -> (prefix tokens [B, Lc, C], pooled head condition [B, 1, C])."""
        cond = self.context_embed(self.context_norm(context))
        return cond, cond.max(dim=1, keepdim=True).values

    def text_level(self, level0: torch.Tensor, finest: int) -> torch.Tensor:
        """What every text slot adds to its state: the level-0 embedding [1, C], plus the learned
        vector of the nearest trained resolution (by finest-grid side) when the model has them.

        The 1x1 token is predicted from the text slots alone, and the same image tokenizes to
        different coarse tokens at different resolutions; without a resolution signal a model
        trained at two resolutions must give the same first-token distribution at both."""
        sides = self.config.resolution_sides
        if not sides:
            return level0
        nearest = min(range(len(sides)), key=lambda i: abs(sides[i] - finest))
        return level0 + self.resolution_embed[nearest].to(level0.dtype)

    def logits(self, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(self.head_nm(hidden.float(), pooled.float())).float()

    def diffusion_condition(self, hidden_last: torch.Tensor, codes_last: torch.Tensor | None,
                            context: bool = True) -> torch.Tensor:
        """z = decoder_norm(h + word_embed(code)) for each last-scale token [B, P^2, C]; codes None =
        zero codes (a last scale in `continuous_last_sides`, where no token is drawn). With `context`
        the head's context convolution is applied (a no-op for heads without one)."""
        if codes_last is None:
            codes_last = hidden_last.new_zeros(*hidden_last.shape[:-1], self.config.token_dim)
        z = self.decoder_norm(hidden_last + self.word_embed(codes_last))
        return self.diffloss.contextualize(z) if context else z

    def continuous_last(self, scale_sizes) -> bool:
        """Whether the last scale of this schedule draws no tokens (the residual tokens produce it)."""
        return scale_sizes[-1] in self.config.continuous_last_sides

    def drawn_scales(self, scale_sizes) -> int:
        """How many scales of this schedule draw tokens (all but a continuous last one)."""
        return len(scale_sizes) - 1 if self.continuous_last(scale_sizes) else len(scale_sizes)

    def _rope(self, angles: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]

    # ---- teacher forcing (training)
    def forward(self, context: torch.Tensor, position_ids: torch.Tensor, image_inputs: torch.Tensor,
                scale_sizes, keep_last: torch.Tensor | None = None):
        """Teacher-forced pass over the whole sequence with the block-causal mask.

        context [B, Lc, Dt]; image_inputs [B, L - 1, Cvae] (scales 1..S-1, row-major);
        keep_last [B, K]: indices of the last-scale tokens to keep (token dropping), or None.
        Returns (logits [B, 1 + kept image tokens, V] from the last text slot on,
                 last-scale hidden states [B, K or P^2, C], pooled condition)."""
        B, Lc, _ = context.shape
        device = context.device
        cond, pooled = self.embed_context(context)
        sizes = list(scale_sizes)
        lengths = [s * s for s in sizes[1:]]
        levels = torch.cat([torch.zeros(Lc, dtype=torch.long, device=device)] +
                           [torch.full((n,), k + 1, dtype=torch.long, device=device) for k, n in enumerate(lengths)])
        angles = sequence_rope_angles(position_ids, sizes, self.config.head_dim, self.config.rope_theta)
        lvl = self.lvl_embed(torch.arange(len(sizes), device=device))  # [S, C]
        x = torch.cat([cond + self.text_level(lvl[:1], sizes[-1]),
                       self.word_embed(image_inputs) + lvl[levels[Lc:]]], dim=1)
        if keep_last is not None:  # drop last-scale tokens, keeping their positions and levels
            start = x.shape[1] - lengths[-1]
            keep = torch.cat([torch.arange(start, device=device).expand(B, -1), keep_last + start], dim=1)
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
            angles = angles.gather(1, keep[..., None].expand(-1, -1, angles.shape[-1]))
            levels = levels[keep[0]]  # every row keeps the same count, so the same levels
        mask = (levels[:, None] >= levels[None, :])[None, None]  # [1, 1, L', L']: block-causal
        cos, sin = self._rope(angles, x.dtype)
        for block in self.blocks:
            x = block(x, cos, sin, mask)
        n_last = keep_last.shape[1] if keep_last is not None else lengths[-1]
        logits = self.logits(x[:, Lc - 1:], pooled)
        return logits, x[:, -n_last:], pooled

    # ---- incremental (inference)
    def new_cache(self, batch: int, context_len: int, scale_sizes, dtype, device) -> KVCache:
        total = context_len + sum(s * s for s in scale_sizes[1:])
        cfg = self.config
        return KVCache(cfg.depth, batch, cfg.num_heads, total, cfg.head_dim, dtype, device)

    def unconditional_prefix(self, context_len: int, dtype, device, finest: int) -> tuple[list, list, torch.Tensor]:
        """Keys, values (per block, [1, H, Lc, d]) and last hidden state [1, 1, C] of the CFG
        unconditional prefix: all-zero text states at zero positions, the same for every prompt
        (at one resolution: `finest` is the schedule's last side, see text_level).

        Computed once and kept until a weight changes (in place or swapped), the autocast
        setting changes, or another length, dtype or device is asked for."""
        side = finest if self.config.resolution_sides else 0  # without vectors one prefix serves all
        key = (context_len, dtype, device, side, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"),
               tuple((p.data_ptr(), p._version) for p in self.parameters()))
        memo = getattr(self, "_unconditional_prefix", None)
        if memo is None or memo[0] != key:
            zeros = torch.zeros(1, context_len, self.config.context_dim, dtype=dtype, device=device)
            cond, _ = self.embed_context(zeros)
            cache = self.new_cache(1, context_len, (1,), dtype, device)
            angles = text_rope_angles(torch.zeros(1, context_len, dtype=torch.long, device=device),
                                      self.config.head_dim, self.config.rope_theta)
            level0 = self.lvl_embed(torch.zeros(1, dtype=torch.long, device=device))
            hidden = self.step(cond + self.text_level(level0, finest), angles, cache)
            memo = (key, cache.keys, cache.values, hidden[:, -1:])
            self._unconditional_prefix = memo
        return memo[1], memo[2], memo[3]

    def step(self, x: torch.Tensor, angles: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the blocks on one step's tokens [B, n, C] attending to the cache and each other."""
        cos, sin = self._rope(angles, x.dtype)
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, None, cache, i)
        cache.length += x.shape[1]
        return x
