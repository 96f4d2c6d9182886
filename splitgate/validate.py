"""Check named input arrays against a model's declared tensors.

Used at every boundary (edge Gateway, edge serve, cloud ModelInfer) so a bad
request fails with the same typed error wherever it enters: the message names
the tensor and the expected value.

- :class:`~splitgate.errors.InvalidArgument`: a missing, unknown, empty or
  duplicate name; a wrong datatype, rank or fixed dimension; a value that is
  not an array (ragged lists, strings, objects); NaN/Inf under ``nan_policy="reject"``;
  an unknown or duplicate requested output.
- :class:`~splitgate.errors.ResourceExhausted`: a tensor with more elements
  than :attr:`Limits.max_tensor_elements`, or a request whose tensors add up
  to more than :attr:`Limits.max_request_bytes`.

Everything is checked before anything large is allocated or run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from splitgate.codec import DATATYPES, MAX_DIM, MAX_ELEMENTS, MAX_RANK, datatype_of, nominal_elements
from splitgate.errors import InvalidArgument, ResourceExhausted

__all__ = ["TensorLike", "Limits", "NAN_POLICIES", "validate_inputs", "validate_outputs", "check_deadline_ms"]

#: ``allow``: NaN/Inf pass through to the model; ``reject``: INVALID_ARGUMENT naming the tensor.
NAN_POLICIES = ("allow", "reject")


class TensorLike(Protocol):
    """Anything with a name, an OIP datatype and a shape (-1 = any size)."""

    name: str
    datatype: str
    shape: Sequence[int]


@dataclass(frozen=True)
class Limits:
    """What a boundary accepts beyond the model's own tensor specs.

    Attributes:
        max_tensor_elements: most elements one tensor may have (zero dims ignored).
        max_request_bytes: most bytes all input tensors of one request may add up to.
        nan_policy: ``"allow"`` or ``"reject"`` (NaN and +-Inf in floating inputs).
    """

    max_tensor_elements: int = MAX_ELEMENTS
    max_request_bytes: int = 64 * 1024 * 1024
    nan_policy: str = "allow"

    def __post_init__(self) -> None:
        if self.nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, got {self.nan_policy!r}")
        if self.max_tensor_elements <= 0 or self.max_request_bytes <= 0:
            raise ValueError("limits must be positive")


DEFAULT_LIMITS = Limits()


def _as_array(name: str, value: Any, where: str) -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"{where}: input '{name}' is not a rectangular array: {exc}") from None
    if array.dtype.kind in "OUSVM" or array.dtype.hasobject:
        raise InvalidArgument(
            f"{where}: input '{name}' has numpy dtype {array.dtype}, which has no tensor datatype"
        )
    return array


def _check_one(name: str, array: np.ndarray, spec: TensorLike, where: str) -> None:
    try:
        got = datatype_of(array.dtype)
    except InvalidArgument:
        got = str(array.dtype)
    if got != spec.datatype:
        raise InvalidArgument(
            f"{where}: input '{name}' has datatype {got}, expected {spec.datatype}"
        )
    want = list(spec.shape)
    if array.ndim != len(want):
        raise InvalidArgument(
            f"{where}: input '{name}' has shape {list(array.shape)} (rank {array.ndim}), "
            f"expected rank {len(want)} shape {want}"
        )
    for axis, (have, need) in enumerate(zip(array.shape, want)):
        if need >= 0 and have != need:
            raise InvalidArgument(
                f"{where}: input '{name}' has shape {list(array.shape)}, expected {want} "
                f"(dimension {axis} must be {need})"
            )


def _check_size(name: str, array: np.ndarray, limits: Limits, where: str) -> None:
    dims = array.shape
    if len(dims) > MAX_RANK:
        raise InvalidArgument(f"{where}: input '{name}' has rank {len(dims)}, above the limit of {MAX_RANK}")
    if any(d > MAX_DIM for d in dims):
        raise InvalidArgument(f"{where}: input '{name}' has a dimension above {MAX_DIM}: {list(dims)}")
    if nominal_elements(dims) > limits.max_tensor_elements:
        raise ResourceExhausted(
            f"{where}: input '{name}' has {nominal_elements(dims)} elements, more than the limit of "
            f"{limits.max_tensor_elements}"
        )


def _check_finite(name: str, array: np.ndarray, where: str) -> None:
    if array.dtype.kind != "f" or array.size == 0:
        return
    finite = np.isfinite(array)
    if not finite.all():
        index = np.unravel_index(int(np.argmin(finite)), array.shape)
        value = array[index]
        raise InvalidArgument(
            f"{where}: input '{name}' has {value} at index {list(map(int, index))}; "
            "expected finite values (nan_policy='reject')"
        )


def validate_inputs(
    arrays: Mapping[str, Any],
    specs: Sequence[TensorLike],
    *,
    where: str,
    limits: Limits | None = None,
) -> dict[str, np.ndarray]:
    """Return ``arrays`` as numpy arrays after checking names, dtypes, shapes and limits.

    Parameters:
        arrays: input name -> array-like.
        specs: the expected inputs, in the model's order.
        where: a prefix for error messages, e.g. ``"model 'resnet18' partition 'cut-3'"``.
        limits: size limits and NaN policy (default :data:`DEFAULT_LIMITS`: NaN allowed).

    Returns:
        A dict in the order of ``specs``.

    Raises:
        InvalidArgument: a missing or unexpected name, a non-array value, a wrong
            datatype, rank or fixed dimension, a non-finite value under
            ``nan_policy="reject"``. The message names the tensor and what was expected.
        ResourceExhausted: a tensor or the request over ``limits``.
    """
    limits = limits or DEFAULT_LIMITS
    if not isinstance(arrays, Mapping):
        raise InvalidArgument(f"{where}: inputs must be a mapping of name -> array, got {type(arrays).__name__}")
    expected = [s.name for s in specs]
    bad_keys = [n for n in arrays if not isinstance(n, str)]
    if bad_keys:
        raise InvalidArgument(f"{where}: input names must be strings, got {bad_keys[0]!r}; expected inputs {expected}")
    unknown = [n for n in arrays if n not in expected]
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown input {unknown[0]!r}; expected inputs {expected}"
        )
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise InvalidArgument(f"{where}: missing input {missing[0]!r}; expected inputs {expected}")
    out: dict[str, np.ndarray] = {}
    total = 0
    for spec in specs:
        array = _as_array(spec.name, arrays[spec.name], where)
        if spec.datatype not in DATATYPES:
            raise InvalidArgument(f"{where}: input '{spec.name}' has unsupported datatype {spec.datatype}")
        _check_one(spec.name, array, spec, where)
        _check_size(spec.name, array, limits, where)
        total += array.nbytes
        if total > limits.max_request_bytes:
            raise ResourceExhausted(
                f"{where}: inputs up to '{spec.name}' add up to {total} bytes, more than the limit of "
                f"{limits.max_request_bytes} bytes"
            )
        if limits.nan_policy == "reject":
            _check_finite(spec.name, array, where)
        out[spec.name] = array
    return out


def validate_outputs(requested: Sequence[str], available: Sequence[str], *, where: str) -> list[str]:
    """Check requested output names; return them (all outputs when none are requested).

    Raises:
        InvalidArgument: an empty, unknown or duplicate requested output.
    """
    seen: set[str] = set()
    for name in requested:
        if name not in available:
            raise InvalidArgument(f"{where}: unknown requested output {name!r}; outputs are {list(available)}")
        if name in seen:
            raise InvalidArgument(f"{where}: output {name!r} is requested twice")
        seen.add(name)
    return list(requested) or list(available)


def check_deadline_ms(value: Any, *, name: str = "deadline_ms") -> float | None:
    """A deadline in ms as a positive finite float (None passes through).

    Raises:
        InvalidArgument: not a number (bools included), NaN, infinite, or <= 0.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidArgument(f"{name} must be a number of milliseconds, got {value!r}")
    ms = float(value)
    if not math.isfinite(ms) or ms <= 0:
        raise InvalidArgument(f"{name} must be a positive finite number of milliseconds, got {value!r}")
    return ms
