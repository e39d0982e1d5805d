"""Write a checkpoint folder in the official HART layout with random weights at the released
0.7B / 1024px shapes (llm/ + tokenizer/, pickled .bin files with the training buffers), to
check the loader without downloading the real weights.

    python -m bench.make_official_layout OUT_DIR
"""
from __future__ import annotations

import json
from pathlib import Path
import sys

import torch

from hart.presets import get_preset
from hart.tokenizer import HybridTokenizer
from hart.transformer import HARTTransformer


def write_random_official(out: str | Path, with_mask: bool = True) -> Path:
    out = Path(out)
    preset = get_preset("hart-0.7b")
    tf_cfg, tok_cfg = preset.transformer, preset.tokenizer
    (out / "llm").mkdir(parents=True, exist_ok=True)
    (out / "tokenizer").mkdir(parents=True, exist_ok=True)
    transformer = HARTTransformer(tf_cfg)
    state = transformer.state_dict()
    levels = [0] * tf_cfg.context_token + [k for k, s in enumerate(tf_cfg.patch_nums) if k > 0 for _ in range(s * s)]
    state["lvl_1L"] = torch.tensor(levels)[None]
    if with_mask:  # the official files carry this 9750 x 9750 training mask (~380 MB)
        lv = state["lvl_1L"][0]
        state["attn_bias_for_masking"] = torch.where(lv[:, None] >= lv[None], 0.0, float("-inf"))[None, None]
    for i in range(tf_cfg.depth):
        state[f"blocks.{i}.attn.zero_k_bias"] = torch.zeros(tf_cfg.embed_dim)
    torch.save(state, out / "llm" / "ema_model.bin")
    (out / "llm" / "config.json").write_text(json.dumps({
        "model_type": "hart_transformer_t2i", "context_token": tf_cfg.context_token,
        "context_dim": tf_cfg.context_dim, "embed_dim": tf_cfg.embed_dim, "depth": tf_cfg.depth,
        "num_heads": tf_cfg.num_heads, "mlp_ratio": 4.0, "norm_eps": 1e-6, "attn_type": "llama",
        "mlp_type": "llama", "disable_aln": True, "shared_aln": False, "use_timestep_embed": True,
        "attn_l2_norm": False, "use_cross_attn": False, "use_context_norm": False,
        "patch_nums": list(tf_cfg.patch_nums), "diff_width": 1024, "diff_depth": 6,
        "num_sampling_steps": "8", "sampler": "iddpm", "vae_path": None}, indent=2))
    tokenizer = HybridTokenizer(tok_cfg)
    tok_state = {f"vae.{k}": v for k, v in tokenizer.state_dict().items()}
    tok_state["vae.quantize.ema_vocab_hit_SV"] = torch.zeros(16, tok_cfg.vocab_size)
    torch.save(tok_state, out / "tokenizer" / "pytorch_model.bin")
    (out / "tokenizer" / "config.json").write_text(json.dumps({
        "model_type": "hart_autoencoder_with_disc", "vocab_size": tok_cfg.vocab_size,
        "z_channels": tok_cfg.z_channels, "ch": tok_cfg.ch, "ch_mult": list(tok_cfg.ch_mult),
        "quant_conv_ks": 3, "quant_resi": 0.5, "share_quant_resi": 4, "quantizer_type": "var_hybrid",
        "v_patch_nums": list(range(1, 17)), "double_decoder": False}, indent=2))
    return out


if __name__ == "__main__":
    print(write_random_official(sys.argv[1]))
