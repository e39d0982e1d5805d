"""HART against an equal-size diffusion transformer (`bench/dit.py`): same latent grid, text
encoder and decoder; DDIM at 20 and 50 steps with batched CFG; batch 1; interleaved rounds; MACs
counted on both sides."""
from __future__ import annotations

from dataclasses import asdict
import statistics
import time
from typing import Callable

import torch

from bench.dit import DDIMSampler, DiT, count_params, match_hart
from bench.flops import count_flops, pipeline_macs
from bench.harness import case_params, hart_runner, load_pipeline, model_resolutions, per_model, set_precision, \
    stage_summary
from bench.measure import PROMPT, column, interleave, log, paired_ratio, stats


def make_dit(pipe) -> tuple[DiT, object]:
    """The DiT sized to the pipeline's transformer, with seeded random weights."""
    cfg = match_hart(pipe.transformer.config)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        dit = DiT(cfg).eval()
    return dit, cfg


def autocast_for(precision: str):
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")


def dit_runner(pipe, prompts: list[str], side: int, sampler: DDIMSampler, steps: int,
               precision: str) -> Callable[[], dict]:
    """One DiT sample per call: text encoder, the text keys/values once, `steps` denoiser steps
    (each timed), one decode. Returns the stage times and the mean step time."""
    def run() -> dict:
        with torch.inference_mode(), autocast_for(precision):
            start = time.perf_counter()
            states, _, _ = pipe.text_encoder(prompts)
            rows = sampler.rows(states)  # text K/V for cond + uncond rows, once per sample
            t_text = time.perf_counter()
            x = sampler.noise(len(prompts), side, torch.Generator().manual_seed(0))
            step_times = []
            for n in range(steps):
                t0 = time.perf_counter()
                x = sampler.step(x, n, rows)
                step_times.append(time.perf_counter() - t0)
            t_dec = time.perf_counter()
            pipe.tokenizer.decode(x)
            end = time.perf_counter()
        return {"text": t_text - start, "step": statistics.fmean(step_times), "steps": steps,
                "decode": end - t_dec, "total": end - start}
    return run


def count_dit(pipe, prompts: list[str], side: int, sampler: DDIMSampler, precision: str) -> tuple[dict, dict]:
    """FLOPs of the DiT's text part, of one denoiser step and of the decode (one untimed sample
    prefix, which doubles as a warm-up), and their wall times."""
    with torch.inference_mode(), autocast_for(precision):
        t0 = time.perf_counter()
        encoder_flops, encoded = count_flops(pipe.text_encoder, prompts)
        kv_flops, rows = count_flops(sampler.rows, encoded[0])
        t1 = time.perf_counter()
        x = sampler.noise(len(prompts), side, torch.Generator().manual_seed(0))
        step_flops, x = count_flops(sampler.step, x, 0, rows)
        t2 = time.perf_counter()
        decode_flops, _ = count_flops(pipe.tokenizer.decode, x)
        t3 = time.perf_counter()
    flops = {"text": encoder_flops + kv_flops, "kv": kv_flops, "step": step_flops, "decode": decode_flops,
             "rows": rows["pooled"].shape[0]}
    return flops, {"text": t1 - t0, "step": t2 - t1, "decode": t3 - t2}


def case_vs_diffusion(p: dict) -> dict:
    """HART's hybrid image against a DiT sample at each step count, per precision and resolution.
    A DiT sample estimated (from its warm-up) to take longer than `dit_max_seconds` is timed for
    `dit_timed_steps` steps per round and extrapolated (every DDIM step costs the same)."""
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    dit, dit_cfg = make_dit(pipe)
    hart_params, dit_params = count_params(pipe.transformer), count_params(dit)
    # the model's default guidance unless --cfg sets one for both sides (cfg 0: no unconditional rows)
    cfg_scale = pipe.sampling_defaults.cfg if p.get("cfg") is None else float(p["cfg"])
    steps_list = sorted(p["dit_steps"])
    longest = max(steps_list)
    sampler = DDIMSampler(dit, longest, cfg_scale)
    samplers = {n: DDIMSampler(dit, n, cfg_scale) for n in steps_list}
    prompts = [PROMPT] * p["batch"]
    out = {"model": p["model"], "model_info": info, "hart_params": hart_params, "dit_params": dit_params,
           "param_ratio_dit_over_hart": dit_params / hart_params, "dit_config": asdict(dit_cfg),
           "cfg": cfg_scale, "residual_cfg": pipe.sampling_defaults.residual_cfg,  # None: the last scale's cfg
           "batch": p["batch"], "repeats": p["repeats"], "cases": []}
    dit_masters: dict = {}
    for precision in p.get("precisions", ["fp32"]):
        set_precision(pipe, precision, dit, masters=dit_masters)
        for res in p["resolutions"]:
            side = pipe.schedules[res][-1]
            label = f"vs_diffusion {p['model']} {res}px {precision}"
            # like for like: HART's hybrid image alone (one decode), as the DiT makes one image
            hart_options = {"decode_discrete": False, "cfg": cfg_scale}
            hart = hart_runner(pipe, res, p["batch"], **hart_options)
            # warm-up 1 is the FLOP-counted run of both (same kernels, untimed by the rounds)
            log(f"{label} warm-up 1/{max(1, p['warmup'])} (FLOP-counted): HART; DiT text + one step + decode")
            hart_macs = pipeline_macs(pipe, resolution=res, num_images=p["batch"], seed=0, **hart_options)
            flops, probe_values = count_dit(pipe, prompts, side, sampler, precision)
            probe = dit_runner(pipe, prompts, side, sampler, 1, precision)
            for w in range(1, p["warmup"]):
                log(f"{label} warm-up {w + 1}/{p['warmup']}: HART; DiT one step")
                hart()
                probe_values = probe()
            estimate = probe_values["text"] + longest * probe_values["step"] + probe_values["decode"]
            extrapolate = estimate > p["dit_max_seconds"]
            if extrapolate:
                k = min(p["dit_timed_steps"], longest)
                variants = [("hart", hart), ("dit_probe", dit_runner(pipe, prompts, side, sampler, k, precision))]
            else:
                variants = [("hart", hart)] + [(f"dit_{n}", dit_runner(pipe, prompts, side, samplers[n], n, precision))
                                               for n in steps_list]
            log(f"{label}: DiT {longest} steps estimated at {estimate:.1f}s -> "
                + (f"time {k} step(s) per round and extrapolate" if extrapolate else "full samples"))
            rounds = interleave(variants, p["repeats"], warmup=0, label=label)
            hart_total = column(rounds["hart"], "total")
            case = {"resolution": res, "precision": precision, "latent_side": side, "tokens_per_row": side * side,
                    "denoiser_rows_per_step": flops["rows"], "extrapolated": extrapolate,
                    "dit_estimate_from_warmup_s": estimate,
                    "hart_latency_s": stats(hart_total), "hart_stages_s": stage_summary(rounds["hart"]),
                    "hart_path": "hybrid image only (decode_discrete=False): one decoder pass, as the DiT",
                    "hart_macs": hart_macs,
                    "dit_macs_per_step": flops["step"] // 2, "dit_macs_text": flops["text"] // 2,
                    "dit_macs_text_kv_once": flops["kv"] // 2,
                    "dit_macs_decode": flops["decode"] // 2, "steps": {}}
            if extrapolate:
                probe_rounds = rounds["dit_probe"]
                case["dit_timed_steps_per_round"] = probe_rounds[0]["steps"]
                case["dit_step_s"] = stats(column(probe_rounds, "step"))
            for n in steps_list:
                if extrapolate:
                    dit_total = [r["text"] + n * r["step"] + r["decode"] for r in probe_rounds]
                else:
                    dit_total = column(rounds[f"dit_{n}"], "total")
                dit_macs = (flops["text"] + n * flops["step"] + flops["decode"]) // 2
                case["steps"][str(n)] = {
                    "extrapolated": extrapolate,
                    "dit_latency_s": stats(dit_total),
                    "latency_ratio_dit_over_hart": paired_ratio(dit_total, hart_total),
                    "dit_macs": dit_macs,
                    "macs_ratio_dit_over_hart": dit_macs / hart_macs["total"],
                }
            out["cases"].append(case)
    return out


def section_vs_diffusion(settings: dict) -> dict:
    return per_model(settings, "vs_diffusion", lambda which: case_params(
        settings, which, resolutions=model_resolutions(settings, which), batch=1, dit_steps=settings["dit_steps"],
        dit_timed_steps=settings["dit_timed_steps"], dit_max_seconds=settings["dit_max_seconds"],
        precisions=settings["precisions"], cfg=settings["cfg"]))
