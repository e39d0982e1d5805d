"""The machine's matmul peak (`peak_matmul`) and the AR pass's achieved FLOP rate against it
(`vs_limit`)."""
from __future__ import annotations

import torch

from bench.measure import column, gemm_timer, interleave, native_bf16, paired_ratio, stats

LIMIT_NOTE = ("AR FLOPs are the matmul/attention FLOPs FlopCounterMode counts in the AR loop (elementwise work "
              "not counted). side_by_side divides by the fp32 GEMM rate measured in the same process, "
              "interleaved with the generations. fraction_of_bf16_peak is against the time-capped bf16 GEMM "
              "rate of peak_matmul.")


def section_peak_matmul(settings: dict) -> dict:
    """fp32 GEMM rate at several sizes; bf16 beside fp32 (interleaved) at growing sizes until one
    call would exceed the time cap. Peak = best median."""
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
            bf16[str(n)] = stats([single["gflops"]])
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
                 "cap_s": cap, "stopped": stopped, "native_bf16_flags": native_bf16(),
                 "note": "bf16 sizes grow until one GEMM would exceed cap_s; on CPUs without avx512_bf16/amx "
                         "bf16 GEMMs are emulated and far slower than fp32, so only small sizes are measured"},
        "bf16_over_fp32_side_by_side": side_by_side,
        "flops_per_gemm": "2 n^3",
    }


def section_vs_limit(results: dict) -> dict:
    """Achieved FLOP/s of the AR pass (counted AR FLOPs / AR time) of every generation case,
    against the measured peaks (needs the peak_matmul and generation sections of `results`)."""
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
            "bf16_peak_size": peak["bf16"]["peak_size"], "cases": rows, "note": LIMIT_NOTE}
