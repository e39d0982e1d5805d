"""Teacher-forced share of the residual explained by the head's temperature-0 sample, per head guidance
and step count, on cached conditions (exact caption, empty prompt) of a pipeline.

PYTHONPATH=. python runs/head-x0/guidance.py MODEL RESOLUTION
"""
import sys
from pathlib import Path
import torch
from hart.pipeline import HARTPipeline
from train.train_head import head_conditions

torch.set_num_threads(2)
model, resolution = sys.argv[1], int(sys.argv[2])
pipe = HARTPipeline.from_pretrained(model)
pipe.transformer.float(); pipe.tokenizer.float()
conditions, residuals = head_conditions(pipe, "data/emoji", resolution, 1, Path("runs/head-x0/cache"))
z, z_empty = conditions[0].flatten(0, 1).float(), conditions[1].flatten(0, 1).float()
target = residuals.flatten(0, 1)
ids = torch.randperm(len(target), generator=torch.Generator().manual_seed(0))[:8192]
head = pipe.transformer.diffloss
for steps in (8, 4, 16):
    for cfg in (0.0, 0.857, 2.0, 4.0):
        with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
            p = head.sample(z[ids], z_empty[ids], cfg=cfg, steps=steps, temperature=0.0,
                            generator=torch.Generator().manual_seed(1)).float()
        err = (p - target[ids]).square().mean() / target[ids].square().mean()
        print(f"steps {steps} head cfg {cfg}: explained {1 - err.item():.4f}", flush=True)
