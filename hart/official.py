"""Loading checkpoints in the official HART layout (`llm/` + `tokenizer/`) by key mapping.

Our module names equal the official ones, so the mapping is: strip the tokenizer's `vae.`
prefix, drop the discriminator and the training-only buffers, and translate config.json."""
from __future__ import annotations

from pathlib import Path
import re

import torch

from .checkpoint import CheckpointError, load_into, read_json, read_weights
from .tokenizer import HybridTokenizer, TokenizerConfig
from .transformer import HARTTransformer, TransformerConfig

# The official encoder's "LLM system prompt" (705 characters; SHA-256 424f7aa7...a9b8f20): it runs
# through the text model in front of every prompt, as context only, and its states are dropped.
# The released checkpoints were trained with prompts encoded this way.
OFFICIAL_SYSTEM_PROMPT = (
    'Given a user prompt, generate an "Enhanced prompt" that provides detailed visual descriptions suitable '
    'for image generation.\n\nExamples:\n- User Prompt: A cat sleeping -> A small, fluffy white cat curled up in '
    'a round shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red flowers.\n'
    '- User Prompt: A busy city street -> A bustling city street scene at dusk, featuring glowing street lamps, '
    'a diverse crowd of people in colorful clothing, and a double-decker bus passing by towering glass '
    'skyscrapers.\n\nPlease generate only the enhanced description for the prompt below and DO NOT include any '
    'additional sentences. Start your response with "Enhanced Prompt:".\n\nUser Prompt:\n')
# the official sampler's defaults: top-k 600 for the first 7 scales, then 300 (whatever top_k it is given)
OFFICIAL_SAMPLING = {"cfg": 4.5, "top_k": [600] * 7 + [300], "top_p": 0.0, "temperature": 1.0}

# buffers the official modules save that we rebuild or do not need
DROPPED_TRANSFORMER_KEYS = re.compile(r"^(lvl_1L|attn_bias_for_masking|blocks\.\d+\.attn\.zero_k_bias)$")
DROPPED_TOKENIZER_KEYS = re.compile(r"^quantize\.ema_vocab_hit_SV$")
UNSUPPORTED_TRANSFORMER_KEYS = re.compile(
    r"(blocks\.\d+\.ada_lin\.1|scale_shift_table|scale_mul_1H11|pos_1LC|pos_start|mat_qkv|ffn\.fc1|cross_attn|^lvl_embed\.weight)")


def is_official_layout(path: str | Path) -> bool:
    path = Path(path)
    return (path / "llm" / "config.json").is_file() and (path / "tokenizer" / "config.json").is_file()


def _weights_file(folder: Path, names: list[str]) -> Path:
    for name in names:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointError(f"no weights file in {folder} (looked for {', '.join(names)})")


def tokenizer_config_from_official(cfg: dict) -> TokenizerConfig:
    if cfg.get("double_decoder"):
        raise CheckpointError("tokenizer/config.json: double_decoder=true is not supported")
    return TokenizerConfig(vocab_size=cfg.get("vocab_size", 4096), z_channels=cfg.get("z_channels", 32),
                           ch=cfg.get("ch", 160), ch_mult=tuple(cfg.get("ch_mult", (1, 1, 2, 2, 4))),
                           quant_conv_ks=cfg.get("quant_conv_ks", 3), quant_resi=cfg.get("quant_resi", 0.5),
                           share_quant_resi=cfg.get("share_quant_resi", 4))


def transformer_config_from_official(cfg: dict, state: dict[str, torch.Tensor],
                                     tok: TokenizerConfig) -> TransformerConfig:
    """Config from llm/config.json, cross-checked with what the weights show (§3.4 of the format notes)."""
    if cfg.get("attn_type", "llama") != "llama" or cfg.get("mlp_type", "llama") != "llama":
        raise CheckpointError("only the llama attention/MLP variant of HART is supported")
    bad = sorted(k for k in state if UNSUPPORTED_TRANSFORMER_KEYS.search(k))
    if bad:
        raise CheckpointError(f"unsupported HART variant (keys {', '.join(bad[:4])} ...)")
    gate = state.get("blocks.0.ffn.gate_proj.weight")
    return TransformerConfig(
        vocab_size=tok.vocab_size, token_dim=tok.z_channels,
        context_token=cfg.get("context_token", 300), context_dim=cfg.get("context_dim", 1536),
        embed_dim=cfg.get("embed_dim", 1024), depth=cfg.get("depth", 16), num_heads=cfg.get("num_heads", 16),
        mlp_ratio=cfg.get("mlp_ratio", 4.0), mlp_hidden=int(gate.shape[0]) if gate is not None else 0,
        norm_eps=cfg.get("norm_eps", 1e-6), use_context_norm="context_norm.weight" in state,
        patch_nums=tuple(cfg.get("patch_nums", (1, 2, 3, 4, 5, 6, 8, 10, 13, 16))),
        diff_width=cfg.get("diff_width", 1024), diff_depth=cfg.get("diff_depth", 6),
        num_sampling_steps=int(cfg.get("num_sampling_steps", 8)))


def load_official(path: str | Path, use_ema: bool = True) -> tuple[HybridTokenizer, HARTTransformer]:
    """Build and load (tokenizer, transformer) from an official checkpoint folder (or its llm/)."""
    root = Path(path)
    if root.name == "llm" and not (root / "llm").exists():
        root = root.parent
    llm, tok_dir = root / "llm", root / "tokenizer"
    tok_json = read_json(tok_dir / "config.json")
    tok_cfg = tokenizer_config_from_official(tok_json)
    tok_file = _weights_file(tok_dir, ["model.safetensors", "pytorch_model.bin"])
    raw = read_weights(tok_file)
    prefixed = sum(k.startswith("vae.") for k in raw) > len(raw) // 2
    tok_state = {(k[4:] if prefixed else k): v for k, v in raw.items()
                 if (k.startswith("vae.") or not prefixed)}
    tok_state = {k: v for k, v in tok_state.items() if not DROPPED_TOKENIZER_KEYS.match(k)}
    tokenizer = HybridTokenizer(tok_cfg)
    load_into(tokenizer, tok_state, str(tok_file))

    names = (["ema_model.safetensors", "ema_model.bin"] if use_ema else []) + \
            ["model.safetensors", "pytorch_model.bin"]
    llm_file = _weights_file(llm, names)
    state = {k: v for k, v in read_weights(llm_file).items() if not DROPPED_TRANSFORMER_KEYS.match(k)}
    tf_cfg = transformer_config_from_official(read_json(llm / "config.json"), state, tok_cfg)
    transformer = HARTTransformer(tf_cfg)
    load_into(transformer, state, str(llm_file))
    return tokenizer.eval(), transformer.eval()
