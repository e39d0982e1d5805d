"""A 400-emoji subset of data/emoji (random, seed 0) for the capacity probe: captions re-indexed, both resolutions.
    PYTHONPATH=. python runs/capacity/make_subset.py data/emoji data/emoji-sub400 400
"""
import json, sys
from pathlib import Path
import torch
from safetensors.torch import load_file, save_file

src, dst, count = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
dst.mkdir(parents=True, exist_ok=True)
records = [json.loads(line) for line in (src / "captions.jsonl").read_text().splitlines() if line.strip()]
picked = sorted(torch.randperm(len(records), generator=torch.Generator().manual_seed(0))[:count].tolist())
with open(dst / "captions.jsonl", "w") as f:
    for new, old in enumerate(picked):
        f.write(json.dumps({**records[old], "index": new}, ensure_ascii=False) + "\n")
for res in (64, 128):
    images = load_file(src / f"emoji_{res}.safetensors")["images"]
    save_file({"images": images[picked].contiguous()}, dst / f"emoji_{res}.safetensors")
print("wrote", dst, len(picked))
