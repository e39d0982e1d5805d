"""Hybrid tokenizer: a VQGAN-style autoencoder whose latent is split into multi-scale
discrete tokens (residual VQ, coarse to fine) plus a continuous residual.

Module names follow the official HART/VAR checkpoints, so their `vae.*` keys load
after stripping the prefix.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class TokenizerConfig:
    vocab_size: int = 4096          # codebook size V
    z_channels: int = 32            # latent width Cvae
    ch: int = 160                   # base conv width
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)  # len-1 downsamplings: 5 levels -> 16x
    num_res_blocks: int = 2         # per encoder level; the decoder uses one more
    attn_at_lowest_level: bool = True  # two (encoder) / three (decoder) attention blocks at the coarsest level
    mid_attn: bool = True
    norm_groups: int = 32
    dropout: float = 0.0
    quant_conv_ks: int = 3
    quant_resi: float = 0.5         # phi(h) = (1 - q) h + q conv(h)
    share_quant_resi: int = 4       # number of shared phi convs

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


# --------------------------------------------------------------------------- conv blocks

def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(groups, channels), channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = _norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)
        h = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric pad, as in VQGAN


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Encoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        g, mult = cfg.norm_groups, cfg.ch_mult
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.down = nn.ModuleList()
        block_in = cfg.ch
        for level, m in enumerate(mult):
            stage = nn.Module()
            block_out = cfg.ch * m
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                stage.block.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
            stage.attn = nn.ModuleList()
            if cfg.attn_at_lowest_level and level == len(mult) - 1:
                stage.attn.extend(AttnBlock(block_in, g) for _ in range(cfg.num_res_blocks))
            if level != len(mult) - 1:
                stage.downsample = Downsample(block_in)
            self.down.append(stage)
        self.mid = _mid(block_in, cfg)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, cfg.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            h = _run_stage(stage, h)
            if hasattr(stage, "downsample"):
                h = stage.downsample(h)
        h = _run_mid(self.mid, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        g, mult, ch = cfg.norm_groups, cfg.ch_mult, cfg.ch
        block_in = ch * mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, block_in, 3, padding=1)
        self.mid = _mid(block_in, cfg)
        ups = []
        for level in reversed(range(len(mult))):
            stage = nn.Module()
            block_out = ch * mult[level]
            stage.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                stage.block.append(ResnetBlock(block_in, block_out, g, cfg.dropout))
                block_in = block_out
            stage.attn = nn.ModuleList()
            if cfg.attn_at_lowest_level and level == len(mult) - 1:
                stage.attn.extend(AttnBlock(block_in, g) for _ in range(cfg.num_res_blocks + 1))
            if level != 0:
                stage.upsample = Upsample(block_in)
            ups.insert(0, stage)  # up.{i} is named by level; up.0 is full resolution
        self.up = nn.ModuleList(ups)
        self.norm_out = _norm(block_in, g)
        self.conv_out = nn.Conv2d(block_in, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = _run_mid(self.mid, self.conv_in(z))
        for stage in reversed(self.up):
            h = _run_stage(stage, h)
            if hasattr(stage, "upsample"):
                h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def _mid(channels: int, cfg: TokenizerConfig) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    mid.attn_1 = AttnBlock(channels, cfg.norm_groups) if cfg.mid_attn else nn.Identity()
    mid.block_2 = ResnetBlock(channels, channels, cfg.norm_groups, cfg.dropout)
    return mid


def _run_stage(stage: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """ResNet blocks of one level, each followed by its attention block when the level has them."""
    for i, block in enumerate(stage.block):
        h = block(h)
        if len(stage.attn):
            h = stage.attn[i](h)
    return h


def _run_mid(mid: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return mid.block_2(mid.attn_1(mid.block_1(h)))


# --------------------------------------------------------------------------- quantizer

class Phi(nn.Conv2d):
    """phi(h) = (1 - q) h + q conv3x3(h): the shared refinement after each scale's upsample."""

    def __init__(self, channels: int, resi_ratio: float):
        super().__init__(channels, channels, 3, padding=1)
        self.resi_ratio = abs(resi_ratio)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * (1 - self.resi_ratio) + super().forward(h) * self.resi_ratio


def phi_index(scale_index: int, num_scales: int, num_phi: int) -> int:
    """Which shared phi conv serves a scale: the nearest tick to si/(S-1).

    Ticks and the ratio are float64 (numpy), as in the official code: exact midpoints are
    decided by float64 rounding, and float32 ticks would pick different convs.
    """
    ticks = np.linspace(1 / 3 / num_phi, 1 - 1 / 3 / num_phi, num_phi)
    ratio = scale_index / (num_scales - 1) if num_scales > 1 else 0.0
    return int(np.argmin(np.abs(ticks - ratio)))


class PhiShared(nn.Module):
    def __init__(self, channels: int, resi_ratio: float, count: int):
        super().__init__()
        self.qresi_ls = nn.ModuleList(Phi(channels, resi_ratio) for _ in range(count))

    def for_scale(self, scale_index: int, num_scales: int) -> Phi:
        return self.qresi_ls[phi_index(scale_index, num_scales, len(self.qresi_ls))]


class MultiScaleQuantizer(nn.Module):
    """Residual VQ over a schedule of square scales (`scale_sizes`, last = latent side)."""

    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.z_channels)
        nn.init.uniform_(self.embedding.weight, -1 / cfg.vocab_size, 1 / cfg.vocab_size)
        self.quant_resi = PhiShared(cfg.z_channels, cfg.quant_resi, cfg.share_quant_resi)

    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """z [N, C] -> index of the nearest code by squared L2 (first index wins ties)."""
        codebook, z = self.embedding.weight.float(), z.float()  # argmin in fp32, also under bf16 autocast
        dist = (z.square().sum(1, keepdim=True) + codebook.square().sum(1)[None]).addmm_(
            z, codebook.t(), alpha=-2, beta=1)
        return dist.argmin(1)

    def embed_scale(self, idx: torch.Tensor, side: int) -> torch.Tensor:
        """Indices [B, side*side] (row-major) -> code vectors [B, C, side, side]."""
        B = idx.shape[0]
        return self.embedding(idx).transpose(1, 2).reshape(B, -1, side, side)

    def upsampled_scale(self, codes: torch.Tensor, scale_index: int, scale_sizes) -> torch.Tensor:
        """What scale `si` (< last) adds to f_hat: phi(bicubic upsample of its codes)."""
        P = scale_sizes[-1]
        up = F.interpolate(codes, size=(P, P), mode="bicubic")
        return self.quant_resi.for_scale(scale_index, len(scale_sizes))(up)

    def scale_indices(self, rest: torch.Tensor, side: int, last: bool) -> torch.Tensor:
        """Indices [B, side^2] of the codes nearest to what is left of the latent, rest [B, C, P, P],
        area-downsampled to side x side (the last scale takes it as it is)."""
        B, C = rest.shape[:2]
        z = rest if last else F.interpolate(rest, size=(side, side), mode="area")
        return self.nearest_codes(z.permute(0, 2, 3, 1).reshape(-1, C)).view(B, side * side)

    def encode(self, f: torch.Tensor, scale_sizes,
               given: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Latent f [B, C, P, P] -> (per-scale indices, remainder before the last scale [B, P*P, C]).
        `given` fixes the indices of the first scales; the later ones quantize what those leave."""
        P = f.shape[-1]
        assert scale_sizes[-1] == P, f"last scale {scale_sizes[-1]} must equal the latent side {P}"
        given = list(given or [])
        rest = f
        indices = []
        for si, pn in enumerate(scale_sizes):
            last = si == len(scale_sizes) - 1
            idx = given[si] if si < len(given) else self.scale_indices(rest, pn, last)
            indices.append(idx)
            if not last:
                rest = rest - self.upsampled_scale(self.embed_scale(idx, pn), si, scale_sizes)
        return indices, rest.flatten(2).transpose(1, 2)

    def indices_to_fhat(self, indices: list[torch.Tensor], scale_sizes, continuous_last: bool = False) -> torch.Tensor:
        """Discrete latent: sum of phi(upsampled codes) over scales, last scale added plainly
        (no phi, no resize), as the sampler builds it; `continuous_last` leaves the last scale out."""
        fhat = 0
        for si, (idx, pn) in enumerate(zip(indices, scale_sizes)):
            codes = self.embed_scale(idx, pn)
            if si < len(scale_sizes) - 1:
                fhat = fhat + self.upsampled_scale(codes, si, scale_sizes)
            elif not continuous_last:
                fhat = fhat + codes
        return fhat

    def teacher_forcing_inputs(self, indices: list[torch.Tensor], scale_sizes) -> torch.Tensor:
        """Transformer inputs for scales 1..S-1: area-downsampled partial f_hat, [B, L-1, C]."""
        fhat = 0
        inputs = []
        for si in range(len(scale_sizes) - 1):
            codes = self.embed_scale(indices[si], scale_sizes[si])
            fhat = fhat + self.upsampled_scale(codes, si, scale_sizes)
            nxt = scale_sizes[si + 1]
            inputs.append(F.interpolate(fhat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2))
        return torch.cat(inputs, 1)

    def forward(self, f: torch.Tensor, scale_sizes, continuous: bool,
                beta: float = 0.25) -> tuple[torch.Tensor, torch.Tensor, list]:
        """Training quantization with a straight-through estimator; `beta` weighs the commitment
        term that pulls the latent toward its codes.

        Returns (f_hat for the decoder, vq loss, per-scale indices). The continuous path adds
        the leftover residual, so the decoder sees f itself; the discrete path sees the
        quantized latent exactly as the sampler assembles it (last scale without phi).
        """
        rest = f.detach()
        fhat = torch.zeros_like(rest)
        vq_loss = f.new_zeros(())
        indices = []
        for si, pn in enumerate(scale_sizes):
            last = si == len(scale_sizes) - 1
            idx = self.scale_indices(rest, pn, last)
            indices.append(idx)
            codes = self.embed_scale(idx, pn)
            h = codes if last else self.upsampled_scale(codes, si, scale_sizes)
            fhat = fhat + h
            rest = rest - h.detach()
            vq_loss = vq_loss + F.mse_loss(fhat, f.detach()) + beta * F.mse_loss(fhat.detach(), f)
        vq_loss = vq_loss / len(scale_sizes)
        if continuous:  # discrete + residual reconstructs f exactly
            return f, vq_loss, indices
        return (fhat.detach() - f.detach()) + f, vq_loss, indices  # straight-through


# --------------------------------------------------------------------------- tokenizer

class TrainingOutput(NamedTuple):
    recon: torch.Tensor          # decoded image [B, 3, H, W]
    vq_loss: torch.Tensor
    indices: list                # per-scale code indices
    continuous: bool             # which path ran
    latent: torch.Tensor         # the encoder's continuous latent f [B, Cvae, P, P]


class HybridTokenizer(nn.Module):
    def __init__(self, cfg: TokenizerConfig):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        ks = cfg.quant_conv_ks
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)
        self.post_quant_conv = nn.Conv2d(cfg.z_channels, cfg.z_channels, ks, padding=ks // 2)
        self.quantize = MultiScaleQuantizer(cfg)

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def encode_latent(self, images: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> continuous latent f [B, Cvae, H/d, W/d]."""
        return self.quant_conv(self.encoder(images))

    def encode(self, images: torch.Tensor, scale_sizes, continuous_last: bool = False,
               given: list[torch.Tensor] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (per-scale indices, continuous residual [B, P*P, Cvae]).

        The residual is what the last scale's codes leave of the remainder (with `continuous_last`,
        the whole remainder before the last scale): f equals
        indices_to_fhat(indices, scale_sizes, continuous_last) + residual (in token layout).
        `given` fixes the first scales' indices (see `encode_upsampled`)."""
        indices, rest_before_last = self.quantize.encode(self.encode_latent(images), scale_sizes, given)
        if continuous_last:
            return indices, rest_before_last
        return indices, rest_before_last - self.quantize.embedding(indices[-1])

    def indices_to_fhat(self, indices, scale_sizes, continuous_last: bool = False) -> torch.Tensor:
        return self.quantize.indices_to_fhat(indices, scale_sizes, continuous_last)

    def encode_upsampled(self, low_images: torch.Tensor, scale_sizes,
                         continuous_last: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images of a lower resolution, upsampled bicubically to the resolution of `scale_sizes` and
        encoded there: (every scale's indices, the continuous remainder [B, P*P, C] after them, or
        with `continuous_last` after all but the last scale, as `encode`). A generation above a
        model's lowest resolution can take its scales from the lowest one's image this way
        (`SamplingOptions.coarse_scales`, `coarse_remainder`), and its head is trained on the same
        construction from the dataset's low-resolution images."""
        side = scale_sizes[-1] * self.config.downsample
        up = F.interpolate(low_images.float(), size=(side, side), mode="bicubic").clamp(-1, 1)
        return self.encode(up.to(self.codebook.dtype), scale_sizes, continuous_last)

    def decode(self, fhat: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Latent (plus optional residual tokens [B, P*P, C]) -> image in [-1, 1]."""
        if residual is not None:
            B, C, P, _ = fhat.shape
            fhat = fhat + residual.transpose(1, 2).reshape(B, C, P, P)
        # channels-last convolutions: 2x faster decodes in bf16 on CPU (oneDNN), ~10% in fp32
        h = self.post_quant_conv(fhat).contiguous(memory_format=torch.channels_last)
        return self.decoder(h).clamp(-1, 1)

    def forward(self, images: torch.Tensor, scale_sizes, continuous: bool | None = None,
                generator: torch.Generator | None = None, continuous_prob: float = 0.5,
                beta: float = 0.25) -> TrainingOutput:
        """Training forward: reconstruction, vq loss, indices, which path ran, and the latent.

        With `continuous=None` the path is drawn: continuous with probability `continuous_prob`
        (HART: 0.5), otherwise discrete-only (HART's alternating objective). `beta` is the
        commitment weight of the vq loss."""
        if continuous is None:
            draw = torch.rand((), generator=generator)
            continuous = bool(draw < continuous_prob)
        f = self.encode_latent(images)
        fhat, vq_loss, indices = self.quantize(f, scale_sizes, continuous, beta)
        recon = self.decoder(self.post_quant_conv(fhat))
        return TrainingOutput(recon, vq_loss, indices, continuous, f)
