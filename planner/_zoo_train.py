"""Brief, cached training of the zoo's image classifiers on a synthetic shapes task.

Why synthetic: the zoo's image models take ``[batch, 3, 64, 64]`` and have 10
classes. No package the project already depends on ships an image data set
(scikit-learn's 8x8 digits would add scikit-learn and scipy to the install for
one test fixture), nothing may be downloaded, and the agreement figures only
need a model whose logits carry a learned decision with real margins, not
near-ties of random weights. ``shapes10`` is generated from a seed in
milliseconds and is hard enough that a briefly trained net keeps some
low-margin samples:

* 10 classes of shapes: disk, square, triangle, plus, x-cross, ring, hollow
  square, diamond, horizontal bar, vertical bar;
* random centre, size (10-24 px radius), foreground and background colours
  (kept apart), a random linear shading of the background, Gaussian pixel noise
  (sigma 0.15) and a distractor speck;
* values roughly zero-mean, unit-scale (``(rgb - 0.5) / 0.25``).

Training: Adam, a few hundred small batches on fresh samples (train-mode
BatchNorm), then eval mode. The weights are cached under
``$SPLITGATE_CACHE_DIR`` (default ``~/.cache/splitgate``) keyed by model,
seed, recipe version and torch version, so a second call costs a file read.
Held-out calibration samples come from a different seed stream than training.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["shapes10", "calibration_images", "train_module", "cache_dir", "RECIPE"]

#: bump when the data set or training recipe changes (invalidates the cache)
RECIPE = "shapes10-v1"
SIZE = 64
_TRAIN_STREAM = 1_000_003  # seed offsets keeping train / calibration samples apart
_CALIB_STREAM = 2_000_003


def cache_dir() -> Path:
    """Where trained weights are cached (``$SPLITGATE_CACHE_DIR`` or ``~/.cache/splitgate``)."""
    env = os.environ.get("SPLITGATE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitgate"
    return base / "zoo"


def _masks(kind: np.ndarray, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Boolean shape masks ``[n, H, W]`` for shape ``kind[i]`` centred at offset (dx, dy), radius r."""
    ax, ay = np.abs(dx), np.abs(dy)
    w = np.maximum(r * 0.3, 2.0)
    shapes = [
        dx**2 + dy**2 <= r**2,  # disk
        (ax <= r * 0.8) & (ay <= r * 0.8),  # square
        (dy <= r * 0.7) & (dy >= -r) & (ax <= (dy + r) * 0.6),  # triangle (apex up)
        ((ax <= w / 2) & (ay <= r)) | ((ay <= w / 2) & (ax <= r)),  # plus
        ((np.abs(dx - dy) <= w * 0.7) | (np.abs(dx + dy) <= w * 0.7)) & (ax <= r * 0.8) & (ay <= r * 0.8),  # x
        (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (r * 0.6) ** 2),  # ring
        (ax <= r * 0.8) & (ay <= r * 0.8) & ~((ax <= r * 0.5) & (ay <= r * 0.5)),  # hollow square
        ax + ay <= r,  # diamond
        (ax <= r) & (ay <= w / 2),  # horizontal bar
        (ay <= r) & (ax <= w / 2),  # vertical bar
    ]
    out = np.zeros(dx.shape, dtype=bool)
    for k, m in enumerate(shapes):
        sel = kind == k
        out[sel] = m[sel]
    return out


def shapes10(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded samples of the shapes10 task.

    Returns:
        (images float32 ``[n, 3, 64, 64]``, labels int64 ``[n]``).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    r = rng.uniform(10, 24, n).astype(np.float32)
    cx = rng.uniform(r, SIZE - r).astype(np.float32)
    cy = rng.uniform(r, SIZE - r).astype(np.float32)
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    mask = _masks(labels, dx, dy, r[:, None, None])
    fg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    bg = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    # keep foreground and background apart: push bg away from fg where they are close
    close = np.abs(fg - bg).sum(axis=1) < 0.6
    bg[close] = 1.0 - fg[close]
    grad = rng.uniform(-0.3, 0.3, (n, 2)).astype(np.float32)
    shade = (grad[:, 0, None, None] * (xx[None] / SIZE - 0.5) + grad[:, 1, None, None] * (yy[None] / SIZE - 0.5))
    img = np.where(mask[:, None], fg[:, :, None, None], bg[:, :, None, None] + shade[:, None])
    # a small distractor speck somewhere
    sx, sy = rng.integers(0, SIZE - 4, n), rng.integers(0, SIZE - 4, n)
    speck = rng.uniform(0, 1, (n, 3)).astype(np.float32)
    for i in range(n):
        img[i, :, sy[i]:sy[i] + 3, sx[i]:sx[i] + 3] = speck[i, :, None, None]
    img = img + rng.normal(0, 0.15, img.shape).astype(np.float32)
    return ((img - 0.5) / 0.25).astype(np.float32), labels.astype(np.int64)


def calibration_images(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out shapes10 samples (a seed stream training never uses)."""
    return shapes10(n, seed=_CALIB_STREAM + seed)


def train_module(spec: Any, name: str, *, seed: int = 0, steps: int = 150, batch: int = 32,
                 lr: float = 3e-3, cache: bool = True) -> dict[str, float]:
    """Train ``spec.module`` in place on shapes10 (or load cached weights); leave it in eval mode.

    Args:
        spec: a :class:`planner.zoo.ZooSpec` of an image model.
        name: the zoo model name (cache key).
        seed: seed of the data stream and the cache key.
        steps, batch, lr: the recipe (part of the cache key).
        cache: read/write the weight cache.

    Returns:
        ``{"train_acc": ..., "heldout_acc": ..., "cached": 0/1}``.
    """
    import torch

    key = f"{name}-s{seed}-{RECIPE}-n{steps}x{batch}-lr{lr:g}-torch{torch.__version__.split('+')[0]}"
    path = cache_dir() / f"{key}.pt"
    module = spec.module
    if cache and path.is_file():
        blob = torch.load(path, map_location="cpu", weights_only=True)
        module.load_state_dict(blob["state"])
        module.eval()
        return {**blob["stats"], "cached": 1.0}
    torch.manual_seed(seed)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps, eta_min=lr * 0.05)
    module.train()
    correct = seen = 0
    for step in range(steps):
        x, y = shapes10(batch, seed=_TRAIN_STREAM + seed * 100_003 + step)
        xt, yt = torch.from_numpy(x), torch.from_numpy(y)
        logits = module(xt)
        loss = torch.nn.functional.cross_entropy(logits, yt)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step >= steps - 20:
            correct += int((logits.argmax(1) == yt).sum())
            seen += batch
    module.eval()
    xh, yh = calibration_images(256, seed=seed + 7)
    with torch.no_grad():
        acc = float((module(torch.from_numpy(xh)).argmax(1).numpy() == yh).mean())
    stats = {"train_acc": correct / max(1, seen), "heldout_acc": acc}
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state": module.state_dict(), "stats": stats}, tmp)
        os.replace(tmp, path)
    return {**stats, "cached": 0.0}
