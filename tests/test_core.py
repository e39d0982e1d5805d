"""Core library: tokenizer, transformer, diffusion head, sampler and pipeline on the tiny preset."""
import math

import numpy as np
import pytest
import torch

from hart import HARTPipeline
from hart.pipeline import to_pil
from hart.checkpoint import read_weights
from hart.diffusion import ResidualDiffusionHead, respaced_timesteps
from hart.sampler import SamplingOptions, filter_logits, guidance_ramp, sample, sample_indices, sample_top_k
from hart.tokenizer import phi_index
from hart.transformer import image_rope_angles, text_rope_angles

PROMPTS = ["red apple", "a waving hand"]


@pytest.fixture(scope="module")
def pipe():
    return HARTPipeline.from_preset("tiny")


def images_bytes(result):
    return [im.tobytes() for im in result.images]


# ---------------------------------------------------------------- tokenizer

def test_tokenizer_shapes_and_hybrid_reconstructs_latent(pipe):
    tok = pipe.tokenizer
    sizes = pipe.schedules[64]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f = tok.encode_latent(images)
        indices, residual = tok.encode(images, sizes)
        fhat = tok.indices_to_fhat(indices, sizes)
        P = sizes[-1]
        assert f.shape == (2, tok.config.z_channels, P, P)
        assert [i.shape for i in indices] == [(2, s * s) for s in sizes]
        assert residual.shape == (2, P * P, tok.config.z_channels)
        hybrid_latent = fhat + residual.transpose(1, 2).reshape_as(fhat)
        torch.testing.assert_close(hybrid_latent, f, atol=1e-5, rtol=1e-5)
        discrete, hybrid = tok.decode(fhat), tok.decode(fhat, residual)
    assert discrete.shape == hybrid.shape == (2, 3, 64, 64)
    assert (discrete - hybrid).abs().max() > 1e-3


def test_a_continuous_last_scale_leaves_the_whole_remainder_to_the_residual(pipe):
    tok, sizes = pipe.tokenizer, pipe.schedules[64]
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        f = tok.encode_latent(images)
        indices, residual = tok.encode(images, sizes)
        same, remainder = tok.encode(images, sizes, continuous_last=True)
        coarse = tok.indices_to_fhat(indices, sizes, continuous_last=True)
    assert all(torch.equal(a, b) for a, b in zip(indices, same))
    torch.testing.assert_close(coarse + remainder.transpose(1, 2).reshape_as(coarse), f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(remainder, residual + tok.codebook[indices[-1]], atol=1e-6, rtol=1e-6)
    assert remainder.square().mean() > residual.square().mean()


def test_tokenizer_training_forward_alternates_paths(pipe):
    tok = pipe.tokenizer.train()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    sizes = pipe.schedules[32]
    recon_c, vq_c, _, cont, _ = tok(images, sizes, continuous=True)
    recon_d, vq_d, _, disc, _ = tok(images, sizes, continuous=False)
    assert cont and not disc
    assert recon_c.shape == images.shape and vq_c.ndim == 0
    with torch.no_grad():  # the continuous path decodes f itself
        expected = tok.decoder(tok.post_quant_conv(tok.encode_latent(images)))
    torch.testing.assert_close(recon_c.detach(), expected)
    assert not torch.allclose(recon_c, recon_d)
    (recon_d.square().mean() + vq_d).backward()  # straight-through reaches the encoder
    assert tok.encoder.conv_in.weight.grad is not None and tok.encoder.conv_in.weight.grad.abs().sum() > 0
    paths = {tok(images, sizes, generator=torch.Generator().manual_seed(s)).continuous for s in range(12)}
    assert paths == {True, False}
    tok.zero_grad(set_to_none=True)
    tok.eval()


def test_tokenizer_trains_under_bf16_autocast_with_fp32_code_search(pipe):
    tok = pipe.tokenizer.train()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recon, vq_loss, indices, _, _ = tok(images, pipe.schedules[32], continuous=False)
        latent = tok.encode_latent(images)
        assert latent.dtype == torch.bfloat16
        picked = tok.quantize.nearest_codes(latent.flatten(2).transpose(1, 2).flatten(0, 1))
    (recon.float().square().mean() + vq_loss.float()).backward()
    tok.zero_grad(set_to_none=True)
    tok.eval()
    # the search runs in fp32: same codes as for the upcast latent outside autocast
    z = latent.float().flatten(2).transpose(1, 2).flatten(0, 1)
    assert torch.equal(picked, tok.quantize.nearest_codes(z))


def test_phi_index_uses_float64_ticks():
    assert [phi_index(k, 10, 4) for k in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]
    assert [phi_index(k, 14, 4) for k in range(14)] == [0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


# ---------------------------------------------------------------- positions

def test_text_rope_angles():
    pos = torch.tensor([[0, 1, 2, 2]])
    angles = text_rope_angles(pos, head_dim=8)
    inv = torch.tensor([10000 ** (-2 * j / 8) for j in range(4)])
    assert angles.shape == (1, 4, 8)
    torch.testing.assert_close(angles[0, 2], torch.cat([2 * inv, 2 * inv]))
    torch.testing.assert_close(angles[0, 3], angles[0, 2])  # pads repeat the last position


def test_image_rope_angles_on_finest_grid():
    side, finest, d = 3, 12, 8
    offset = torch.tensor([5, 0])
    angles = image_rope_angles(side, finest, offset, head_dim=d)
    assert angles.shape == (2, 9, d)
    omega = torch.tensor([10000 ** (-4 * j / d) for j in range(2)])
    r, c = 2, 1  # token index r * side + c
    a, b = r * finest / side + 5, c * finest / side + 5
    torch.testing.assert_close(angles[0, r * side + c], torch.cat([a * omega, a * omega, b * omega, b * omega]))
    # the finest scale has unit steps; the unconditional row (offset 0) starts at 0
    fine = image_rope_angles(finest, finest, torch.tensor([0]), head_dim=d)
    assert fine[0, 1, d // 2].item() == pytest.approx(1.0)


# ---------------------------------------------------------------- transformer

@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_kv_cache_sampling_matches_teacher_forcing(pipe, cfg):
    sizes = pipe.schedules[64]
    states, _, positions = pipe.text_encoder(PROMPTS)
    opts = SamplingOptions(cfg=cfg, top_k=8, diffusion_steps=2)
    out = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts,
                 torch.Generator().manual_seed(0), keep_logits=True)
    with torch.no_grad():
        inputs = pipe.tokenizer.quantize.teacher_forcing_inputs(out.indices, sizes)
        cond, hidden_last, _ = pipe.transformer(states, positions, inputs, sizes)
        if cfg:
            uncond, _, _ = pipe.transformer(torch.zeros_like(states), torch.zeros_like(positions), inputs, sizes)
            ramp = torch.tensor(guidance_ramp(cfg, len(sizes)))
            per_token = torch.cat([ramp[k].expand(s * s) for k, s in enumerate(sizes)])[None, :, None]
            cond = (1 + per_token) * cond - per_token * uncond
    cached = torch.cat(out.logits, dim=1)
    assert cached.shape == cond.shape
    torch.testing.assert_close(cached, cond, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("cfg", [0.0, 2.5])
def test_a_continuous_last_scale_draws_no_tokens_there(pipe, cfg):
    """A model that leaves its last scale to the head: the coarser scales draw what the plain model
    draws from the same seed, no last-scale token is drawn, the discrete latent is the coarser
    scales' sum, and the head's condition is the teacher-forced last hidden state with a zero code."""
    import dataclasses
    from hart.transformer import HARTTransformer
    base, tok, sizes = pipe.transformer, pipe.tokenizer, pipe.schedules[64]
    tf = HARTTransformer(dataclasses.replace(base.config, continuous_last_sides=(sizes[-1],))).eval()
    tf.load_state_dict(base.state_dict())
    assert tf.continuous_last(sizes) and not tf.continuous_last(pipe.schedules[32])
    states, _, positions = pipe.text_encoder(PROMPTS)
    opts = SamplingOptions(cfg=cfg, top_k=8, diffusion_steps=2)
    plain = sample(base, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0))
    out = sample(tf, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0))
    assert len(out.indices) == len(sizes) - 1
    assert all(torch.equal(a, b) for a, b in zip(out.indices, plain.indices))
    with torch.no_grad():
        torch.testing.assert_close(out.fhat_discrete, tok.indices_to_fhat(plain.indices, sizes, continuous_last=True))
        inputs = tok.quantize.teacher_forcing_inputs(plain.indices, sizes)
        _, hidden_last, _ = tf(states, positions, inputs, sizes)
        zero_code = tf.decoder_norm(hidden_last + tf.word_embed.bias)
    torch.testing.assert_close(out.head_condition, zero_code, atol=2e-4, rtol=2e-4)
    assert out.residual.shape == plain.residual.shape
    # the plain model's condition carries its drawn code: a different vector
    assert (plain.head_condition - zero_code).abs().max() > 1e-3


def test_a_given_code_on_a_continuous_last_scale_conditions_the_head_only(pipe):
    """Every scale given (`coarse_scales` covering the whole schedule) on a model that leaves its last
    scale to the head: the discrete latent still leaves that scale out, and the head's condition
    carries the given code, as the plain model's carries its own, in sampling and teacher-forced."""
    import dataclasses
    from hart.transformer import HARTTransformer
    from train.common import teacher_forced_condition
    base, tok, sizes = pipe.transformer, pipe.tokenizer, pipe.schedules[64]
    tf = HARTTransformer(dataclasses.replace(base.config, continuous_last_sides=(sizes[-1],))).eval()
    tf.load_state_dict(base.state_dict())
    states, _, positions = pipe.text_encoder(PROMPTS)
    opts = SamplingOptions(cfg=0.0, top_k=8, diffusion_steps=2)
    plain = sample(base, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0))
    hinted = sample(tf, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0), given=plain.indices)
    zero = sample(tf, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0),
                  given=plain.indices[:-1])
    torch.testing.assert_close(hinted.fhat_discrete, zero.fhat_discrete)
    torch.testing.assert_close(hinted.head_condition, plain.head_condition, atol=2e-4, rtol=2e-4)
    assert (hinted.head_condition - zero.head_condition).abs().max() > 1e-3
    with torch.no_grad():
        forced = [teacher_forced_condition(tf, tok, states, positions, plain.indices, sizes, coarse)
                  for coarse in (len(sizes) - 1, len(sizes))]
    torch.testing.assert_close(forced[0], zero.head_condition, atol=2e-4, rtol=2e-4)
    torch.testing.assert_close(forced[1], hinted.head_condition, atol=2e-4, rtol=2e-4)


def test_every_scale_given_draws_nothing_and_the_codes_enter_the_image(pipe):
    """Every scale given on a model whose last scale holds tokens (the bundled model at 128 px): no
    token is drawn, so another seed gives the same tokens, discrete latent and head condition; the
    last codes are in the discrete latent and condition the head, as the drawn ones do."""
    base, tok, sizes = pipe.transformer, pipe.tokenizer, pipe.schedules[64]
    assert not base.continuous_last(sizes)
    states, _, positions = pipe.text_encoder(PROMPTS)
    opts = SamplingOptions(cfg=0.0, top_k=8, diffusion_steps=2)
    plain = sample(base, tok, states, positions, sizes, opts, torch.Generator().manual_seed(0))
    given = sample(base, tok, states, positions, sizes, opts, torch.Generator().manual_seed(1), given=plain.indices)
    assert all(torch.equal(a, b) for a, b in zip(given.indices, plain.indices))
    torch.testing.assert_close(given.fhat_discrete, tok.indices_to_fhat(plain.indices, sizes))
    torch.testing.assert_close(given.head_condition, plain.head_condition, atol=2e-4, rtol=2e-4)
    assert not torch.equal(given.residual, plain.residual)  # the head's noise still follows the seed


def test_resolution_vectors_tell_resolutions_apart_and_keep_cache_parity(pipe):
    """Without a resolution signal the 1x1 token's logits come from the text alone, the same at
    every resolution. With learned vectors (zero: the same model) they differ, and the
    KV-cached sampler still gives the teacher-forced logits at each resolution, CFG included."""
    import dataclasses
    from hart.transformer import HARTTransformer
    base = pipe.transformer
    sides = tuple(pipe.schedules[r][-1] for r in pipe.resolutions)
    tf = HARTTransformer(dataclasses.replace(base.config, resolution_sides=sides)).eval()
    state = base.state_dict()
    tf.load_state_dict({**state, "resolution_embed": torch.zeros(len(sides), base.config.embed_dim)})
    states, _, positions = pipe.text_encoder(PROMPTS)
    first = {}
    for res in pipe.resolutions:
        sizes = pipe.schedules[res]
        opts = SamplingOptions(cfg=2.5, top_k=8, diffusion_steps=2)
        plain = sample(base, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(0),
                       keep_logits=True)
        zero = sample(tf, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(0),
                      keep_logits=True)
        torch.testing.assert_close(torch.cat(zero.logits, 1), torch.cat(plain.logits, 1))
    with torch.no_grad():
        tf.resolution_embed.normal_(generator=torch.Generator().manual_seed(1))
    for res in pipe.resolutions:
        sizes = pipe.schedules[res]
        out = sample(tf, pipe.tokenizer, states, positions, sizes, SamplingOptions(cfg=2.5, top_k=8, diffusion_steps=2),
                     torch.Generator().manual_seed(0), keep_logits=True)
        with torch.no_grad():
            inputs = pipe.tokenizer.quantize.teacher_forcing_inputs(out.indices, sizes)
            cond, _, _ = tf(states, positions, inputs, sizes)
            uncond, _, _ = tf(torch.zeros_like(states), torch.zeros_like(positions), inputs, sizes)
        ramp = torch.tensor(guidance_ramp(2.5, len(sizes)))
        per_token = torch.cat([ramp[k].expand(s * s) for k, s in enumerate(sizes)])[None, :, None]
        torch.testing.assert_close(torch.cat(out.logits, 1), (1 + per_token) * cond - per_token * uncond,
                                   atol=2e-4, rtol=2e-4)
        first[res] = out.logits[0]
    low, high = pipe.resolutions
    assert (first[low] - first[high]).abs().max() > 1e-2


def test_unconditional_prefix_is_kept_until_a_weight_changes(pipe):
    tf = pipe.transformer
    with torch.no_grad():
        keys, _, hidden = tf.unconditional_prefix(16, torch.float32, torch.device("cpu"), 4)
        again, _, _ = tf.unconditional_prefix(16, torch.float32, torch.device("cpu"), 4)
        assert again[0] is keys[0]  # reused, not recomputed
        weight = tf.blocks[0].attn.proj.weight
        weight.mul_(1.5)  # an in-place update (an optimizer step, a load) must invalidate it
        try:
            changed, _, changed_hidden = tf.unconditional_prefix(16, torch.float32, torch.device("cpu"), 4)
        finally:
            weight.div_(1.5)
        assert changed[0] is not keys[0] and not torch.equal(changed_hidden, hidden)
        torch.testing.assert_close(changed[0], keys[0])  # layer 0's keys come before its proj


def test_teacher_forcing_with_dropped_last_scale_tokens(pipe):
    sizes = pipe.schedules[64]
    states, _, positions = pipe.text_encoder(PROMPTS)
    indices = [torch.randint(0, 64, (2, s * s)) for s in sizes]
    inputs = pipe.tokenizer.quantize.teacher_forcing_inputs(indices, sizes)
    keep = torch.stack([torch.randperm(64)[:10].sort().values for _ in range(2)])
    with torch.no_grad():
        full, hidden_full, _ = pipe.transformer(states, positions, inputs, sizes)
        part, hidden_part, _ = pipe.transformer(states, positions, inputs, sizes, keep_last=keep)
    n_before = sum(s * s for s in sizes[:-1])
    assert part.shape == (2, n_before + 10, 64) and hidden_part.shape == (2, 10, 64)
    # last-scale tokens only see their own scale: kept tokens see fewer peers, earlier scales are unchanged
    torch.testing.assert_close(part[:, :n_before], full[:, :n_before], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(hidden_part, hidden_full.gather(1, keep[..., None].expand(-1, -1, 64)), atol=1e-4)


def test_guidance_ramp_linear_with_stale_last_scale():
    assert guidance_ramp(4.5, 4) == [0.0, 1.5, 3.0, 3.0]
    assert guidance_ramp(0.0, 6) == [0.0] * 6


# ---------------------------------------------------------------- diffusion head

def test_respacing_matches_release():
    assert respaced_timesteps(8) == [0, 143, 285, 428, 571, 714, 856, 999]
    assert respaced_timesteps(1) == [999]
    with pytest.raises(ValueError):
        respaced_timesteps(0)


def test_diffusion_head_steps_and_zero_cfg():
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2)
    for p in head.parameters():  # give the zero-initialised layers values so outputs depend on them
        torch.nn.init.normal_(p, std=0.2)
    calls, projections = [], []
    head.net.final_layer.register_forward_hook(lambda *a: calls.append(1))  # one per denoiser step
    head.net.cond_embed.register_forward_hook(lambda *a: projections.append(1))
    z_c, z_u = torch.randn(5, 16), torch.randn(5, 16)
    for steps in (1, 3, 8):
        calls.clear(), projections.clear()
        out = head.sample(z_c, z_u, cfg=2.0, steps=steps, generator=torch.Generator().manual_seed(1))
        assert len(calls) == steps and out.shape == (5, 4)
        assert len(projections) == 1  # the condition is projected once, not per step
    guided0 = head.sample(z_c, z_u, cfg=0.0, steps=4, generator=torch.Generator().manual_seed(3))
    cond_only = head.sample(z_c, None, steps=4, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(guided0, cond_only)
    guided = head.sample(z_c, z_u, cfg=2.0, steps=4, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(guided, cond_only)
    assert out.abs().max() <= head.residual_scale + 1e-6  # x0 is clipped to [-1, 1] before scaling


def test_a_zero_temperature_chain_ignores_an_overflowing_variance():
    """At temperature 0 the chain is the posterior mean alone: a variance output large enough to
    overflow exp() must not leak in (inf * 0 = NaN, which is how a head fine-tune through the
    unrolled chain once diverged), and the sample and its gradients stay finite."""
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2)
    for p in head.parameters():
        torch.nn.init.normal_(p, std=0.2)
    with torch.no_grad():
        head.net.final_layer.linear.bias[4:] = 1e4  # the variance half of the output
    z = torch.randn(5, 16)
    out = head.sample(z, steps=4, temperature=0.0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)
    with torch.no_grad():  # the same draws are consumed, so a temperature-0 call does not shift the stream
        g0, g1 = torch.Generator().manual_seed(2), torch.Generator().manual_seed(2)
        head.sample(z, steps=4, temperature=0.0, generator=g0), head.sample(z, steps=4, generator=g1)
        assert torch.equal(torch.randn(3, generator=g0), torch.randn(3, generator=g1))


def test_residual_scale_sets_the_heads_units():
    """A head at scale s models residual / s: the same net at 0.15 and at 0.6 agrees once the
    targets and samples are converted between the two units."""
    torch.manual_seed(0)
    small = ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2, residual_scale=0.15)
    for p in small.parameters():
        torch.nn.init.normal_(p, std=0.2)
    official = ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2)
    official.load_state_dict(small.state_dict())
    z, target = torch.randn(6, 16), 0.05 * torch.randn(6, 4)
    seeded = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    torch.testing.assert_close(small.loss(target, z, generator=seeded()), official.loss(target * 4, z, generator=seeded()))
    small_out = small.sample(z, steps=4, generator=seeded())
    torch.testing.assert_close(small_out, official.sample(z, steps=4, generator=seeded()) / 4)
    assert small_out.abs().max() <= 0.15 + 1e-6
    with pytest.raises(ValueError, match="residual_scale"):
        ResidualDiffusionHead(token_dim=4, cond_dim=16, width=32, depth=2, residual_scale=0.0)


def test_diffusion_loss_trains():
    torch.manual_seed(0)
    head = ResidualDiffusionHead(token_dim=4, cond_dim=8, width=64, depth=2)
    target = torch.randn(64, 4) * 0.3
    z = torch.randn(64, 8)
    opt = torch.optim.Adam(head.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = head.loss(target, z, generator=gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1])
    assert sum(losses[-20:]) / 20 < 0.8 * sum(losses[:20]) / 20


# ---------------------------------------------------------------- pipeline

def test_pipeline_outputs_and_determinism(pipe):
    a = pipe(PROMPTS, resolution=64, seed=7, num_images=2)
    assert len(a.images) == len(a.discrete_images) == 4
    assert a.images[0].size == (64, 64) and a.seed == 7
    assert set(a.timings) >= {"text", "ar", "diffusion", "decode", "total"}
    b = pipe(PROMPTS, resolution=64, seed=7, num_images=2)
    c = pipe(PROMPTS, resolution=64, seed=8, num_images=2)
    assert images_bytes(a) == images_bytes(b)
    assert images_bytes(a) != images_bytes(c)
    assert a.images[0].tobytes() != a.discrete_images[0].tobytes()


def test_residual_cfg_sets_the_head_guidance_alone():
    pipe = HARTPipeline.from_preset("tiny")
    torch.manual_seed(0)
    for param in pipe.transformer.diffloss.parameters():  # the zero-initialised head ignores its condition
        if param.dim() == 2 and not param.any():
            torch.nn.init.normal_(param, std=0.05)
    base = pipe("red apple", seed=3, resolution=32, cfg=3.0)
    unguided = pipe("red apple", seed=3, resolution=32, cfg=3.0, residual_cfg=0.0)
    # the tokens (and so the discrete image) are unchanged; the head's residual is not
    assert unguided.discrete_images[0].tobytes() == base.discrete_images[0].tobytes()
    assert unguided.images[0].tobytes() != base.images[0].tobytes()
    # by default the head gets the last scale's guidance: naming that value changes nothing
    last = guidance_ramp(3.0, len(pipe.schedules[32]))[-1]
    named = pipe("red apple", seed=3, resolution=32, cfg=3.0, residual_cfg=last)
    assert named.images[0].tobytes() == base.images[0].tobytes()


def test_residual_off_and_same_tokens(pipe):
    on = pipe("red apple", seed=3, resolution=32)
    off = pipe("red apple", seed=3, resolution=32, use_residual=False)
    assert off.discrete_images and off.images == off.discrete_images
    assert off.images[0].tobytes() == off.discrete_images[0].tobytes()
    # the discrete image is decoded from the same tokens whether or not the head runs
    assert on.discrete_images[0].tobytes() == off.discrete_images[0].tobytes()


def test_residual_temperature_scales_only_the_head_noise(pipe):
    base = pipe("red apple", seed=3, resolution=32)
    cold = pipe("red apple", seed=3, resolution=32, residual_temperature=0.0)
    # the tokens (and so the discrete image) are unchanged; the residual differs
    assert cold.discrete_images[0].tobytes() == base.discrete_images[0].tobytes()
    assert cold.images[0].tobytes() != base.images[0].tobytes()
    # at 0 the per-step noise is unused: the head gives the same residual whatever it would have drawn
    head = pipe.transformer.diffloss
    z = torch.randn(6, head.net.cond_embed.in_features)
    start = torch.randn(6, head.net.token_dim)
    steps = [torch.randn(6, head.net.token_dim) for _ in range(4)]
    a = head.sample(z, steps=4, temperature=0.0, noise=(start, steps))
    b = head.sample(z, steps=4, temperature=0.0, noise=(start, [torch.randn_like(t) for t in steps]))
    c = head.sample(z, steps=4, temperature=1.0, noise=(start, [torch.randn_like(t) for t in steps]))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_hybrid_only_skips_the_discrete_decode(pipe, monkeypatch):
    calls = []
    decode = pipe.tokenizer.decode
    monkeypatch.setattr(pipe.tokenizer, "decode", lambda *a, **k: calls.append(len(a)) or decode(*a, **k))
    both = pipe("red apple", seed=3, resolution=32)
    assert len(calls) == 2
    calls.clear()
    hybrid_only = pipe("red apple", seed=3, resolution=32, decode_discrete=False)
    assert len(calls) == 1
    assert hybrid_only.discrete_images == []
    assert hybrid_only.images[0].tobytes() == both.images[0].tobytes()
    # without the head, the discrete image is the output and is still decoded
    off = pipe("red apple", seed=3, resolution=32, use_residual=False, decode_discrete=False)
    assert off.images[0].tobytes() == both.discrete_images[0].tobytes()


def test_stream_yields_every_scale_then_result(pipe):
    items = list(pipe.stream("red apple", seed=1, resolution=64))
    scales = [i[0] for i in items[:-1]]
    assert scales == list(range(len(pipe.schedules[64]) - 1))
    final = items[-1]
    assert final.images[0].tobytes() == pipe("red apple", seed=1, resolution=64).images[0].tobytes()


def test_unseen_schedule_runs(pipe):
    states, _, positions = pipe.text_encoder(PROMPTS)
    out = sample(pipe.transformer, pipe.tokenizer, states, positions, (1, 3, 5, 8), SamplingOptions(cfg=1.0),
                 torch.Generator().manual_seed(0))
    assert out.fhat_discrete.shape == (2, 8, 8, 8) and out.residual.shape == (2, 64, 8)


def test_save_load_roundtrip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = HARTPipeline.from_pretrained(tmp_path / "model")
    assert loaded.resolutions == pipe.resolutions
    a = pipe("red apple", seed=5, resolution=64)
    b = loaded("red apple", seed=5, resolution=64)
    assert a.images[0].tobytes() == b.images[0].tobytes()


def test_warm_start_loads_matching_tensors_and_names_the_rest():
    from dataclasses import replace
    from hart.checkpoint import load_matching
    from hart.presets import get_preset
    from hart.transformer import HARTTransformer
    cfg = get_preset("tiny").transformer
    torch.manual_seed(0)
    source = HARTTransformer(cfg)
    target = HARTTransformer(replace(cfg, token_dim=cfg.token_dim * 2))
    fresh = load_matching(target, source.state_dict())
    shapes = {k: v.shape for k, v in source.state_dict().items()}
    changed = sorted(k for k, v in target.state_dict().items() if v.shape != shapes[k])
    assert fresh == changed and "word_embed.weight" in fresh
    kept = next(k for k in shapes if k not in fresh and k.startswith("blocks.0."))
    assert torch.equal(target.state_dict()[kept], source.state_dict()[kept])


@pytest.mark.parametrize("kwargs, message", [
    (dict(resolution=999), "resolution 999"),
    (dict(diffusion_steps=-1), "diffusion_steps"),
    (dict(cfg=float("nan")), "cfg"),
    (dict(temperature=0.0), "temperature"),
    (dict(residual_temperature=-0.5), "residual_temperature"),
    (dict(residual_cfg=-1.0), "residual_cfg"),
    (dict(num_images=0), "num_images"),
])
def test_bad_input_raises_clear_errors(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe("red apple", **kwargs)


def test_empty_prompt_list(pipe):
    with pytest.raises(ValueError, match="empty"):
        pipe([])


def test_generate_cli_writes_png(pipe, tmp_path, capsys):
    from PIL import Image
    from hart.generate import main
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "apple.png"
    assert main(["red apple", "--model", str(tmp_path / "model"), "--out", str(out), "--num-images", "2",
                 "--resolution", "32", "--discrete-out", str(tmp_path / "d.png")]) == 0
    assert Image.open(out).size == (64, 32) and (tmp_path / "d.png").is_file()
    assert "seed 0" in capsys.readouterr().out


def test_bf16_autocast_runs_the_matmuls_in_bf16(pipe, monkeypatch):
    seen = []
    forward = torch.nn.Linear.forward
    monkeypatch.setattr(torch.nn.Linear, "forward", lambda self, x: seen.append(out := forward(self, x)) or out)
    pipe("red apple", seed=0, resolution=32)
    assert {t.dtype for t in seen} == {torch.float32}
    seen.clear()
    pipe.autocast_dtype = torch.bfloat16
    try:
        result = pipe("red apple", seed=0, resolution=32)
    finally:
        pipe.autocast_dtype = None
    assert torch.bfloat16 in {t.dtype for t in seen}
    assert result.images[0].size == (32, 32)


def test_bf16_weights_held_once_match_plain_autocast_and_restore_fp32(pipe, tmp_path):
    """Holding the matmul weights in bf16 gives exactly what autocast's per-call casts give,
    and setting fp32 back restores the original weights bit for bit."""
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    fp32 = pipe("red apple", seed=3, resolution=32, num_images=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, cast on every call
        plain = pipe("red apple", seed=3, resolution=32, num_images=2)
    pipe.autocast_dtype = torch.bfloat16
    try:
        assert pipe.transformer.head.weight.dtype == torch.bfloat16
        held = pipe("red apple", seed=3, resolution=32, num_images=2)
        pipe.save_pretrained(tmp_path / "saved")  # writes the fp32 masters, keeps bf16 held
        assert pipe.transformer.head.weight.dtype == torch.bfloat16
    finally:
        pipe.autocast_dtype = None
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    saved = read_weights(tmp_path / "saved" / "transformer" / "model.safetensors")
    assert saved["head.weight"].dtype == torch.float32
    for a, b in zip(plain.images + plain.discrete_images, held.images + held.discrete_images):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    again = pipe("red apple", seed=3, resolution=32, num_images=2)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(fp32.images, again.images))


def test_top_k_draw_over_candidates_matches_the_filtered_full_draw():
    """The fast top-k draw (softmax and draw over k entries) has the distribution of filtering
    the logits to the top k and drawing over the whole vocabulary; both match the softmax."""
    logits = torch.tensor([0.5, 2.0, -1.0, 1.5, 0.0, 1.8, -3.0, 0.2]).repeat(1, 4000, 1)  # [1, 4000, 8]
    fast = sample_top_k(logits, 3, 0.7, torch.Generator().manual_seed(0))
    full = sample_indices(filter_logits(logits, 3), 3, 0.7, torch.Generator().manual_seed(1))
    # only the three largest logits; the filtered (zero-probability) entries are never drawn
    assert set(fast.unique().tolist()) == set(full.unique().tolist()) == {1, 3, 5}
    expected = torch.softmax(torch.tensor([2.0, 1.5, 1.8]) / 0.7, 0)
    for draws in (fast, full):
        freq = torch.stack([(draws == i).float().mean() for i in (1, 3, 5)])
        assert torch.allclose(freq, expected, atol=0.025), (freq, expected)
    again = sample_top_k(logits, 3, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(fast, again)  # one seeded generator: the same draw


def test_top_k_schedule_applies_one_k_per_scale(pipe):
    """top_k as a list: entry si filters scale si, the last entry repeats for later scales."""
    states, _, positions = pipe.text_encoder(PROMPTS)
    sizes = pipe.schedules[64]

    def run(top_k):
        return sample(pipe.transformer, pipe.tokenizer, states, positions, sizes,
                      SamplingOptions(cfg=2.0, top_k=top_k, diffusion_steps=2), torch.Generator().manual_seed(4),
                      keep_logits=True)

    greedy_first = run([1, 0])
    for si, (idx, logits) in enumerate(zip(greedy_first.indices, greedy_first.logits)):
        is_argmax = torch.equal(idx, logits.argmax(-1))
        assert is_argmax if si == 0 else not is_argmax, si  # only the first scale is greedy
    all_greedy = run([1])
    assert all(torch.equal(i, l.argmax(-1)) for i, l in zip(all_greedy.indices, all_greedy.logits))
    assert torch.equal(run(1).fhat_discrete, all_greedy.fhat_discrete)  # a 1-entry list equals the integer
    for bad in ([], [3, -1], [2.5]):
        with pytest.raises(ValueError, match="top_k"):
            SamplingOptions(top_k=bad).validate()


def test_top_k_schedule_survives_save_and_load(pipe, tmp_path):
    pipe.sampling_defaults.top_k, held = (6, 3), pipe.sampling_defaults.top_k
    try:
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        pipe.sampling_defaults.top_k = held
    again = HARTPipeline.from_pretrained(tmp_path / "saved")
    assert again.sampling_defaults.top_k == (6, 3)
    assert again("red apple", seed=1, resolution=32).images[0].size == (32, 32)


def test_stored_slice_of_a_seeded_generation():
    """A few pixels of a seeded tiny-preset generation, stored: any change to the sampler, the
    head or the decoder that moves the output shows here (±2 levels allow for CPU kernels)."""
    pipe = HARTPipeline.from_preset("tiny")
    result = pipe("red apple", resolution=32, seed=0, cfg=3.0)
    hybrid = np.asarray(result.images[0])[12:15, 12:15].reshape(-1).astype(int)
    discrete = np.asarray(result.discrete_images[0])[12:15, 12:15].reshape(-1).astype(int)
    expected_hybrid = [114, 136, 167, 182, 121, 119, 195, 139, 134, 136, 161, 185, 187, 146, 163, 241, 209, 163,
                       135, 159, 143, 206, 133, 175, 214, 190, 140]
    expected_discrete = [88, 48, 130, 108, 96, 161, 138, 92, 134, 86, 48, 191, 141, 68, 129, 127, 92, 113, 82, 29,
                         217, 123, 50, 189, 128, 73, 208]
    assert np.abs(hybrid - expected_hybrid).max() <= 2, hybrid.tolist()
    assert np.abs(discrete - expected_discrete).max() <= 2, discrete.tolist()


def test_a_batch_gives_each_prompt_the_image_its_seed_gives_alone(pipe):
    """Image i of a batch is drawn with seed + i from its own generator: the same tokens as the
    prompt alone with that seed, and the same pixels up to batched-kernel rounding."""
    prompts = ["red apple", "a waving hand", "cat"]
    batch = pipe(prompts, resolution=64, seed=5)
    assert batch.seeds == [5, 6, 7] and batch.seed == 5
    listed = pipe(prompts, resolution=64, seed=[5, 6, 7])
    assert images_bytes(listed) == images_bytes(batch)
    states, _, positions = pipe.text_encoder(prompts)
    opts = SamplingOptions(**{**vars(pipe.sampling_defaults), "diffusion_steps": 4})
    together = sample(pipe.transformer, pipe.tokenizer, states, positions, pipe.schedules[64], opts,
                      [torch.Generator().manual_seed(s) for s in (5, 6, 7)])
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, resolution=64, seed=5 + i)
        for a, b in ((batch.images[i], alone.images[0]), (batch.discrete_images[i], alone.discrete_images[0])):
            assert np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 2
        one = sample(pipe.transformer, pipe.tokenizer, states[i:i + 1], positions[i:i + 1], pipe.schedules[64],
                     opts, torch.Generator().manual_seed(5 + i))
        assert all(torch.equal(t[i:i + 1], o) for t, o in zip(together.indices, one.indices))
        torch.testing.assert_close(together.residual[i:i + 1], one.residual, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one integer"):
        pipe(prompts, seed=[1, 2])


def test_given_scales_are_taken_and_the_rest_drawn(pipe):
    """`given` indices replace the first scales' draws; the transformer still runs them, so a
    generation given all its own tokens reproduces itself, and a partial one keeps the prefix."""
    sizes = pipe.schedules[64]
    states, _, positions = pipe.text_encoder(PROMPTS)
    opts = SamplingOptions(cfg=2.5, top_k=8, diffusion_steps=2)
    plain = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(0))
    other = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(1))
    mixed = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(0),
                   given=other.indices[:2])
    assert all(torch.equal(a, b) for a, b in zip(mixed.indices[:2], other.indices[:2]))
    assert not all(torch.equal(a, b) for a, b in zip(mixed.indices[2:], plain.indices[2:]))
    replay = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, torch.Generator().manual_seed(5),
                    given=plain.indices)
    torch.testing.assert_close(replay.fhat_discrete, plain.fhat_discrete)
    torch.testing.assert_close(replay.head_condition, plain.head_condition, atol=2e-4, rtol=2e-4)
    # every drawn scale given and an unguided head: the unconditional rows are skipped, nothing else changes
    assert replay.unconditional_condition is not None
    unguided = sample(pipe.transformer, pipe.tokenizer, states, positions, sizes,
                      SamplingOptions(cfg=2.5, top_k=8, diffusion_steps=2, residual_cfg=0.0),
                      torch.Generator().manual_seed(5), given=plain.indices)
    assert unguided.unconditional_condition is None
    torch.testing.assert_close(unguided.head_condition, plain.head_condition, atol=2e-4, rtol=2e-4)
    with pytest.raises(ValueError, match="given scale 1"):
        sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, given=[plain.indices[0]] * 2)
    with pytest.raises(ValueError, match="6 given scales for a schedule of 5"):
        sample(pipe.transformer, pipe.tokenizer, states, positions, sizes, opts, given=plain.indices + [plain.indices[-1]])


def test_coarse_scales_come_from_the_lowest_resolution_image(pipe):
    """Above the lowest resolution, `coarse_scales` takes the first scales from the lowest
    resolution's generation (same generators, drawn first), upsampled and re-encoded."""
    from hart.sampler import iter_sample, sample_residual
    opts = SamplingOptions(**{**vars(pipe.sampling_defaults), "top_k": 8, "diffusion_steps": 2})
    result = pipe("red apple", resolution=64, seed=4, top_k=8, diffusion_steps=2, coarse_scales=3)
    assert "coarse" in result.timings
    assert images_bytes(result) == images_bytes(
        pipe("red apple", resolution=64, seed=4, top_k=8, diffusion_steps=2, coarse_scales=3))
    one_pass = pipe("red apple", resolution=64, seed=4, top_k=8, diffusion_steps=2)
    assert images_bytes(result) != images_bytes(one_pass)
    # the same construction by hand
    generator = [torch.Generator().manual_seed(4)]
    states, _, positions = pipe.text_encoder(["red apple"])
    with torch.no_grad():
        low = sample(pipe.transformer, pipe.tokenizer, states, positions, pipe.schedules[32], opts, generator)
        given = pipe.tokenizer.encode_upsampled(pipe.tokenizer.decode(low.fhat_discrete, low.residual),
                                                pipe.schedules[64])[0][:3]
        assert [g.shape[1] for g in given] == [1, 4, 16]
        out = sample(pipe.transformer, pipe.tokenizer, states, positions, pipe.schedules[64], opts, generator,
                     given=given)
        hybrid = pipe.tokenizer.decode(out.fhat_discrete, out.residual)
    assert result.images[0].tobytes() == to_pil(hybrid)[0].tobytes()
    # the lowest resolution has nothing to take its scales from: unchanged
    assert images_bytes(pipe("red apple", resolution=32, seed=4, coarse_scales=3)) == \
        images_bytes(pipe("red apple", resolution=32, seed=4))
    with pytest.raises(ValueError, match="has only 5 scales"):
        pipe("red apple", resolution=64, seed=4, coarse_scales=6)
    with pytest.raises(ValueError, match="coarse_scales must be an integer >= 0"):
        pipe("red apple", resolution=64, seed=4, coarse_scales=-1)


@pytest.mark.parametrize("last_to_head", [False, True])
def test_coarse_remainder_keeps_the_lowest_resolution_image_whole(pipe, monkeypatch, last_to_head):
    """With every scale taken from the lowest resolution's image, `coarse_remainder` adds that
    image's continuous remainder to the head's residual: with the head silenced, the hybrid image is
    the upsampled low image's whole latent decoded; the discrete image is the same as without it.
    Where the last scale is the head's, its codes stay out of both and the remainder holds that scale."""
    import hart.pipeline as pipeline_module
    from train.common import images_to_tensor
    if last_to_head:
        monkeypatch.setattr(pipe.transformer.config, "continuous_last_sides", (8,))
    kwargs = dict(resolution=64, seed=4, top_k=8, diffusion_steps=2, coarse_scales=5)
    codes_only = pipe("red apple", **kwargs)
    with_head = pipe("red apple", coarse_remainder=True, **kwargs)
    assert [im.tobytes() for im in with_head.discrete_images] == [im.tobytes() for im in codes_only.discrete_images]
    assert images_bytes(with_head) != images_bytes(codes_only)

    def silent_head(transformer, tokens, opts, generator=None, noise=None):
        return torch.zeros(*tokens.head_condition.shape[:2], transformer.config.token_dim)

    monkeypatch.setattr(pipeline_module, "sample_residual", silent_head)
    silenced = pipe("red apple", coarse_remainder=True, **kwargs)
    # by hand: the 32 px generation from the same generator, upsampled, its whole latent decoded
    opts = SamplingOptions(**{**vars(pipe.sampling_defaults), "top_k": 8, "diffusion_steps": 2})
    states, _, positions = pipe.text_encoder(["red apple"])
    tok = pipe.tokenizer
    with torch.no_grad():
        low = sample(pipe.transformer, tok, states, positions, pipe.schedules[32], opts,
                     [torch.Generator().manual_seed(4)])
        low_image = tok.decode(low.fhat_discrete, low.residual)
        up = torch.nn.functional.interpolate(low_image, size=(64, 64), mode="bicubic").clamp(-1, 1)
        whole = images_to_tensor(to_pil(tok.decode(tok.encode_latent(up))))
    assert (images_to_tensor(silenced.images) - whole).abs().max() <= 2 / 127.5
    assert (images_to_tensor(silenced.images) - images_to_tensor(codes_only.discrete_images)).abs().max() > 8 / 127.5
    with pytest.raises(ValueError, match="coarse_remainder needs every scale"):
        pipe("red apple", resolution=64, seed=4, coarse_scales=4, coarse_remainder=True)


@pytest.mark.parametrize("coarse", [2, 5])
def test_head_tokens_with_coarse_scales_still_add_up_to_the_latent(pipe, coarse, monkeypatch):
    """The head's training targets built the sampler's way: the first scales (or all of them) are the
    low-resolution image's, and the tokens plus the residual still give the image's own latent."""
    from train.common import head_tokens
    tok, tf, sizes = pipe.tokenizer, pipe.transformer, pipe.schedules[64]
    assert coarse <= len(sizes)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    low = torch.nn.functional.interpolate(images, size=(32, 32), mode="area")
    with torch.no_grad():
        indices, residual = head_tokens(tok, tf, images, sizes, low, coarse_scales=coarse)
        given = tok.encode_upsampled(low, sizes)[0][:coarse]
        plain, _ = tok.encode(images, sizes)
        latent = tok.encode_latent(images)
        rebuilt = tok.indices_to_fhat(indices, sizes) + residual.transpose(1, 2).reshape_as(latent)
    assert len(indices) == len(sizes)
    assert all(torch.equal(a, b) for a, b in zip(indices[:coarse], given))
    assert not all(torch.equal(a, b) for a, b in zip(indices, plain))
    torch.testing.assert_close(rebuilt, latent, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="lowest resolution"):
        head_tokens(tok, tf, images, sizes, None, coarse_scales=2)
    if coarse < len(sizes):
        with pytest.raises(ValueError, match="coarse_remainder needs"):
            head_tokens(tok, tf, images, sizes, low, coarse_scales=coarse, coarse_remainder=True)
        return
    # with the low image's remainder kept, the target is what the image holds beyond its whole latent,
    # the same whether the last scale's codes are in the image or the head's
    targets = []
    for last in ((), (sizes[-1],)):
        monkeypatch.setattr(tf.config, "continuous_last_sides", last)
        with torch.no_grad():
            kept, beyond = head_tokens(tok, tf, images, sizes, low, coarse_scales=coarse, coarse_remainder=True)
            _, low_remainder = tok.encode_upsampled(low, sizes, bool(last))
            rebuilt = (tok.indices_to_fhat(kept, sizes, bool(last))
                       + (low_remainder + beyond).transpose(1, 2).reshape_as(latent))
        assert all(torch.equal(a, b) for a, b in zip(kept, indices))
        torch.testing.assert_close(rebuilt, latent, atol=1e-4, rtol=1e-4)
        targets.append(beyond)
    torch.testing.assert_close(targets[0], targets[1], atol=1e-4, rtol=1e-4)
