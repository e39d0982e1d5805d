"""Retrain, deepen or re-scale the residual diffusion head of a trained pipeline, everything else frozen.

With the tokenizer and the AR transformer frozen, each image's head conditions (teacher-forced last
hidden state plus the embedding of its true last-scale codes) and residual targets never change, so
they are computed once per wording and cached; a step then runs the head alone, where `train_ar`
runs the transformer forward on every step. One process.

`--diff-width` other than the model's starts a new head; `--diff-depth` above the model's appends
residual blocks whose zeroed modulation makes each one the identity at first, and `--diff-hidden`
above the model's widens every block's inner MLP layer with units whose outgoing weights start at
zero: either way training starts from the trained head's function, as it does with `--head-context k`,
which adds a zero-initialised k x k convolution over the last scale's grid of conditions (its tokens are
drawn scattered, so each one's neighbourhood is gathered from the cache). The log's `explained` is the
share of the residual's variance that the head's temperature-0 sample explains on a fixed set of
exact-caption tokens (the quantity that turns into residual gain in dB).

Two additions to the official loss, both off by default: `--low-timestep-share` draws that share
of the training timesteps below `--low-timestep-max` (residual targets are small against unit noise,
so the low timesteps carry most of the condition's signal and the head learns it faster there), and
`--unrolled-weight` adds that times the squared error of the head's temperature-0 sample, the
deterministic chain the app runs, backpropagated through every step of it.

    python -m train.train_head --model work/ar128/model --out work/head128 --diff-depth 6 --steps 20000
    python -m train.package --model work/head128/model --name hart-emoji --out work/head128/package
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
import hashlib
import json
import math
from pathlib import Path
import sys

import torch
from tqdm import tqdm

from hart.checkpoint import read_weights, write_weights
from hart.diffusion import ResidualDiffusionHead, TRAIN_STEPS
from hart.pipeline import HARTPipeline
from hart.transformer import TransformerConfig

from .common import adamw_decaying_matrices, EMA, hash_weights, head_tokens, teacher_forced_condition
from .data import load_dataset
from .engine import clip_gradients, command_line, Engine, RunConfig, unwrap


@dataclass
class HeadTrainConfig(RunConfig):
    out: str = "work/head"
    model: str = ""                    # pipeline folder (train_ar's model/ or a package)
    data: str = "data/emoji"
    cache: str = ""                    # folder of the cached conditions ("" = out/cache): one per frozen model
    wordings: int = 2                  # conditions per image: its exact caption + (wordings - 1) varied ones
    cond_drop: float = 0.1             # share of tokens conditioned on the empty prompt (CFG's other half)
    diff_depth: int = 0                # 0: the model's; more: append identity-initialised blocks
    diff_width: int = 0                # 0: the model's; another width starts a new head from scratch
    diff_hidden: int = 0               # 0: the model's; more: widen each block's inner MLP layer (new units silent)
    residual_scale: float = 0.0        # 0: the model's; else the head models residual / this
    # k > 0: give the head a k x k convolution over the last scale's conditions (zero at first, so
    # training starts from the head's function); None: the model's setting
    head_context: int | None = None
    # the context convolution's lr relative to --lr: it sums k^2 x C inputs, so Adam's per-weight
    # steps at the head's lr move its output far faster than any other layer's
    context_lr_multiplier: float = 0.05
    # finest-grid sides whose last scale the head takes over (no tokens drawn there; it models all
    # the coarser scales leave); None: the model's setting
    continuous_last_sides: tuple | None = None
    # scales above the lowest resolution taken from the lowest one's image (SamplingOptions.coarse_scales):
    # the conditions and targets are built the sampler's way and the model keeps it as its default;
    # None: the model's setting
    coarse_scales: int | None = None
    # with every scale taken from it, keep the lowest resolution image's whole re-encoded latent and
    # train the head on what the image holds beyond it (SamplingOptions.coarse_remainder); None: the model's
    coarse_remainder: bool | None = None
    low_timestep_share: float = 0.0    # share of tokens trained at t < low_timestep_max (0: official uniform t)
    low_timestep_max: int = 300
    unrolled_weight: float = 0.0       # > 0: add this times the unrolled temperature-0 sample's MSE
    balance_resolutions: bool = False  # each batch draws equally from every resolution's tokens
    batch_tokens: int = 1024
    lr: float = 5e-4
    weight_decay: float = 0.0
    grad_clip: float = 0.0             # max gradient norm (0: no clip; the norm is logged either way)
    steps: int = 20000
    ema_decay: float = 0.999
    eval_tokens: int = 4096
    log_every: int = 200
    checkpoint_every: int = 0


PRESETS = {"default": HeadTrainConfig()}


# ------------------------------------------------------------------ train-side losses

def low_timesteps(n: int, share: float, max_t: int, generator: torch.Generator) -> torch.Tensor:
    """Training timesteps [n]: uniform over the 1000 steps, except that `share` of them are drawn
    uniformly below `max_t` instead."""
    if not (0 < share <= 1 and 1 <= max_t <= TRAIN_STEPS):
        raise ValueError(f"the low-timestep share must be in (0, 1] and its maximum in [1, {TRAIN_STEPS}], "
                         f"got {share} and {max_t}")
    t = torch.randint(0, TRAIN_STEPS, (n,), generator=generator)
    low = torch.randint(0, max_t, (n,), generator=generator)
    return torch.where(torch.rand(n, generator=generator) < share, low, t)


def unrolled_chain_loss(head: ResidualDiffusionHead, target: torch.Tensor, z: torch.Tensor,
                        steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Mean squared error of the head's temperature-0 sample (unguided, `steps` steps) against the
    true residual, in the head's units (target / residual_scale), backpropagated through the whole
    chain. The official loss teaches the denoiser at single timesteps; the app's default output is
    this deterministic chain, and its error is what the residual's PSNR gain measures."""
    sample = head.sample(z, steps=steps, temperature=0.0, generator=generator)
    return (sample.float() - target.float()).square().mean() / head.residual_scale ** 2


# ------------------------------------------------------------------ the head and its data

def fresh_like(head: ResidualDiffusionHead, depth: int | None = None, hidden: int | None = None,
               context_kernel: int | None = None) -> ResidualDiffusionHead:
    """A freshly initialised head of `head`'s shape and settings, with the given ones changed."""
    net = head.net
    return ResidualDiffusionHead(
        net.token_dim, net.cond_embed.in_features, net.input_proj.out_features,
        len(net.res_blocks) if depth is None else depth, head.sampling_steps, head.residual_scale,
        net.res_blocks[0].mlp[0].out_features if hidden is None else hidden,
        head.context_kernel if context_kernel is None else context_kernel)


def deepen(head: ResidualDiffusionHead, depth: int) -> ResidualDiffusionHead:
    """A copy of `head` with `depth` residual blocks; the added ones start as the identity."""
    net = head.net
    if depth < len(net.res_blocks):
        raise ValueError(f"--diff-depth {depth} is below the model's head depth {len(net.res_blocks)}")
    grown = fresh_like(head, depth=depth)
    missing, unexpected = grown.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("net.res_blocks.") for k in missing), (missing, unexpected)
    return grown  # new blocks: initialize_weights zeroed their modulation, so gate = 0


def widen(head: ResidualDiffusionHead, hidden: int) -> ResidualDiffusionHead:
    """A copy of `head` whose blocks' inner MLP layer has `hidden` units: the old units keep their
    weights, the new ones get a fresh input layer and zero outgoing weights, so the copy computes
    exactly what `head` does until training moves them."""
    net = head.net
    old = net.res_blocks[0].mlp[0].out_features
    if hidden < old:
        raise ValueError(f"--diff-hidden {hidden} is below the model's head hidden width {old}")
    width = net.input_proj.out_features
    grown = fresh_like(head, hidden=hidden)
    state = grown.state_dict()
    for name, value in head.state_dict().items():
        in_block = name.startswith("net.res_blocks.")
        if in_block and name.endswith("mlp.2.weight"):  # outgoing weights [width, hidden]: new columns zero
            state[name] = torch.cat([value, value.new_zeros(width, hidden - old)], 1)
        elif in_block and name.endswith(("mlp.0.weight", "mlp.0.bias")):  # incoming: old rows kept, new fresh
            state[name] = torch.cat([value, state[name][old:]])
        else:
            state[name] = value
    grown.load_state_dict(state)
    return grown


def with_context(head: ResidualDiffusionHead, kernel: int) -> ResidualDiffusionHead:
    """A copy of `head` with a `kernel` x `kernel` context convolution, zero at first (the head's
    function unchanged); a head that has one keeps it."""
    if kernel == head.context_kernel:
        return head
    if head.context_kernel:
        raise ValueError(f"--head-context {kernel}: the head already has a {head.context_kernel} x "
                         f"{head.context_kernel} context")
    grown = fresh_like(head, context_kernel=kernel)
    missing, unexpected = grown.load_state_dict(head.state_dict(), strict=False)
    assert not unexpected and all(k.startswith("context.") for k in missing), (missing, unexpected)
    return grown


def head_config(cfg: HeadTrainConfig, model: TransformerConfig) -> TransformerConfig:
    """The transformer config after this run: the model's, with the head's new width, depth and units."""
    result = copy.deepcopy(model)
    result.diff_depth = cfg.diff_depth or model.diff_depth
    result.diff_width = cfg.diff_width or model.diff_width
    new_width = cfg.diff_width and cfg.diff_width != model.diff_width  # a new head: its own hidden width
    result.diff_hidden = cfg.diff_hidden if new_width else (cfg.diff_hidden or model.diff_hidden)
    result.residual_scale = cfg.residual_scale or model.residual_scale
    if cfg.head_context is not None:
        result.head_context = cfg.head_context
    if cfg.continuous_last_sides is not None:
        result.continuous_last_sides = tuple(cfg.continuous_last_sides)
    return result


def retrained_head(cfg: HeadTrainConfig, head: ResidualDiffusionHead,
                   model: TransformerConfig) -> ResidualDiffusionHead:
    """The head this run trains: a new one at another width, a deepened or widened copy, or the model's own."""
    if cfg.diff_width and cfg.diff_width != model.diff_width:
        head = ResidualDiffusionHead(head.net.token_dim, head.net.cond_embed.in_features, cfg.diff_width,
                                     cfg.diff_depth or model.diff_depth, head.sampling_steps, head.residual_scale,
                                     cfg.diff_hidden, head.context_kernel)
    else:
        if cfg.diff_depth and cfg.diff_depth != model.diff_depth:
            head = deepen(head, cfg.diff_depth)
        if cfg.diff_hidden and cfg.diff_hidden != (model.diff_hidden or model.diff_width):
            head = widen(head, cfg.diff_hidden)
    if cfg.head_context is not None:
        head = with_context(head, cfg.head_context)
    if cfg.residual_scale:
        head.residual_scale = cfg.residual_scale
    return head


def wording_texts(dataset, ids, w: int) -> list[str]:
    """Wording w of the images `ids`: 0 is the exact caption, 1.. a varied one (fixed per w)."""
    dataset.set_epoch(w - 1)
    return [dataset.captions[i]["text"] if w == 0 else dataset.caption(i) for i in ids]


@torch.no_grad()
def head_conditions(pipe: HARTPipeline, data: str, resolution: int, wordings: int, folder: Path,
                    batch: int = 32) -> dict[str, torch.Tensor]:
    """Conditions [W + 1, N, P^2, C] fp16 and residuals [N, P^2, D] for every image at `resolution`
    (the residual is everything the coarser scales leave where the model leaves the last scale to
    the head; above the lowest resolution, the model's `coarse_scales` come from the dataset's
    lowest-resolution image, as `common.head_tokens` builds them):
    W wordings, then the empty prompt (zero text states and positions, as the sampler's
    unconditional rows). Cached in `folder` under a hash of the frozen transformer and tokenizer
    (not the head: training it does not change its inputs), the data and W."""
    tf, tok = pipe.transformer, pipe.tokenizer
    scales = pipe.schedules[resolution]
    dataset = load_dataset(data, resolution, "all", caption_variation=True)
    n = len(dataset.captions)
    continuous_last = tf.continuous_last(scales)
    coarse = pipe.sampling_defaults.coarse_scales if resolution != pipe.default_resolution else 0
    remainder = bool(coarse) and pipe.sampling_defaults.coarse_remainder
    low = load_dataset(data, pipe.default_resolution, "all", caption_variation=False) if coarse else None
    if low is not None and [c["text"] for c in low.captions] != [c["text"] for c in dataset.captions]:
        raise ValueError(f"{data}: the {pipe.default_resolution} px and {resolution} px images are not the same list")
    key = ([resolution, list(scales), wordings, dataset.source, n] + (["continuous_last"] if continuous_last else [])
           + ([f"coarse_{coarse}"] if coarse else []) + (["coarse_remainder"] if remainder else []))
    digest = hashlib.sha256(json.dumps(key).encode())
    for module in (tf, tok):
        hash_weights(digest, module, skip_prefix="diffloss.")
    path = Path(folder) / f"head_{resolution}_{digest.hexdigest()[:16]}.safetensors"
    if not path.is_file():
        conditions, residuals = [], []
        for start in tqdm(range(0, n, batch), desc=f"head conditions {resolution}px"):
            ids = range(start, min(n, start + batch))
            low_images = torch.stack([low.image(i) for i in ids]) if low is not None else None
            indices, residual = head_tokens(tok, tf, torch.stack([dataset.image(i) for i in ids]), scales,
                                            low_images, coarse, remainder)
            per_wording = []
            for w in range(wordings + 1):
                if w < wordings:
                    states, _, positions = pipe.text_encoder(wording_texts(dataset, ids, w))
                else:  # the empty prompt
                    states, positions = torch.zeros_like(states), torch.zeros_like(positions)
                per_wording.append(teacher_forced_condition(tf, tok, states, positions, indices, scales,
                                                            coarse, context=False).half())
            conditions.append(torch.stack(per_wording))
            residuals.append(residual.half())
        path.parent.mkdir(parents=True, exist_ok=True)
        write_weights({"conditions": torch.cat(conditions, 1), "residuals": torch.cat(residuals)}, path)
    pool = read_weights(path)
    pool["residuals"] = pool["residuals"].float()
    return pool


def neighbour_table(grids: list[tuple[int, int]], kernel: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For pools of `grids` = [(images, side)] laid end to end, each image's side x side tokens in
    row-major order: every token's k x k neighbours' pool indices [T, k^2] (row-major offsets, the
    context convolution's order) and whether each lies inside its image's grid [T, k^2]."""
    half = kernel // 2
    offsets = torch.arange(-half, half + 1)
    dr, dc = offsets.repeat_interleave(kernel), offsets.repeat(kernel)
    tables, inside, start = [], [], 0
    for images, side in grids:
        token = torch.arange(images * side * side)
        image, row, col = token // (side * side), token % (side * side) // side, token % side
        r, c = row[:, None] + dr, col[:, None] + dc
        valid = (r >= 0) & (r < side) & (c >= 0) & (c < side)
        tables.append(start + image[:, None] * side * side + r.clamp(0, side - 1) * side + c.clamp(0, side - 1))
        inside.append(valid)
        start += images * side * side
    return torch.cat(tables), torch.cat(inside)


def pick_tokens(pool_ends: torch.Tensor, count: int, balance: bool, generator: torch.Generator) -> torch.Tensor:
    """`count` token indices into pools laid end to end (pool i ends at pool_ends[i]): uniform over
    all tokens, or with `balance` the same share from every pool (the 64 px pool is 4x smaller)."""
    if not balance:
        return torch.randint(0, int(pool_ends[-1]), (count,), generator=generator)
    pool = torch.randint(0, len(pool_ends), (count,), generator=generator)
    starts = torch.cat([pool_ends.new_zeros(1), pool_ends[:-1]])
    sizes = pool_ends - starts
    return starts[pool] + (torch.rand(count, generator=generator) * sizes[pool]).long().clamp(max=sizes[pool] - 1)


def ema_copy(ema: EMA, head: ResidualDiffusionHead) -> ResidualDiffusionHead:
    """A new head holding the EMA weights (the trained one keeps its raw weights)."""
    return ema.copy_to(copy.deepcopy(head)).eval().requires_grad_(False)


def explained_variance(head: ResidualDiffusionHead, z: torch.Tensor, target: torch.Tensor) -> float:
    with torch.no_grad():
        predicted = head.sample(z.float(), temperature=0.0, generator=torch.Generator().manual_seed(0)).float()
    return 1 - ((predicted - target).square().mean() / target.square().mean()).item()


# ------------------------------------------------------------------ training

def train(cfg: HeadTrainConfig) -> dict:
    if not cfg.model:
        raise ValueError("--model is required: the pipeline folder whose head is retrained")
    if cfg.wordings < 1 or cfg.batch_tokens < 1:
        raise ValueError("--wordings and --batch-tokens must be at least 1")
    if cfg.unrolled_weight < 0:
        raise ValueError(f"--unrolled-weight must be >= 0, got {cfg.unrolled_weight}")
    if not 0 <= cfg.cond_drop < 1:
        raise ValueError(f"--cond-drop must be in [0, 1), got {cfg.cond_drop}")
    pipe = HARTPipeline.from_pretrained(cfg.model)
    if cfg.continuous_last_sides is not None:  # before the conditions and targets are built
        pipe.transformer.config.continuous_last_sides = tuple(cfg.continuous_last_sides)
    if cfg.coarse_scales is not None:  # the same; saved with the model as its sampling default
        pipe.sampling_defaults.coarse_scales = cfg.coarse_scales
    if cfg.coarse_remainder is not None:
        pipe.sampling_defaults.coarse_remainder = cfg.coarse_remainder
    pipe.sampling_defaults.validate()
    pipe.transformer.float().requires_grad_(False)
    pipe.tokenizer.float()
    engine = Engine(cfg, "head")
    head = retrained_head(cfg, pipe.transformer.diffloss, pipe.transformer.config).requires_grad_(True).train()

    # every resolution's tokens in one pool: conditions [W + 1, N * P^2, C], residuals [N * P^2, D]
    cache = Path(cfg.cache) if cfg.cache else engine.out / "cache"
    parts = [head_conditions(pipe, cfg.data, r, cfg.wordings, cache) for r in pipe.resolutions]
    conditions = torch.cat([part["conditions"].flatten(1, 2) for part in parts], 1)
    residuals = torch.cat([part["residuals"].flatten(0, 1) for part in parts])
    pool_ends = torch.tensor([part["residuals"].shape[0] * part["residuals"].shape[1] for part in parts]).cumsum(0)
    eval_ids = torch.randperm(int(pool_ends[-1]), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.eval_tokens]
    neighbours = None
    if head.context_kernel:
        grids = [(part["residuals"].shape[0], math.isqrt(part["residuals"].shape[1])) for part in parts]
        neighbours = neighbour_table(grids, head.context_kernel)

    def condition(trained: ResidualDiffusionHead, wording: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """The head's condition for pool tokens `picked` under wordings `wording` (context included)."""
        z = conditions[wording, picked].float()
        if neighbours is None:
            return z
        table, inside = neighbours[0][picked], neighbours[1][picked]
        around = conditions[wording[:, None], table].float() * inside[..., None]
        return trained.contextualize_neighbours(z, around)

    def explained(trained: ResidualDiffusionHead) -> float:
        first = torch.zeros_like(eval_ids)
        with torch.no_grad():
            z = condition(trained, first, eval_ids)
        return round(explained_variance(trained, z, residuals[eval_ids]), 4)

    ema = EMA(head, cfg.ema_decay)
    optimizer = adamw_decaying_matrices(head, cfg.lr, cfg.weight_decay,
                                        {name: cfg.context_lr_multiplier for name, _ in head.named_parameters()
                                         if name.startswith("context.")})
    engine.resume(head, optimizer, ema)
    model, optimizer = engine.prepare(head, optimizer)
    accelerator = engine.accelerator
    if engine.start_step == 0:
        engine.log.write(0, explained=explained(head))

    def train_step(step: int, g: torch.Generator) -> dict:
        picked = pick_tokens(pool_ends, cfg.batch_tokens, cfg.balance_resolutions, g)
        wording = torch.randint(0, cfg.wordings, (cfg.batch_tokens,), generator=g)
        wording[torch.rand(cfg.batch_tokens, generator=g) < cfg.cond_drop] = cfg.wordings  # empty prompt
        trained_head = unwrap(accelerator, model)
        target = residuals[picked]
        prompted = wording < cfg.wordings  # the empty prompt's rows only teach CFG's other half
        timesteps = (low_timesteps(len(target), cfg.low_timestep_share, cfg.low_timestep_max, g)
                     if cfg.low_timestep_share else None)
        with accelerator.autocast():
            z = condition(trained_head, wording, picked)
            loss = trained_head.loss(target, z, timesteps, generator=g)
            if cfg.unrolled_weight:
                loss = loss + cfg.unrolled_weight * unrolled_chain_loss(trained_head, target[prompted], z[prompted],
                                                                        generator=g)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        grad_norm = clip_gradients(accelerator, model, cfg.grad_clip)
        optimizer.step()
        ema.update(trained_head, step)
        metrics = {"loss": loss, "grad_norm": grad_norm}
        if engine.is_log_step(step):
            with accelerator.autocast():
                metrics["explained"] = explained(ema_copy(ema, head))
        return metrics

    outcome = engine.run(train_step, optimizer, lambda: unwrap(accelerator, model), ema=ema)
    if "stopped_by_signal" in outcome:
        return outcome
    trained = ema_copy(ema, head)
    pipe.transformer.diffloss = trained
    pipe.transformer.config = head_config(cfg, pipe.transformer.config)
    pipe.save_pretrained(engine.out / "model")
    records = engine.log.records()
    engine.finish(trained, ["loss"])
    return {**(records[-1] if records else {}), **outcome}


def main(argv: list[str] | None = None) -> int:
    return command_line(HeadTrainConfig, PRESETS, train, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
