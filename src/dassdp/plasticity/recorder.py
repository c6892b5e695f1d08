"""Forward hooks that turn a model's activity into what the rule needs: fired + latency.

A :class:`Recorder` hooks, for each site, its pre and post *sources* (see
:mod:`dassdp.plasticity.sites`). Every hooked tensor is reduced at once, under
``no_grad``, to per-channel activity ``[T, B, C]`` (a conv channel is active at ``t`` if any
spatial position is) and then to three ``[B, C]`` summaries (fired, first and last active
step; plus the mean over time for ``fired="mean"``). Nothing else is kept, nothing keeps
an autograd graph, and :meth:`Recorder.collect` hands the step's records over and clears
them, so no tensor outlives its step.

Layouts: ``[T, B, C]`` and ``[T, B, C, H, W]`` are time-major; ``[T*B, C]`` and
``[T*B, C, H, W]`` are unflattened with the known ``T``; without a known ``T`` a rank-2/4
tensor is one time step of a model that loops over time (the snnTorch idiom), and its
calls accumulate over time until the step closes the window. Several time-major calls in
one window (gradient accumulation) are concatenated along the batch.
"""

from __future__ import annotations

import difflib
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from dassdp._recompute import is_recomputing
from dassdp.plasticity.rule import LATENCY_MODES, Activity, finalize_latency, first_last_active
from dassdp.plasticity.sites import SiteSpec, Source

_RECORDERS: weakref.WeakKeyDictionary[nn.Module, weakref.WeakSet[Recorder]] = (
    weakref.WeakKeyDictionary()
)


def clear_model_records(model: nn.Module) -> None:
    """Drop the buffered records of every recorder attached to ``model``."""
    for recorder in list(_RECORDERS.get(model, ())):
        recorder.clear()


def resolve_module(model: nn.Module, name: str, *, what: str) -> nn.Module:
    """``model.get_submodule(name)`` with an error that lists close matches."""
    try:
        return model.get_submodule(name)
    except AttributeError as err:
        names = [n for n, _ in model.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=5, cutoff=0.5)
        hint = f"; close matches: {close}" if close else f"; modules include: {names[:8]}"
        raise ValueError(
            f"{what}: no module named {name!r} in {type(model).__name__}{hint}"
        ) from err


@dataclass
class _Window:
    """Summaries of one source within one step window."""

    chunks: list[tuple[Tensor, Tensor, Tensor, Tensor]] = field(default_factory=list)
    chunk_T: list[int] = field(default_factory=list)  # time steps of each chunk
    steps: int = 0  # per-step calls accumulated (snnTorch idiom)
    run: list[Tensor] | None = None  # running (fired, first, last, vsum) over per-step calls


class _SourceHook:
    """Reduces one source's tensor to ``[B, C]`` summaries on every recorded forward."""

    def __init__(
        self,
        recorder: Recorder,
        site: str,
        role: str,
        source: Source,
        channels: int,
        spec: SiteSpec,
    ) -> None:
        self.recorder, self.site, self.role = recorder, site, role
        self.source, self.channels, self.spec = source, channels, spec
        self.window = _Window()

    @property
    def label(self) -> str:
        return f"site {self.site!r} {self.role} source {self.source}"

    def __call__(self, x: object) -> None:
        if isinstance(x, tuple | list):
            x = x[0]  # snnTorch neurons return (spikes, membrane)
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.label}: expected a tensor, got {type(x).__name__}")
        with torch.no_grad():
            v, per_step = self._per_channel(x.detach())  # [T, B, C]
            if per_step:
                self._accumulate_step(v[0])
            else:
                self._add_chunk(v)

    def _per_channel(self, x: Tensor) -> tuple[Tensor, bool]:
        """``x`` -> per-channel values ``[T, B, C]`` (spatial max) and whether it is one step."""
        layout, T = self.spec.layout, self.recorder.T
        if layout == "auto":
            layout = "time_major" if x.dim() in (3, 5) else ("flat" if T else "step")
        if x.dim() not in (2, 3, 4, 5) or (layout == "time_major") != (x.dim() in (3, 5)):
            raise ValueError(
                f"{self.label}: cannot read a tensor of shape {tuple(x.shape)} as layout "
                f"{layout!r}; expected [T,B,C], [T,B,C,H,W], [T*B,C], [T*B,C,H,W] or one step "
                "[B,C] / [B,C,H,W]"
            )
        if layout == "flat":
            if not T:
                raise ValueError(f"{self.label}: layout 'flat' needs T (pass T= to DASSDP)")
            if x.shape[0] % T:
                raise ValueError(f"{self.label}: leading dim {x.shape[0]} is not T*B with T={T}")
            x = x.reshape(T, x.shape[0] // T, *x.shape[1:])
        elif layout == "step":
            x = x.unsqueeze(0)
        if x.shape[2] != self.channels:
            raise ValueError(
                f"{self.label}: has {x.shape[2]} channels, the site weight expects "
                f"{self.channels} (tensor shape {tuple(x.shape)})"
            )
        if x.dim() == 5:
            x = x.amax(dim=(3, 4))  # a channel is active if any position is
        if layout == "time_major" and T and x.shape[0] != T:
            raise ValueError(f"{self.label}: has T={x.shape[0]} steps, the learner expects T={T}")
        return x, layout == "step"

    def _add_chunk(self, v: Tensor) -> None:
        fired, first, last = first_last_active(v > self.source.threshold)
        # The mean over time serves fired="mean" only; otherwise ``fired`` stands in for it.
        mean = v.float().mean(0) if self.spec.fired == "mean" else fired
        self.window.chunks.append((fired, first, last, mean))
        self.window.chunk_T.append(v.shape[0])

    def _accumulate_step(self, v: Tensor) -> None:  # v: [B, C], one time step
        w, t = self.window, self.window.steps
        active = v > self.source.threshold
        if w.run is None:
            zero = torch.zeros_like(active, dtype=torch.int32)
            w.run = [active.clone(), zero, zero.clone(), torch.zeros_like(v, dtype=torch.float)]
        fired, first, last, vsum = w.run
        first.copy_(torch.where(fired, first, torch.full_like(first, t)))
        last.copy_(torch.where(active, torch.full_like(last, t), last))
        fired |= active
        vsum += v.float()
        w.steps += 1

    def finish(self, latency: str) -> tuple[Activity, int] | None:
        """The window's :class:`Activity` and T, or None if nothing was recorded; clears."""
        w, self.window = self.window, _Window()
        if w.run is not None:  # per-step calls: running summaries over w.steps steps
            fired, first, last, vsum = w.run
            T = w.steps
            if self.recorder.T and T != self.recorder.T:
                raise ValueError(
                    f"{self.label}: saw {T} per-step calls, the learner expects T={self.recorder.T}"
                )
            mean = vsum / T
        elif w.chunks:  # time-major calls: concatenated along the batch
            Ts = set(w.chunk_T)
            if len(Ts) > 1:
                raise ValueError(
                    f"{self.label}: calls within one step had different T: {sorted(Ts)}"
                )
            T = Ts.pop()
            fired, first, last, mean = (torch.cat([c[i] for c in w.chunks]) for i in range(4))
        else:
            return None
        silent = self.spec.silent_pre if self.role == "pre" else self.spec.silent_post
        fired_ind = mean > self.source.threshold if self.spec.fired == "mean" else fired
        tau = finalize_latency(fired, first if latency == "first" else last, T, silent)
        return Activity(fired_ind, tau), T


@dataclass(frozen=True)
class SiteRecord:
    """One site's activity over one step: ``pre`` ``[B, C_in]``, ``post`` ``[B, C_out]``, ``T``."""

    pre: Activity
    post: Activity
    T: int


class Recorder:
    """Hooks the pre/post sources of every site of ``model``.

    Args:
        model: the (unwrapped) model.
        sites: ``{layer name: SiteSpec}``; each layer is validated as a DA-SSDP site.
        T: time steps, needed to unflatten ``[T*B, ...]`` tensors (``None``: unknown).
        latency: ``"first"`` or ``"last"``.
    """

    def __init__(
        self,
        model: nn.Module,
        sites: dict[str, SiteSpec],
        *,
        T: int | None = None,
        latency: str = "first",
    ) -> None:
        if latency not in LATENCY_MODES:
            raise ValueError(f"latency must be one of {LATENCY_MODES}, got {latency!r}")
        if T is not None and (not isinstance(T, int) or T < 1):
            raise ValueError(f"T must be a positive int or None, got {T!r}")
        self.model, self.T, self.latency = model, T, latency
        self.enabled = True
        self.layers: dict[str, nn.Module] = {}
        self._hooks: dict[str, tuple[_SourceHook, _SourceHook]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name, spec in sites.items():
                self._add_site(name, spec)
        except Exception:
            self.close()
            raise
        _RECORDERS.setdefault(model, weakref.WeakSet()).add(self)

    def _add_site(self, name: str, spec: SiteSpec) -> None:
        layer = resolve_module(self.model, name, what=f"site {name!r}")
        c_out, c_in = site_shape(layer, name)
        self.layers[name] = layer
        pre = _SourceHook(self, name, "pre", spec.pre_source, c_in, spec)
        post = _SourceHook(self, name, "post", spec.post_source, c_out, spec)
        self._hooks[name] = (pre, post)
        for hook in (pre, post):
            self._attach(layer, hook)

    def _attach(self, layer: nn.Module, hook: _SourceHook) -> None:
        src = hook.source
        if src.where in ("input", "output"):
            module, port = layer, src.where
        else:
            module = resolve_module(self.model, src.where, what=hook.label)
            port = src.port

        def fn(mod: nn.Module, args: tuple, out: object) -> None:
            if self.enabled and mod.training and not is_recomputing():  # checkpointing
                hook(args[0] if port == "input" else out)

        self._handles.append(module.register_forward_hook(fn))

    def collect(self) -> dict[str, SiteRecord]:
        """This step's records per site (sites that saw no forward are absent); clears all."""
        records: dict[str, SiteRecord] = {}
        for name, (pre_hook, post_hook) in self._hooks.items():
            pre, post = pre_hook.finish(self.latency), post_hook.finish(self.latency)
            if pre is None and post is None:
                continue
            if pre is None or post is None:
                missing = pre_hook if pre is None else post_hook
                raise ValueError(
                    f"{missing.label} recorded nothing this step while the other "
                    "source did: is that module run in the forward pass?"
                )
            (pre_act, T_pre), (post_act, T_post) = pre, post
            if T_pre != T_post:
                raise ValueError(f"site {name!r}: pre has T={T_pre} steps, post has T={T_post}")
            if pre_act.fired.shape[0] != post_act.fired.shape[0]:
                raise ValueError(
                    f"site {name!r}: pre batch {pre_act.fired.shape[0]} != post "
                    f"batch {post_act.fired.shape[0]}"
                )
            records[name] = SiteRecord(pre_act, post_act, T_pre)
        return records

    def clear(self) -> None:
        """Drop buffered records without using them."""
        for pre, post in self._hooks.values():
            pre.window, post.window = _Window(), _Window()

    def close(self) -> None:
        """Remove every hook and drop all buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.clear()
        self._hooks.clear()
        recorders = _RECORDERS.get(self.model)
        if recorders is not None:
            recorders.discard(self)

    @property
    def num_hooks(self) -> int:
        return len(self._handles)


def site_shape(layer: nn.Module, name: str) -> tuple[int, int]:
    """``(C_out, C_in)`` of a valid DA-SSDP site, or a ValueError naming what is wrong."""
    if isinstance(layer, nn.Linear):
        return layer.out_features, layer.in_features
    if isinstance(layer, nn.Conv2d):
        if tuple(layer.kernel_size) == (1, 1) and layer.groups == 1:
            return layer.out_channels, layer.in_channels
        raise ValueError(
            f"site {name!r} is an nn.Conv2d with kernel_size {tuple(layer.kernel_size)} and "
            f"groups {layer.groups}; a conv site must be 1x1 with groups=1"
        )
    raise ValueError(
        f"site {name!r} is a {type(layer).__module__}.{type(layer).__name__}; DA-SSDP sites "
        "must be nn.Linear or 1x1 nn.Conv2d with groups=1"
    )
