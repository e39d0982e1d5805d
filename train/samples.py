"""Sample grids for the model card and README: one row per prompt, discrete-only and hybrid
columns per resolution (so a 64 -> 128 comparison sits in the same row when the model has both).

    python -m train.samples --model assets/hart-emoji --out assets/samples-64-128.png
"""
from __future__ import annotations

import argparse
import sys

from PIL import Image, ImageDraw

from hart.pipeline import BUNDLED_MODEL, HARTPipeline

PROMPTS = ("red apple", "grinning face", "rocket", "sunflower", "waving hand: medium skin tone", "red heart",
           "an emoji of a cat face", "a drawing of a pizza")


def sample_grid(pipe: HARTPipeline, prompts, resolutions, seed: int = 0, cell: int = 128,
                label_width: int = 230) -> Image.Image:
    columns = []  # (title, images)
    for res in resolutions:
        result = pipe(list(prompts), resolution=res, seed=seed)
        columns += [(f"{res}px discrete only", result.discrete_images), (f"{res}px hybrid", result.images)]
    grid = Image.new("RGB", (label_width + len(columns) * cell, 24 + len(prompts) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for c, (title, images) in enumerate(columns):
        draw.text((label_width + c * cell + 4, 6), title, fill="black")
        for r, image in enumerate(images):
            grid.paste(image.resize((cell, cell), Image.NEAREST), (label_width + c * cell, 24 + r * cell))
    for r, prompt in enumerate(prompts):
        draw.text((4, 24 + r * cell + cell // 2 - 6), prompt, fill="black")
    return grid


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(BUNDLED_MODEL))
    parser.add_argument("--out", default="samples.png")
    parser.add_argument("--prompts", nargs="*", default=list(PROMPTS))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pipe = HARTPipeline.from_pretrained(args.model)
    sample_grid(pipe, args.prompts, pipe.resolutions, args.seed).save(args.out)
    print(f"wrote {args.out} ({', '.join(f'{r}px' for r in pipe.resolutions)}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
