"""Interleaved probe: two residual heads trained on identical batches, the official hybrid loss vs
the same loss plus an x0 term (X0_WEIGHT), or two residual scales (SCALE_B for the second head).

python runs/head-x0/probe.py CACHE WIDTH DEPTH STEPS X0_WEIGHT [LR] [SCALE_B]
"""
import math, sys, time
import torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))
from hart.checkpoint import read_weights
from hart.diffusion import ResidualDiffusionHead, TRAIN_STEPS

torch.set_num_threads(2)
cache, width, depth, steps, x0_weight = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
lr = float(sys.argv[6]) if len(sys.argv) > 6 else 1e-3
d = read_weights(cache)
z_all, y = d["conditions"], d["residuals"].float().flatten(0, 1)
z_all = z_all.flatten(1, 2)
scale = 0.15
scale_b = float(sys.argv[7]) if len(sys.argv) > 7 else scale
g0 = torch.Generator().manual_seed(0)
ev = torch.randperm(len(y), generator=g0)[:4096]


def x0_loss(head, target, z, g):
    """Official loss + x0_weight * weighted MSE of the x0 implied by eps, in units of the data variance."""
    sched = head.train_schedule
    x0 = target / head.residual_scale
    N, D = x0.shape
    t = torch.randint(0, TRAIN_STEPS, (N,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ac = torch.from_numpy(sched.alphas_cumprod)[t].float()[:, None]
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    out = head.net(x_t, t, z).float()
    eps, v = out[:, :D], out[:, D:]
    mse = (noise - eps).square().mean(1)
    vb = head._variational_bound(x0.float(), x_t.float(), t, eps.detach(), v)
    loss = mse + vb
    if x0_weight:
        x0_hat = (x_t - (1 - ac).sqrt() * eps) / ac.sqrt()
        w = (100 * ac / (1 - ac)).clamp(max=1.0)[:, 0]   # full weight while SNR >= 0.01
        loss = loss + x0_weight * w * (x0_hat - x0).square().mean(1) / x0.var().detach()
    return loss.mean()


def explained(head):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        p = head.sample(z_all[0, ev].float(), temperature=0.0, generator=torch.Generator().manual_seed(1)).float()
    return round(1 - ((p - y[ev]).square().mean() / y[ev].square().mean()).item(), 4)


heads, opts = [], []
for w, s in ((0.0, scale), (x0_weight, scale_b)):
    torch.manual_seed(0)
    h = ResidualDiffusionHead(y.shape[1], z_all.shape[-1], width, depth, 8, s)
    heads.append((w, h))
    opts.append(torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=0, betas=(0.9, 0.95)))
t0 = time.time()
for step in range(1, steps + 1):
    for (w, h), opt in zip(heads, opts):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 200)
        g = torch.Generator().manual_seed(step)
        i = torch.randint(0, len(y), (1024,), generator=g)
        wording = torch.randint(0, 2, (1024,), generator=g)
        wording[torch.rand(1024, generator=g) < 0.1] = 2
        globals()["x0_weight"] = w
        with torch.autocast("cpu", torch.bfloat16):
            loss = x0_loss(h, y[i], z_all[wording, i].float(), g)
        opt.zero_grad(); loss.backward(); opt.step()
    if step % 250 == 0:
        print(step, round(time.time() - t0), *[f"x0w={w} scale={h.residual_scale}: {explained(h)}" for w, h in heads], flush=True)
