"""Interleaved probe: fresh residual heads trained on identical batches and noise, differing only in
how training timesteps are drawn. 'uniform' is the official U{0..999}; 'low' draws 75 % of tokens
from U{0..449} (where the 8-step sampler's last, detail-setting steps live) and 25 % uniformly;
'respaced' draws 50 % from the 8 timesteps the default sampler visits and 50 % uniformly.

python runs/head-t/probe.py CACHE WIDTH DEPTH STEPS [LR] [KIND,KIND,...]
"""
import sys, time
import torch
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))
from hart.checkpoint import read_weights
from hart.diffusion import ResidualDiffusionHead, TRAIN_STEPS, respaced_timesteps

torch.set_num_threads(2)
cache, width, depth, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
lr = float(sys.argv[5]) if len(sys.argv) > 5 else 1e-3
d = read_weights(cache)
z_all, y = d["conditions"].flatten(1, 2), d["residuals"].float().flatten(0, 1)
ev = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:4096]
kept = torch.tensor(respaced_timesteps(8))


def draw_t(kind, n, g):
    t = torch.randint(0, TRAIN_STEPS, (n,), generator=g)
    u = torch.rand(n, generator=g)
    if kind == "low":
        t = torch.where(u < 0.75, torch.randint(0, 450, (n,), generator=g), t)
    elif kind == "low300":
        t = torch.where(u < 0.75, torch.randint(0, 300, (n,), generator=g), t)
    elif kind == "low300x90":
        t = torch.where(u < 0.9, torch.randint(0, 300, (n,), generator=g), t)
    elif kind == "respaced":
        t = torch.where(u < 0.5, kept[torch.randint(0, 8, (n,), generator=g)], t)
    return t


def loss_fn(head, target, z, t, noise):
    sched = head.train_schedule
    x0 = target / head.residual_scale
    D = x0.shape[1]
    ac = torch.from_numpy(sched.alphas_cumprod)[t].float()[:, None]
    x_t = ac.sqrt() * x0 + (1 - ac).sqrt() * noise
    out = head.net(x_t, t, z).float()
    eps, v = out[:, :D], out[:, D:]
    vb = head._variational_bound(x0.float(), x_t.float(), t, eps.detach(), v)
    return ((noise - eps).square().mean(1) + vb).mean()


def explained(head):
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        p = head.sample(z_all[0, ev].float(), temperature=0.0, generator=torch.Generator().manual_seed(1)).float()
    return round(1 - ((p - y[ev]).square().mean() / y[ev].square().mean()).item(), 4)


kinds = sys.argv[6].split(",") if len(sys.argv) > 6 else ["uniform", "low", "respaced"]
heads, opts = [], []
for _ in kinds:
    torch.manual_seed(0)
    h = ResidualDiffusionHead(y.shape[1], z_all.shape[-1], width, depth, 8, 0.15)
    heads.append(h)
    opts.append(torch.optim.AdamW(h.parameters(), lr=lr, weight_decay=0, betas=(0.9, 0.95)))
t0 = time.time()
for step in range(1, steps + 1):
    g = torch.Generator().manual_seed(step)
    i = torch.randint(0, len(y), (1024,), generator=g)
    wording = torch.randint(0, z_all.shape[0] - 1, (1024,), generator=g)  # last row: the empty prompt
    wording[torch.rand(1024, generator=g) < 0.1] = z_all.shape[0] - 1
    noise = torch.randn(1024, y.shape[1], generator=g)
    for kind, h, opt in zip(kinds, heads, opts):
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, step / 200)
        t = draw_t(kind, 1024, torch.Generator().manual_seed(10_000 + step))
        with torch.autocast("cpu", torch.bfloat16):
            loss = loss_fn(h, y[i], z_all[wording, i].float(), t, noise)
        opt.zero_grad(); loss.backward(); opt.step()
    if step % 250 == 0:
        print(step, round(time.time() - t0), *[f"{k}: {explained(h)}" for k, h in zip(kinds, heads)], flush=True)
