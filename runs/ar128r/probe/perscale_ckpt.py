import sys, dataclasses, torch
from hart.pipeline import HARTPipeline
from hart.transformer import HARTTransformer
from hart.checkpoint import read_weights
from train.evaluate import load_dataset
torch.set_num_threads(1)
pipe = HARTPipeline.from_pretrained("runs/ar128p/package")
ck = sys.argv[1]; which = sys.argv[2] if len(sys.argv) > 2 else "ema"
tf = HARTTransformer(dataclasses.replace(pipe.transformer.config, resolution_sides=(8, 16))).eval()
w = read_weights(f"{ck}/{which}.safetensors"); missing = tf.load_state_dict({k: v.float() for k, v in w.items()}, strict=False)
print("missing", missing.missing_keys[:5], "res norm", tf.resolution_embed.norm(dim=1).tolist())
tok = pipe.tokenizer
for res in pipe.resolutions:
    scales = pipe.schedules[res]
    full = load_dataset("data/emoji", res, "all", caption_variation=False)
    picked = torch.randperm(len(full.captions), generator=torch.Generator().manual_seed(0))[:256]
    images = torch.stack([full.image(int(i)) for i in picked])
    with torch.no_grad():
        indices, _ = tok.encode(images, scales)
        states, _, positions = pipe.text_encoder([full.captions[int(i)]["text"] for i in picked])
        inputs = tok.quantize.teacher_forcing_inputs(indices, scales)
        logits, _, _ = tf(states, positions, inputs, scales)
    acc = (logits.argmax(-1) == torch.cat([ix.flatten(1) for ix in indices], 1)).float()
    out, start = [], 0
    for s in scales:
        out.append(f"{s}:{acc[:, start:start+s*s].mean():.2f}"); start += s * s
    print(res, " ".join(out), "all", round(acc.mean().item(), 3), flush=True)
