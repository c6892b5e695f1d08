"""What a :class:`~dassdp.DASSDP` state must match to be loaded into a learner.

A learner's ``state_dict()`` holds what its warm-up recorded (the gate sums per site), the
fitted gate, the counters, its generator and, with ``config.learn``, the learned values.
Loaded into a learner on another model, or one configured differently, those records would
be read as if this learner had made them. :func:`check_state` refuses that, naming the first
difference, before anything is loaded:

1. the value must be a learner's state (a model's ``state_dict()`` or a whole training
   checkpoint is named as such);
2. the sites: the same names in the same order, each weight of the same ``[C_out, C_in]``;
3. with ``strict`` (the default) how each site is recorded (its :class:`SiteSpec`: sources,
   thresholds, ``fired``, silent latencies, layout), the learner's ``T``, and every
   :class:`~dassdp.DASSDPConfig` field but those in :data:`RESUMABLE_CONFIG`;
4. the state's own structure: seven gate sums per site, known counters, fits per site.

:data:`RESUMABLE_CONFIG` follows the engine's ``RESUMABLE_CHANGES``
(:mod:`dassdp.engine.checkpoint`): a resume may change how a run is checked or how fast it
goes, never what it computes. For the learner that is ``debug`` alone (range checks that
read values back; they change no value). Every other field changes what is recorded (sites
preset, ``latency``, ``warmup_epochs``, ``eps``, ...), what is applied (``A_plus``,
``A_minus``, ``sigma``, ``clip``, ``gate``, ``apply``, ``control``, ``dtype``, ``enabled``)
or what is learned (``learn`` and its rates), so a state written under another value is
another run; ``strict=False`` loads it anyway (fine-tuning from a learner's gate with other
settings), still refusing other sites or shapes.

States written before the site specs, shapes and ``T`` were saved are checked on what they
hold; a config field a state lacks (added since) takes its default, the value the older
version used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from torch import Tensor

from dassdp.plasticity.config import DASSDPConfig
from dassdp.plasticity.sites import SiteSpec

__all__ = ["RESUMABLE_CONFIG", "STATE_KEYS", "check_state"]

STATE_KEYS = ("epoch", "sites", "stats", "fits", "counters", "generator", "config")
RESUMABLE_CONFIG = frozenset({"debug"})
N_SUMS = 7


def check_state(
    state: object,
    *,
    sites: Mapping[str, SiteSpec],
    shapes: Mapping[str, tuple[int, int]],
    T: int | None,
    config: DASSDPConfig,
    counters: tuple[str, ...],
    strict: bool = True,
) -> None:
    """Raise a ``ValueError`` naming the first way ``state`` differs from this learner.

    Args:
        state: what is being loaded (should be a ``DASSDP.state_dict()``).
        sites: this learner's ``{name: SiteSpec}``, in order.
        shapes: this learner's ``{name: (C_out, C_in)}``.
        T: this learner's time steps (``None``: unknown).
        config: this learner's config.
        counters: the counter names this learner knows.
        strict: compare the site specs, ``T`` and the config too (module docstring).
    """
    state = _check_kind(state)
    _check_sites(state, list(sites), shapes)
    if strict:
        _check_specs(state, sites)
        saved_T = state.get("T", T)
        if saved_T != T:
            raise ValueError(
                f"the DA-SSDP state was recorded with T={saved_T}, this learner has T={T}{_HINT}"
            )
        _check_config(state["config"], config)
    _check_structure(state, list(sites), counters, learns=bool(config.learn))


_HINT = (
    "; a learner resumes only with the same sites and config (only "
    f"{', '.join(sorted(RESUMABLE_CONFIG))} may differ): load_state_dict(state, "
    "strict=False) loads it into another config"
)


def _check_kind(state: object) -> Mapping[str, Any]:
    """``state`` if it is a learner's state, else an error saying what it is."""
    if not isinstance(state, Mapping):
        raise TypeError(
            f"DASSDP.load_state_dict takes the dict DASSDP.state_dict() returned, got a "
            f"{type(state).__name__}"
        )
    missing = [k for k in STATE_KEYS if k not in state]
    if not missing:
        return state
    if "plasticity" in state and "model" in state:
        raise ValueError(
            "this is a whole training checkpoint, not a DA-SSDP learner's state: pass its "
            "'plasticity' entry, plast.load_state_dict(checkpoint['plasticity'])"
        )
    if state and all(isinstance(v, Tensor) for v in state.values()):
        first = next(iter(state))
        raise ValueError(
            f"this is a model's state_dict (tensors such as {first!r}), not a DA-SSDP "
            "learner's: load it with model.load_state_dict(); DASSDP.load_state_dict takes "
            "what DASSDP.state_dict() returned"
        )
    raise ValueError(
        f"not a DA-SSDP learner's state: it lacks {missing} (DASSDP.load_state_dict takes "
        "what DASSDP.state_dict() returned)"
    )


def _check_sites(
    state: Mapping[str, Any], own: list[str], shapes: Mapping[str, tuple[int, int]]
) -> None:
    saved = list(state["sites"])
    if saved != own:
        raise ValueError(
            f"the DA-SSDP state's sites {saved} do not match this learner's sites {own} "
            "(a state of a learner on another model or with other sites)"
        )
    for name, shape in (state.get("shapes") or {}).items():
        if tuple(shape) != tuple(shapes[name]):
            raise ValueError(
                f"site {name!r}: its weight is [C_out, C_in] = {list(shape)} in the DA-SSDP "
                f"state, {list(shapes[name])} in this learner's model (a state of another "
                "model)"
            )


def _check_specs(state: Mapping[str, Any], sites: Mapping[str, SiteSpec]) -> None:
    for name, saved in (state.get("site_specs") or {}).items():
        own = sites[name].to_dict()
        for key, value in own.items():
            if saved.get(key, value) != value:
                raise ValueError(
                    f"site {name!r}: {key}={saved[key]!r} in the DA-SSDP state, {value!r} "
                    f"in this learner (its records were read another way){_HINT}"
                )


def _check_config(saved: object, config: DASSDPConfig) -> None:
    if not isinstance(saved, Mapping):
        raise ValueError(f"the DA-SSDP state's config is not a mapping: {saved!r}")
    own = config.to_dict()
    unknown = sorted(set(saved) - set(own))
    if unknown:
        raise ValueError(
            f"the DA-SSDP state's config has field(s) {unknown} this version does not know "
            f"(written by a newer dassdp?){_HINT}"
        )
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(DASSDPConfig)
        if f.default is not dataclasses.MISSING
    }
    for key, value in own.items():
        if key in RESUMABLE_CONFIG:
            continue
        old = saved.get(key, defaults.get(key))
        if _frozen(old) != _frozen(value):
            raise ValueError(f"config.{key}: {old!r} in the DA-SSDP state, {value!r} here{_HINT}")


def _frozen(value: Any) -> Any:
    """Lists and tuples compare alike (a state may hold either)."""
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _check_structure(
    state: Mapping[str, Any], own: list[str], counters: tuple[str, ...], *, learns: bool
) -> None:
    """Every site has its 7 gate sums (and a fit, once fitted), and learned values when this
    learner learns and the state has them; the counters are known."""
    stats = state["stats"]
    for name in own:
        sums = stats.get(name, {}).get("sums") if isinstance(stats, Mapping) else None
        if sums is None or len(sums) != N_SUMS:
            raise ValueError(
                f"the DA-SSDP state's gate statistics of site {name!r} are missing or not "
                f"{N_SUMS} sums"
            )
    fits = state["fits"]
    if fits is not None and sorted(fits) != sorted(own):
        raise ValueError(f"the DA-SSDP state's fitted gates are for {sorted(fits)}, not {own}")
    unknown = sorted(set(state["counters"]) - set(counters))
    if unknown:
        raise ValueError(f"checkpoint DA-SSDP counters {unknown} unknown; known: {counters}")
    learned = state.get("learned")
    missing = sorted(set(own) - set(learned)) if learns and learned is not None else []
    if missing:
        raise ValueError(f"checkpoint DA-SSDP learned values lack the site(s) {missing}")
