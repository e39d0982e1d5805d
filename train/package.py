"""Assemble a shippable pipeline folder from a trained model, optionally with a tokenizer whose
decoder was finetuned afterwards (`train_tokenizer --decoder-only true`), cast to fp16.

    python -m train.package --model work/head/model --tokenizer work/tokdec/tokenizer \\
        --name hart-emoji --out assets/hart-emoji

A new decoder is only accepted when everything that makes the tokens (encoder, quant convs,
codebook, phi) is identical to the tokenizer the AR model was trained on: then the AR model's
tokens and residual targets mean exactly what they meant in training. Packaged by `train.recipe`,
the folder also gets `recipe.json`: the recipe's name and the config of every stage.
"""
from __future__ import annotations

import argparse
from pathlib import Path
import sys

import torch

from hart.checkpoint import CheckpointError, config_from_dict, load_into, read_json, read_weights, write_json
from hart.pipeline import HARTPipeline
from hart.tokenizer import TokenizerConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def token_side_keys(state: dict) -> list[str]:
    """Every tokenizer weight that influences the codes (all but the decoder's)."""
    return sorted(k for k in state if not k.startswith(("decoder.", "post_quant_conv.")))


def swap_decoder(pipe: HARTPipeline, tokenizer_dir: str | Path) -> list[str]:
    """Load tokenizer_dir into pipe.tokenizer after checking its token side is unchanged.
    Returns the keys that changed (the decoder's)."""
    tokenizer_dir = Path(tokenizer_dir)
    cfg = config_from_dict(TokenizerConfig, read_json(tokenizer_dir / "config.json"), str(tokenizer_dir))
    if cfg != pipe.tokenizer.config:
        raise CheckpointError(f"{tokenizer_dir}: tokenizer config differs from the model's ({cfg} vs "
                              f"{pipe.tokenizer.config})")
    new = read_weights(tokenizer_dir / "model.safetensors")
    old = pipe.tokenizer.state_dict()
    differing = [k for k in token_side_keys(old) if k not in new or not torch.equal(new[k].to(old[k].dtype), old[k])]
    if differing:
        raise CheckpointError(f"{tokenizer_dir} changes how images become tokens ({len(differing)} tensors, e.g. "
                              f"{differing[:3]}): the AR model would no longer match it. Finetune with "
                              "--decoder-only true, or retrain the AR model on this tokenizer")
    changed = [k for k in new if k not in old or not torch.equal(new[k].to(old[k].dtype), old[k])]
    load_into(pipe.tokenizer, new, str(tokenizer_dir / "model.safetensors"))
    return changed


def package(model: str, out: str, name: str = "", tokenizer: str = "", dtype: str = "fp16",
            recipe: dict | None = None) -> Path:
    """Write the pipeline `model` (with the decoder of `tokenizer`, if given) to `out` in `dtype`;
    `recipe` (how it was trained) goes to out/recipe.json."""
    pipe = HARTPipeline.from_pretrained(model)
    if tokenizer:
        changed = swap_decoder(pipe, tokenizer)
        print(f"decoder from {tokenizer}: {len(changed)} tensors changed, token side identical")
    if name:
        pipe.name = name
    if recipe is not None:
        write_json(recipe, Path(out) / "recipe.json")
    pipe.save_pretrained(out, dtype=DTYPES[dtype])
    size = sum(f.stat().st_size for f in Path(out).rglob("*.safetensors"))
    print(f"wrote {out} ({size / 2 ** 20:.1f} MiB of weights, {dtype})")
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline folder written by train.train_ar or train.train_head")
    parser.add_argument("--tokenizer", default="", help="decoder-finetuned tokenizer folder")
    parser.add_argument("--name", default="")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    package(args.model, args.out, args.name, args.tokenizer, args.dtype)
    return 0


if __name__ == "__main__":
    sys.exit(main())
