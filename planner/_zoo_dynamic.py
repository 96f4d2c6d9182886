"""Zoo models with dynamic axes, standing in for the ONNX models users bring.

Five seeded torch models (built by :func:`splitgate.planner.zoo.build_zoo_module`,
exported by :func:`splitgate.planner.zoo.export_zoo_model`, listed in
:data:`splitgate.planner.zoo.ZOO_MODELS`), each with its valid input shapes and an input
generator in :data:`DYNAMIC_MODELS`:

* ``"detector_dyn"`` - a fully convolutional detector: ``"image"`` float32
  ``[batch, 3, height, width]`` -> ``"heatmap"`` (sigmoid class scores)
  ``[batch, 4, ceil(height/8), ceil(width/8)]`` and ``"boxes"``
  ``[batch, 4, ceil(height/8), ceil(width/8)]``; a residual block and a
  concatenated stride-2 skip make it a DAG. Its ONNX file holds every weight
  in a ``Constant`` node at the start of the graph, no initializers (as many
  users' models come).
* ``"crnn_dyn"`` - a text recognizer: ``"image"`` float32
  ``[batch, 1, 32, width]`` -> conv stack (height 32 -> 1, width /4) ->
  bidirectional LSTM (hidden 32) -> ``"logits"`` ``[batch, floor(width/4), 37]``.
* ``"transformer_dyn"`` - ``"tokens"`` int64 ``[batch, seq]`` (ids in
  ``[0, 512)``, 0 = padding) and ``"attention_mask"`` int64 ``[batch, seq]``
  (1 = real token); learned positions sliced to ``seq`` (``seq <= 512``), 2
  pre-norm encoder layers whose attention ignores masked keys ->
  ``"logits"`` ``[batch, seq, 512]`` and ``"pooled"`` ``[batch, 64]`` (mean of
  the real tokens).
* ``"gru_state"`` - a stateful 2-layer GRU: ``"x"`` float32 ``[batch, time, 16]``
  and ``"h0"`` float32 ``[2, batch, 32]`` -> ``"y"`` ``[batch, time, 32]`` and
  ``"h_n"`` ``[2, batch, 32]`` (the batch is axis 1 of the state).
* ``"if_value"`` - inputs whose values matter: ``"x"`` float32 ``[batch, N]``
  and ``"n"`` int64 scalar ``[]``, a frame length that must be an even
  divisor of ``N`` (``x`` is reshaped to frames of two halves,
  ``[batch, N/n, 2, n/2]``). An ONNX ``If`` on ``n > 8`` picks the
  long-frame branch (mean, power, largest half-to-half change -> Linear) or
  the short-frame branch (frame energies -> Linear -> tanh); both give
  ``"y"`` ``[batch, 8]``. ``n = 0`` or ``1`` (what a dummy input holds) makes
  onnxruntime's Reshape fail (``n/2 = 0``), and any small constant would
  profile only the short branch, so the model is planned from real samples. The
  module is scripted (``torch.jit.script``) and exported with the legacy
  TorchScript exporter, whose ``prim::If`` becomes the ONNX ``If``
  (``torch.cond`` with the dynamo exporter gives an ``If`` too, but only on a
  data-independent reshape).

Shapes and samples: :data:`DYNAMIC_MODELS` maps each name to a
:class:`DynamicCase` (planned shape buckets, two other valid shapes, the
dynamic axes); :func:`make_inputs` draws valid inputs at given shapes and
:func:`write_samples` writes them as ``.npz`` for ``splitgate plan --sample``.
Importing this module needs numpy only (torch is imported by the builders).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from splitgate.errors import InvalidArgument

__all__ = ["DYNAMIC_BUILDERS", "DYNAMIC_MODELS", "DynamicCase", "make_inputs", "write_samples"]

Shapes = dict[str, tuple[int, ...]]

DETECTOR_CLASSES = 4
CRNN_CLASSES = 37
VOCAB = 512
MAX_SEQ = 512
D_MODEL = 64
GRU_FEATURES, GRU_HIDDEN, GRU_LAYERS = 16, 32, 2
#: if_value takes the long-frame branch when its frame length ``n`` exceeds this
IF_THRESHOLD = 8


# -- model definitions -----------------------------------------------------------


def _detector_dyn() -> Any:
    import torch
    import torch.nn as nn

    from splitgate.planner.zoo import ZooSpec, _conv_bn

    class Detector(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = _conv_bn(3, 16, 3, stride=2)  # /2
            self.down1 = _conv_bn(16, 32, 3, stride=2)  # /4
            self.down2 = _conv_bn(32, 64, 3, stride=2)  # /8
            self.block = nn.Sequential(_conv_bn(64, 64, 3), _conv_bn(64, 64, 3, act=None))
            self.skip = _conv_bn(32, 32, 1, stride=2, act=None)  # /4 -> /8, concatenated
            self.neck = _conv_bn(96, 64, 3)
            self.cls = nn.Conv2d(64, DETECTOR_CLASSES, 1)
            self.box = nn.Conv2d(64, 4, 1)

        def forward(self, image: Any) -> tuple[Any, Any]:
            c4 = self.down1(self.stem(image))
            c8 = self.down2(c4)
            c8 = torch.relu(c8 + self.block(c8))
            feat = self.neck(torch.cat([c8, self.skip(c4)], dim=1))
            return torch.sigmoid(self.cls(feat)), self.box(feat)

    example = (torch.rand(2, 3, 64, 48),)
    axes = {2: "height", 3: "width"}
    out_axes = {2: "height_8", 3: "width_8"}
    return ZooSpec(Detector(), example, ["image"], ["heatmap", "boxes"],
                   {"image": axes, "heatmap": out_axes, "boxes": out_axes}, weights_as_constants=True)


def _crnn_dyn() -> Any:
    import torch
    import torch.nn as nn

    from splitgate.planner.zoo import ZooSpec, _conv_bn

    class CRNN(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.cnn = nn.Sequential(
                _conv_bn(1, 16, 3), nn.MaxPool2d(2),  # 16 x W/2
                _conv_bn(16, 32, 3), nn.MaxPool2d(2),  # 8 x W/4
                _conv_bn(32, 64, 3), nn.MaxPool2d((2, 1)),  # 4
                _conv_bn(64, 64, 3), nn.MaxPool2d((2, 1)),  # 2
                nn.Conv2d(64, 64, (2, 1)), nn.ReLU(inplace=True),  # 1
            )
            self.rnn = nn.LSTM(64, 32, batch_first=True, bidirectional=True)
            self.head = nn.Linear(64, CRNN_CLASSES)

        def forward(self, image: Any) -> Any:
            seq = self.cnn(image).squeeze(2).permute(0, 2, 1)  # [B, T, 64]
            out, _ = self.rnn(seq)
            return self.head(out)

    example = (torch.rand(2, 1, 32, 40),)
    return ZooSpec(CRNN(), example, ["image"], ["logits"], {"image": {3: "width"}, "logits": {1: "steps"}})


def _transformer_dyn() -> Any:
    import torch
    import torch.nn as nn

    from splitgate.planner.zoo import ZooSpec

    heads = 4

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(D_MODEL), nn.LayerNorm(D_MODEL)
            self.qkv = nn.Linear(D_MODEL, 3 * D_MODEL)
            self.proj = nn.Linear(D_MODEL, D_MODEL)
            self.ff = nn.Sequential(nn.Linear(D_MODEL, 2 * D_MODEL), nn.GELU(), nn.Linear(2 * D_MODEL, D_MODEL))

        def forward(self, x: Any, key_bias: Any) -> Any:
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, D_MODEL // heads).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) * (D_MODEL // heads) ** -0.5 + key_bias
            x = x + self.proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, n, D_MODEL))
            return x + self.ff(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(VOCAB, D_MODEL)
            self.pos = nn.Parameter(0.1 * torch.randn(1, MAX_SEQ, D_MODEL))
            self.blocks = nn.ModuleList([Block(), Block()])
            self.norm = nn.LayerNorm(D_MODEL)
            self.head = nn.Linear(D_MODEL, VOCAB)

        def forward(self, tokens: Any, attention_mask: Any) -> tuple[Any, Any]:
            keep = attention_mask.to(torch.float32)  # [B, S]
            key_bias = ((1.0 - keep) * -1e4)[:, None, None, :]  # masked keys get no attention
            x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
            for block in self.blocks:
                x = block(x, key_bias)
            x = self.norm(x)
            weights = keep[:, :, None]
            pooled = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
            return self.head(x), pooled

    example = (torch.randint(1, VOCAB, (2, 12)), torch.ones(2, 12, dtype=torch.int64))
    seq = {1: "seq"}
    return ZooSpec(Encoder(), example, ["tokens", "attention_mask"], ["logits", "pooled"],
                   {"tokens": seq, "attention_mask": seq, "logits": seq})


def _gru_state() -> Any:
    import torch
    import torch.nn as nn

    from splitgate.planner.zoo import ZooSpec

    class StatefulGRU(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(GRU_FEATURES, GRU_HIDDEN)
            self.gru = nn.GRU(GRU_HIDDEN, GRU_HIDDEN, num_layers=GRU_LAYERS, batch_first=True)

        def forward(self, x: Any, h0: Any) -> tuple[Any, Any]:
            return self.gru(torch.tanh(self.inp(x)), h0)

    example = (torch.randn(2, 6, GRU_FEATURES), 0.5 * torch.randn(GRU_LAYERS, 2, GRU_HIDDEN))
    time = {1: "time"}
    return ZooSpec(StatefulGRU(), example, ["x", "h0"], ["y", "h_n"], {"x": time, "y": time},
                   batch_axes={"h0": 1, "h_n": 1})


def _if_value() -> Any:
    import torch
    import torch.nn as nn

    from splitgate.planner.zoo import ZooSpec

    class FrameStats(nn.Module):
        __constants__ = ["threshold"]

        def __init__(self) -> None:
            super().__init__()
            self.threshold = IF_THRESHOLD
            self.long_head = nn.Linear(3, 8)
            self.short_head = nn.Linear(3, 8)

        def long_frames(self, halves: torch.Tensor) -> torch.Tensor:
            change = (halves[:, :, 0] - halves[:, :, 1]).abs().amax((1, 2))
            stats = [halves.mean((1, 2, 3)), halves.pow(2).mean((1, 2, 3)), change]
            return self.long_head(torch.stack(stats, 1))

        def short_frames(self, halves: torch.Tensor) -> torch.Tensor:
            energy = halves.pow(2).mean((2, 3))  # [B, frames]
            stats = [energy.mean(1), energy.amax(1), halves.amin((1, 2, 3))]
            return torch.tanh(self.short_head(torch.stack(stats, 1)))

        def forward(self, x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
            # frames of n samples, each as two halves: [B, N/n, 2, n/2]; n = 0 or 1 makes the Reshape fail
            halves = x.reshape(x.shape[0], -1, 2, n // 2)
            if bool(n > self.threshold):
                return self.long_frames(halves)
            return self.short_frames(halves)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated, still supported
        module = torch.jit.script(FrameStats())
    example = (torch.randn(2, 48), torch.tensor(12, dtype=torch.int64))
    return ZooSpec(module, example, ["x", "n"], ["y"], {"x": {1: "samples"}}, batch_axes={"n": None}, scripted=True)


DYNAMIC_BUILDERS: dict[str, Callable[[], Any]] = {
    "detector_dyn": _detector_dyn,
    "crnn_dyn": _crnn_dyn,
    "transformer_dyn": _transformer_dyn,
    "gru_state": _gru_state,
    "if_value": _if_value,
}


# -- shapes and inputs ------------------------------------------------------------


@dataclass(frozen=True)
class DynamicCase:
    """The valid shapes of a dynamic zoo model, for planning and checking it.

    Attributes:
        name: the zoo model name.
        planned: the shapes to plan with, one dict (input name -> shape, batch
            included) per shape bucket.
        other: two further valid shape dicts not in ``planned``: one 4x the
            elements of the largest bucket and one odd size.
        dynamic: per input name, ``{axis: dim name}`` of its dynamic axes
            (batch included; inputs sharing a dim name must agree on it).
        static: per input name, its full shape with ``-1`` at dynamic axes.
    """

    name: str
    planned: list[dict[str, tuple[int, ...]]]
    other: list[dict[str, tuple[int, ...]]]
    dynamic: dict[str, dict[int, str]]
    static: dict[str, tuple[int, ...]]

    def make_inputs(self, shapes: Shapes, seed: int = 0, n: int | None = None) -> dict[str, np.ndarray]:
        """Valid inputs at ``shapes``; see :func:`make_inputs`."""
        return make_inputs(self.name, shapes, seed=seed, n=n)

    def write_samples(self, shapes: Shapes, path: str | os.PathLike[str], n: int = 8) -> Path:
        """Write ``n`` samples at ``shapes``; see :func:`write_samples`."""
        return write_samples(self.name, shapes, path, n=n)


DYNAMIC_MODELS: dict[str, DynamicCase] = {
    "detector_dyn": DynamicCase(
        "detector_dyn",
        [{"image": (1, 3, 128, 128)}, {"image": (1, 3, 256, 256)}],
        [{"image": (1, 3, 512, 512)}, {"image": (2, 3, 120, 100)}],
        {"image": {0: "batch", 2: "height", 3: "width"}},
        {"image": (-1, 3, -1, -1)},
    ),
    "crnn_dyn": DynamicCase(
        "crnn_dyn",
        [{"image": (1, 1, 32, 128)}, {"image": (1, 1, 32, 256)}],
        [{"image": (1, 1, 32, 1024)}, {"image": (2, 1, 32, 100)}],
        {"image": {0: "batch", 3: "width"}},
        {"image": (-1, 1, 32, -1)},
    ),
    "transformer_dyn": DynamicCase(
        "transformer_dyn",
        [{"tokens": (1, 16), "attention_mask": (1, 16)}, {"tokens": (1, 64), "attention_mask": (1, 64)}],
        [{"tokens": (1, 256), "attention_mask": (1, 256)}, {"tokens": (3, 37), "attention_mask": (3, 37)}],
        {"tokens": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}},
        {"tokens": (-1, -1), "attention_mask": (-1, -1)},
    ),
    "gru_state": DynamicCase(
        "gru_state",
        [{"x": (1, 32, GRU_FEATURES), "h0": (GRU_LAYERS, 1, GRU_HIDDEN)}],
        [{"x": (1, 128, GRU_FEATURES), "h0": (GRU_LAYERS, 1, GRU_HIDDEN)},
         {"x": (3, 7, GRU_FEATURES), "h0": (GRU_LAYERS, 3, GRU_HIDDEN)}],
        {"x": {0: "batch", 1: "time"}, "h0": {1: "batch"}},
        {"x": (-1, -1, GRU_FEATURES), "h0": (GRU_LAYERS, -1, GRU_HIDDEN)},
    ),
    "if_value": DynamicCase(
        "if_value",
        [{"x": (1, 256), "n": ()}],
        [{"x": (1, 1024), "n": ()}, {"x": (2, 100), "n": ()}],
        {"x": {0: "batch", 1: "samples"}},
        {"x": (-1, -1), "n": ()},
    ),
}


def _check_shapes(name: str, shapes: Shapes) -> DynamicCase:
    """The model's case, after checking ``shapes`` against its static and shared dims.

    Raises:
        InvalidArgument: unknown model, missing or extra inputs, a wrong rank
            or static dim, a non-positive dim, or a shared dim that disagrees.
    """
    case = DYNAMIC_MODELS.get(name)
    if case is None:
        raise InvalidArgument(f"'{name}' is not a dynamic zoo model (known: {', '.join(DYNAMIC_MODELS)})")
    if set(shapes) != set(case.static):
        raise InvalidArgument(f"{name} takes inputs {sorted(case.static)}, got shapes for {sorted(shapes)}")
    sizes: dict[str, int] = {}
    for inp, want in case.static.items():
        got = tuple(int(d) for d in shapes[inp])
        if len(got) != len(want) or any(w >= 0 and g != w for g, w in zip(got, want)) or any(g < 1 for g in got):
            raise InvalidArgument(f"{name} input '{inp}' must have shape {list(want)} (-1 = any), got {list(got)}")
        for axis, dim in case.dynamic.get(inp, {}).items():
            if sizes.setdefault(dim, got[axis]) != got[axis]:
                raise InvalidArgument(f"{name}: dim '{dim}' is {sizes[dim]} in one input and {got[axis]} in '{inp}'")
    return case


def _frame_length(samples: int, rng: np.random.Generator, long: bool | None) -> int:
    """A frame length for if_value: an even divisor of ``samples`` in [2, 64], long (> 8) or short if asked."""
    divisors = [d for d in range(2, min(samples, 64) + 1, 2) if samples % d == 0] or [samples]
    if long is not None:
        wanted = [d for d in divisors if (d > IF_THRESHOLD) == long]
        divisors = wanted or divisors
    return int(rng.choice(divisors))


def make_inputs(name: str, shapes: Shapes, seed: int = 0, n: int | None = None) -> dict[str, np.ndarray]:
    """Seeded valid inputs for a dynamic zoo model at ``shapes``.

    Images are uniform in [0, 1); float signals and states standard normal
    (states scaled by 0.5); ``transformer_dyn`` tokens are ids in
    ``[1, 512)`` with each row padded after a random length in
    ``[ceil(seq/2), seq)`` (mask 0, token 0 there; rows of length 1 are not
    padded); ``if_value``'s ``n`` is an even divisor of ``N`` in ``[2, 64]``.

    Args:
        name: a key of :data:`DYNAMIC_MODELS`.
        shapes: input name -> shape (batch included), e.g. from ``planned``.
        seed: the numpy seed.
        n: ``if_value`` only: the frame length to use (an even divisor of
            ``N``; default: a seeded one). Ignored by the other models.

    Returns:
        Input name -> array (float32 or int64), ready for onnxruntime.

    Raises:
        InvalidArgument: unknown model, shapes that do not fit it, or an ``n``
            that is not an even divisor of ``N``.
    """
    _check_shapes(name, shapes)
    rng = np.random.default_rng(seed)
    if name in ("detector_dyn", "crnn_dyn"):
        return {"image": rng.random(shapes["image"], dtype=np.float32)}
    if name == "gru_state":
        return {"x": rng.standard_normal(shapes["x"], dtype=np.float32),
                "h0": (0.5 * rng.standard_normal(shapes["h0"])).astype(np.float32)}
    if name == "transformer_dyn":
        batch, seq = shapes["tokens"]
        tokens = rng.integers(1, VOCAB, size=(batch, seq), dtype=np.int64)
        if seq > MAX_SEQ:
            raise InvalidArgument(f"transformer_dyn: seq {seq} is longer than its {MAX_SEQ} learned positions")
        lengths = rng.integers((seq + 1) // 2, seq, size=batch) if seq > 1 else np.ones(batch, np.int64)
        mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
        return {"tokens": tokens * mask, "attention_mask": mask}
    batch, samples = shapes["x"]
    length = _frame_length(samples, rng, None) if n is None else int(n)
    if length < 2 or length % 2 or samples % length:
        raise InvalidArgument(f"if_value: n={length} must be an even divisor of N={samples}")
    return {"x": rng.standard_normal((batch, samples), dtype=np.float32), "n": np.array(length, dtype=np.int64)}


def write_samples(name: str, shapes: Shapes, path: str | os.PathLike[str], n: int = 8) -> Path:
    """Write ``n`` valid samples at ``shapes`` to an ``.npz`` for ``splitgate plan --sample``.

    Format: one array per model input, named as the input, of shape
    ``[n, *shape]`` where ``shape`` is the per-request shape given in
    ``shapes`` (batch included): sample ``i`` is ``np.asarray(array[i])``, fed
    as is (``asarray``: indexing a 1-d array gives a numpy scalar, which
    onnxruntime refuses).
    E.g. ``detector_dyn`` at ``{"image": (1, 3, 128, 128)}`` gives
    ``image`` ``[n, 1, 3, 128, 128]``; ``if_value``'s scalar ``n`` gives an
    int64 ``[n]`` array. Sample ``i`` is :func:`make_inputs` with ``seed=i``;
    for ``if_value`` even samples take the long-frame branch and odd ones the
    short-frame branch where ``N`` has such divisors.

    Args:
        name: a key of :data:`DYNAMIC_MODELS`.
        shapes: input name -> per-request shape.
        path: the ``.npz`` file to write (parent directories are created).
        n: number of samples (>= 1).

    Returns:
        The path written.

    Raises:
        InvalidArgument: unknown model, shapes that do not fit it, or ``n < 1``.
    """
    if n < 1:
        raise InvalidArgument(f"write_samples needs n >= 1 samples, got {n}")
    _check_shapes(name, shapes)
    samples = []
    for i in range(n):
        length = None
        if name == "if_value":
            length = _frame_length(shapes["x"][1], np.random.default_rng(i), long=i % 2 == 0)
        samples.append(make_inputs(name, shapes, seed=i, n=length))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "wb") as f:  # np.savez would append ".npz" to other suffixes
        np.savez(f, **{k: np.stack([s[k] for s in samples]) for k in samples[0]})
    return out
