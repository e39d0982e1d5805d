"""Probe on the shipped model (no training): residual = alpha * expected-code offset + shipped head's sample, and
the same with the second-to-last scale's expected-code offset added too (upsampled through its phi), 128 px.
    PYTHONPATH=. python runs/head-ec/alpha_probe.py 128 50
"""
import sys
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import expected_code_offset, sample
from train.data import load_dataset
from train.evaluate import retrieval_features, retrieve
from train.metrics import psnr

res, count = int(sys.argv[1]), int(sys.argv[2])
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
scales = pipe.schedules[res]
S, P = len(scales), scales[-1]
ds = load_dataset("data/emoji", res, "all", caption_variation=False)
n = len(ds.captions)
database = torch.cat([retrieval_features(torch.stack([ds.image(i) for i in range(s, min(n, s + 256))]))
                      for s in range(0, n, 256)])
picked = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count].tolist()
gains, hits_total = {}, {}
with torch.no_grad():
    for start in range(0, count, 50):
        ids = picked[start:start + 50]
        B = len(ids)
        images = torch.stack([ds.image(i) for i in ids])
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        out = sample(tf, tok, states, positions, scales, pipe.sampling_defaults, torch.Generator().manual_seed(start),
                     keep_logits=True)
        base_img = tok.decode(out.fhat_discrete)
        hit = retrieve(base_img, database, torch.tensor(ids))[0] == 0
        base = psnr(base_img, images)
        to_map = lambda v, side: v.transpose(1, 2).reshape(B, -1, side, side)
        last = to_map(expected_code_offset(out.logits[-1], tok.codebook, out.indices[-1]), P)
        pn = scales[-2]
        prev = tok.quantize.upsampled_scale(
            to_map(expected_code_offset(out.logits[-2], tok.codebook, out.indices[-2]), pn), S - 2, scales)
        head = to_map(out.residual, P)
        variants = {"head": head}
        for a in (0.5, 1.0, 1.5, 2.0):
            variants[f"{a}*offset+head"] = a * last + head
        variants["prev+offset+head"] = prev + last + head
        variants["offset only"] = last
        for name, r in variants.items():
            img = tok.decode(out.fhat_discrete + r)
            gains.setdefault(name, []).extend((psnr(img, images) - base)[hit].tolist())
            h = retrieve(img, database, torch.tensor(ids))[0] == 0
            hits_total[name] = hits_total.get(name, 0) + int(h.sum())
        hits_total["discrete"] = hits_total.get("discrete", 0) + int(hit.sum())
print(f"{res}px: {hits_total['discrete']} of {count} discrete retrieved")
for k, v in gains.items():
    print(f"{res}px {k:18s} gain {sum(v) / len(v):+.3f} dB   hybrid retrieved {hits_total[k]}")
