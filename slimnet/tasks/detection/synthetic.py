"""A synthetic detection set that a CPU learns from in minutes: shapes on textured backgrounds.

Each image is a textured background (smooth colour noise, stripes at any angle, or a checkerboard),
unlabelled clutter (thin lines and dots), and 1..``max_objects`` objects of up to five classes --
rectangle, ellipse, triangle, plus-shaped cross, ring -- each with its own size, aspect ratio and
colour. Objects may overlap: a new object is placed only where it leaves every earlier one at least
``min_visible`` of its area in view, and boxes are the tight boxes of the *visible* pixels, as COCO
boxes are. The class is the shape alone: colours and sizes are drawn independently of it.

Image ``i`` of a split is drawn from its own generator seeded by ``(seed, split, i)``, so it is the
same whatever the split sizes, the order of generation or the process that asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# Foreground classes in label order; torchvision detectors reserve label 0 for the background.
SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class SceneConfig:
    """What one image may contain (sizes in pixels, the side of the object's box at aspect 1)."""

    image_size: int = 128
    num_classes: int = len(SHAPES)  # the first ``num_classes`` of SHAPES
    max_objects: int = 5
    min_object_size: float = 14.0
    max_object_size: float = 56.0
    max_clutter: int = 6  # lines and dots that belong to no class
    min_visible: float = 0.5  # share of an object's area that later objects may not hide

    def __post_init__(self):
        if not 1 <= self.num_classes <= len(SHAPES):
            raise ValueError(f"num_classes must be in 1..{len(SHAPES)} (one per shape), got {self.num_classes}")
        if not 4 <= self.min_object_size <= self.max_object_size <= self.image_size:
            raise ValueError(
                "object sizes must satisfy 4 <= min_object_size <= max_object_size <= image_size, got "
                f"{self.min_object_size}, {self.max_object_size}, {self.image_size}"
            )
        if self.max_objects < 1 or self.max_clutter < 0 or not 0.0 < self.min_visible <= 1.0:
            raise ValueError("max_objects >= 1, max_clutter >= 0 and 0 < min_visible <= 1 are needed")


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """An int in [lo, hi], inclusive."""
    return int(torch.randint(lo, hi + 1, (), generator=g))


def _background(g: torch.Generator, n: int, yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
    """(3, n, n) in [0, 1]: two random colours mixed by one of three textures."""
    c0, c1 = torch.rand(3, 1, 1, generator=g), torch.rand(3, 1, 1, generator=g)
    kind = _randint(g, 0, 2)
    if kind == 0:  # smooth colour noise: a coarse random field, bilinearly upsampled
        k = _randint(g, 3, 8)
        coarse = torch.rand(1, 3, k, k, generator=g)
        img = torch.nn.functional.interpolate(coarse, size=(n, n), mode="bilinear", align_corners=False)[0]
        return 0.5 * img + 0.5 * (c0 + c1) / 2
    if kind == 1:  # stripes at a random angle and period
        theta, period, phase = _uniform(g, 0, math.pi), _uniform(g, 6, 24), _uniform(g, 0, 2 * math.pi)
        t = torch.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period + phase)
        mix = (t + 1) / 2
    else:  # checkerboard of a random cell size
        cell = _randint(g, 6, 20)
        mix = ((xx // cell + yy // cell) % 2).float()
    return c0 + (c1 - c0) * mix


def _clutter(g: torch.Generator, img: torch.Tensor, cfg: SceneConfig, yy, xx) -> None:
    """Paint unlabelled thin lines and small dots: things a detector must learn to ignore."""
    n = cfg.image_size
    for _ in range(_randint(g, 0, cfg.max_clutter)):
        colour = torch.rand(3, 1, 1, generator=g)
        if float(torch.rand((), generator=g)) < 0.5:  # a line segment, 1-2 px wide
            x0, y0, x1, y1 = (_uniform(g, 0, n) for _ in range(4))
            dx, dy = x1 - x0, y1 - y0
            length2 = max(dx * dx + dy * dy, 1e-6)
            t = (((xx - x0) * dx + (yy - y0) * dy) / length2).clamp(0, 1)
            dist = torch.hypot(xx - (x0 + t * dx), yy - (y0 + t * dy))
            mask = dist <= _uniform(g, 0.5, 1.2)
        else:  # a dot too small to be an object
            cx, cy, r = _uniform(g, 0, n), _uniform(g, 0, n), _uniform(g, 1.0, 3.0)
            mask = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        img[:, mask] = colour.view(3, 1).expand(3, int(mask.sum()))


def _shape_mask(label: int, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Inside-mask of shape ``SHAPES[label - 1]`` in box coordinates u, v in [-1, 1] (v down)."""
    au, av = u.abs(), v.abs()
    r2 = u * u + v * v
    return {
        1: lambda: (au <= 1) & (av <= 1),  # rectangle
        2: lambda: r2 <= 1,  # ellipse
        3: lambda: (av <= 1) & (au <= (v + 1) / 2),  # triangle, apex up
        4: lambda: ((au <= 1 / 3) & (av <= 1)) | ((av <= 1 / 3) & (au <= 1)),  # plus-shaped cross
        5: lambda: (r2 <= 1) & (r2 >= 0.3),  # ring
    }[label]()


def render_scene(cfg: SceneConfig, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: ``(uint8 (3, n, n), boxes float32 (k, 4) xyxy in pixels, labels int64 (k,) in 1..K)``."""
    n = cfg.image_size
    # pixel centres, (n, n) each
    yy, xx = torch.meshgrid(torch.arange(n) + 0.5, torch.arange(n) + 0.5, indexing="ij")
    img = _background(g, n, yy, xx)
    _clutter(g, img, cfg, yy, xx)

    owner = torch.full((n, n), -1, dtype=torch.long)  # which object each pixel shows, -1 for none
    areas: list[int] = []
    labels: list[int] = []
    for _ in range(_randint(g, 1, cfg.max_objects)):
        label = _randint(g, 1, cfg.num_classes)
        colour = torch.rand(3, generator=g)
        for _try in range(20):  # rejection sampling: an object that would hide too much is moved
            size = math.exp(_uniform(g, math.log(cfg.min_object_size), math.log(cfg.max_object_size)))
            aspect = math.exp(_uniform(g, math.log(0.5), math.log(2.0)))
            w, h = min(size * math.sqrt(aspect), n - 2), min(size / math.sqrt(aspect), n - 2)
            cx, cy = _uniform(g, w / 2 + 1, n - w / 2 - 1), _uniform(g, h / 2 + 1, n - h / 2 - 1)
            mask = _shape_mask(label, (xx - cx) / (w / 2), (yy - cy) / (h / 2))
            if int(mask.sum()) < 16:
                continue
            hidden = torch.bincount(owner[mask & (owner >= 0)], minlength=len(areas))
            left = torch.bincount(owner[owner >= 0], minlength=len(areas)) - hidden  # visible after
            if all(int(left[j]) >= cfg.min_visible * areas[j] for j in range(len(areas))):
                break
        else:
            continue  # no room left for this object: the image gets fewer
        # contrast: a colour too close to what lies beneath would make an invisible object
        under = img[:, mask].mean(1)
        if float((colour - under).abs().max()) < 0.3:
            colour = torch.where(under > 0.5, under - 0.45, under + 0.45).clamp(0, 1)
        shade = 1.0 + 0.15 * (yy - cy) / max(h, 1.0)  # a mild vertical gradient: not a flat fill
        img[:, mask] = (colour.view(3, 1) * shade[mask]).clamp(0, 1)
        owner[mask] = len(areas)
        areas.append(int(mask.sum()))
        labels.append(label)

    boxes = []
    for j in range(len(areas)):
        ys, xs = torch.nonzero(owner == j, as_tuple=True)
        boxes.append([float(xs.min()), float(ys.min()), float(xs.max()) + 1, float(ys.max()) + 1])
    img = (img + 0.03 * torch.randn(img.shape, generator=g)).clamp(0, 1)  # sensor noise
    return (
        (img * 255).round().to(torch.uint8),
        torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        torch.tensor(labels, dtype=torch.int64),
    )


def image_generator(seed: int, split: str, index: int) -> torch.Generator:
    """The private generator of image ``index`` of ``split``: independent of every other image."""
    return torch.Generator().manual_seed((int(seed) * len(SPLITS) + SPLITS[split]) * 10_000_019 + int(index))


def generate(cfg: SceneConfig, n: int, seed: int, split: str):
    """``n`` scenes of ``split``: (uint8 images (n, 3, S, S), list of boxes, list of labels)."""
    # One intra-op thread: ops on one small image gain nothing from more, and on a busy machine the
    # thread pool's waiting made generation 15x slower here (6 ms -> 90 ms an image).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        scenes = [render_scene(cfg, image_generator(seed, split, i)) for i in range(n)]
    finally:
        torch.set_num_threads(threads)
    if not scenes:
        return torch.zeros(0, 3, cfg.image_size, cfg.image_size, dtype=torch.uint8), [], []
    images, boxes, labels = zip(*scenes)
    return torch.stack(images), list(boxes), list(labels)
