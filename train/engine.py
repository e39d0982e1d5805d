"""The training loop every trainer shares: run configs (dataclass <- JSON/YAML file <- command
line), accelerate set-up, the LR schedule, exact resume from atomic checkpoints written by steps
and by minutes, SIGTERM / Ctrl-C stop, the --max-minutes limit, logs and the loss plot.

A trainer builds its model and optimizer, calls `Engine.resume` (before `Engine.prepare`), then
`Engine.run` with its step function, and exports its result when the run finished.

Randomness is keyed by (seed, step, process): every step draws from its own generator, so a
resumed run repeats exactly the draws an uninterrupted run would have made."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
import importlib.util
import json
import math
import os
from pathlib import Path
import shutil
import signal
import sys
import threading
import time
from typing import Any, Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from hart.checkpoint import CheckpointError, load_into, read_weights, write_json, write_weights


@dataclass
class RunConfig:
    """What every trainer's config holds: where the run writes, its schedule and its bookkeeping."""
    out: str = "work/train"
    steps: int = 1000
    schedule_steps: int = 0            # cosine horizon; 0 = steps (more: a run stopped early on a longer schedule)
    lr: float = 3e-4
    warmup: int = 100
    seed: int = 0
    mixed_precision: str = "auto"      # no | bf16 | fp16 | auto (bf16 where the hardware has it)
    log_every: int = 20
    eval_every: int = 0                # 0: evaluate only when the run finishes
    checkpoint_every: int = 500        # 0: by minutes only
    checkpoint_minutes: float = 10.0
    max_minutes: float = 0.0           # stop (with a checkpoint) after this long; 0 = no limit
    resume: bool = True


# fields that may differ between a checkpoint's run and the run resuming it
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "checkpoint_minutes", "log_every", "eval_every", "resume",
                     "max_minutes", "out"}


# ------------------------------------------------------------------ configs

def _parse_value(text: str, kind: Any):
    if isinstance(kind, str) and "|" in kind:  # an optional field ("int | None") parses as its type
        kind = kind.split("|")[0].strip()
    if kind in (bool, "bool"):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise argparse.ArgumentTypeError(f"expected a boolean, got {text!r}")
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        return float(text)
    if isinstance(kind, str) and kind.startswith(("tuple", "list")):
        return tuple(int(v) for v in text.replace(" ", "").strip("()[]").split(",") if v)
    return text


def read_config_file(path: str | Path) -> dict:
    """Config fields from a JSON or YAML file."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        return yaml.safe_load(text) or {}
    return json.loads(text)


def make_config(cls, values: dict, source: str = "config"):
    """`cls(**values)`, naming any field the class does not have."""
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields: {', '.join(sorted(unknown))}")
    return cls(**values)


def load_config(cls, presets: dict, argv: list[str] | None = None, description: str = ""):
    """Config from `--preset NAME`, then `--config FILE` (JSON or YAML), then `--field value` flags."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--preset", default=None, help=f"one of: {', '.join(presets)}")
    parser.add_argument("--config", default=None, help="JSON or YAML file with config fields")
    for f in dataclasses.fields(cls):
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", "str")
        parser.add_argument(f"--{f.name.replace('_', '-')}", dest=f.name, default=None,
                            type=lambda t, k=kind: _parse_value(t, k), help=f"(default {f.default!r})")
    args = parser.parse_args(argv)
    values: dict = {}
    if args.preset:
        if args.preset not in presets:
            parser.error(f"unknown preset {args.preset!r}; choose one of {', '.join(presets)}")
        values.update(dataclasses.asdict(presets[args.preset]))
    if args.config:
        values.update(read_config_file(args.config))
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    try:
        return make_config(cls, values, args.config or "--preset")
    except ValueError as err:
        parser.error(str(err))


def command_line(cls, presets: dict, train: Callable, argv: list[str] | None, doc: str) -> int:
    """A trainer's entry point: its config from the command line, then `train`; prints the result
    (on the process that has one)."""
    result = train(load_config(cls, presets, argv, doc.splitlines()[0]))
    if result:
        print(json.dumps(result))
    return 0


def check_resume_config(saved: dict, current: dict, source: Path, defaults: dict | None = None) -> None:
    """Refuse to resume with a different config. A field the checkpoint lacks (added to the
    config class later) counts as its default value."""
    saved = {**(defaults or {}), **saved}
    # steps may change (stop early, go on longer), the cosine horizon may not: 0 means steps
    saved, current = ({**c, "schedule_steps": c.get("schedule_steps") or c.get("steps")} for c in (saved, current))
    diffs = [k for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(current.get(k))]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
        raise CheckpointError(f"cannot resume from {source}: it was made with another config ({detail})")


def _jsonable(value):
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------ accelerate

def make_accelerator(mixed_precision: str, log_dir: Path | None = None):
    from accelerate import Accelerator
    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16_supported() else "no"
    log_with = "tensorboard" if log_dir is not None and importlib.util.find_spec("tensorboard") else None
    # cpu=True on machines without CUDA: then `accelerate launch --multi_gpu --num_processes N`
    # runs N CPU processes over gloo (accelerate's --cpu launcher starts only one process)
    return Accelerator(mixed_precision=mixed_precision, log_with=log_with,
                       project_dir=str(log_dir) if log_dir else None, cpu=not torch.cuda.is_available())


def bf16_supported() -> bool:
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:  # CPUs with AMX/AVX512-BF16 run bf16 matmuls natively
        flags = Path("/proc/cpuinfo").read_text()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


class StopSignal:
    """SIGTERM / SIGINT ask the training loop to stop after the current step, with a
    checkpoint, instead of killing it mid-step (the work since the last checkpoint is kept)."""

    def __init__(self, accelerator=None):
        self.accelerator = accelerator
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignal":
        if threading.current_thread() is threading.main_thread():  # handlers only install there
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.received = signum

    def requested(self) -> bool:
        """True once any process got a signal (every process agrees, so none waits alone)."""
        flag = self.received is not None
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = bool(self.accelerator.reduce(torch.tensor([float(flag)]), "max").item())
        return flag


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + stream) % (2 ** 63))


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr for every group, times the group's own "lr_multiplier" (if it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)


def clip_gradients(accelerator, model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0 = no clip) and return the norm, so it is logged either way and a clip
    that binds on most steps shows."""
    return accelerator.clip_grad_norm_(model.parameters(), max_norm if max_norm > 0 else math.inf)


def unwrap(accelerator, model: nn.Module) -> nn.Module:
    return accelerator.unwrap_model(model) if accelerator is not None else model


def weights_checksum(module: nn.Module) -> float:
    """A cheap fingerprint of a module's weights (to confirm processes stayed in sync)."""
    return float(sum((p.detach().double() * (i + 1)).sum() for i, p in enumerate(module.parameters())))


def record_process_checksums(accelerator, module: nn.Module, out: Path) -> list[float]:
    values = accelerator.gather(torch.tensor([weights_checksum(module)], dtype=torch.float64,
                                             device=accelerator.device)).cpu().tolist()
    if accelerator.is_main_process:
        write_json({"checksums": values}, Path(out) / "process_checksums.json")
    return values


# ------------------------------------------------------------------ checkpoints

class Checkpointer:
    """Checkpoints under out/checkpoints/step_N, written to a temp folder then renamed; the
    file `latest` names the newest complete one. Older ones are pruned."""

    def __init__(self, out: Path, keep: int = 2):
        self.root = Path(out) / "checkpoints"
        self.keep = keep

    def latest(self) -> Path | None:
        marker = self.root / "latest"
        if not marker.is_file():
            return None
        path = self.root / marker.read_text().strip()
        return path if path.is_dir() else None

    def save(self, step: int, model: nn.Module, ema, optimizer, config: dict, extra: dict | None = None) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / f"step_{step:08d}"
        tmp = self.root / f".tmp_step_{step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        write_weights(model.state_dict(), tmp / "model.safetensors")
        if ema is not None:
            write_weights(ema.shadow, tmp / "ema.safetensors")
        opt_state = optimizer.state_dict()
        # the big moment tensors go to safetensors (one file per kind keeps files small);
        # state.pt keeps the small rest and loads with weights_only=True
        # (state_dict() shares the live per-parameter dicts: build new ones, never mutate them)
        moments, small = {}, {}
        for index, entry in opt_state["state"].items():
            small[index] = {}
            for name, value in entry.items():
                if torch.is_tensor(value) and value.numel() > 1:
                    moments.setdefault(name, {})[str(index)] = value
                else:
                    small[index][name] = value
        for name, tensors in moments.items():
            write_weights(tensors, tmp / f"optimizer_{name}.safetensors")
        torch.save({"optimizer": {**opt_state, "state": small}, "step": step, **(extra or {})}, tmp / "state.pt")
        write_json(config, tmp / "config.json")
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = self.root / "latest.tmp"
        marker_tmp.write_text(final.name)
        os.replace(marker_tmp, self.root / "latest")
        for old in sorted(self.root.glob("step_*"))[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: Path, model: nn.Module, ema, optimizer, config) -> dict:
        """Restore a checkpoint into model/EMA/optimizer; `config` is the run's config dataclass."""
        path = Path(path)
        saved = json.loads((path / "config.json").read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        check_resume_config(saved, dataclasses.asdict(config), path, defaults)
        load_into(model, read_weights(path / "model.safetensors"), str(path / "model.safetensors"))
        if ema is not None:
            ema.shadow = {k: v.float() for k, v in read_weights(path / "ema.safetensors").items()}
        try:
            state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"corrupt training state {path / 'state.pt'}: {err}") from err
        for file in path.glob("optimizer_*.safetensors"):
            name = file.stem[len("optimizer_"):]
            for index, tensor in read_weights(file).items():
                state["optimizer"]["state"][int(index)][name] = tensor
        optimizer.load_state_dict(state["optimizer"])
        return state


# ------------------------------------------------------------------ logs

class RunLog:
    """JSONL metrics (one line per logged step) plus optional accelerate trackers."""

    def __init__(self, out: Path, accelerator=None, resume_step: int = 0):
        self.path = Path(out) / "log.jsonl"
        self.accelerator = accelerator
        if self.path.exists():  # drop lines from after the checkpoint we resume from
            kept = [l for l in self.path.read_text().splitlines() if l and json.loads(l).get("step", 0) <= resume_step]
            self.path.write_text("".join(l + "\n" for l in kept))
        self.started = time.time()

    def write(self, step: int, **metrics) -> None:
        record = {"step": step, "time": round(time.time() - self.started, 2), **metrics}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def records(self) -> list[dict]:
        return self.read(self.path)

    @staticmethod
    def read(path: Path) -> list[dict]:
        path = Path(path)
        return [json.loads(l) for l in path.read_text().splitlines() if l] if path.exists() else []


def logged_seconds(path: Path) -> float:
    """Wall time behind a run's log.jsonl, summed over every process that wrote to it: each resumed
    process restarts `time` at 0, so a drop in `time` starts a new process's span."""
    records = RunLog.read(path)
    total = 0.0
    for before, after in zip(records, records[1:] + [None]):
        if after is None or after["time"] < before["time"]:
            total += before["time"]
    return total


def plot_curves(records: list[dict], keys: list[str], path: Path, size=(640, 360)) -> None:
    """A small loss-curve PNG drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    colors = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e"]
    margin = 40
    series = {k: [(r["step"], r[k]) for r in records if isinstance(r.get(k), (int, float))] for k in keys}
    points = [p for s in series.values() for p in s]
    if not points:
        return
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1, y0, y1 = min(xs), max(xs) or 1, min(ys), max(ys)
    span_x, span_y = max(x1 - x0, 1), max(y1 - y0, 1e-9)
    draw.rectangle([margin, 10, size[0] - 10, size[1] - margin], outline="black")
    for i, (key, pts) in enumerate(series.items()):
        coords = [(margin + (x - x0) / span_x * (size[0] - margin - 10),
                   size[1] - margin - (y - y0) / span_y * (size[1] - margin - 10)) for x, y in pts]
        if len(coords) > 1:
            draw.line(coords, fill=colors[i % len(colors)], width=2)
        draw.text((margin + 5, 12 + 12 * i), key, fill=colors[i % len(colors)])
    draw.text((margin, size[1] - margin + 5), f"step {x0} .. {x1}", fill="black")
    draw.text((2, 12), f"{y1:.3g}", fill="black")
    draw.text((2, size[1] - margin - 12), f"{y0:.3g}", fill="black")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _loggable(value):
    if torch.is_tensor(value):
        value = value.item()
    return round(value, 5) if isinstance(value, float) else value


# ------------------------------------------------------------------ the loop

class NonFiniteStep(RuntimeError):
    """A step's loss or gradient norm was NaN or infinite (the run stops before saving it)."""


class Engine:
    """One training run: accelerate, resume, the step loop with its checkpoints, stops and logs."""

    def __init__(self, cfg: RunConfig, name: str):
        self.cfg, self.name, self.out = cfg, name, Path(cfg.out)
        self.accelerator = make_accelerator(cfg.mixed_precision, log_dir=self.out)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        self.is_main = self.accelerator.is_main_process
        self.checkpointer = Checkpointer(self.out)
        self.config_dict = dataclasses.asdict(cfg)
        self.start_step = 0
        self.log: RunLog | None = None

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def resume(self, model: nn.Module, optimizer, ema=None) -> dict:
        """Restore the newest checkpoint (unless --resume false) into the unwrapped model, EMA and
        optimizer, before `prepare`. Returns its saved state ({} for a fresh run)."""
        latest = self.checkpointer.latest() if self.cfg.resume else None
        if latest is None:
            return {}
        state = Checkpointer.load(latest, model, ema, optimizer, self.cfg)
        self.start_step = state["step"]
        self.print(f"resumed from {latest} at step {self.start_step}")
        return state

    def prepare(self, *objects):
        """accelerate's prepare; then the log (trimmed to the resumed step) and config.json open."""
        prepared = self.accelerator.prepare(*objects)
        if self.is_main:
            self.log = RunLog(self.out, self.accelerator, self.start_step)
            write_json(self.config_dict, self.out / "config.json")
        return prepared

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        return cfg.lr * cosine_lr(step, cfg.schedule_steps or cfg.steps, cfg.warmup)

    def is_log_step(self, step: int) -> bool:
        return self.log is not None and (step + 1) % self.cfg.log_every == 0

    def run(self, train_step: Callable[[int, torch.Generator], dict | None], optimizer,
            saved: Callable[[], nn.Module], ema=None, extra_state: Callable[[], dict] | None = None,
            evaluate: Callable[[int], None] | None = None) -> dict:
        """Steps start_step .. steps - 1. Each sets the scheduled lr and calls train_step(step,
        generator), whose metrics are logged on log steps; a checkpoint of saved() (with `ema`,
        the optimizer and extra_state()) is written every checkpoint_every steps, every
        checkpoint_minutes, at the end and when stopped; `evaluate(step)` runs on the main process
        every eval_every steps. Returns {"step": reached}, plus "stopped_by_signal" when a signal
        ended it (then there is nothing to export)."""
        cfg, acc = self.cfg, self.accelerator
        started = last_checkpoint = time.time()
        step = self.start_step
        bar = tqdm(range(self.start_step, cfg.steps), initial=self.start_step, total=cfg.steps,
                   disable=not self.is_main, desc=self.name)
        with StopSignal(acc) as stop:
            for step in bar:
                set_lr(optimizer, self.lr_at(step))
                metrics = train_step(step, step_generator(cfg.seed, step, self.rank))
                self._check_finite(metrics, step)
                if metrics is not None and self.is_log_step(step):
                    values = {k: _loggable(v) for k, v in metrics.items()}
                    speed = (step + 1 - self.start_step) / (time.time() - started)
                    self.log.write(step + 1, **values, lr=round(self.lr_at(step), 8), steps_per_s=round(speed, 3))
                    bar.set_postfix({k: v for k, v in list(values.items())[:3] if isinstance(v, float)})
                done = step + 1 == cfg.steps
                out_of_time = (cfg.max_minutes and (time.time() - started) / 60 >= cfg.max_minutes) or stop.requested()
                due = ((cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)
                       or (time.time() - last_checkpoint) / 60 >= cfg.checkpoint_minutes)
                if self.is_main and (done or out_of_time or due):
                    self.checkpointer.save(step + 1, saved(), ema, optimizer, self.config_dict,
                                           extra_state() if extra_state else None)
                    last_checkpoint = time.time()
                if self.is_main and evaluate and cfg.eval_every and (step + 1) % cfg.eval_every == 0 and not done:
                    evaluate(step + 1)
                acc.wait_for_everyone()
                if out_of_time:
                    break
            step = step + 1 if cfg.steps > self.start_step else self.start_step
        if stop.received is not None:
            if self.is_main:
                print(f"stopped by signal {stop.received} after step {step}: checkpoint saved; "
                      "run the same command again to resume", file=sys.stderr, flush=True)
            acc.end_training()
            return {"step": step, "stopped_by_signal": stop.received}
        return {"step": step}

    def _check_finite(self, metrics: dict | None, step: int) -> None:
        """Stop before a non-finite loss or gradient norm (whose update has made the weights NaN)
        reaches a checkpoint: the checkpoints on disk keep the last finite weights, so lowering the
        lr or clipping and rerunning resumes from them."""
        watched = {k: v for k, v in (metrics or {}).items() if k in ("loss", "grad_norm") and v is not None}
        if not watched:
            return
        bad = torch.tensor(float(not all(torch.isfinite(torch.as_tensor(v)).all() for v in watched.values())),
                           device=self.accelerator.device)  # NCCL reduces device tensors only
        if self.world > 1:
            bad = self.accelerator.reduce(bad, "sum")
        if bad.item():
            latest = self.checkpointer.latest()
            raise NonFiniteStep(f"{self.name}: the loss or gradient is not finite at step {step + 1}; nothing from "
                                f"this step on was saved, the last checkpoint is {latest or 'none (a fresh run)'}. "
                                "Lower --lr or set a gradient clip, then rerun to resume from it.")

    def finish(self, module: nn.Module, plot_keys: list[str]) -> None:
        """After the export: the loss plot, every process's weight checksum, accelerate's end."""
        if self.log is not None:
            plot_curves(self.log.records(), plot_keys, self.out / "loss.png")
        record_process_checksums(self.accelerator, module, self.out)
        self.accelerator.end_training()
