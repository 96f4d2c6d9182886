"""Turn onnxruntime failures into typed splitgate errors a person can act on.

Edge and cloud both run partitions in onnxruntime; both report a failed run
through :func:`run_error` and a file onnxruntime cannot load through
:func:`load_error`, so a user sees the same message on either tier: which
model and partition (prefix, suffix or full model), which node, the input
shapes and dtypes, and onnxruntime's own reason on one line -- never the raw
dump with its C++ source paths and ANSI colour codes.

onnxruntime is not imported here: its exceptions are recognised by module.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from splitgate.codec import datatype_of
from splitgate.errors import (
    BundleError,
    InternalError,
    ModelRunError,
    ResourceExhausted,
    SplitgateError,
)

__all__ = ["RunSite", "clean_reason", "is_onnxruntime_error", "load_error", "run_error"]

# Longest reason kept (characters): one or two lines in a terminal.
MAX_REASON_CHARS = 240

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
# "[ONNXRuntimeError] : 1 : FAIL : "
_STATUS_PREFIX = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*(?P<status>\w+)\s*:\s*")
# "Non-zero status code returned while running Reshape node. Name:'Reshape_82' Status Message: "
_NODE = re.compile(
    r"Non-zero status code returned while running (?P<op>[\w.:-]+) node\. Name:'(?P<name>[^']*)'"
    r"(?: Status Message:)?\s*"
)
# A C++ source location: "/onnxruntime_src/.../reshape_helper.h:91 " or "matmul_helper.h:59 "
_SOURCE = re.compile(r"(?:[\w./\\-]*/)?[\w.-]+\.(?:h|hpp|cc|cpp|cxx|c|cu|cuh|inc):\d+\s+")
# ORT_ENFORCE's "<condition> was false. "
_ENFORCE = re.compile(r"^.*? was false\.\s+(?=\S)", re.DOTALL)
# Reshape's "...requested shape. Input shape:{2,8}, requested shape:{2,4}"
_RESHAPE_SHAPES = re.compile(r"\.\s*Input shape:\s*(\{[^}]*\}),\s*requested shape:\s*(\{[^}]*\})")
# "Load model from /path/m.onnx failed:" before a load failure's reason
_LOAD_PREFIX = re.compile(r"^(?:load model from \S+ failed:\s*)+", re.IGNORECASE)
_ALLOCATION = ("failed to allocate memory", "bad_alloc", "out of memory", "cudaerrormemoryallocation")
# ORT exception classes whose failure is the execution provider's, not the input's.
_PROVIDER_FAILURES = {"EPFail", "EngineError", "DeviceReset"}


@dataclass(frozen=True)
class RunSite:
    """Where a run happens: the context an error message names.

    Attributes:
        model: the model name.
        partition: the partition id (``"device"``, ``"cloud"``, ``"cut-3"`` ...).
        part: ``"prefix"``, ``"suffix"`` or ``"full model"``.
        tier: ``"device"`` or ``"cloud"``.
    """

    model: str
    partition: str
    part: str
    tier: str

    @classmethod
    def of(cls, model: str, partition: Any, side: str, tier: str) -> RunSite:
        """The site of ``partition``'s ``side`` (``"prefix"``/``"suffix"``): a
        ``device`` or ``cloud`` partition runs the full model on that side.
        ``partition`` is a :class:`splitgate.planner.Partition` (its ``id`` and ``kind``)."""
        part = side if getattr(partition, "kind", "split") == "split" else "full model"
        return cls(model, partition.id, part, tier)

    def label(self) -> str:
        """``model 'm' partition 'p' (suffix on the cloud)``."""
        return f"model '{self.model}' partition '{self.partition}' ({self.part} on the {self.tier})"


def is_onnxruntime_error(exc: BaseException) -> bool:
    """True for an exception raised by onnxruntime (or a failed allocation)."""
    return type(exc).__module__.startswith("onnxruntime") or isinstance(exc, MemoryError)


def clean_reason(text: str) -> tuple[str | None, str | None, str]:
    """Split onnxruntime's message into (op type, node name, reason).

    The node is the innermost one named (a node inside an If/Loop body names
    its parent first); the reason loses ANSI codes, the ``[ONNXRuntimeError]``
    status prefix, C++ source locations and function signatures and
    ORT_ENFORCE conditions, and is cut to one line of at most
    :data:`MAX_REASON_CHARS` characters.
    """
    text = _ANSI.sub("", text)
    text = _STATUS_PREFIX.sub("", text)
    matches = list(_NODE.finditer(text))
    nodes = [(m["op"], m["name"]) for m in matches]
    if matches:
        text = text[matches[-1].end():]
    text = _RESHAPE_SHAPES.sub(r" (input \1, requested \2)", _strip_source(text))
    reason = " ".join(text.split()).rstrip(".")
    if len(nodes) > 1:
        outer = ", ".join(f"{op} '{name}'" for op, name in nodes[:-1])
        reason = f"{reason} (inside {outer})"
    if len(reason) > MAX_REASON_CHARS:
        reason = reason[: MAX_REASON_CHARS - 3].rstrip() + "..."
    op, name = nodes[-1] if nodes else (None, None)
    return op, name, _lower_first(reason)


def _lower_first(reason: str) -> str:
    """"The input ..." reads on after a colon as "the input ..."; "MatMul ..." stays."""
    return reason[0].lower() + reason[1:] if re.match(r"[A-Z][a-z]+\s", reason) else reason


def _strip_source(text: str) -> str:
    """Drop "file.h:91 Function(args) cond was false." noise before the message."""
    m = _SOURCE.search(text)
    while m is not None:
        rest = text[m.end():]
        rest = _strip_function(rest)
        text = text[: m.start()] + rest
        m = _SOURCE.search(text)
    return _ENFORCE.sub("", text.strip(), count=1)


def _strip_function(text: str) -> str:
    """Drop the C++ function name after a source location: a pretty signature
    ``ns::Cls::Fn(const T&, bool) const`` or a bare ``Compute``."""
    sig = re.match(r"[\w:~<>,*& ]*?\(", text)
    if sig is not None and "::" in sig.group(0):
        depth, i = 0, sig.end() - 1
        while i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
            if depth == 0:
                break
        rest = text[i:]
        return re.sub(r"^\s*const\b", "", rest).lstrip()
    word = re.match(r"[A-Za-z_][\w:~]*\s+", text)
    return text[word.end():] if word is not None else text


def _given(feeds: Mapping[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    listed = []
    for name, value in feeds.items():
        shape = tuple(int(d) for d in getattr(value, "shape", ()))
        try:
            datatype = datatype_of(value.dtype)
        except (SplitgateError, AttributeError, TypeError):
            datatype = str(getattr(value, "dtype", type(value).__name__))
        listed.append((name, shape, datatype))
    return listed


def run_error(exc: BaseException, site: RunSite | None, feeds: Mapping[str, Any]) -> SplitgateError:
    """The typed error for onnxruntime failing to run ``feeds`` at ``site``.

    Args:
        exc: what ``InferenceSession.run`` raised (see :func:`is_onnxruntime_error`).
        site: which model, partition and part ran, where (None if unknown).
        feeds: the inputs the run was given (their shapes and dtypes are named).

    Returns:
        :class:`ResourceExhausted` for a failed allocation, :class:`InternalError`
        for an execution-provider failure (not about the input), else
        :class:`ModelRunError` (INVALID_ARGUMENT): the inputs matched the
        declared ones, so the model cannot process this data.
    """
    op, node, reason = clean_reason(str(exc) or type(exc).__name__)
    where = site.label() if site is not None else "model run"
    if isinstance(exc, MemoryError) or any(m in reason.lower() for m in _ALLOCATION):
        at = f" at node {op} '{node}'" if node else ""
        return ResourceExhausted(f"{where} ran out of memory{at} on inputs {_listed(feeds)}: {reason}")
    if type(exc).__name__ in _PROVIDER_FAILURES:
        return InternalError(f"{where}: onnxruntime's execution provider failed: {reason}")
    return ModelRunError(
        model=site.model if site else None, partition=site.partition if site else None,
        part=site.part if site else None, tier=site.tier if site else None,
        op_type=op, node=node, inputs=_given(feeds), reason=reason,
    )


def _listed(feeds: Mapping[str, Any]) -> str:
    return ", ".join(f"{n}[{','.join(map(str, s))}] {d}" for n, s, d in _given(feeds)) or "(none)"


def load_error(exc: BaseException, site: RunSite | None, path: str) -> SplitgateError:
    """The typed error for onnxruntime failing to load the model file ``path``.

    Returns:
        :class:`ResourceExhausted` for a failed allocation, else
        :class:`BundleError` (FAILED_PRECONDITION): the bundle holds a file this
        onnxruntime cannot run (corrupt, an IR/opset too new, an operator it lacks).
    """
    _, _, reason = clean_reason(str(exc) or type(exc).__name__)
    reason = _lower_first(_LOAD_PREFIX.sub("", reason))  # (the path is named once, below)
    where = site.label() if site is not None else "model file"
    if isinstance(exc, MemoryError) or any(m in reason.lower() for m in _ALLOCATION):
        return ResourceExhausted(f"{where}: out of memory loading {path}: {reason}")
    try:
        import onnxruntime

        version = f"onnxruntime {onnxruntime.__version__}"
    except ImportError:  # pragma: no cover - onnxruntime raised exc, so it is there
        version = "onnxruntime"
    return BundleError(f"{where}: {version} cannot load {path}: {reason}")
