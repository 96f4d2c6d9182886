"""Fuzz ModelInfer over real gRPC with malformed requests; count statuses.

Hypothesis generates requests around one real cut partition of the seeded
mobilenet zoo model: right and wrong model/partition/digest, tensor names
(unknown, empty, duplicate), datatypes (known, unknown), shapes (negative,
huge, rank 70, products that overflow int64), raw contents of the right and
wrong length (random bytes, NaN/Inf), typed contents, requested outputs, and
whole messages of random bytes. Every case must get a documented status:
no UNKNOWN, no INTERNAL, no hang (per-call deadline), and the server must
still answer a valid request correctly at the end.

    .venv/bin/python benchmarks/bench_fuzz.py --cases 10000 --ray-cases 2000 --out fuzz.json

Targets: the plain grpcio baseline server (``splitgate.cloud.baseline``, hosting the
same ``SuffixService`` as Ray) and, with ``--ray-cases``, the real Ray Serve
tier (proxy and a replica's direct-ingress port). Prints JSON.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from splitgate import codec  # noqa: E402
from splitgate.protocol import inference_pb2 as pb  # noqa: E402
from splitgate.protocol import inference_pb2_grpc as pb_grpc  # noqa: E402
from splitgate import contract  # noqa: E402
from _common import emit_json  # noqa: E402 - benchmarks/ is on sys.path when run as a script

METHOD = "/inference.GRPCInferenceService/ModelInfer"
#: Statuses a malformed request may get (UNKNOWN / INTERNAL would be a bug).
DOCUMENTED = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}


@dataclass(frozen=True)
class Target:
    """The real things a request can get right: model, partition, its cut tensor, digest, outputs."""

    model: str
    partition: str
    tensor: str
    datatype: str
    shape: tuple[int, ...]
    digest: str
    outputs: tuple[str, ...]

    @classmethod
    def of(cls, bundle) -> Target:
        part = next(p for p in bundle.partitions.values() if p.kind == "split")
        (spec,) = part.cut_tensors
        shape = tuple(d if d >= 0 else 1 for d in spec.shape)
        return cls(bundle.model_name, part.id, spec.name, spec.datatype, shape, bundle.plan_digest,
                   tuple(o.name for o in bundle.outputs))

    def valid(self, seed: int = 0) -> tuple[pb.ModelInferRequest, np.ndarray]:
        x = np.random.default_rng(seed).standard_normal(self.shape).astype(np.float32)
        request = pb.ModelInferRequest(model_name=self.model)
        codec.set_params(request.parameters, {contract.PARTITION: self.partition, contract.PLAN_DIGEST: self.digest})
        codec.add_inputs(request, {self.tensor: x})
        return request, x


def _dims(target: Target) -> st.SearchStrategy[list[int]]:
    small = st.integers(-3, 9)
    huge = st.sampled_from([2**31 - 1, 2**31, 2**40, 2**62, 2**63 - 1, 10**6])
    return st.one_of(
        st.just(list(target.shape)),
        st.just([0, *target.shape[1:]]),
        st.just([3, *target.shape[1:]]),
        st.lists(small, max_size=6),
        st.lists(st.one_of(small, huge), min_size=1, max_size=6),
        st.just([0, 2**62, 2**62]),
        st.just([2**32, 2**32]),  # product overflows int64
        st.lists(st.just(1), min_size=65, max_size=70),
        st.just([target.shape[0], -1, *target.shape[2:]]),
    )


def _payload(draw, datatype: str, dims: list[int]) -> bytes | None:
    itemsize = codec.DATATYPES[datatype].itemsize if datatype in codec.DATATYPES else 4
    n = math.prod(dims) if dims and all(0 <= d <= 1 << 20 for d in dims) else None
    choice = draw(st.sampled_from(["exact", "exact", "short", "long", "random", "empty", "nan"]))
    if n is None or n * itemsize > 1 << 22:
        return draw(st.binary(max_size=64))
    size = n * itemsize
    if choice == "exact":
        return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)
    if choice == "nan" and datatype in ("FP16", "FP32", "FP64"):
        arr = np.zeros(n, dtype=codec.DATATYPES[datatype])
        if n:
            arr[draw(st.integers(0, n - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf]))
        return arr.tobytes()
    if choice == "short":
        return b"\0" * max(size - draw(st.integers(1, 8)), 0)
    if choice == "long":
        return b"\0" * (size + draw(st.integers(1, 8)))
    if choice == "empty":
        return b""
    return draw(st.binary(max_size=256))


@st.composite
def cases(draw, target: Target):
    """One fuzz case: ("bytes", raw message) or ("proto", ModelInferRequest)."""
    if draw(st.integers(0, 9)) == 0:
        return "bytes", draw(st.binary(max_size=512))
    request = pb.ModelInferRequest(
        model_name=draw(st.sampled_from([target.model] * 27 + ["", "nope", "x" * 300])),
        id=draw(st.sampled_from(["", "r1"])),
    )
    params: dict = {}
    part = draw(st.sampled_from([target.partition] * 20 + ["cloud", "device", "cut-99999", "", "../../etc"]))
    if draw(st.booleans()) or part != target.partition:
        params[contract.PARTITION] = part
    digest = draw(st.sampled_from([None] * 4 + [target.digest] * 10 + ["0" * 64, "", "zz"]))
    if digest is not None:
        params[contract.PLAN_DIGEST] = digest
    if draw(st.integers(0, 19)) == 0:
        params[contract.PARTITION] = draw(st.sampled_from([7, True, 1.5]))
    codec.set_params(request.parameters, params)
    raw_entries: list[bytes] = []
    typed = draw(st.integers(0, 7)) == 0
    for _ in range(draw(st.integers(0, 3)) if draw(st.integers(0, 3)) == 0 else 1):
        name = draw(st.sampled_from([target.tensor] * 6 + ["", "nope", target.tensor + "x"]))
        datatype = draw(st.sampled_from([target.datatype] * 6 + list(codec.DATATYPES) + ["BYTES", "FP8", "", "fp32"]))
        dims = draw(_dims(target))
        tensor = request.inputs.add(name=name, datatype=datatype, shape=dims)
        if typed:
            count = draw(st.integers(0, 16))
            field = draw(st.sampled_from(["fp32_contents", "int_contents", "uint_contents", "bool_contents"]))
            values = {
                "fp32_contents": st.floats(width=32, allow_nan=True),
                "int_contents": st.integers(-(2**31), 2**31 - 1),
                "uint_contents": st.integers(0, 2**32 - 1),
                "bool_contents": st.booleans(),
            }[field]
            getattr(tensor.contents, field).extend(draw(st.lists(values, min_size=count, max_size=count)))
        else:
            raw_entries.append(_payload(draw, datatype, dims) or b"")
    if raw_entries and draw(st.integers(0, 9)) == 0:
        raw_entries = raw_entries[:-1] or [b"", b""]  # count mismatch
    request.raw_input_contents.extend(raw_entries)
    for name in draw(st.lists(st.sampled_from([*target.outputs, "nope", ""]), max_size=3)):
        request.outputs.add(name=name)
    return "proto", request


def send(channel: grpc.Channel, case: tuple[str, object], timeout_s: float = 30.0) -> str:
    """Send one case; return the status name ("OK", "INVALID_ARGUMENT", ..., "HANG" on deadline)."""
    kind, payload = case
    call = channel.unary_unary(METHOD, request_serializer=None, response_deserializer=None)
    data = payload if kind == "bytes" else payload.SerializeToString()  # type: ignore[union-attr]
    try:
        call(data, timeout=timeout_s)
        return "OK"
    except grpc.RpcError as exc:
        code = exc.code()
        return "HANG" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name


def fuzz(address: str, target: Target, n: int, *, seed: int = 0, examples: list | None = None) -> Counter:
    """Run ``n`` hypothesis cases against ``address``; return counts by status.

    ``examples`` (optional) collects (status, case summary) of undocumented statuses.
    """
    counts: Counter = Counter()
    options = [("grpc.max_send_message_length", 64 << 20), ("grpc.max_receive_message_length", 64 << 20)]
    with grpc.insecure_channel(address, options=options) as channel:

        @settings(max_examples=n, database=None, deadline=None, derandomize=False, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(cases(target))
        def one(case) -> None:
            status = send(channel, case)
            counts[status] += 1
            if status not in DOCUMENTED and examples is not None and len(examples) < 20:
                examples.append((status, str(case[1])[:400]))

        import random

        random.seed(seed)
        one()
    return counts


def still_correct(address: str, target: Target, bundle) -> bool:
    """After the storm: a valid request still gets the reference answer."""
    import onnxruntime as ort

    request, x = target.valid(seed=123)
    with grpc.insecure_channel(address) as channel:
        reply = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=60)
    got = codec.read_outputs(reply)
    part = bundle.partition(target.partition)
    session = ort.InferenceSession(str(part.suffix_path), providers=["CPUExecutionProvider"])
    want = session.run(None, {target.tensor: x})
    return all(np.allclose(got[o.name], w, rtol=1e-4, atol=1e-5) for o, w in zip(session.get_outputs(), want))


def _summary(counts: Counter, seconds: float) -> dict:
    total = sum(counts.values())
    return {
        "cases": total,
        "by_status": dict(sorted(counts.items())),
        "unknown": counts.get("UNKNOWN", 0),
        "internal": counts.get("INTERNAL", 0),
        "hangs": counts.get("HANG", 0),
        "undocumented": sum(v for k, v in counts.items() if k not in DOCUMENTED),
        "seconds": round(seconds, 1),
        "cases_per_s": round(total / seconds, 1) if seconds else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", type=int, default=10_000, help="cases against the plain grpcio server")
    parser.add_argument("--ray-cases", type=int, default=2_000, help="cases against each Ray ingress (0 = skip Ray)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)

    from splitgate.cloud.baseline import start_baseline
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model

    work = Path(tempfile.mkdtemp(prefix="splitgate-fuzz-"))
    bundle = build_bundle(export_zoo_model("mobilenet", work / "mobilenet.onnx", seed=0),
                          work / "mobilenet.bundle", profile=False)
    target = Target.of(bundle)
    result: dict = {"model": target.model, "partition": target.partition, "targets": {}}
    examples: list = []
    with start_baseline([str(bundle.root)]) as server:
        t0 = time.perf_counter()
        counts = fuzz(server.address, target, args.cases, examples=examples)
        result["targets"]["baseline"] = _summary(counts, time.perf_counter() - t0)
        result["targets"]["baseline"]["valid_after"] = still_correct(server.address, target, bundle)
    if args.ray_cases:
        from splitgate.cloud import CloudConfig, start_local

        with start_local(CloudConfig(bundles=[str(bundle.root)], grpc_port=0)) as tier:
            for name, address in (("ray_proxy", tier.address), ("ray_direct", tier.endpoints[0])):
                t0 = time.perf_counter()
                counts = fuzz(address, target, args.ray_cases, seed=1, examples=examples)
                result["targets"][name] = _summary(counts, time.perf_counter() - t0)
                result["targets"][name]["valid_after"] = still_correct(address, target, bundle)
    result["examples_undocumented"] = examples
    result["total_cases"] = sum(t["cases"] for t in result["targets"].values())
    result["ok"] = all(t["undocumented"] == 0 and t["valid_after"] for t in result["targets"].values())
    emit_json(result, args.out, indent=1)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
