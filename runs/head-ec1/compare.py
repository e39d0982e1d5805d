"""Same tokens, three residuals at 128 px (shipped defaults cfg 2, T 0.5): the shipped head, the widened shipped
head (offset + head, no training) and the trained runs/head-ec1 head. Gain over discrete-only on prompts whose
discrete image retrieves its emoji, and how many hybrid images retrieve theirs.
    PYTHONPATH=. python runs/head-ec1/compare.py 128 100
"""
import sys
import torch
from hart.pipeline import HARTPipeline
from hart.sampler import sample
from train.data import load_dataset
from train.evaluate import retrieval_features, retrieve
from train.metrics import psnr
from train.train_head import read_expected_code

res, count = int(sys.argv[1]), int(sys.argv[2])
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
trained = HARTPipeline.from_pretrained("runs/head-ec1/package").transformer.diffloss.float()
tf, tok = pipe.transformer.float(), pipe.tokenizer.float()
scales = pipe.schedules[res]
ds = load_dataset("data/emoji", res, "all", caption_variation=False)
n = len(ds.captions)
database = torch.cat([retrieval_features(torch.stack([ds.image(i) for i in range(s, min(n, s + 256))]))
                      for s in range(0, n, 256)])
picked = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:count].tolist()
heads = {"shipped": (tf.diffloss, False), "offset+shipped": (read_expected_code(tf.diffloss), True),
         "offset+trained": (trained, True)}
gains, hits = {k: [] for k in heads}, {k: 0 for k in list(heads) + ["discrete"]}
with torch.no_grad():
    for start in range(0, count, 50):
        ids = picked[start:start + 50]
        images = torch.stack([ds.image(i) for i in ids])
        states, _, positions = pipe.text_encoder([ds.captions[i]["text"] for i in ids])
        outs = {}
        for name, (head, flag) in heads.items():
            tf.diffloss, tf.config.head_expected_code = head, flag
            outs[name] = sample(tf, tok, states, positions, scales, pipe.sampling_defaults,
                                torch.Generator().manual_seed(start))
        base_img = tok.decode(outs["shipped"].fhat_discrete)
        hit = retrieve(base_img, database, torch.tensor(ids))[0] == 0
        hits["discrete"] += int(hit.sum())
        base = psnr(base_img, images)
        for name, out in outs.items():
            img = tok.decode(out.fhat_discrete, out.residual)
            gains[name] += (psnr(img, images) - base)[hit].tolist()
            hits[name] += int((retrieve(img, database, torch.tensor(ids))[0] == 0).sum())
print(f"{res}px, {count} exact captions: discrete retrieves {hits['discrete']}")
for k, v in gains.items():
    print(f"{res}px {k:15s} gain {sum(v) / len(v):+.3f} dB  hybrid retrieves {hits[k]}")
