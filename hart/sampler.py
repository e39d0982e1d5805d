"""Next-scale sampling. Text states -> for each scale: transformer step (KV cache), guidance,
draw, f̂ update -> residual tokens from the diffusion head at the last scale. A model may leave
the last scale of a schedule to the residual (`continuous_last_sides`): no tokens are drawn
there, and the head adds everything the coarser scales leave of the latent (on top of the
low-resolution image's own remainder with `coarse_remainder`).

Every random draw uses the caller's generator, in a fixed order: each scale's tokens (and its
Gumbel noise in "more smooth" mode), then the residual head's noise. `generator` is one
torch.Generator for the whole batch, or a list with one per image: then image b draws only from
generator b, so it comes out the same whatever else is in its batch."""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Iterator

import torch
import torch.nn.functional as F

from .tokenizer import HybridTokenizer
from .transformer import HARTTransformer, image_rope_angles, text_rope_angles

Generators = torch.Generator | list[torch.Generator] | None


@dataclass
class SamplingOptions:
    cfg: float = 4.5
    # 0 = no top-k filter; a sequence gives one k per scale, its last entry repeating for later
    # scales (the official checkpoints use 600 for the first 7 scales, then 300)
    top_k: int | tuple[int, ...] = 0
    top_p: float = 0.0        # 0 = no nucleus filter
    temperature: float = 1.0
    more_smooth: bool = False  # Gumbel-softmax mixture of codes instead of the hard code
    diffusion_steps: int = 8
    use_residual: bool = True
    # scales the residual head's per-step noise; below 1 the residual moves toward its
    # conditional mean (a small head's samples at 1 add texture the reference lacks)
    residual_temperature: float = 1.0
    # guidance of the residual head; None = the last scale's cfg, as the official sampler
    residual_cfg: float | None = None
    # above the model's lowest resolution: the first N scales are not drawn but taken from the
    # lowest resolution's hybrid image (upsampled and re-encoded), so the low-resolution pass fixes
    # what the image shows and the high-resolution scales add detail; 0 = one pass. Counting a
    # last scale left to the head, its codes condition the head (not the image)
    coarse_scales: int = 0
    # with every scale taken from the lowest resolution's image: keep that image's whole re-encoded
    # latent, its continuous remainder after the image's codes (all scales', or the coarser ones'
    # where the last scale is the head's) joining the residual tokens, so the head adds only what
    # the higher resolution holds beyond the upsampled image (a head trained for it: train_head
    # --coarse-remainder)
    coarse_remainder: bool = False

    def __post_init__(self):
        if isinstance(self.top_k, (list, tuple)):
            self.top_k = tuple(self.top_k)

    def top_k_at(self, scale_index: int) -> int:
        if isinstance(self.top_k, tuple):
            return self.top_k[min(scale_index, len(self.top_k) - 1)]
        return self.top_k

    def validate(self) -> None:
        ks = self.top_k if isinstance(self.top_k, tuple) else (self.top_k,)
        checks = [
            (math.isfinite(self.cfg) and self.cfg >= 0, f"cfg must be a finite number >= 0, got {self.cfg}"),
            (len(ks) > 0 and all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in ks),
             f"top_k must be an integer >= 0 or a non-empty list of them (one per scale), got {self.top_k}"),
            (math.isfinite(self.top_p) and 0 <= self.top_p <= 1, f"top_p must be in [0, 1], got {self.top_p}"),
            (math.isfinite(self.temperature) and self.temperature > 0,
             f"temperature must be > 0, got {self.temperature}"),
            (isinstance(self.diffusion_steps, int) and 1 <= self.diffusion_steps <= 1000,
             f"diffusion_steps must be an integer in [1, 1000], got {self.diffusion_steps}"),
            (math.isfinite(self.residual_temperature) and self.residual_temperature >= 0,
             f"residual_temperature must be >= 0, got {self.residual_temperature}"),
            (self.residual_cfg is None or (math.isfinite(self.residual_cfg) and self.residual_cfg >= 0),
             f"residual_cfg must be None or a finite number >= 0, got {self.residual_cfg}"),
            (isinstance(self.coarse_scales, int) and not isinstance(self.coarse_scales, bool)
             and self.coarse_scales >= 0, f"coarse_scales must be an integer >= 0, got {self.coarse_scales}"),
            (isinstance(self.coarse_remainder, bool),
             f"coarse_remainder must be true or false, got {self.coarse_remainder!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


# --------------------------------------------------------------------------- guidance and draws

def random_rows(shape, generator: Generators, device, dtype=torch.float32, normal: bool = False) -> torch.Tensor:
    """Uniform (or standard normal) draws of `shape` = [B, ...]; with a list of generators,
    row b comes from generator b exactly as a batch of one would draw it."""
    draw_fn = torch.randn if normal else torch.rand
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([draw_fn((1, *shape[1:]), generator=g, device=device, dtype=dtype) for g in generator])
    return draw_fn(shape, generator=generator, device=device, dtype=dtype)


def guidance_ramp(cfg: float, num_scales: int) -> list[float]:
    """CFG weight t per scale: linear cfg * si / (S - 1), with the last scale reusing the
    previous scale's value (the released sampler does this; its models are tuned to it)."""
    if num_scales == 1:
        return [0.0]
    ramp = [cfg * si / (num_scales - 1) for si in range(num_scales - 1)]
    return ramp + [ramp[-1]]


def guide(logits: torch.Tensor, t: float, batch: int) -> torch.Tensor:
    """(1 + t) conditional - t unconditional, for logits stacked as [conditional; unconditional]
    rows (just the conditional rows when the batch holds no unconditional half)."""
    if logits.shape[0] == batch:
        return logits
    return (1 + t) * logits[:batch] - t * logits[batch:]


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


def sample_indices(logits: torch.Tensor, top_k: int, temperature: float, generator: Generators) -> torch.Tensor:
    """logits [B, n, V] (already filtered) -> indices [B, n]; top_k 1 is the argmax."""
    if top_k == 1:
        return logits.argmax(-1)
    return categorical((logits / temperature).softmax(-1), generator)


def categorical(probs: torch.Tensor, generator: Generators) -> torch.Tensor:
    """One draw per row of probs [..., V] by inverting the cumulative sum with one uniform
    per row (torch.multinomial draws V exponentials per row, serially: slow for big V)."""
    cdf = probs.float().cumsum(-1)
    total = cdf[..., -1:]
    u = random_rows(total.shape, generator, probs.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # stay below the last step
    return torch.searchsorted(cdf, u, right=True)[..., 0]  # first entry whose cdf exceeds u


def sample_top_k(logits: torch.Tensor, top_k: int, temperature: float, generator: Generators) -> torch.Tensor:
    """logits [B, n, V] -> indices [B, n] drawn among the k largest only: the distribution of
    filter_logits + sample_indices, with the softmax and the draw over k entries instead of V."""
    values, candidates = logits.topk(top_k, dim=-1)
    choice = categorical((values / temperature).softmax(-1), generator)
    return candidates.gather(-1, choice[..., None])[..., 0]


def gumbel_codes(logits: torch.Tensor, ratio: float, codebook: torch.Tensor, generator: Generators) -> torch.Tensor:
    """'More smooth' mode: a Gumbel-softmax mixture over the codebook, sharper at fine scales."""
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    uniform = random_rows(logits.shape, generator, logits.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(1e-20)).clamp_min(1e-20))
    weights = ((logits * (1 + ratio) + gumbel) / tau).softmax(-1)
    return weights.to(codebook.dtype) @ codebook


def draw(logits: torch.Tensor, opts: SamplingOptions, scale_index: int, num_scales: int, codebook: torch.Tensor,
         generator: Generators) -> tuple[torch.Tensor, torch.Tensor]:
    """Guided logits [B, n, V] -> (indices [B, n], the codes that enter f̂ [B, n, Cvae])."""
    k = opts.top_k_at(scale_index)
    if 1 < k < logits.shape[-1] and not opts.top_p and not opts.more_smooth:
        idx = sample_top_k(logits, k, opts.temperature, generator)
    else:
        logits = filter_logits(logits, k, opts.top_p)
        idx = sample_indices(logits, k, opts.temperature, generator)
    if not opts.more_smooth:
        return idx, codebook[idx]
    # the official sampler's ratio: the last scale reuses the previous scale's
    ratio = min(scale_index, num_scales - 2) / (num_scales - 1) if num_scales > 1 else 0.0
    return idx, gumbel_codes(logits, ratio, codebook, generator)


# --------------------------------------------------------------------------- transformer steps

class ScaleSteps:
    """The transformer run incrementally over one generation: the text prefix, then one scale at
    a time against a KV cache. Rows are [conditional; unconditional] when guided: the
    unconditional text is all-zero states at zero positions, the same for every prompt, so its
    prefix is computed once per model and copied into the cache."""

    def __init__(self, transformer: HARTTransformer, context: torch.Tensor, position_ids: torch.Tensor,
                 scale_sizes: list[int], guided: bool):
        self.transformer, self.sizes, self.guided = transformer, scale_sizes, guided
        self.batch, self.text_len = context.shape[0], context.shape[1]
        self.dtype = transformer.word_embed.weight.dtype
        self.device = context.device
        self.position_ids = position_ids
        rows = 2 * self.batch if guided else self.batch
        self.cond, self.pooled = transformer.embed_context(context.to(self.dtype))
        if guided:  # the pooled head condition of all-zero text states
            _, uncond_pooled = transformer.embed_context(torch.zeros_like(context[:1]).to(self.dtype))
            self.pooled = torch.cat([self.pooled, uncond_pooled.expand(self.batch, -1, -1)])
        self.levels = transformer.lvl_embed(torch.arange(len(scale_sizes), device=self.device))
        self.cache = transformer.new_cache(rows, self.text_len, scale_sizes, self.dtype, self.device)
        self.head_dim, self.theta = transformer.config.head_dim, transformer.config.rope_theta

    def text(self) -> torch.Tensor:
        """Run the text prefix; the last slot's hidden state [rows, 1, C] predicts the 1x1 token."""
        tf, B, P = self.transformer, self.batch, self.sizes[-1]
        angles = text_rope_angles(self.position_ids, self.head_dim, self.theta)
        prefix = self.cond + tf.text_level(self.levels[:1], P)
        hidden = tf.step(prefix, angles, self.cache.rows(0, B))[:, -1:]
        self.cache.length = self.text_len
        if not self.guided:
            return hidden
        keys, values, uncond_hidden = tf.unconditional_prefix(self.text_len, self.dtype, self.device, P)
        for layer in range(len(keys)):
            self.cache.keys[layer][B:, :, :self.text_len] = keys[layer]
            self.cache.values[layer][B:, :, :self.text_len] = values[layer]
        return torch.cat([hidden, uncond_hidden.expand(B, -1, -1)])

    def image(self, scale_index: int, inputs: torch.Tensor) -> torch.Tensor:
        """Run one scale's inputs [B, pn^2, Cvae] (f̂ area-downsampled): hidden states [rows, pn^2, C]."""
        tf = self.transformer
        x = tf.word_embed(inputs.to(self.dtype)) + self.levels[scale_index]
        if self.guided:
            x = torch.cat([x, x])
        offset = self.position_ids[:, -1]  # image positions start at the last text slot's id
        if self.guided:
            offset = torch.cat([offset, torch.zeros_like(offset)])
        angles = image_rope_angles(self.sizes[scale_index], self.sizes[-1], offset, self.head_dim, self.theta)
        return tf.step(x, angles, self.cache)


# --------------------------------------------------------------------------- the loop

@dataclass
class SampleOutput:
    indices: list[torch.Tensor]      # per scale [B, pn^2] (none for a continuous last scale)
    fhat_discrete: torch.Tensor      # [B, Cvae, P, P]
    logits: list[torch.Tensor]       # guided logits per scale (kept on request, for parity checks)
    head_condition: torch.Tensor     # [B, P^2, C]: the residual head's condition (official)
    unconditional_condition: torch.Tensor | None  # the same for the unconditional rows (guided runs)
    last_guidance: float             # the CFG weight of the last scale
    residual: torch.Tensor | None = None  # [B, P^2, Cvae] once `sample_residual` ran


@torch.no_grad()
def iter_sample(transformer: HARTTransformer, tokenizer: HybridTokenizer, context: torch.Tensor,
                position_ids: torch.Tensor, scale_sizes, opts: SamplingOptions,
                generator: Generators = None, keep_logits: bool = False,
                given: list[torch.Tensor] | None = None) -> Iterator[tuple[int, torch.Tensor] | SampleOutput]:
    """The discrete tokens for B prompts given text states context [B, Lc, Dt].

    Yields (si, partial f̂) after every scale but the last (for previews), then the SampleOutput
    without its residual (`sample_residual` adds it). CFG runs the conditional and unconditional
    rows as one batch; with cfg = 0 the unconditional half is skipped (same result). `given`
    holds the indices [B, pn^2] of the first scales: those are taken, not drawn (the transformer
    still runs them, for its cache; they keep no logits). Given for every scale of a schedule whose
    last scale is the head's alone, the last ones are the head's codes instead of zero codes."""
    opts.validate()
    sizes = list(scale_sizes)
    S, P = len(sizes), sizes[-1]
    B = context.shape[0]
    given = list(given or [])
    quant = tokenizer.quantize
    codebook = quant.embedding.weight
    ramp = guidance_ramp(opts.cfg, S)
    continuous_last = transformer.continuous_last(sizes)
    drawn_scales = transformer.drawn_scales(sizes)
    # the unconditional rows serve the guidance of drawn scales and of the head: none when every
    # drawn scale is given and the head is unguided
    guided = opts.cfg != 0 and (len(given) < drawn_scales or opts.residual_cfg != 0)
    steps = ScaleSteps(transformer, context, position_ids, sizes, guided=guided)

    if len(given) > S:
        raise ValueError(f"{len(given)} given scales for a schedule of {S}")
    for si, idx in enumerate(given):
        if tuple(idx.shape) != (B, sizes[si] ** 2):
            raise ValueError(f"given scale {si}: indices of shape {tuple(idx.shape)}, expected {(B, sizes[si] ** 2)}")
    fhat = torch.zeros(B, codebook.shape[1], P, P, device=context.device, dtype=codebook.dtype)
    indices, kept_logits = [], []
    for si, pn in enumerate(sizes):
        if si == 0:
            hidden = steps.text()
        else:
            inputs = F.interpolate(fhat, size=(pn, pn), mode="area").flatten(2).transpose(1, 2)
            hidden = steps.image(si, inputs)
        if continuous_last and si == S - 1:
            break  # no tokens at this scale: its hidden states only condition the residual head
        if si < len(given):
            idx = given[si]
            codes = codebook[idx]
        else:
            logits = guide(transformer.logits(hidden, steps.pooled), ramp[si], B)
            if keep_logits:
                kept_logits.append(logits)
            idx, codes = draw(logits, opts, si, S, codebook, generator)
        indices.append(idx)
        codes = codes.transpose(1, 2).reshape(B, -1, pn, pn)
        if si == S - 1:
            fhat = fhat + codes  # the last scale is at full size and has no phi
            break
        fhat = fhat + quant.upsampled_scale(codes, si, sizes)
        yield si, fhat

    # the head's condition takes the hard code even in "more smooth" mode, as the official sampler;
    # a continuous last scale has none, unless one is given (then it guides the head, not the image)
    if continuous_last:
        word = codebook[given[-1]].to(steps.dtype) if len(given) == S else None
    else:
        word = codebook[idx].to(steps.dtype)
    if word is not None and steps.guided:
        word = torch.cat([word, word])
    conditions = transformer.diffusion_condition(hidden, word)
    yield SampleOutput(indices, fhat, kept_logits, conditions[:B],
                       conditions[B:] if steps.guided else None, ramp[-1])


def head_noise(batch: int, tokens: int, width: int, steps: int, generator: Generators, device,
               dtype) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The diffusion head's initial and per-step noise [batch * tokens, width], in the order the
    head would draw it (initial, then one per step but the last), per image's generator."""
    chain = [random_rows((batch, tokens, width), generator, device, dtype, normal=True).flatten(0, 1)
             for _ in range(steps)]
    return chain[0], chain[1:]


@torch.no_grad()
def sample_residual(transformer: HARTTransformer, tokens: SampleOutput, opts: SamplingOptions,
                    generator: Generators = None, noise=None) -> torch.Tensor:
    """The continuous residual [B, P^2, Cvae] for sampled tokens: the diffusion head denoises one
    token per last-scale position. Its guidance is the last scale's unless `residual_cfg` says
    otherwise; `noise` = (initial, per-step list) replaces the generator's draws (parity checks)."""
    head_cfg = tokens.last_guidance if opts.residual_cfg is None else opts.residual_cfg
    unconditional = tokens.unconditional_condition if head_cfg != 0 else None
    B, n, _ = tokens.head_condition.shape
    if noise is None:
        noise = head_noise(B, n, transformer.config.token_dim, opts.diffusion_steps, generator,
                           tokens.head_condition.device, tokens.head_condition.dtype)
    flat = transformer.diffloss.sample(
        tokens.head_condition.flatten(0, 1), unconditional.flatten(0, 1) if unconditional is not None else None,
        cfg=head_cfg, steps=opts.diffusion_steps, temperature=opts.residual_temperature, generator=generator,
        noise=noise)
    return flat.view(B, n, -1).to(tokens.fhat_discrete.dtype)


def sample(transformer: HARTTransformer, tokenizer: HybridTokenizer, context: torch.Tensor,
           position_ids: torch.Tensor, scale_sizes, opts: SamplingOptions, generator: Generators = None,
           diffusion_noise=None, keep_logits: bool = False, given: list[torch.Tensor] | None = None) -> SampleOutput:
    """Tokens, then (when `opts.use_residual`) the residual: the whole generation before decoding."""
    for item in iter_sample(transformer, tokenizer, context, position_ids, scale_sizes, opts, generator,
                            keep_logits, given):
        pass
    if opts.use_residual:
        item.residual = sample_residual(transformer, item, opts, generator, diffusion_noise)
    return item
