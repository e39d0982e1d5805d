"""Train the AR transformer and its residual diffusion head on a frozen hybrid tokenizer.

Teacher forcing over all scales with the block-causal mask; cross-entropy on the discrete
tokens; the residual diffusion loss on the last scale, conditioned on the last hidden state
plus the embedding of the model's own sampled tokens; uniform condition dropout for CFG.
Stage 2 (`--init-from stage1/model --resolution 128`) copies the stage-1 weights (the 2D RoPE
makes them resolution-free) and drops most last-scale tokens (`--drop-last-scale true`);
`--replay-resolution 64 --replay-every 4` keeps training a quarter of the steps at 64 px so the
one model serves both resolutions.

    python -m train.train_ar --preset emoji-64 --tokenizer runs/tok64/tokenizer --out runs/ar64
    accelerate launch --num_processes 8 -m train.train_ar --preset emoji-128 ...
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import hashlib
import json
from pathlib import Path
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hart.checkpoint import (config_from_dict, load_into, read_json, read_weights, write_json,
                             write_weights)
from hart.pipeline import HARTPipeline, write_pipeline
from hart.presets import get_preset
from hart.sampler import expected_code_offset
from hart.text_encoder import TextEncoder
from hart.tokenizer import HybridTokenizer, TokenizerConfig
from hart.transformer import HARTTransformer

from .common import (adamw_decaying_matrices, batch_indices, Checkpointer, clip_gradients, cosine_lr, EMA,
                     hash_weights, load_config, make_accelerator, plot_curves, record_process_checksums, RunLog,
                     set_lr, step_generator, StopSignal, unwrap, warm_start)
from .data import load_dataset
from .metrics import save_grid


@dataclass
class ARTrainConfig:
    data: str = "data/emoji"
    out: str = "runs/ar"
    tokenizer: str = ""                # tokenizer folder (config.json + model.safetensors) or a pipeline folder
    model_preset: str = "emoji"
    resolution: int = 64
    scales: tuple = ()                 # empty: the preset's schedule for this resolution
    init_from: str = ""                # pipeline folder whose transformer weights start this run (stage 2)
    init_partial: bool = False         # warm start: load only the tensors whose shapes match (new tokenizer)
    split: str = "all"                 # data split trained on (all | train)
    caption_variation: bool = True
    batch_size: int = 32
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup: int = 200
    steps: int = 6000
    grad_clip: float = 2.0
    ema_decay: float = 0.999
    cond_drop: float = 0.1             # uniform draw per sample
    diffusion_batch_mul: int = 4
    diffusion_low_t_share: float = 0.0  # share of head tokens trained at t < diffusion_low_t_max (0: uniform)
    diffusion_low_t_max: int = 300
    diffusion_weight: float = 1.0
    residual_scale: float = 0.0        # >0: the head models residual / this (0: --init-from's, else the preset's)
    drop_last_scale: bool = False      # MAR-style last-scale token dropping
    drop_min_keep: int = 16
    replay_resolution: int = 0         # stage 2: also train at this (stage-1) resolution ...
    replay_every: int = 0              # ... on every n-th step, so one model keeps both resolutions
    resolution_embed: bool = False     # with replay: a learned text-slot vector per resolution (text_level)
    first_token_weight: float = 1.0    # cross-entropy weight of the 1x1 token against 1 for every other token
    attn_impl: str = "math"            # math | sdpa (math is faster for masked backward on CPU)
    mixed_precision: str = "auto"
    cfg_default: float = 3.0           # sampling defaults stored with the model
    seed: int = 0
    val_fraction: float = 0.05
    log_every: int = 20
    eval_every: int = 1000
    checkpoint_every: int = 500
    checkpoint_minutes: float = 10.0
    max_minutes: float = 0.0
    resume: bool = True


RESOLUTION_EMBED_LR_MULTIPLIER = 20.0

PRESETS = {
    "tiny": ARTrainConfig(model_preset="tiny", resolution=32, batch_size=8, steps=30, warmup=5, log_every=5,
                          eval_every=30, checkpoint_every=15, diffusion_batch_mul=2),
    "emoji-64": ARTrainConfig(),
    "emoji-128": ARTrainConfig(resolution=128, batch_size=16, steps=4000, lr=3e-4, warmup=100,
                               drop_last_scale=True, replay_resolution=64, replay_every=4, resolution_embed=True),
}


# ------------------------------------------------------------------ data caches

class TokenCache:
    """Per-image multi-scale indices and the remainder before the last scale, computed once with
    the frozen tokenizer. The file name carries a hash of the tokenizer weights, the schedule
    and the data, so a changed tokenizer or dataset makes a new cache."""

    def __init__(self, tokenizer: HybridTokenizer, dataset, scales, folder: Path):
        digest = hashlib.sha256()
        hash_weights(digest, tokenizer)
        digest.update(json.dumps([list(scales), dataset.resolution, dataset.source, len(dataset.captions)]).encode())
        self.path = Path(folder) / f"tokens_{digest.hexdigest()[:16]}.safetensors"
        self.scales = list(scales)

    def build(self, tokenizer, dataset, batch_size: int = 64) -> None:
        if self.path.is_file():
            return
        n = len(dataset.captions)
        all_idx, rests = [], []
        with torch.no_grad():
            for start in tqdm(range(0, n, batch_size), desc="tokenizing images"):
                images = torch.stack([dataset.image(i) for i in range(start, min(n, start + batch_size))])
                indices, rest = tokenizer.quantize.encode(tokenizer.encode_latent(images), self.scales)
                all_idx.append(torch.cat(indices, 1).to(torch.int16))
                rests.append(rest)
        write_weights({"indices": torch.cat(all_idx), "rest": torch.cat(rests)}, self.path)

    def load(self) -> tuple[torch.Tensor, torch.Tensor]:
        data = read_weights(self.path)
        return data["indices"].long(), data["rest"].float()


class TextCache:
    """Text-encoder states per caption string, computed on first use and kept (fp16)."""

    def __init__(self, encoder: TextEncoder, max_entries: int = 200_000):
        self.encoder = encoder
        self.store: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_entries = max_entries

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = list(dict.fromkeys(t for t in texts if t not in self.store))
        if missing:
            states, _, positions = self.encoder(missing)
            if len(self.store) + len(missing) > self.max_entries:
                self.store.clear()
            for text, s, p in zip(missing, states, positions):
                self.store[text] = (s.half(), p)
        states = torch.stack([self.store[t][0] for t in texts]).float()
        positions = torch.stack([self.store[t][1] for t in texts])
        return states, positions


# ------------------------------------------------------------------ loss

def truncated_normal(n: int, low: float, high: float, mean: float, std: float, generator) -> torch.Tensor:
    """Inverse-CDF draw from a normal truncated to [low, high]."""
    normal = torch.distributions.Normal(0.0, 1.0)
    lo, hi = normal.cdf(torch.tensor((low - mean) / std)), normal.cdf(torch.tensor((high - mean) / std))
    u = lo + (hi - lo) * torch.rand(n, generator=generator)
    return mean + std * torch.special.ndtri(u)


def last_scale_keep(batch: int, tokens: int, min_keep: int, generator) -> torch.Tensor:
    """Indices of the last-scale tokens kept: the mask ratio is drawn from a truncated normal on
    [0.5, 1] (mean ~0.82); one count per batch so rows stack, each row its own random subset."""
    ratio = truncated_normal(1, 0.5, 1.0, 1.0, 0.25, generator).item()
    keep = min(tokens, max(min_keep, round(tokens * (1 - ratio))))
    order = torch.rand(batch, tokens, generator=generator).argsort(dim=1)
    return order[:, :keep].sort(dim=1).values


class ARLoss(nn.Module):
    """Wraps the transformer so the whole training loss is one forward (one DDP call)."""

    def __init__(self, transformer: HARTTransformer, tokenizer: HybridTokenizer, cfg: ARTrainConfig):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("codebook", tokenizer.codebook.detach().clone(), persistent=False)
        self.cfg = cfg

    def forward(self, states, positions, inputs, targets, rest, scales, keep, generator):
        tf = self.transformer
        logits, hidden_last, _ = tf(states, positions, inputs, scales, keep_last=keep)
        last_targets = targets[:, -scales[-1] ** 2:]
        rest_kept = rest
        if keep is not None:
            last_targets = last_targets.gather(1, keep)
            rest_kept = rest.gather(1, keep[..., None].expand(-1, -1, rest.shape[-1]))
        all_targets = torch.cat([targets[:, :-scales[-1] ** 2], last_targets], 1)
        per_token = F.cross_entropy(logits.flatten(0, 1).float(), all_targets.flatten(), reduction="none")
        per_token = per_token.view(all_targets.shape)
        ce = per_token.mean()
        w = self.cfg.first_token_weight  # the 1x1 token is one of hundreds: let it count more if asked
        objective = ce if w == 1 else ((w * per_token[:, 0] + per_token[:, 1:].sum(1)).mean()
                                       / (w + per_token.shape[1] - 1))
        n_last = hidden_last.shape[1]
        with torch.no_grad():  # condition on the model's own sampled tokens, as at inference
            probs = logits[:, -n_last:].detach().float().softmax(-1)
            sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
        codes = self.codebook[sampled]
        target = rest_kept - codes
        offset = None
        if tf.config.head_expected_code:
            offset = expected_code_offset(logits[:, -n_last:].detach(), self.codebook, sampled)
            target = target - offset
        z = tf.head_input(tf.diffusion_condition(hidden_last, codes), offset)
        target = target.flatten(0, 1)
        mul = self.cfg.diffusion_batch_mul
        diff = tf.diffloss.loss(target.repeat(mul, 1), z.flatten(0, 1).repeat(mul, 1), generator=generator,
                               low_t_share=self.cfg.diffusion_low_t_share, low_t_max=self.cfg.diffusion_low_t_max)
        accuracy = (logits.argmax(-1) == all_targets).float().mean()
        return objective + self.cfg.diffusion_weight * diff, ce.detach(), diff.detach(), accuracy


# ------------------------------------------------------------------ helpers

def load_tokenizer(path: str) -> HybridTokenizer:
    folder = Path(path)
    if not path:
        raise ValueError("--tokenizer is required: a tokenizer folder or a pipeline folder")
    if (folder / "tokenizer" / "config.json").is_file():
        folder = folder / "tokenizer"
    cfg = config_from_dict(TokenizerConfig, read_json(folder / "config.json"), str(folder / "config.json"))
    tokenizer = HybridTokenizer(cfg)
    load_into(tokenizer, read_weights(folder / "model.safetensors"), str(folder / "model.safetensors"))
    return tokenizer.eval().requires_grad_(False)


def schedule_for(cfg: ARTrainConfig, resolution: int | None = None) -> tuple[int, ...]:
    if cfg.scales and resolution is None:
        return tuple(cfg.scales)
    resolution = cfg.resolution if resolution is None else resolution
    resolutions = get_preset(cfg.model_preset).resolutions
    if resolution not in resolutions:
        raise ValueError(f"resolution {resolution} has no schedule in preset {cfg.model_preset!r} "
                         f"({sorted(resolutions)}); pass --scales")
    return resolutions[resolution]


@dataclass
class ResolutionData:
    """What one training resolution needs: its schedule, dataset and cached tokens."""
    scales: tuple
    dataset: object
    indices: torch.Tensor      # [N, sum of scale areas] token ids per dataset image
    rest: torch.Tensor         # [N, last area, C] remainder before the last scale (minus its code: the residual)
    items: torch.Tensor        # dataset image ids trained on
    per_epoch: int


def prepare_resolution(cfg: ARTrainConfig, resolution: int, scales, tokenizer, accelerator, out: Path) -> ResolutionData:
    ds = tokenizer.config.downsample
    if resolution % ds:
        raise ValueError(f"resolution {resolution} is not divisible by the tokenizer's downsampling factor {ds}")
    if scales[-1] * ds != resolution:
        raise ValueError(f"scales {scales}: the last scale x {ds} must equal {resolution}")
    dataset = load_dataset(cfg.data, resolution, cfg.split, cfg.val_fraction, cfg.seed,
                           caption_variation=cfg.caption_variation)
    cache = TokenCache(tokenizer, dataset, scales, out / "cache")
    if accelerator.is_main_process:
        cache.build(tokenizer, dataset)
    accelerator.wait_for_everyone()
    indices, rest = cache.load()
    items = torch.tensor(dataset.indices)
    per_epoch = max(1, len(items) // (cfg.batch_size * accelerator.num_processes))
    return ResolutionData(tuple(scales), dataset, indices, rest, items, per_epoch)


@torch.no_grad()
def sample_grid(transformer, tokenizer, encoder, prompts, resolution: int, scales, path: Path, cfg_scale: float):
    """Rows: discrete-only and hybrid samples for `prompts` at one resolution."""
    pipe = HARTPipeline(tokenizer, transformer, encoder, {resolution: scales}, {"cfg": cfg_scale})
    result = pipe(prompts, resolution=resolution, seed=0)

    def as_tensor(images):
        return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 127.5 - 1 for im in images])
    save_grid((as_tensor(result.discrete_images), as_tensor(result.images)), path, scale=2)


# ------------------------------------------------------------------ training

def train(cfg: ARTrainConfig) -> dict:
    out = Path(cfg.out)
    scales = schedule_for(cfg)
    preset = get_preset(cfg.model_preset)
    tokenizer = load_tokenizer(cfg.tokenizer)
    if cfg.replay_every and not cfg.replay_resolution:
        raise ValueError("--replay-every needs --replay-resolution")
    tf_cfg = preset.transformer
    tf_cfg.vocab_size, tf_cfg.token_dim = tokenizer.config.vocab_size, tokenizer.config.z_channels
    tf_cfg.patch_nums, tf_cfg.diffusion_batch_mul, tf_cfg.cond_drop_rate = scales, cfg.diffusion_batch_mul, cfg.cond_drop
    if cfg.residual_scale < 0:
        raise ValueError(f"--residual-scale must be positive (or 0 to keep the model's), got {cfg.residual_scale}")
    init_config_path = Path(cfg.init_from) / "transformer" / "config.json"
    if cfg.init_from and init_config_path.is_file():
        # keep the warm-started head's shape (train_head may have deepened it), units and inputs
        init_config = read_json(init_config_path)
        for name in ("diff_width", "diff_depth", "residual_scale", "resolution_sides", "head_expected_code"):
            setattr(tf_cfg, name, init_config.get(name, getattr(tf_cfg, name)))
    if cfg.residual_scale:
        tf_cfg.residual_scale = cfg.residual_scale
    if cfg.resolution_embed and cfg.replay_every:
        trained = {scales[-1], schedule_for(cfg, cfg.replay_resolution)[-1]}
        tf_cfg.resolution_sides = tuple(sorted(trained | set(tf_cfg.resolution_sides)))

    accelerator = make_accelerator(cfg.mixed_precision, log_dir=out)
    rank, world = accelerator.process_index, accelerator.num_processes
    main_data = prepare_resolution(cfg, cfg.resolution, scales, tokenizer, accelerator, out)
    replay = None
    if cfg.replay_resolution and cfg.replay_every:
        replay = prepare_resolution(cfg, cfg.replay_resolution, schedule_for(cfg, cfg.replay_resolution),
                                    tokenizer, accelerator, out)
    dataset = main_data.dataset
    residual_std = (main_data.rest - tokenizer.codebook[main_data.indices[:, -main_data.rest.shape[1]:]]).std().item()
    accelerator.print(f"residual tokens: std {residual_std:.4f}; the head sees residual / {tf_cfg.residual_scale} "
                      f"with std {residual_std / tf_cfg.residual_scale:.3f} (aim for about 0.2)")
    encoder = TextEncoder.from_config(preset.text_encoder)
    if encoder.hidden_size != tf_cfg.context_dim:
        raise ValueError(f"text encoder width {encoder.hidden_size} != transformer context_dim {tf_cfg.context_dim}")

    text_cache = TextCache(encoder)

    torch.manual_seed(cfg.seed)
    transformer = HARTTransformer(tf_cfg)
    if cfg.init_from:
        src = Path(cfg.init_from) / "transformer" / "model.safetensors"
        warm_start(transformer, src, cfg.init_partial, accelerator, may_be_new=("resolution_embed",))
    for block in transformer.blocks:
        block.attn.use_sdpa = cfg.attn_impl == "sdpa"
    ema = EMA(transformer, cfg.ema_decay)
    # a new zero vector must grow to the level embeddings' size (norm ~3) in a few hundred steps
    optimizer = adamw_decaying_matrices(transformer, cfg.lr, cfg.weight_decay,
                                        {"resolution_embed": RESOLUTION_EMBED_LR_MULTIPLIER})
    config_dict = asdict(cfg)
    checkpointer = Checkpointer(out)
    start_step = 0
    latest = checkpointer.latest() if cfg.resume else None
    if latest is not None:
        start_step = Checkpointer.load(latest, transformer, ema, optimizer, cfg)["step"]
        accelerator.print(f"resumed from {latest} at step {start_step}")
    loss_module = ARLoss(transformer, tokenizer, cfg)
    model, optimizer = accelerator.prepare(loss_module, optimizer)
    log = RunLog(out, accelerator, start_step) if accelerator.is_main_process else None
    if accelerator.is_main_process:
        write_json(config_dict, out / "config.json")
    eval_prompts = [dataset.captions[int(i)]["text"] for i in main_data.items[:8]]
    resolutions = {r: s for r, s in preset.resolutions.items() if r <= cfg.resolution}
    resolutions[cfg.resolution] = scales

    started = last_ckpt = time.time()
    replay_accs: list[float] = []  # accuracy of the replay steps since the last log line
    bar = tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps,
               disable=not accelerator.is_main_process, desc=f"ar{cfg.resolution}")
    step = start_step
    with StopSignal(accelerator) as stop:
        for step in bar:
            lr_scale = cosine_lr(step, cfg.steps, cfg.warmup)
            set_lr(optimizer, cfg.lr * lr_scale)
            gen = step_generator(cfg.seed, step, rank)
            # replay steps (step % replay_every == 0) never coincide with a logged step
            is_replay = replay is not None and step % cfg.replay_every == 0
            data, order_step = (replay, step // cfg.replay_every) if is_replay else (main_data, step)
            picked = data.items[batch_indices(len(data.items), cfg.batch_size, order_step, cfg.seed, rank, world)]
            data.dataset.set_epoch(order_step // data.per_epoch)
            states, positions = text_cache([data.dataset.caption(int(i)) for i in picked])
            dropped = torch.rand(len(picked), generator=gen) < cfg.cond_drop  # uniform draw
            states[dropped] = 0
            positions[dropped] = 0  # the sampler's unconditional rows use zero positions too
            targets = data.indices[picked]
            with torch.no_grad():
                splits = torch.split(targets, [s * s for s in data.scales], dim=1)
                inputs = tokenizer.quantize.teacher_forcing_inputs(list(splits), data.scales)
            keep = (last_scale_keep(len(picked), data.scales[-1] ** 2, cfg.drop_min_keep, gen)
                    if cfg.drop_last_scale and not is_replay else None)
            device = accelerator.device
            model.train()
            with accelerator.autocast():
                loss, ce, diff, acc = model(states.to(device), positions.to(device), inputs.to(device),
                                            targets.to(device), data.rest[picked].to(device), data.scales,
                                            None if keep is None else keep.to(device), gen)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            grad_norm = clip_gradients(accelerator, model, cfg.grad_clip)
            optimizer.step()
            ema.update(unwrap(accelerator, model).transformer, step)
            if is_replay and log:  # only the process that logs keeps (and clears) them
                replay_accs.append(acc.item())
            if log and (step + 1) % cfg.log_every == 0:
                elapsed = time.time() - started
                replay_stats = {"replay_acc": round(sum(replay_accs) / len(replay_accs), 4)} if replay_accs else {}
                replay_accs.clear()
                log.write(step + 1, loss=round(loss.item(), 5), ce=round(ce.item(), 5), diff=round(diff.item(), 5),
                          acc=round(acc.item(), 4), grad_norm=round(float(grad_norm), 4),
                          lr=round(cfg.lr * lr_scale, 7),
                          steps_per_s=round((step + 1 - start_step) / elapsed, 3),
                          last_scale_kept=scales[-1] ** 2 if keep is None else keep.shape[1], **replay_stats)
                bar.set_postfix(ce=f"{ce.item():.3f}", diff=f"{diff.item():.3f}", acc=f"{acc.item():.3f}",
                                it_s=f"{(step + 1 - start_step) / elapsed:.2f}")
            done = step + 1 == cfg.steps
            out_of_time = (cfg.max_minutes and (time.time() - started) / 60 >= cfg.max_minutes) or stop.requested()
            if accelerator.is_main_process and (done or out_of_time or (step + 1) % cfg.checkpoint_every == 0
                                                or (time.time() - last_ckpt) / 60 >= cfg.checkpoint_minutes):
                checkpointer.save(step + 1, unwrap(accelerator, model).transformer, ema, optimizer, config_dict)
                last_ckpt = time.time()
            if accelerator.is_main_process and (step + 1) % cfg.eval_every == 0 and not done:
                ema_model = ema.copy_to(HARTTransformer(tf_cfg)).eval()
                sample_grid(ema_model, tokenizer, encoder, eval_prompts, cfg.resolution, scales,
                            out / "samples" / f"step_{step + 1:08d}.png", cfg.cfg_default)
            accelerator.wait_for_everyone()
            if out_of_time:
                break
    if stop.received is not None:
        return stop.finish(step + 1)
    result = {"step": step + 1}
    if accelerator.is_main_process:
        raw = unwrap(accelerator, model).transformer
        ema_model = ema.copy_to(HARTTransformer(tf_cfg)).eval()
        model_dir = out / "model"
        sampling = {"cfg": cfg.cfg_default, "top_k": 0, "top_p": 0.0, "diffusion_steps": tf_cfg.num_sampling_steps}
        write_pipeline(model_dir, tokenizer, ema_model, encoder.config_dict(), resolutions, sampling,
                       f"hart-{cfg.model_preset}")
        write_weights(raw.state_dict(), model_dir / "transformer" / "model_raw.safetensors")
        sample_grid(ema_model, tokenizer, encoder, eval_prompts, cfg.resolution, scales,
                    out / "samples" / "final.png", cfg.cfg_default)
        plot_curves(log.records(), ["ce", "diff"], out / "loss.png")
        result.update(log.records()[-1] if log.records() else {})
    record_process_checksums(accelerator, unwrap(accelerator, model).transformer, out)
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(ARTrainConfig, PRESETS, argv, __doc__.splitlines()[0])
    print(json.dumps(train(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
