"""Network profiles: CAT1, 3G, 4G/LTE, 5G and WiFi links, with where each number comes from.

Sources (see DESIGN.md "Reference numbers"):

* **DADS** — Hu et al., "Dynamic Adaptive DNN Surgery for Inference Acceleration
  on the Edge", INFOCOM'19: the uplinks of its evaluation, CAT1 0.13, 3G 1.1,
  4G 5.85 and WiFi 18.88 Mbps. These are the ``uplink_mbps`` of the four
  profiles (uplink is what split inference sends).
* **Huang et al.** — "A Close Examination of Performance and Power
  Characteristics of 4G LTE Networks", MobiSys'12: median LTE throughput
  ~13 Mbps down / ~6 Mbps up (4GTest, 3000+ users; consistent with DADS's
  5.85 Mbps 4G uplink), and the radio power model ``P = αu·tu + αd·td + β``
  whose per-technology parameters (LTE, 3G, WiFi) are the planner's
  :data:`splitgate.planner.RADIOS`. Each profile names the radio model used for its
  energy (``radio``).
* **Assumed** — numbers neither paper gives (downlinks other than LTE's, RTTs,
  jitter, everything about 5G) are typical values, chosen conservatively and
  marked ``assumed`` in :attr:`NetworkProfile.sources`. Override them in an
  experiment spec (``trace: {kind: constant, profile: 4g, rtt_ms: 80}``).

5G has no figure in either paper: its profile is a mid-band (sub-6 GHz) link
with assumed numbers, and it uses the LTE radio power model as a stand-in
(Huang et al. predates 5G).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from splitgate.netsim._proxy import LinkConditions

__all__ = ["NetworkProfile", "PROFILES", "profile", "DADS_UPLINKS"]


@dataclass(frozen=True)
class NetworkProfile:
    """A named link: bandwidths (Mbps), RTT and jitter (ms), the radio for energy.

    Attributes:
        name: short name (``cat1``, ``3g``, ``4g``, ``5g``, ``wifi``).
        uplink_mbps: device -> cloud bandwidth.
        downlink_mbps: cloud -> device bandwidth.
        rtt_ms: round-trip time to the cloud tier.
        jitter_ms: extra one-way delay, uniform in [0, jitter_ms].
        radio: the :data:`splitgate.planner.RADIOS` power model for energy
            (``"lte"``, ``"3g"``, ``"wifi"``).
        sources: where each number comes from, per field.
    """

    name: str
    uplink_mbps: float
    downlink_mbps: float
    rtt_ms: float
    jitter_ms: float
    radio: str
    sources: dict[str, str] = field(default_factory=dict, compare=False)

    def conditions(self, **changes: object) -> LinkConditions:
        """This profile as :class:`LinkConditions` for a :class:`ShapingProxy`."""
        base = {
            "uplink_mbps": self.uplink_mbps,
            "downlink_mbps": self.downlink_mbps,
            "rtt_ms": self.rtt_ms,
            "jitter_ms": self.jitter_ms,
        }
        base.update(changes)
        return LinkConditions(**base)  # type: ignore[arg-type]


_DADS = "DADS (INFOCOM'19) uplink"
_HUANG = "Huang et al. (MobiSys'12)"
_ASSUMED = "assumed (typical; neither DADS nor Huang et al. give it)"

#: DADS's four uplinks, Mbps.
DADS_UPLINKS: dict[str, float] = {"cat1": 0.13, "3g": 1.1, "4g": 5.85, "wifi": 18.88}

PROFILES: dict[str, NetworkProfile] = {
    "cat1": NetworkProfile(
        "cat1", 0.13, 0.5, 150.0, 20.0, "lte",
        {"uplink_mbps": _DADS, "downlink_mbps": _ASSUMED + "; LTE Cat-1 IoT link",
         "rtt_ms": _ASSUMED, "jitter_ms": _ASSUMED, "radio": "LTE model of " + _HUANG + " (Cat-1 is LTE)"},
    ),
    "3g": NetworkProfile(
        "3g", 1.1, 2.0, 100.0, 10.0, "3g",
        {"uplink_mbps": _DADS, "downlink_mbps": _ASSUMED + "; HSPA-class",
         "rtt_ms": _ASSUMED, "jitter_ms": _ASSUMED, "radio": "3G model of " + _HUANG},
    ),
    "4g": NetworkProfile(
        "4g", 5.85, 13.0, 60.0, 5.0, "lte",
        {"uplink_mbps": _DADS + " (Huang et al.'s 4GTest median uplink is ~6 Mbps)",
         "downlink_mbps": _HUANG + ": median LTE downlink ~13 Mbps (4GTest)",
         "rtt_ms": _ASSUMED, "jitter_ms": _ASSUMED, "radio": "LTE model of " + _HUANG},
    ),
    "5g": NetworkProfile(
        "5g", 50.0, 300.0, 20.0, 2.0, "lte",
        {"uplink_mbps": _ASSUMED + "; mid-band 5G", "downlink_mbps": _ASSUMED + "; mid-band 5G",
         "rtt_ms": _ASSUMED, "jitter_ms": _ASSUMED,
         "radio": "LTE model of " + _HUANG + " as a stand-in (the paper has no 5G)"},
    ),
    "wifi": NetworkProfile(
        "wifi", 18.88, 50.0, 10.0, 2.0, "wifi",
        {"uplink_mbps": _DADS, "downlink_mbps": _ASSUMED + "; 802.11n-class",
         "rtt_ms": _ASSUMED, "jitter_ms": _ASSUMED, "radio": "WiFi model of " + _HUANG},
    ),
}
PROFILES["lte"] = PROFILES["4g"]


def profile(name: str) -> NetworkProfile:
    """A profile by name (case-insensitive; ``lte`` = ``4g``).

    Raises:
        KeyError: an unknown name; the message lists the known ones.
    """
    try:
        return PROFILES[name.lower()]
    except KeyError:
        raise KeyError(f"unknown network profile {name!r} (known: {', '.join(sorted(PROFILES))})") from None
