"""HART benchmark suite: one run, one JSON.

    python bench/run.py --out bench.json                     # full run (machine idle)
    python bench/run.py --quick --out bench.json             # < 10 min on an idle 2-core CPU
    python bench/run.py --quick --full-size --out bench.json # quick, plus the 0.7B shapes
    python bench/run.py --only generation,vs_limit --out g.json
    python bench/run.py --markdown bench.json                # print the markdown tables of a result
    (python -m bench ... takes the same flags)

Sections (BENCHMARKS.md says what each measures and how):
  machine, peak_matmul, generation, vs_diffusion, vs_limit, residual_head, decode_layout, training

Method. Every comparison is taken side by side: the variants being compared run in rounds
(A B, then B A, ...) after warm-up, and a ratio is the median of the per-round ratios.
FLOPs are counted with torch.utils.flop_counter.FlopCounterMode (plus a rule for the CPU
attention kernel, which it does not know); MACs = FLOPs / 2. Each generation configuration
runs in its own subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
import sys
import time

from bench.measure import build_settings, load_average, log, section_machine, set_threads

SCHEMA = "hart-bench/1"
# section -> "module:function" (vs_limit takes the results so far, every other one the settings)
SECTIONS = {
    "machine": "bench.measure:section_machine",
    "peak_matmul": "bench.vs_limit:section_peak_matmul",
    "generation": "bench.generation:section_generation",
    "vs_diffusion": "bench.vs_diffusion:section_vs_diffusion",
    "vs_limit": "bench.vs_limit:section_vs_limit",
    "residual_head": "bench.generation:section_residual_head",
    "decode_layout": "bench.generation:section_decode_layout",
    "training": "bench.training:section_training",
}
DEPENDS = {"vs_limit": ("peak_matmul", "generation")}


def parse_args(argv=None):
    from bench.harness import CASES
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
    ap.add_argument("--bf16-cap-s", type=float, default=0.0, help="stop bf16 GEMM sizes past this many seconds")
    ap.add_argument("--in-process", action="store_true",
                    help="run the non-generation sections in this process (generation cases always get their own)")
    ap.add_argument("--markdown", metavar="JSON", help="print the markdown tables of a result file and exit")
    ap.add_argument("--case", choices=sorted(CASES), help=argparse.SUPPRESS)
    ap.add_argument("--case-args", help=argparse.SUPPRESS)
    ap.add_argument("--case-out", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def section_function(name: str):
    import importlib
    module, function = SECTIONS[name].split(":")
    return getattr(importlib.import_module(module), function)


def selected_sections(only: str) -> list[str]:
    """The sections asked for, the machine section and what they depend on, in running order."""
    wanted = [s.strip() for s in only.split(",") if s.strip()] or list(SECTIONS)
    unknown = [s for s in wanted if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    selected = set(wanted) | {"machine"}
    for s in list(selected):
        selected |= set(DEPENDS.get(s, ()))
    return [s for s in SECTIONS if s in selected]


def main(argv=None, prog: str = "python bench/run.py") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.markdown:
        from bench.report import markdown
        print(markdown(json.loads(Path(args.markdown).read_text())), end="")
        return 0
    set_threads(args.threads, args.interop_threads)
    if args.case:  # one measurement case, in the subprocess the parent started
        from bench.harness import case_function
        result = case_function(args.case)(json.loads(args.case_args))
        Path(args.case_out).write_text(json.dumps(result))
        return 0

    settings = build_settings(args)
    sections = selected_sections(args.only)
    started = time.perf_counter()
    results = {"schema": SCHEMA, "command": " ".join([prog] + argv), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
               "settings": settings, "sections": sections}
    out_path = Path(args.out)
    for name in sections:
        log(f"section {name}")
        t0 = time.perf_counter()
        run_section = section_machine if name == "machine" else section_function(name)
        results[name] = run_section(results if name == "vs_limit" else settings)
        log(f"section {name} done in {time.perf_counter() - t0:.1f}s")
        results["elapsed_s"] = time.perf_counter() - started
        out_path.write_text(json.dumps(results, indent=1))  # partial results survive a crash later on
    results["load_average_at_end"] = load_average()
    results["elapsed_s"] = time.perf_counter() - started
    out_path.write_text(json.dumps(results, indent=1))
    log(f"wrote {out_path} ({results['elapsed_s']:.0f}s)")
    from bench.report import markdown
    print(markdown(results), end="")
    return 0
