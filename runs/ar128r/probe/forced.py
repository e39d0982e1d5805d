import sys, torch, json
import hart.sampler as S
from hart.pipeline import HARTPipeline
from train.evaluate import load_dataset, retrieval_features, prompt_sets, pil_batch, retrieve
torch.set_num_threads(1)
pipe = HARTPipeline.from_pretrained(sys.argv[1]); res = 128; scales = pipe.schedules[res]
full = load_dataset("data/emoji", res, "all", caption_variation=False)
refs = torch.stack([full.image(i) for i in range(len(full.captions))]); db = retrieval_features(refs)
prompts = prompt_sets(full.captions, 400, 0)["exact"][300:400]
targets = torch.tensor([t for _, t in prompts])
with torch.no_grad():
    true_idx, _ = pipe.tokenizer.encode(refs[targets], scales)
orig = S.sample_top_k
state = {"si": 0, "K": 0, "rows": None}
def forced(logits, top_k, temperature, generator):
    idx = orig(logits, top_k, temperature, generator)
    si = state["si"]; state["si"] += 1
    if si < state["K"]:
        idx = true_idx[si].flatten(1)[state["rows"]].view_as(idx)
    return idx
S.sample_top_k = forced
for K in [int(k) for k in sys.argv[2].split(",")]:
    hits = 0
    for start in range(0, 100, 50):
        state.update(si=0, K=K, rows=slice(start, start + 50))
        # reset si per call: sample_top_k is called once per scale per pipe call
        r = pipe([p for p, _ in prompts[start:start+50]], resolution=res, seed=start, cfg=2.0, top_k=10, residual_temperature=0.0)
        rank, _ = retrieve(pil_batch(r.images), db, targets[start:start+50]); hits += int((rank == 0).sum())
    print("forced scales", K, "top1", hits / 100, flush=True)
