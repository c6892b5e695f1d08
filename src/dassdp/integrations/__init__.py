"""Integrations of the DA-SSDP learner with training frameworks (``lightning``)."""
