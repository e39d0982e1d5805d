"""Optional perceptual loss: distances between VGG16 feature maps (LPIPS-style, unit-normalised
channels, no learned weights). The weights are never downloaded: pass a local file holding a
VGG16 `features.*` state dict (torchvision's key names), e.g. `--perceptual-weights vgg16.safetensors`."""
from __future__ import annotations

import torch
import torch.nn as nn

from hart.checkpoint import CheckpointError, read_weights

# VGG16 conv widths; "M" = 2x2 max-pool. Features are read after the last ReLU of each block.
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
MEAN = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
STD = torch.tensor([0.229, 0.224, 0.225])[:, None, None]


class PerceptualLoss(nn.Module):
    def __init__(self, weights_path: str):
        super().__init__()
        layers, channels, self.taps = [], 3, []
        for item in VGG16:
            if item == "M":
                self.taps.append(len(layers) - 1)
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.ReLU(inplace=False)]
                channels = item
        self.taps.append(len(layers) - 1)
        self.features = nn.Sequential(*layers)
        state = {k: v for k, v in read_weights(weights_path).items() if k.startswith("features.")}
        missing = set(self.state_dict()) - set(state)
        if missing:
            raise CheckpointError(f"{weights_path} is not a VGG16 features state dict (missing {sorted(missing)[:3]})")
        self.load_state_dict({k: state[k] for k in self.state_dict()})
        self.requires_grad_(False).eval()
        self.register_buffer("mean", MEAN, persistent=False)
        self.register_buffer("std", STD, persistent=False)

    def forward(self, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Mean feature distance of images in [-1, 1]."""
        x = torch.cat([recon, target]).float()
        x = ((x + 1) / 2 - self.mean) / self.std
        total = x.new_zeros(())
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.taps:
                a, b = x.chunk(2)
                a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
                b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
                total = total + (a - b).square().sum(1).mean()
            if i == self.taps[-1]:
                break
        return total / len(self.taps)
