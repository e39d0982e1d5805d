import sys, torch
from hart.pipeline import HARTPipeline
from train.evaluate import load_dataset
torch.set_num_threads(1)
pipe = HARTPipeline.from_pretrained(sys.argv[1]); tf, tok = pipe.transformer, pipe.tokenizer
for res in pipe.resolutions:
    scales = pipe.schedules[res]
    full = load_dataset("data/emoji", res, "all", caption_variation=False)
    picked = torch.randperm(len(full.captions), generator=torch.Generator().manual_seed(0))[:128]
    images = torch.stack([full.image(int(i)) for i in picked])
    with torch.no_grad():
        indices, _ = tok.encode(images, scales)
        states, _, positions = pipe.text_encoder([full.captions[int(i)]["text"] for i in picked])
        inputs = tok.quantize.teacher_forcing_inputs(indices, scales)
        logits, _, _ = tf(states, positions, inputs, scales)
    pred = logits.argmax(-1)
    target = torch.cat([ix.flatten(1) for ix in indices], 1)
    acc = (pred == target).float()
    out, start = [], 0
    for s in scales:
        out.append(f"{s}:{acc[:, start:start+s*s].mean():.2f}"); start += s * s
    print(res, scales, " ".join(out), "all", round(acc.mean().item(), 3))
