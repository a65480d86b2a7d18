"""Training augmentation: random horizontal flip + random crop from a zero-padded image, as in the
Network Slimming paper, per *batch*, vectorised, on the training device.

The data modules run it in ``on_after_batch_transfer`` (see ``slimnet.data.base``), so workers never
decode PIL images or run per-sample transforms.
"""

from __future__ import annotations

import torch


def _default_pad(image_size: tuple[int, int]) -> int:
    """Crop padding: 4 px for 32x32-and-up images (the paper's CIFAR setting), 2 px for smaller ones."""
    return 4 if min(image_size) >= 32 else 2


@torch.no_grad()
def random_flip_crop(
    x: torch.Tensor, pad: int, fill: torch.Tensor | float = 0.0, flip: bool = True
) -> torch.Tensor:
    """Per-sample random horizontal flip and random ``pad``-pixel shift of a batch (B, C, H, W).

    The shift is a random crop of the image padded by ``pad`` on each side with ``fill`` (per channel),
    done for the whole batch at once with one advanced-indexing gather. Randomness comes from the
    global generator of ``x``'s device, so ``torch.manual_seed`` makes it reproducible.
    """
    b, c, h, w = x.shape
    dev = x.device
    if pad > 0:
        fill = torch.as_tensor(fill, dtype=x.dtype, device=dev).reshape(1, -1, 1, 1)
        padded = fill.expand(b, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad : pad + h, pad : pad + w] = x
        dy = torch.randint(0, 2 * pad + 1, (b,), device=dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), device=dev)
        rows = (dy[:, None] + torch.arange(h, device=dev))[:, None, :, None]  # (B,1,H,1)
        cols = (dx[:, None] + torch.arange(w, device=dev))[:, None, None, :]  # (B,1,1,W)
        bi = torch.arange(b, device=dev)[:, None, None, None]
        ci = torch.arange(c, device=dev)[None, :, None, None]
        x = padded[bi, ci, rows, cols]
    if flip:
        mask = torch.rand(b, device=dev) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x
