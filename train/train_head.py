"""Retrain, deepen or re-scale the residual diffusion head of a trained pipeline, everything else frozen.

With the tokenizer and the AR transformer frozen, each image's head conditions (teacher-forced last
hidden state plus the embedding of its true last-scale codes, as in `evaluate.residual_head_check`)
and residual targets never change, so they are computed once per wording and cached; a step then
runs the head alone, where `train_ar` runs the transformer forward on every step. One process.

`--diff-width` other than the model's starts a new head; `--diff-depth` above the model's appends
residual blocks whose zeroed modulation makes each one the identity at first, so training starts
from the trained head's function. The log's `explained` is the share of the residual's variance
that the head's temperature-0 sample explains on a fixed set of exact-caption tokens (the quantity
that turns into residual gain in dB).

`--generated-share` draws that share of each batch from the model's own generations instead
(`generated_conditions`): there the head sees the tokens the transformer sampled, as in the app, and
learns the distance from them to the image, not only the tokenizer's remainder given the true tokens.

`--expected-code true` turns the model into one with `head_expected_code` (not official): the residual
starts from the expected last-scale code's offset from the drawn one (`sampler.expected_code_offset`,
under the guided logits) and the head reads that offset through new condition columns that start at
zero, so training starts from the trained head's function plus the offset. Both pools then store the
offset; the head models what remains.

    python -m train.train_head --model runs/ar128q/package --out runs/head128 --diff-depth 6 --steps 20000
    python -m train.package --model runs/head128/model --name hart-emoji --out runs/head128/package
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
import copy
import hashlib
import json
from pathlib import Path
import sys
import time

import torch
from tqdm import tqdm

from hart.checkpoint import read_weights, write_weights
from hart.diffusion import ResidualDiffusionHead
from hart.pipeline import HARTPipeline
from hart.sampler import expected_code_offset, guidance_ramp, sample
from .common import (adamw_decaying_matrices, Checkpointer, cosine_lr, EMA, hash_weights, load_config,
                     make_accelerator, RunLog, set_lr, step_generator, StopSignal, unwrap)
from .data import load_dataset
from .evaluate import retrieval_features, retrieve


@dataclass
class HeadTrainConfig:
    model: str = ""                    # pipeline folder (train_ar's model/ or a package)
    data: str = "data/emoji"
    out: str = "runs/head"
    wordings: int = 2                  # conditions per image: its exact caption + (wordings - 1) varied ones
    cond_drop: float = 0.1             # share of tokens conditioned on the empty prompt (CFG's other half)
    diff_depth: int = 0                # 0: the model's; more: append identity-initialised blocks
    diff_width: int = 0                # 0: the model's; another width starts a new head from scratch
    residual_scale: float = 0.0        # 0: the model's; else the head models residual / this
    low_t_share: float = 0.0           # share of tokens trained at t < low_t_max (0: official uniform t)
    low_t_max: int = 300
    sample_loss_weight: float = 0.0    # > 0: add this times the unrolled temperature-0 sample's MSE
    balance_resolutions: bool = False  # each batch draws equally from every resolution's tokens
    generated_share: float = 0.0       # share of each batch from the model's own generations (see below)
    expected_code: bool = False        # add the expected-code offset to the head (see the docstring)
    batch_tokens: int = 1024
    lr: float = 5e-4
    weight_decay: float = 0.0
    warmup: int = 100
    steps: int = 20000
    ema_decay: float = 0.999
    eval_tokens: int = 4096
    seed: int = 0
    mixed_precision: str = "auto"
    log_every: int = 200
    checkpoint_minutes: float = 10.0
    max_minutes: float = 0.0
    resume: bool = True


PRESETS = {"default": HeadTrainConfig()}


def deepen(head: ResidualDiffusionHead, depth: int) -> ResidualDiffusionHead:
    """A copy of `head` with `depth` residual blocks; the added ones start as the identity."""
    net = head.net
    if depth < len(net.res_blocks):
        raise ValueError(f"--diff-depth {depth} is below the model's head depth {len(net.res_blocks)}")
    width, cond_dim = net.input_proj.out_features, net.cond_embed.in_features
    grown = ResidualDiffusionHead(net.token_dim, cond_dim, width, depth, head.sampling_steps, head.residual_scale)
    missing, unexpected = grown.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("net.res_blocks.") for k in missing), (missing, unexpected)
    return grown  # new blocks: initialize_weights zeroed their modulation, so gate = 0


def read_expected_code(head: ResidualDiffusionHead) -> ResidualDiffusionHead:
    """A copy of `head` whose condition is token_dim wider (the expected-code offset) and whose
    function is unchanged: the new condition columns start at zero."""
    net = head.net
    width, cond_dim = net.input_proj.out_features, net.cond_embed.in_features
    wider = ResidualDiffusionHead(net.token_dim, cond_dim + net.token_dim, width, len(net.res_blocks),
                                  head.sampling_steps, head.residual_scale)
    state = head.state_dict()
    weight = state["net.cond_embed.weight"]
    state["net.cond_embed.weight"] = torch.cat([weight, weight.new_zeros(width, net.token_dim)], 1)
    wider.load_state_dict(state)
    return wider


def cached_pool(pipe: HARTPipeline, folder: Path, name: str, key: list, build) -> dict[str, torch.Tensor]:
    """{conditions fp16, residuals fp32, offsets fp16 (expected-code models)} read from `folder`, or
    made by `build()` and written there, under a hash of `key` and the frozen transformer and
    tokenizer (not the head: training it does not change its inputs)."""
    if pipe.transformer.config.head_expected_code:
        key = key + ["expected_code"]  # other keys unchanged: earlier caches still hit
    digest = hashlib.sha256(json.dumps(key).encode())
    for module in (pipe.transformer, pipe.tokenizer):
        hash_weights(digest, module, skip_prefix="diffloss.")
    path = folder / f"{name}_{digest.hexdigest()[:16]}.safetensors"
    if path.is_file():
        result = read_weights(path)
    else:
        result = build()
        folder.mkdir(parents=True, exist_ok=True)
        write_weights(result, path)
    result["residuals"] = result["residuals"].float()
    return result


def wording_texts(dataset, ids, w: int) -> list[str]:
    """Wording w of the images `ids`: 0 is the exact caption, 1.. a varied one (fixed per w)."""
    dataset.set_epoch(w - 1)
    return [dataset.captions[i]["text"] if w == 0 else dataset.caption(i) for i in ids]


@torch.no_grad()
def head_conditions(pipe: HARTPipeline, data: str, resolution: int, wordings: int, folder: Path,
                    batch: int = 32) -> dict[str, torch.Tensor]:
    """Conditions [W + 1, N, P^2, C] fp16 and residuals [N, P^2, D] for every image at `resolution`:
    W wordings, then the empty prompt (zero text states and positions, as the sampler's
    unconditional rows), cached on disk under a hash of the model weights, data and W.

    Expected-code models also get offsets [W + 1, N, P^2, D] under the guided teacher-forced logits
    (the last scale's CFG weight at the default cfg; the empty prompt's rows reuse wording 0's)."""
    tf, tok = pipe.transformer, pipe.tokenizer
    scales = pipe.schedules[resolution]
    dataset = load_dataset(data, resolution, "all", caption_variation=True)
    n = len(dataset.captions)

    with_offsets = tf.config.head_expected_code
    t = guidance_ramp(pipe.sampling_defaults.cfg, len(scales))[-1]

    def build() -> dict:
        conditions, residuals, offsets = [], [], []
        for start in tqdm(range(0, n, batch), desc=f"head conditions {resolution}px"):
            ids = range(start, min(n, start + batch))
            indices, residual = tok.encode(torch.stack([dataset.image(i) for i in ids]), scales)
            inputs = tok.quantize.teacher_forcing_inputs(indices, scales)
            codes = tok.codebook[indices[-1]]
            per_wording, wording_logits = [], []  # each wording's conditional last-scale logits
            for w in range(wordings + 1):
                if w < wordings:
                    states, _, positions = pipe.text_encoder(wording_texts(dataset, ids, w))
                else:  # the empty prompt
                    states, positions = torch.zeros_like(states), torch.zeros_like(positions)
                logits, hidden_last, _ = tf(states, positions, inputs, scales)
                per_wording.append(tf.diffusion_condition(hidden_last, codes).half())
                if with_offsets and w < wordings:
                    wording_logits.append(logits[:, -codes.shape[1]:])
            conditions.append(torch.stack(per_wording))
            residuals.append(residual.half())
            if with_offsets:
                unconditional = logits[:, -codes.shape[1]:]
                offset = [expected_code_offset((1 + t) * cond - t * unconditional, tok.codebook, indices[-1])
                          for cond in wording_logits]
                offsets.append(torch.stack(offset + offset[:1]).half())
        pool = {"conditions": torch.cat(conditions, 1), "residuals": torch.cat(residuals)}
        return pool | ({"offsets": torch.cat(offsets, 1)} if with_offsets else {})

    return cached_pool(pipe, folder, f"head_{resolution}",
                       [resolution, list(scales), wordings, dataset.source, n], build)


@torch.no_grad()
def generated_conditions(pipe: HARTPipeline, data: str, resolution: int, wordings: int, folder: Path,
                         batch: int = 64) -> dict[str, torch.Tensor]:
    """Conditions [N, P^2, C] fp16 and residuals [N, P^2, D] (plus offsets [N, P^2, D] on
    expected-code models: the sampler's own) from the model's own generations.

    Every image is generated from its W wordings at the model's default sampling settings (head
    off) and kept when the discrete image retrieves its own emoji. The target is the image's latent
    minus the *generated* discrete latent: at inference the head's tokens are the transformer's
    samples, not the tokenizer's (the official training only ever shows it the latter), so here it
    also learns to correct the sampled tokens' errors. Cached like `head_conditions`."""
    tf, tok = pipe.transformer, pipe.tokenizer
    scales = pipe.schedules[resolution]
    opts = replace(pipe.sampling_defaults, use_residual=False)
    dataset = load_dataset(data, resolution, "all", caption_variation=True)
    n = len(dataset.captions)

    def build() -> dict:
        database = torch.cat([retrieval_features(torch.stack([dataset.image(i) for i in range(s, min(n, s + 256))]))
                              for s in range(0, n, 256)])
        conditions, residuals, offsets, kept = [], [], [], 0
        for start in (bar := tqdm(range(0, n, batch), desc=f"generated conditions {resolution}px")):
            ids = list(range(start, min(n, start + batch)))
            images = torch.stack([dataset.image(i) for i in ids])
            latent = tok.encode_latent(images).flatten(2).transpose(1, 2)
            for w in range(wordings):
                states, _, positions = pipe.text_encoder(wording_texts(dataset, ids, w))
                out = sample(tf, tok, states, positions, scales, opts,
                             torch.Generator().manual_seed(start * wordings + w))
                rank, _ = retrieve(tok.decode(out.fhat_discrete).float(), database, torch.tensor(ids))
                hit = rank == 0
                conditions.append(out.head_condition[hit].half())
                residuals.append((latent - out.fhat_discrete.flatten(2).transpose(1, 2))[hit].half())
                if out.residual_offset is not None:
                    offsets.append(out.residual_offset[hit].half())
                kept += int(hit.sum())
            bar.set_postfix(kept=f"{kept / ((start + len(ids)) * wordings):.2f}")
        pool = {"conditions": torch.cat(conditions), "residuals": torch.cat(residuals)}
        return pool | ({"offsets": torch.cat(offsets)} if offsets else {})

    return cached_pool(pipe, folder, f"generated_{resolution}",
                       ["generated", resolution, list(scales), wordings, dataset.source, n, asdict(opts)], build)


def pick_tokens(pool_ends: torch.Tensor, count: int, balance: bool, generator: torch.Generator) -> torch.Tensor:
    """`count` token indices into pools laid end to end (pool i ends at pool_ends[i]): uniform over
    all tokens, or with `balance` the same share from every pool (the 64 px pool is 4x smaller)."""
    if not balance:
        return torch.randint(0, int(pool_ends[-1]), (count,), generator=generator)
    pool = torch.randint(0, len(pool_ends), (count,), generator=generator)
    starts = torch.cat([pool_ends.new_zeros(1), pool_ends[:-1]])
    sizes = pool_ends - starts
    return starts[pool] + (torch.rand(count, generator=generator) * sizes[pool]).long().clamp(max=sizes[pool] - 1)


def head_batch(pool: dict[str, torch.Tensor], rows, tokens) -> tuple[torch.Tensor, torch.Tensor]:
    """(head input z, target) of a pool's `rows` (conditions and offsets) and `tokens` (residuals):
    with offsets the head reads the offset and models the residual beyond it."""
    z, target = pool["conditions"][rows].float(), pool["residuals"][tokens]
    if "offsets" not in pool:
        return z, target
    offset = pool["offsets"][rows].float()
    return torch.cat([z, offset], -1), target - offset


def ema_copy(ema: EMA, head: ResidualDiffusionHead) -> ResidualDiffusionHead:
    """A new head holding the EMA weights (the trained one keeps its raw weights)."""
    return ema.copy_to(copy.deepcopy(head)).eval().requires_grad_(False)


def explained_variance(head: ResidualDiffusionHead, z: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = head.sample(z.float(), temperature=0.0, generator=torch.Generator().manual_seed(0)).float()
    return 1 - ((predicted - target).square().mean() / target.square().mean()).item()


def train(cfg: HeadTrainConfig) -> dict:
    if not cfg.model:
        raise ValueError("--model is required: the pipeline folder whose head is retrained")
    if cfg.wordings < 1 or cfg.batch_tokens < 1:
        raise ValueError("--wordings and --batch-tokens must be at least 1")
    if cfg.sample_loss_weight < 0:
        raise ValueError(f"--sample-loss-weight must be >= 0, got {cfg.sample_loss_weight}")
    if not 0 <= cfg.generated_share <= 1:
        raise ValueError(f"--generated-share must be in [0, 1], got {cfg.generated_share}")
    if not 0 <= cfg.cond_drop < 1:
        raise ValueError(f"--cond-drop must be in [0, 1), got {cfg.cond_drop}")
    out = Path(cfg.out)
    pipe = HARTPipeline.from_pretrained(cfg.model)
    pipe.transformer.float().requires_grad_(False)
    pipe.tokenizer.float()
    tf_cfg = pipe.transformer.config
    head = pipe.transformer.diffloss
    if cfg.expected_code and not tf_cfg.head_expected_code:
        head = read_expected_code(head)
        tf_cfg.head_expected_code = True  # before the pools: they then hold the offsets
    if cfg.diff_width and cfg.diff_width != tf_cfg.diff_width:
        head = ResidualDiffusionHead(head.net.token_dim, head.net.cond_embed.in_features, cfg.diff_width,
                                     cfg.diff_depth or tf_cfg.diff_depth, head.sampling_steps, head.residual_scale)
    elif cfg.diff_depth and cfg.diff_depth != tf_cfg.diff_depth:
        head = deepen(head, cfg.diff_depth)
    if cfg.residual_scale:
        head.residual_scale = cfg.residual_scale
    head.requires_grad_(True).train()

    # every resolution's tokens in one pool: conditions and offsets [W + 1, N * P^2, .], residuals [N * P^2, D]
    parts = [head_conditions(pipe, cfg.data, r, cfg.wordings, out / "cache") for r in pipe.resolutions]
    teacher = {name: torch.cat([part[name].flatten(-3, -2) for part in parts], -2) for name in parts[0]}
    pool_ends = torch.tensor([part["residuals"].shape[0] * part["residuals"].shape[1] for part in parts]).cumsum(0)
    gen = torch.Generator().manual_seed(cfg.seed)
    eval_ids = torch.randperm(int(pool_ends[-1]), generator=gen)[:cfg.eval_tokens]
    generated_count = round(cfg.generated_share * cfg.batch_tokens)
    if generated_count:
        parts = [generated_conditions(pipe, cfg.data, r, cfg.wordings, out / "cache") for r in pipe.resolutions]
        for resolution, part in zip(pipe.resolutions, parts):
            if not len(part["residuals"]):
                raise ValueError(f"no {resolution} px generation retrieved its own image: --generated-share "
                                 "has no tokens to train on there")
        generated = {name: torch.cat([part[name].flatten(0, 1) for part in parts]) for name in parts[0]}
        generated_ends = torch.tensor([p["residuals"].shape[0] * p["residuals"].shape[1] for p in parts]).cumsum(0)
        generated_eval_ids = torch.randperm(int(generated_ends[-1]), generator=gen)[:cfg.eval_tokens]

    def explained_all(trained: ResidualDiffusionHead) -> dict:
        result = {"explained": round(explained_variance(trained, *head_batch(teacher, (0, eval_ids), eval_ids)), 4)}
        if generated_count:
            result["explained_generated"] = round(explained_variance(
                trained, *head_batch(generated, generated_eval_ids, generated_eval_ids)), 4)
        return result

    accelerator = make_accelerator(cfg.mixed_precision, log_dir=out)
    ema = EMA(head, cfg.ema_decay)
    optimizer = adamw_decaying_matrices(head, cfg.lr, cfg.weight_decay)
    config_dict = asdict(cfg)
    checkpointer = Checkpointer(out)
    start_step = 0
    latest = checkpointer.latest() if cfg.resume else None
    if latest is not None:
        start_step = Checkpointer.load(latest, head, ema, optimizer, cfg)["step"]
        accelerator.print(f"resumed from {latest} at step {start_step}")
    model, optimizer = accelerator.prepare(head, optimizer)
    log = RunLog(out, accelerator, start_step)
    started = last_ckpt = time.time()
    step = start_step
    if start_step == 0:
        log.write(0, **explained_all(head))
    with StopSignal(accelerator) as stop:
        for step in tqdm(range(start_step, cfg.steps), initial=start_step, total=cfg.steps, desc="head"):
            set_lr(optimizer, cfg.lr * cosine_lr(step, cfg.steps, cfg.warmup))
            g = step_generator(cfg.seed, step)
            count = cfg.batch_tokens - generated_count
            picked = pick_tokens(pool_ends, count, cfg.balance_resolutions, g)
            wording = torch.randint(0, cfg.wordings, (count,), generator=g)
            wording[torch.rand(count, generator=g) < cfg.cond_drop] = cfg.wordings  # empty prompt
            z, target = head_batch(teacher, (wording, picked), picked)
            prompted = wording < cfg.wordings  # the empty prompt's rows only teach CFG's other half
            if generated_count:
                chosen = pick_tokens(generated_ends, generated_count, cfg.balance_resolutions, g)
                z_more, target_more = head_batch(generated, chosen, chosen)
                z, target = torch.cat([z, z_more]), torch.cat([target, target_more])
                prompted = torch.cat([prompted, prompted.new_ones(generated_count)])
            with accelerator.autocast():
                trained_head = unwrap(accelerator, model)
                loss = trained_head.loss(target, z, generator=g, low_t_share=cfg.low_t_share, low_t_max=cfg.low_t_max)
                if cfg.sample_loss_weight:
                    loss = loss + cfg.sample_loss_weight * trained_head.sample_loss(
                        target[prompted], z[prompted], generator=g)
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            ema.update(unwrap(accelerator, model), step)
            if (step + 1) % cfg.log_every == 0:
                with accelerator.autocast():
                    explained = explained_all(ema_copy(ema, head))
                log.write(step + 1, loss=round(loss.item(), 5), **explained,
                          lr=round(optimizer.param_groups[0]["lr"], 7))
            done = step + 1 == cfg.steps
            out_of_time = (cfg.max_minutes and (time.time() - started) / 60 >= cfg.max_minutes) or stop.requested()
            if done or out_of_time or (time.time() - last_ckpt) / 60 >= cfg.checkpoint_minutes:
                checkpointer.save(step + 1, unwrap(accelerator, model), ema, optimizer, config_dict)
                last_ckpt = time.time()
            if out_of_time:
                break
    if stop.received is not None:
        return stop.finish(step + 1)
    trained = ema_copy(ema, head)
    pipe.transformer.diffloss = trained
    tf_cfg.diff_width, tf_cfg.diff_depth = trained.net.input_proj.out_features, len(trained.net.res_blocks)
    tf_cfg.residual_scale = trained.residual_scale
    pipe.save_pretrained(out / "model")
    records = log.records()
    return {"step": step + 1, **(records[-1] if records else {})}


def main(argv: list[str] | None = None) -> int:
    cfg = load_config(HeadTrainConfig, PRESETS, argv, __doc__)
    print(json.dumps(train(cfg)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
