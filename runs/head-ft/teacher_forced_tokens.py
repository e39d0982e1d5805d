"""Diagnostic: teacher-forced token accuracy per scale (argmax and probability of the reference token) on
dataset images with their exact captions. Low last-scale accuracy here means the transformer has not learned
the fine scale (more training); high accuracy with low agreement in generation means sampling drifts.

    python runs/head-ft/teacher_forced_tokens.py MODEL RES COUNT [DATA]
"""
import sys
import torch
from hart.pipeline import HARTPipeline
from train.data import load_dataset

model, res, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
pipe = HARTPipeline.from_pretrained(model)
tf, tok = pipe.transformer, pipe.tokenizer
full = load_dataset(sys.argv[4] if len(sys.argv) > 4 else "data/emoji", res, "all", caption_variation=False)
scales = pipe.schedules[res]
picked = torch.randperm(len(full.captions), generator=torch.Generator().manual_seed(0))[:count]
acc = torch.zeros(len(scales)); prob = torch.zeros(len(scales)); n = 0
with torch.no_grad():
    for start in range(0, count, 32):
        ids = picked[start:start + 32]
        images = torch.stack([full.image(int(i)) for i in ids])
        indices, _ = tok.encode(images, scales)
        states, _, positions = pipe.text_encoder([full.captions[int(i)]["text"] for i in ids])
        logits, _, _ = tf(states, positions, tok.quantize.teacher_forcing_inputs(indices, scales), scales)
        offset = 0
        for s, pn in enumerate(scales):
            part = logits[:, offset:offset + pn * pn].float()
            target = indices[s]
            acc[s] += (part.argmax(-1) == target).float().mean(1).sum()
            prob[s] += part.softmax(-1).gather(-1, target[..., None])[..., 0].mean(1).sum()
            offset += pn * pn
        n += len(ids)
print(f"{res} px, {n} images, scales {list(scales)}")
print("  argmax accuracy:", [round(v, 3) for v in (acc / n).tolist()])
print("  mean p(reference):", [round(v, 3) for v in (prob / n).tolist()])
