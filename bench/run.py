"""HART benchmark suite: one run, one JSON.

    python bench/run.py --out bench.json                     # full run (lead, machine idle)
    python bench/run.py --quick --out bench.json             # < 10 min on an idle 2-core CPU
    python bench/run.py --quick --full-size --out bench.json # quick, plus the 0.7B shapes
    python bench/run.py --only generation,vs_limit --out g.json
    python bench/run.py --markdown bench.json                # print the BENCHMARKS.md tables

Sections (see BENCHMARKS.md for what each measures and how):
  machine, peak_matmul, generation, vs_diffusion, vs_limit, residual_head, training

Method. Every comparison is taken side by side: the variants being compared run in rounds
(A B, then B A, ...) after warm-up, and a ratio is the median of the per-round ratios.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (plus a rule for the CPU
attention kernel, which it does not know); MACs = FLOPs / 2. Each generation configuration
runs in its own subprocess (`--case`) so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
from contextlib import contextmanager
import json
import math
import os
from pathlib import Path
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/run.py` from anywhere
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

SECTIONS = ("machine", "peak_matmul", "generation", "vs_diffusion", "vs_limit", "residual_head", "decode_layout",
            "training")
DEPENDS = {"vs_limit": ("peak_matmul", "generation")}
PROMPT = "a smiling yellow cat face"
SKIPPED_FULL = "not run: --quick/--tiny without --full-size"
SCHEMA = "hart-bench/1"
PRECISIONS = ("fp32", "bf16")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# =========================================================================== settings

def build_settings(args) -> dict:
    quick, tiny = args.quick, args.tiny
    repeats = args.repeats or (3 if quick else 5)
    full_size = bool(args.full_size or not (quick or tiny))
    s = {
        "quick": quick,
        "tiny": tiny,
        "full_size": full_size,
        "repeats": repeats,
        "warmup": args.warmup,
        "full_size_repeats": args.full_size_repeats or (1 if quick else repeats),
        "threads": args.threads or torch.get_num_threads(),
        "interop_threads": args.interop_threads,
        "batch_sizes": _ints(args.batch_sizes) or [1, 4],
        "resolutions": _ints(args.resolutions),         # None: every resolution of the model
        "full_size_preset": args.full_preset,
        "full_size_resolutions": _ints(args.full_resolutions) or [512],
        "dit_steps": _ints(args.dit_steps) or [20, 50],
        "dit_timed_steps": args.dit_timed_steps or (2 if tiny else 3),
        # a DiT sample estimated to take longer than this is extrapolated; quick: always
        "dit_max_seconds": 0.0 if quick else args.dit_max_seconds,
        "residual_steps": _ints(args.residual_steps) or [1, 4, 8, 16],
        "train_batch": args.train_batch or (4 if tiny else 16),
        "gemm_sizes": [256, 512] if tiny else [512, 1024, 2048],
        "gemm_side_by_side": 512 if tiny else 2048,
        "bf16_sizes": [64, 128, 256] if tiny else [128, 256, 512, 1024, 2048],
        "bf16_cap_s": args.bf16_cap_s or (0.5 if tiny else 1.0 if quick else 3.0),
        "in_process": args.in_process,
        "prompt": PROMPT,
        "cfg": args.cfg,                                  # None: each model's default
        "attention_query_chunk": args.attention_query_chunk,  # 0: SDPA (the default path)
    }
    wanted = [v.strip() for v in (args.precisions or "fp32,bf16").split(",") if v.strip()]
    bad = [v for v in wanted if v not in PRECISIONS]
    if bad:
        raise SystemExit(f"--precisions {bad}: choose from {', '.join(PRECISIONS)}")
    native = bool(_native_bf16())
    s["bf16_native"] = native
    s["precisions"] = [v for v in wanted if v == "fp32" or native or args.force_bf16]
    notes = []
    if "bf16" in wanted and "bf16" not in s["precisions"]:
        notes.append("bf16 generation not run: this CPU has no native bf16 (avx512_bf16 / amx_bf16), so bf16 "
                     "matmuls are emulated and far slower than fp32 (see peak_matmul); --force-bf16 runs it anyway")
    if repeats < 5:
        notes.append(f"{repeats} timed repeats per measurement (< 5): quick/tiny settings, medians are rough")
    if s["full_size"] and s["full_size_repeats"] < 5:
        notes.append(f"0.7B configuration: {s['full_size_repeats']} timed repeat(s) only")
    s["notes"] = notes
    return s


def _ints(text: str | None) -> list[int] | None:
    if not text:
        return None
    return [int(v) for v in str(text).split(",") if v.strip()]


def set_threads(settings: dict) -> None:
    torch.set_num_threads(int(settings["threads"]))
    if settings.get("interop_threads"):
        try:
            torch.set_num_interop_threads(int(settings["interop_threads"]))
        except RuntimeError:  # only settable before the first inter-op work
            pass


# =========================================================================== measuring

def interleave(variants: list[tuple[str, Callable[[], dict | None]]], repeats: int, warmup: int,
               label: str = "") -> dict[str, list[dict]]:
    """Run the variants in rounds after `warmup` untimed rounds, alternating the order every
    round (A B, B A, ...). Each call may return measured values; its wall time is added as
    "wall". Returns, per variant, one dict per round."""
    for w in range(warmup):
        for name, fn in variants:
            log(f"{label} warm-up {w + 1}/{warmup}: {name}")
            fn()
    out: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for r in range(repeats):
        order = variants if r % 2 == 0 else variants[::-1]
        for name, fn in order:
            start = time.perf_counter()
            values = dict(fn() or {})
            values.setdefault("wall", time.perf_counter() - start)
            out[name].append(values)
        log(f"{label} round {r + 1}/{repeats}: " +
            ", ".join(f"{n} {out[n][-1]['wall']:.3f}s" for n, _ in variants))
    return out


def stats(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def column(rounds: list[dict], key: str) -> list[float]:
    return [r[key] for r in rounds]


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Median (and spread) of per-round ratios numerator[r] / denominator[r]."""
    ratios = [a / b for a, b in zip(numerator, denominator)]
    return stats(ratios)


def rss_now_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set of this process (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


# ---------------------------------------------------------------- FLOP counting

def _sdpa_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """CPU fused attention (unknown to FlopCounterMode): Q K^T and P V, 2 FLOPs per MAC."""
    *batch, lq, d = query
    lk, dv = key[-2], value[-1]
    rows = math.prod(batch)
    return 2 * rows * lq * lk * d + 2 * rows * lq * lk * dv


def _custom_flops() -> dict:
    mapping = {}
    for name in ("_scaled_dot_product_flash_attention_for_cpu",):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            mapping[op] = _sdpa_flops
    return mapping


def flop_counter():
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping=_custom_flops())


def count_flops(fn: Callable, *args, **kwargs) -> tuple[int, object]:
    with flop_counter() as counter:
        out = fn(*args, **kwargs)
    return int(counter.get_total_flops()), out


@contextmanager
def stage_counters(pipe):
    """Count the FLOPs of the pipeline's stages while it runs: text encoder, residual head and
    decoder are wrapped (instance attributes, removed afterwards); the AR loop is the rest.

    The CFG unconditional prefix is built once and then reused by every call, so the call
    that builds it (often the counted warm-up) would over-count what a timed call does: its
    FLOPs are kept apart in `uncond_prefix_once` and left out of `ar` and `total`."""
    counts = {"text": 0, "diffusion": 0, "decode": 0, "decode_calls": 0, "uncond_prefix_once": 0}
    targets = [(pipe.text_encoder, "forward", "text"), (pipe.tokenizer, "decode", "decode"),
               (pipe.transformer.diffloss, "sample", "diffusion"),
               (pipe.transformer, "unconditional_prefix", "uncond_prefix_once")]

    def wrap(fn, stage):
        def counted(*args, **kwargs):
            with flop_counter() as inner:
                out = fn(*args, **kwargs)
            counts[stage] += int(inner.get_total_flops())
            if stage == "decode":
                counts["decode_calls"] += 1
            return out
        return counted

    for obj, attr, stage in targets:
        setattr(obj, attr, wrap(getattr(obj, attr), stage))
    try:
        with flop_counter() as outer:
            yield counts
        counts["total"] = int(outer.get_total_flops()) - counts["uncond_prefix_once"]
        counts["ar"] = counts["total"] - counts["text"] - counts["diffusion"] - counts["decode"]
    finally:
        for obj, attr, _ in targets:
            delattr(obj, attr)


def pipeline_macs(pipe, **call) -> dict:
    """MACs per stage of one pipeline call (FLOPs / 2)."""
    with stage_counters(pipe) as counts:
        pipe(PROMPT, **call)
    macs = {k: counts[k] // 2 for k in ("text", "ar", "diffusion", "decode", "total", "uncond_prefix_once")}
    macs["decode_calls"] = counts["decode_calls"]
    return macs


# ---------------------------------------------------------------- GEMM

def gemm_timer(n: int, dtype: torch.dtype) -> Callable[[], dict]:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    flops = 2 * n ** 3

    def run():
        start = time.perf_counter()
        torch.mm(a, b)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "gflops": flops / seconds / 1e9}
    return run


# =========================================================================== models

def load_pipeline(which: str, tiny: bool, full_preset: str = "hart-0.7b"):
    """which: "default" (bundled model if present, else the emoji preset; tiny preset in
    --tiny mode) or "full" (the 0.7B preset, random weights). Returns (pipeline, description)."""
    from hart.pipeline import BUNDLED_MODEL, HARTPipeline
    start = time.perf_counter()
    if which == "full":
        pipe, info = HARTPipeline.from_preset(full_preset), {"source": f"preset {full_preset}", "random_weights": True}
    elif tiny:
        pipe, info = HARTPipeline.from_preset("tiny"), {"source": "preset tiny", "random_weights": True}
    elif (BUNDLED_MODEL / "model_index.json").is_file():
        pipe = HARTPipeline.from_pretrained(BUNDLED_MODEL)
        info = {"source": f"bundled {BUNDLED_MODEL.relative_to(ROOT)}", "random_weights": False}
    else:
        pipe = HARTPipeline.from_preset("emoji")
        info = {"source": "preset emoji (assets/hart-emoji not found)", "random_weights": True}
    info["load_s"] = time.perf_counter() - start
    info["resolutions"] = pipe.resolutions
    info["transformer_params"] = sum(p.numel() for p in pipe.transformer.parameters())
    info["residual_head_params"] = sum(p.numel() for p in pipe.transformer.diffloss.parameters())
    info["tokenizer_params"] = sum(p.numel() for p in pipe.tokenizer.parameters())
    return pipe, info


def set_precision(pipe, precision: str, *others: torch.nn.Module, masters: dict | None = None,
                  query_chunk: int = 0) -> None:
    """fp32, or bf16 autocast with the matmul weights held in bf16 (the pipeline's own way;
    `others`, e.g. the DiT baseline, get the same treatment, their fp32 copies kept in `masters`).
    `query_chunk` > 0 switches every model's bf16 attention to the chunked path (both alike)."""
    from hart.pipeline import hold_matmul_weights
    from hart.transformer import set_query_chunk
    dtype = torch.bfloat16 if precision == "bf16" else None
    pipe.autocast_dtype = dtype
    pipe.attention_query_chunk = query_chunk
    if others:
        hold_matmul_weights(others, dtype, masters)
        for other in others:
            set_query_chunk(other, query_chunk)


def hart_runner(pipe, resolution: int, batch: int, **options) -> Callable[[], dict]:
    def run():
        result = pipe(PROMPT, resolution=resolution, num_images=batch, seed=0, **options)
        return dict(result.timings)
    return run


def stage_summary(rounds: list[dict]) -> dict:
    return {k: stats(column(rounds, k)) for k in ("text", "ar", "diffusion", "decode", "total", "wall")}


# =========================================================================== cases
# Each case runs in a subprocess (`--case NAME`) unless --in-process; it returns a dict.

def case_generation(p: dict) -> dict:
    """Latency/throughput of one (model, resolution, batch), its peak RSS, per-stage MACs and,
    side by side with the generations, the fp32 GEMM rate (for vs_limit).

    The FLOP-counted generation doubles as the first warm-up (same kernels, untimed); the peak
    RSS is read after the warm-ups, before any GEMM buffer exists, so it is the generation's."""
    rss_start = rss_now_mb()
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    rss_loaded = rss_now_mb()
    res, batch, precision = p["resolution"], p["batch"], p.get("precision", "fp32")
    set_precision(pipe, precision, query_chunk=p.get("attention_query_chunk", 0))
    label = f"generation {p['model']} {res}px b{batch} {precision}"
    gen = hart_runner(pipe, res, batch)
    log(f"{label} warm-up 1/{max(1, p['warmup'])} (FLOP-counted)")
    macs = pipeline_macs(pipe, resolution=res, num_images=batch, seed=0)
    for w in range(1, p["warmup"]):
        log(f"{label} warm-up {w + 1}/{p['warmup']}")
        gen()
    peak = peak_rss_mb()
    gemm_run = gemm_timer(p["gemm_n"], torch.float32)
    gemm_run()  # its warm-up
    rounds = interleave([("hart", gen), ("gemm_fp32", gemm_run)], p["repeats"], warmup=0, label=label)
    hart = rounds["hart"]
    ar_flops = 2 * macs["ar"]
    achieved = [ar_flops / r["ar"] / 1e9 for r in hart]
    gemm = column(rounds["gemm_fp32"], "gflops")
    total = stats(column(hart, "total"))
    return {
        "model": p["model"], "model_info": info, "resolution": res, "batch": batch, "precision": precision,
        "repeats": p["repeats"], "warmup": max(1, p["warmup"]),
        "latency_s": total["median"],
        "throughput_img_s": batch / total["median"],
        "stages_s": stage_summary(hart),
        "macs": macs,
        "ar_achieved_gflops": stats(achieved),
        "gemm_fp32_side_by_side": {"n": p["gemm_n"], "gflops": stats(gemm)},
        "ar_fraction_of_fp32_peak_side_by_side": paired_ratio(achieved, gemm),
        "peak_rss_mb": peak,
        "rss_after_load_mb": rss_loaded,
        "rss_before_load_mb": rss_start,
    }


def make_dit(pipe):
    from bench.dit import DiT, match_hart
    cfg = match_hart(pipe.transformer.config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dit = DiT(cfg).eval()
    return dit, cfg


def case_vs_diffusion(p: dict) -> dict:
    """HART generation vs an equal-size DiT (20/50 DDIM steps, batched CFG) on the same latent
    grid, text encoder and decoder; interleaved; MACs counted."""
    from dataclasses import asdict
    from bench.dit import DDIMSampler, count_params
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    dit, dit_cfg = make_dit(pipe)
    hart_params, dit_params = count_params(pipe.transformer), count_params(dit)
    # the model's default guidance unless --cfg sets one for both sides (cfg 0: no unconditional rows)
    cfg_scale = pipe.sampling_defaults.cfg if p.get("cfg") is None else float(p["cfg"])
    steps_list = sorted(p["dit_steps"])
    sampler = DDIMSampler(dit, max(steps_list), cfg_scale)
    samplers = {n: DDIMSampler(dit, n, cfg_scale) for n in steps_list}
    prompts = [PROMPT] * p["batch"]
    out = {"model": p["model"], "model_info": info, "hart_params": hart_params, "dit_params": dit_params,
           "param_ratio_dit_over_hart": dit_params / hart_params, "dit_config": asdict(dit_cfg),
           "cfg": cfg_scale, "residual_cfg": pipe.sampling_defaults.residual_cfg,  # None: the last scale's cfg
           "batch": p["batch"], "repeats": p["repeats"], "cases": []}

    precision = "fp32"

    def dit_autocast():
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")

    def dit_run(side: int, smp: DDIMSampler, steps_to_run: int) -> Callable[[], dict]:
        def run():
            with torch.inference_mode(), dit_autocast():
                start = time.perf_counter()
                states, _, _ = pipe.text_encoder(prompts)
                rows = smp.rows(states)  # text K/V for cond + uncond rows, once per sample
                t_text = time.perf_counter()
                x = smp.noise(len(prompts), side, torch.Generator().manual_seed(0))
                step_times = []
                for n in range(steps_to_run):
                    t0 = time.perf_counter()
                    x = smp.step(x, n, rows)
                    step_times.append(time.perf_counter() - t0)
                t_dec = time.perf_counter()
                pipe.tokenizer.decode(x)
                end = time.perf_counter()
            return {"text": t_text - start, "step": statistics.fmean(step_times), "steps": steps_to_run,
                    "decode": end - t_dec, "total": end - start}
        return run

    dit_masters = {}
    for precision in p.get("precisions", ["fp32"]):
        set_precision(pipe, precision, dit, masters=dit_masters, query_chunk=p.get("attention_query_chunk", 0))
        for res in p["resolutions"]:
            side = pipe.schedules[res][-1]
            label = f"vs_diffusion {p['model']} {res}px {precision}"
            # like for like: HART's hybrid image alone (one decode), as the DiT makes one image
            hart = hart_runner(pipe, res, p["batch"], decode_discrete=False, cfg=cfg_scale)
            # warm-up 1 is the FLOP-counted run of both (same kernels, untimed by the rounds)
            log(f"{label} warm-up 1/{max(1, p['warmup'])} (FLOP-counted): HART; DiT text + one step + decode")
            hart_macs = pipeline_macs(pipe, resolution=res, num_images=p["batch"], seed=0, decode_discrete=False,
                                      cfg=cfg_scale)
            with torch.inference_mode(), dit_autocast():
                t0 = time.perf_counter()
                encoder_flops, encoded = count_flops(pipe.text_encoder, prompts)
                kv_flops, rows = count_flops(sampler.rows, encoded[0])
                text_flops = encoder_flops + kv_flops
                t1 = time.perf_counter()
                x = sampler.noise(len(prompts), side, torch.Generator().manual_seed(0))
                step_flops, x = count_flops(sampler.step, x, 0, rows)
                t2 = time.perf_counter()
                decode_flops, _ = count_flops(pipe.tokenizer.decode, x)
                t3 = time.perf_counter()
            probe_values = {"text": t1 - t0, "step": t2 - t1, "decode": t3 - t2}
            probe = dit_run(side, sampler, 1)
            for w in range(1, p["warmup"]):
                log(f"{label} warm-up {w + 1}/{p['warmup']}: HART; DiT one step")
                hart()
                probe_values = probe()
            estimate = probe_values["text"] + max(steps_list) * probe_values["step"] + probe_values["decode"]
            extrapolate = estimate > p["dit_max_seconds"]
            if extrapolate:
                k = min(p["dit_timed_steps"], max(steps_list))
                variants = [("hart", hart), ("dit_probe", dit_run(side, sampler, k))]
            else:
                variants = [("hart", hart)] + [(f"dit_{n}", dit_run(side, samplers[n], n)) for n in steps_list]
            log(f"{label}: DiT {max(steps_list)} steps estimated at {estimate:.1f}s -> "
                + (f"time {k} step(s) per round and extrapolate" if extrapolate else "full samples"))
            rounds = interleave(variants, p["repeats"], warmup=0, label=label)
            hart_total = column(rounds["hart"], "total")
            case = {"resolution": res, "precision": precision, "latent_side": side, "tokens_per_row": side * side,
                    "denoiser_rows_per_step": rows["pooled"].shape[0], "extrapolated": extrapolate,
                    "dit_estimate_from_warmup_s": estimate,
                    "hart_latency_s": stats(hart_total), "hart_stages_s": stage_summary(rounds["hart"]),
                    "hart_path": "hybrid image only (decode_discrete=False): one decoder pass, as the DiT",
                    "hart_macs": hart_macs,
                    "dit_macs_per_step": step_flops // 2, "dit_macs_text": text_flops // 2,
                    "dit_macs_text_kv_once": kv_flops // 2,
                    "dit_macs_decode": decode_flops // 2, "steps": {}}
            if extrapolate:
                probe_rounds = rounds["dit_probe"]
                case["dit_timed_steps_per_round"] = probe_rounds[0]["steps"]
                case["dit_step_s"] = stats(column(probe_rounds, "step"))
            for n in steps_list:
                if extrapolate:
                    dit_total = [r["text"] + n * r["step"] + r["decode"] for r in probe_rounds]
                else:
                    dit_total = column(rounds[f"dit_{n}"], "total")
                dit_macs = (text_flops + n * step_flops + decode_flops) // 2
                case["steps"][str(n)] = {
                    "extrapolated": extrapolate,
                    "dit_latency_s": stats(dit_total),
                    "latency_ratio_dit_over_hart": paired_ratio(dit_total, hart_total),
                    "dit_macs": dit_macs,
                    "macs_ratio_dit_over_hart": dit_macs / hart_macs["total"],
                }
            out["cases"].append(case)
    return out


def case_residual_head(p: dict) -> dict:
    """Residual diffusion head at several step counts (and off), interleaved, as a share of
    the whole generation's time and MACs."""
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    out = {"model": p["model"], "model_info": info, "batch": p["batch"], "repeats": p["repeats"],
           "head_width": pipe.transformer.config.diff_width, "head_depth": pipe.transformer.config.diff_depth,
           "default_steps": pipe.sampling_defaults.diffusion_steps, "cases": []}
    for res in p["resolutions"]:
        options = {f"steps_{s}": {"diffusion_steps": s} for s in p["steps"]}
        options["off"] = {"use_residual": False}
        label = f"residual_head {res}px"
        macs = {}
        for name, opts in options.items():  # the FLOP-counted runs double as the first warm-up
            log(f"{label} warm-up 1/{max(1, p['warmup'])} (FLOP-counted): {name}")
            macs[name] = pipeline_macs(pipe, resolution=res, num_images=p["batch"], seed=0, **opts)
        variants = [(name, hart_runner(pipe, res, p["batch"], **opts)) for name, opts in options.items()]
        rounds = interleave(variants, p["repeats"], max(0, p["warmup"] - 1), label=label)
        case = {"resolution": res, "steps": {}}
        for s in p["steps"]:
            r, m = rounds[f"steps_{s}"], macs[f"steps_{s}"]
            case["steps"][str(s)] = {
                "head_s": stats(column(r, "diffusion")),
                "total_s": stats(column(r, "total")),
                "time_share": paired_ratio(column(r, "diffusion"), column(r, "total")),
                "head_macs": m["diffusion"],
                "total_macs": m["total"],
                "macs_share": m["diffusion"] / m["total"],
            }
        case["off"] = {"total_s": stats(column(rounds["off"], "total")), "macs": macs["off"]}
        out["cases"].append(case)
    return out


def case_decode_layout(p: dict) -> dict:
    """The decoder on a contiguous (NCHW) input against a channels-last one, interleaved, per
    precision: the measurement behind `HybridTokenizer.decode` converting its input."""
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    tok = pipe.tokenizer
    out = {"model": p["model"], "model_info": info, "batch": p["batch"], "repeats": p["repeats"], "cases": []}
    for res in p["resolutions"]:
        side = res // tok.config.downsample
        latent = torch.randn(p["batch"], tok.config.z_channels, side, side, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            h = tok.post_quant_conv(latent)
        for precision in p["precisions"]:
            def runner(layout, precision=precision):
                x = h.contiguous(memory_format=layout)

                def run():
                    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16"):
                        tok.decoder(x)
                return run
            rounds = interleave([("contiguous", runner(torch.contiguous_format)),
                                 ("channels_last", runner(torch.channels_last))],
                                p["repeats"], max(1, p["warmup"]), label=f"decode_layout {res}px {precision}")
            before, after = column(rounds["contiguous"], "wall"), column(rounds["channels_last"], "wall")
            out["cases"].append({"resolution": res, "precision": precision, "contiguous_s": stats(before),
                                 "channels_last_s": stats(after), "speedup": paired_ratio(before, after)})
    return out


def case_training(p: dict) -> dict:
    """AR training steps/s (ARLoss forward + backward + grad clip + AdamW) on random tensors,
    with and without last-scale token dropping, interleaved. Data loading, teacher-forcing
    inputs, text encoding and the EMA update of the real loop are left out (same for both)."""
    from hart.presets import get_preset
    from hart.tokenizer import HybridTokenizer
    from hart.transformer import HARTTransformer
    from train.common import bf16_supported
    from train.train_ar import ARLoss, ARTrainConfig, last_scale_keep

    preset = get_preset(p["preset"])
    res = p["resolution"]
    scales = tuple(preset.resolutions[res])
    tf_cfg = preset.transformer
    tf_cfg.patch_nums = scales
    cfg = ARTrainConfig(model_preset=p["preset"], resolution=res, batch_size=p["batch"])
    torch.manual_seed(0)
    transformer = HARTTransformer(tf_cfg)
    tokenizer = HybridTokenizer(preset.tokenizer).requires_grad_(False)
    for block in transformer.blocks:
        block.attn.use_sdpa = cfg.attn_impl == "sdpa"
    loss_module = ARLoss(transformer, tokenizer, cfg).train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    autocast_bf16 = bf16_supported()  # what mixed_precision="auto" picks in training

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
        def run():
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
        "attn_impl": cfg.attn_impl, "diffusion_batch_mul": cfg.diffusion_batch_mul,
        "repeats": p["repeats"],
        "step_s_full": stats(full), "step_s_drop": stats(drop),
        "steps_per_s_full": 1 / statistics.median(full),
        "steps_per_s_drop": 1 / statistics.median(drop),
        "images_per_s_full": B / statistics.median(full),
        "images_per_s_drop": B / statistics.median(drop),
        "speedup_drop_over_full": paired_ratio(full, drop),
    }


CASES = {"generation": case_generation, "vs_diffusion": case_vs_diffusion,
         "residual_head": case_residual_head, "decode_layout": case_decode_layout, "training": case_training}


def run_case(name: str, params: dict, settings: dict, force_subprocess: bool = False) -> dict:
    """Run a case in a fresh interpreter (its peak RSS its own), or here with --in-process."""
    if settings["in_process"] and not force_subprocess:
        set_threads(settings)
        result = CASES[name](params)
        result["process"] = "in-process"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--case", name, "--case-args", json.dumps(params),
               "--case-out", str(out), "--threads", str(settings["threads"])]
        if settings.get("interop_threads"):
            cmd += ["--interop-threads", str(settings["interop_threads"])]
        env = dict(os.environ, OMP_NUM_THREADS=str(settings["threads"]), TOKENIZERS_PARALLELISM="false")
        start = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=sys.stderr)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"benchmark case {name} {params} failed (exit code {proc.returncode})")
        result = json.loads(out.read_text())
    result["process"] = "subprocess"
    result["subprocess_wall_s"] = time.perf_counter() - start
    return result


# =========================================================================== sections

def section_machine(settings: dict) -> dict:
    info = {"cpu_model": platform.processor() or "unknown", "cpu_flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
        info["cpu_flags"] = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16",
                                         "amx_tile", "avx_vnni") if f in flags]
    except OSError:
        pass
    try:
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split()
        info["memory_gb"] = round(int(mem[1]) / 1024 ** 2, 1)
    except (OSError, IndexError, ValueError):
        pass
    info.update({
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn": torch.backends.mkldnn.is_available(),
        "mkl": torch.backends.mkl.is_available(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    })
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    load = (info["load_average_at_start"] or [0])[0]
    info["busy_at_start"] = bool(load > 0.5)
    if info["busy_at_start"]:
        log(f"warning: load average {load:.2f} at start: other work is running, timings will be noisy")
    return info


def section_peak_matmul(settings: dict) -> dict:
    """fp32 GEMM rate at several sizes; bf16 beside it (interleaved) at growing sizes until one
    call exceeds the time cap. Peak = best median."""
    reps, cap = max(settings["repeats"], 3), settings["bf16_cap_s"]
    fp32 = {}
    for n in settings["gemm_sizes"]:
        rounds = interleave([("fp32", gemm_timer(n, torch.float32))], reps, 1, label=f"gemm fp32 {n}")
        fp32[str(n)] = stats(column(rounds["fp32"], "gflops"))
    best = max(fp32, key=lambda k: fp32[k]["median"])
    bf16, side_by_side, stopped = {}, {}, None
    for n in settings["bf16_sizes"]:
        single = gemm_timer(n, torch.bfloat16)()  # also the warm-up
        if single["seconds"] > cap:
            stopped = f"bf16 {n}^3 took {single['seconds']:.2f}s > cap {cap}s: larger sizes skipped"
            bf16[str(n)] = {"median": single["gflops"], "min": single["gflops"], "max": single["gflops"], "n": 1}
            break
        bf_reps = max(1, min(reps, int(cap / max(single["seconds"], 1e-6))))
        rounds = interleave([("fp32", gemm_timer(n, torch.float32)), ("bf16", gemm_timer(n, torch.bfloat16))],
                            bf_reps, 0, label=f"gemm bf16 vs fp32 {n}")
        bf16[str(n)] = stats(column(rounds["bf16"], "gflops"))
        side_by_side[str(n)] = paired_ratio(column(rounds["bf16"], "gflops"), column(rounds["fp32"], "gflops"))
        if single["seconds"] * 8 > cap:
            stopped = f"next bf16 size would take ~{single['seconds'] * 8:.1f}s > cap {cap}s"
            break
    best_bf16 = max(bf16, key=lambda k: bf16[k]["median"])
    return {
        "fp32": {"gflops_by_size": fp32, "peak_gflops": fp32[best]["median"], "peak_size": int(best)},
        "bf16": {"gflops_by_size": bf16, "peak_gflops": bf16[best_bf16]["median"], "peak_size": int(best_bf16),
                 "cap_s": cap, "stopped": stopped, "native_bf16_flags": _native_bf16(),
                 "note": "bf16 sizes grow until one GEMM would exceed cap_s; on CPUs without avx512_bf16/amx "
                         "bf16 GEMMs are emulated and far slower than fp32, so only small sizes are measured"},
        "bf16_over_fp32_side_by_side": side_by_side,
        "flops_per_gemm": "2 n^3",
    }


def _native_bf16() -> list[str]:
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16")})


def _model_resolutions(settings: dict, which: str) -> list[int]:
    from hart.presets import get_preset
    if which == "full":
        available = sorted(get_preset(settings["full_size_preset"]).resolutions)
        missing = [r for r in settings["full_size_resolutions"] if r not in available]
        if missing:
            raise SystemExit(f"--full-resolutions {missing}: preset {settings['full_size_preset']} has {available}")
        return settings["full_size_resolutions"]
    from hart.pipeline import BUNDLED_MODEL
    from hart.checkpoint import read_json
    if settings["tiny"]:
        available = sorted(get_preset("tiny").resolutions)
    elif (BUNDLED_MODEL / "model_index.json").is_file():
        available = sorted(int(r) for r in read_json(BUNDLED_MODEL / "model_index.json")["resolutions"])
    else:
        available = sorted(get_preset("emoji").resolutions)
    wanted = settings["resolutions"]
    return [r for r in available if wanted is None or r in wanted] or available[:1]


def _case_params(settings: dict, which: str, **extra) -> dict:
    full = which == "full"
    return {"model": which, "tiny": settings["tiny"], "full_preset": settings["full_size_preset"],
            "warmup": settings["warmup"], "attention_query_chunk": settings["attention_query_chunk"],
            "repeats": settings["full_size_repeats"] if full else settings["repeats"], **extra}


def section_generation(settings: dict) -> dict:
    out = {}
    for which in ("default", "full"):
        if which == "full" and not settings["full_size"]:
            out["full_size"] = {"skipped": SKIPPED_FULL}
            continue
        cases = []
        batches = settings["batch_sizes"] if which == "default" else [1]
        for precision in settings["precisions"]:
            for res in _model_resolutions(settings, which):
                for batch in batches:
                    log(f"generation: {which} model, {res}px, batch {batch}, {precision} (subprocess)")
                    params = _case_params(settings, which, resolution=res, batch=batch, precision=precision,
                                          gemm_n=settings["gemm_side_by_side"])
                    cases.append(run_case("generation", params, settings, force_subprocess=True))
        info = cases[0]["model_info"] if cases else {}
        out["default_model" if which == "default" else "full_size"] = {"model_info": info, "cases": cases}
    return out


def _per_model(settings: dict, case: str, params_for: Callable[[str], dict]) -> dict:
    """Run `case` for the default model and, unless skipped, the full-size configuration."""
    out = {}
    for which in ("default", "full"):
        key = "default_model" if which == "default" else "full_size"
        if which == "full" and not settings["full_size"]:
            out[key] = {"skipped": SKIPPED_FULL}
            continue
        out[key] = run_case(case, params_for(which), settings)
    return out


def section_vs_diffusion(settings: dict) -> dict:
    return _per_model(settings, "vs_diffusion", lambda which: _case_params(
        settings, which, resolutions=_model_resolutions(settings, which), batch=1, dit_steps=settings["dit_steps"],
        dit_timed_steps=settings["dit_timed_steps"], dit_max_seconds=settings["dit_max_seconds"],
        precisions=settings["precisions"], cfg=settings["cfg"]))


def section_residual_head(settings: dict) -> dict:
    params = _case_params(settings, "default", resolutions=_model_resolutions(settings, "default"), batch=1,
                          steps=settings["residual_steps"])
    return run_case("residual_head", params, settings)


def section_decode_layout(settings: dict) -> dict:
    return _per_model(settings, "decode_layout", lambda which: _case_params(
        settings, which, resolutions=_model_resolutions(settings, which),
        batch=1 if which == "full" else max(settings["batch_sizes"]), precisions=settings["precisions"]))


def section_training(settings: dict) -> dict:
    preset = "tiny" if settings["tiny"] else "emoji"
    from hart.presets import get_preset
    res = max(get_preset(preset).resolutions)
    params = {"preset": preset, "resolution": res, "batch": settings["train_batch"],
              "repeats": settings["repeats"], "warmup": max(1, settings["warmup"])}
    return run_case("training", params, settings)


def section_vs_limit(results: dict) -> dict:
    """Achieved FLOP/s of the AR pass (counted FLOPs / AR time) against the measured peaks."""
    peak = results["peak_matmul"]
    fp32_peak, bf16_peak = peak["fp32"]["peak_gflops"], peak["bf16"]["peak_gflops"]
    rows = []
    for key in ("default_model", "full_size"):
        for case in results["generation"].get(key, {}).get("cases", []):
            achieved = case["ar_achieved_gflops"]["median"]
            rows.append({
                "model": key, "resolution": case["resolution"], "batch": case["batch"],
                "precision": case.get("precision", "fp32"),
                "ar_gflop": 2 * case["macs"]["ar"] / 1e9,
                "ar_s": case["stages_s"]["ar"]["median"],
                "achieved_gflops": achieved,
                "fraction_of_fp32_peak": achieved / fp32_peak,
                "fraction_of_fp32_peak_side_by_side": case["ar_fraction_of_fp32_peak_side_by_side"]["median"],
                "fraction_of_bf16_peak": achieved / bf16_peak,
            })
    return {"fp32_peak_gflops": fp32_peak, "bf16_peak_gflops": bf16_peak,
            "bf16_peak_size": peak["bf16"]["peak_size"], "cases": rows,
            "note": ("AR FLOPs are the matmul/attention FLOPs FlopCounterMode counts in the AR loop (elementwise "
                     "work not counted); the AR pass runs in fp32. side_by_side divides by the fp32 GEMM rate "
                     "measured in the same process, interleaved with the generations. fraction_of_bf16_peak is "
                     "against the small, time-capped bf16 GEMM rate: above 1 means fp32 inference already beats "
                     "what bf16 GEMMs reach on this CPU.")}


# =========================================================================== markdown

def _f(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        value = value.get("median")
    if isinstance(value, (int, float)) and math.isfinite(value):
        size = abs(value)
        if size >= 100:
            return f"{value:,.0f}"
        if size >= 10:
            return f"{value:.1f}"
        if size >= 1:
            return f"{value:.2f}"
        return f"{value:.{digits}g}"
    return str(value)


def _spread(d: dict) -> str:
    """median [min-max] of a stats dict (just the median for a single value)."""
    if not isinstance(d, dict) or d.get("n", 1) < 2:
        return _f(d)
    return f"{_f(d['median'])} [{_f(d['min'])}-{_f(d['max'])}]"


def _g(macs) -> str:
    return "-" if macs is None else f"{macs / 1e9:.3g}"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown(results: dict) -> str:
    parts = []
    s = results.get("settings", {})
    parts.append(f"Run: `{results.get('command', 'python bench/run.py')}` - {results.get('date', '')}, "
                 f"{results.get('elapsed_s', 0):.0f} s; repeats {s.get('repeats')}, warm-up {s.get('warmup')}"
                 + (", **quick**" if s.get("quick") else "") + (", **tiny**" if s.get("tiny") else ""))
    for note in s.get("notes", []):
        parts.append(f"- note: {note}")
    m = results.get("machine")
    if m:
        parts.append("\n### Machine\n")
        parts.append(_table(["CPU", "cpus", "flags", "torch", "threads", "capability", "load at start / end"],
                            [[m.get("cpu_model"), m.get("usable_cpus"), " ".join(m.get("cpu_flags", [])),
                              m.get("torch"), m.get("torch_threads"), m.get("cpu_capability"),
                              f"{_f((m.get('load_average_at_start') or [None])[0])} / "
                              f"{_f((results.get('load_average_at_end') or [None])[0])}"]]))
    pm = results.get("peak_matmul")
    if pm:
        parts.append("\n### Peak matmul (GFLOP/s, median)\n")
        rows = [["fp32", n, _f(v)] for n, v in pm["fp32"]["gflops_by_size"].items()]
        rows += [["bf16", n, _f(v)] for n, v in pm["bf16"]["gflops_by_size"].items()]
        parts.append(_table(["dtype", "n (n^3 GEMM)", "GFLOP/s"], rows))
        parts.append(f"\nfp32 peak {_f(pm['fp32']['peak_gflops'])} GFLOP/s at {pm['fp32']['peak_size']}; bf16 "
                     f"best {_f(pm['bf16']['peak_gflops'])} GFLOP/s at {pm['bf16']['peak_size']} "
                     f"({pm['bf16'].get('stopped') or 'all sizes measured'}).")
    gen = results.get("generation")
    if gen:
        parts.append("\n### Generation\n")
        rows = []
        for key in ("default_model", "full_size"):
            block = gen.get(key, {})
            if "skipped" in block:
                rows.append([key, "-", "-", "-", block["skipped"]] + ["-"] * 8)
            for c in block.get("cases", []):
                st = c["stages_s"]
                rows.append([f"{key} ({c['model_info']['source']})", c["resolution"], c["batch"],
                             c.get("precision", "fp32"), _spread(st["total"]),
                             _f(c["throughput_img_s"]), _f(st["text"]), _f(st["ar"]), _f(st["diffusion"]),
                             _f(st["decode"]), _g(c["macs"]["total"]), f"{c['peak_rss_mb']:.0f}",
                             f"{c['repeats']}"])
        parts.append(_table(["model", "px", "batch", "precision", "latency s [min-max]", "img/s", "text s", "AR s", "res. head s",
                             "decode s", "GMACs", "peak RSS MB", "repeats"], rows))
    vs = results.get("vs_diffusion")
    if vs:
        parts.append("\n### HART vs an equal-size DiT (batch 1, CFG, DiT/HART)\n")
        rows = []
        for key in ("default_model", "full_size"):
            block = vs.get(key, {})
            if "skipped" in block:
                rows.append([key, "-", "-", "-", block["skipped"]] + ["-"] * 6)
                continue
            for c in block.get("cases", []):
                for n, d in c["steps"].items():
                    rows.append([f"{key} ({_f(block['hart_params'] / 1e6)}M vs {_f(block['dit_params'] / 1e6)}M)",
                                 c["resolution"], c.get("precision", "fp32"), n, _f(c["hart_latency_s"]), _f(d["dit_latency_s"]),
                                 _spread(d["latency_ratio_dit_over_hart"]), _g(c["hart_macs"]["total"]),
                                 _g(d["dit_macs"]), _f(d["macs_ratio_dit_over_hart"]),
                                 "yes" if d["extrapolated"] else "no"])
        parts.append(_table(["model (params HART vs DiT)", "px", "precision", "DiT steps", "HART s", "DiT s",
                             "latency ratio [min-max]", "HART GMACs", "DiT GMACs", "MAC ratio",
                             "extrapolated"], rows))
        for key in ("default_model", "full_size"):
            block = vs.get(key, {})
            if "dit_config" in block:
                dc = block["dit_config"]
                parts.append(f"\n{key}: HART transformer {block['hart_params']:,} parameters (residual head "
                             f"included), DiT {block['dit_params']:,} (width {dc['embed_dim']}, depth {dc['depth']}, "
                             f"{dc['num_heads']} heads, MLP hidden {dc['mlp_hidden']}, adaLN-{dc['modulation']}); "
                             f"CFG {block['cfg']}.")
    lim = results.get("vs_limit")
    if lim:
        parts.append(f"\n### AR pass vs measured peak (fp32 peak {_f(lim['fp32_peak_gflops'])} GFLOP/s, "
                     f"bf16 {_f(lim['bf16_peak_gflops'])} GFLOP/s at {lim['bf16_peak_size']})\n")
        rows = [[r["model"], r["resolution"], r["batch"], r.get("precision", "fp32"), _f(r["ar_gflop"]), _f(r["ar_s"]), _f(r["achieved_gflops"]),
                 f"{100 * r['fraction_of_fp32_peak']:.1f}%", f"{100 * r['fraction_of_fp32_peak_side_by_side']:.1f}%",
                 f"{_f(r['fraction_of_bf16_peak'])}x"] for r in lim["cases"]]
        parts.append(_table(["model", "px", "batch", "precision", "AR GFLOP", "AR s", "GFLOP/s", "of fp32 peak",
                             "of fp32 (side by side)", "of bf16 peak"], rows))
    rh = results.get("residual_head")
    if rh:
        parts.append(f"\n### Residual diffusion head ({rh['model_info']['source']}, batch {rh['batch']}, "
                     f"width {rh['head_width']}, depth {rh['head_depth']})\n")
        rows = []
        for c in rh["cases"]:
            for n, d in c["steps"].items():
                rows.append([c["resolution"], n, _f(d["head_s"]), _f(d["total_s"]),
                             f"{100 * d['time_share']['median']:.1f}%",
                             _g(d["head_macs"]), f"{100 * d['macs_share']:.1f}%"])
            rows.append([c["resolution"], "off", "0", _f(c["off"]["total_s"]), "0%", "0", "0%"])
        parts.append(_table(["px", "steps", "head s", "total s", "time share", "head GMACs", "MAC share"], rows))
    dl = results.get("decode_layout")
    if dl:
        parts.append("\n### Decoder memory layout (contiguous vs channels-last input, interleaved)\n")
        rows = []
        for key, section in dl.items():
            for c in section.get("cases", []):
                rows.append([key, c["resolution"], section["batch"], c["precision"], _f(c["contiguous_s"]),
                             _f(c["channels_last_s"]), f"{_f(c['speedup'])}x"])
        parts.append(_table(["model", "px", "batch", "precision", "contiguous s", "channels-last s", "speed-up"],
                            rows))
    tr = results.get("training")
    if tr:
        parts.append(f"\n### AR training ({tr['preset']}, {tr['resolution']}px, batch {tr['batch']}, "
                     f"{tr['precision']})\n")
        parts.append(_table(["variant", "last-scale tokens", "steps/s", "img/s"], [
            ["all tokens", tr["last_scale_tokens"], _f(tr["steps_per_s_full"]), _f(tr["images_per_s_full"])],
            ["last-scale dropping", _f(tr["kept_last_scale_tokens_mean"]), _f(tr["steps_per_s_drop"]),
             _f(tr["images_per_s_drop"])]]))
        parts.append(f"\nSpeed-up from dropping (median of paired rounds): {_f(tr['speedup_drop_over_full'])}x")
    return "\n".join(parts) + "\n"


# =========================================================================== main

def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--out", default="bench.json", help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="fewer repeats, DiT extrapolated, no 0.7B unless --full-size")
    ap.add_argument("--full-size", action="store_true", help="also run the 0.7B configuration in --quick mode")
    ap.add_argument("--full-preset", default="hart-0.7b", help="preset of the full-size configuration")
    ap.add_argument("--full-resolutions", default="", help="full-size resolutions (default 512; 1024 is heavy)")
    ap.add_argument("--tiny", action="store_true", help="tiny preset and tiny DiT (tests)")
    ap.add_argument("--only", default="", help=f"comma-separated sections from {', '.join(SECTIONS)}")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--interop-threads", type=int, default=0, help="torch inter-op threads")
    ap.add_argument("--repeats", type=int, default=0, help="timed rounds (default 5, quick 3)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds")
    ap.add_argument("--full-size-repeats", type=int, default=0,
                    help="timed rounds for the 0.7B configuration (default: repeats, quick 1)")
    ap.add_argument("--batch-sizes", default="", help="generation batch sizes (default 1,4)")
    ap.add_argument("--resolutions", default="", help="default-model resolutions (default: all)")
    ap.add_argument("--dit-steps", default="", help="DiT sampling step counts (default 20,50)")
    ap.add_argument("--dit-timed-steps", type=int, default=0, help="DiT steps timed per round when extrapolating")
    ap.add_argument("--dit-max-seconds", type=float, default=120.0,
                    help="full mode: extrapolate a DiT sample estimated longer than this")
    ap.add_argument("--residual-steps", default="", help="residual head step counts (default 1,4,8,16)")
    ap.add_argument("--train-batch", type=int, default=0, help="training batch (default 16, tiny 4)")
    ap.add_argument("--cfg", type=float, default=None,
                    help="guidance scale for both HART and the DiT in vs_diffusion (default: the model's)")
    ap.add_argument("--precisions", default="", help="generation precisions (default fp32,bf16; bf16 only on "
                                                      "CPUs with native bf16 unless --force-bf16)")
    ap.add_argument("--force-bf16", action="store_true", help="run bf16 generation even without native bf16")
    ap.add_argument("--attention-query-chunk", type=int, default=0,
                    help="> 0: bf16 attention over this many queries or more runs chunked, in HART and the DiT "
                         "alike (HARTPipeline.attention_query_chunk); 0: SDPA")
    ap.add_argument("--bf16-cap-s", type=float, default=0.0, help="stop bf16 GEMM sizes past this many seconds")
    ap.add_argument("--in-process", action="store_true",
                    help="run the non-generation sections in this process (generation cases always get their own)")
    ap.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a result file and exit")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--case-args", help=argparse.SUPPRESS)
    ap.add_argument("--case-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.interop_threads:
        torch.set_num_interop_threads(args.interop_threads)
    if args.case:
        result = CASES[args.case](json.loads(args.case_args))
        Path(args.case_out).write_text(json.dumps(result))
        return 0

    settings = build_settings(args)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    selected = set(wanted) | {"machine"}
    for s in list(selected):
        selected |= set(DEPENDS.get(s, ()))
    started = time.perf_counter()
    results = {"schema": SCHEMA, "command": " ".join(["python", "bench/run.py"] + list(argv if argv is not None
                                                                                       else sys.argv[1:])),
               "date": time.strftime("%Y-%m-%d %H:%M:%S"), "settings": settings,
               "sections": [s for s in SECTIONS if s in selected]}
    out_path = Path(args.out)
    for name in SECTIONS:
        if name not in selected:
            continue
        log(f"section {name}")
        t0 = time.perf_counter()
        if name == "vs_limit":
            results[name] = section_vs_limit(results)
        else:
            results[name] = globals()[f"section_{name}"](settings)
        log(f"section {name} done in {time.perf_counter() - t0:.1f}s")
        results["elapsed_s"] = time.perf_counter() - started
        out_path.write_text(json.dumps(results, indent=1))  # partial results survive a crash later on
    results["load_average_at_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results["elapsed_s"] = time.perf_counter() - started
    out_path.write_text(json.dumps(results, indent=1))
    log(f"wrote {out_path} ({results['elapsed_s']:.0f}s)")
    print(markdown(results), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
