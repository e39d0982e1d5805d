"""Train the hybrid tokenizer: one decoder, alternately fed the discrete-only latent and the
full continuous latent (p = 0.5), with L1 + L2 reconstruction, VQ + commitment losses,
dead-code restarts, an optional PatchGAN discriminator after a warm-up, and an optional VGG
perceptual loss from a local weights file. With several `--resolutions` the steps cycle through
them (each with its own batch size), and `--consistency-weight` pulls each higher resolution's
latent, average-pooled to the lowest resolution's grid, toward the lowest resolution's latent of
the same image, pushing both resolutions toward the same coarse tokens.

    python -m train.train_tokenizer --preset emoji-64 --out runs/tok64
    python -m train.train_tokenizer --preset emoji-mixed --init-from runs/tok32-c1/tokenizer --out runs/tokmix
    accelerate launch --num_processes 2 -m train.train_tokenizer --preset emoji-64 ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
import json
from pathlib import Path
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hart.checkpoint import config_from_dict, read_json, write_json, write_weights
from hart.presets import get_preset
from hart.tokenizer import HybridTokenizer, TokenizerConfig

from .common import (batch_indices, Checkpointer, clip_gradients, cosine_lr, load_config, make_accelerator,
                     plot_curves, record_process_checksums, RunLog, set_lr, step_generator, StopSignal, unwrap,
                     warm_start)
from .data import load_dataset
from .metrics import psnr, save_grid, ssim


@dataclass
class TokenizerTrainConfig:
    data: str = "data/emoji"
    out: str = "runs/tokenizer"
    model_preset: str = "emoji"        # hart preset whose tokenizer architecture is trained
    # architecture overrides of the preset's tokenizer (0 / empty = the preset's), kept in config.json
    vocab_size: int = 0
    z_channels: int = 0
    ch: int = 0
    ch_mult: tuple = ()
    num_res_blocks: int = 0
    decoder_ch: int = 0
    share_quant_resi: int = 0          # number of shared phi convs (1 = the same phi at every scale)
    resolution: int = 64
    resolutions: tuple = ()            # several: steps cycle through them; empty = (resolution,)
    scales: tuple = ()                 # scale schedule (one resolution only); empty = the preset's
    batch_size: int = 32
    batch_sizes: tuple = ()            # per entry of resolutions; empty = batch_size for each
    consistency_weight: float = 0.0    # relative MSE between pooled higher-resolution latents and the lowest's
    lr: float = 4e-4
    weight_decay: float = 0.0
    warmup: int = 100
    steps: int = 3000
    continuous_prob: float = 0.5
    beta: float = 0.25                 # commitment weight (pulls the latent toward its codes)
    l1_weight: float = 1.0
    l2_weight: float = 1.0
    vq_weight: float = 1.0
    dead_code_every: int = 200         # restart codes unused over this many steps (0 = off)
    disc_weight: float = 0.0           # PatchGAN hinge loss weight (0 = off)
    disc_start: int = 1000
    perceptual_weight: float = 0.0     # VGG feature loss weight (needs perceptual_weights)
    perceptual_weights: str = ""       # local VGG16 features file; never downloaded
    init_from: str = ""                # tokenizer folder to start from
    init_partial: bool = False         # warm start the preset's architecture from the tensors that fit
    decoder_only: bool = False         # freeze encoder, codebook and phi (codes stay valid for a trained AR)
    grad_clip: float = 1.0
    mixed_precision: str = "auto"      # no | bf16 | fp16 | auto (bf16 where the hardware has it)
    seed: int = 0
    val_fraction: float = 0.05
    log_every: int = 20
    eval_every: int = 1000
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    max_minutes: float = 0.0           # stop (with a checkpoint) after this long; 0 = no limit
    resume: bool = True


PRESETS = {
    "tiny": TokenizerTrainConfig(model_preset="tiny", resolution=32, batch_size=8, steps=30, warmup=5,
                                 log_every=5, eval_every=30, checkpoint_every=15, dead_code_every=10),
    "emoji-64": TokenizerTrainConfig(steps=1000, warmup=50, dead_code_every=100, eval_every=500,
                                     checkpoint_every=200, checkpoint_minutes=5.0),
    "emoji-128": TokenizerTrainConfig(resolution=128, batch_size=16, steps=1500),
    "emoji-mixed": TokenizerTrainConfig(resolutions=(64, 128), batch_sizes=(32, 16), steps=3000, warmup=50,
                                        dead_code_every=100, eval_every=1000, checkpoint_every=200,
                                        checkpoint_minutes=5.0),
}


class PatchDiscriminator(nn.Module):
    """Small PatchGAN: strided 4x4 convs, LeakyReLU, one logit per patch."""

    def __init__(self, channels: int = 64, layers: int = 3):
        super().__init__()
        mods, ch = [nn.Conv2d(3, channels, 4, 2, 1), nn.LeakyReLU(0.2)], channels
        for i in range(1, layers):
            mods += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2)]
            ch *= 2
        mods.append(nn.Conv2d(ch, 1, 4, 1, 1))
        self.main = nn.Sequential(*mods)

    def forward(self, x):
        return self.main(x)


def resolution_plan(cfg: TokenizerTrainConfig) -> list[tuple[int, int, tuple[int, ...]]]:
    """(resolution, batch size, scale schedule) for each resolution the steps cycle through."""
    resolutions = tuple(cfg.resolutions) or (cfg.resolution,)
    batch_sizes = tuple(cfg.batch_sizes) or (cfg.batch_size,) * len(resolutions)
    if len(batch_sizes) != len(resolutions):
        raise ValueError(f"--batch-sizes {batch_sizes} needs one entry per resolution {resolutions}")
    if cfg.scales and len(resolutions) > 1:
        raise ValueError("--scales sets one schedule; with several resolutions the preset's are used")
    if cfg.consistency_weight and len(resolutions) < 2:
        raise ValueError("--consistency-weight needs at least two --resolutions")
    preset = get_preset(cfg.model_preset)
    plan = []
    for resolution, batch_size in zip(resolutions, batch_sizes):
        if cfg.scales:
            scales = tuple(cfg.scales)
        elif resolution in preset.resolutions:
            scales = preset.resolutions[resolution]
        else:
            raise ValueError(f"resolution {resolution} has no schedule in preset {cfg.model_preset!r} "
                             f"({sorted(preset.resolutions)}); pass --scales")
        plan.append((resolution, batch_size, scales))
    return plan


ARCHITECTURE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "decoder_ch",
                       "share_quant_resi")


def architecture_overrides(cfg: TokenizerTrainConfig) -> dict:
    """The architecture fields this run sets (the rest come from the preset)."""
    return {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS if getattr(cfg, name)}


@torch.no_grad()
def restart_dead_codes(tokenizer: HybridTokenizer, usage: torch.Tensor, latents: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Move unused codes onto random current encoder latents (plus a little noise)."""
    dead = (usage == 0).nonzero().flatten()
    if len(dead) == 0 or len(latents) == 0:
        return 0
    pick = torch.randint(0, len(latents), (len(dead),), generator=generator)
    noise = torch.randn(len(dead), latents.shape[1], generator=generator) * 0.01
    tokenizer.quantize.embedding.weight.data[dead] = latents[pick].float() + noise
    return len(dead)


@torch.no_grad()
def evaluate(tokenizer: HybridTokenizer, dataset, scales, batch_size: int = 64, max_items: int = 512):
    """PSNR/SSIM of discrete-only and hybrid reconstructions, and codebook usage."""
    tokenizer.eval()
    totals = {"psnr_discrete": 0.0, "psnr_hybrid": 0.0, "ssim_discrete": 0.0, "ssim_hybrid": 0.0}
    used = torch.zeros(tokenizer.config.vocab_size, dtype=torch.bool)
    n = min(len(dataset), max_items)
    examples = None
    for start in range(0, n, batch_size):
        images = torch.stack([dataset[i]["image"] for i in range(start, min(n, start + batch_size))])
        indices, residual = tokenizer.encode(images, scales)
        fhat = tokenizer.indices_to_fhat(indices, scales)
        discrete, hybrid = tokenizer.decode(fhat), tokenizer.decode(fhat, residual)
        for idx in indices:
            used[idx.flatten()] = True
        for name, recon in (("discrete", discrete), ("hybrid", hybrid)):
            totals[f"psnr_{name}"] += psnr(recon, images).sum().item()
            totals[f"ssim_{name}"] += ssim(recon, images).sum().item()
        if examples is None:
            examples = (images[:8], discrete[:8], hybrid[:8])
    metrics = {k: round(v / n, 4) for k, v in totals.items()}
    metrics["codebook_usage"] = round(used.float().mean().item(), 4)
    return metrics, examples


@torch.no_grad()
def token_agreement(tokenizer: HybridTokenizer, low_set, high_set, low_scales, high_scales,
                    batch_size: int = 64, max_items: int = 512) -> dict[int, float]:
    """Per leading scale both schedules share: the fraction of an image's tokens that are the same
    when it is encoded at the low and at the high resolution (1.0 = one token language)."""
    tokenizer.eval()
    shared = 0
    while shared < min(len(low_scales), len(high_scales)) and low_scales[shared] == high_scales[shared]:
        shared += 1
    equal = [0.0] * shared
    n = min(len(low_set), max_items)
    for start in range(0, n, batch_size):
        ids = range(start, min(n, start + batch_size))
        low, _ = tokenizer.encode(torch.stack([low_set[i]["image"] for i in ids]), low_scales)
        high, _ = tokenizer.encode(torch.stack([high_set[i]["image"] for i in ids]), high_scales)
        for si in range(shared):
            equal[si] += (low[si] == high[si]).float().mean(1).sum().item()
    return {low_scales[si]: round(equal[si] / n, 4) for si in range(shared)}


def latent_consistency(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """MSE between the high-resolution latent average-pooled to the low one's grid and the low
    latent, relative to the low latent's mean square. The ratio is not detached, so scaling
    both latents down leaves it unchanged (a detached denominator rewards shrinking the latent,
    which collapses the codebook)."""
    high, low = high.float(), low.float()
    pooled = F.adaptive_avg_pool2d(high, low.shape[-2:])
    return (pooled - low).square().mean() / low.square().mean()


def grid_suffix(plan, resolution: int) -> str:
    return f"_{resolution}" if resolution != plan[0][0] else ""


def validate(tokenizer: HybridTokenizer, plan, val_sets) -> tuple[dict, dict]:
    """Held-out metrics: flat for the first resolution, `res{r}_*` for the others, and with
    several resolutions the token agreement of each higher one with the lowest (`agreement{r}`),
    the same reference the consistency term uses."""
    metrics, examples = {}, {}
    first = plan[0][0]
    lowest, _, lowest_scales = min(plan)
    for resolution, _, scales in plan:
        values, examples[resolution] = evaluate(tokenizer, val_sets[resolution], scales)
        prefix = "" if resolution == first else f"res{resolution}_"
        metrics.update({prefix + k: v for k, v in values.items()})
        if resolution != lowest:
            agreement = token_agreement(tokenizer, val_sets[lowest], val_sets[resolution], lowest_scales, scales)
            metrics[f"agreement{resolution}"] = {str(k): v for k, v in agreement.items()}
    return metrics, examples


def train(cfg: TokenizerTrainConfig) -> dict:
    out = Path(cfg.out)
    plan = resolution_plan(cfg)
    overrides = architecture_overrides(cfg)
    if cfg.init_from and not cfg.init_partial and overrides:
        raise ValueError(f"--init-from {cfg.init_from} keeps its own architecture; to change "
                         f"{', '.join(overrides)} warm start with --init-partial true")
    if cfg.init_from and not cfg.init_partial:
        tok_cfg = config_from_dict(TokenizerConfig, read_json(Path(cfg.init_from) / "config.json"), cfg.init_from)
    else:  # replace() reruns __post_init__, which makes ch_mult a tuple
        tok_cfg = replace(get_preset(cfg.model_preset).tokenizer, **overrides)
    tok_cfg.continuous_prob, tok_cfg.beta = cfg.continuous_prob, cfg.beta
    for resolution, _, scales in plan:
        if resolution % tok_cfg.downsample:
            raise ValueError(f"resolution {resolution} is not divisible by the tokenizer's downsampling "
                             f"factor {tok_cfg.downsample}")
        if scales[-1] * tok_cfg.downsample != resolution:
            raise ValueError(f"scales {scales}: the last scale x {tok_cfg.downsample} must equal {resolution}")
    accelerator = make_accelerator(cfg.mixed_precision, log_dir=out)
    rank, world = accelerator.process_index, accelerator.num_processes
    train_sets = {r: load_dataset(cfg.data, r, "train", cfg.val_fraction, cfg.seed, caption_variation=False)
                  for r, _, _ in plan}
    val_sets = {r: load_dataset(cfg.data, r, "val", cfg.val_fraction, cfg.seed) for r, _, _ in plan}
    lowest = min(train_sets)

    torch.manual_seed(cfg.seed)
    tokenizer = HybridTokenizer(tok_cfg)
    if cfg.init_from:
        src = Path(cfg.init_from) / "model.safetensors"
        warm_start(tokenizer, src, cfg.init_partial, accelerator)
    if cfg.decoder_only:  # HART's recipe on a trained tokenizer: only the decoder side learns
        for name, p in tokenizer.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    restart_every = 0 if cfg.decoder_only else cfg.dead_code_every
    disc = PatchDiscriminator() if cfg.disc_weight > 0 else None
    perceptual = None
    if cfg.perceptual_weight > 0:
        if not cfg.perceptual_weights:
            raise ValueError("perceptual_weight > 0 needs --perceptual-weights: a local VGG16 features file")
        from .perceptual import PerceptualLoss
        perceptual = PerceptualLoss(cfg.perceptual_weights).to(accelerator.device)
    params = [p for p in tokenizer.parameters() if p.requires_grad] + (list(disc.parameters()) if disc else [])
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
    config_dict = asdict(cfg)
    checkpointer = Checkpointer(out)
    start_step = 0
    latest = checkpointer.latest() if cfg.resume else None
    holder = nn.ModuleDict({"tokenizer": tokenizer, **({"disc": disc} if disc else {})})
    usage = torch.zeros(tok_cfg.vocab_size, dtype=torch.long)  # code hits since the last restart
    if latest is not None:
        state = Checkpointer.load(latest, holder, None, optimizer, cfg)
        start_step = state["step"]
        usage = state.get("usage", usage)
        accelerator.print(f"resumed from {latest} at step {start_step}")
    model, optimizer = accelerator.prepare(holder, optimizer)
    log = RunLog(out, accelerator, start_step) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        write_json(config_dict, out / "config.json")

    last_ckpt_time = started = time.time()
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, disable=not accelerator.is_main_process,
               desc="tokenizer")
    step = start_step
    with StopSignal(accelerator) as stop:
        for step in bar:
            set_lr(optimizer, cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup))
            gen = step_generator(cfg.seed, step, rank)
            resolution, batch_size, scales = plan[step % len(plan)]
            train_set = train_sets[resolution]
            # each resolution walks its own epochs
            idx = batch_indices(len(train_set), batch_size, step // len(plan), cfg.seed, rank, world)
            images = torch.stack([train_set[int(i)]["image"] for i in idx]).to(accelerator.device)
            tok = unwrap(accelerator, model)["tokenizer"]
            continuous = bool(torch.rand((), generator=gen) < cfg.continuous_prob)
            model.train()
            with accelerator.autocast():
                recon, vq_loss, indices, _, latent = model["tokenizer"](images, scales, continuous=continuous)
                recon = recon.float()
                l1, l2 = (recon - images).abs().mean(), (recon - images).square().mean()
                loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.vq_weight * vq_loss.float()
                consistency = torch.zeros(())
                if cfg.consistency_weight and resolution != lowest:
                    low_images = torch.stack([train_sets[lowest][int(i)]["image"] for i in idx]).to(accelerator.device)
                    consistency = latent_consistency(latent, model["tokenizer"].encode_latent(low_images))
                    loss = loss + cfg.consistency_weight * consistency
                if perceptual is not None:
                    loss = loss + cfg.perceptual_weight * perceptual(recon, images)
                gan = torch.zeros(())
                if disc is not None and step >= cfg.disc_start:
                    logits_real = model["disc"](images)
                    logits_fake_detached = model["disc"](recon.detach())
                    d_loss = F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake_detached).mean()
                    gan = -model["disc"](recon).mean()
                    loss = loss + cfg.disc_weight * gan + d_loss
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = clip_gradients(accelerator, model, cfg.grad_clip)
            optimizer.step()
            for level in indices:
                usage += torch.bincount(level.flatten().cpu(), minlength=tok_cfg.vocab_size)
            if restart_every and (step + 1) % restart_every == 0:
                with torch.no_grad():
                    latents = tok.encode_latent(images).permute(0, 2, 3, 1).reshape(-1, tok_cfg.z_channels)
                usage = accelerator.reduce(usage.to(accelerator.device), "sum").cpu()
                # same gathered latents and a rank-independent generator: every process restarts alike
                restarted = restart_dead_codes(tok, usage, accelerator.gather(latents).cpu(),
                                               step_generator(cfg.seed, step, 0, stream=1))
                usage.zero_()
                if log and restarted:
                    log.write(step + 1, dead_codes_restarted=restarted)
            if log and (step + 1) % cfg.log_every == 0:
                log.write(step + 1, loss=round(loss.item(), 5), l1=round(l1.item(), 5), l2=round(l2.item(), 5),
                          vq=round(vq_loss.item(), 5), gan=round(float(gan), 5), continuous=continuous,
                          resolution=resolution, consistency=round(consistency.item(), 5),
                          grad_norm=round(float(grad_norm), 4),
                          lr=optimizer.param_groups[0]["lr"])
                bar.set_postfix(loss=f"{loss.item():.4f}", steps_s=f"{(step + 1 - start_step) / (time.time() - started):.2f}")
            done = step + 1 == cfg.steps
            out_of_time = (cfg.max_minutes and (time.time() - started) / 60 >= cfg.max_minutes) or stop.requested()
            if accelerator.is_main_process and (done or out_of_time or (step + 1) % cfg.checkpoint_every == 0
                                                or (time.time() - last_ckpt_time) / 60 >= cfg.checkpoint_minutes):
                checkpointer.save(step + 1, unwrap(accelerator, model), None, optimizer, config_dict,
                                  {"usage": usage})
                last_ckpt_time = time.time()
            if accelerator.is_main_process and ((step + 1) % cfg.eval_every == 0 or done):
                result, examples = validate(tok, plan, val_sets)
                log.write(step + 1, **{f"val_{k}": v for k, v in result.items()})
                for resolution, rows in examples.items():
                    save_grid(rows, out / "samples" / f"step_{step + 1:08d}{grid_suffix(plan, resolution)}.png")
                tok.train()
            accelerator.wait_for_everyone()
            if out_of_time:
                break
    if stop.received is not None:
        return stop.finish(step + 1)
    result = {}
    if accelerator.is_main_process:
        tok = unwrap(accelerator, model)["tokenizer"].eval()
        metrics, examples = validate(tok, plan, val_sets)
        result = {"step": step + 1, **metrics}
        write_json(asdict(tok.config), out / "tokenizer" / "config.json")
        write_weights(tok.state_dict(), out / "tokenizer" / "model.safetensors")
        write_json(result, out / "eval.json")
        for resolution, rows in examples.items():
            save_grid(rows, out / "samples" / f"final{grid_suffix(plan, resolution)}.png")
        plot_curves(log.records(), ["l1", "l2", "vq"], out / "loss.png")
    record_process_checksums(accelerator, unwrap(accelerator, model)["tokenizer"], out)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(TokenizerTrainConfig, PRESETS, argv, __doc__.splitlines()[0])
    result = train(cfg)
    if result:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
