"""The policies compared: which partition each runs for a request.

* ``device``       -- everything on the device (edge-only).
* ``cloud``        -- cloud-only, honestly: everything in the cloud with the
  best guarded encoding of the inputs (``cloud``, ``cloud@uint8``,
  ``cloud@int8``...; :func:`cloud_only_choice`) for the spec's *nominal*
  conditions, chosen once by the plan's estimate, like ``dads``. The
  summaries name the encoding it ran.
* ``cloud-raw``    -- everything in the cloud with the raw fp32 inputs sent
  ("cloud (raw fp32)"; what ``cloud`` was before encoded inputs).
* ``neurosurgeon`` -- Neurosurgeon-style (Kang et al., ASPLOS'17): scan the
  *chain* cuts (single-tensor ``cut-K``, plus device and cloud) and take the one
  with the lowest predicted latency for the bandwidth measured now.
* ``dads``         -- DADS-style (Hu et al., INFOCOM'19) static min-cut: the
  bundle's min-cut choice for the spec's *nominal* conditions, made once and
  never changed.
* ``adaptive``     -- splitgate: the Gateway's own policy (decision table +
  hysteresis over the monitored link estimate).
* ``mincut``       -- an oracle: the min-cut choice for the *true* current
  conditions (what DADS evaluates per bandwidth); used by the reproduction.
  Over every candidate the bundle holds: with a plan made with ``quantize``,
  the choice is joint over (cut, prefix precision, wire encoding).
* ``joint``        -- ``mincut`` with the bundle's confident-on-device cascade
  in front wherever the decision core says it pays under the true conditions
  (:meth:`splitgate.edge.DecisionCore.cascade_choice`); the same as ``mincut``
  for a bundle without a cascade. Analytic engine only.

``adaptive`` runs the cascade in front too (the Gateway's rule, under its own
estimates); the static policies and ``mincut`` never do (the live engine
names their partition, and a named partition runs without the cascade).
"""

from __future__ import annotations

from splitgate.planner import Conditions, PlanBundle

__all__ = ["POLICIES", "STATIC", "CASCADE", "ANALYTIC_ONLY", "LABELS",
           "chain_partitions", "neurosurgeon_choice", "static_partition",
           "cloud_only_choice"]

POLICIES = ("device", "cloud", "cloud-raw", "neurosurgeon", "dads", "adaptive", "mincut", "joint")
#: Policies that run one partition for the whole run.
STATIC = ("device", "cloud", "cloud-raw", "dads")
#: Policies that run a bundle's cascade in front of their choice where it pays.
CASCADE = ("adaptive", "joint")
#: Policies only the analytic engine runs.
ANALYTIC_ONLY = ("joint",)
#: How tables name a policy.
LABELS = {"device": "edge-only", "cloud": "cloud-only (best encoding)", "cloud-raw": "cloud (raw fp32)",
          "joint": "joint (min-cut + cascade)"}


def cloud_only_choice(bundle: PlanBundle, c: Conditions) -> str:
    """The honest cloud-only baseline under ``c``: of ``cloud`` and its guarded
    encoded twins in the bundle (the planner keeps only those that passed the
    accuracy guard; ``uint8`` and ``zstd`` are lossless), the one the plan's own
    rule picks -- the battery-weighted objective over :meth:`PlanBundle.estimate`
    (:func:`splitgate.planner._decide.pick`; at a full battery, the fastest).

    Raises:
        BundleError: the bundle has no profile.
    """
    from splitgate.planner import best_cloud_only

    return best_cloud_only(bundle, c)


def chain_partitions(bundle: PlanBundle) -> list[str]:
    """The bundle's profiled chain-cut partitions, with ``device`` and ``cloud``."""
    profiled = set((bundle.profile or {}).get("partitions", {}))
    return [pid for pid, p in bundle.partitions.items()
            if pid in profiled and (p.kind != "split" or pid.startswith("cut-"))]


def neurosurgeon_choice(bundle: PlanBundle, c: Conditions) -> str:
    """The chain cut with the lowest predicted latency under ``c``."""
    return min(chain_partitions(bundle), key=lambda pid: bundle.estimate(pid, c).latency_ms)


def static_partition(policy: str, bundle: PlanBundle, nominal: Conditions) -> str | None:
    """The fixed partition of a static policy (None for dynamic ones)."""
    if policy == "device":
        return "device"
    if policy == "cloud":
        return cloud_only_choice(bundle, nominal)
    if policy == "cloud-raw":
        return "cloud"
    if policy == "dads":
        return bundle.choose(nominal)
    return None
