"""Augmentation written on batched tensors (no torchvision), on whatever device the batch lives.

Random translation by up to ``max_shift`` pixels (pad with the image's own border value, then crop
at a random offset — the classic CIFAR "pad and crop", done for the whole batch with one gather),
and an optional horizontal flip. Flips are off for data whose meaning a mirror changes: digits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_translate(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift), mode="replicate")
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device="cpu").to(x.device)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator, device="cpu").to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device)[None, :])[:, None, :, None]  # (n,1,h,1)
    cols = (dx[:, None] + torch.arange(w, device=x.device)[None, :])[:, None, None, :]  # (n,1,1,w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_hflip(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    flip = (torch.rand(x.shape[0], generator=generator, device="cpu") < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def augment(x: torch.Tensor, max_shift: int, hflip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    x = random_translate(x, max_shift, generator)
    return random_hflip(x, generator) if hflip else x
