"""Network-condition simulation: a shaping TCP proxy between edge and cloud.

Public API:
    ShapingProxy    -- asyncio TCP proxy with per-direction bandwidth, RTT, jitter, outages.
    LinkConditions  -- the link's state, changeable at run time.
"""

from __future__ import annotations

from netsim._proxy import LinkConditions, ShapingProxy

__all__ = ["LinkConditions", "ShapingProxy"]
