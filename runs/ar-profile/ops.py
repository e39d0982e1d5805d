"""Where the 0.7B AR pass at 512 px spends its time under bf16 (random weights, batch 1, cfg 4.5):
torch.profiler over one generation after a warm-up, operators sorted by self CPU time.

PYTHONPATH=. python runs/ar-profile/ops.py [bf16|fp32] > runs/ar-profile/ops-bf16.txt
"""
import sys
import torch
from torch.profiler import ProfilerActivity, profile
from hart.pipeline import HARTPipeline

torch.set_num_threads(2)
precision = sys.argv[1] if len(sys.argv) > 1 else "bf16"
pipe = HARTPipeline.from_preset("hart-0.7b")
pipe.autocast_dtype = torch.bfloat16 if precision == "bf16" else None
run = lambda: pipe("a red apple", resolution=512, seed=0, decode_discrete=False)
run()
with profile(activities=[ProfilerActivity.CPU]) as prof:
    result = run()
print("timings", {k: round(v, 3) for k, v in result.timings.items()})
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
