"""Named, composable experiment variants: each is a set of dotted config overrides.

A variant name is one entry of :data:`VARIANTS` or several joined by ``+``
(``dassdp+no-kernel``). Every variant except ``baseline`` starts from the ``dassdp``
overrides (plasticity on, fitted gate, no control) and then applies its own knob(s), so
its resolved config differs from ``dassdp``'s only there; ``baseline`` is ``dassdp`` with
``plasticity.enabled=false`` (the learner stays attached but inert, so a baseline run is
bit-identical to a run without DA-SSDP). The parts of a composed name are applied left
to right; later parts win on a shared key. A part may also be one override ``key=value``
(``dassdp+A_plus=1.5e-4``, ``ssdp+sigma=2``): a bare key names a ``plasticity`` field when
there is one (else a top-level key); a dotted key is used as given. This is how a
sensitivity sweep is written: ``--variants baseline,dassdp,A_plus=1.5e-4,A_plus=1.5e-5``.

``baseline`` combines with overrides of anything but the plasticity block, so an ordinary
regularizer is a variant too: ``baseline+weight_decay=0.1`` (10x the configs' 0.01),
``baseline+model_args.dropout=0.3`` (a model argument; ``spiking_cnn`` has ``dropout`` and
``site_norm``). A ``plasticity`` override on ``baseline`` would change nothing (plasticity
is off), and another named variant would turn it on: both are errors.

=================  ==========================================================================
name               overrides (on top of ``dassdp``)
=================  ==========================================================================
baseline           plasticity.enabled=false
dassdp             plasticity.enabled=true, gate=fitted, control=none (the paper's rule)
ssdp               plasticity.gate=one (two-factor SSDP, G = 1)
dassdp-learned     plasticity.learn=[sigma, amplitude] (sigma and a by one-step hypergradient)
ssdp-learned       plasticity.gate=one, plasticity.learn=[sigma, amplitude]
compat             preset=compat, latency=last, A_minus=5e-4, sites=compat (released code)
no-kernel          plasticity.sigma=.inf (no latency kernel)
classifier-only    plasticity.sites=classifier
projection-only    plasticity.sites=projection
mid-only           plasticity.sites=mid (SpikingResformer: the stage before the last)
shuffled-latency   plasticity.control=shuffled_latency
random-update      plasticity.control=random_update
uniform-drift      plasticity.control=uniform_drift
=================  ==========================================================================
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields

__all__ = ["BASELINE", "VARIANTS", "Variant", "parse_variants", "variant_overrides"]

BASELINE = "baseline"
_BASE = "dassdp"


@dataclass(frozen=True)
class Variant:
    """One named variant: its own overrides and a one-line description."""

    overrides: tuple[str, ...]
    doc: str


VARIANTS: dict[str, Variant] = {
    BASELINE: Variant(("plasticity.enabled=false",), "plasticity off (learner inert)"),
    _BASE: Variant(
        ("plasticity.enabled=true", "plasticity.gate=fitted", "plasticity.control=none"),
        "DA-SSDP: fitted dopamine gate",
    ),
    "ssdp": Variant(("plasticity.gate=one",), "two-factor SSDP (gate G = 1)"),
    "dassdp-learned": Variant(
        ("plasticity.learn=[sigma, amplitude]",),
        "DA-SSDP with sigma and amplitude learned by one-step hypergradient",
    ),
    "ssdp-learned": Variant(
        ("plasticity.gate=one", "plasticity.learn=[sigma, amplitude]"),
        "two-factor SSDP with sigma and amplitude learned by one-step hypergradient",
    ),
    "compat": Variant(
        (
            "plasticity.preset=compat",
            "plasticity.latency=last",
            "plasticity.A_minus=5.0e-4",
            "plasticity.sites=compat",
        ),
        "the released code's semantics",
    ),
    "no-kernel": Variant(("plasticity.sigma=.inf",), "ablation: no latency kernel"),
    "classifier-only": Variant(("plasticity.sites=classifier",), "ablation: classifier site"),
    "projection-only": Variant(("plasticity.sites=projection",), "ablation: projection site"),
    "mid-only": Variant(("plasticity.sites=mid",), "ablation: mid-to-late stage sites"),
    "shuffled-latency": Variant(
        ("plasticity.control=shuffled_latency",), "control: latencies permuted across units"
    ),
    "random-update": Variant(
        ("plasticity.control=random_update",), "control: random-sign dW of the same norm"
    ),
    "uniform-drift": Variant(
        ("plasticity.control=uniform_drift",), "control: constant A_plus * mean(G) drift"
    ),
}


def _check_name(name: str) -> list[str]:
    parts = [p.strip() for p in name.split("+")]
    unknown = [p for p in parts if p not in VARIANTS and "=" not in p]
    if unknown or not all(parts):
        raise ValueError(
            f"unknown variant {name!r}; allowed: {', '.join(VARIANTS)} or key=value "
            "(compose with '+')"
        )
    for part in parts:
        if "=" in part:
            _part_override(name, part)
    if "/" in name or name.startswith("."):
        raise ValueError(
            f"variant {name!r}: a variant name is a folder name (no '/', no leading '.')"
        )
    if BASELINE in parts:
        _check_baseline_parts(name, parts)
    return parts


def _check_baseline_parts(name: str, parts: list[str]) -> None:
    """``baseline`` goes with ``key=value`` parts outside the plasticity block only."""
    for part in parts:
        if part == BASELINE:
            continue
        if "=" not in part:
            raise ValueError(
                f"variant {name!r}: 'baseline' cannot be combined with another variant"
            )
        key = _part_override(name, part).partition("=")[0]
        if key == "plasticity" or key.startswith("plasticity."):
            raise ValueError(
                f"variant {name!r}: 'baseline' cannot be combined with {part!r}: plasticity "
                "is off in the baseline, so a plasticity override changes nothing (baseline "
                "takes overrides of other keys, e.g. baseline+weight_decay=0.1)"
            )


def variant_overrides(name: str) -> list[str]:
    """The dotted overrides of a (composed) variant name, ``dassdp``'s first.

    >>> variant_overrides("ssdp+no-kernel")[-2:]
    ['plasticity.gate=one', 'plasticity.sigma=.inf']
    """
    out = list(VARIANTS[_BASE].overrides)
    for part in _check_name(name):
        if "=" in part:
            out.append(_part_override(name, part))
        elif part != _BASE:
            out += VARIANTS[part].overrides
    return out


def _part_override(name: str, part: str) -> str:
    """``A_plus=1e-4`` -> ``plasticity.A_plus=1e-4``; a dotted key is kept as given."""
    from dassdp.engine.config import PlasticityConfig

    key, _, value = (s.strip() for s in part.partition("="))
    if not key or not value:
        raise ValueError(f"variant {name!r}: part {part!r} must look like key=value")
    if "." not in key and key in {f.name for f in fields(PlasticityConfig)}:
        key = f"plasticity.{key}"
    return f"{key}={value}"


def parse_variants(spec: str | Sequence[str]) -> list[str]:
    """``"baseline,dassdp,ssdp+no-kernel"`` -> checked names (order kept, duplicates dropped)."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    names: list[str] = []
    for item in (i.strip() for i in items):
        if item:
            _check_name(item)
            if item not in names:
                names.append(item)
    if not names:
        raise ValueError("no variants given (e.g. --variants baseline,dassdp)")
    return names
