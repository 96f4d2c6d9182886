"""``splitgate demo``: one model, planned, served on a local Ray Serve tier, and
run at device-only, cloud-only and a middle split, with a table of where the
time and bytes went and a check that every split gives the same answer."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

__all__ = ["run_demo"]

WARMUP = 2


def _pick_partitions(bundle) -> list[str | None]:
    """device-only, a middle split, cloud-only, then None: the policy's own pick."""
    cuts = [p.id for p in bundle.partitions.values() if p.kind == "split"]
    chosen: list[str | None] = ["device", "cloud", None]
    if cuts:
        chosen.insert(1, cuts[len(cuts) // 2])
    return chosen


def _sample_inputs(bundle, rng: np.random.Generator) -> dict[str, np.ndarray]:
    from splitgate.codec import numpy_dtype

    feeds = {}
    for spec in bundle.inputs:
        shape = [d if d >= 0 else 1 for d in spec.shape]
        feeds[spec.name] = rng.standard_normal(shape).astype(numpy_dtype(spec.datatype))
    return feeds


def run_demo(model: str = "mobilenet", requests: int = 10, workdir: str | None = None) -> int:
    """Run the demo; return 0 when every partition's outputs match the full model."""
    from splitgate.cloud import CloudConfig, start_local
    from splitgate.planner import build_bundle
    from splitgate.planner.zoo import export_zoo_model
    from splitgate._console import progress_callback

    console = Console()
    started = time.perf_counter()
    tmp = None if workdir else tempfile.TemporaryDirectory(prefix="splitgate-demo-")
    root = Path(workdir or tmp.name)
    root.mkdir(parents=True, exist_ok=True)
    try:
        with console.status(f"exporting zoo model '{model}' to ONNX"):
            model_path = export_zoo_model(model, root / f"{model}.onnx", seed=0)
        console.print(f"[green]✓[/] exported {model_path}")
        with progress_callback(console) as progress:
            bundle = build_bundle(model_path, root / f"{model}.bundle", progress=progress)
        console.print(
            f"[green]✓[/] planned: {len(bundle.partitions)} partitions, digest {bundle.plan_digest[:12]}"
        )
        with console.status("starting local Ray Serve cloud tier (gRPC ingress)"):
            cloud = start_local(CloudConfig(bundles=[str(bundle.root)], grpc_port=0))
        console.print(f"[green]✓[/] cloud tier ready on {cloud.address}")
        try:
            ok = _run_requests(console, bundle, cloud.address, requests)
        finally:
            with console.status("stopping the cloud tier"):
                cloud.stop()
            console.print("[green]✓[/] cloud tier stopped")
    finally:
        if tmp is not None:
            tmp.cleanup()
    console.print(f"demo finished in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


def _run_requests(console: Console, bundle, address: str, requests: int) -> bool:
    import onnxruntime as ort

    from splitgate.edge import Gateway

    rng = np.random.default_rng(0)
    inputs = _sample_inputs(bundle, rng)
    reference = ort.InferenceSession(str(bundle.model_path), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in reference.get_outputs()], reference.run(None, inputs)))

    table = Table(title=f"{bundle.model_name}: median of {requests} requests after {WARMUP} warm-up")
    for col in ("partition", "bytes sent", "device ms", "network ms", "cloud ms", "total ms", "max|Δ|", "match"):
        # Headers may wrap on a narrow terminal; partition ids must not.
        table.add_column(col, justify="left" if col == "partition" else "right", no_wrap=col == "partition")
    all_ok = True
    # cloud_discover: call the replicas' own gRPC ports (Ray direct ingress), the fast path.
    with Gateway([bundle], cloud=address, cloud_discover=True) as gateway:
        for pid in _pick_partitions(bundle):
            traces = []
            for i in range(WARMUP + requests):
                result = gateway.infer(bundle.model_name, inputs, partition=pid)
                if i >= WARMUP:
                    traces.append(result.trace)
            diff = max(float(np.max(np.abs(result.outputs[k] - v))) for k, v in expected.items())
            ok = all(
                np.allclose(result.outputs[k], v, rtol=1e-4, atol=1e-5) for k, v in expected.items()
            )
            all_ok &= ok

            def med(field: str) -> float:
                return statistics.median(getattr(t, field) for t in traces)

            label = pid or f"auto:{result.trace.partition}"
            table.add_row(
                label,
                f"{int(med('bytes_sent')):,}",
                f"{med('device_ms'):.2f}",
                f"{med('network_ms'):.2f}",
                f"{med('cloud_ms'):.2f}",
                f"{med('total_ms'):.2f}",
                f"{diff:.0g}",
                "[green]yes[/]" if ok else "[red]NO[/]",
            )
    console.print(table)
    console.print(
        "[green]all partitions match the full model (rtol 1e-4)[/]" if all_ok else "[red]outputs differ[/]"
    )
    return all_ok
