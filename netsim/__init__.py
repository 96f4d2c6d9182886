"""Network-condition simulation: shaping links, network profiles and traces.

Public API:
    ShapingProxy    -- asyncio TCP proxy: per-direction bandwidth, RTT, jitter,
                       loss (as TCP retransmissions), stalls, outages.
    LinkConditions  -- the link's state, changeable at run time.
    ScheduleDriver  -- play a Trace into links in real time.
    TbfLink, tbf_available -- optional kernel backend (tc tbf in a network
                       namespace; root only, bandwidth only).
    profiles        -- CAT1, 3G, 4G/LTE, 5G, WiFi (``splitgate.netsim.profiles.PROFILES``).
    traces          -- Trace, TracePoint; step/random-walk/outage generators;
                       loaders for Riiser HSDPA and Ghent 4G logs and CSV.
"""

from __future__ import annotations

from splitgate.netsim._proxy import LinkConditions, ShapingProxy
from splitgate.netsim._schedule import ScheduleDriver
from splitgate.netsim._tbf import TbfLink, tbf_available
from splitgate.netsim.profiles import PROFILES, NetworkProfile, profile
from splitgate.netsim.traces import Trace, TracePoint

__all__ = [
    "LinkConditions",
    "ShapingProxy",
    "ScheduleDriver",
    "TbfLink",
    "tbf_available",
    "PROFILES",
    "NetworkProfile",
    "profile",
    "Trace",
    "TracePoint",
]
