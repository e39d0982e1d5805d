"""Assemble a shippable pipeline folder from a trained AR export, optionally with a tokenizer
whose decoder was finetuned afterwards (`train_tokenizer --decoder-only true`), cast to fp16.

    python -m train.package --model runs/ar64/model --tokenizer runs/tokdec/tokenizer \\
        --name hart-emoji --out assets/hart-emoji

A new decoder is only accepted when everything that makes the tokens (encoder, quant convs,
codebook, phi) is identical to the tokenizer the AR model was trained on: then the AR model's
tokens and residual targets mean exactly what they meant in training.
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path
import sys

import torch

from hart.checkpoint import CheckpointError, config_from_dict, load_into, read_json, read_weights
from hart.pipeline import HARTPipeline
from hart.tokenizer import HybridTokenizer, TokenizerConfig

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def token_side_keys(state: dict) -> list[str]:
    """Every tokenizer weight that influences the codes (all but the decoder's)."""
    return sorted(k for k in state if not k.startswith(("decoder.", "post_quant_conv.")))


def swap_decoder(pipe: HARTPipeline, tokenizer_dir: str | Path) -> list[str]:
    """Load tokenizer_dir into pipe.tokenizer after checking its token side is unchanged.
    Returns the keys that changed (the decoder's)."""
    tokenizer_dir = Path(tokenizer_dir)
    cfg = config_from_dict(TokenizerConfig, read_json(tokenizer_dir / "config.json"), str(tokenizer_dir))
    current = pipe.tokenizer.config
    if replace(cfg, decoder_ch=current.decoder_ch) != current:  # only the decoder's width may change
        raise CheckpointError(f"{tokenizer_dir}: tokenizer config differs from the model's ({cfg} vs {current})")
    new = read_weights(tokenizer_dir / "model.safetensors")
    old = pipe.tokenizer.state_dict()
    differing = [k for k in token_side_keys(old) if k not in new or not torch.equal(new[k].to(old[k].dtype), old[k])]
    if differing:
        raise CheckpointError(f"{tokenizer_dir} changes how images become tokens ({len(differing)} tensors, e.g. "
                              f"{differing[:3]}): the AR model would no longer match it. Finetune with "
                              "--decoder-only true, or retrain the AR model on this tokenizer")
    changed = [k for k in new if k not in old or old[k].shape != new[k].shape
               or not torch.equal(new[k].to(old[k].dtype), old[k])]
    if cfg != current:  # a wider decoder: a new module, then the weights
        pipe.tokenizer = HybridTokenizer(cfg).eval()
    load_into(pipe.tokenizer, new, str(tokenizer_dir / "model.safetensors"))
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="pipeline folder written by train.train_ar")
    parser.add_argument("--tokenizer", default=None, help="decoder-finetuned tokenizer folder")
    parser.add_argument("--name", default=None)
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    pipe = HARTPipeline.from_pretrained(args.model)
    if args.tokenizer:
        changed = swap_decoder(pipe, args.tokenizer)
        print(f"decoder from {args.tokenizer}: {len(changed)} tensors changed, token side identical")
    if args.name:
        pipe.name = args.name
    pipe.save_pretrained(args.out, dtype=DTYPES[args.dtype])
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*.safetensors"))
    print(f"wrote {args.out} ({size / 2 ** 20:.1f} MiB of weights, {args.dtype})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
