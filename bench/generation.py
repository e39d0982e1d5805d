"""Generation sections: latency, throughput, stage times, MACs and peak memory per configuration
(`generation`); the residual diffusion head's share at several step counts (`residual_head`);
the decoder on a contiguous vs a channels-last input (`decode_layout`)."""
from __future__ import annotations

import torch

from bench.flops import pipeline_macs
from bench.harness import (case_params, hart_runner, load_pipeline, model_resolutions, per_model, run_case,
                           set_precision, stage_summary)
from bench.measure import (SKIPPED_FULL, column, gemm_timer, interleave, log, paired_ratio, peak_rss_mb,
                           rss_now_mb, stats)


# ---------------------------------------------------------------- generation

def case_generation(p: dict) -> dict:
    """One (model, resolution, batch, precision): latency, throughput, stage times, per-stage MACs,
    peak RSS and, side by side with the generations, the fp32 GEMM rate (for vs_limit).

    The FLOP-counted generation doubles as the first warm-up (same kernels, untimed); the peak
    RSS is read after the warm-ups, before any GEMM buffer exists, so it is the generation's."""
    rss_start = rss_now_mb()
    pipe, info = load_pipeline(p["model"], p["tiny"], p["full_preset"])
    rss_loaded = rss_now_mb()
    res, batch, precision = p["resolution"], p["batch"], p.get("precision", "fp32")
    set_precision(pipe, precision)
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


def section_generation(settings: dict) -> dict:
    """Default model: every resolution, each batch size; full size: its resolutions at batch 1.
    Each configuration in its own subprocess, even with --in-process."""
    out = {}
    for which, key in (("default", "default_model"), ("full", "full_size")):
        if which == "full" and not settings["full_size"]:
            out[key] = {"skipped": SKIPPED_FULL}
            continue
        cases = []
        batches = settings["batch_sizes"] if which == "default" else [1]
        for precision in settings["precisions"]:
            for res in model_resolutions(settings, which):
                for batch in batches:
                    log(f"generation: {which} model, {res}px, batch {batch}, {precision} (subprocess)")
                    params = case_params(settings, which, resolution=res, batch=batch, precision=precision,
                                         gemm_n=settings["gemm_side_by_side"])
                    cases.append(run_case("generation", params, settings, force_subprocess=True))
        out[key] = {"model_info": cases[0]["model_info"] if cases else {}, "cases": cases}
    return out


# ---------------------------------------------------------------- residual head

def case_residual_head(p: dict) -> dict:
    """The residual diffusion head at several step counts (and off), interleaved, as a share of
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


def section_residual_head(settings: dict) -> dict:
    params = case_params(settings, "default", resolutions=model_resolutions(settings, "default"), batch=1,
                         steps=settings["residual_steps"])
    return run_case("residual_head", params, settings)


# ---------------------------------------------------------------- decoder layout

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

                def run() -> None:
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


def section_decode_layout(settings: dict) -> dict:
    return per_model(settings, "decode_layout", lambda which: case_params(
        settings, which, resolutions=model_resolutions(settings, which),
        batch=1 if which == "full" else max(settings["batch_sizes"]), precisions=settings["precisions"]))
