"""Fast tests for train.data (datasets, splits, caption variation) and the emoji renderer."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from train.data import (
    HELD_OUT_TEMPLATES,
    TRAIN_TEMPLATES,
    ImageCaptionDataset,
    load_dataset,
    split_indices,
    vary_caption,
)

FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


def _write_captions(folder: Path, records: list[dict]) -> None:
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Four small PNGs of different sizes and modes, one solid colour each."""
    sizes = [(16, 16), (24, 24), (12, 12), (20, 20)]
    records = []
    for i, (color, size) in enumerate(zip(COLORS, sizes)):
        name = f"img{i}.png"
        img = Image.new("RGB", size, color)
        if i == 1:
            img = img.convert("RGBA")
        img.save(tmp_path / name)
        records.append({"file": name, "text": f"colour {i}"})
    _write_captions(tmp_path, records)
    return tmp_path


def test_folder_items_shapes_and_range(folder: Path) -> None:
    ds = load_dataset(folder, 16, split="all")
    assert len(ds) == 4
    for i in range(4):
        item = ds[i]
        assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
        assert item["image"].min() >= -1.0 and item["image"].max() <= 1.0
        assert item["text"] == f"colour {i}" and item["index"] == i
        expected = torch.tensor(COLORS[i], dtype=torch.float32) / 127.5 - 1.0
        assert torch.allclose(item["image"].mean(dim=(1, 2)), expected, atol=0.02)


def test_non_square_image_is_centre_cropped(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 0, 0), (10, 0, 30, 20))  # red centre square, black sides
    img.save(tmp_path / "wide.png")
    _write_captions(tmp_path, [{"file": "wide.png", "text": "wide"}])
    image = load_dataset(tmp_path, 8, split="all")[0]["image"]
    assert torch.allclose(image[0], torch.ones(8, 8), atol=0.02)
    assert torch.allclose(image[1:], -torch.ones(2, 8, 8), atol=0.02)


def test_split_is_deterministic_disjoint_and_complete(folder: Path) -> None:
    train = load_dataset(folder, 16, "train", val_fraction=0.25, seed=3)
    val = load_dataset(folder, 16, "val", val_fraction=0.25, seed=3)
    assert len(val) == 1 and len(train) == 3
    assert set(train.indices).isdisjoint(val.indices)
    assert set(train.indices) | set(val.indices) == set(range(4))
    assert load_dataset(folder, 8, "val", val_fraction=0.25, seed=3).indices == val.indices
    for seed in range(5):
        tr, va = split_indices(100, "train", 0.1, seed), split_indices(100, "val", 0.1, seed)
        assert len(va) == 10 and sorted(tr + va) == list(range(100))
        assert split_indices(100, "val", 0.1, seed) == va


def test_packed_npz_with_resize(tmp_path: Path) -> None:
    images = np.zeros((3, 8, 8, 3), np.uint8)
    images[1] = 255
    np.savez(tmp_path / "pack.npz", images=images)
    _write_captions(tmp_path, [{"text": "black"}, {"text": "white", "aliases": ["snow"]}, {"text": "black again"}])
    ds = load_dataset(tmp_path / "pack.npz", 16, split="all")
    assert [ds[i]["text"] for i in range(3)] == ["black", "white", "black again"]
    assert ds[1]["image"].shape == (3, 16, 16) and torch.allclose(ds[1]["image"], torch.ones(3, 16, 16))


def test_caption_variation_is_reproducible_per_epoch(folder: Path) -> None:
    ds = load_dataset(folder, 16, "train", val_fraction=0.25)
    assert ds.caption_variation and not load_dataset(folder, 16, "val", val_fraction=0.25).caption_variation
    first = [ds[i]["text"] for i in range(len(ds))]
    assert first == [ds[i]["text"] for i in range(len(ds))]
    epochs = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        epochs.add(tuple(ds[i]["text"] for i in range(len(ds))))
    assert len(epochs) > 1


def _frame(caption: str, name: str) -> str:
    """The wording around `name`, lowercased and without articles: 'an Emoji of X' -> 'emoji of {}'."""
    frame = caption.lower().replace(name.lower(), "{}")
    return re.sub(r"\b(a|an|the)\s+", "", frame).strip()


def test_vary_caption_never_uses_held_out_wordings() -> None:
    held_out = {_frame(t, "{}") for t in HELD_OUT_TEMPLATES}
    assert len(HELD_OUT_TEMPLATES) >= 8 and len(TRAIN_TEMPLATES) >= 10
    assert held_out.isdisjoint(_frame(t, "{}") for t in TRAIN_TEMPLATES)
    rng = random.Random(0)
    names = [("red apple", ["apple"]), ("waving hand: medium skin tone", []), ("grinning face", ["grinning"])]
    for _ in range(500):
        text, aliases = rng.choice(names)
        caption = vary_caption(text, aliases, rng)
        used = next(n for n in [text, *aliases] if n.lower() in caption.lower())
        assert _frame(caption, used) not in held_out, caption


def test_missing_captions_file(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="captions.jsonl"):
        load_dataset(tmp_path, 8)


def test_caption_line_without_text(folder: Path) -> None:
    _write_captions(folder, [{"file": "img0.png", "text": "ok"}, {"file": "img1.png", "caption": "no text"}])
    with pytest.raises(ValueError, match=r"captions\.jsonl:2.*'text'"):
        load_dataset(folder, 8)


def test_caption_line_without_file(folder: Path) -> None:
    _write_captions(folder, [{"text": "where is the file"}])
    with pytest.raises(ValueError, match="'file'"):
        load_dataset(folder, 8, split="all")


def test_empty_dataset(tmp_path: Path) -> None:
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        load_dataset(tmp_path, 8)


def test_unreadable_and_missing_image_files(folder: Path) -> None:
    (folder / "bad.png").write_bytes(b"not a png at all")
    _write_captions(folder, [{"file": "img0.png", "text": "fine"}, {"file": "bad.png", "text": "broken"}])
    ds = load_dataset(folder, 8, split="all")
    assert ds[0]["text"] == "fine"
    with pytest.raises(ValueError, match="bad.png"):
        ds[1]
    _write_captions(folder, [{"file": "nowhere.png", "text": "gone"}])
    with pytest.raises(ValueError, match="nowhere.png"):
        load_dataset(folder, 8, split="all")


def test_bad_resolution_and_packed_errors(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    for resolution in (0, -4):
        with pytest.raises(ValueError, match="resolution"):
            load_dataset(folder, resolution)
    with pytest.raises(ValueError, match="resolution"):
        ImageCaptionDataset([{"text": "x"}], 0, images=np.zeros((1, 4, 4, 3), np.uint8))
    packed_dir = tmp_path_factory.mktemp("packed")
    np.savez(packed_dir / "pack.npz", images=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="captions.jsonl"):
        load_dataset(packed_dir / "pack.npz", 4)
    _write_captions(packed_dir, [{"text": "only one"}])
    with pytest.raises(ValueError, match="2 images but 1 caption"):
        load_dataset(packed_dir / "pack.npz", 4, split="all")
    np.savez(packed_dir / "other.npz", pictures=np.zeros((1, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match="'images'"):
        load_dataset(packed_dir / "other.npz", 4, split="all")


def test_emoji_caption_cleaning() -> None:
    from train.build_emoji_dataset import clean_name

    assert clean_name(":red_apple:") == "red apple"
    assert clean_name(":waving_hand_medium_skin_tone:") == "waving hand: medium skin tone"
    assert clean_name(":woman_medium_skin_tone_beard:") == "woman: medium skin tone, beard"
    assert clean_name(":keycap_#:") == "keycap: #"


@pytest.mark.skipif(not FONT.exists(), reason=f"emoji font not installed: {FONT}")
def test_render_known_emoji() -> None:
    from train.build_emoji_dataset import render_emoji

    arrays = []
    for char in ["🍎", "👋🏽", "😀"]:
        img = render_emoji(char, 64)
        assert img is not None and img.size == (64, 64) and img.mode == "RGB"
        array = np.asarray(img, dtype=np.float32)
        assert (array < 250).any(axis=-1).mean() > 0.2, f"{char} looks blank"
        assert array[0, 0].min() > 250 and array[-1, -1].min() > 250, "background should be white"
        arrays.append(array)
    for i in range(3):
        for j in range(i + 1, 3):
            assert np.abs(arrays[i] - arrays[j]).mean() > 10
    assert render_emoji("\ue000", 64) is None  # a codepoint the font has no glyph for
