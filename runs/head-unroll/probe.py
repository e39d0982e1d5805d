"""Probe (WIDTH > 0: a fresh head of that width, depth 4): fine-tune the shipped residual head on its own 8-step temperature-0 sample (MSE against the
true residual, backpropagated through the unrolled sampler), next to continuing the official loss.

    python runs/head-unroll/probe.py STEPS LR MODE [BATCH [WIDTH [WEIGHT [SHARE64]]]]     MODE: official | unroll | both
"""
import sys, time
import torch
from safetensors.torch import load_file
from hart.pipeline import HARTPipeline

steps, lr, mode = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
batch = int(sys.argv[4]) if len(sys.argv) > 4 else 1024
width = int(sys.argv[5]) if len(sys.argv) > 5 else 0
weight = float(sys.argv[6]) if len(sys.argv) > 6 else 1.0   # of the unrolled term
share64 = float(sys.argv[7]) if len(sys.argv) > 7 else 0.0   # >0: this share of each batch from 64 px tokens
torch.manual_seed(0)
pipe = HARTPipeline.from_pretrained("assets/hart-emoji")
head = pipe.transformer.diffloss.float().train().requires_grad_(True)
if width:  # a fresh head of another width (depth 4)
    from hart.diffusion import ResidualDiffusionHead
    head = ResidualDiffusionHead(head.net.token_dim, head.net.cond_embed.in_features, width, 4, 8, head.residual_scale)
pools = {}
for res, name in ((64, "head_64_c99f88740c526b0c"), (128, "head_128_19722b7581ef6e73")):
    d = load_file(f"runs/head512t/cache/{name}.safetensors")
    pools[res] = (d["conditions"].flatten(1, 2), d["residuals"].flatten(0, 1).float())
W = pools[64][0].shape[0] - 1
z_all = torch.cat([pools[r][0] for r in (64, 128)], 1)
targets = torch.cat([pools[r][1] for r in (64, 128)])
n64 = len(pools[64][1])
g = torch.Generator().manual_seed(1)
evals = {64: torch.randperm(n64, generator=g)[:4096], 128: n64 + torch.randperm(len(targets) - n64, generator=g)[:4096]}

def explained(h):
    out = {}
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        for res, ids in evals.items():
            p = h.sample(z_all[0, ids].float(), temperature=0.0, generator=torch.Generator().manual_seed(0)).float()
            t = targets[ids]
            out[res] = round(1 - ((p - t).square().mean() / t.square().mean()).item(), 4)
    return out

def unrolled(h, target, z, gen, nsteps=8):
    """MSE of the temperature-0 sample against target, in the head's scaled units."""
    sched = h.schedule(nsteps)
    x = torch.randn(target.shape, generator=gen)
    cond = h.net.cond_embed(z)
    times = h.net.time_embed(torch.from_numpy(sched.timesteps))
    D = target.shape[1]
    for i in reversed(range(nsteps)):
        c = {k: float(getattr(sched, k)[i]) for k in ("sqrt_recip_ac", "sqrt_recipm1_ac", "posterior_coef1", "posterior_coef2")}
        eps = h.net.trunk(x, times[i] + cond)[:, :D].float()
        x0 = (c["sqrt_recip_ac"] * x - c["sqrt_recipm1_ac"] * eps).clamp(-1, 1)
        x = c["posterior_coef1"] * x0 + c["posterior_coef2"] * x
    return (x - target / h.residual_scale).square().mean()

print("start", explained(head), flush=True)
opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
t0 = time.time()
for step in range(steps):
    gen = torch.Generator().manual_seed(100 + step)
    picked = torch.randint(0, len(targets), (batch,), generator=gen)
    if share64:
        n_small = int(batch * share64)
        picked = torch.cat([torch.randint(0, n64, (n_small,), generator=gen),
                            torch.randint(n64, len(targets), (batch - n_small,), generator=gen)])
    wording = torch.randint(0, W, (batch,), generator=gen)
    with torch.autocast("cpu", torch.bfloat16):
        z, tgt = z_all[wording, picked].float(), targets[picked]
        loss = 0
        if mode in ("official", "both"):
            drop = wording.clone(); drop[torch.rand(batch, generator=gen) < 0.1] = W
            loss = loss + head.loss(tgt, z_all[drop, picked].float(), generator=gen, low_t_share=0.9, low_t_max=300)
        if mode in ("unroll", "both"):
            loss = loss + weight * unrolled(head, tgt, z, gen)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    if (step + 1) % 50 == 0:
        print(step + 1, round(time.time() - t0), round(loss.item(), 4), explained(head), flush=True)
