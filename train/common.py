"""What both trainers share: run configs (dataclass <- JSON/YAML file <- command line),
accelerate set-up, EMA, the LR schedule, atomic checkpoints with exact resume, and logs.

Randomness is keyed by (seed, step, process): every step draws from its own generator, so a
resumed run repeats exactly the draws an uninterrupted run would have made."""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
from pathlib import Path
import shutil
import signal
import sys
import time
from typing import Any

import torch
import torch.nn as nn

from hart.checkpoint import (CheckpointError, load_into, load_matching, read_weights, write_json,
                             write_weights)

# fields that may differ between a checkpoint's run and the run resuming it
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "checkpoint_minutes", "log_every", "eval_every", "resume",
                     "max_minutes", "out"}
# Fields a config class no longer has, with the value that meant "off": checkpoints that saved that
# value still resume (train_ar's head_only moved to train_head in session 9).
RETIRED_FIELDS = {"head_only": False}


# ------------------------------------------------------------------ configs

def _parse_value(text: str, kind: Any):
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
        text = Path(args.config).read_text()
        if args.config.endswith((".yaml", ".yml")):
            import yaml
            values.update(yaml.safe_load(text) or {})
        else:
            values.update(json.loads(text))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        parser.error(f"unknown config fields: {', '.join(sorted(unknown))}")
    values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    return cls(**values)


def check_resume_config(saved: dict, current: dict, source: Path, defaults: dict | None = None) -> None:
    """Refuse to resume with a different config. A field the checkpoint lacks (added to the
    config class later) counts as its default value."""
    saved = {**(defaults or {}), **saved}
    for name, off in RETIRED_FIELDS.items():
        if name not in current and saved.get(name) == off:
            del saved[name]
    diffs = [k for k in sorted(set(saved) | set(current))
             if k not in RESUMABLE_CHANGES and _jsonable(saved.get(k)) != _jsonable(current.get(k))]
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {current.get(k)!r}" for k in diffs)
        raise CheckpointError(f"cannot resume from {source}: it was made with another config ({detail})")


def _jsonable(value):
    return json.loads(json.dumps(value))


# ------------------------------------------------------------------ accelerate

def make_accelerator(mixed_precision: str, grad_accum: int = 1, log_dir: Path | None = None):
    from accelerate import Accelerator
    if mixed_precision == "auto":
        mixed_precision = "bf16" if bf16_supported() else "no"
    import importlib.util
    log_with = "tensorboard" if log_dir is not None and importlib.util.find_spec("tensorboard") else None
    # cpu=True on machines without CUDA: then `accelerate launch --multi_gpu --num_processes N`
    # runs N CPU processes over gloo (accelerate's --cpu launcher starts only one process)
    return Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=grad_accum,
                       log_with=log_with, project_dir=str(log_dir) if log_dir else None,
                       cpu=not torch.cuda.is_available())


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
        import threading
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

    def finish(self, step: int) -> dict:
        """Say where training stopped and end it (the checkpoint is already written)."""
        if self.accelerator.is_main_process:
            print(f"stopped by signal {self.received} after step {step}: checkpoint saved; "
                  "run the same command again to resume", file=sys.stderr, flush=True)
        self.accelerator.end_training()
        return {"step": step, "stopped_by_signal": self.received}

    def requested(self) -> bool:
        """True once any process got a signal (every process agrees, so none waits alone)."""
        flag = self.received is not None
        if self.accelerator is not None and self.accelerator.num_processes > 1:
            flag = bool(self.accelerator.reduce(torch.tensor([float(flag)]), "max").item())
        return flag


def step_generator(seed: int, step: int, rank: int = 0, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7919 + rank * 104_729 + stream) % (2 ** 63))


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 65_537 + epoch))


def batch_indices(n: int, batch_size: int, step: int, seed: int, rank: int = 0, world: int = 1) -> torch.Tensor:
    """Data indices of this process's share of global batch `step` (epochs reshuffled, no state)."""
    global_batch = batch_size * world
    per_epoch = max(1, n // global_batch)
    epoch, offset = divmod(step, per_epoch)
    order = epoch_order(n, seed, epoch)
    start = offset * global_batch + rank * batch_size
    return order[start:start + batch_size] if n >= global_batch else order[torch.arange(start, start + batch_size) % n]


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def hash_weights(digest, module: nn.Module, skip_prefix: str | None = None) -> None:
    """Feed every tensor of `module` (name and values, in name order) into a hashlib digest, so a
    cache file named by the digest is rebuilt when the weights change."""
    for k, v in sorted(module.state_dict().items()):
        if skip_prefix is None or not k.startswith(skip_prefix):
            digest.update(k.encode())
            digest.update(v.detach().float().cpu().numpy().tobytes())


def adamw_decaying_matrices(module: nn.Module, lr: float, weight_decay: float,
                            lr_multipliers: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, with weight decay on weight matrices only (not on
    biases, norms or other vectors). Parameters named in `lr_multipliers` get a group of their own,
    without decay, whose "lr_multiplier" `set_lr` applies to the scheduled lr."""
    lr_multipliers = lr_multipliers or {}
    decay, no_decay, own = [], [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if name in lr_multipliers:
            own.append({"params": [p], "weight_decay": 0.0, "lr_multiplier": lr_multipliers[name]})
        else:
            (no_decay if p.ndim < 2 or "bias" in name or "norm" in name else decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}] + own, lr=lr, betas=(0.9, 0.95))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """The scheduled lr for every group, times the group's own multiplier (adamw_decaying_matrices)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_multiplier", 1.0)


class EMA:
    """Exponential moving average of a model's float parameters and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))  # warm-up: short memory early on
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                self.shadow[k].mul_(decay).add_(v.detach().float(), alpha=1 - decay)
            else:
                self.shadow[k].copy_(v)

    def copy_to(self, model: nn.Module) -> nn.Module:
        model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in self.shadow.items()})
        return model


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

    def save(self, step: int, model: nn.Module, ema: EMA | None, optimizer, config: dict,
             extra: dict | None = None) -> Path:
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
    def load(path: Path, model: nn.Module, ema: EMA | None, optimizer, config) -> dict:
        """Restore a checkpoint into model/EMA/optimizer; `config` is the run's config dataclass."""
        path = Path(path)
        saved = json.loads((path / "config.json").read_text())
        defaults = {f.name: f.default for f in dataclasses.fields(config)}
        check_resume_config(saved, dataclasses.asdict(config), path, defaults)
        from hart.checkpoint import load_into
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
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def records(self) -> list[dict]:
        return [json.loads(l) for l in self.path.read_text().splitlines() if l] if self.path.exists() else []


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


def warm_start(module: nn.Module, src: Path, partial: bool, accelerator, may_be_new: tuple[str, ...] = ()) -> None:
    """Load `src` into a fresh module: strictly, or (partial) only the tensors whose shapes match.
    Tensors named in `may_be_new` keep their fresh values when `src` lacks them (a strict load
    otherwise: e.g. a resolution vector added to a model trained without one)."""
    state = read_weights(src)
    if partial:
        fresh = load_matching(module, state)
        accelerator.print(f"initialised from {src}; {len(fresh)} tensors of other shapes left fresh: "
                          + ", ".join(fresh))
        return
    fresh = module.state_dict()
    added = [name for name in may_be_new if name in fresh and name not in state]
    state.update({name: fresh[name] for name in added})
    load_into(module, state, str(src))
    accelerator.print(f"initialised from {src}" + (f"; new, left as initialised: {', '.join(added)}" if added else ""))


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
