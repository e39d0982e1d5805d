"""Train the hybrid tokenizer: one decoder, alternately fed the discrete-only latent and the
full continuous latent (p = 0.5 as in HART; `--continuous-prob 1` trains the continuous path
alone), with L1 + L2 reconstruction, VQ + commitment losses and dead-code restarts. With several
`--resolutions` the steps cycle through them, each with its own entry of `--batch-sizes`.

    python -m train.train_tokenizer --preset emoji-64 --out work/tok64
    python -m train.train_tokenizer --preset emoji-mixed --init-from work/tok64/tokenizer --out work/tokmix
    accelerate launch --num_processes 2 -m train.train_tokenizer --preset emoji-64 ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
import sys

import torch
import torch.nn as nn

from hart.checkpoint import config_from_dict, read_json, write_json, write_weights
from hart.presets import get_preset
from hart.tokenizer import HybridTokenizer, TokenizerConfig

from .common import batch_indices, check_schedule, scale_schedule, warm_start
from .data import load_dataset
from .engine import clip_gradients, command_line, Engine, RunConfig, step_generator, unwrap
from .metrics import psnr, save_grid, ssim


@dataclass
class TokenizerTrainConfig(RunConfig):
    out: str = "work/tokenizer"
    data: str = "data/emoji"
    model_preset: str = "emoji"        # hart preset whose tokenizer architecture is trained
    # architecture overrides of the preset's tokenizer (0 / empty = the preset's), kept in config.json
    vocab_size: int = 0
    z_channels: int = 0
    ch: int = 0
    ch_mult: tuple = ()
    num_res_blocks: int = 0
    share_quant_resi: int = 0          # number of shared phi convs (1 = the same phi at every scale)
    resolutions: tuple = (64,)         # the steps cycle through them, with the preset's scale schedules
    batch_sizes: tuple = (32,)         # one per resolution
    lr: float = 4e-4
    weight_decay: float = 0.0
    steps: int = 3000
    continuous_prob: float = 0.5       # probability of the continuous (hybrid) path; HART: 0.5
    beta: float = 0.25                 # commitment weight (pulls the latent toward its codes)
    dead_code_every: int = 200         # restart codes unused over this many steps (0 = off)
    init_from: str = ""                # tokenizer folder to start from
    init_partial: bool = False         # warm start the preset's architecture from the tensors that fit
    decoder_only: bool = False         # freeze encoder, codebook and phi (codes stay valid for a trained AR)
    grad_clip: float = 1.0
    val_fraction: float = 0.05
    eval_every: int = 1000


PRESETS = {
    "tiny": TokenizerTrainConfig(model_preset="tiny", resolutions=(32,), batch_sizes=(8,), steps=30, warmup=5,
                                 log_every=5, eval_every=30, checkpoint_every=15, dead_code_every=10),
    "emoji-64": TokenizerTrainConfig(steps=1000, warmup=50, dead_code_every=100, eval_every=500,
                                     checkpoint_every=200, checkpoint_minutes=5.0),
    "emoji-128": TokenizerTrainConfig(resolutions=(128,), batch_sizes=(16,), steps=1500),
    "emoji-mixed": TokenizerTrainConfig(resolutions=(64, 128), batch_sizes=(32, 16), steps=3000, warmup=50,
                                        dead_code_every=100, eval_every=1000, checkpoint_every=200,
                                        checkpoint_minutes=5.0),
}

ARCHITECTURE_FIELDS = ("vocab_size", "z_channels", "ch", "ch_mult", "num_res_blocks", "share_quant_resi")


def architecture_overrides(cfg: TokenizerTrainConfig) -> dict:
    """The architecture fields this run sets (the rest come from the preset)."""
    return {name: getattr(cfg, name) for name in ARCHITECTURE_FIELDS if getattr(cfg, name)}


def tokenizer_config(cfg: TokenizerTrainConfig, init: TokenizerConfig | None = None) -> TokenizerConfig:
    """The trained tokenizer's config: `init` (the --init-from tokenizer's, kept by a strict warm
    start) or the preset's with this run's architecture overrides."""
    overrides = architecture_overrides(cfg)
    if cfg.init_from and not cfg.init_partial:
        if overrides:
            raise ValueError(f"--init-from {cfg.init_from} keeps its own architecture; to change "
                             f"{', '.join(overrides)} warm start with --init-partial true")
        if init is None:
            init = config_from_dict(TokenizerConfig, read_json(Path(cfg.init_from) / "config.json"), cfg.init_from)
        return init
    return replace(get_preset(cfg.model_preset).tokenizer, **overrides)  # replace() makes ch_mult a tuple


def resolution_plan(cfg: TokenizerTrainConfig, downsample: int) -> list[tuple[int, int, tuple[int, ...]]]:
    """(resolution, batch size, scale schedule) for each resolution the steps cycle through."""
    if len(cfg.batch_sizes) != len(cfg.resolutions):
        raise ValueError(f"--batch-sizes {tuple(cfg.batch_sizes)} needs one entry per resolution "
                         f"{tuple(cfg.resolutions)}")
    plan = []
    for resolution, batch_size in zip(cfg.resolutions, cfg.batch_sizes):
        scales = scale_schedule(cfg.model_preset, resolution)
        check_schedule(resolution, scales, downsample)
        plan.append((resolution, batch_size, scales))
    return plan


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


def grid_suffix(plan, resolution: int) -> str:
    return f"_{resolution}" if resolution != plan[0][0] else ""


def validate(tokenizer: HybridTokenizer, plan, val_sets) -> tuple[dict, dict]:
    """Held-out metrics: flat for the first resolution, `res{r}_*` for the others, and with
    several resolutions the token agreement of each higher one with the lowest (`agreement{r}`)."""
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
    tok_cfg = tokenizer_config(cfg)
    plan = resolution_plan(cfg, tok_cfg.downsample)
    engine = Engine(cfg, "tokenizer")
    train_sets = {r: load_dataset(cfg.data, r, "train", cfg.val_fraction, cfg.seed, caption_variation=False)
                  for r, _, _ in plan}
    val_sets = {r: load_dataset(cfg.data, r, "val", cfg.val_fraction, cfg.seed) for r, _, _ in plan}

    torch.manual_seed(cfg.seed)
    tokenizer = HybridTokenizer(tok_cfg)
    if cfg.init_from:
        warm_start(tokenizer, Path(cfg.init_from) / "model.safetensors", cfg.init_partial, engine.print)
    if cfg.decoder_only:  # HART's recipe on a trained tokenizer: only the decoder side learns
        for name, p in tokenizer.named_parameters():
            p.requires_grad_(name.startswith(("decoder.", "post_quant_conv.")))
    restart_every = 0 if cfg.decoder_only else cfg.dead_code_every
    optimizer = torch.optim.AdamW([p for p in tokenizer.parameters() if p.requires_grad], lr=cfg.lr,
                                  betas=(0.5, 0.9), weight_decay=cfg.weight_decay)
    holder = nn.ModuleDict({"tokenizer": tokenizer})  # the checkpoints' key layout
    state = engine.resume(holder, optimizer)
    usage = state.get("usage", torch.zeros(tok_cfg.vocab_size, dtype=torch.long))  # code hits since the last restart
    model, optimizer = engine.prepare(holder, optimizer)
    accelerator = engine.accelerator

    def train_step(step: int, gen: torch.Generator) -> dict | None:
        nonlocal usage
        resolution, batch_size, scales = plan[step % len(plan)]
        train_set = train_sets[resolution]
        # each resolution walks its own epochs
        idx = batch_indices(len(train_set), batch_size, step // len(plan), cfg.seed, engine.rank, engine.world)
        images = torch.stack([train_set[int(i)]["image"] for i in idx]).to(accelerator.device)
        tok = unwrap(accelerator, model)["tokenizer"]
        continuous = bool(torch.rand((), generator=gen) < cfg.continuous_prob)
        model.train()
        with accelerator.autocast():
            recon, vq_loss, indices, _, _ = model["tokenizer"](images, scales, continuous=continuous, beta=cfg.beta)
            recon = recon.float()
            l1, l2 = (recon - images).abs().mean(), (recon - images).square().mean()
            loss = l1 + l2 + vq_loss.float()
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
            if engine.log and restarted:
                engine.log.write(step + 1, dead_codes_restarted=restarted)
        return {"loss": loss, "l1": l1, "l2": l2, "vq": vq_loss, "continuous": continuous,
                "resolution": resolution, "grad_norm": grad_norm}

    def evaluate_and_draw(step: int) -> None:
        tok = unwrap(accelerator, model)["tokenizer"]
        result, examples = validate(tok, plan, val_sets)
        engine.log.write(step, **{f"val_{k}": v for k, v in result.items()})
        for resolution, rows in examples.items():
            save_grid(rows, engine.out / "samples" / f"step_{step:08d}{grid_suffix(plan, resolution)}.png")
        tok.train()

    outcome = engine.run(train_step, optimizer, lambda: unwrap(accelerator, model),
                         extra_state=lambda: {"usage": usage}, evaluate=evaluate_and_draw)
    if "stopped_by_signal" in outcome:
        return outcome
    result = {}
    tok = unwrap(accelerator, model)["tokenizer"].eval()
    if engine.is_main:
        metrics, examples = validate(tok, plan, val_sets)
        result = {"step": outcome["step"], **metrics}
        write_json(asdict(tok.config), engine.out / "tokenizer" / "config.json")
        write_weights(tok.state_dict(), engine.out / "tokenizer" / "model.safetensors")
        write_json(result, engine.out / "eval.json")
        for resolution, rows in examples.items():
            save_grid(rows, engine.out / "samples" / f"final{grid_suffix(plan, resolution)}.png")
    engine.finish(tok, ["l1", "l2", "vq"])
    return result


def main(argv: list[str] | None = None) -> int:
    return command_line(TokenizerTrainConfig, PRESETS, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
