"""A small model zoo: seeded torch models exported to ONNX at test/demo time.

Nothing is downloaded: each model is defined here, initialised from a seed
(BatchNorm layers get random affine params and running statistics measured on
seeded random inputs, so outputs are not degenerate), put in eval mode and exported with ``torch.onnx``. torch is
imported only inside the functions, so ``import planner.zoo`` works without it.

Models (all classifiers with output ``"logits"`` ``[batch, classes]``, 10
classes unless noted; the image models take ``"input"`` float32
``[batch, 3, 64, 64]`` unless noted):

* ``"mobilenet"`` - MobileNetV2-style (inverted residuals, ReLU6), width 0.5.
* ``"resnet18"``  - the ResNet-18 layout (BasicBlocks 2-2-2-2, 1x1 projection
  shortcuts), base width 16 (channels 16-128) to keep bundles small.
* ``"resnet18_224"`` - the real ResNet-18 (torchvision layout: base width 64,
  channels 64-512, ``"input"`` ``[batch, 3, 224, 224]``, 1000 classes,
  11.7 M parameters, ~47 MB ONNX, ~1.8 GMAC per image) for like-for-like
  latency studies (e.g. the DADS reproduction); untrained (seeded weights),
  not in :data:`IMAGE_MODELS`.
* ``"vggchain"``  - a plain VGG-style conv chain (every layer is a cut point).
* ``"transformer"`` - a 2-layer pre-norm transformer encoder (d_model 32, 4
  heads, attention written out so any exporter handles it) over int64 token
  ids ``"tokens"`` ``[batch, seq]`` with a dynamic ``seq`` dim; residuals make
  it a DAG.
* ``"lstm"`` - a 1-layer LSTM (hidden 32) over ``"input"`` float32
  ``[batch, seq, 16]`` (dynamic ``seq``): one atomic ONNX ``LSTM`` node.

Dynamic-shape models standing in for users' models (see
:mod:`splitgate.planner._zoo_dynamic`; their valid shapes and an input generator are in
:data:`DYNAMIC_MODELS`, :func:`make_inputs`, :func:`write_samples`):
``"detector_dyn"`` (dynamic H and W, weights in Constant nodes),
``"crnn_dyn"`` (dynamic width, LSTM sequence head), ``"transformer_dyn"``
(tokens and attention mask, dynamic seq, two outputs), ``"gru_state"`` (state
input and output) and ``"if_value"`` (an ``If`` on an input's value).

Add a model by writing a builder returning a :class:`ZooSpec` and listing it
in ``_BUILDERS``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitgate.planner._zoo_dynamic import DYNAMIC_BUILDERS, DYNAMIC_MODELS, DynamicCase, make_inputs, write_samples
from splitgate.errors import InvalidArgument

__all__ = [
    "DYNAMIC_MODELS",
    "DynamicCase",
    "make_inputs",
    "write_samples",
    "ZOO_MODELS",
    "IMAGE_MODELS",
    "ZooSpec",
    "export_zoo_model",
    "build_zoo_module",
    "train_zoo_module",
    "calibration_inputs",
    "export_early_exit",
]

NUM_CLASSES = 10
#: the (C, H, W) image shape of the small image models (``resnet18_224`` uses IMAGE_224)
IMAGE = (3, 64, 64)
IMAGE_224 = (3, 224, 224)


@dataclass
class ZooSpec:
    """A built zoo model, ready to export.

    Attributes:
        module: the torch module, in eval mode.
        example: one example input per model input (batch 2, so exporters
            cannot specialise the batch dim to 1).
        input_names: ONNX input names.
        output_names: ONNX output names.
        dynamic: per input (or output) name, ``{axis: dim_name}`` of dims
            that may vary besides batch.
        batch_axes: the batch axis of inputs/outputs where it is not axis 0
            (None: no batch axis, e.g. a scalar input).
        scripted: ``module`` is ``torch.jit.script``-ed (its control flow
            becomes ONNX ``If``); only the legacy exporter takes it.
        weights_as_constants: the exported file holds the weights in
            ``Constant`` nodes instead of initializers.
    """

    module: Any
    example: tuple[Any, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)
    batch_axes: dict[str, int | None] = field(default_factory=dict)
    scripted: bool = False
    weights_as_constants: bool = False

    def axes(self, name: str, batch_dynamic: bool) -> dict[int, str]:
        """The dynamic ``{axis: dim_name}`` of input/output ``name`` (batch first if dynamic)."""
        batch = self.batch_axes.get(name, 0)
        return {**({batch: "batch"} if batch_dynamic and batch is not None else {}), **self.dynamic.get(name, {})}

    def batch_of_one(self) -> tuple[Any, ...]:
        """The example inputs cut to batch 1 along each input's batch axis."""
        out = []
        for n, t in zip(self.input_names, self.example):
            batch = self.batch_axes.get(n, 0)
            out.append(t if batch is None else t.narrow(batch, 0, 1))
        return tuple(out)


# -- model definitions ---------------------------------------------------------


def _calibrate_batchnorm(spec: ZooSpec, generator: Any, passes: int = 4) -> None:
    """Give BatchNorm layers random affine params and running stats measured on data.

    Running stats come from a few train-mode passes over seeded random inputs
    (cumulative average), so activations stay well scaled through deep nets
    and the eval-mode outputs depend on the input instead of collapsing to the
    classifier's bias.
    """
    import torch

    bns = [m for m in spec.module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    with torch.no_grad():
        for m in bns:
            n = m.num_features
            m.weight.copy_(0.5 + torch.rand(n, generator=generator))
            m.bias.copy_(0.1 * torch.randn(n, generator=generator))
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the calibration passes
        spec.module.train()
        for _ in range(passes):
            batch = tuple(
                torch.randn(t.shape, generator=generator) if t.is_floating_point() else t for t in spec.example
            )
            spec.module(*batch)
        for m in bns:
            m.momentum = 0.1


def _conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: str | None = "relu") -> Any:
    import torch.nn as nn

    layers: list[Any] = [
        nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act == "relu":
        layers.append(nn.ReLU(inplace=True))
    elif act == "relu6":
        layers.append(nn.ReLU6(inplace=True))
    return nn.Sequential(*layers)


def _mobilenet() -> ZooSpec:
    import torch.nn as nn

    class InvertedResidual(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
            super().__init__()
            hidden = cin * expand
            layers: list[Any] = []
            if expand != 1:
                layers.append(_conv_bn(cin, hidden, 1, act="relu6"))
            layers += [
                _conv_bn(hidden, hidden, 3, stride=stride, groups=hidden, act="relu6"),
                _conv_bn(hidden, cout, 1, act=None),
            ]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: Any) -> Any:
            y = self.block(x)
            return x + y if self.residual else y

    # (expand t, channels c, repeats n, stride s) as in MobileNetV2, width 0.5, 64x64 input.
    settings = [(1, 8, 1, 1), (6, 12, 2, 2), (6, 16, 3, 2), (6, 32, 2, 2), (6, 48, 2, 1), (6, 80, 1, 2)]
    layers: list[Any] = [_conv_bn(3, 16, 3, stride=2, act="relu6")]
    cin = 16
    for t, c, n, s in settings:
        for i in range(n):
            layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
            cin = c
    layers += [_conv_bn(cin, 320, 1, act="relu6"), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(320, NUM_CLASSES)]
    return _image_spec(nn.Sequential(*layers))


def _resnet18(width: int = 16, image: tuple[int, int, int] = IMAGE, classes: int = NUM_CLASSES) -> ZooSpec:
    """ResNet-18 layout; defaults: the small zoo ``resnet18`` (width 16, 64x64, 10 classes)."""
    import torch.nn as nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = _conv_bn(cin, cout, 3, stride=stride)
            self.conv2 = _conv_bn(cout, cout, 3, act=None)
            self.down = _conv_bn(cin, cout, 1, stride=stride, act=None) if stride != 1 or cin != cout else None
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Any) -> Any:
            identity = x if self.down is None else self.down(x)
            return self.relu(self.conv2(self.conv1(x)) + identity)

    layers: list[Any] = [_conv_bn(3, width, 7, stride=2), nn.MaxPool2d(3, stride=2, padding=1)]
    cin = width
    for stage, cout in enumerate([width, width * 2, width * 4, width * 8]):
        for i in range(2):
            layers.append(BasicBlock(cin, cout, 2 if (i == 0 and stage > 0) else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return _image_spec(nn.Sequential(*layers), image)


def _resnet18_224() -> ZooSpec:
    """The real ResNet-18: width 64 (channels 64-512), 224x224x3 input, 1000 classes."""
    return _resnet18(width=64, image=IMAGE_224, classes=1000)


def _vggchain() -> ZooSpec:
    import torch.nn as nn

    layers: list[Any] = []
    cin = 3
    for cout in (16, 16, "M", 32, 32, "M", 64, 64, "M", 64, "M"):
        if cout == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers.append(_conv_bn(cin, int(cout), 3))
            cin = int(cout)
    layers += [nn.Flatten(), nn.Linear(cin * 4 * 4, 64), nn.ReLU(inplace=True), nn.Linear(64, NUM_CLASSES)]
    return _image_spec(nn.Sequential(*layers))


def _transformer() -> ZooSpec:
    import torch
    import torch.nn as nn

    d_model, heads, vocab, seq = 32, 4, 100, 12

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
            self.qkv = nn.Linear(d_model, 3 * d_model)
            self.proj = nn.Linear(d_model, d_model)
            self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

        def forward(self, x: Any) -> Any:
            b, n, _ = x.shape
            q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, heads, d_model // heads).permute(2, 0, 3, 1, 4)
            att = torch.softmax(q @ k.transpose(-2, -1) * (d_model // heads) ** -0.5, dim=-1)
            x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, d_model))
            return x + self.ff(self.norm2(x))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d_model)
            self.pos = nn.Parameter(0.1 * torch.randn(1, 64, d_model))
            self.blocks = nn.Sequential(Block(), Block())
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, NUM_CLASSES)

        def forward(self, tokens: Any) -> Any:
            x = self.embed(tokens) + self.pos[:, : tokens.shape[1]]
            return self.head(self.norm(self.blocks(x)).mean(dim=1))

    example = (torch.randint(0, vocab, (2, seq)),)
    return ZooSpec(Encoder(), example, ["tokens"], ["logits"], {"tokens": {1: "seq"}})


def _lstm() -> ZooSpec:
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inp = nn.Linear(16, 32)
            self.lstm = nn.LSTM(32, 32, batch_first=True)
            self.head = nn.Linear(32, NUM_CLASSES)

        def forward(self, x: Any) -> Any:
            out, _ = self.lstm(torch.tanh(self.inp(x)))
            return self.head(out[:, -1])

    return ZooSpec(Net(), (torch.randn(2, 8, 16),), ["input"], ["logits"], {"input": {1: "seq"}})


def _image_spec(module: Any, image: tuple[int, int, int] = IMAGE) -> ZooSpec:
    import torch

    return ZooSpec(module, (torch.randn(2, *image),), ["input"], ["logits"])


_BUILDERS: dict[str, Callable[[], ZooSpec]] = {
    "mobilenet": _mobilenet,
    "resnet18": _resnet18,
    "resnet18_224": _resnet18_224,
    "vggchain": _vggchain,
    "transformer": _transformer,
    "lstm": _lstm,
    **DYNAMIC_BUILDERS,
}

ZOO_MODELS: tuple[str, ...] = tuple(_BUILDERS)
#: the image classifiers, which :func:`train_zoo_module` can train (not ``resnet18_224``:
#: its 224x224 / 1000-class head does not fit the 64x64 gratings10 task)
IMAGE_MODELS: tuple[str, ...] = ("mobilenet", "resnet18", "vggchain")
# training (steps, learning rate) per image model
_RECIPES: dict[str, tuple[int, float]] = {"mobilenet": (120, 5e-3), "resnet18": (40, 3e-3), "vggchain": (40, 3e-3)}


# -- building and exporting ------------------------------------------------------


def build_zoo_module(name: str, *, seed: int = 0) -> ZooSpec:
    """Build a seeded zoo model in eval mode.

    Args:
        name: one of :data:`ZOO_MODELS`.
        seed: torch seed for the weights and the example input.

    Returns:
        The model and its example inputs.

    Raises:
        InvalidArgument: unknown name.
        ImportError: torch is not installed.
    """
    if name not in _BUILDERS:
        raise InvalidArgument(f"unknown zoo model '{name}' (known: {', '.join(ZOO_MODELS)})")
    import torch

    torch.manual_seed(seed)
    spec = _BUILDERS[name]()
    gen = torch.Generator().manual_seed(seed + 1)
    _calibrate_batchnorm(spec, gen)
    spec.module.eval()
    return spec


def export_zoo_model(
    name: str,
    path: str | os.PathLike[str],
    *,
    seed: int = 0,
    batch_dynamic: bool = True,
    exporter: str = "auto",
    trained: bool = False,
) -> Path:
    """Build a zoo model and export it to an ONNX file.

    Args:
        name: one of :data:`ZOO_MODELS`.
        path: the ``.onnx`` file to write (parent directories are created).
        seed: weight seed; the same seed gives the same weights.
        batch_dynamic: make axis 0 of every input and output a dynamic
            ``"batch"`` dim; otherwise the batch is fixed to 1.
        exporter: ``"legacy"`` (TorchScript ``dynamo=False``: fast, deprecated),
            ``"dynamo"`` (``torch.export``-based, needs onnxscript) or
            ``"auto"`` (legacy if this torch still has it, else dynamo;
            ``if_value``, a scripted module, takes only legacy).
        trained: briefly train an image model on the synthetic gratings10
            task first (:func:`train_zoo_module`, cached); default: the seeded
            random weights (fast, deterministic).

    Returns:
        The path written.

    Raises:
        InvalidArgument: unknown model or exporter name, ``trained`` for a
            model that is not an image classifier, or ``dynamo`` for a
            scripted model.
        ImportError: torch (or onnxscript, for dynamo) is not installed.
    """
    if exporter not in ("auto", "legacy", "dynamo"):
        raise InvalidArgument(f"unknown exporter '{exporter}' (use auto, legacy or dynamo)")
    spec = build_zoo_module(name, seed=seed)
    if trained:
        train_zoo_module(name, spec, seed=seed)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = spec.example if batch_dynamic else spec.batch_of_one()
    if spec.scripted and exporter == "dynamo":
        raise InvalidArgument(f"zoo model '{name}' is a scripted module: export it with the legacy exporter")
    if exporter in ("auto", "legacy"):
        try:
            _export_legacy(spec, example, out, batch_dynamic)
        except Exception:  # noqa: BLE001 - legacy exporter removed/broken in this torch
            if exporter == "legacy" or spec.scripted:
                raise
            _export_dynamo(spec, example, out, batch_dynamic)
    else:
        _export_dynamo(spec, example, out, batch_dynamic)
    if spec.weights_as_constants:
        _initializers_to_constants(out)
    return out


def train_zoo_module(name: str, spec: ZooSpec | None = None, *, seed: int = 0, steps: int | None = None,
                     cache: bool = True) -> dict[str, float]:
    """Train an image model briefly on the synthetic gratings10 task (cached).

    See :mod:`splitgate.planner._zoo_train`: 10 classes of oriented gratings under colour,
    contrast, phase, occlusion and noise; Adam for ``steps`` batches of 32
    fresh samples (resnet18 and vggchain: 40 at lr 3e-3, seconds; mobilenet,
    slower to start: 120 at lr 5e-3, about a minute on a busy 2-core CPU);
    about 97-99 % held-out accuracy. The weights are cached
    under ``$SPLITGATE_CACHE_DIR`` (default ``~/.cache/splitgate``).

    Args:
        name: one of :data:`IMAGE_MODELS`.
        spec: the built module to train in place (default: ``build_zoo_module(name, seed=seed)``).
        seed: data and cache seed.
        steps: training batches (None = the model's recipe).
        cache: use the weight cache.

    Returns:
        ``{"train_acc", "heldout_acc", "cached"}``.

    Raises:
        InvalidArgument: not an image model.
    """
    if name not in IMAGE_MODELS:
        raise InvalidArgument(f"only the image models {list(IMAGE_MODELS)} can be trained, not '{name}'")
    from splitgate.planner._zoo_train import train_module

    spec = spec or build_zoo_module(name, seed=seed)
    default_steps, lr = _RECIPES[name]
    return train_module(spec, name, seed=seed, steps=steps or default_steps, lr=lr, cache=cache)


def calibration_inputs(n: int = 64, seed: int = 0) -> dict[str, Any]:
    """Held-out gratings10 samples for the image models: ``{"input": [n, 3, 64, 64]}`` (numpy) and labels.

    Returns:
        ``{"input": images, "labels": int64 labels}``; pass ``{"input": ...}``
        as :attr:`splitgate.planner.PlanOptions.calibration`.
    """
    from splitgate.planner._zoo_train import calibration_images

    x, y = calibration_images(n, seed=seed)
    return {"input": x, "labels": y}


def _export_legacy(spec: ZooSpec, example: tuple[Any, ...], out: Path, batch_dynamic: bool) -> None:
    import torch

    axes = {n: spec.axes(n, batch_dynamic) for n in [*spec.input_names, *spec.output_names]}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module,
            example,
            os.fspath(out),
            dynamo=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_axes={k: v for k, v in axes.items() if v} or None,
            opset_version=17,
            do_constant_folding=True,
        )


def _export_dynamo(spec: ZooSpec, example: tuple[Any, ...], out: Path, batch_dynamic: bool) -> None:
    import torch

    dims: dict[str, Any] = {"batch": torch.export.Dim("batch")}
    shapes: list[dict[int, Any] | None] = []
    for n in spec.input_names:
        axes = spec.axes(n, batch_dynamic)
        shapes.append({a: dims.setdefault(d, torch.export.Dim(d)) for a, d in axes.items()} or None)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            spec.module,
            example,
            dynamo=True,
            verbose=False,
            input_names=spec.input_names,
            output_names=spec.output_names,
            dynamic_shapes=tuple(shapes) if any(s for s in shapes) else None,
            external_data=False,
        )
    program.save(os.fspath(out), external_data=False)


def _initializers_to_constants(path: Path) -> None:
    """Rewrite an ONNX file so each initializer is a ``Constant`` node at the graph's start.

    Users' models often come like that (older exporters, some converters);
    the IR version and everything else stay as exported.
    """
    import onnx
    from onnx import helper

    model = onnx.load(os.fspath(path))
    graph = model.graph
    names = {t.name for t in graph.initializer}
    constants = [helper.make_node("Constant", [], [t.name], name=f"const_{t.name}", value=t) for t in graph.initializer]
    nodes = [*constants, *graph.node]
    inputs = [i for i in graph.input if i.name not in names]
    del graph.initializer[:], graph.node[:], graph.input[:]
    graph.node.extend(nodes)
    graph.input.extend(inputs)
    onnx.save(model, os.fspath(path))


def export_early_exit(full: str | os.PathLike[str], out: str | os.PathLike[str], *, samples: int = 512,
                      seed: int = 7_000_000) -> Path:
    """A small early-exit model for a trained zoo image classifier, for ``--cascade``.

    The full model's graph up to its middle ReLU, then a global average pool and
    a linear head fitted (ridge least squares) to the full model's logits on
    ``samples`` gratings10 images: cheaper than the full model, confident on the
    easy inputs. The images come from a seed the calibration and held-out sets
    never use.

    Args:
        full: the exported zoo classifier (``input`` -> 10 logits).
        out: where to write the small model; a ``prefix.onnx`` is written beside it.
        samples: images to fit the head on.
        seed: their gratings10 seed.

    Returns:
        ``out`` as a Path.

    Raises:
        InvalidArgument: the model has no ReLU-like activation.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from splitgate.planner._zoo_train import gratings10

    def run(path: Path) -> np.ndarray:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return session.run(None, {"input": x})[0]

    full, out = Path(full), Path(out)
    # the middle activation (ReLU, or ReLU6 exported as Clip): a 4-D feature map to pool
    acts = [n.output[0] for n in onnx.load(str(full)).graph.node if n.op_type in ("Relu", "Clip")]
    if not acts:
        raise InvalidArgument(f"{full}: no Relu or Clip activation to attach an early exit to")
    cut = acts[len(acts) // 2]
    prefix_path = out.with_name("prefix.onnx")
    onnx.utils.extract_model(str(full), str(prefix_path), ["input"], [cut])
    x, _ = gratings10(samples, seed=seed)
    target, features = run(full), run(prefix_path).mean(axis=(2, 3))
    f = np.concatenate([features, np.ones((len(features), 1), np.float32)], axis=1).astype(np.float64)
    w = np.linalg.solve(f.T @ f + 1e-2 * np.eye(f.shape[1]), f.T @ target)
    small = onnx.load(str(prefix_path))
    g = small.graph
    g.node.extend([
        helper.make_node("GlobalAveragePool", [cut], ["exit_gap"]),
        helper.make_node("Flatten", ["exit_gap"], ["exit_flat"]),
        helper.make_node("Gemm", ["exit_flat", "exit_w", "exit_b"], ["logits"]),
    ])
    g.initializer.extend([numpy_helper.from_array(w[:-1].astype(np.float32), "exit_w"),
                          numpy_helper.from_array(w[-1].astype(np.float32), "exit_b")])
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", NUM_CLASSES]))
    onnx.checker.check_model(small)
    onnx.save(small, str(out))
    return out
