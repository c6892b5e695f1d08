"""DA-SSDP plasticity: the rule (pure math), the gate, the activity recorder, the config,
the learned sigma/amplitude, the controls and the learner."""

from dassdp.plasticity.config import DASSDPConfig, DASSDPConfigError
from dassdp.plasticity.learner import DASSDP
from dassdp.plasticity.sites import SiteSpec

__all__ = ["DASSDP", "DASSDPConfig", "DASSDPConfigError", "SiteSpec"]
