"""Convert an official HART checkpoint (llm/ + tokenizer/) to this project's safetensors format.

    python -m hart.convert SRC DST [--text-encoder PATH_OR_ID] [--raw] [--fp16] [--no-system-prompt]

Later loads of DST read safetensors only (no pickle) and skip the training buffers. The folder keeps
the official text conditioning (the official system prompt) and sampling defaults."""
from __future__ import annotations

import argparse
from dataclasses import asdict
import sys

import torch

from .official import OFFICIAL_SAMPLING, OFFICIAL_SYSTEM_PROMPT, load_official
from .pipeline import OFFICIAL_512_SCHEDULE, write_pipeline
from .sampler import SamplingOptions
from .text_encoder import TextEncoderConfig

DEFAULT_TEXT_ENCODER = "mit-han-lab/Qwen2-VL-1.5B-Instruct"


def convert(src: str, dst: str, text_encoder: str = DEFAULT_TEXT_ENCODER, use_ema: bool = True,
            dtype: torch.dtype | None = None, system_prompt: str = OFFICIAL_SYSTEM_PROMPT) -> None:
    tokenizer, transformer = load_official(src, use_ema=use_ema)
    sizes = transformer.config.patch_nums
    res = sizes[-1] * tokenizer.config.downsample
    resolutions = {res: sizes, **({512: OFFICIAL_512_SCHEDULE} if res == 1024 else {})}
    te = TextEncoderConfig(kind="hf", path=text_encoder, max_length=transformer.config.context_token,
                           system_prompt=system_prompt)
    sampling = asdict(SamplingOptions(**OFFICIAL_SAMPLING, diffusion_steps=transformer.config.num_sampling_steps))
    write_pipeline(dst, tokenizer, transformer, asdict(te), resolutions, sampling, "hart-converted", dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("src", help="official checkpoint folder (holding llm/ and tokenizer/)")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--text-encoder", default=DEFAULT_TEXT_ENCODER,
                        help="folder or hub id of the Qwen2 text encoder to reference")
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument("--system-prompt-file",
                        help="text file whose content replaces the official system prompt (encoder context only)")
    prompt.add_argument("--no-system-prompt", action="store_true", help="encode prompts without a system prompt")
    parser.add_argument("--raw", action="store_true", help="convert the non-EMA weights instead of EMA")
    parser.add_argument("--fp16", action="store_true", help="store float weights as float16")
    args = parser.parse_args(argv)
    system_prompt = OFFICIAL_SYSTEM_PROMPT
    if args.system_prompt_file:
        system_prompt = open(args.system_prompt_file).read()
    elif args.no_system_prompt:
        system_prompt = ""
    convert(args.src, args.dst, args.text_encoder, not args.raw, torch.float16 if args.fp16 else None, system_prompt)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
