"""Markdown tables from a results JSON (`python bench/run.py --markdown FILE`). Every section is
optional, so partial runs and older result files render too."""
from __future__ import annotations

import math


def fmt(value, digits: int = 3) -> str:
    """A number at a readable precision (the median of a stats dict); "-" for None."""
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


def spread(d) -> str:
    """median [min-max] of a stats dict (the median alone for a single value)."""
    if not isinstance(d, dict) or d.get("n", 1) < 2:
        return fmt(d)
    return f"{fmt(d['median'])} [{fmt(d['min'])}-{fmt(d['max'])}]"


def giga(macs) -> str:
    return "-" if macs is None else f"{macs / 1e9:.3g}"


def percent(fraction: float) -> str:
    return f"{100 * fraction:.1f}%"


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _machine(results: dict, m: dict) -> list[str]:
    load = (f"{fmt((m.get('load_average_at_start') or [None])[0])} / "
            f"{fmt((results.get('load_average_at_end') or [None])[0])}")
    return ["\n### Machine\n", table(
        ["CPU", "cpus", "flags", "torch", "threads", "capability", "load at start / end"],
        [[m.get("cpu_model"), m.get("usable_cpus"), " ".join(m.get("cpu_flags", [])), m.get("torch"),
          m.get("torch_threads"), m.get("cpu_capability"), load]])]


def _peak_matmul(pm: dict) -> list[str]:
    rows = [[dtype, n, fmt(v)] for dtype in ("fp32", "bf16") for n, v in pm[dtype]["gflops_by_size"].items()]
    return ["\n### Peak matmul (GFLOP/s, median)\n", table(["dtype", "n (n^3 GEMM)", "GFLOP/s"], rows),
            f"\nfp32 peak {fmt(pm['fp32']['peak_gflops'])} GFLOP/s at {pm['fp32']['peak_size']}; bf16 best "
            f"{fmt(pm['bf16']['peak_gflops'])} GFLOP/s at {pm['bf16']['peak_size']} "
            f"({pm['bf16'].get('stopped') or 'all sizes measured'})."]


def _generation(gen: dict) -> list[str]:
    rows = []
    for key in ("default_model", "full_size"):
        block = gen.get(key, {})
        if "skipped" in block:
            rows.append([key, "-", "-", "-", block["skipped"]] + ["-"] * 8)
        for c in block.get("cases", []):
            st = c["stages_s"]
            rows.append([f"{key} ({c['model_info']['source']})", c["resolution"], c["batch"],
                         c.get("precision", "fp32"), spread(st["total"]), fmt(c["throughput_img_s"]),
                         fmt(st["text"]), fmt(st["ar"]), fmt(st["diffusion"]), fmt(st["decode"]),
                         giga(c["macs"]["total"]), f"{c['peak_rss_mb']:.0f}", f"{c['repeats']}"])
    return ["\n### Generation\n", table(
        ["model", "px", "batch", "precision", "latency s [min-max]", "img/s", "text s", "AR s", "res. head s",
         "decode s", "GMACs", "peak RSS MB", "repeats"], rows)]


def _vs_diffusion(vs: dict) -> list[str]:
    rows, configs = [], []
    for key in ("default_model", "full_size"):
        block = vs.get(key, {})
        if "skipped" in block:
            rows.append([key, "-", "-", "-", block["skipped"]] + ["-"] * 6)
            continue
        for c in block.get("cases", []):
            for n, d in c["steps"].items():
                rows.append([f"{key} ({fmt(block['hart_params'] / 1e6)}M vs {fmt(block['dit_params'] / 1e6)}M)",
                             c["resolution"], c.get("precision", "fp32"), n, fmt(c["hart_latency_s"]),
                             fmt(d["dit_latency_s"]), spread(d["latency_ratio_dit_over_hart"]),
                             giga(c["hart_macs"]["total"]), giga(d["dit_macs"]), fmt(d["macs_ratio_dit_over_hart"]),
                             "yes" if d["extrapolated"] else "no"])
        if "dit_config" in block:
            dc = block["dit_config"]
            configs.append(f"\n{key}: HART transformer {block['hart_params']:,} parameters (residual head "
                           f"included), DiT {block['dit_params']:,} (width {dc['embed_dim']}, depth {dc['depth']}, "
                           f"{dc['num_heads']} heads, MLP hidden {dc['mlp_hidden']}, adaLN-{dc['modulation']}); "
                           f"CFG {block['cfg']}.")
    return ["\n### HART vs an equal-size DiT (batch 1, CFG, DiT/HART)\n", table(
        ["model (params HART vs DiT)", "px", "precision", "DiT steps", "HART s", "DiT s", "latency ratio [min-max]",
         "HART GMACs", "DiT GMACs", "MAC ratio", "extrapolated"], rows)] + configs


def _vs_limit(lim: dict) -> list[str]:
    rows = [[r["model"], r["resolution"], r["batch"], r.get("precision", "fp32"), fmt(r["ar_gflop"]), fmt(r["ar_s"]),
             fmt(r["achieved_gflops"]), percent(r["fraction_of_fp32_peak"]),
             percent(r["fraction_of_fp32_peak_side_by_side"]), f"{fmt(r['fraction_of_bf16_peak'])}x"]
            for r in lim["cases"]]
    return [f"\n### AR pass vs measured peak (fp32 peak {fmt(lim['fp32_peak_gflops'])} GFLOP/s, "
            f"bf16 {fmt(lim['bf16_peak_gflops'])} GFLOP/s at {lim['bf16_peak_size']})\n",
            table(["model", "px", "batch", "precision", "AR GFLOP", "AR s", "GFLOP/s", "of fp32 peak",
                   "of fp32 (side by side)", "of bf16 peak"], rows)]


def _residual_head(rh: dict) -> list[str]:
    rows = []
    for c in rh["cases"]:
        for n, d in c["steps"].items():
            rows.append([c["resolution"], n, fmt(d["head_s"]), fmt(d["total_s"]), percent(d["time_share"]["median"]),
                         giga(d["head_macs"]), percent(d["macs_share"])])
        rows.append([c["resolution"], "off", "0", fmt(c["off"]["total_s"]), "0%", "0", "0%"])
    return [f"\n### Residual diffusion head ({rh['model_info']['source']}, batch {rh['batch']}, "
            f"width {rh['head_width']}, depth {rh['head_depth']})\n",
            table(["px", "steps", "head s", "total s", "time share", "head GMACs", "MAC share"], rows)]


def _decode_layout(dl: dict) -> list[str]:
    rows = [[key, c["resolution"], section["batch"], c["precision"], fmt(c["contiguous_s"]),
             fmt(c["channels_last_s"]), f"{fmt(c['speedup'])}x"]
            for key, section in dl.items() for c in section.get("cases", [])]
    return ["\n### Decoder memory layout (contiguous vs channels-last input, interleaved)\n",
            table(["model", "px", "batch", "precision", "contiguous s", "channels-last s", "speed-up"], rows)]


def _training(tr: dict) -> list[str]:
    return [f"\n### AR training ({tr['preset']}, {tr['resolution']}px, batch {tr['batch']}, {tr['precision']})\n",
            table(["variant", "last-scale tokens", "steps/s", "img/s"], [
                ["all tokens", tr["last_scale_tokens"], fmt(tr["steps_per_s_full"]), fmt(tr["images_per_s_full"])],
                ["last-scale dropping", fmt(tr["kept_last_scale_tokens_mean"]), fmt(tr["steps_per_s_drop"]),
                 fmt(tr["images_per_s_drop"])]]),
            f"\nSpeed-up from dropping (median of paired rounds): {fmt(tr['speedup_drop_over_full'])}x"]


SECTIONS = (("peak_matmul", _peak_matmul), ("generation", _generation), ("vs_diffusion", _vs_diffusion),
            ("vs_limit", _vs_limit), ("residual_head", _residual_head), ("decode_layout", _decode_layout),
            ("training", _training))


def markdown(results: dict) -> str:
    """The tables of every section present in `results`, headed by the command and settings."""
    s = results.get("settings", {})
    parts = [f"Run: `{results.get('command', 'python bench/run.py')}` - {results.get('date', '')}, "
             f"{results.get('elapsed_s', 0):.0f} s; repeats {s.get('repeats')}, warm-up {s.get('warmup')}"
             + (", **quick**" if s.get("quick") else "") + (", **tiny**" if s.get("tiny") else "")]
    parts += [f"- note: {note}" for note in s.get("notes", [])]
    if results.get("machine"):
        parts += _machine(results, results["machine"])
    for name, render in SECTIONS:
        if results.get(name):
            parts += render(results[name])
    return "\n".join(parts) + "\n"
