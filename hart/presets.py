"""Named model configurations: a registry the pipeline, trainers and benchmarks share."""
from __future__ import annotations

from dataclasses import dataclass, field

from .text_encoder import TextEncoderConfig
from .tokenizer import TokenizerConfig
from .transformer import TransformerConfig


@dataclass
class Preset:
    tokenizer: TokenizerConfig
    transformer: TransformerConfig
    text_encoder: TextEncoderConfig
    resolutions: dict[int, tuple[int, ...]]   # image side in pixels -> scale schedule
    sampling: dict = field(default_factory=dict)


def _tiny() -> Preset:
    """Seconds-fast model for tests: 8x tokenizer, 2-layer transformer, byte-level text encoder."""
    text = TextEncoderConfig(kind="tiny", max_length=16, hidden_size=32, num_layers=2)
    tok = TokenizerConfig(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1,
                          attn_at_lowest_level=False, mid_attn=True)
    tf = TransformerConfig(vocab_size=64, token_dim=8, context_token=16, context_dim=32, embed_dim=64, depth=2,
                           num_heads=4, mlp_hidden=128, patch_nums=(1, 2, 3, 4), diff_width=32, diff_depth=2)
    return Preset(tok, tf, text, {32: (1, 2, 3, 4), 64: (1, 2, 4, 6, 8)},
                  {"cfg": 3.0, "top_k": 0, "top_p": 0.0, "diffusion_steps": 8})


def _emoji() -> Preset:
    """The bundled CPU model (assets/hart-emoji): 64 and 128 px from one set of weights."""
    text = TextEncoderConfig(kind="minilm", max_length=16)
    # ch 32 / (1, 1, 2, 4): 28 img/s fp32 training on 2 cores vs 9 img/s for ch 64 / (1, 1, 2, 2)
    tok = TokenizerConfig(vocab_size=1024, z_channels=32, ch=32, ch_mult=(1, 1, 2, 4), num_res_blocks=1,
                          attn_at_lowest_level=False, mid_attn=False)
    resolutions = {64: (1, 2, 3, 4, 6, 8), 128: (1, 2, 3, 4, 6, 8, 11, 16)}
    tf = TransformerConfig(vocab_size=1024, token_dim=32, context_token=16, context_dim=384, embed_dim=256,
                           depth=6, num_heads=4, mlp_hidden=768, patch_nums=resolutions[128],
                           diff_width=512, diff_depth=4, residual_scale=0.15, resolution_sides=(8, 16),
                           continuous_last_sides=(16,), head_context=3)
    return Preset(tok, tf, text, resolutions,
                  {"cfg": 2.0, "top_k": 50, "top_p": 0.0, "temperature": 0.5, "diffusion_steps": 8,
                   "residual_temperature": 0.0, "residual_cfg": 0.0})


def _hart_07b() -> Preset:
    """The released 0.7B shapes (random weights here): for benchmarks and loader checks."""
    text = TextEncoderConfig(kind="tiny", max_length=300, hidden_size=1536, num_layers=1)
    tok = TokenizerConfig()
    tf = TransformerConfig(embed_dim=1536, depth=24, num_heads=24, context_token=300, context_dim=1536)
    return Preset(tok, tf, text, {512: (1, 2, 3, 4, 6, 9, 13, 18, 24, 32),
                                  1024: (1, 2, 3, 4, 5, 7, 9, 12, 16, 21, 27, 36, 48, 64)},
                  {"cfg": 4.5, "top_k": 600, "top_p": 0.0, "diffusion_steps": 8})


PRESETS = {"tiny": _tiny, "emoji": _emoji, "hart-0.7b": _hart_07b}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
