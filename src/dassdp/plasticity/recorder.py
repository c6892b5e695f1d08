"""Forward hooks that turn a model's activity into what the rule needs: fired + latency.

A :class:`Recorder` hooks, for each site, its pre and post *sources* (see
:mod:`dassdp.plasticity.sites`). Every hooked tensor is reduced at once, under
``no_grad``, to per-channel activity ``[T, B, C]`` (a conv channel is active at ``t`` if any
spatial position is) and then to three ``[B, C]`` summaries (fired, first and last active
step; plus the mean over time for ``fired="mean"``). Nothing else is kept (but a rank-2/4
call's per-channel ``[N, C]`` values until its layout is decided), nothing keeps an autograd
graph, and :meth:`Recorder.collect` hands the step's records over and clears
them, so no tensor outlives its step.

Layouts come from how a site is called, never from divisibility. ``[T, B, C]`` and
``[T, B, C, H, W]`` are time-major. A rank-2/4 tensor (``layout="auto"``) is buffered until
its window decides: a second call before the window ends makes them one time step per call
(the snnTorch idiom); a single call is flattened ``[T*B, ...]`` when ``T`` is known, and one
step (with a warning) when it is not. A single call whose leading dim is the model's own
input batch, or is not a multiple of ``T``, is ambiguous: an error that says which
``layout=`` to pass. Each training forward of the model opens its own window (gradient
accumulation: the learner averages ``dW`` over windows); forwards under ``no_grad`` or in
eval mode are not recorded.
"""

from __future__ import annotations

import difflib
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dassdp._util.recompute import is_recomputing
from dassdp.plasticity.rule import LATENCY_MODES, Activity, finalize_latency, first_last_active
from dassdp.plasticity.sites import DASSDPWarning, SiteSpec, Source

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


Summary = tuple[Tensor, Tensor, Tensor, Tensor, int]  # fired, first, last, mean [B, C]; T


class _SourceHook:
    """Reduces one source's tensor to ``[B, C]`` summaries on every recorded forward.

    Buffers (all ``[B, C]`` or, for an undecided call, ``[N, C]``; none holds a graph):
    ``done`` the closed windows; ``run`` the running summaries of per-step calls; ``pending``
    the per-channel values of a rank-2/4 call whose layout is not decided yet (``"auto"``):
    a second call before the window ends makes both per-step calls, otherwise it is one
    flattened ``[T*B, C]`` call (see :meth:`_resolve_pending`).
    """

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
        self.clear()

    def clear(self) -> None:
        self.done: list[Summary] = []
        self.run: list[Tensor] | None = None  # fired, first, last, vsum over per-step calls
        self.steps = 0  # per-step calls in ``run``
        self.run_batch: tuple[int, ...] = ()  # the model's batch candidates when it began
        self.pending: Tensor | None = None  # [N, C]
        self.pending_batch: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        return f"site {self.site!r} {self.role} source {self.source}"

    @property
    def has_records(self) -> bool:
        return bool(self.done) or self.run is not None or self.pending is not None

    def tensors(self) -> list[Tensor]:
        """Every buffered tensor (for tests: none may hold an autograd graph)."""
        out = [t for window in self.done for t in window[:4]] + list(self.run or [])
        return out if self.pending is None else [*out, self.pending]

    def __call__(self, x: object) -> None:
        if isinstance(x, tuple | list):
            x = x[0]  # snnTorch neurons return (spikes, membrane)
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.label}: expected a tensor, got {type(x).__name__}")
        with torch.no_grad():
            self._record(x.detach())

    def _record(self, x: Tensor) -> None:
        layout, time_major = self.spec.layout, x.dim() in (3, 5)
        wrong = layout != "auto" and (layout == "time_major") != time_major
        if x.dim() not in (2, 3, 4, 5) or wrong:
            raise ValueError(
                f"{self.label}: cannot read a tensor of shape {tuple(x.shape)} as layout "
                f"{layout!r}; expected [T,B,C], [T,B,C,H,W], [T*B,C], [T*B,C,H,W] or one step "
                "[B,C] / [B,C,H,W]"
            )
        v = self._per_channel(x, 2 if time_major else 1)
        batch = self.recorder.model_batch
        if time_major:
            T = self.recorder.T
            if T and v.shape[0] != T:
                raise ValueError(
                    f"{self.label}: has T={v.shape[0]} steps, the learner expects T={T}"
                )
            self._add_window(v, batch)
        elif layout == "flat":
            self._add_window(self._unflatten(v), batch, flat=True)
        elif layout == "step" or self.run is not None:
            self._step(v, batch)
        elif self.pending is not None:  # a second call in one window: one call per step
            first, self.pending = self.pending, None
            self._step(first, self.pending_batch)
            self._step(v, batch)
        else:
            self.pending, self.pending_batch = v, batch

    def _per_channel(self, x: Tensor, dim: int) -> Tensor:
        """``x`` -> per-channel values (a channel is active if any position is)."""
        if x.shape[dim] != self.channels:
            raise ValueError(
                f"{self.label}: has {x.shape[dim]} channels, the site weight expects "
                f"{self.channels} (tensor shape {tuple(x.shape)})"
            )
        return x.amax(dim=(-2, -1)) if x.dim() in (4, 5) else x

    def _unflatten(self, v: Tensor) -> Tensor:  # [T*B, C] -> [T, B, C]
        T = self.recorder.T
        if not T:
            raise ValueError(f"{self.label}: layout 'flat' needs T (pass T= to DASSDP)")
        if v.shape[0] % T:
            raise ValueError(f"{self.label}: leading dim {v.shape[0]} is not T*B with T={T}")
        return v.view(T, v.shape[0] // T, v.shape[1])

    def _add_window(self, v: Tensor, batch: tuple[int, ...], flat: bool = False) -> None:
        # v: [T, B, C]; ``flat``: it came as [T*B, C], so the model may have been fed [T*B, ...]
        fired, first, last = first_last_active(v > self.source.threshold)
        # The mean over time serves fired="mean" only; otherwise ``fired`` stands in for it.
        mean = v.float().mean(0) if self.spec.fired == "mean" else fired
        self.done.append((fired, first, last, mean, v.shape[0]))
        if not (flat and v.shape[0] * v.shape[1] in batch):
            self._check_batch(v.shape[1], batch)

    def _step(self, v: Tensor, batch: tuple[int, ...]) -> None:  # v: [B, C], one time step
        active, t = v > self.source.threshold, self.steps
        if self.run is None:
            zero = torch.zeros_like(active, dtype=torch.int32)
            self.run = [active.clone(), zero, zero.clone(), torch.zeros_like(v, dtype=torch.float)]
            self.run_batch = batch
        fired, first, last, vsum = self.run
        if v.shape[0] != fired.shape[0]:
            raise ValueError(
                f"{self.label}: per-step calls of one window have batch {fired.shape[0]} and "
                f"then {v.shape[0]}; separate forwards are separate windows only when the "
                "model itself is called (its forward pre-hook ends a window)"
            )
        first.copy_(torch.where(fired, first, torch.full_like(first, t)))
        last.copy_(torch.where(active, torch.full_like(last, t), last))
        fired |= active
        vsum += v.float()
        self.steps += 1
        if self.steps == self.recorder.T:  # a full window: the next call opens a new one
            self._close_run()

    def _close_run(self) -> None:
        fired, first, last, vsum = self.run
        T, T_expected = self.steps, self.recorder.T
        self.run, self.steps = None, 0
        if T_expected and T_expected != T:
            raise ValueError(
                f"{self.label}: saw {T} per-step calls, the learner expects T={T_expected}"
            )
        if T == 1 and not T_expected and self.spec.layout == "auto":
            self.recorder.warn_once(
                "single-step",
                f"{self.label}: a window closed after a single per-step call of shape "
                f"{tuple(fired.shape)}; if this tensor is flattened [T*B, ...], pass T= to "
                "DASSDP (else dW is wrong); if the model really runs one step per forward, "
                "pass layout='step' in the site spec",
            )
        self.done.append((fired, first, last, vsum / T, T))
        self._check_batch(fired.shape[0], self.run_batch)

    def _resolve_pending(self) -> None:
        """Decide the layout of a window's single rank-2/4 call: flattened ``[T*B, C]`` when T
        is known (and the model's input batch does not contradict it), else one time step."""
        v, batch, self.pending = self.pending, self.pending_batch, None
        T, N = self.recorder.T, v.shape[0]
        if not T or T == 1:
            self._step(v, batch)
            if self.run is not None:
                self._close_run()
            return
        if N % T == 0 and (N // T in batch or N not in batch):
            self._add_window(v.view(T, N // T, v.shape[1]), batch, flat=True)
            return
        why = (
            f"its leading dim {N} is the model's input batch"
            if N in batch
            else f"its leading dim {N} is not T*B with T={T}"
        )
        raise ValueError(
            f"{self.label}: one call of shape {tuple(v.shape)} in this forward with T={T}, "
            f"but {why}: the layout is ambiguous. Pass layout='step' in the site spec if the "
            "site is called once per time step (the time loop outside the model's forward), "
            f"or layout='flat' if it sees [T*B, ...] tensors, e.g. sites={{{self.site!r}: "
            "{'post': ..., 'layout': 'step'}}"
        )

    def _check_batch(self, B: int, batch: tuple[int, ...]) -> None:
        if batch and B not in batch:
            self.recorder.warn_once(
                "batch",
                f"{self.label}: its batch is {B} but the model's input has leading dims "
                f"{batch}; if the site sees flattened [T*B, ...] tensors pass T= to DASSDP "
                "(or layout='flat'), else dW mixes time steps and samples",
            )

    def end_window(self) -> None:
        """The model was called again (a new training forward): close what is decidable.

        A per-step run stays open while fewer than T (known) calls were seen, so a time loop
        outside the model's forward accumulates; with T unknown each forward is a window,
        unless the spec says ``layout='step'`` (then only :meth:`finish` closes it)."""
        if self.pending is not None:
            self._resolve_pending()
        if self.run is not None and not self.recorder.T and self.spec.layout == "auto":
            self._close_run()

    def finish(self, latency: str) -> list[tuple[Activity, int]]:
        """Every window's :class:`Activity` and T (empty if nothing was recorded); clears."""
        try:
            if self.pending is not None:
                self._resolve_pending()
            if self.run is not None:
                self._close_run()
            done = self.done
        finally:
            self.clear()
        silent = self.spec.silent_pre if self.role == "pre" else self.spec.silent_post
        out = []
        for fired, first, last, mean, T in done:
            fired_ind = mean > self.source.threshold if self.spec.fired == "mean" else fired
            tau = finalize_latency(fired, first if latency == "first" else last, T, silent)
            out.append((Activity(fired_ind, tau), T))
        return out


@dataclass(frozen=True)
class SiteRecord:
    """One site's activity over one step: ``pre`` ``[B, C_in]``, ``post`` ``[B, C_out]``, ``T``.

    Several training forwards before one ``step()`` (gradient accumulation) give several
    windows, concatenated along the batch; ``windows`` holds each one's ``(batch, T)`` and
    ``T`` is the largest.
    """

    pre: Activity
    post: Activity
    T: int
    windows: tuple[tuple[int, int], ...] = ()

    def split(self) -> list[SiteRecord]:
        """One record per window (itself when there is one)."""
        if len(self.windows) <= 1:
            return [self]
        out, start = [], 0
        for b, T in self.windows:
            part = slice(start, start + b)
            pre = Activity(self.pre.fired[part], self.pre.latency[part])
            post = Activity(self.post.fired[part], self.post.latency[part])
            out.append(SiteRecord(pre, post, T, ((b, T),)))
            start += b
        return out


class Recorder:
    """Hooks the pre/post sources of every site of ``model``.

    A forward pre-hook on ``model`` itself marks each training forward (train mode, grad
    enabled): it ends the previous forward's windows (see :meth:`_SourceHook.end_window`),
    learns the model's input batch (to warn when a site's batch differs from it) and the site
    weights' versions (so ``apply='grad'`` can tell that the optimizer already stepped).
    Forwards under ``torch.no_grad()`` / inference mode or in eval mode record nothing.

    Args:
        model: the (unwrapped) model.
        sites: ``{layer name: SiteSpec}``; each layer is validated as a DA-SSDP site.
        T: time steps, needed to unflatten ``[T*B, ...]`` tensors (``None``: unknown).
        latency: ``"first"`` or ``"last"``.
        grad_only: record only forwards with autograd enabled (default: a train-mode pass
            under ``torch.no_grad()``, e.g. for metrics, is not a training step); ``False``
            records those too (``dassdp ls sites`` measures firing that way).
    """

    def __init__(
        self,
        model: nn.Module,
        sites: dict[str, SiteSpec],
        *,
        T: int | None = None,
        latency: str = "first",
        grad_only: bool = True,
    ) -> None:
        if latency not in LATENCY_MODES:
            raise ValueError(f"latency must be one of {LATENCY_MODES}, got {latency!r}")
        if T is not None and (isinstance(T, bool) or not isinstance(T, int) or T < 1):
            raise ValueError(f"T must be a positive int or None, got {T!r}")
        self.model, self.T, self.latency = model, T, latency
        self.grad_only = grad_only
        self.enabled = True
        self.closed = False
        self.layers: dict[str, nn.Module] = {}
        self.passes = 0  # training forwards of the model since the last collect()
        self.model_batch: tuple[int, ...] = ()  # leading dims of the last forward's input
        self.versions: dict[str, int] = {}  # site weight ``_version`` at the last forward
        self._warned: set[str] = set()
        self._hooks: dict[str, tuple[_SourceHook, _SourceHook]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        try:
            for name, spec in sites.items():
                self._add_site(name, spec)
        except Exception:
            self.close()
            raise
        self._model_handle = model.register_forward_pre_hook(self._on_forward, with_kwargs=True)
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
            # nor in a checkpointed stage's recomputation (its forward ran already)
            if self._recording(mod) and not is_recomputing():
                hook(args[0] if port == "input" else out)

        self._handles.append(module.register_forward_hook(fn))

    def _recording(self, module: nn.Module) -> bool:
        """Whether a forward of ``module`` is recorded now: enabled, training, and (with
        ``grad_only``) not under ``no_grad`` (a metrics pass is not a training step)."""
        grad_ok = torch.is_grad_enabled() or not self.grad_only
        return self.enabled and module.training and grad_ok

    def _on_forward(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._recording(model):
            return
        for pre, post in self._hooks.values():
            pre.end_window()
            post.end_window()
        self.passes += 1
        self.model_batch = _leading_dims([*args, *kwargs.values()])
        self.versions = {name: layer.weight._version for name, layer in self.layers.items()}

    def warn_once(self, key: str, message: str) -> None:
        """Warn (a :class:`~dassdp.plasticity.sites.DASSDPWarning`) once per recorder and key."""
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, DASSDPWarning, stacklevel=4)

    @property
    def has_records(self) -> bool:
        """Whether any source buffered activity since the last collect/clear (no device sync)."""
        return any(h.has_records for pair in self._hooks.values() for h in pair)

    def collect(self) -> dict[str, SiteRecord]:
        """This step's records per site (sites that saw no forward are absent); clears all."""
        records: dict[str, SiteRecord] = {}
        try:
            for name, (pre_hook, post_hook) in self._hooks.items():
                pre, post = pre_hook.finish(self.latency), post_hook.finish(self.latency)
                if not pre and not post:
                    continue
                if not pre or not post:
                    missing = pre_hook if not pre else post_hook
                    raise ValueError(
                        f"{missing.label} recorded nothing this step while the other "
                        "source did: is that module run in the forward pass?"
                    )
                records[name] = _site_record(name, pre, post)
        finally:
            self.clear()
            self.passes, self.model_batch = 0, ()
        return records

    def clear(self) -> None:
        """Drop buffered records without using them."""
        for pre, post in self._hooks.values():
            pre.clear()
            post.clear()

    def close(self) -> None:
        """Remove every hook and drop all buffers."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        handle = getattr(self, "_model_handle", None)
        if handle is not None:
            handle.remove()
        self.clear()
        self._hooks.clear()
        self.closed = True
        recorders = _RECORDERS.get(self.model)
        if recorders is not None:
            recorders.discard(self)

    @property
    def num_hooks(self) -> int:
        """Forward hooks on the sources (the model's own pre-hook is not counted)."""
        return len(self._handles)


def _leading_dims(values: list[object]) -> tuple[int, ...]:
    """The first tensor's leading one or two dims: its batch is one of them ([B, ...] or
    time-major [T, B, ...]); ``()`` when the model gets no tensor."""
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return tuple(value.shape[:2]) if value.dim() >= 3 else (value.shape[0],)
    return ()


def _site_record(
    name: str, pre: list[tuple[Activity, int]], post: list[tuple[Activity, int]]
) -> SiteRecord:
    """Check that pre and post saw the same windows and concatenate them along the batch."""
    if len(pre) != len(post):
        raise ValueError(
            f"site {name!r}: pre recorded {len(pre)} window(s) this step, post {len(post)}"
        )
    windows = []
    for (pre_act, T_pre), (post_act, T_post) in zip(pre, post):
        if T_pre != T_post:
            raise ValueError(f"site {name!r}: pre has T={T_pre} steps, post has T={T_post}")
        if pre_act.fired.shape[0] != post_act.fired.shape[0]:
            raise ValueError(
                f"site {name!r}: pre batch {pre_act.fired.shape[0]} != post "
                f"batch {post_act.fired.shape[0]}"
            )
        windows.append((pre_act.fired.shape[0], T_pre))
    if len(pre) == 1:
        return SiteRecord(pre[0][0], post[0][0], windows[0][1], tuple(windows))

    def cat(acts: list[tuple[Activity, int]]) -> Activity:
        return Activity(
            torch.cat([a.fired for a, _ in acts]), torch.cat([a.latency for a, _ in acts])
        )

    return SiteRecord(cat(pre), cat(post), max(T for _, T in windows), tuple(windows))


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
