"""Generate images from the command line.

    python -m hart.generate "red apple" --out apple.png [--model assets/hart-emoji] [--resolution 128]
        [--seed 0] [--cfg 3] [--steps 8] [--no-residual] [--num-images 4] [--discrete-out apple_discrete.png]

With several images (prompts x num_images) they are pasted left to right, in prompt order, into one PNG
(--out and --discrete-out alike), each at its native size.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np
from PIL import Image


def one_row(images: list[Image.Image]) -> Image.Image:
    """The images of one call (all the same size) pasted left to right."""
    return Image.fromarray(np.concatenate([np.asarray(im.convert("RGB")) for im in images], axis=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", nargs="+", help="one or more prompts")
    parser.add_argument("--out", default="hart.png", help="output PNG (hybrid images, side by side)")
    parser.add_argument("--discrete-out", default=None,
                        help="also write the discrete-only images here (side by side too)")
    parser.add_argument("--model", default=None,
                        help="pipeline folder, official checkpoint or hub id (default: the bundled model)")
    parser.add_argument("--text-encoder", default=None, help="text encoder folder (official checkpoints)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cfg", type=float, default=None)
    parser.add_argument("--steps", type=int, default=None, help="residual diffusion steps")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--more-smooth", action="store_true")
    parser.add_argument("--no-residual", action="store_true", help="skip the residual diffusion head")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    from .pipeline import BUNDLED_MODEL, HARTPipeline
    pipe = HARTPipeline.from_pretrained(args.model or BUNDLED_MODEL, text_encoder=args.text_encoder, device=args.device)
    result = pipe(args.prompt, resolution=args.resolution, seed=args.seed, cfg=args.cfg, diffusion_steps=args.steps,
                  top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                  more_smooth=args.more_smooth or None, use_residual=not args.no_residual,
                  num_images=args.num_images, decode_discrete=bool(args.discrete_out))
    one_row(result.images).save(args.out)
    if args.discrete_out:
        one_row(result.discrete_images).save(args.discrete_out)
    timing = ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in result.timings.items())
    print(f"wrote {args.out} ({result.resolution}px, seed {result.seed}; {timing})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
