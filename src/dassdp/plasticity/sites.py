"""Site declarations: which weight DA-SSDP changes and where its pre/post activity comes from.

A *site* is one synaptic weight ``W[C_out, C_in]``: an ``nn.Linear`` or a 1x1 ``nn.Conv2d``
with ``groups=1``. Its activity *sources* are strings:

``"input"``            the site layer's own input (its spikes), active where ``x > 0``
``"output"``           the site layer's own output, active where ``x > 0``
``"<module.name>"``    the output of any named module of the model (a neuron's spikes;
                       a tuple output such as snnTorch's ``(spk, mem)`` gives its first item)
``"<module.name>@input"``  the (first positional) input of a named module

Any source may carry a threshold suffix ``">thr"`` (``"output>0"``, ``"block.out>0.5"``):
active where ``x > thr``; with no suffix the threshold is 0, which for {0, 1} spikes is
the spike itself.

A site spec is a :class:`SiteSpec`, a dict with its fields, or a plain string, which is
shorthand for ``SiteSpec(pre="input", post=<string>)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

FIRED_MODES = ("any", "mean")
LAYOUTS = ("auto", "time_major", "flat", "step")


class DASSDPWarning(UserWarning):
    """A DA-SSDP usage that is probably a mistake (each is warned once per learner)."""


@dataclass(frozen=True)
class Source:
    """A parsed activity source.

    ``where`` is ``"input"``/``"output"`` (of the site layer) or a module name; ``port`` says
    whether that module's ``"output"`` or ``"input"`` is read.
    """

    where: str
    threshold: float = 0.0
    port: str = "output"

    @classmethod
    def parse(cls, text: str, *, what: str = "source") -> Source:
        if not isinstance(text, str) or not text.strip():
            raise ValueError(
                f"{what} must be a non-empty string such as 'input', 'output>0' "
                f"or a module name, got {text!r}"
            )
        where, sep, thr = text.partition(">")
        where = where.strip()
        threshold = 0.0
        if sep:
            try:
                threshold = float(thr)
            except ValueError as err:
                raise ValueError(
                    f"{what} {text!r}: threshold {thr!r} after '>' is not a number"
                ) from err
            if not math.isfinite(threshold):
                raise ValueError(f"{what} {text!r}: threshold must be finite")
        port = "output"
        if "@" in where:
            where, _, port = where.partition("@")
            if port not in ("input", "output"):
                raise ValueError(
                    f"{what} {text!r}: after '@' use 'input' or 'output', got {port!r}"
                )
        if not where:
            raise ValueError(f"{what} {text!r} names no module")
        return cls(where, threshold, port)

    def __str__(self) -> str:
        return f"{self.where}@{self.port}>{self.threshold:g}"


@dataclass(frozen=True)
class SiteSpec:
    """Where one site's activity comes from, and how it is read.

    Attributes:
        pre: source of presynaptic activity ``[.., C_in]`` (default: the layer's input).
        post: source of postsynaptic activity ``[.., C_out]`` (default: the layer's output > 0).
        fired: ``"any"`` (fired if active at any step, DESIGN §1) or ``"mean"`` (fired if the
            mean over time of the raw tensor exceeds the threshold: the released code's
            classifier convention, used by the compatibility preset).
        silent_pre, silent_post: latency given to a silent unit; ``None`` means ``T``
            (the released code's projection path uses 0).
        layout: how tensors are laid out: ``"auto"`` (rank 3/5 time-major ``[T,B,...]``;
            rank 2/4 decided by how the site is called: several calls per forward are one
            time step each, one call is flattened ``[T*B,...]`` when the learner knows T;
            ambiguous cases are errors), or one of ``"time_major"``, ``"flat"``, ``"step"``
            (one time step per call, also when the time loop is outside the model's forward).
    """

    pre: str = "input"
    post: str = "output>0"
    fired: str = "any"
    silent_pre: int | None = None
    silent_post: int | None = None
    layout: str = "auto"

    def __post_init__(self) -> None:
        Source.parse(self.pre, what="pre source")
        Source.parse(self.post, what="post source")
        if self.fired not in FIRED_MODES:
            raise ValueError(f"fired must be one of {FIRED_MODES}, got {self.fired!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {self.layout!r}")
        for name in ("silent_pre", "silent_post"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None (meaning T) or an int >= 0, got {value!r}")

    @property
    def pre_source(self) -> Source:
        return Source.parse(self.pre)

    @property
    def post_source(self) -> Source:
        return Source.parse(self.post)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def as_site_spec(value: SiteSpec | Mapping[str, Any] | str, *, site: str = "?") -> SiteSpec:
    """Turn a user's site value (spec, dict, or post-source string) into a :class:`SiteSpec`."""
    if isinstance(value, SiteSpec):
        return value
    if isinstance(value, str):
        return SiteSpec(post=value)
    if isinstance(value, Mapping):
        allowed = set(SiteSpec.__dataclass_fields__)
        unknown = sorted(set(value) - allowed)
        if unknown:
            raise ValueError(f"site {site!r}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
        return SiteSpec(**value)
    raise TypeError(
        f"site {site!r}: expected a SiteSpec, dict or string, got {type(value).__name__}"
    )


def normalize_sites(sites: Mapping[str, Any]) -> dict[str, SiteSpec]:
    """Validate a ``{layer_name: spec}`` mapping and return it with :class:`SiteSpec` values."""
    if not isinstance(sites, Mapping) or not sites:
        raise ValueError("sites must be a non-empty mapping {layer name: spec}")
    return {str(name): as_site_spec(spec, site=name) for name, spec in sites.items()}
