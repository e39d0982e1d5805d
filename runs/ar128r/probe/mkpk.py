import sys, json, shutil, dataclasses, torch
from pathlib import Path
from hart.checkpoint import read_weights
from safetensors.torch import save_file
ck, out = sys.argv[1], Path(sys.argv[2])
shutil.rmtree(out, ignore_errors=True); shutil.copytree("runs/ar128p/package", out)
cfgp = out / "transformer" / "config.json"; c = json.loads(cfgp.read_text()); c["resolution_sides"] = [8, 16]; cfgp.write_text(json.dumps(c))
w = read_weights(f"{ck}/ema.safetensors")
save_file({k: v.to(torch.float16).contiguous() for k, v in w.items()}, str(out / "transformer" / "model.safetensors"))
