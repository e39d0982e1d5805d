"""Probe: in free-running generation (shipped model, default settings), what would decoding the last scale
with the expected code (sum_k p_k c_k under the guided logits at temperature T) add over the sampled code,
on prompts whose discrete image retrieves its emoji? Compare with the shipped head's gain on the same tokens.
    PYTHONPATH=. python runs/sampled-residual/soft_generation.py 128 100
"""
import sys
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import sample
from train.data import load_dataset
from train.evaluate import retrieval_features, retrieve
from train.metrics import psnr

res, count = int(sys.argv[1]), int(sys.argv[2])
pipe = HARTPipeline.from_pretrained(sys.argv[3] if len(sys.argv) > 3 else "assets/hart-emoji")
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
scales = pipe.schedules[res]
ds = load_dataset("data/emoji", res, "all", caption_variation=False)
n = len(ds.captions)
database = torch.cat([retrieval_features(torch.stack([ds.image(i) for i in range(s, min(n, s + 256))]))
                      for s in range(0, n, 256)])
picked = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count].tolist()
temps = (0.5, 1.0, 2.0)
gains = {k: [] for k in ["head"] + [f"soft_T{t}" for t in temps] + ["soft_T1+head"]}
agree = []
side = scales[-1]
with torch.no_grad():
    for start in range(0, count, 50):
        ids = picked[start:start + 50]
        images = torch.stack([ds.image(i) for i in ids])
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        out = sample(tf, tok, states, positions, scales, pipe.sampling_defaults, torch.Generator().manual_seed(start),
                     keep_logits=True)
        base_img = tok.decode(out.fhat_discrete)
        hit = retrieve(base_img, database, torch.tensor(ids))[0] == 0
        base = psnr(base_img, images)
        to_map = lambda v: v.transpose(1, 2).reshape(len(ids), -1, side, side)
        sampled_code = tok.codebook[out.indices[-1]]
        true_idx, _ = tok.encode(images, scales)
        agree += (true_idx[-1] == out.indices[-1]).float().mean(1)[hit].tolist()
        def add(name, f, r=None):
            gains[name] += (psnr(tok.decode(f, r), images) - base)[hit].tolist()
        add("head", out.fhat_discrete, out.residual)
        for t in temps:
            soft = (out.logits[-1] / t).softmax(-1) @ tok.codebook
            f = out.fhat_discrete - to_map(sampled_code) + to_map(soft)
            add(f"soft_T{t}", f)
            if t == 1.0:
                add("soft_T1+head", f, out.residual)
print(f"{res}px: {len(agree)} of {count} retrieved, last-scale agreement {sum(agree) / len(agree):.3f}")
for k, v in gains.items():
    print(f"{res}px {k:14s} {sum(v) / len(v):+.3f} dB")
