"""Grow the shipped head by appending zero-gated blocks (identity at start), train on cached conditions."""
import sys, torch, time
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[2]))  # repo root
from hart.diffusion import ResidualDiffusionHead, ResBlock
from hart.checkpoint import read_weights
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 1); torch.manual_seed(0)
d = torch.load(sys.argv[1]); extra, minutes, lr = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
z = d['z'].float().flatten(0, 1); y = d['target'].float().flatten(0, 1)
head = ResidualDiffusionHead(y.shape[1], z.shape[1], 256, 3, 8, d['scale'])
w = read_weights('assets/hart-emoji/transformer/model.safetensors')
head.load_state_dict({k[len('diffloss.'):]: v.float() for k, v in w.items() if k.startswith('diffloss.')})
for _ in range(extra):
    b = ResBlock(256); torch.nn.init.zeros_(b.adaLN_modulation[-1].weight); torch.nn.init.zeros_(b.adaLN_modulation[-1].bias)
    head.net.res_blocks.append(b)
print('params', sum(p.numel() for p in head.parameters()) / 1e6)
opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0, betas=(0.9, 0.95))
g = torch.Generator().manual_seed(0)
ev = torch.randperm(len(z), generator=g)[:8192]
def explained():
    with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
        p = head.sample(z[ev], temperature=0.0, generator=torch.Generator().manual_seed(1)).float()
    return round(1 - ((p - y[ev]).square().mean() / y[ev].square().mean()).item(), 4)
print('start explained', explained(), flush=True)
t0 = time.time(); step = 0
while time.time() - t0 < minutes * 60:
    i = torch.randint(0, len(z), (1024,), generator=g)
    with torch.autocast('cpu', torch.bfloat16):
        loss = head.loss(y[i], z[i], generator=g)
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 1000 == 0:
        print(step, round(time.time() - t0), 'loss', round(loss.item(), 4), 'explained', explained(), flush=True)
