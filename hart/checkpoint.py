"""Reading and writing weights safely: safetensors, or pickle only through
`torch.load(weights_only=True)`, with every problem named by file and key."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, or does not fit the model it is loaded into."""


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        try:  # mmap keeps large unused buffers (the official attention mask) out of memory
            state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # files in the legacy (non-zip) format cannot be memory-mapped
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"corrupt or unreadable checkpoint {path}: {err}") from err
    except Exception as err:  # the unpickler rejects anything that is not plain tensors
        raise CheckpointError(f"refusing to load {path}: not a plain weights file ({err})") from err
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return state


def write_weights(state: dict[str, torch.Tensor], path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Atomic safetensors write (temp file + rename), optionally casting float tensors."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, value in state.items():
        value = value.detach().cpu()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Strict load that lists every missing, unexpected and wrongly shaped key."""
    expected = module.state_dict()
    problems = []
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        problems.append("missing keys: " + ", ".join(missing))
    if unexpected:
        problems.append("unexpected keys: " + ", ".join(unexpected))
    for key in sorted(set(expected) & set(state)):
        if tuple(expected[key].shape) != tuple(state[key].shape):
            problems.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}")
    if problems:
        raise CheckpointError(f"{source} does not match the model config:\n  " + "\n  ".join(problems))
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def load_matching(module: nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Warm start: copy every tensor whose name and shape match; return the keys left as
    initialised (e.g. the token projections when the tokenizer's latent width changed)."""
    expected = module.state_dict()
    usable = {k: v.to(expected[k].dtype) for k, v in state.items()
              if k in expected and tuple(v.shape) == tuple(expected[k].shape)}
    module.load_state_dict(usable, strict=False)
    return sorted(set(expected) - set(usable))


def read_json(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"corrupt JSON in {path}: {err}") from err


def write_json(data: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def config_from_dict(cls, data: dict, source: str):
    """Build a config dataclass, rejecting unknown fields by name."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CheckpointError(f"{source}: unknown {cls.__name__} fields: {', '.join(unknown)}")
    return cls(**data)
