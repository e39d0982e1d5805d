"""Does torch.compile (inductor, CPU) cut the bundled model's per-scale overhead? Interleaved rounds.

PYTHONPATH=. python runs/compile-probe/probe.py RESOLUTION PRECISION ROUNDS
"""
import statistics, sys, time
import torch
from hart.pipeline import HARTPipeline

torch.set_num_threads(2)
resolution, precision, rounds = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
pipe.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
tf = pipe.transformer
head = tf.diffloss.net
plain = {"trunk": head.trunk, "blocks": [b.forward for b in tf.blocks]}
t0 = time.perf_counter()
compiled = {"trunk": torch.compile(head.trunk, dynamic=False),
            "blocks": [torch.compile(b.forward, dynamic=True) for b in tf.blocks]}


def use(variant):
    head.trunk = variant["trunk"] if variant != "plain" else plain["trunk"]
    for b, f in zip(tf.blocks, (plain if variant == "plain" else variant)["blocks"]):
        b.forward = f


def run():
    r = pipe("red apple", resolution=resolution, seed=0, decode_discrete=False)
    return r.timings, r.images[0] if hasattr(r, "images") else None


variants = {"plain": "plain", "head": {"trunk": compiled["trunk"], "blocks": plain["blocks"]},
            "all": compiled}
outs = {}
for name, v in variants.items():
    use(v)
    t = time.perf_counter()
    for _ in range(3):
        outs[name] = run()
    print(f"warm-up {name}: {time.perf_counter() - t:.1f} s", flush=True)
times = {n: [] for n in variants}
stages = {n: [] for n in variants}
for r in range(rounds):
    order = list(variants) if r % 2 == 0 else list(variants)[::-1]
    for name in order:
        use(variants[name])
        timings, _ = run()
        times[name].append(timings["total"])
        stages[name].append(timings)
for name in variants:
    med = statistics.median(times[name])
    st = {k: round(statistics.median(s[k] for s in stages[name]), 4) for k in stages[name][0]}
    print(name, f"median total {med:.4f} s", st)
print("ratio plain/head", statistics.median(a / b for a, b in zip(times["plain"], times["head"])))
print("ratio plain/all", statistics.median(a / b for a, b in zip(times["plain"], times["all"])))
import numpy as np
ref = np.asarray(outs["plain"][1], dtype=np.int16)
for name in ("head", "all"):
    diff = np.abs(np.asarray(outs[name][1], dtype=np.int16) - ref)
    print(f"{name}: max |pixel diff| vs plain {diff.max()}, mean {diff.mean():.3f}")
