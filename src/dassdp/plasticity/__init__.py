"""DA-SSDP plasticity: the rule (pure math), the gate, the activity recorder and the learner."""

from dassdp.plasticity.learner import DASSDP, DASSDPConfig
from dassdp.plasticity.sites import SiteSpec

__all__ = ["DASSDP", "DASSDPConfig", "SiteSpec"]
