"""(runs/capacity copy of runs/cfg128/probe.py with MODEL and the prompts' DATA as arguments; retrieval is still
among all 3,788 images of data/emoji.)
128 px: how the sampling settings move the residual gain, retrieval and the last-scale token accuracy
(shipped model and head, exact captions, the prompts of runs/head-ec1/compare.py). Per setting: discrete and
hybrid top-1 retrieval, the residual gain on prompts the discrete image retrieves, and the share of generated
tokens equal to the reference image's own tokens at the last two scales.
    PYTHONPATH=. python runs/cfg128/probe.py 100 "1,0.5 2,0.5 4,0.5 2,0.1"     # cfg,temperature pairs
"""
import dataclasses, sys
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import sample
from train.data import load_dataset
from train.evaluate import retrieval_features, retrieve
from train.metrics import psnr

model, data, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
settings = [tuple(float(v) for v in s.split(",")) for s in sys.argv[4].split()]
res = 128
pipe = HARTPipeline.from_pretrained(model)
if len(sys.argv) > 5:
    pipe.transformer.diffloss.load_state_dict(HARTPipeline.from_pretrained(sys.argv[5]).transformer.diffloss.state_dict())
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
scales = pipe.schedules[res]
full = load_dataset("data/emoji", res, "all", caption_variation=False)
database = torch.cat([retrieval_features(torch.stack([full.image(i) for i in range(s, min(len(full.captions), s + 256))]))
                      for s in range(0, len(full.captions), 256)])
index_of = {c["text"]: i for i, c in enumerate(full.captions)}
ds = load_dataset(data, res, "all", caption_variation=False)
picked = torch.randperm(len(ds.captions), generator=torch.Generator().manual_seed(2))[:count].tolist()
torch.set_grad_enabled(False)
# every model is sampled with the shipped model's defaults (a train_ar export stores the trainer's own)
SHIPPED_DEFAULTS = HARTPipeline.from_pretrained("assets/hart-emoji").sampling_defaults
for cfg, temperature in settings:
    opts = dataclasses.replace(SHIPPED_DEFAULTS, cfg=cfg, temperature=temperature)
    gains, hits_d, hits_h, right_last, right_prev, total_last, total_prev = [], 0, 0, 0, 0, 0, 0
    for start in range(0, count, 50):
        ids = picked[start:start + 50]
        images = torch.stack([ds.image(i) for i in ids])
        ref_indices, _ = tok.encode(images, scales)
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        out = sample(tf, tok, states, positions, scales, opts, torch.Generator().manual_seed(start))
        disc = tok.decode(out.fhat_discrete)
        hyb = tok.decode(out.fhat_discrete, out.residual)
        targets = torch.tensor([index_of[ds.captions[i]["text"]] for i in ids])
        hit = retrieve(disc, database, targets)[0] == 0
        hits_d += int(hit.sum())
        hits_h += int((retrieve(hyb, database, targets)[0] == 0).sum())
        gains += (psnr(hyb, images) - psnr(disc, images))[hit].tolist()
        right_last += int((out.indices[-1] == ref_indices[-1])[hit].sum())
        total_last += int(hit.sum()) * ref_indices[-1].shape[1]
        right_prev += int((out.indices[-2] == ref_indices[-2])[hit].sum())
        total_prev += int(hit.sum()) * ref_indices[-2].shape[1]
    print(f"cfg {cfg} T {temperature}: discrete retrieves {hits_d}/{count}, hybrid {hits_h}; gain "
          f"{sum(gains) / max(1, len(gains)):+.3f} dB; on retrieved prompts, tokens right: last scale "
          f"{right_last / max(1, total_last):.3f}, the one before {right_prev / max(1, total_prev):.3f}", flush=True)
