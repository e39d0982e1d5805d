import sys, torch, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))  # repo root
from hart.diffusion import ResidualDiffusionHead
torch.set_num_threads(2); torch.manual_seed(0)
d = torch.load(sys.argv[1]); width, depth, minutes, mul = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
z = d['z'].float().flatten(0, 1); y = d['target'].float().flatten(0, 1)
head = ResidualDiffusionHead(y.shape[1], z.shape[1], width, depth, 8, d['scale'])
print('params', sum(p.numel() for p in head.parameters()) / 1e6)
opt = torch.optim.AdamW(head.parameters(), lr=float(sys.argv[6]) if len(sys.argv) > 6 else 5e-4, weight_decay=0, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(0)
ev = torch.randperm(len(z), generator=g)[:16384]
def explained():
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        p = head.sample(z[ev], temperature=0.0, generator=torch.Generator().manual_seed(1)).float()
    return round(1 - ((p - y[ev]).square().mean() / y[ev].square().mean()).item(), 4)
t0 = time.time(); step = 0
while time.time() - t0 < minutes * 60:
    i = torch.randint(0, len(z), (1024,), generator=g)
    with torch.autocast('cpu', torch.bfloat16):
        loss = head.loss(y[i].repeat(mul, 1), z[i].repeat(mul, 1), generator=g)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 1000 == 0:
        print(step, round(time.time() - t0), 'loss', round(loss.item(), 4), 'explained', explained(), flush=True)
# latency of sampling 128 px worth of tokens with the cfg pair
zz = z[:256]
with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
    for _ in range(2): head.sample(zz, zz, cfg=1.0)
    t = time.time(); [head.sample(zz, zz, cfg=1.0) for _ in range(5)]
print('sample 256 tokens cfg pair 8 steps', (time.time() - t) / 5)
