"""Train the AR transformer and its residual diffusion head on a frozen hybrid tokenizer.

Teacher forcing over all scales with the block-causal mask; cross-entropy on the discrete
tokens; the residual diffusion loss on the last scale, conditioned on the last hidden state
plus the embedding of the model's own sampled tokens; uniform condition dropout for CFG.
Stage 2 (`--init-from stage1/model --resolution 128`) copies the stage-1 weights (the 2D RoPE
makes them resolution-free) and drops most last-scale tokens (`--drop-last-scale true`);
`--replay-resolution 64 --replay-every 4` keeps training a quarter of the steps at 64 px so the
one model serves both resolutions.

    python -m train.train_ar --preset emoji-64 --tokenizer work/tok64/tokenizer --out work/ar64
    accelerate launch --num_processes 8 -m train.train_ar --preset emoji-128 ...
"""
from __future__ import annotations

from dataclasses import dataclass
import hashlib
import json
from pathlib import Path
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from hart.checkpoint import config_from_dict, read_json, read_weights, write_weights
from hart.pipeline import HARTPipeline, write_pipeline
from hart.presets import get_preset
from hart.text_encoder import TextEncoder
from hart.tokenizer import HybridTokenizer, TokenizerConfig
from hart.transformer import HARTTransformer, TransformerConfig

from .common import (adamw_decaying_matrices, batch_indices, check_schedule, EMA, hash_weights,
                     images_to_tensor, load_tokenizer, scale_schedule, warm_start)
from .data import load_dataset
from .engine import clip_gradients, command_line, Engine, RunConfig, unwrap
from .metrics import save_grid


@dataclass
class ARTrainConfig(RunConfig):
    out: str = "work/ar"
    data: str = "data/emoji"
    tokenizer: str = ""                # tokenizer folder (config.json + model.safetensors) or a pipeline folder
    model_preset: str = "emoji"
    resolution: int = 64               # trained with the preset's scale schedule for it
    init_from: str = ""                # pipeline folder whose transformer weights start this run (stage 2)
    init_partial: bool = False         # warm start: load only the tensors whose shapes match (new tokenizer)
    diff_width: int = 0                # residual head shape: 0 = --init-from's, else the preset's
    diff_depth: int = 0
    residual_scale: float = 0.0        # >0: the head models residual / this (0: --init-from's, else the preset's)
    batch_size: int = 32
    lr: float = 6e-4
    weight_decay: float = 0.05
    warmup: int = 200
    steps: int = 6000
    grad_clip: float = 2.0
    ema_decay: float = 0.999
    cond_drop: float = 0.1             # share of captions dropped for CFG (uniform draw per sample)
    diffusion_batch_mul: int = 4       # repeats of each residual token in the diffusion loss
    drop_last_scale: bool = False      # MAR-style last-scale token dropping
    drop_min_keep: int = 16
    replay_resolution: int = 0         # stage 2: also train at this (stage-1) resolution ...
    replay_every: int = 0              # ... on every n-th step, so one model keeps both resolutions
    resolution_embed: bool = False     # with replay: a learned text-slot vector per resolution (text_level)
    first_token_weight: float = 1.0    # cross-entropy weight of the 1x1 token against 1 for every other token
    checkpoint_every: int = 500


RESOLUTION_EMBED_LR_MULTIPLIER = 20.0

PRESETS = {
    "tiny": ARTrainConfig(model_preset="tiny", resolution=32, batch_size=8, steps=30, warmup=5, log_every=5,
                          checkpoint_every=15, diffusion_batch_mul=2),
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
        if tf.continuous_last(scales):  # no token is drawn there: the head models the whole remainder
            codes, target = None, rest_kept.flatten(0, 1)
        else:
            with torch.no_grad():  # condition on the model's own sampled tokens, as at inference
                probs = logits[:, -n_last:].detach().float().softmax(-1)
                sampled = torch.multinomial(probs.flatten(0, 1), 1, generator=generator).view(probs.shape[:2])
            codes = self.codebook[sampled]
            target = (rest_kept - codes).flatten(0, 1)
        z = tf.diffusion_condition(hidden_last, codes).flatten(0, 1)
        mul = self.cfg.diffusion_batch_mul
        diff = tf.diffloss.loss(target.repeat(mul, 1), z.repeat(mul, 1), generator=generator)
        accuracy = (logits.argmax(-1) == all_targets).float().mean()
        return objective + diff, ce.detach(), diff.detach(), accuracy


# ------------------------------------------------------------------ model and data

def transformer_config(cfg: ARTrainConfig, tokenizer: TokenizerConfig,
                       init: TransformerConfig | None = None) -> TransformerConfig:
    """The trained transformer's config: the preset's at this run's schedule and tokenizer, with the
    head shape, units and resolution vectors of the --init-from model (`init`, read from it when not
    given), then this run's overrides."""
    tf_cfg = get_preset(cfg.model_preset).transformer
    tf_cfg.vocab_size, tf_cfg.token_dim = tokenizer.vocab_size, tokenizer.z_channels
    tf_cfg.patch_nums = scale_schedule(cfg.model_preset, cfg.resolution)
    tf_cfg.resolution_sides = ()
    tf_cfg.head_context = 0  # this run drops last-scale tokens, so no grid: train_head adds the context
    init_path = Path(cfg.init_from) / "transformer" / "config.json"
    if init is None and cfg.init_from and init_path.is_file():
        init = config_from_dict(TransformerConfig, read_json(init_path), str(init_path))
    if init is not None:  # keep the warm-started head's shape (train_head may have changed it), units and vectors
        for name in ("diff_width", "diff_depth", "residual_scale", "resolution_sides"):
            setattr(tf_cfg, name, getattr(init, name))
    for name in ("diff_width", "diff_depth", "residual_scale"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be positive (or 0 to keep the model's)")
        if getattr(cfg, name):
            setattr(tf_cfg, name, getattr(cfg, name))
    if cfg.resolution_embed and cfg.replay_every:
        trained = {tf_cfg.patch_nums[-1], scale_schedule(cfg.model_preset, cfg.replay_resolution)[-1]}
        tf_cfg.resolution_sides = tuple(sorted(trained | set(tf_cfg.resolution_sides)))
    return tf_cfg


def trained_resolutions(cfg: ARTrainConfig) -> dict[int, tuple[int, ...]]:
    """The resolutions the saved pipeline serves: the preset's up to the trained one."""
    return {r: tuple(s) for r, s in get_preset(cfg.model_preset).resolutions.items() if r <= cfg.resolution}


@dataclass
class ResolutionData:
    """What one training resolution needs: its schedule, dataset and cached tokens."""
    scales: tuple
    dataset: object
    indices: torch.Tensor      # [N, sum of scale areas] token ids per dataset image
    rest: torch.Tensor         # [N, last area, C] remainder before the last scale (minus its code: the residual)
    items: torch.Tensor        # dataset image ids trained on
    per_epoch: int


def prepare_resolution(cfg: ARTrainConfig, resolution: int, tokenizer, engine: Engine) -> ResolutionData:
    scales = scale_schedule(cfg.model_preset, resolution)
    check_schedule(resolution, scales, tokenizer.config.downsample)
    dataset = load_dataset(cfg.data, resolution, "all", caption_variation=True)
    cache = TokenCache(tokenizer, dataset, scales, engine.out / "cache")
    if engine.is_main:
        cache.build(tokenizer, dataset)
    engine.accelerator.wait_for_everyone()
    indices, rest = cache.load()
    items = torch.tensor(dataset.indices)
    per_epoch = max(1, len(items) // (cfg.batch_size * engine.world))
    return ResolutionData(tuple(scales), dataset, indices, rest, items, per_epoch)


@torch.no_grad()
def sample_grid(pipe: HARTPipeline, prompts, resolution: int, path: Path):
    """Rows: discrete-only and hybrid samples for `prompts` at one resolution."""
    result = pipe(prompts, resolution=resolution, seed=0)
    save_grid((images_to_tensor(result.discrete_images), images_to_tensor(result.images)), path, scale=2)


# ------------------------------------------------------------------ training

def train(cfg: ARTrainConfig) -> dict:
    preset = get_preset(cfg.model_preset)
    if cfg.replay_every and not cfg.replay_resolution:
        raise ValueError("--replay-every needs --replay-resolution")
    tokenizer = load_tokenizer(cfg.tokenizer)
    tf_cfg = transformer_config(cfg, tokenizer.config)
    engine = Engine(cfg, f"ar{cfg.resolution}")
    main_data = prepare_resolution(cfg, cfg.resolution, tokenizer, engine)
    replay = prepare_resolution(cfg, cfg.replay_resolution, tokenizer, engine) if cfg.replay_every else None
    residual_std = (main_data.rest - tokenizer.codebook[main_data.indices[:, -main_data.rest.shape[1]:]]).std().item()
    engine.print(f"residual tokens: std {residual_std:.4f}; the head sees residual / {tf_cfg.residual_scale} "
                 f"with std {residual_std / tf_cfg.residual_scale:.3f} (aim for about 0.2)")
    encoder = TextEncoder.from_config(preset.text_encoder)
    if encoder.hidden_size != tf_cfg.context_dim:
        raise ValueError(f"text encoder width {encoder.hidden_size} != transformer context_dim {tf_cfg.context_dim}")
    text_cache = TextCache(encoder)

    torch.manual_seed(cfg.seed)
    transformer = HARTTransformer(tf_cfg)
    if cfg.init_from:
        warm_start(transformer, Path(cfg.init_from) / "transformer" / "model.safetensors", cfg.init_partial,
                   engine.print, may_be_new=("resolution_embed",))
    ema = EMA(transformer, cfg.ema_decay)
    # a new zero vector must grow to the level embeddings' size (norm ~3) in a few hundred steps
    optimizer = adamw_decaying_matrices(transformer, cfg.lr, cfg.weight_decay,
                                        {"resolution_embed": RESOLUTION_EMBED_LR_MULTIPLIER})
    engine.resume(transformer, optimizer, ema)
    model, optimizer = engine.prepare(ARLoss(transformer, tokenizer, cfg), optimizer)
    accelerator = engine.accelerator
    resolutions = trained_resolutions(cfg)
    eval_prompts = [main_data.dataset.captions[int(i)]["text"] for i in main_data.items[:8]]

    def ema_pipeline() -> HARTPipeline:
        ema_model = ema.copy_to(HARTTransformer(tf_cfg)).eval()
        return HARTPipeline(tokenizer, ema_model, encoder, resolutions, preset.sampling, f"hart-{cfg.model_preset}")

    replay_accs: list[float] = []  # accuracy of the replay steps since the last log line

    def train_step(step: int, gen: torch.Generator) -> dict:
        # replay steps (step % replay_every == 0) never coincide with a logged step
        is_replay = replay is not None and step % cfg.replay_every == 0
        data, order_step = (replay, step // cfg.replay_every) if is_replay else (main_data, step)
        picked = data.items[batch_indices(len(data.items), cfg.batch_size, order_step, cfg.seed, engine.rank,
                                          engine.world)]
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
        if is_replay and engine.log:  # only the process that logs keeps (and clears) them
            replay_accs.append(acc.item())
        metrics = {"loss": loss, "ce": ce, "diff": diff, "acc": acc, "grad_norm": grad_norm,
                   "last_scale_kept": data.scales[-1] ** 2 if keep is None else keep.shape[1]}
        if engine.is_log_step(step) and replay_accs:
            metrics["replay_acc"] = round(sum(replay_accs) / len(replay_accs), 4)
            replay_accs.clear()
        return metrics

    def draw_samples(step: int) -> None:
        sample_grid(ema_pipeline(), eval_prompts, cfg.resolution, engine.out / "samples" / f"step_{step:08d}.png")

    outcome = engine.run(train_step, optimizer, lambda: unwrap(accelerator, model).transformer, ema=ema,
                         evaluate=draw_samples)
    if "stopped_by_signal" in outcome:
        return outcome
    result = dict(outcome)
    if engine.is_main:
        pipe = ema_pipeline()
        model_dir = engine.out / "model"
        write_pipeline(model_dir, tokenizer, pipe.transformer, encoder.config_dict(), resolutions,
                       preset.sampling, pipe.name)
        write_weights(unwrap(accelerator, model).transformer.state_dict(),
                      model_dir / "transformer" / "model_raw.safetensors")
        sample_grid(pipe, eval_prompts, cfg.resolution, engine.out / "samples" / "final.png")
        records = engine.log.records()
        result.update(records[-1] if records else {})
    engine.finish(unwrap(accelerator, model).transformer, ["ce", "diff"])
    return result


def main(argv: list[str] | None = None) -> int:
    return command_line(ARTrainConfig, PRESETS, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
