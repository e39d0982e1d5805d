"""Image-quality metrics and sample grids used by training and evaluation."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak range 2)."""
    mse = (a.float().clamp(-1, 1) - b.float().clamp(-1, 1)).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def ssim(a: torch.Tensor, b: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Per-image SSIM (Gaussian window, on [0, 1] intensities, averaged over channels)."""
    x, y = (a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-coords.square() / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None]).expand(x.shape[1], 1, window, window).to(x.device)

    def blur(t):
        return F.conv2d(t, kernel, padding=window // 2, groups=x.shape[1])

    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx.square(), blur(y * y) - my.square(), blur(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx.square() + my.square() + c1) * (vx + vy + c2))
    return s.flatten(1).mean(1)


def save_grid(rows: tuple[torch.Tensor, ...], path: str | Path, scale: int = 1) -> None:
    """Each tensor in `rows` ([N, 3, H, W] in [-1, 1]) becomes one row of the grid."""
    rows = [r.detach().float().cpu() for r in rows]
    n, (_, h, w) = rows[0].shape[0], rows[0].shape[1:]
    grid = torch.ones(3, len(rows) * h, n * w)
    for r, row in enumerate(rows):
        for i in range(min(n, row.shape[0])):
            grid[:, r * h:(r + 1) * h, i * w:(i + 1) * w] = (row[i].clamp(-1, 1) + 1) / 2
    img = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
