"""Drift: reference statistics recorded at plan time, scored at run time by a real Gateway.

The subject is the trained resnet18 of the zoo (gratings10, cached weights)
planned with 256 real calibration images; requests are other gratings10
images (in distribution), the same images brighter, and the same images with
added noise.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
from splitgate.edge import Gateway
from splitgate.edge._drift import DriftMonitor, psi
from splitgate.planner import build_bundle, load_bundle
from splitgate.planner._reference import (
    REFERENCE_FILE,
    ReferenceStats,
    Signal,
    build_reference,
    subsample,
)

from splitgate.errors import BundleError, NotFound
from tests._models import save, two_io_model

MODEL = "resnet18"


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from splitgate.planner.zoo import export_zoo_model

    return export_zoo_model(MODEL, tmp_path_factory.mktemp("drift") / f"{MODEL}.onnx", trained=True)


@pytest.fixture(scope="module")
def bundle(classifier: Path):
    """The trained classifier planned (partitions only: drift needs no profile) with 256 calibration images."""
    from splitgate.planner.zoo import calibration_inputs

    cal = calibration_inputs(256)
    return build_bundle(classifier, classifier.parent / "planned", profile=False, calibration={"input": cal["input"]})


def images(n: int, seed: int) -> np.ndarray:
    from splitgate.planner._zoo_train import gratings10

    return gratings10(n, seed=seed)[0]


def run(gw: Gateway, xs: np.ndarray) -> None:
    for i in range(len(xs)):
        gw.infer(MODEL, {"input": xs[i:i + 1]})


# -- plan time ------------------------------------------------------------------------


def test_reference_is_plan_data(bundle) -> None:
    ref = bundle.reference
    assert bundle.manifest["reference"] == REFERENCE_FILE and REFERENCE_FILE in bundle.manifest["files"]
    assert ref.requests == 256 and ref.source == "arrays"
    assert set(ref.signals) == {"input:input", "input_mean:input", "input_std:input",
                                "confidence:logits", "class:logits"}
    for sig in ref.signals.values():
        assert abs(sum(sig.freq) - 1.0) < 1e-3, sig.name
    assert ref.signals["confidence:logits"].softmax  # the zoo classifiers answer logits
    assert sum(ref.summary["logits"]["histogram"]) == 256
    # the file is in the digest: editing it is refused like any other file
    doc = json.loads((bundle.root / REFERENCE_FILE).read_text())
    doc["source"] = "edited"
    (bundle.root / REFERENCE_FILE).write_text(json.dumps(doc))
    try:
        with pytest.raises(BundleError, match="reference.json: sha256 mismatch"):
            load_bundle(bundle.root)
    finally:
        (bundle.root / REFERENCE_FILE).write_text(json.dumps(ref.to_dict(), indent=1) + "\n")
    load_bundle(bundle.root)


def test_profiled_plan_with_samples_records_reference_generated_inputs_do_not(tmp_path: Path) -> None:
    model = save(two_io_model(), tmp_path / "two_io.onnx")
    from splitgate.planner import ModelGraph
    from splitgate.planner._graph import dummy_inputs

    g = ModelGraph.load(model)
    rows = [dummy_inputs(g.inputs, seed=s) for s in range(8)]
    samples = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    np.savez(tmp_path / "samples.npz", **samples)
    fast = {"repeats": 2, "warmup": 0, "encodings": ("raw",)}
    with_samples = build_bundle(model, tmp_path / "a", samples=str(tmp_path / "samples.npz"), **fast)
    assert with_samples.reference is not None and with_samples.reference.source == "--sample"
    generated = build_bundle(model, tmp_path / "b", **fast)
    assert generated.reference is None and "reference" not in generated.manifest
    with Gateway([generated]) as gw:  # no reference: drift is unavailable, requests are unaffected
        gw.infer(generated.model_name, generated.sample_inputs())
        assert gw.drift(generated.model_name) is None
        with pytest.raises(NotFound):
            gw.drift("nope")


def test_reference_round_trip_and_malformed() -> None:
    rng = np.random.default_rng(0)
    reqs = [{"x": rng.normal(size=(1, 64)).astype(np.float32)} for _ in range(100)]
    outs = [{"p": rng.dirichlet(np.ones(4), size=1)} for _ in range(100)]
    ref = build_reference(reqs, outs, "arrays")
    assert ref is not None and not ref.signals["confidence:p"].softmax  # rows already sum to 1
    again = ReferenceStats.from_dict(json.loads(json.dumps(ref.to_dict())))
    assert again == ref
    counts = ref.request_counts(reqs[0], outs[0])
    assert counts["input:x"].sum() == 64 and counts["input_mean:x"].sum() == 1 and counts["class:p"].sum() == 1
    ins, outs0 = ref.sample(reqs[0], outs[0])  # what the worker bins: the same counts
    assert all((ref.request_counts(ins, outs0)[k] == v).all() for k, v in counts.items())
    bad = ref.to_dict()
    bad["signals"]["input:x"]["edges"] = [0.0]
    with pytest.raises(BundleError, match="malformed drift reference"):
        ReferenceStats.from_dict(bad)
    with pytest.raises(BundleError, match="schema"):
        ReferenceStats.from_dict({**ref.to_dict(), "schema": 99})


# -- the score --------------------------------------------------------------------------


def test_psi_reads_as_expected() -> None:
    assert psi([0.25] * 4, [250, 250, 250, 250]) < 1e-3
    assert psi([0.25] * 4, [0, 0, 0, 1000]) > 2.0
    moderate = psi([0.25] * 4, [350, 250, 250, 150])
    assert 0.05 < moderate < 0.25
    assert psi([0.5, 0.5], [0, 0]) == 0.0


def test_monitor_window_slides() -> None:
    sig = Signal("input:x", "elements", "x", (0.5, 0.5), (0.0,))
    ref = ReferenceStats({"input:x": sig}, "arrays", 10, {})
    mon = DriftMonitor(ref, window=20, min_requests=10, threshold=0.25)
    for _ in range(9):
        mon.observe({"x": np.array([-1.0, 1.0])}, {})
    assert mon.report().score is None  # fewer than min_requests
    mon.observe({"x": np.array([-1.0, 1.0])}, {})
    assert mon.report().score < 0.01
    for _ in range(20):  # the window fills with shifted requests only
        mon.observe({"x": np.array([1.0, 2.0])}, {})
    r = mon.report()
    assert r.requests == 20 and r.drifted and r.signal == "input:x"
    with pytest.raises(ValueError):
        DriftMonitor(ref, window=5, min_requests=6)


def test_subsample_is_cheap_and_idempotent() -> None:
    x = np.arange(3 * 64 * 64, dtype=np.float32).reshape(1, 3, 64, 64)
    s = subsample(x)
    assert 200 < s.size <= 256 and s.dtype == np.float64
    assert np.array_equal(subsample(s), s)
    assert len({int(v) // 4096 for v in s}) == 3  # every channel is visited


# -- a real Gateway -------------------------------------------------------------------------


def test_in_distribution_stays_low_shifted_crosses(bundle) -> None:
    from prometheus_client import generate_latest

    fired = []
    lock = threading.Lock()

    def alarm(report) -> None:
        with lock:
            fired.append(report)

    with Gateway([bundle], drift_window=256, drift_min_requests=128) as gw:
        gw.on_drift(alarm)
        run(gw, images(256, seed=11))
        calm = gw.drift(MODEL)
        assert calm.requests == 256 and calm.score is not None
        assert calm.score < 0.15, calm  # well under the 0.25 threshold (measured: ~0.05-0.12)
        assert not calm.drifted and not fired
        assert calm.version == bundle.plan_digest[:12]
        text = generate_latest(gw.metrics.registry).decode()
        assert f'splitgate_drift_score{{model="{MODEL}",signal="max"}}' in text
        assert f'splitgate_drift_score{{model="{MODEL}",signal="input_mean:input"}}' in text

        run(gw, images(256, seed=12) + 0.5)  # brighter (+0.15 on the 0-1 pixel scale)
        bright = gw.drift(MODEL)
        assert bright.drifted and bright.signal == "input_mean:input", bright
        with lock:
            assert len(fired) == 1 and fired[0].model == MODEL and fired[0].score >= 0.25
        text = generate_latest(gw.metrics.registry).decode()
        assert f'splitgate_drift_alerts_total{{model="{MODEL}"}} 1.0' in text

        run(gw, images(256, seed=13))  # back in distribution: the callback re-arms
        assert gw.drift(MODEL).score < 0.2
        rng = np.random.default_rng(3)
        run(gw, images(256, seed=14) + rng.normal(0, 0.5, (256, 1, 3, 64, 64)).astype(np.float32)[:, 0])
        noisy = gw.drift(MODEL)
        assert noisy.drifted and noisy.signal == "input_std:input", noisy
        with lock:
            assert len(fired) == 2 and fired[1].signal == "input_std:input"


def test_edge_serve_metrics_endpoint_exports_the_drift_gauges(bundle) -> None:
    """Requests through `edge serve`'s OIP server; the gauges on its Prometheus HTTP endpoint."""
    import urllib.request

    from splitgate.edge import CloudClient
    from splitgate.edge._serve import serve_edge

    with Gateway([bundle], drift_window=16, drift_min_requests=16) as gw:
        server, port, metrics = serve_edge(gw, port=0, metrics_port=0)
        try:
            with CloudClient(f"127.0.0.1:{port}") as client:
                xs = images(16, seed=21) + 0.5
                for i in range(len(xs)):
                    client.infer(MODEL, {"input": xs[i:i + 1]})
            gw.drift(MODEL)  # (scores now, not at the next 8th request)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics.server_port}/metrics", timeout=10) as r:
                text = r.read().decode()
        finally:
            server.stop(0)
            metrics.shutdown()
    line = next(ln for ln in text.splitlines() if ln.startswith(f'splitgate_drift_score{{model="{MODEL}",signal="max"}}'))
    assert float(line.split()[-1]) >= 0.25
    assert f'splitgate_drift_window_requests{{model="{MODEL}"}} 16.0' in text
