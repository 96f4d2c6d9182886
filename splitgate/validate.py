"""Check named input arrays against a model's declared tensors.

Used at every boundary (edge Gateway, edge serve, cloud ModelInfer) so a bad
request fails with the same :class:`~splitgate.errors.InvalidArgument` message
wherever it enters: the message names the tensor and the expected value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from splitgate.codec import DATATYPES, datatype_of
from splitgate.errors import InvalidArgument

__all__ = ["TensorLike", "validate_inputs"]


class TensorLike(Protocol):
    """Anything with a name, an OIP datatype and a shape (-1 = any size)."""

    name: str
    datatype: str
    shape: Sequence[int]


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


def validate_inputs(
    arrays: Mapping[str, Any], specs: Sequence[TensorLike], *, where: str
) -> dict[str, np.ndarray]:
    """Return ``arrays`` as numpy arrays after checking names, dtypes and shapes.

    Parameters:
        arrays: input name -> array-like.
        specs: the expected inputs, in the model's order.
        where: a prefix for error messages, e.g. ``"model 'resnet18' partition 'cut-3'"``.

    Returns:
        A dict in the order of ``specs``.

    Raises:
        InvalidArgument: a missing or unexpected name, a wrong datatype, rank or
            fixed dimension. The message names the tensor and what was expected.
    """
    expected = [s.name for s in specs]
    unknown = [n for n in arrays if n not in expected]
    if unknown:
        raise InvalidArgument(
            f"{where}: unknown input {unknown[0]!r}; expected inputs {expected}"
        )
    missing = [n for n in expected if n not in arrays]
    if missing:
        raise InvalidArgument(f"{where}: missing input {missing[0]!r}; expected inputs {expected}")
    out: dict[str, np.ndarray] = {}
    for spec in specs:
        array = np.asarray(arrays[spec.name])
        if spec.datatype not in DATATYPES:
            raise InvalidArgument(f"{where}: input '{spec.name}' has unsupported datatype {spec.datatype}")
        _check_one(spec.name, array, spec, where)
        out[spec.name] = array
    return out
