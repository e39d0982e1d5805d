"""Helpers the trainers and the evaluation share: data order, scale schedules and their checks,
the frozen tokenizer, the teacher-forced head condition, images as tensors, EMA, the optimizer
and warm starts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from hart.checkpoint import config_from_dict, load_into, load_matching, read_json, read_weights
from hart.presets import get_preset
from hart.tokenizer import HybridTokenizer, TokenizerConfig
from hart.transformer import HARTTransformer


# ------------------------------------------------------------------ data order

def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Data indices of this process's share of global batch `step` (epochs reshuffled, no state)."""
    global_batch = batch_size * world
    per_epoch = max(1, n // global_batch)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    start = offset * global_batch + rank * batch_size
    return order[start:start + batch_size] if n >= global_batch else order[torch.arange(start, start + batch_size) % n]


# ------------------------------------------------------------------ schedules and the tokenizer

def scale_schedule(preset: str, resolution: int) -> tuple[int, ...]:
    """The preset's scale schedule for `resolution`."""
    resolutions = get_preset(preset).resolutions
    if resolution not in resolutions:
        raise ValueError(f"resolution {resolution} has no scale schedule in preset {preset!r} ({sorted(resolutions)})")
    return tuple(resolutions[resolution])


def check_schedule(resolution: int, scales, downsample: int) -> None:
    """The last scale times the tokenizer's downsampling factor must give the resolution."""
    if resolution % downsample:
        raise ValueError(f"resolution {resolution} is not divisible by the tokenizer's downsampling factor "
                         f"{downsample}")
    if scales[-1] * downsample != resolution:
        raise ValueError(f"scales {tuple(scales)}: the last scale x {downsample} must equal {resolution}")


def load_tokenizer(path: str) -> HybridTokenizer:
    """A frozen tokenizer from a tokenizer folder (config.json + model.safetensors) or a pipeline folder."""
    if not path:
        raise ValueError("a tokenizer folder or a pipeline folder is required (--tokenizer)")
    folder = Path(path)
    if (folder / "tokenizer" / "config.json").is_file():
        folder = folder / "tokenizer"
    cfg = config_from_dict(TokenizerConfig, read_json(folder / "config.json"), str(folder / "config.json"))
    tokenizer = HybridTokenizer(cfg)
    load_into(tokenizer, read_weights(folder / "model.safetensors"), str(folder / "model.safetensors"))
    return tokenizer.eval().requires_grad_(False)


def teacher_forced_condition(transformer: HARTTransformer, tokenizer: HybridTokenizer, states: torch.Tensor,
                             positions: torch.Tensor, indices: list[torch.Tensor], scales,
                             coarse_scales: int = 0, context: bool = True) -> torch.Tensor:
    """The residual head's condition [B, P^2, C] for an image's true tokens `indices`: the
    teacher-forced transformer's last hidden state plus the embedding of the true last-scale codes
    (zero codes where the model leaves the last scale to the head, unless `coarse_scales` covers
    every scale: then the last codes, taken from the low-resolution image, condition the head).
    `context` False leaves out the head's context convolution (what `train_head` caches)."""
    dtype = transformer.word_embed.weight.dtype
    inputs = tokenizer.quantize.teacher_forcing_inputs(indices, scales).to(dtype)
    _, hidden_last, _ = transformer(states.to(dtype), positions, inputs, scales)
    zero_codes = transformer.continuous_last(scales) and coarse_scales < len(scales)
    codes = None if zero_codes else tokenizer.codebook[indices[-1]].to(dtype)
    return transformer.diffusion_condition(hidden_last, codes, context)


def head_tokens(tokenizer: HybridTokenizer, transformer: HARTTransformer, images: torch.Tensor, scales,
                low_images: torch.Tensor | None = None, coarse_scales: int = 0,
                coarse_remainder: bool = False) -> tuple[list[torch.Tensor], torch.Tensor]:
    """True indices and residual targets of `images` as the sampler meets them: with `coarse_scales`,
    the first scales come from `low_images` (the same images at the model's lowest resolution),
    upsampled and re-encoded, and the later scales and the residual take what those leave; with
    `coarse_remainder` the residual target is what the images hold beyond that whole re-encoding."""
    if not coarse_scales:
        return tokenizer.encode(images, scales, transformer.continuous_last(scales))
    if low_images is None or len(low_images) != len(images):
        raise ValueError(f"coarse_scales {coarse_scales} needs the same images at the lowest resolution")
    if coarse_remainder and coarse_scales < len(scales):
        raise ValueError(f"coarse_remainder needs coarse_scales {len(scales)} (every scale from the low image)")
    continuous_last = transformer.continuous_last(scales)
    low_indices, low_remainder = tokenizer.encode_upsampled(low_images, scales, continuous_last)
    indices, residual = tokenizer.encode(images, scales, continuous_last, low_indices[:coarse_scales])
    return indices, residual - low_remainder if coarse_remainder else residual


def images_to_tensor(images) -> torch.Tensor:
    """PIL images -> float [N, 3, H, W] in [-1, 1]."""
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])


# ------------------------------------------------------------------ models and optimizers

def hash_weights(digest, module: nn.Module, skip_prefix: str | None = None) -> None:
    """Feed every tensor of `module` (name and values, in name order) into a hashlib digest, so a
    cache file named by the digest is rebuilt when the weights change."""
    for k, v in sorted(module.state_dict().items()):
        if skip_prefix is None or not k.startswith(skip_prefix):
            digest.update(k.encode())
            digest.update(v.detach().float().cpu().numpy().tobytes())


def adamw_decaying_matrices(module: nn.Module, lr: float, weight_decay: float,
                            lr_multipliers: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on weight matrices only (not on
    biases, norms or other vectors). Parameters named in `lr_multipliers` get a group of their own,
    without decay, whose "lr_multiplier" `engine.set_lr` applies to the scheduled lr."""
    lr_multipliers = lr_multipliers or {}
    decay, no_decay, own = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name in lr_multipliers:
            own.append({"params": [p], "weight_decay": 0.0, "lr_multiplier": lr_multipliers[name]})
        else:
            (no_decay if p.ndim < 2 or "bias" in name or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}] + own, lr=lr, betas=(0.9, 0.95))


class EMA:
    """Exponential moving average of a model's float parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: short memory early on
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return model


def warm_start(module: nn.Module, src: Path, partial: bool, log=print, may_be_new: tuple[str, ...] = ()) -> None:
    """Load `src` into a fresh module: strictly, or (partial) only the tensors whose shapes match.
    Tensors named in `may_be_new` keep their fresh values when `src` lacks them (a strict load
    otherwise: e.g. a resolution vector added to a model trained without one)."""
    state = read_weights(src)
    if partial:
        fresh = load_matching(module, state)
        log(f"initialised from {src}; {len(fresh)} tensors of other shapes left fresh: " + ", ".join(fresh))
        return
    fresh = module.state_dict()
    added = [name for name in may_be_new if name in fresh and name not in state]
    state.update({name: fresh[name] for name in added})
    load_into(module, state, str(src))
    log(f"initialised from {src}" + (f"; new, left as initialised: {', '.join(added)}" if added else ""))
