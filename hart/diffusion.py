"""Residual diffusion head: a small MLP denoiser that predicts the continuous residual tokens
the discrete codes leave behind, one token at a time, conditioned on the transformer.

Training uses the 1000-step cosine schedule with epsilon prediction plus the learned-range
variance (IDDPM hybrid loss); sampling respaces it to a few steps (8 by default). All
schedule constants are float64 and cast to float32 when used, as in the official code.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import TimestepEmbedder, modulate

TRAIN_STEPS = 1000
# Residual tokens are divided by this for the head (training targets) and samples multiplied by it.
# 0.6 is the official value; a tokenizer with a smaller latent needs a smaller one (TransformerConfig).
RESIDUAL_SCALE = 0.6


# --------------------------------------------------------------------------- network

class ResBlock(nn.Module):
    def __init__(self, width: int, hidden: int = 0):
        super().__init__()
        hidden = hidden or width  # the official block: width -> width -> width
        self.in_ln = nn.LayerNorm(width, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.SiLU(), nn.Linear(hidden, width))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 3 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.adaLN_modulation(y).chunk(3, dim=-1)
        return h + gate * self.mlp(modulate(self.in_ln(h), shift, scale))


class FinalLayer(nn.Module):
    def __init__(self, width: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(y).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(h), shift, scale))


class DenoiserMLP(nn.Module):
    """MLP with AdaLN: (x_t, t, z) -> [epsilon, variance interpolation v] (2 * token_dim).
    `hidden` is the inner width of each block's MLP (0: `width`, as in the official head)."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, hidden: int = 0):
        super().__init__()
        self.token_dim = token_dim
        self.time_embed = TimestepEmbedder(width)
        self.cond_embed = nn.Linear(cond_dim, width)
        self.input_proj = nn.Linear(token_dim, width)
        self.res_blocks = nn.ModuleList(ResBlock(width, hidden) for _ in range(depth))
        self.final_layer = FinalLayer(width, 2 * token_dim)
        self.initialize_weights()

    def initialize_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        for block in self.res_blocks:  # zero-init modulations: every block starts as identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return self.trunk(x, self.time_embed(t) + self.cond_embed(z))

    def trunk(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The denoiser given its AdaLN condition y = time_embed(t) + cond_embed(z)."""
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y)


# --------------------------------------------------------------------------- schedule

def cosine_alpha_bar(s: float) -> float:
    return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2


def respaced_timesteps(num_steps: int, train_steps: int = TRAIN_STEPS) -> list[int]:
    """Original step indices kept by an N-step respacing (evenly spaced, float stride, rounded).

    One step keeps the last index (999): a single x0 prediction from pure noise. (IDDPM would
    keep index 0, which turns noise into noise.)"""
    if not 1 <= num_steps <= train_steps:
        raise ValueError(f"diffusion steps must be in [1, {train_steps}], got {num_steps}")
    if num_steps == 1:
        return [train_steps - 1]
    stride = (train_steps - 1) / (num_steps - 1)
    kept, position = [], 0.0
    for _ in range(num_steps):
        kept.append(round(position))
        position += stride
    return kept


@dataclass
class Schedule:
    """Per-step constants of a (possibly respaced) Gaussian diffusion, float64 numpy arrays."""
    timesteps: np.ndarray  # original index of each kept step, ascending
    betas: np.ndarray

    def __post_init__(self):
        b = self.betas
        self.alphas_cumprod = np.cumprod(1.0 - b)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        ac, acp = self.alphas_cumprod, self.alphas_cumprod_prev
        self.sqrt_recip_ac = np.sqrt(1.0 / ac)
        self.sqrt_recipm1_ac = np.sqrt(1.0 / ac - 1)
        self.posterior_variance = b * (1.0 - acp) / (1.0 - ac)
        # the first posterior variance is 0: replace it by the second before the log
        second = self.posterior_variance[1] if len(b) > 1 else b[0]
        self.posterior_log_variance = np.log(np.append(second, self.posterior_variance[1:]))
        self.posterior_coef1 = b * np.sqrt(acp) / (1.0 - ac)
        self.posterior_coef2 = (1.0 - acp) * np.sqrt(1.0 - b) / (1.0 - ac)
        self.log_betas = np.log(b)

    @classmethod
    def cosine(cls, num_steps: int = TRAIN_STEPS) -> "Schedule":
        full_betas = np.array([min(1 - cosine_alpha_bar((i + 1) / TRAIN_STEPS) / cosine_alpha_bar(i / TRAIN_STEPS), 0.999)
                               for i in range(TRAIN_STEPS)], dtype=np.float64)
        if num_steps == TRAIN_STEPS:
            return cls(np.arange(TRAIN_STEPS), full_betas)
        kept = set(respaced_timesteps(num_steps))
        betas, steps, last = [], [], 1.0
        for i, ac in enumerate(np.cumprod(1.0 - full_betas)):
            if i in kept:
                betas.append(1 - ac / last)
                steps.append(i)
                last = ac
        return cls(np.array(steps), np.array(betas, dtype=np.float64))

    def at(self, name: str, step: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Constant `name` at respaced indices `step` [N], as float32 [N, 1] (then like's dtype)."""
        values = torch.from_numpy(getattr(self, name)).to(like.device)[step].float()
        return values.to(like.dtype)[:, None]


# --------------------------------------------------------------------------- head

class ResidualDiffusionHead(nn.Module):
    """Owns the denoiser `net`; `loss` for training, `sample` for inference.

    `context_kernel` k > 0 (not in the official head) adds a k x k convolution over the last
    scale's grid of conditions, zero at first: each token's condition then also sees its
    neighbours' hidden states and codes, which the block-causal transformer never shows it
    (a last-scale token attends to the coarser scales only). `contextualize` applies it."""

    def __init__(self, token_dim: int, cond_dim: int, width: int, depth: int, sampling_steps: int = 8,
                 residual_scale: float = RESIDUAL_SCALE, hidden: int = 0, context_kernel: int = 0):
        super().__init__()
        if residual_scale <= 0:
            raise ValueError(f"residual_scale must be positive, got {residual_scale}")
        if hidden < 0:
            raise ValueError(f"the head's hidden width must be >= 0 (0: its width), got {hidden}")
        if context_kernel < 0 or (context_kernel and context_kernel % 2 == 0):
            raise ValueError(f"the head's context kernel must be 0 or an odd size, got {context_kernel}")
        self.net = DenoiserMLP(token_dim, cond_dim, width, depth, hidden)
        self.context_kernel = context_kernel
        self.context = None
        if context_kernel:
            self.context = nn.Conv2d(cond_dim, cond_dim, context_kernel, padding=context_kernel // 2)
            nn.init.zeros_(self.context.weight)
            nn.init.zeros_(self.context.bias)
        self.sampling_steps = sampling_steps
        self.residual_scale = residual_scale
        self.train_schedule = Schedule.cosine(TRAIN_STEPS)
        self._schedules: dict[int, Schedule] = {}

    # ---- the condition's neighbourhood
    def contextualize(self, z: torch.Tensor) -> torch.Tensor:
        """Conditions [B, P^2, C] on a square grid -> the same plus the context convolution's output."""
        if self.context is None:
            return z
        B, n, C = z.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the head's context needs a square grid of conditions, got {n} tokens")
        grid = z.transpose(1, 2).reshape(B, C, side, side)
        return z + self.context(grid.to(self.context.weight.dtype)).flatten(2).transpose(1, 2).to(z.dtype)

    def contextualize_neighbours(self, z: torch.Tensor, neighbours: torch.Tensor) -> torch.Tensor:
        """`contextualize` for scattered tokens: z [N, C] and their k x k neighbourhoods [N, k^2, C]
        in row-major offset order, zero outside the grid (training draws tokens, not grids)."""
        if self.context is None:
            return z
        flat = neighbours.transpose(1, 2).flatten(1)  # [N, C * k^2], the convolution's weight order
        return z + F.linear(flat, self.context.weight.flatten(1), self.context.bias)

    def schedule(self, steps: int) -> Schedule:
        if steps not in self._schedules:
            self._schedules[steps] = Schedule.cosine(steps)
        return self._schedules[steps]

    # ---- inference
    def sample(self, z_cond: torch.Tensor, z_uncond: torch.Tensor | None = None, cfg: float = 0.0,
               steps: int | None = None, temperature: float = 1.0, generator: torch.Generator | None = None,
               noise: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> torch.Tensor:
        """Ancestral DDPM sampling of residual tokens [N, token_dim] for conditions z [N, C].

        Guidance acts in epsilon space: eps = (1 + cfg) eps(z_cond) - cfg eps(z_uncond); the
        variance comes from the conditional rows. `noise` = (initial, per-step list) replaces
        the generator's draws (used by the parity check). Returns the residual, already
        multiplied by `residual_scale`. Gradients flow when enabled (callers that only sample
        run it under no_grad or inference_mode).
        """
        steps = steps or self.sampling_steps
        sched = self.schedule(steps)
        N, D = z_cond.shape[0], self.net.token_dim
        dtype = z_cond.dtype
        guided = z_uncond is not None and cfg != 0
        z = torch.cat([z_cond, z_uncond]) if guided else z_cond
        x = noise[0] if noise is not None else torch.randn(N, D, generator=generator, device=z.device, dtype=dtype)
        # step-invariant work done once: the condition's projection, every step's time embedding
        # (one row per step, the same for all tokens) and the schedule's constants per step
        cond = self.net.cond_embed(z)
        times = self.net.time_embed(torch.from_numpy(sched.timesteps).to(z.device))
        constants = {name: sched.at(name, torch.arange(steps, device=z.device), x)[:, 0]
                     for name in ("log_betas", "posterior_log_variance", "sqrt_recip_ac", "sqrt_recipm1_ac",
                                  "posterior_coef1", "posterior_coef2")}
        for n, i in enumerate(reversed(range(steps))):
            c = {name: values[i] for name, values in constants.items()}
            out = self.net.trunk(torch.cat([x, x]) if guided else x, times[i] + cond)
            eps, v = out[:N, :D], out[:N, D:]
            if guided:
                eps = (1 + cfg) * eps - cfg * out[N:, :D]
            x0 = (c["sqrt_recip_ac"] * x - c["sqrt_recipm1_ac"] * eps).clamp(-1, 1)
            mean = c["posterior_coef1"] * x0 + c["posterior_coef2"] * x
            x = mean
            if i > 0:  # the draw is made even at temperature 0, so later draws do not shift with it
                eps_noise = noise[1][n] if noise is not None else torch.randn(N, D, generator=generator,
                                                                                 device=z.device, dtype=dtype)
                if temperature != 0:  # at 0 the variance must not enter: an overflowing exp times 0 is NaN
                    frac = (v + 1) / 2
                    log_var = frac * c["log_betas"] + (1 - frac) * c["posterior_log_variance"]
                    x = mean + torch.exp(0.5 * log_var) * eps_noise * temperature
        return x * self.residual_scale

    # ---- training
    def loss(self, target: torch.Tensor, z: torch.Tensor, timesteps: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """IDDPM hybrid loss for residual tokens target [N, D] (unscaled) under conditions z [N, C].

        Mean-squared epsilon error plus the variational bound for the learned variance (with the
        mean's gradient stopped in that term), averaged over tokens. Timesteps [N] are drawn
        uniformly from the 1000 training steps (the official draw) unless given."""
        sched = self.train_schedule
        x0 = target / self.residual_scale
        N, D = x0.shape
        t = torch.randint(0, TRAIN_STEPS, (N,), generator=generator) if timesteps is None else timesteps
        t = t.to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        ac = torch.from_numpy(sched.alphas_cumprod).to(x0.device)[t].float()[:, None]
        x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
        out = self.net(x_t, t, z).float()
        eps, v = out[:, :D], out[:, D:]
        mse = (noise - eps).square().mean(1)
        vb = self._variational_bound(x0.float(), x_t.float(), t, eps.detach(), v)
        return (mse + vb).mean()

    def _variational_bound(self, x0, x_t, t, eps, v) -> torch.Tensor:
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits; decoder NLL at t = 0."""
        s = self.train_schedule
        true_mean = s.at("posterior_coef1", t, x_t) * x0 + s.at("posterior_coef2", t, x_t) * x_t
        true_log_var = s.at("posterior_log_variance", t, x_t)
        frac = (v + 1) / 2
        log_var = frac * s.at("log_betas", t, x_t) + (1 - frac) * true_log_var
        pred_x0 = (s.at("sqrt_recip_ac", t, x_t) * x_t - s.at("sqrt_recipm1_ac", t, x_t) * eps).clamp(-1, 1)
        mean = s.at("posterior_coef1", t, x_t) * pred_x0 + s.at("posterior_coef2", t, x_t) * x_t
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean).square() * torch.exp(-log_var))
        kl = kl.mean(1) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var).mean(1) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


def _discretized_gaussian_log_likelihood(x, mean, log_scale):
    """Log-likelihood of x under a Gaussian discretized to bins of width 2/255 (IDDPM's decoder term)."""
    def cdf(u):
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u ** 3)))
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_minus = cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_minus).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_plus,
                            torch.where(x > 0.999, log_one_minus_cdf_min,
                                        torch.log((cdf_plus - cdf_minus).clamp(min=1e-12))))
    return log_probs
