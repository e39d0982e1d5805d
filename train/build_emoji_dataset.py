"""Build the default training set: Noto Color Emoji glyphs captioned with names from `emoji`.

Usage: python -m train.build_emoji_dataset --out data/emoji --resolutions 64 128 [--limit N]

Writes into --out:
  emoji_{res}.safetensors  one tensor `images`, uint8 [N, res, res, 3], per resolution
  captions.jsonl           one line per image, same order for every resolution
  LICENSE-OFL.txt          font licence notice (SIL Open Font License 1.1)
  stats.json               rendered / skipped counts and timings
"""

from __future__ import annotations

import argparse
import json
import re
import time
from functools import lru_cache
from pathlib import Path

import emoji
import numpy as np
from PIL import Image, ImageDraw, ImageFont, features
from safetensors.numpy import save_file

FONT_PATH = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
FONT_COPYRIGHT = Path("/usr/share/doc/fonts-noto-color-emoji/copyright")
# The font only has bitmap strikes of 109 ppem; FreeType refuses other sizes for it.
FONT_SIZE = 109
CANVAS_PAD = 16
# A sequence the font has no ligature for is laid out as its parts side by side, so its advance
# spans several glyph widths. (An aspect-ratio test on the pixels would also reject genuinely
# wide single glyphs such as glasses, bed or the flag of Qatar.)
MAX_ADVANCE_GLYPHS = 1.5
# White border around the glyph, as a fraction of the glyph's larger side (per side).
MARGIN = 0.06
# Renderings that mean "no glyph": notdef (drawn for a private-use codepoint) and the font's
# "unknown flag" (a white flag with a question mark, drawn for the invalid region XX).
NOTDEF_PROBES = ("\ue000", "\U0001F1FD\U0001F1FD")
REFERENCE_EMOJI = "\U0001F600"  # one ordinary glyph, for the single-glyph advance width

_SKIN_TONES = {chr(c) for c in range(0x1F3FB, 0x1F400)}
_TAGS = range(0xE0020, 0xE0080)
_ATTR = r"(?:(?:light|medium-light|medium|medium-dark|dark) skin tone|red hair|curly hair|white hair|blond hair|bald|beard)"
# Lazy base so the split happens before the first of the trailing attributes.
_BASE_AND_ATTRS = re.compile(rf"^(.+?) ({_ATTR}(?: {_ATTR})*)$")


def clean_name(name: str) -> str:
    """Turn an `emoji` package name into CLDR-like text.

    ':red_apple:' -> 'red apple'; ':waving_hand_medium_skin_tone:' -> 'waving hand: medium skin tone';
    ':woman_medium_skin_tone_beard:' -> 'woman: medium skin tone, beard'; ':keycap_#:' -> 'keycap: #'.
    """
    text = name.strip(":").replace("_", " ").replace("\u2019", "'")
    text = re.sub(r"\s+", " ", text).strip()
    if text.startswith("keycap "):
        return "keycap: " + text[len("keycap ") :]
    match = _BASE_AND_ATTRS.match(text)
    if match and not match.group(1).endswith((" with", " and")):
        return f"{match.group(1)}: {', '.join(re.findall(_ATTR, match.group(2)))}"
    return text


def _is_flag(char: str) -> bool:
    """Country flags (regional-indicator pairs) and subdivision flags (tag sequences)."""
    regional = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in char)
    return (regional and len(char) == 2) or (char[0] == "\U0001F3F4" and any(ord(c) in _TAGS for c in char))


def _natural_alias(alias: str) -> bool:
    """Drop shortcode artefacts that are not words: 'us', 'a', 'cat2', 'clock830', 'u7121', '+1'."""
    return len(alias) > 2 and not alias[-1].isdigit()


def emoji_captions() -> list[dict]:
    """All fully-qualified emoji with cleaned captions, sorted by caption (then char) for determinism.

    Each entry: {"char", "text", "aliases", "group"} where group is "skin-tone" or "base".
    """
    entries = []
    for char, data in emoji.EMOJI_DATA.items():
        if data["status"] != emoji.STATUS["fully_qualified"]:
            continue
        name = clean_name(data["en"])
        text = f"flag: {name}" if _is_flag(char) else name
        aliases: list[str] = []
        candidates = [clean_name(a) for a in data.get("alias", [])] + ([name] if name != text else [])
        for alias in candidates:
            if not _natural_alias(alias):
                continue
            if alias.casefold() != text.casefold() and alias.casefold() not in {a.casefold() for a in aliases}:
                aliases.append(alias)
        group = "skin-tone" if any(c in _SKIN_TONES for c in char) else "base"
        entries.append({"char": char, "text": text, "aliases": aliases, "group": group})
    entries.sort(key=lambda e: (e["text"].casefold(), e["text"], e["char"]))
    return entries


@lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(FONT_PATH), FONT_SIZE)


def _draw(char: str) -> Image.Image:
    """Draw `char` in colour on a transparent canvas wide enough to show side-by-side fallbacks."""
    font = _font()
    right = font.getbbox(char)[2]
    canvas = Image.new("RGBA", (max(right, FONT_SIZE) + 2 * CANVAS_PAD, int(FONT_SIZE * 1.2) + 2 * CANVAS_PAD))
    ImageDraw.Draw(canvas).text((CANVAS_PAD, CANVAS_PAD), char, font=font, embedded_color=True)
    return canvas


def _crop(img: Image.Image) -> Image.Image | None:
    bbox = img.getchannel("A").getbbox()
    return None if bbox is None else img.crop(bbox)


@lru_cache(maxsize=1)
def _notdef_pixels() -> frozenset[bytes]:
    """Pixels of the font's placeholder glyphs (Noto Color Emoji's notdef itself is blank)."""
    return frozenset(g.tobytes() for g in map(_crop, map(_draw, NOTDEF_PROBES)) if g is not None)


@lru_cache(maxsize=1)
def _glyph_advance() -> int:
    return _font().getbbox(REFERENCE_EMOJI)[2]


def _render_square(char: str) -> tuple[Image.Image | None, str]:
    """Render `char` centred on a white square RGB image; status is 'ok', 'missing' or 'bad'."""
    glyph = _crop(_draw(char))
    if glyph is None or glyph.tobytes() in _notdef_pixels():
        return None, "missing"
    if _font().getbbox(char)[2] > MAX_ADVANCE_GLYPHS * _glyph_advance():
        return None, "bad"
    w, h = glyph.size
    side = max(w, h)
    side += 2 * max(1, round(side * MARGIN))
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - w) // 2, (side - h) // 2))
    return square.convert("RGB"), "ok"


def render_emoji(char: str, resolution: int) -> Image.Image | None:
    """RGB `resolution`x`resolution` image of `char`, or None if the font cannot draw it as one glyph."""
    square, _ = _render_square(char)
    return None if square is None else square.resize((resolution, resolution), Image.LANCZOS)


def _license_text() -> str:
    notice = (
        "The images in this folder are rendered from the Noto Color Emoji font\n"
        "(https://github.com/googlefonts/noto-emoji, Debian package fonts-noto-color-emoji),\n"
        "Copyright 2013-2017 Google Inc., licensed under the SIL Open Font License, Version 1.1\n"
        "(https://openfontlicense.org). Captions come from the `emoji` Python package (BSD licence)\n"
        "and the Unicode CLDR names it carries.\n"
    )
    if FONT_COPYRIGHT.exists():
        notice += f"\nText of {FONT_COPYRIGHT}:\n\n" + FONT_COPYRIGHT.read_text(encoding="utf-8")
    return notice


def build(out: Path, resolutions: list[int], limit: int | None = None) -> dict:
    """Render every captioned emoji at each resolution and write the dataset files into `out`."""
    if not FONT_PATH.exists():
        raise FileNotFoundError(f"emoji font not found: {FONT_PATH} (apt-get install fonts-noto-color-emoji)")
    if not resolutions or min(resolutions) <= 0:
        raise ValueError(f"resolutions must be positive, got {resolutions}")
    if not features.check("raqm"):
        print("warning: Pillow lacks libraqm; ZWJ sequences, flags and keycaps will be skipped as bad")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    images: dict[int, list[np.ndarray]] = {r: [] for r in resolutions}
    captions: list[dict] = []
    skipped: dict[str, list[str]] = {"missing": [], "bad": []}
    for entry in emoji_captions():
        if limit is not None and len(captions) >= limit:
            break
        square, status = _render_square(entry["char"])
        if square is None:
            skipped[status].append(entry["text"])
            continue
        for r in resolutions:
            images[r].append(np.asarray(square.resize((r, r), Image.LANCZOS), dtype=np.uint8))
        captions.append({"index": len(captions), **entry})

    per_resolution = {}
    for r in resolutions:
        path = out / f"emoji_{r}.safetensors"
        array = np.stack(images[r]) if images[r] else np.zeros((0, r, r, 3), np.uint8)
        # A single metadata key: safetensors writes several in no fixed order, breaking byte-equality.
        save_file({"images": array}, str(path), metadata={"source": "Noto Color Emoji"})
        per_resolution[str(r)] = {"file": path.name, "shape": list(array.shape)}
    with open(out / "captions.jsonl", "w", encoding="utf-8") as f:
        for line in captions:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    (out / "LICENSE-OFL.txt").write_text(_license_text(), encoding="utf-8")
    stats = {
        "rendered": len(captions),
        "skipped_missing_glyph": len(skipped["missing"]),
        "skipped_bad": len(skipped["bad"]),
        "skin_tone": sum(c["group"] == "skin-tone" for c in captions),
        "per_resolution": per_resolution,
        "seconds": round(time.perf_counter() - start, 2),
        "skipped": skipped,
    }
    (out / "stats.json").write_text(json.dumps(stats, ensure_ascii=False, indent=1), encoding="utf-8")
    return stats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data/emoji"))
    parser.add_argument("--resolutions", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--limit", type=int, default=None, help="stop after this many rendered emoji")
    args = parser.parse_args(argv)
    stats = build(args.out, args.resolutions, args.limit)
    print(
        f"rendered {stats['rendered']} emoji ({stats['skin_tone']} skin-tone variants), "
        f"skipped {stats['skipped_missing_glyph']} missing glyphs and {stats['skipped_bad']} bad renderings "
        f"in {stats['seconds']}s -> {args.out}"
    )


if __name__ == "__main__":
    main()
