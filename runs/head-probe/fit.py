import sys, torch, time, torch.nn as nn
torch.set_num_threads(2); torch.manual_seed(0)
d = torch.load(sys.argv[1]); width, depth, minutes = int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
z = d['z'].float().flatten(0, 1); y = d['target'].float().flatten(0, 1) / d['scale']
print('tokens', z.shape, 'target std', y.std().item())
layers = [nn.Linear(z.shape[1], width), nn.SiLU()]
for _ in range(depth - 1): layers += [nn.Linear(width, width), nn.SiLU()]
net = nn.Sequential(*layers, nn.Linear(width, y.shape[1]))
print('params', sum(p.numel() for p in net.parameters()) / 1e6)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0)
t0 = time.time(); step = 0; var = y.square().mean()
while time.time() - t0 < minutes * 60:
    i = torch.randint(0, len(z), (1024,))
    with torch.autocast('cpu', torch.bfloat16):
        loss = (net(z[i]).float() - y[i]).square().mean()
    opt.zero_grad(); loss.backward(); opt.step(); step += 1
    if step % 2000 == 0:
        with torch.no_grad(), torch.autocast('cpu', torch.bfloat16):
            err = sum((net(z[s:s+8192]).float() - y[s:s+8192]).square().sum() for s in range(0, len(z), 8192)) / y.numel()
        print(step, round(time.time() - t0), 'explained', round(1 - (err / var).item(), 4), flush=True)
