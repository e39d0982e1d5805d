"""Official-layout loading, numerical parity with the official code, and conversion."""
from pathlib import Path
import shutil

import pytest
import torch

from hart import HARTPipeline
from hart.check_parity import main as parity_main, run_cases
from hart.checkpoint import CheckpointError
from hart.convert import main as convert_main
from hart.official import load_official
from hart.sampler import SamplingOptions, sample

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny-a"


def test_parity_cli_passes_on_fixture(capsys):
    assert parity_main([str(FIXTURE)]) == 0
    out = capsys.readouterr().out
    assert "0 failed" in out and "sample.img_hybrid" in out


def test_parity_detects_a_wrong_weight(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    state = torch.load(broken / "llm" / "ema_model.bin", weights_only=True)
    state["blocks.1.attn.proj.bias"] = state["blocks.1.attn.proj.bias"] + 0.05
    torch.save(state, broken / "llm" / "ema_model.bin")
    results = {r.name: r for r in run_cases(broken)}
    assert results["tok.f"].passed  # the tokenizer is untouched
    assert not results["tf.logits"].passed
    assert parity_main([str(broken)]) == 1


def test_ema_is_default_and_switchable():
    _, ema = load_official(FIXTURE)
    _, raw = load_official(FIXTURE, use_ema=False)
    assert not torch.equal(ema.head.weight, raw.head.weight)


def test_shape_mismatch_is_reported_by_key(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    state = torch.load(broken / "llm" / "ema_model.bin", weights_only=True)
    state["head.weight"] = state["head.weight"][:10]
    del state["decoder_norm.weight"]
    torch.save(state, broken / "llm" / "ema_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_official(broken)
    assert "head.weight" in str(err.value) and "decoder_norm.weight" in str(err.value)


def test_corrupt_checkpoint_is_named(tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(FIXTURE, broken)
    (broken / "llm" / "ema_model.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="ema_model.bin"):
        load_official(broken)


def test_convert_roundtrip_gives_identical_outputs(tmp_path):
    assert convert_main([str(FIXTURE), str(tmp_path / "converted")]) == 0
    assert not list((tmp_path / "converted").rglob("*.bin"))
    tok_a, tf_a = load_official(FIXTURE)
    converted = HARTPipeline._load_ours(tmp_path / "converted", text_encoder=_StubEncoder(), use_ema=True)
    from safetensors.torch import load_file
    cases = load_file(str(FIXTURE / "cases.safetensors"))
    opts = SamplingOptions(cfg=4.5, top_k=4, diffusion_steps=8)
    outs = []
    for tok, tf in ((tok_a, tf_a), (converted.tokenizer, converted.transformer)):
        out = sample(tf, tok, cases["sample.context"], cases["sample.context_position_ids"], tf.config.patch_nums,
                     opts, torch.Generator().manual_seed(0))
        outs.append(tok.decode(out.fhat_discrete, out.residual))
    assert torch.equal(outs[0], outs[1])
    assert converted.resolutions == [32]


class _StubEncoder:
    """Stands in for the Qwen2 encoder the converted folder references (not needed here)."""
    hidden_size = 24


@pytest.mark.slow
def test_full_size_official_layout_loads(tmp_path):
    """An official-layout folder at the released 0.7B / 1024px shapes loads (shape check)."""
    from bench.make_official_layout import write_random_official
    write_random_official(tmp_path / "hart-0.7b")
    tok, tf = load_official(tmp_path / "hart-0.7b")
    assert sum(p.numel() for p in tf.parameters()) == pytest.approx(732.4e6, rel=2e-3)


def test_qwen2_text_encoder_path(tmp_path):
    """The 'hf' encoder path with a tiny random Qwen2 (the official encoder's architecture), a
    user-supplied system prompt, padding to the context length and a selectable dtype."""
    from hart.text_encoder import TextEncoder, TextEncoderConfig
    folder = _tiny_qwen2(tmp_path / "qwen2-tiny")
    plain = TextEncoder.from_config(TextEncoderConfig(kind="hf", path=str(folder), max_length=8))
    states, mask, positions = plain(["a red apple", "cat"])
    assert states.shape == (2, 8, 24) and states.dtype == torch.float32
    n = int(mask[1].sum())
    assert 0 < n < 8 and mask[1, :n].all() and not mask[1, n:].any()  # right padding
    assert positions[1].tolist() == list(range(n)) + [n - 1] * (8 - n)  # pads repeat the last position
    prefixed = TextEncoder.from_config(TextEncoderConfig(kind="hf", path=str(folder), max_length=8,
                                                         system_prompt="Describe the image in detail."))
    states_sys, _, positions_sys = prefixed(["a red apple", "cat"])
    assert states_sys.shape == states.shape and torch.equal(positions_sys, positions)
    assert not torch.allclose(states_sys, states)  # the prefix is context for the encoder
    half = TextEncoder.from_config(TextEncoderConfig(kind="hf", path=str(folder), max_length=8, dtype="bfloat16"))
    assert next(half.model.parameters()).dtype == torch.bfloat16
    assert half(["cat"])[0].dtype == torch.float32  # states are handed over in fp32


def _tiny_qwen2(folder: Path) -> Path:
    """A tiny random Qwen2 (the official encoder's architecture) with a tokenizer from the MiniLM
    package: both offline. Width 24 matches the fixture's context_dim."""
    from transformers import Qwen2Config, Qwen2Model
    from hart.text_encoder import minilm_path
    torch.manual_seed(0)
    Qwen2Model(Qwen2Config(vocab_size=30522, hidden_size=24, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(Path(minilm_path()) / name, folder / name)
    return folder


def test_official_system_prompt_is_the_released_text():
    import hashlib
    from hart.official import OFFICIAL_SYSTEM_PROMPT
    assert len(OFFICIAL_SYSTEM_PROMPT) == 705 and OFFICIAL_SYSTEM_PROMPT.count("\n") == 9
    assert (hashlib.sha256(OFFICIAL_SYSTEM_PROMPT.encode()).hexdigest()
            == "424f7aa7b1119f8ed1e329140e5941dfe308183bea0af59041dad5527a9b8f20")


def test_official_checkpoints_get_the_official_conditioning_and_top_k(tmp_path):
    """Loading an official checkpoint encodes prompts behind the official system prompt (its
    states dropped, only the prompt's padded slots kept) and samples with top-k 600 then 300;
    system_prompt="" encodes the prompt alone."""
    from hart.official import OFFICIAL_SYSTEM_PROMPT
    folder = _tiny_qwen2(tmp_path / "qwen2-tiny")
    pipe = HARTPipeline.from_pretrained(FIXTURE, text_encoder=str(folder))
    plain = HARTPipeline.from_pretrained(FIXTURE, text_encoder=str(folder), system_prompt="")
    assert pipe.text_encoder.config.system_prompt == OFFICIAL_SYSTEM_PROMPT
    assert plain.text_encoder.config.system_prompt == ""
    assert pipe.sampling_defaults.top_k == (600,) * 7 + (300,) and pipe.sampling_defaults.cfg == 4.5
    assert [pipe.sampling_defaults.top_k_at(si) for si in (0, 6, 7, 12)] == [600, 600, 300, 300]

    prompts = ["a red apple", "cat"]
    states, mask, positions = pipe.text_encoder(prompts)
    states_plain, mask_plain, positions_plain = plain.text_encoder(prompts)
    assert states.shape == states_plain.shape == (2, 8, 24)
    assert not torch.allclose(states, states_plain)  # the system prompt is context for the prompt's slots
    assert torch.equal(mask, mask_plain) and torch.equal(positions, positions_plain)

    te = pipe.text_encoder  # the same computation by hand, as the official encoder does it
    system_ids = te.tokenizer(OFFICIAL_SYSTEM_PROMPT, add_special_tokens=False, return_tensors="pt").input_ids
    ids = te.tokenizer(prompts, padding="max_length", truncation=True, max_length=8, return_tensors="pt").input_ids
    by_pad_id = (ids != te.tokenizer.pad_token_id).long()
    with torch.no_grad():
        full = te.model(input_ids=torch.cat([system_ids.expand(2, -1), ids], 1),
                        attention_mask=torch.cat([torch.ones_like(system_ids).expand(2, -1), by_pad_id], 1))
    assert system_ids.shape[1] > 100  # the whole system prompt went in front
    torch.testing.assert_close(states, full.last_hidden_state[:, system_ids.shape[1]:], rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, by_pad_id) and 0 < int(mask[1].sum()) < 8
    assert torch.equal(positions, by_pad_id.cumsum(1) - 1)
    assert pipe("a red apple", seed=0).images[0].size == (32, 32)


def test_convert_keeps_the_official_defaults_unless_told(tmp_path):
    import json
    from hart.official import OFFICIAL_SYSTEM_PROMPT
    assert convert_main([str(FIXTURE), str(tmp_path / "a")]) == 0
    assert convert_main([str(FIXTURE), str(tmp_path / "b"), "--no-system-prompt"]) == 0
    a = json.loads((tmp_path / "a" / "text_encoder" / "config.json").read_text())
    b = json.loads((tmp_path / "b" / "text_encoder" / "config.json").read_text())
    assert a["system_prompt"] == OFFICIAL_SYSTEM_PROMPT and b["system_prompt"] == ""
    sampling = json.loads((tmp_path / "a" / "model_index.json").read_text())["sampling"]
    assert sampling["top_k"] == [600] * 7 + [300]
