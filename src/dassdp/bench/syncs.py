"""``dassdp bench syncs``: host syncs and dispatched ops per training step.

Counted with a ``TorchDispatchMode`` (:mod:`dassdp.bench.counters`) in one step of the
engine (:func:`dassdp.engine.step.train_step`: forward, cross-entropy, the finite check,
backward, AdamW step, ``DASSDP.step``, ``dassdp.reset``, meters) with DA-SSDP, in the warm-up
epoch and after it (the gate fitted), per LIF backend. The first steps of each phase are not
counted (lazy initialisation, JIT compilation, the gate fit).

* *host syncs*: calls of ``aten._local_scalar_dense`` (``.item()``, ``float()``,
  ``bool()``; AdamW's CPU step counters aside), ``nonzero``, ``masked_select`` (size read
  back) and ``lift_fresh`` (a tensor from Python data: a host-to-device copy on a GPU),
  inside ``DASSDP.step`` and in the rest of the step. Per-op breakdown in the CSV.
* *aten ops*: every operator dispatched, per LIF layer forward + backward
  (``[T, B, C, 8, 8]``) and per step; each is at least one kernel launch on a GPU, so on the
  CPU this is the proxy of kernel launches. *kernels*: the aten ops that launch a kernel (not
  allocations, views or metadata) plus each Triton launch. On CUDA the profiler's count of
  CUDA kernels is added (Triton kernels run outside the dispatcher: only it sees them).
* *before*: ``docs/bench/syncs-before.csv``, the base commit's counts on the CPU
  (``benchmarks/count_syncs.py``; its forward + backward were counted apart from the
  optimizer step; ``loop`` was ``LIF(fused=False)``, ``torch`` the fused LIF).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dassdp.bench import harness as H
from dassdp.bench.counters import count_cuda_kernels, count_ops, count_triton_launches, syncs_of

HELP = "host syncs and aten ops / kernels per training step of spikingresformer_ti"

BACKENDS = ("loop", "torch", "triton")
BEFORE_CSV = Path("docs/bench/syncs-before.csv")
BASE_COMMIT = "81cbbaa"
# (quantity key, label) in table order; *_syncs counts host syncs, *_ops aten ops.
QUANTITIES = (
    ("step_syncs_warmup", "host syncs: training step outside DASSDP.step (warm-up)"),
    ("plast_step_syncs_warmup", "host syncs: DASSDP.step (warm-up)"),
    ("step_syncs_active", "host syncs: training step outside DASSDP.step (active)"),
    ("plast_step_syncs_active", "host syncs: DASSDP.step (active)"),
    ("lif_ops", "aten ops: one LIF layer forward + backward"),
    ("lif_kernels", "kernels: one LIF layer forward + backward"),
    ("step_ops_warmup", "aten ops: training step (warm-up)"),
    ("step_ops_active", "aten ops: training step (active)"),
    ("lif_cuda_kernels", "CUDA kernels: one LIF layer forward + backward"),
    ("step_cuda_kernels_active", "CUDA kernels: training step (active)"),
)
# counted by the base commit's measurement only (forward + backward apart from the step)
BEFORE_ONLY = (
    ("fwd_bwd_syncs_warmup", "host syncs: forward + backward (warm-up)"),
    ("fwd_bwd_syncs_active", "host syncs: forward + backward (active)"),
)
LABELS = dict(QUANTITIES + BEFORE_ONLY)


def lif_factory(backend: str) -> Callable[..., Any]:
    """A ``neuron_layer`` factory for ``dassdp.neurons.LIF`` with ``backend``."""
    from dassdp.neurons import LIF

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return functools.partial(LIF, backend=backend)


def measure(
    model_name: str = "spikingresformer_ti",
    *,
    backends: tuple[str, ...] = ("loop", "torch"),
    T: int = 4,
    batch: int = 2,
    size: int = 32,
    lif_channels: int = 64,
    device: str = "cpu",
    seed: int = 0,
    log: Callable[[str], None] | None = None,
    factories: dict[str, Callable[..., Any]] | None = None,
) -> list[dict[str, Any]]:
    """Count syncs and ops of one warm-up and one active training step per backend; returns
    rows ``{quantity, backend, count, detail}`` (see :data:`QUANTITIES`). ``factories``:
    the neuron factory per backend (default :func:`lif_factory`)."""
    import torch

    from dassdp import create_model

    dev = torch.device(device)
    rows: list[dict[str, Any]] = []

    def add(quantity: str, backend: str, count: int, detail: str = "") -> None:
        rows.append({"quantity": quantity, "backend": backend, "count": count, "detail": detail})
        if log:
            log(f"  {backend:<7} {LABELS[quantity]:<58} {count:6d}  {detail}")

    torch.manual_seed(seed)
    base = create_model(model_name, num_classes=10, T=T).to(dev).train()
    gen = torch.Generator().manual_seed(seed)
    lif_x = (1.5 * torch.randn(T, batch, lif_channels, 8, 8, generator=gen)).to(dev)
    for backend in backends:
        factory = (factories or {}).get(backend) or lif_factory(backend)
        _count_lif(factory, lif_x, backend, add)
        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=10, T=T, neuron_layer=factory)
        model.load_state_dict(copy.deepcopy(base.state_dict()))
        _count_steps(model.to(dev).train(), (batch, H.in_channels(base), size, size), seed,
                     backend, add)  # fmt: skip
    return rows


def _count_lif(factory: Callable[..., Any], x: Any, backend: str, add: Callable) -> None:
    """Ops and kernels of one neuron layer's forward + backward on ``x`` ``[T, B, C, H, W]``."""
    import torch

    import dassdp

    neuron, xg, grad = factory(), x.clone().requires_grad_(True), torch.ones_like(x)

    def call() -> None:
        neuron(xg).backward(grad)
        dassdp.reset(neuron)

    call()  # one-time work (JIT, lazy init) outside the count
    triton = count_triton_launches() if backend == "triton" else contextlib.nullcontext(Counter())
    with triton as launches:
        counts, _ = count_ops(call)
    add("lif_ops", backend, counts["ops"], f"input {list(x.shape)}")
    n_triton = launches["launches"]
    detail = f"{counts['kernels']} aten + {n_triton} Triton" if n_triton else ""
    add("lif_kernels", backend, counts["kernels"] + n_triton, detail)
    if x.device.type == "cuda":
        add("lif_cuda_kernels", backend, count_cuda_kernels(call)[0])


def _count_steps(
    model: Any, shape: tuple[int, ...], seed: int, backend: str, add: Callable
) -> None:
    """Syncs and ops of the engine's step with DA-SSDP, in warm-up and after it."""
    from dassdp import DASSDP, DASSDPConfig

    dev = next(model.parameters()).device
    opt = H.adamw(model)
    plast = DASSDP(model, DASSDPConfig(warmup_epochs=1))
    plast.set_epoch(0)
    step = H.engine_step(model, opt, device=dev, learner=plast)
    x, y = H.random_batch(shape, seed=seed, device=dev)

    def cpu_counter(t: Any) -> bool:  # AdamW's step counts: CPU tensors, read on the CPU
        return any(s.get("step") is t for s in opt.state.values())

    inside: list[Counter[str]] = []

    def counted(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            counts, out = count_ops(lambda: original(*args, **kwargs))
            inside.append(counts)
            return out

        return call

    for phase in ("warmup", "active"):
        for _ in range(2):  # the phase's first steps: lazy init, the gate's first use
            step(x, y)
        with H.wrapped(plast, "step", counted):
            whole, _ = count_ops(lambda: step(x, y), skip=cpu_counter)
        add(f"step_syncs_{phase}", backend, *syncs_of(whole - inside[-1]))
        add(f"plast_step_syncs_{phase}", backend, *syncs_of(inside[-1]))
        add(f"step_ops_{phase}", backend, whole["ops"])
        if dev.type == "cuda" and phase == "active":
            add("step_cuda_kernels_active", backend, count_cuda_kernels(lambda: step(x, y))[0])
        if phase == "warmup":
            H.leave_warmup(plast)
    if plast.counters["applied"] < 1:
        raise RuntimeError(f"backend {backend}: the active steps applied no update")
    plast.close()


def read_rows(path: Path) -> dict[tuple[str, str], str]:
    """``{(quantity, backend): count}`` of a CSV written by :func:`measure` (empty if absent)."""
    path = Path(path)
    if not path.exists():
        return {}
    with path.open() as fh:
        return {(r["quantity"], r["backend"]): r["count"] for r in csv.DictReader(fh)}


def markdown(
    rows: list[dict[str, Any]],
    before: dict[tuple[str, str], str],
    before_path: Path,
    facts: list[str],
    setup: str,
) -> str:
    """The ``## syncs`` section body: one row per quantity and backend, before and after."""
    lines = [
        *H.describe(__doc__),
        "",
        f"- model: {setup}; before: `{before_path}` (base commit {BASE_COMMIT}); after: this "
        "version",
        *facts,
        "",
        "| quantity | backend | before | after |",
        "|---|---|---:|---:|",
    ]
    after = {(r["quantity"], r["backend"]): r["count"] for r in rows}
    measured = {b for _, b in after} | {b for _, b in before}
    for q, label in QUANTITIES + BEFORE_ONLY:
        for b in sorted(measured, key=BACKENDS.index):
            if (q, b) in after or (q, b) in before:
                was, now = before.get((q, b), "n/a"), after.get((q, b), "n/a")
                lines.append(f"| {label} | {b} | {was} | {now} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    H.add_options(
        parser,
        model=("spikingresformer_ti", "model"),
        backends=(None, "LIF backends (default loop torch, and triton on CUDA; triton on the "
                  "CPU needs TRITON_INTERPRET=1)", {"nargs": "+", "choices": BACKENDS}),
        T=(4, "time steps"),
        batch=(2, "batch size"),
        size=(32, "input height = width"),
        lif_channels=(64, "C of the LIF-alone input"),
        before=(BEFORE_CSV, "CSV of the base commit's counts"),
    )  # fmt: skip
    H.add_run_arguments(parser)
    H.add_output_arguments(parser, "syncs")


def run(args: argparse.Namespace) -> int:
    import torch

    H.check_positive(args, "T", "batch", "size", "lif_channels", "threads")
    device = str(H.device_of(args.device))
    backends = args.backends or (BACKENDS if device.startswith("cuda") else ("loop", "torch"))
    torch.set_num_threads(args.threads)
    load_before = H.load_average()
    setup = f"`{args.model}` (T={args.T}, batch {args.batch}, {args.size}x{args.size})"
    print(f"{setup} on {device}", flush=True)
    rows = measure(
        args.model, backends=tuple(backends), T=args.T, batch=args.batch, size=args.size,
        lif_channels=args.lif_channels, device=device, seed=args.seed,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    before = read_rows(args.before)
    return H.save(
        args, "syncs", rows, lambda facts: markdown(rows, before, args.before, facts, setup),
        device=device, load_before=load_before,
    )  # fmt: skip
