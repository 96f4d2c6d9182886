"""Brief, cached training of the zoo's image classifiers on a synthetic gratings task.

Why synthetic: the zoo's image models take ``[batch, 3, 64, 64]`` and have 10
classes. No package the project already depends on ships an image data set
(scikit-learn's 8x8 digits would add scikit-learn and scipy to the install for
one fixture), nothing may be downloaded, and the agreement figures only need a
model whose logits carry a learned decision with real margins, not the
near-ties of random weights. ``gratings10`` (see :func:`gratings10`) is
generated from a seed in milliseconds, needs spatial filtering across the whole
network (orientation and frequency, under colour, contrast, phase, occlusion
and heavy pixel noise), and a CNN learns it in tens of steps on a CPU, so a
brief training on a 2-core machine gives a well-trained classifier. (A shapes
task at varying scale and position was tried first: it needs minutes of CPU
training before accuracy leaves chance level.)

Training: Adam with cosine decay over ``steps`` batches of fresh samples
(train-mode BatchNorm), then eval mode. Weights are cached under
``$SPLITGATE_CACHE_DIR`` (default ``~/.cache/splitgate``) keyed by model, seed,
recipe and torch version, so a second call costs a file read. Calibration
samples come from a seed stream training never uses.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["gratings10", "calibration_images", "train_module", "cache_dir", "RECIPE"]

#: bump when the data set or training recipe changes (invalidates the cache)
RECIPE = "gratings10-v1"
SIZE = 64
_TRAIN_STREAM = 1_000_003  # seed offsets keeping train / calibration samples apart
_CALIB_STREAM = 2_000_003


def cache_dir() -> Path:
    """Where trained weights are cached (``$SPLITGATE_CACHE_DIR`` or ``~/.cache/splitgate``)."""
    env = os.environ.get("SPLITGATE_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "splitgate"
    return base / "zoo"


def gratings10(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` seeded samples of the gratings10 task.

    Class ``k`` is a sinusoidal grating at orientation ``(k % 5) * 36`` degrees
    (+-6 degrees of jitter) and ``3`` or ``6`` cycles per image (``k // 5``,
    +-15 %), with a random phase, a dark and a light random colour,
    random contrast (0.7-1.0), a random occluding disk and Gaussian pixel noise
    (sigma 0.1).

    Returns:
        (images float32 ``[n, 3, 64, 64]``, labels int64 ``[n]``).
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, n)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) / SIZE
    theta = np.deg2rad((labels % 5) * 36.0 + rng.uniform(-6, 6, n))
    freq = np.where(labels // 5 == 0, 3.0, 6.0) * rng.uniform(0.85, 1.15, n)
    phase = rng.uniform(0, 2 * np.pi, n)
    proj = np.cos(theta)[:, None, None] * xx[None] + np.sin(theta)[:, None, None] * yy[None]
    wave = np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
    contrast = rng.uniform(0.7, 1.0, n)[:, None, None]
    mix = 0.5 + 0.5 * contrast * wave  # 0..1
    c1 = rng.uniform(0, 0.3, (n, 3, 1, 1)) + rng.uniform(0, 0.2, (n, 1, 1, 1))
    c2 = 1.0 - rng.uniform(0, 0.3, (n, 3, 1, 1))
    img = c1 + (c2 - c1) * mix[:, None]
    # a soft occluding disk of a random colour
    cx, cy, r = rng.uniform(0, 1, n), rng.uniform(0, 1, n), rng.uniform(0.08, 0.2, n)
    d2 = (xx[None] - cx[:, None, None]) ** 2 + (yy[None] - cy[:, None, None]) ** 2
    occ = (d2 <= (r**2)[:, None, None])[:, None]
    img = np.where(occ, rng.uniform(0, 1, (n, 3, 1, 1)), img)
    img = img + rng.normal(0, 0.1, img.shape)
    return ((img - 0.5) / 0.3).astype(np.float32), labels.astype(np.int64)


def calibration_images(n: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Held-out gratings10 samples (a seed stream training never uses)."""
    return gratings10(n, seed=_CALIB_STREAM + seed)


def train_module(spec: Any, name: str, *, seed: int = 0, steps: int = 150, batch: int = 32,
                 lr: float = 3e-3, cache: bool = True) -> dict[str, float]:
    """Train ``spec.module`` in place on gratings10 (or load cached weights); leave it in eval mode.

    Args:
        spec: a :class:`splitgate.planner.zoo.ZooSpec` of an image model.
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
        x, y = gratings10(batch, seed=_TRAIN_STREAM + seed * 100_003 + step)
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
