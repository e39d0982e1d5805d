import sys, time, torch, json
from hart.pipeline import HARTPipeline
from train.evaluate import load_dataset, retrieval_features, prompt_sets, generate_and_retrieve
torch.set_num_threads(2)
model = sys.argv[1]; res = int(sys.argv[2]); settings = json.loads(sys.argv[3])
pipe = HARTPipeline.from_pretrained(model)
full = load_dataset("data/emoji", res, "all", caption_variation=False)
refs = torch.stack([full.image(i) for i in range(len(full.captions))])
db = retrieval_features(refs)
both = prompt_sets(full.captions, 300 + 100, 0)
sets = {k: v[300:] for k, v in both.items()}
for s in settings:
    t = time.time(); row = dict(s)
    for name, prompts in sets.items():
        r = generate_and_retrieve(pipe, prompts, res, db, refs, **s)
        row[name] = (r["hybrid"]["top1"], r["hybrid"]["top5"])
    row["s"] = round(time.time() - t)
    print(json.dumps(row), flush=True)
