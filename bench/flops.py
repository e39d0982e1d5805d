"""FLOP and MAC counting with torch.utils.flop_counter.FlopCounterMode.

FlopCounterMode has no rule for the CPU fused attention kernel, so one is added here (without
it attention would count as zero). Only matmuls, convolutions and attention are counted; norms,
softmax, sampling and other elementwise work are not. MACs = FLOPs / 2."""
from __future__ import annotations

from contextlib import contextmanager
import math
from typing import Callable

import torch

from bench.measure import PROMPT


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """Q K^T and P V of the CPU flash kernel: 2 FLOPs per MAC, over every row and head."""
    *batch, queries, head_dim = query
    keys, value_dim = key[-2], value[-1]
    rows = math.prod(batch)
    return 2 * rows * queries * keys * (head_dim + value_dim)


def _extra_rules() -> dict:
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: _cpu_attention_flops} if op is not None else {}


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping=_extra_rules())


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    """(FLOPs of one call, its output)."""
    with flop_counter() as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


@contextmanager
def stage_counters(pipe):
    """Count the FLOPs of the pipeline's stages while it runs. The text encoder, the residual
    head's `sample` and the tokenizer's `decode` are wrapped (instance attributes, removed
    afterwards); the AR loop is the rest.

    The CFG unconditional prefix is built once and then reused by every call, so the call that
    builds it (often the counted warm-up) would over-count what a timed call does: its FLOPs are
    kept apart in `uncond_prefix_once` and left out of `ar` and `total`."""
    counts = {"text": 0, "diffusion": 0, "decode": 0, "decode_calls": 0, "uncond_prefix_once": 0}
    targets = [(pipe.text_encoder, "forward", "text"), (pipe.tokenizer, "decode", "decode"),
               (pipe.transformer.diffloss, "sample", "diffusion"),
               (pipe.transformer, "unconditional_prefix", "uncond_prefix_once")]

    def counted(fn, stage):
        def call(*args, **kwargs):
            flops, out = count_flops(fn, *args, **kwargs)
            counts[stage] += flops
            if stage == "decode":
                counts["decode_calls"] += 1
            return out
        return call

    for obj, attr, stage in targets:
        setattr(obj, attr, counted(getattr(obj, attr), stage))
    try:
        with flop_counter() as outer:
            yield counts
        counts["total"] = int(outer.get_total_flops()) - counts["uncond_prefix_once"]
        counts["ar"] = counts["total"] - counts["text"] - counts["diffusion"] - counts["decode"]
    finally:
        for obj, attr, _ in targets:
            delattr(obj, attr)


def pipeline_macs(pipe, **call) -> dict:
    """MACs per stage of one pipeline call (`call`: the pipeline's keyword arguments)."""
    with stage_counters(pipe) as counts:
        pipe(PROMPT, **call)
    macs = {k: counts[k] // 2 for k in ("text", "ar", "diffusion", "decode", "total", "uncond_prefix_once")}
    macs["decode_calls"] = counts["decode_calls"]
    return macs
