"""Probe: how much could a residual head gain if trained on *sampled* last-scale tokens?

Teacher-forced transformer on dataset images (exact captions); the last-scale tokens are drawn
from the guided logits at the model's default settings, as generation does. Reports PSNR gains
over the discrete-only image of: the shipped head's sample, the soft expected code (sum p_k c_k,
a zero-training stand-in for what a head could learn from the hidden state), and the true residual.
    PYTHONPATH=. python runs/sampled-residual/probe.py 128
"""
import sys
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import guidance_ramp
from train.data import load_dataset
from train.metrics import psnr

res = int(sys.argv[1]) if len(sys.argv) > 1 else 128
count = 192
torch.manual_seed(0)
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
d = pipe.sampling_defaults
scales = pipe.schedules[res]
ds = load_dataset("data/emoji", res, "all", caption_variation=False)
picked = torch.randperm(len(ds.captions), generator=torch.Generator().manual_seed(0))[:count]
t = guidance_ramp(d.cfg, len(scales))[-1]
gen = torch.Generator().manual_seed(0)
rows = {k: [] for k in ("agree", "head_true", "head_sampled", "soft", "soft_t1", "true_res", "soft_plus_head")}
with torch.no_grad():
    for start in range(0, count, 32):
        ids = picked[start:start + 32].tolist()
        images = torch.stack([ds.image(i) for i in ids])
        indices, residual = tok.encode(images, scales)
        fhat = tok.indices_to_fhat(indices, scales)
        inputs = tok.quantize.teacher_forcing_inputs(indices, scales)
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        logits_c, hidden, _ = tf(states, positions, inputs, scales)
        logits_u, _, _ = tf(torch.zeros_like(states), torch.zeros_like(positions), inputs, scales)
        P2 = scales[-1] ** 2
        logits = (1 + t) * logits_c[:, -P2:] - t * logits_u[:, -P2:]
        top = logits.topk(d.top_k, -1)
        probs = (top.values / d.temperature).softmax(-1)
        choice = torch.multinomial(probs.flatten(0, 1), 1, generator=gen).view(probs.shape[:2])
        sampled = top.indices.gather(-1, choice[..., None])[..., 0]
        cb = tok.codebook
        true_c, samp_c = cb[indices[-1]], cb[sampled]
        side = scales[-1]
        to_map = lambda v: v.transpose(1, 2).reshape(len(ids), -1, side, side)
        fhat_s = fhat - to_map(true_c) + to_map(samp_c)
        soft = probs @ cb[top.indices].squeeze(-2) if False else torch.einsum("bnk,bnkd->bnd", probs, cb[top.indices])
        p1 = logits_c[:, -P2:].softmax(-1)
        soft1 = p1 @ cb
        base = psnr(tok.decode(fhat_s), images)
        def gain(f, r=None):
            return (psnr(tok.decode(f, r), images) - base).tolist()
        z_s = tf.diffusion_condition(hidden, samp_c)
        head_s = tf.diffloss.sample(z_s.flatten(0, 1), steps=8, temperature=0.0,
                                    generator=torch.Generator().manual_seed(0)).view_as(residual)
        z_t = tf.diffusion_condition(hidden, true_c)
        head_t = tf.diffloss.sample(z_t.flatten(0, 1), steps=8, temperature=0.0,
                                    generator=torch.Generator().manual_seed(0)).view_as(residual)
        rows["agree"] += (sampled == indices[-1]).float().mean(1).tolist()
        rows["head_sampled"] += gain(fhat_s, head_s)
        rows["head_true"] += (psnr(tok.decode(fhat, head_t), images) - psnr(tok.decode(fhat), images)).tolist()
        rows["soft"] += gain(fhat - to_map(true_c) + to_map(soft))
        rows["soft_t1"] += gain(fhat - to_map(true_c) + to_map(soft1))
        rows["soft_plus_head"] += gain(fhat - to_map(true_c) + to_map(soft), head_s)
        rows["true_res"] += gain(fhat, residual)  # ceiling: true tokens + true residual vs sampled discrete
for k, v in rows.items():
    print(f"{res}px {k:15s} {sum(v) / len(v):+.3f}")
