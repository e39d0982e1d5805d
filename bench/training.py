"""AR training speed with and without last-scale token dropping (`training`)."""
from __future__ import annotations

import statistics
from typing import Callable

import torch

from bench.harness import run_case
from bench.measure import column, interleave, paired_ratio, stats


def case_training(p: dict) -> dict:
    """AR training steps/s (ARLoss forward + backward + grad clip + AdamW) on random tensors, with
    and without last-scale token dropping, interleaved. Data loading, teacher-forcing inputs, text
    encoding and the EMA update of the real loop are left out (the same for both)."""
    from hart.presets import get_preset
    from hart.tokenizer import HybridTokenizer
    from hart.transformer import HARTTransformer
    from train.train_ar import ARLoss, ARTrainConfig, last_scale_keep
    from train.engine import bf16_supported

    preset = get_preset(p["preset"])
    res = p["resolution"]
    scales = tuple(preset.resolutions[res])
    tf_cfg = preset.transformer
    tf_cfg.patch_nums = scales
    cfg = ARTrainConfig(model_preset=p["preset"], resolution=res, batch_size=p["batch"])
    torch.manual_seed(0)
    transformer = HARTTransformer(tf_cfg)
    tokenizer = HybridTokenizer(preset.tokenizer).requires_grad_(False)
    loss_module = ARLoss(transformer, tokenizer, cfg).train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    autocast_bf16 = bf16_supported()  # the rule training's mixed_precision "auto" uses

    B, Lc, Dt = p["batch"], preset.text_encoder.max_length, tf_cfg.context_dim
    total_tokens = sum(s * s for s in scales)
    last = scales[-1] ** 2
    gen = torch.Generator().manual_seed(0)
    states = torch.randn(B, Lc, Dt, generator=gen)
    positions = torch.arange(Lc).expand(B, -1).contiguous()
    targets = torch.randint(0, tf_cfg.vocab_size, (B, total_tokens), generator=gen)
    inputs = torch.randn(B, total_tokens - 1, tf_cfg.token_dim, generator=gen)
    rest = torch.randn(B, last, tf_cfg.token_dim, generator=gen)
    step_count = [0]

    def train_step(drop: bool) -> Callable[[], dict]:
        def run() -> dict:
            step_count[0] += 1
            g = torch.Generator().manual_seed(step_count[0])
            keep = last_scale_keep(B, last, cfg.drop_min_keep, g) if drop else None
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast_bf16):
                loss, _, _, _ = loss_module(states, positions, inputs, targets, rest, scales, keep, g)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(transformer.parameters(), cfg.grad_clip)
            optimizer.step()
            return {"kept": last if keep is None else keep.shape[1]}
        return run

    rounds = interleave([("full", train_step(False)), ("drop", train_step(True))], p["repeats"], p["warmup"],
                        label=f"training {p['preset']} {res}px b{B}")
    full, drop = column(rounds["full"], "wall"), column(rounds["drop"], "wall")
    return {
        "preset": p["preset"], "resolution": res, "schedule": list(scales), "batch": B,
        "sequence_tokens": Lc + total_tokens - 1, "last_scale_tokens": last,
        "kept_last_scale_tokens_mean": statistics.fmean(column(rounds["drop"], "kept")),
        "precision": "bf16 autocast" if autocast_bf16 else "fp32",
        "attn_impl": "sdpa", "diffusion_batch_mul": cfg.diffusion_batch_mul,
        "repeats": p["repeats"],
        "step_s_full": stats(full), "step_s_drop": stats(drop),
        "steps_per_s_full": 1 / statistics.median(full),
        "steps_per_s_drop": 1 / statistics.median(drop),
        "images_per_s_full": B / statistics.median(full),
        "images_per_s_drop": B / statistics.median(drop),
        "speedup_drop_over_full": paired_ratio(full, drop),
    }


def section_training(settings: dict) -> dict:
    """The emoji preset at its largest resolution (the tiny preset with --tiny)."""
    from hart.presets import get_preset
    preset = "tiny" if settings["tiny"] else "emoji"
    params = {"preset": preset, "resolution": max(get_preset(preset).resolutions), "batch": settings["train_batch"],
              "repeats": settings["repeats"], "warmup": max(1, settings["warmup"])}
    return run_case("training", params, settings)
