"""Shared measuring helpers: settings, threads, interleaved timing rounds, statistics, paired
ratios, memory readings, the GEMM timer and the machine description."""
from __future__ import annotations

import os
from pathlib import Path
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a smiling yellow cat face"
SKIPPED_FULL = "not run: --quick/--tiny without --full-size"
PRECISIONS = ("fp32", "bf16")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile", "avx_vnni")


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- settings

def int_list(text: str | None) -> list[int] | None:
    """"1,4" -> [1, 4]; empty or None -> None (the default applies)."""
    if not text:
        return None
    return [int(part) for part in str(text).split(",") if part.strip()]


def native_bf16() -> list[str]:
    """The CPU flags that give bf16 matmuls their own units (empty: bf16 is emulated)."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return []
    return sorted({f for f in flags if f in ("avx512_bf16", "amx_bf16")})


def build_settings(args) -> dict:
    """Every knob of a run, resolved from the command line (stored in the JSON as `settings`)."""
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
        "batch_sizes": int_list(args.batch_sizes) or [1, 4],
        "resolutions": int_list(args.resolutions),          # None: every resolution of the model
        "full_size_preset": args.full_preset,
        "full_size_resolutions": int_list(args.full_resolutions) or [512],
        "dit_steps": int_list(args.dit_steps) or [20, 50],
        "dit_timed_steps": args.dit_timed_steps or (2 if tiny else 3),
        # a DiT sample estimated to take longer than this is extrapolated; quick: always
        "dit_max_seconds": 0.0 if quick else args.dit_max_seconds,
        "residual_steps": int_list(args.residual_steps) or [1, 4, 8, 16],
        "train_batch": args.train_batch or (4 if tiny else 16),
        "gemm_sizes": [256, 512] if tiny else [512, 1024, 2048],
        "gemm_side_by_side": 512 if tiny else 2048,
        "bf16_sizes": [64, 128, 256] if tiny else [128, 256, 512, 1024, 2048],
        "bf16_cap_s": args.bf16_cap_s or (0.5 if tiny else 1.0 if quick else 3.0),
        "in_process": args.in_process,
        "prompt": PROMPT,
        "cfg": args.cfg,                                      # None: each model's default
    }
    wanted = [v.strip() for v in (args.precisions or "fp32,bf16").split(",") if v.strip()]
    bad = [v for v in wanted if v not in PRECISIONS]
    if bad:
        raise SystemExit(f"--precisions {bad}: choose from {', '.join(PRECISIONS)}")
    native = bool(native_bf16())
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


def set_threads(threads: int, interop_threads: int = 0) -> None:
    """torch intra-op threads, and inter-op threads when asked (settable only before any
    inter-op work has run: a later attempt is ignored)."""
    if threads:
        torch.set_num_threads(int(threads))
    if interop_threads:
        try:
            torch.set_num_interop_threads(int(interop_threads))
        except RuntimeError:
            pass


# ---------------------------------------------------------------- timing rounds and statistics

def interleave(variants: list[tuple[str, Callable[[], dict | None]]], repeats: int, warmup: int,
               label: str = "") -> dict[str, list[dict]]:
    """Run the variants in rounds after `warmup` untimed rounds, reversing the order every other
    round (A B, then B A, ...). A call may return measured values (a dict); its wall time is
    added as "wall". Returns, per variant, one dict per timed round."""
    for w in range(warmup):
        for name, fn in variants:
            log(f"{label} warm-up {w + 1}/{warmup}: {name}")
            fn()
    rounds: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for r in range(repeats):
        for name, fn in (variants if r % 2 == 0 else variants[::-1]):
            start = time.perf_counter()
            values = dict(fn() or {})
            values.setdefault("wall", time.perf_counter() - start)
            rounds[name].append(values)
        log(f"{label} round {r + 1}/{repeats}: " +
            ", ".join(f"{name} {rounds[name][-1]['wall']:.3f}s" for name, _ in variants))
    return rounds


def stats(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def column(rounds: list[dict], key: str) -> list[float]:
    return [r[key] for r in rounds]


def paired_ratio(numerator: list[float], denominator: list[float]) -> dict:
    """Statistics of the per-round ratios numerator[r] / denominator[r] (both from the same rounds)."""
    return stats([a / b for a, b in zip(numerator, denominator)])


def gemm_timer(n: int, dtype: torch.dtype) -> Callable[[], dict]:
    """One n x n x n matmul per call (2 n^3 FLOPs); returns its seconds and GFLOP/s."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    flops = 2 * n ** 3

    def run() -> dict:
        start = time.perf_counter()
        torch.mm(a, b)
        seconds = time.perf_counter() - start
        return {"seconds": seconds, "gflops": flops / seconds / 1e9}
    return run


# ---------------------------------------------------------------- memory

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


# ---------------------------------------------------------------- machine

def load_average() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def section_machine(settings: dict | None = None) -> dict:
    """CPU model and flags, memory, torch build and threads, load average, git commit."""
    info = {"cpu_model": platform.processor() or "unknown", "cpu_flags": []}
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        info["cpu_model"] = next((line.split(":", 1)[1].strip() for line in lines
                                  if line.startswith("model name")), info["cpu_model"])
        flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        info["cpu_flags"] = [f for f in CPU_FLAGS if f in flags]
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
        "load_average_at_start": load_average(),
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
