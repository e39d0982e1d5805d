"""Precompute teacher-forced head conditions z and residual targets for every dataset image."""
import sys, torch, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))  # repo root
from hart.pipeline import HARTPipeline
from train.data import load_dataset
model, res, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
torch.set_num_threads(2)
pipe = HARTPipeline.from_pretrained(model)
tf, tok = pipe.transformer, pipe.tokenizer
scales = pipe.schedules[res]
ds = load_dataset('data/emoji', res, 'all', 0.05, 0, caption_variation=False)
n = len(ds.captions)
Z, T, H = [], [], []
t0 = time.time()
with torch.no_grad():
    for s in range(0, n, 64):
        ids = list(range(s, min(n, s + 64)))
        images = torch.stack([ds.image(i) for i in ids])
        indices, residual = tok.encode(images, scales)
        states, _, positions = pipe.text_encoder([ds.caption(i) for i in ids])
        inputs = tok.quantize.teacher_forcing_inputs(indices, scales)
        _, hidden_last, _ = tf(states, positions, inputs, scales)
        z = tf.diffusion_condition(hidden_last, tok.codebook[indices[-1]])
        Z.append(z.half()); T.append(residual.half()); H.append(hidden_last.half())
print('done', n, time.time() - t0)
torch.save({'z': torch.cat(Z), 'target': torch.cat(T), 'h': torch.cat(H), 'scale': tf.diffloss.residual_scale}, out)
