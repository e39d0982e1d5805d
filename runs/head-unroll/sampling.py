"""Probe: residual gain and retrieval at lower token-sampling temperature / top-k (exact captions).

    python runs/head-unroll/sampling.py MODEL RES COUNT "top_k:temperature,..."
"""
import sys, time
import torch
from hart.pipeline import HARTPipeline
from train.data import load_dataset
from train.evaluate import generate_and_retrieve, prompt_sets, retrieval_features

model, res, count, settings = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
pipe = HARTPipeline.from_pretrained(model)
full = load_dataset("data/emoji", res, "all", caption_variation=False)
refs = torch.stack([full.image(i) for i in range(len(full.captions))])
db = retrieval_features(refs)
sets = prompt_sets(full.captions, 300 + count, 0)
prompts = sets["exact"][300:300 + count]  # the sweep's prompts, disjoint from the reported ones
for s in settings.split(","):
    k, temp = s.split(":")
    t0 = time.time()
    r = generate_and_retrieve(pipe, prompts, res, db, refs, top_k=int(k), temperature=float(temp))
    print(res, s, r["hybrid"]["top1"], r["discrete"]["top1"], "gain", r["residual_gain_db"], r["correct_for_gain"],
          f"{time.time() - t0:.0f}s", flush=True)
