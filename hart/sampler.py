"""Next-scale sampling: coarse-to-fine discrete tokens with a KV cache and batched CFG, then
the residual diffusion head at the last scale. Every random draw uses the caller's generator."""
from __future__ import annotations

from dataclasses import dataclass
import math
import time
from typing import Iterator

import torch
import torch.nn.functional as F

from .tokenizer import HybridTokenizer
from .transformer import HARTTransformer, image_rope_angles, text_rope_angles


@dataclass
class SamplingOptions:
    cfg: float = 4.5
    top_k: int = 0            # 0 = no top-k filter
    top_p: float = 0.0        # 0 = no nucleus filter
    temperature: float = 1.0
    more_smooth: bool = False  # Gumbel-softmax mixture of codes instead of the hard code
    diffusion_steps: int = 8
    use_residual: bool = True
    # scales the residual head's per-step noise; below 1 the residual moves toward its
    # conditional mean (a small model's samples at 1 add texture the reference lacks)
    residual_temperature: float = 1.0
    # guidance of the residual head; None = the last scale's cfg, as the official sampler. Guidance
    # pulls a small head's temperature-0 residual away from its reference (runs/head-x0/NOTES.md)
    residual_cfg: float | None = None

    def validate(self) -> None:
        checks = [
            (math.isfinite(self.cfg) and self.cfg >= 0, f"cfg must be a finite number >= 0, got {self.cfg}"),
            (isinstance(self.top_k, int) and self.top_k >= 0, f"top_k must be an integer >= 0, got {self.top_k}"),
            (math.isfinite(self.top_p) and 0 <= self.top_p <= 1, f"top_p must be in [0, 1], got {self.top_p}"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0, got {self.temperature}"),
            (isinstance(self.diffusion_steps, int) and 1 <= self.diffusion_steps <= 1000,
             f"diffusion_steps must be an integer in [1, 1000], got {self.diffusion_steps}"),
            (math.isfinite(self.residual_temperature) and self.residual_temperature >= 0,
             f"residual_temperature must be >= 0, got {self.residual_temperature}"),
            (self.residual_cfg is None or (math.isfinite(self.residual_cfg) and self.residual_cfg >= 0),
             f"residual_cfg must be None or a finite number >= 0, got {self.residual_cfg}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def guidance_ramp(cfg: float, num_scales: int) -> list[float]:
    """CFG weight t per scale: linear cfg * si / (S - 1), with the last scale reusing the
    previous scale's value (the released sampler does this; its models are tuned to it)."""
    if num_scales == 1:
        return [0.0]
    ramp = [cfg * si / (num_scales - 1) for si in range(num_scales - 1)]
    return ramp + [ramp[-1]]


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 0.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p probability mass."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cumulative - sorted_logits.softmax(-1) > top_p  # keep the token that crosses top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_indices(logits: torch.Tensor, opts: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, n, V] (already filtered) -> indices [B, n]."""
    if opts.top_k == 1:
        return logits.argmax(-1)
    return categorical((logits / opts.temperature).softmax(-1), generator)


def categorical(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row of probs [..., V] by inverting the cumulative sum with one uniform
    per row (torch.multinomial draws V exponentials per row, serially: slow for big V)."""
    cdf = probs.float().cumsum(-1)
    total = cdf[..., -1:]
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # stay below the last step
    return torch.searchsorted(cdf, u, right=True)[..., 0]  # first entry whose cdf exceeds u


def sample_top_k(logits: torch.Tensor, top_k: int, temperature: float,
                 generator: torch.Generator | None) -> torch.Tensor:
    """logits [B, n, V] -> indices [B, n] drawn among the k largest only: the distribution of
    filter_logits + sample_indices, with the softmax and the draw over k entries instead of V."""
    values, candidates = logits.topk(top_k, dim=-1)
    choice = categorical((values / temperature).softmax(-1), generator)
    return candidates.gather(-1, choice[..., None])[..., 0]


def gumbel_codes(logits: torch.Tensor, ratio: float, codebook: torch.Tensor,
                 generator: torch.Generator | None) -> torch.Tensor:
    """'More smooth' mode: a Gumbel-softmax mixture over the codebook, sharper at fine scales."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)).clamp_min(1e-20))
    weights = ((logits * (1 + ratio) + gumbel) / tau).softmax(-1)
    return weights.to(codebook.dtype) @ codebook


def expected_code_offset(logits: torch.Tensor, codebook: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """sum_k p_k c_k - c_idx per token: from the drawn code to the code the transformer expects,
    p = softmax(logits) at temperature 1 (logits [B, n, V], idx [B, n] -> [B, n, D]).

    At a fine scale a small transformer is often unsure between near-identical codes: the drawn one
    is then mostly wrong while the expectation is close (runs/sampled-residual/NOTES.md). Models with
    `head_expected_code` start the residual from this offset."""
    expected = logits.float().softmax(-1) @ codebook.float()
    return (expected - codebook[idx].float()).to(codebook.dtype)


@dataclass
class SampleOutput:
    indices: list[torch.Tensor]      # per scale [B, pn^2]
    fhat_discrete: torch.Tensor      # [B, Cvae, P, P]
    residual: torch.Tensor | None    # [B, P^2, Cvae] or None when the head is off
    logits: list[torch.Tensor]       # guided logits per scale (for inspection and parity)
    diffusion_time: float = 0.0
    head_condition: torch.Tensor | None = None  # [B, P^2, C]: the official condition of the head
    residual_offset: torch.Tensor | None = None  # [B, P^2, D]: expected-code offset (head_expected_code)


def sample(*args, **kwargs) -> SampleOutput:
    """Run `iter_sample` to the end and return its output."""
    for item in iter_sample(*args, **kwargs):
        pass
    return item


@torch.no_grad()
def iter_sample(transformer: HARTTransformer, tokenizer: HybridTokenizer, context: torch.Tensor,
                position_ids: torch.Tensor, scale_sizes, opts: SamplingOptions,
                generator: torch.Generator | None = None, diffusion_noise=None,
                keep_logits: bool = False) -> Iterator[tuple[int, torch.Tensor] | SampleOutput]:
    """Generate tokens for B prompts given text states context [B, Lc, Dt].

    Yields (si, partial f_hat) after every scale but the last (for previews), then the
    SampleOutput. CFG runs conditional and unconditional rows (all-zero text states, zero
    positions) as one batch; with cfg = 0 the unconditional half is skipped (same result)."""
    opts.validate()
    sizes = list(scale_sizes)
    S, P = len(sizes), sizes[-1]
    B, Lc, _ = context.shape
    device = context.device
    quant = tokenizer.quantize
    codebook = quant.embedding.weight
    guided = opts.cfg != 0
    ramp = guidance_ramp(opts.cfg, S)
    if guided:
        context = torch.cat([context, torch.zeros_like(context)])
        position_ids = torch.cat([position_ids, torch.zeros_like(position_ids)])
    rows = context.shape[0]
    dtype = transformer.word_embed.weight.dtype
    context = context.to(dtype)

    cond, pooled = transformer.embed_context(context)
    lvl = transformer.lvl_embed(torch.arange(S, device=device))
    text_level = transformer.text_level(lvl[:1], P)
    cache = transformer.new_cache(rows, Lc, sizes, dtype, device)
    head_dim, theta = transformer.config.head_dim, transformer.config.rope_theta
    offset = position_ids[:, -1]

    fhat = torch.zeros(B, codebook.shape[1], P, P, device=device, dtype=codebook.dtype)
    indices, all_logits = [], []
    residual, diffusion_time = None, 0.0
    next_input = None
    for si, pn in enumerate(sizes):
        if si == 0 and guided:
            # the unconditional half of the prefix is the same for every prompt: run the text
            # prefix for the B conditional rows only and copy the kept unconditional one in
            angles = text_rope_angles(position_ids[:B], head_dim, theta)
            hidden = transformer.step(cond[:B] + text_level, angles, cache.rows(0, B))[:, -1:]
            keys, values, uncond_hidden = transformer.unconditional_prefix(Lc, dtype, device, P)
            for layer in range(len(keys)):
                cache.keys[layer][B:, :, :Lc] = keys[layer]
                cache.values[layer][B:, :, :Lc] = values[layer]
            cache.length = Lc
            hidden = torch.cat([hidden, uncond_hidden.expand(B, -1, -1)])
        elif si == 0:
            hidden = transformer.step(cond + text_level, text_rope_angles(position_ids, head_dim, theta), cache)
            hidden = hidden[:, -1:]  # the 1x1 token is predicted from the last text slot
        else:
            x = transformer.word_embed(next_input.to(dtype)) + lvl[si]
            if guided:
                x = torch.cat([x, x])
            hidden = transformer.step(x, image_rope_angles(pn, P, offset, head_dim, theta), cache)
        logits = transformer.logits(hidden, pooled)
        t = ramp[si]
        if guided:
            logits = (1 + t) * logits[:B] - t * logits[B:]
        if keep_logits:
            all_logits.append(logits)
        guided_logits = logits  # before any filter
        if 1 < opts.top_k < logits.shape[-1] and not opts.top_p and not opts.more_smooth:
            idx = sample_top_k(logits, opts.top_k, opts.temperature, generator)
        else:
            logits = filter_logits(logits, opts.top_k, opts.top_p)
            idx = sample_indices(logits, opts, generator)
        indices.append(idx)
        ratio = si / (S - 1) if si < S - 1 else (S - 2) / (S - 1) if S > 1 else 0.0
        codes = gumbel_codes(logits, ratio, codebook, generator) if opts.more_smooth else codebook[idx]
        codes = codes.transpose(1, 2).reshape(B, -1, pn, pn)
        if si < S - 1:
            fhat = fhat + quant.upsampled_scale(codes, si, sizes)
            nxt = sizes[si + 1]
            next_input = F.interpolate(fhat, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)
            yield si, fhat
            continue
        fhat = fhat + codes
        word = codebook[idx].to(dtype)
        head_condition = transformer.diffusion_condition(hidden[:B], word)
        offset = (expected_code_offset(guided_logits, codebook, idx)
                  if transformer.config.head_expected_code else None)
        if opts.use_residual:
            start = time.perf_counter()
            head_cfg = t if opts.residual_cfg is None else opts.residual_cfg
            head_guided = guided and head_cfg != 0  # unguided: the head runs the conditional rows only
            z_cond = transformer.head_input(head_condition, offset).flatten(0, 1)
            z_uncond = (transformer.head_input(transformer.diffusion_condition(hidden[B:], word), offset)
                        .flatten(0, 1) if head_guided else None)
            flat = transformer.diffloss.sample(z_cond, z_uncond, cfg=head_cfg, steps=opts.diffusion_steps,
                                               temperature=opts.residual_temperature, generator=generator,
                                               noise=diffusion_noise)
            residual = flat.view(B, P * P, -1).to(fhat.dtype)
            if offset is not None:
                residual = residual + offset.to(fhat.dtype)
            diffusion_time = time.perf_counter() - start
    yield SampleOutput(indices, fhat, residual, all_logits, diffusion_time, head_condition, offset)
