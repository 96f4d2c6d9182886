"""The cost model: latency, energy and the battery-weighted objective of a partition.

Pure functions over a handful of numbers (device ms, cloud ms, bytes up and
down) and the run-time :class:`Conditions`. Nothing here measures anything;
:mod:`splitgate.planner._profile` supplies the numbers.

* Latency follows Neurosurgeon (Kang et al., ASPLOS'17) and DADS (Hu et al.,
  INFOCOM'19): ``device + uplink(bytes, bandwidth) + RTT + cloud + downlink``.
* Radio energy follows Huang et al., "A close examination of performance and
  power characteristics of 4G LTE networks" (MobiSys'12): while transferring at
  ``tu`` Mbps up and ``td`` Mbps down the radio draws ``P = αu·tu + αd·td + β``
  mW. The per-technology parameters are the paper's (also in DESIGN.md).
* Energy = device compute power × device time + radio power × transfer time +
  idle power × waiting (RTT and cloud compute), in mJ (mW × ms / 1000).
* The objective blends latency and energy, each normalised by the device-only
  partition's value; the battery level moves the weight from latency (full
  battery) to energy (empty battery): ``w_energy = 1 - battery_pct / 100``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from splitgate.errors import InvalidArgument

__all__ = [
    "Conditions",
    "Estimate",
    "RadioPower",
    "RADIOS",
    "EnergyModel",
    "Constraints",
    "transfer_ms",
    "estimate",
    "energy_weight",
    "objective",
    "LinearCosts",
    "linear_costs",
    "log_grid",
]


@dataclass(frozen=True)
class Conditions:
    """What the edge measures at run time.

    Attributes:
        uplink_mbps: device -> cloud bandwidth.
        downlink_mbps: cloud -> device bandwidth; None means the same as uplink.
        rtt_ms: round-trip time to the cloud tier.
        battery_pct: 0-100; lower shifts the objective from latency to energy.
        cloud_load: queue-depth-like multiplier: cloud time is ``cloud_ms * (1 + cloud_load)``.
        privacy: privacy floor: raw inputs never leave the device, so never
            choose ``"cloud"`` (nor any partition sending a graph input).
        device_factor: the device's speed as measured at run time against the
            profile: device compute times are ``device_ms * device_factor``
            (1 = as profiled; 3 = three times slower, e.g. thermal throttling).
    """

    uplink_mbps: float
    downlink_mbps: float | None = None
    rtt_ms: float = 20.0
    battery_pct: float = 100.0
    cloud_load: float = 0.0
    privacy: bool = False
    device_factor: float = 1.0

    @property
    def down_mbps(self) -> float:
        """The downlink bandwidth, defaulting to the uplink's."""
        return self.uplink_mbps if self.downlink_mbps is None else self.downlink_mbps


@dataclass(frozen=True)
class Estimate:
    """Predicted cost of one request at one partition under given conditions.

    Attributes:
        latency_ms: device_ms + transfer_ms + cloud_ms.
        energy_mj: device energy spent on the request (compute, radio, idle wait).
        device_ms: prefix compute on the device.
        cloud_ms: suffix compute in the cloud, load included.
        transfer_ms: uplink + RTT + downlink (0 for device-only).
    """

    latency_ms: float
    energy_mj: float
    device_ms: float
    cloud_ms: float
    transfer_ms: float


@dataclass(frozen=True)
class RadioPower:
    """Huang et al. (MobiSys'12) radio power model ``P = αu·tu + αd·td + β`` (mW, Mbps).

    Attributes:
        alpha_up: mW per Mbps of uplink throughput.
        alpha_down: mW per Mbps of downlink throughput.
        beta: base power while the radio is active, mW.
        tail_s: time the radio stays in its high-power state after a transfer.
        tail_mw: power during that tail.
    """

    alpha_up: float
    alpha_down: float
    beta: float
    tail_s: float = 0.0
    tail_mw: float = 0.0

    def power_mw(self, up_mbps: float, down_mbps: float) -> float:
        """Radio power while moving data at the given rates."""
        return self.alpha_up * up_mbps + self.alpha_down * down_mbps + self.beta


#: Huang et al. (MobiSys'12), Table 4: LTE, 3G and WiFi; LTE tail 11.576 s at 1060 mW.
#: The paper has no 5G; pass your own :class:`RadioPower` for it.
RADIOS: dict[str, RadioPower] = {
    "lte": RadioPower(438.39, 51.97, 1288.04, tail_s=11.576, tail_mw=1060.0),
    "3g": RadioPower(868.98, 122.12, 817.88),
    "wifi": RadioPower(283.17, 137.01, 132.86),
}

# "auto" radio: WiFi at or above this uplink, LTE below (DADS's 4G uplink is 5.85, WiFi 18.88 Mbps).
_AUTO_WIFI_MBPS = 10.0


@dataclass(frozen=True)
class EnergyModel:
    """Device power figures for the energy objective.

    Attributes:
        compute_mw: device power while computing the prefix (a phone SoC under
            CPU load: ~2 W; measure yours).
        idle_mw: device power while waiting for the cloud (screen off, CPU idle).
        radio: ``"wifi"``, ``"lte"``, ``"3g"``, ``"auto"`` (WiFi when the uplink
            is >= 10 Mbps, else LTE) or a :class:`RadioPower`.
        radio_tail: charge the radio's tail energy (LTE: 11.576 s at 1060 mW)
            to each request; right for sparse requests, wrong for a stream.
    """

    compute_mw: float = 2000.0
    idle_mw: float = 200.0
    radio: str | RadioPower = "auto"
    radio_tail: bool = False

    def radio_for(self, uplink_mbps: float) -> RadioPower:
        """The radio power model in use at this uplink bandwidth.

        Raises:
            InvalidArgument: an unknown radio name.
        """
        if isinstance(self.radio, RadioPower):
            return self.radio
        name = self.radio
        if name == "auto":
            name = "wifi" if uplink_mbps >= _AUTO_WIFI_MBPS else "lte"
        try:
            return RADIOS[name]
        except KeyError:
            raise InvalidArgument(f"unknown radio {name!r} (use {', '.join(RADIOS)}, auto)") from None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        d = asdict(self)
        if isinstance(self.radio, RadioPower):
            d["radio"] = asdict(self.radio)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnergyModel:
        """Inverse of :meth:`to_dict`."""
        radio = data.get("radio", "auto")
        if isinstance(radio, dict):
            radio = RadioPower(**radio)
        return cls(
            compute_mw=float(data.get("compute_mw", 2000.0)),
            idle_mw=float(data.get("idle_mw", 200.0)),
            radio=radio,
            radio_tail=bool(data.get("radio_tail", False)),
        )


@dataclass(frozen=True)
class Constraints:
    """Plan-time constraints.

    Attributes:
        slo_ms: latency SLO; partitions predicted slower are not chosen when
            any partition meets it (otherwise the fastest is chosen).
        device_memory_mb: device memory available to the prefix; partitions
            whose prefix needs more (weights + activations, estimated) are
            dropped from the candidates (``"device"`` stays listed).
    """

    slo_ms: float | None = None
    device_memory_mb: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> Constraints:
        """Inverse of :meth:`to_dict`."""
        data = data or {}
        return cls(data.get("slo_ms"), data.get("device_memory_mb"))


def transfer_ms(nbytes: float, mbps: float) -> float:
    """Serialisation time of ``nbytes`` over a ``mbps`` link, in ms (no RTT).

    Raises:
        InvalidArgument: a non-positive bandwidth.
    """
    if not mbps > 0:
        raise InvalidArgument(f"bandwidth must be > 0 Mbps, got {mbps}")
    return nbytes * 8.0 / (mbps * 1e3)


def estimate(
    device_ms: float,
    cloud_ms: float,
    up_bytes: float,
    down_bytes: float,
    c: Conditions,
    energy: EnergyModel = EnergyModel(),
    *,
    offload: bool = True,
) -> Estimate:
    """Latency and energy of one request (Neurosurgeon/DADS latency, Huang et al. energy).

    Args:
        device_ms: prefix compute time on the device (0 for cloud-only), as
            profiled; scaled by ``c.device_factor``.
        cloud_ms: suffix compute time in the cloud, unloaded (0 for device-only).
        up_bytes: bytes sent device -> cloud (the cut tensors).
        down_bytes: bytes sent back (the model outputs).
        c: the conditions.
        energy: device power figures.
        offload: False for the device-only partition (no network at all).

    Returns:
        The :class:`Estimate`.

    Raises:
        InvalidArgument: non-positive bandwidth on an offloading partition.
    """
    device_ms *= c.device_factor
    if not offload:
        e = energy.compute_mw * device_ms / 1e3
        return Estimate(device_ms, e, device_ms, 0.0, 0.0)
    cloud = cloud_ms * (1.0 + max(0.0, c.cloud_load))
    t_up = transfer_ms(up_bytes, c.uplink_mbps)
    t_down = transfer_ms(down_bytes, c.down_mbps)
    transfer = t_up + c.rtt_ms + t_down
    radio = energy.radio_for(c.uplink_mbps)
    e_uj = (
        energy.compute_mw * device_ms
        + radio.power_mw(c.uplink_mbps, 0.0) * t_up
        + radio.power_mw(0.0, c.down_mbps) * t_down
        + energy.idle_mw * (c.rtt_ms + cloud)
    )
    if energy.radio_tail:
        e_uj += radio.tail_mw * radio.tail_s * 1e3
    return Estimate(device_ms + transfer + cloud, e_uj / 1e3, device_ms, cloud, transfer)


def energy_weight(battery_pct: float) -> float:
    """Weight of energy in the objective: 0 at a full battery, 1 at an empty one."""
    b = min(100.0, max(0.0, float(battery_pct)))
    return 1.0 - b / 100.0


def objective(est: Estimate, c: Conditions, ref: Estimate) -> float:
    """Battery-weighted score of an estimate (lower is better).

    ``(1 - w)·latency/ref.latency + w·energy/ref.energy`` with
    ``w = energy_weight(c.battery_pct)``; ``ref`` is the device-only estimate,
    so 1.0 means "as good as running locally".
    """
    w = energy_weight(c.battery_pct)
    lat = est.latency_ms / ref.latency_ms if ref.latency_ms > 0 else est.latency_ms
    en = est.energy_mj / ref.energy_mj if ref.energy_mj > 0 else est.energy_mj
    return (1.0 - w) * lat + w * en


@dataclass(frozen=True)
class LinearCosts:
    """Per-unit coefficients of the objective, for the min-cut (see :func:`linear_costs`).

    Attributes:
        device_per_ms: score per ms of device compute.
        cloud_per_ms: score per ms of (unloaded) cloud compute.
        per_byte: score per byte sent up.
    """

    device_per_ms: float
    cloud_per_ms: float
    per_byte: float


def linear_costs(c: Conditions, energy: EnergyModel, ref: Estimate) -> LinearCosts:
    """The objective as a linear function of device ms, cloud ms and uplink bytes.

    The objective of :func:`objective` is linear in those three quantities once
    the conditions are fixed (the RTT and downlink terms are the same for every
    offloading partition), which is what lets a DADS-style s-t min-cut optimise
    it exactly over the node-level costs.

    Args:
        c: the conditions.
        energy: device power figures.
        ref: the device-only estimate used to normalise (see :func:`objective`).

    Returns:
        The three coefficients.
    """
    w = energy_weight(c.battery_pct)
    lat = (1.0 - w) / ref.latency_ms if ref.latency_ms > 0 else (1.0 - w)
    en = w / ref.energy_mj / 1e3 if ref.energy_mj > 0 else w / 1e3  # score per µJ
    radio = energy.radio_for(c.uplink_mbps)
    ms_per_byte = 8.0 / (c.uplink_mbps * 1e3)
    load = 1.0 + max(0.0, c.cloud_load)
    return LinearCosts(
        device_per_ms=lat + en * energy.compute_mw,
        cloud_per_ms=(lat + en * energy.idle_mw) * load,
        per_byte=(lat + en * radio.power_mw(c.uplink_mbps, 0.0)) * ms_per_byte,
    )


def log_grid(lo: float, hi: float, n: int) -> list[float]:
    """``n`` log-spaced points from ``lo`` to ``hi`` inclusive (rounded to 4 significant digits)."""
    if n < 2:
        return [lo]
    step = (math.log(hi) - math.log(lo)) / (n - 1)
    return [float(f"{math.exp(math.log(lo) + i * step):.4g}") for i in range(n)]
