"""Zero-training check of the expected-code extension on the shipped model: widen the head (new condition
columns zero) and compare the generation gain of the official residual and of offset + head, same tokens.
    PYTHONPATH=. python runs/head-ec/init_check.py 128 40
"""
import sys
from dataclasses import replace
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import sample
from train.data import load_dataset
from train.evaluate import retrieval_features, retrieve
from train.metrics import psnr
from train.train_head import read_expected_code

res, count = int(sys.argv[1]), int(sys.argv[2])
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
scales = pipe.schedules[res]
ds = load_dataset("data/emoji", res, "all", caption_variation=False)
n = len(ds.captions)
database = torch.cat([retrieval_features(torch.stack([ds.image(i) for i in range(s, min(n, s + 256))]))
                      for s in range(0, n, 256)])
picked = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:count].tolist()
official_head, wide_head = tf.diffloss, read_expected_code(tf.diffloss)
gains = {"official": [], "expected": []}
with torch.no_grad():
    for start in range(0, count, 50):
        ids = picked[start:start + 50]
        images = torch.stack([ds.image(i) for i in ids])
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        outs = {}
        for name, head, flag in (("official", official_head, False), ("expected", wide_head, True)):
            tf.diffloss, tf.config.head_expected_code = head, flag
            outs[name] = sample(tf, tok, states, positions, scales, pipe.sampling_defaults,
                                torch.Generator().manual_seed(start))
        assert all(torch.equal(a, b) for a, b in zip(outs["official"].indices, outs["expected"].indices))
        base_img = tok.decode(outs["official"].fhat_discrete)
        hit = retrieve(base_img, database, torch.tensor(ids))[0] == 0
        base = psnr(base_img, images)
        for name, out in outs.items():
            gains[name] += (psnr(tok.decode(out.fhat_discrete, out.residual), images) - base)[hit].tolist()
print(f"{res}px: {len(gains['official'])} of {count} retrieved")
for k, v in gains.items():
    print(f"{res}px {k:10s} {sum(v) / len(v):+.3f} dB")
