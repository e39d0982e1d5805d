"""Diagnostic: how often do generated tokens equal the reference image's own tokens, per scale, for prompts
whose image is retrieved correctly, and how does the residual gain vary with that agreement?

    python runs/head-ft/tokens.py MODEL RES COUNT
"""
import statistics, sys
import torch
import hart.pipeline as hp
from train.data import load_dataset
from train.evaluate import pil_batch, prompt_sets, retrieval_features, retrieve
from train.metrics import psnr

model, res, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = hp.HARTPipeline.from_pretrained(model)
full = load_dataset("data/emoji", res, "all", caption_variation=False)
refs = torch.stack([full.image(i) for i in range(len(full.captions))])
db = retrieval_features(refs)
prompts = prompt_sets(full.captions, 300 + count, 0)["exact"][300:300 + count]
captured = []
original = hp.iter_sample
def capturing(*a, **k):
    for item in original(*a, **k):
        if isinstance(item, hp.SampleOutput):
            captured.append(item)
        yield item
hp.iter_sample = capturing
scales = pipe.schedules[res]
rows = []
for start in range(0, len(prompts), 50):
    chunk = prompts[start:start + 50]
    captured.clear()
    result = pipe([p for p, _ in chunk], resolution=res, seed=start)
    out = captured[-1]
    targets = torch.tensor([t for _, t in chunk])
    hybrid, discrete = pil_batch(result.images), pil_batch(result.discrete_images)
    rank, _ = retrieve(hybrid, db, targets)
    ref_idx, _ = pipe.tokenizer.encode(refs[targets].to(pipe.tokenizer.codebook.dtype), scales)
    gain = psnr(hybrid, refs[targets]) - psnr(discrete, refs[targets])
    for b in range(len(chunk)):
        agree = [(out.indices[s][b] == ref_idx[s][b]).float().mean().item() for s in range(len(scales))]
        rows.append((rank[b].item() == 0, agree, gain[b].item()))
hits = [r for r in rows if r[0]]
print(f"{res} px: {len(hits)} of {len(rows)} retrieved; token agreement with the reference per scale (hits):")
print("  ", [round(statistics.fmean(r[1][s] for r in hits), 3) for s in range(len(scales))])
last = sorted(hits, key=lambda r: r[1][-1])
half = len(last) // 2
for name, part in (("lower half of last-scale agreement", last[:half]), ("upper half", last[half:])):
    print(f"  {name}: agreement {statistics.fmean(r[1][-1] for r in part):.3f}, gain {statistics.fmean(r[2] for r in part):+.3f} dB")
print(f"  all hits: gain {statistics.fmean(r[2] for r in hits):+.3f} dB")
