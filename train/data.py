"""Image-caption datasets for training.

Two on-disk layouts are supported, both with a `captions.jsonl` (one JSON object per line):

* a folder of image files; each caption line is {"file": "<name relative to the folder>", "text": ...}
* a packed `.npz` or `.safetensors` file holding `images` (uint8 [N, H, W, 3]); the `captions.jsonl`
  next to it has one line per image, in the same order: {"text": ..., "aliases": [...] (optional)}

A folder holding `emoji_{res}.safetensors` files (see train.build_emoji_dataset) counts as packed.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

Split = Literal["train", "val", "all"]
PACKED_SUFFIXES = (".safetensors", ".npz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif")

# Wordings used to vary captions during training.
TRAIN_TEMPLATES = (
    "{}",
    "an emoji of {}",
    "{} emoji",
    "a picture of a {}",
    "icon of {}",
    "an icon showing {}",
    "{} icon",
    "emoji: {}",
    "the {} emoji",
    "an image of {}",
    "a small picture of {}",
    "{}, emoji style",
    "a colorful emoji of {}",
)
# Wordings training never sees: used to test whether the model generalises to paraphrases.
HELD_OUT_TEMPLATES = (
    "a drawing of {}",
    "show me {}",
    "{} clipart",
    "cartoon {}",
    "a sticker of {}",
    "{} pictogram",
    "an illustration of {}",
    "please draw {}",
    "a cute little {}",
    "{} in flat design",
)

P_ALIAS = 0.3
P_DROP_ARTICLES = 0.2
_ARTICLES = re.compile(r"\b(?:a|an|the)\s+")


def _fix_indefinite_article(text: str) -> str:
    """'a picture of a apple' -> 'a picture of an apple' (lowercase template articles only)."""
    return re.sub(r"\ba ([aeiouAEIOU])", r"an \1", text)


def vary_caption(text: str, aliases: Sequence[str], rng: random.Random) -> str:
    """A training-time rewording of `text`: name or alias, in one of TRAIN_TEMPLATES, varied casing."""
    name = rng.choice(list(aliases)) if aliases and rng.random() < P_ALIAS else text
    template = rng.choice(TRAIN_TEMPLATES)
    if rng.random() < P_DROP_ARTICLES:
        # Articles are dropped from the template only, so names like "A button" stay intact.
        template = _ARTICLES.sub("", template)
    caption = _fix_indefinite_article(template.format(name))
    r = rng.random()
    if r < 0.10:
        caption = caption.lower()
    elif r < 0.15:
        caption = caption.title()
    elif r < 0.18:
        caption = caption.upper()
    return caption


def read_captions(path: Path) -> list[dict]:
    """Parse a captions.jsonl; every line must be a JSON object with a string "text"."""
    if not path.is_file():
        raise ValueError(f"missing captions file: {path}")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({e})") from e
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{lineno}: caption line has no string 'text' field")
        records.append(record)
    if not records:
        raise ValueError(f"empty dataset: {path} has no captions")
    return records


def split_indices(n: int, split: Split, val_fraction: float = 0.05, seed: int = 0) -> list[int]:
    """Deterministic train/val split by a seeded permutation; depends only on (n, val_fraction, seed)."""
    if split not in ("train", "val", "all"):
        raise ValueError(f"split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split == "all":
        return list(range(n))
    # At least one validation item when asked for any, but never the whole data.
    n_val = min(max(1, round(n * val_fraction)), n - 1) if val_fraction > 0 and n > 1 else 0
    perm = np.random.default_rng(seed).permutation(n)
    return sorted(int(i) for i in (perm[:n_val] if split == "val" else perm[n_val:]))


def to_square(img: Image.Image, resolution: int) -> Image.Image:
    """RGB, centre-cropped to a square and resized with LANCZOS; transparency becomes white."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    img = img.convert("RGB")
    w, h = img.size
    if w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (resolution, resolution):
        img = img.resize((resolution, resolution), Image.LANCZOS)
    return img


def _to_tensor(array: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    # np.array copies: PIL-backed and packed arrays may be read-only, which torch warns about.
    return torch.from_numpy(np.array(array, dtype=np.uint8)).permute(2, 0, 1).float().div(127.5).sub(1.0)


class ImageCaptionDataset(Dataset):
    """Images with captions; items are {"image": float [3, R, R] in [-1, 1], "text": str, "index": int}.

    Give either `images` (uint8 [N, H, W, 3], a packed file) or `files` (one image path per caption).
    `indices` selects a subset (a split); "index" in an item is the position in the full data.
    With `caption_variation`, texts are reworded by `vary_caption` using an rng seeded by
    (seed, epoch, index), so every epoch differs but each is reproducible; see `set_epoch`.
    """

    def __init__(
        self,
        captions: Sequence[dict],
        resolution: int,
        *,
        images: np.ndarray | None = None,
        files: Sequence[Path] | None = None,
        indices: Sequence[int] | None = None,
        caption_variation: bool = False,
        seed: int = 0,
        source: str = "<memory>",
    ) -> None:
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        if (images is None) == (files is None):
            raise ValueError("give exactly one of images= or files=")
        count = len(images) if images is not None else len(files)
        if count != len(captions):
            raise ValueError(f"{source}: {count} images but {len(captions)} caption lines")
        self.captions = list(captions)
        self.resolution = resolution
        self.images = images
        self.files = None if files is None else [Path(f) for f in files]
        self.indices = list(range(count)) if indices is None else list(indices)
        if not self.indices:
            raise ValueError(f"empty dataset: {source} (no items in this split)")
        self.caption_variation = caption_variation
        self.seed = seed
        self.epoch = 0
        self.source = source

    def set_epoch(self, epoch: int) -> None:
        """Select the caption variations for `epoch` (call before each epoch when training)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    def _image(self, index: int) -> np.ndarray:
        if self.images is not None:
            array = self.images[index]
            if array.shape[:2] == (self.resolution, self.resolution):
                return array
            return np.asarray(to_square(Image.fromarray(array), self.resolution))
        path = self.files[index]
        try:
            with Image.open(path) as img:
                return np.asarray(to_square(img, self.resolution))
        except (OSError, ValueError) as e:  # PIL.UnidentifiedImageError is an OSError
            raise ValueError(f"unreadable image file {path}: {e}") from e

    def caption(self, index: int) -> str:
        """Caption of full-data position `index`, varied if caption_variation is on."""
        record = self.captions[index]
        if not self.caption_variation:
            return record["text"]
        rng = random.Random(f"{self.seed}:{self.epoch}:{index}")  # str seeds are hash-seed independent
        return vary_caption(record["text"], record.get("aliases") or [], rng)

    def image(self, index: int) -> torch.Tensor:
        """Image at full-data position `index` (any split) as float [3, R, R] in [-1, 1]."""
        return _to_tensor(self._image(index))

    def __getitem__(self, i: int) -> dict:
        index = self.indices[i]
        return {"image": self.image(index), "text": self.caption(index), "index": index}


def _load_packed(path: Path) -> np.ndarray:
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                images = data["images"] if "images" in data.files else None
        else:
            from safetensors.numpy import load_file

            images = load_file(str(path)).get("images")
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable packed file {path}: {e}") from e
    if images is None:
        raise ValueError(f"{path}: no 'images' array")
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{path}: 'images' must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}")
    return images


def _pick_emoji_file(folder: Path, resolution: int) -> Path | None:
    """emoji_{resolution} if present, else the smallest larger one, else the largest (resized on load)."""
    found = {}
    for p in folder.glob("emoji_*"):
        m = re.fullmatch(r"emoji_(\d+)", p.stem)
        if m and p.suffix in PACKED_SUFFIXES:
            found.setdefault(int(m.group(1)), p)
    if not found:
        return None
    larger = [r for r in found if r >= resolution]
    return found[min(larger) if larger else max(found)]


def load_dataset(
    path: str | Path,
    resolution: int,
    split: Split = "train",
    val_fraction: float = 0.05,
    seed: int = 0,
    caption_variation: bool | None = None,
) -> ImageCaptionDataset:
    """Open a folder of images or a packed file (or an emoji folder) as a dataset split.

    The split depends only on the number of captions, `val_fraction` and `seed`, so every
    resolution of the same data gets the same split. `caption_variation` defaults to on for
    the train split and off otherwise.
    """
    path = Path(path)
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
    if caption_variation is None:
        caption_variation = split == "train"
    if path.is_dir():
        packed = _pick_emoji_file(path, resolution)
        if packed is not None:
            path = packed
    if path.is_file():
        captions = read_captions(path.parent / "captions.jsonl")
        images = _load_packed(path)
        kwargs: dict = {"images": images}
    elif path.is_dir():
        captions = read_captions(path / "captions.jsonl")
        files = []
        for lineno, record in enumerate(captions, start=1):
            if not isinstance(record.get("file"), str):
                raise ValueError(f"{path / 'captions.jsonl'}:{lineno}: caption line has no string 'file' field")
            file = path / record["file"]
            if not file.is_file():
                raise ValueError(f"unreadable image file {file}: not found")
            files.append(file)
        kwargs = {"files": files}
    else:
        raise ValueError(f"dataset not found: {path}")
    indices = split_indices(len(captions), split, val_fraction, seed)
    return ImageCaptionDataset(
        captions,
        resolution,
        indices=indices,
        caption_variation=caption_variation,
        seed=seed,
        source=f"{path} [{split}]",
        **kwargs,
    )
