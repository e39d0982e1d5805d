"""What the sections share: loading the models, precision, the HART runner, and running a
measurement case in its own interpreter (`python -m bench --case NAME ...`) so that its peak
memory is its own."""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from bench.measure import PROMPT, ROOT, SKIPPED_FULL, column, set_threads, stats

# case name -> "module:function"; a case takes a dict of parameters and returns a JSON-able dict
CASES = {
    "generation": "bench.generation:case_generation",
    "residual_head": "bench.generation:case_residual_head",
    "decode_layout": "bench.generation:case_decode_layout",
    "vs_diffusion": "bench.vs_diffusion:case_vs_diffusion",
    "training": "bench.training:case_training",
}


def case_function(name: str) -> Callable[[dict], dict]:
    module, function = CASES[name].split(":")
    return getattr(importlib.import_module(module), function)


def run_case(name: str, params: dict, settings: dict, force_subprocess: bool = False) -> dict:
    """Run a case in a fresh interpreter (its peak RSS its own), or here with --in-process."""
    if settings["in_process"] and not force_subprocess:
        set_threads(settings["threads"], settings.get("interop_threads"))
        result = case_function(name)(params)
        result["process"] = "in-process"
        return result
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "case.json"
        cmd = [sys.executable, "-m", "bench", "--case", name, "--case-args", json.dumps(params),
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


# ---------------------------------------------------------------- models

def load_pipeline(which: str, tiny: bool, full_preset: str = "hart-0.7b"):
    """which: "default" (the bundled model if present, else the emoji preset; the tiny preset
    with --tiny) or "full" (the 0.7B preset, random weights). Returns (pipeline, description)."""
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


def set_precision(pipe, precision: str, *others: torch.nn.Module, masters: dict | None = None) -> None:
    """fp32, or bf16 autocast with the matmul weights held in bf16 (the pipeline's own way).
    `others` (e.g. the DiT baseline) get the same treatment, their fp32 copies kept in `masters`."""
    from hart.pipeline import hold_matmul_weights
    dtype = torch.bfloat16 if precision == "bf16" else None
    pipe.autocast_dtype = dtype
    if others:
        hold_matmul_weights(others, dtype, masters)


def hart_runner(pipe, resolution: int, batch: int, **options) -> Callable[[], dict]:
    """One generation per call; returns the pipeline's own stage timings."""
    def run() -> dict:
        result = pipe(PROMPT, resolution=resolution, num_images=batch, seed=0, **options)
        return dict(result.timings)
    return run


def stage_summary(rounds: list[dict]) -> dict:
    return {k: stats(column(rounds, k)) for k in ("text", "ar", "diffusion", "decode", "total", "wall")}


def model_resolutions(settings: dict, which: str) -> list[int]:
    """The resolutions a section measures for the default model or the full-size preset."""
    from hart.presets import get_preset
    if which == "full":
        available = sorted(get_preset(settings["full_size_preset"]).resolutions)
        missing = [r for r in settings["full_size_resolutions"] if r not in available]
        if missing:
            raise SystemExit(f"--full-resolutions {missing}: preset {settings['full_size_preset']} has {available}")
        return settings["full_size_resolutions"]
    from hart.checkpoint import read_json
    from hart.pipeline import BUNDLED_MODEL
    if settings["tiny"]:
        available = sorted(get_preset("tiny").resolutions)
    elif (BUNDLED_MODEL / "model_index.json").is_file():
        available = sorted(int(r) for r in read_json(BUNDLED_MODEL / "model_index.json")["resolutions"])
    else:
        available = sorted(get_preset("emoji").resolutions)
    wanted = settings["resolutions"]
    return [r for r in available if wanted is None or r in wanted] or available[:1]


def case_params(settings: dict, which: str, **extra) -> dict:
    """The parameters every per-model case takes, plus the case's own."""
    full = which == "full"
    return {"model": which, "tiny": settings["tiny"], "full_preset": settings["full_size_preset"],
            "warmup": settings["warmup"],
            "repeats": settings["full_size_repeats"] if full else settings["repeats"], **extra}


def per_model(settings: dict, case: str, params_for: Callable[[str], dict]) -> dict:
    """Run `case` for the default model and, unless skipped, the full-size configuration."""
    out = {}
    for which, key in (("default", "default_model"), ("full", "full_size")):
        if which == "full" and not settings["full_size"]:
            out[key] = {"skipped": SKIPPED_FULL}
            continue
        out[key] = run_case(case, params_for(which), settings)
    return out
