"""On/off switches read from the environment, all with one meaning of "off"."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["OFF", "env_flag"]

OFF = ("", "0", "false", "no", "off")  # compared stripped and lower-cased


def env_flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the switch ``name`` is on: set to anything but an :data:`OFF` value
    (unset, ``""``, ``0``, ``false``, ``no``, ``off``, in any case, are off)."""
    value = (os.environ if environ is None else environ).get(name, "")
    return value.strip().lower() not in OFF
