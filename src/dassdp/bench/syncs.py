"""``dassdp bench syncs``: host syncs and dispatched ops per training step, before and after.

Counted with a ``TorchDispatchMode`` in one training step of ``spikingresformer_ti`` with
DA-SSDP (forward, cross-entropy, backward, AdamW step, ``DASSDP.step``, ``dassdp.reset``),
once in the warm-up epoch and once after it, for each LIF backend:

* **host syncs**: calls of ``aten._local_scalar_dense`` (``.item()``, ``float()``,
  ``bool()`` of a tensor), ``nonzero`` and ``masked_select`` (output size read back),
  ``lift_fresh`` (a tensor made from Python data: a host-to-device copy on a GPU), in
  forward + backward and in ``DASSDP.step``;
* **aten ops dispatched** per LIF layer forward + backward (``[T, B, C, H, W]`` input) and
  per training step: on a GPU each is at least one kernel launch, so on the CPU this is the
  proxy of kernel launches. On CUDA the CUDA kernels the profiler sees are counted as well
  (Triton kernels run outside the dispatcher: only the profiler sees them).

The counting (:func:`measure`) uses only the public API that every dassdp version has
(``create_model``, ``DASSDP``, ``DASSDPConfig``, ``reset``, ``neurons.LIF``), so that
``scripts/count_syncs.py`` can run it against an older checkout; the committed
``docs/bench/syncs-before.csv`` is that measurement of the base commit (81cbbaa), shown as
the *before* column of the section.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import functools
import inspect
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HELP = "host syncs and aten ops / kernels per training step of spikingresformer_ti"

SYNC_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "lift_fresh")
BACKENDS = ("loop", "torch", "triton")
BEFORE_CSV = Path("docs/bench/syncs-before.csv")
BASE_COMMIT = "81cbbaa"
# (quantity key, label) in table order; *_syncs counts host syncs, *_ops aten ops.
QUANTITIES = (
    ("fwd_bwd_syncs_warmup", "host syncs: forward + backward (warm-up)"),
    ("plast_step_syncs_warmup", "host syncs: DASSDP.step (warm-up)"),
    ("fwd_bwd_syncs_active", "host syncs: forward + backward (active)"),
    ("plast_step_syncs_active", "host syncs: DASSDP.step (active)"),
    ("lif_ops", "aten ops: one LIF layer forward + backward"),
    ("lif_kernels", "kernels: one LIF layer forward + backward"),
    ("step_ops_warmup", "aten ops: training step (warm-up)"),
    ("step_ops_active", "aten ops: training step (active)"),
    ("lif_cuda_kernels", "CUDA kernels: one LIF layer forward + backward"),
    ("step_cuda_kernels_active", "CUDA kernels: training step (active)"),
)
LABELS = dict(QUANTITIES)
# aten ops that launch no kernel on a GPU (allocation, views, metadata); every other aten op
# is at least one. The CPU count of kernels is the rest, plus each Triton launch.
NO_KERNEL_OPS = frozenset(
    [
        "empty",
        "empty_like",
        "empty_strided",
        "new_empty",
        "new_empty_strided",
        "view",
        "_unsafe_view",
        "_reshape_alias",
        "as_strided",
        "t",
        "transpose",
        "permute",
        "expand",
        "squeeze",
        "unsqueeze",
        "detach",
        "alias",
        "select",
        "slice",
        "unbind",
        "split",
        "split_with_sizes",
        "chunk",
        "view_as",
        "unflatten",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "is_same_size",
    ]
)


def _op_name(func: Any) -> str:
    packet = getattr(func, "overloadpacket", None)
    return getattr(packet, "__name__", str(func))


def _sync_kind(name: str) -> str | None:
    for op in SYNC_OPS:
        if name == op or name.startswith(op + "_"):  # lift_fresh_copy too
            return op
    return None


def count_ops(fn: Callable[[], Any]) -> tuple[Counter[str], Any]:
    """Run ``fn()`` under a ``TorchDispatchMode``; returns ``(counter, result)`` where the
    counter has ``"ops"`` (every aten op dispatched), ``"kernels"`` (those that launch a
    kernel: not in :data:`NO_KERNEL_OPS`, not a ``dassdp::`` custom op, whose Triton launches
    :func:`count_triton_launches` counts) and one key per :data:`SYNC_OPS` name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    counts: Counter[str] = Counter()

    class _Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            counts["ops"] += 1
            name = _op_name(func)
            if name not in NO_KERNEL_OPS and "dassdp" not in str(func):
                counts["kernels"] += 1
            kind = _sync_kind(name)
            if kind is not None:
                counts[kind] += 1
            return func(*args, **(kwargs or {}))

    with _Mode():
        result = fn()
    return counts, result


@contextlib.contextmanager
def count_triton_launches() -> Iterator[Counter[str]]:
    """Count the Triton LIF kernel launches (``counter["launches"]``) made inside the block
    (a dassdp without the Triton LIF counts none)."""
    counts: Counter[str] = Counter()
    try:
        from dassdp.neurons.backends import triton as triton_lif
    except ImportError:
        try:  # an older dassdp: the Triton LIF was dassdp.neurons.triton_lif
            from dassdp.neurons import triton_lif  # type: ignore[no-redef]
        except ImportError:
            yield counts
            return

    class _Counted:
        def __init__(self, kernel: Any) -> None:
            self.kernel = kernel

        def __getitem__(self, grid: Any) -> Any:
            if not getattr(triton_lif, "self_checking", bool)():  # not the self-check's own
                counts["launches"] += 1
            return self.kernel[grid]

    original = triton_lif._kernels
    triton_lif._kernels = lambda: tuple(_Counted(k) for k in original())  # type: ignore[assignment]
    try:
        yield counts
    finally:
        triton_lif._kernels = original  # type: ignore[assignment]


def syncs_of(counts: Counter[str]) -> tuple[int, str]:
    """Total host syncs in ``counts`` and the per-op breakdown (``"name n, ..."``)."""
    total = sum(counts[op] for op in SYNC_OPS)
    detail = ", ".join(f"{op} {counts[op]}" for op in SYNC_OPS if counts[op])
    return total, detail


def lif_factory(backend: str) -> Callable[..., Any]:
    """A ``neuron_layer`` factory for ``dassdp.neurons.LIF`` with ``backend``. In a dassdp
    without ``LIF(backend=...)`` (the base commit) ``loop`` is ``fused=False`` and ``torch``
    the fused kernel; ``triton`` does not exist there."""
    from dassdp.neurons import LIF

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    params = inspect.signature(LIF).parameters
    if "backend" in params:
        return functools.partial(LIF, backend=backend)
    if backend == "triton":
        raise ValueError("backend 'triton': this dassdp's LIF has no backend= argument")
    return functools.partial(LIF, fused=backend == "torch")


def _cuda_kernels(fn: Callable[[], Any]) -> int:
    from dassdp.bench.devstats import count_cuda_kernels

    return count_cuda_kernels(fn)[0]


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
) -> list[dict[str, Any]]:
    """Count syncs and ops of one warm-up and one active training step per backend; returns
    rows ``{quantity, backend, count, detail}`` (see :data:`QUANTITIES`)."""
    import torch
    import torch.nn.functional as F

    import dassdp
    from dassdp import DASSDP, DASSDPConfig, create_model

    dev = torch.device(device)
    cuda = dev.type == "cuda"
    rows: list[dict[str, Any]] = []

    def add(quantity: str, backend: str, count: int, detail: str = "") -> None:
        rows.append({"quantity": quantity, "backend": backend, "count": count, "detail": detail})
        if log:
            log(f"  {backend:<7} {LABELS[quantity]:<48} {count:6d}  {detail}")

    torch.manual_seed(seed)
    base = create_model(model_name, num_classes=10, T=T).to(dev).train()
    in_ch = next(m.in_channels for m in base.modules() if isinstance(m, torch.nn.Conv2d))
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.rand(batch, in_ch, size, size, generator=gen).to(dev) for _ in range(4)]
    y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
    lif_x = (1.5 * torch.randn(T, batch, lif_channels, 8, 8, generator=gen)).to(dev)
    lif_g = torch.randn(T, batch, lif_channels, 8, 8, generator=gen).to(dev)
    for backend in backends:
        factory = lif_factory(backend)
        # neuron-layer op count: [T, B, C, 8, 8]
        neuron = factory()
        xg = lif_x.clone().requires_grad_(True)

        def lif_call(neuron: Any = neuron, xg: Any = xg) -> None:
            neuron(xg).backward(lif_g)
            dassdp.reset(neuron)

        lif_call()  # one-time work (JIT, lazy init) outside the count
        with count_triton_launches() as launches:
            counts, _ = count_ops(lif_call)
        add("lif_ops", backend, counts["ops"], f"input {list(lif_x.shape)}")
        n_triton = launches["launches"]
        detail = f"{counts['kernels']} aten + {n_triton} Triton" if n_triton else ""
        add("lif_kernels", backend, counts["kernels"] + n_triton, detail)
        if cuda:
            add("lif_cuda_kernels", backend, _cuda_kernels(lif_call))

        torch.manual_seed(seed)
        model = create_model(model_name, num_classes=10, T=T, neuron_layer=factory)
        model.load_state_dict(copy.deepcopy(base.state_dict()))
        model = model.to(dev).train()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)
        plast = DASSDP(model, DASSDPConfig(warmup_epochs=1))
        plast.set_epoch(0)

        def fwd_bwd(x: Any, model: Any = model, opt: Any = opt) -> Any:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            return loss.detach()

        def rest(loss: Any, model: Any = model, opt: Any = opt, plast: Any = plast) -> None:
            opt.step()
            plast.step(loss)
            dassdp.reset(model)

        def step(x: Any) -> None:
            rest(fwd_bwd(x))

        for phase in ("warmup", "active"):
            step(xs[0])  # untimed first step of the phase (lazy init; the gate fit)
            step(xs[1])
            fb, loss = count_ops(lambda: fwd_bwd(xs[2]))
            n, detail = syncs_of(fb)
            add(f"fwd_bwd_syncs_{phase}", backend, n, detail)
            opt.step()
            ps, _ = count_ops(lambda: plast.step(loss))  # noqa: B023
            n, detail = syncs_of(ps)
            add(f"plast_step_syncs_{phase}", backend, n, detail)
            dassdp.reset(model)
            whole, _ = count_ops(lambda: step(xs[3]))
            add(f"step_ops_{phase}", backend, whole["ops"])
            if cuda and phase == "active":
                add("step_cuda_kernels_active", backend, _cuda_kernels(lambda: step(xs[3])))
            if phase == "warmup":
                plast.set_epoch(1)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # few warm-up records: a degenerate fit
                    plast.fit()
        applied = plast.counters["applied"]
        if applied < 1:
            raise RuntimeError(f"backend {backend}: the active steps applied no update")
        plast.close()
    return rows


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
    env: dict[str, Any],
    csv_path: Path,
    load: tuple[str, str],
    setup: str,
) -> str:
    """The ``## syncs`` section body: one row per quantity and backend, before and after."""
    from dassdp.bench.report import provenance

    lines = [
        f"Host syncs and dispatched operators in one training step of {setup} with DA-SSDP",
        "(forward, cross-entropy, backward, AdamW step, `DASSDP.step`, `dassdp.reset`),",
        "counted with a `TorchDispatchMode`, in the warm-up epoch and after it (the gate",
        "fitted), per LIF backend. *host syncs*: calls of `aten._local_scalar_dense`",
        "(`.item()`, `float()`, `bool()`), `nonzero`, `masked_select` (size read back) and",
        "`lift_fresh` (a tensor from Python data: a host-to-device copy on a GPU). *aten",
        "ops*: every operator dispatched (each is at least one kernel launch on a GPU: the CPU",
        "proxy of kernel launches); on CUDA the profiler's count of CUDA kernels is added (it",
        "sees the Triton kernels, which do not go through the dispatcher). *kernels*: the aten",
        "ops that launch a kernel (not allocations, views or metadata) plus each Triton launch",
        "(counted by wrapping the kernels, also under `TRITON_INTERPRET=1`). The first steps of",
        "each phase are not counted (lazy initialisation, JIT compilation, the gate fit).",
        f"*before*: the base commit {BASE_COMMIT} measured on the CPU with",
        f"`scripts/count_syncs.py` (`{before_path}`; there `loop` is `LIF(fused=False)` and",
        "`torch` the fused LIF); *after*: this version. Per-op breakdown in the CSV.",
        "",
        *provenance(env, csv_path, load),
        "",
        "| quantity | backend | before | after |",
        "|---|---|---:|---:|",
    ]
    order = {q: i for i, (q, _) in enumerate(QUANTITIES)}
    for r in sorted(rows, key=lambda r: (order[r["quantity"]], BACKENDS.index(r["backend"]))):
        was = before.get((r["quantity"], r["backend"]), "n/a")
        lines.append(f"| {LABELS[r['quantity']]} | {r['backend']} | {was} | {r['count']} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dassdp.bench.report import add_output_arguments, add_run_arguments

    parser.add_argument(
        "--model", default="spikingresformer_ti", help="model (default spikingresformer_ti)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=BACKENDS,
        default=None,
        help="LIF backends (default loop torch, and triton on CUDA; triton on the CPU needs "
        "TRITON_INTERPRET=1)",
    )
    parser.add_argument("--T", type=int, default=4, help="time steps (default 4)")
    parser.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    parser.add_argument("--size", type=int, default=32, help="input height = width (default 32)")
    parser.add_argument(
        "--lif-channels", type=int, default=64, help="C of the LIF-alone input (default 64)"
    )
    parser.add_argument(
        "--before",
        type=Path,
        default=BEFORE_CSV,
        help=f"CSV of the base commit's counts (default {BEFORE_CSV})",
    )
    add_run_arguments(parser, "seed of weights and inputs")
    add_output_arguments(parser, "syncs", per_device=True)


def run(args: argparse.Namespace) -> int:
    import torch

    from dassdp.bench.report import environment, write_csv, write_section
    from dassdp.bench.timing import default_csv, device_of, load_average, section_name

    if min(args.T, args.batch, args.size, args.lif_channels, args.threads) < 1:
        raise ValueError("--T, --batch, --size, --lif-channels and --threads must be >= 1")
    device = str(device_of(args.device))
    backends = args.backends or (
        ("loop", "torch", "triton") if device.startswith("cuda") else ("loop", "torch")
    )
    out = args.out if args.out is not None else default_csv("syncs", device)
    torch.set_num_threads(args.threads)
    load_before = load_average()
    setup = f"`{args.model}` (T={args.T}, batch {args.batch}, {args.size}x{args.size})"
    print(f"{setup} on {device}", flush=True)
    rows = measure(
        args.model, backends=tuple(backends), T=args.T, batch=args.batch, size=args.size,
        lif_channels=args.lif_channels, device=device, seed=args.seed,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    write_csv(out, rows)
    section = markdown(
        rows, read_rows(args.before), args.before, environment(), out,
        (load_before, load_average()), setup,
    )  # fmt: skip
    write_section(args, section_name("syncs", device), section, out)
    return 0
