"""The privacy check: raw inputs never leave the device verbatim."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["raw_input_leaks"]

# Shorter byte strings match by chance and mean nothing.
_MIN_MEANINGFUL_BYTES = 16


def _raw_bytes(value: Any) -> bytes:
    """The row-major bytes of an array-like."""
    return np.ascontiguousarray(value).tobytes()


def raw_input_leaks(inputs: Mapping[str, Any], cut: Mapping[str, Any]) -> list[str]:
    """Names of cut tensors that carry a raw input's bytes verbatim.

    The privacy floor says raw inputs never leave the device; a cut right
    after a layout-only op (Identity, Reshape, Flatten, Squeeze) would send
    them anyway. Catches byte-identical copies (also inside a larger tensor);
    a transposed or re-typed copy is not detected (the planner's floor is
    what excludes such cuts).

    Args:
        inputs: the request's inputs (name -> array).
        cut: the cut tensors about to be sent (name -> array).

    Returns:
        The names in ``cut`` that contain some input's bytes, in ``cut``'s order.
    """
    raws = [raw for raw in map(_raw_bytes, inputs.values()) if len(raw) >= _MIN_MEANINGFUL_BYTES]
    leaks = []
    for name, value in cut.items():
        data = _raw_bytes(value)
        if any(len(data) >= len(raw) and raw in data for raw in raws):
            leaks.append(name)
    return leaks
