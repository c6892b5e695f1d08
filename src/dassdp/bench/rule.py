r"""``dassdp bench rule``: the library's dW against the published pairwise formulation.

Both sides start from the same time-major activity ``pre [T, B, C_in]``, ``post [T, B, C_out]``
(bool) and a per-sample gate ``G [B]``, and return ``dW [C_out, C_in]``:

* **library**: :func:`dassdp.plasticity.rule.fired_latency` then
  :func:`dassdp.plasticity.rule.delta_w` (one GEMM over unit states, inner size ``B (T+1)``).
* **pairwise**: :func:`pairwise_delta_w` below, the released code's operations: latency as
  the argmax of the cumulative spike count, fired as ``mean_t > 0``, then the co-firing
  matrix ``lam`` and the Gaussian kernel built as full ``[B, C_out, C_in]`` tensors every
  step, combined elementwise and averaged over the batch. It lives here, outside the
  library's runtime path, as the published baseline.

Per size: median seconds per dW, peak memory and max |difference| (float32 at the size; a
float64 agreement check runs at small sizes). Each side is timed in a fresh subprocess. On the
CPU its peak memory comes from another fresh subprocess that imports torch, builds the inputs,
runs both sides once at a tiny size (lazy initialisation, code pages), resets its peak RSS to
the current RSS, makes one full-size call and reads the peak again: the peak memory is the
growth (:func:`dassdp.bench.harness.peak_rss_kb`: the process's own max RSS, ``VmHWM``).
glibc's mmap threshold is fixed there so that RSS follows the live tensors (see
:func:`run_side_subprocess`). The growth over the peak RSS of a separate idle subprocess
(same steps without the full-size call) is reported as well; it carries the noise of the
file-backed pages (shared libraries) that two processes map differently. On CUDA the peak is
``torch.cuda.max_memory_allocated`` above what was allocated before the first full-size
call. When ``B C_out C_in`` exceeds ``--pairwise-limit`` elements (the stress size by
default) the pairwise side runs over the whole batch in chunks, and the report says so: its
peak is then the chunked peak and its time the whole batch's.
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dassdp.bench import harness as H

HELP = "dW cost: the library's one-GEMM rule vs the published pairwise [B, Cout, Cin] form"

TARGET_SPEEDUP = 100.0  # >= 100x faster ...
TARGET_MEMORY = 100.0  # ... and >= 100x less peak memory, at the sizes marked ``target``
A_PLUS, A_MINUS, SIGMA, CLIP = 1.5e-3, 1.0e-4, 1.0, 1.0  # DESIGN §1 defaults
DEFAULT_PAIRWISE_LIMIT = 1 << 26  # pairwise elements per chunk (256 MiB per float32 copy)


@dataclass(frozen=True)
class RuleSize:
    """One benchmark size: batch ``B``, the site ``W [C_out, C_in]``, and whether the
    100x targets apply to it."""

    name: str
    B: int
    C_out: int
    C_in: int
    target: bool = False


SIZES: dict[str, RuleSize] = {
    s.name: s
    for s in (
        RuleSize("classifier-cifar10", 128, 10, 384),
        RuleSize("classifier-cifar100", 128, 100, 384),
        RuleSize("projection-cifar", 128, 384, 384, target=True),
        RuleSize("classifier-imagenet-l", 16, 1000, 1024, target=True),
        RuleSize("projection-imagenet-l", 16, 1024, 1024, target=True),
        RuleSize("stress", 256, 2048, 2048),
    )
}

# float64 agreement check: (B, C_out, C_in) at small sizes, every latency convention.
CHECK_SHAPES: tuple[tuple[int, int, int], ...] = ((1, 1, 1), (8, 16, 32), (13, 40, 7))


def parse_size(spec: str) -> RuleSize:
    """A preset name (see :data:`SIZES`) or a custom ``B:C_OUTxC_IN`` such as ``8:16x32``."""
    if spec in SIZES:
        return SIZES[spec]
    try:
        b, rest = spec.split(":")
        c_out, c_in = rest.lower().split("x")
        size = RuleSize(spec, int(b), int(c_out), int(c_in))
    except ValueError:
        raise ValueError(
            f"unknown size {spec!r}: use one of {', '.join(SIZES)} or B:C_OUTxC_IN (e.g. 8:16x32)"
        ) from None
    if min(size.B, size.C_out, size.C_in) < 1:
        raise ValueError(f"size {spec!r}: B, C_out and C_in must be >= 1")
    return size


# ----------------------------------------------------------------------------- the two sides
def make_inputs(
    B: int, C_out: int, C_in: int, *, T: int = 4, rate: float = 0.2, seed: int = 0,
    device: Any = "cpu",
) -> tuple[Any, Any, Any]:  # fmt: skip
    """Random activity and gate: ``pre [T, B, C_in]``, ``post [T, B, C_out]`` (bool, each step
    active with probability ``rate``) and ``G [B]`` uniform in ``[0, 2]`` (float32)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    pre = torch.rand(T, B, C_in, generator=gen) < rate
    post = torch.rand(T, B, C_out, generator=gen) < rate
    gate = 2 * torch.rand(B, generator=gen)
    return pre.to(device), post.to(device), gate.to(device)


def library_delta_w(
    pre: Any, post: Any, gate: Any, *, latency: str = "first", silent: int | None = None,
    A_plus: float = A_PLUS, A_minus: float = A_MINUS, sigma: float = SIGMA,
    clip: float | None = CLIP, dtype: Any = None,
) -> Any:  # fmt: skip
    """The library's dW from activity: ``pre [T, B, C_in]``, ``post [T, B, C_out]`` (bool),
    ``gate [B]`` or ``None`` -> ``[C_out, C_in]``."""
    import torch

    from dassdp.plasticity.rule import delta_w, fired_latency

    a_pre = fired_latency(pre, latency, silent)
    a_post = fired_latency(post, latency, silent)
    return delta_w(
        a_pre, a_post, gate, T=pre.shape[0], A_plus=A_plus, A_minus=A_minus, sigma=sigma,
        clip=clip, dtype=dtype or torch.float32,
    )  # fmt: skip


def pairwise_latency(x: Any, latency: str = "first", silent: int | None = None) -> Any:
    """Latency as the released code computes it: the argmax over time of the cumulative spike
    count ``[T, B, C] -> [B, C]`` (long).

    ``argmax`` returns the first maximal index, so on the running count it is the *last*
    active step (``"last"``); on ``count > 0`` it is the *first* (``"first"``). Silent units
    get ``silent`` (``None``: ``T``).
    """
    import torch

    T = x.shape[0]
    count = x.cumsum(dim=0)  # [T, B, C]
    if latency == "last":
        tau = count.argmax(dim=0)
    elif latency == "first":
        tau = (count > 0).to(x.dtype).argmax(dim=0)
    else:
        raise ValueError(f"latency must be 'first' or 'last', got {latency!r}")
    fired = count[-1] > 0
    return torch.where(fired, tau, torch.full_like(tau, T if silent is None else silent))


def pairwise_delta_w(
    pre: Any, post: Any, gate: Any, *, latency: str = "first", silent: int | None = None,
    A_plus: float = A_PLUS, A_minus: float = A_MINUS, sigma: float = SIGMA,
    clip: float | None = CLIP, dtype: Any = None, chunk: int | None = None,
) -> Any:  # fmt: skip
    """The published pairwise dW: ``pre [T, B, C_in]``, ``post [T, B, C_out]`` (bool),
    ``gate [B]`` or ``None`` -> ``[C_out, C_in]``.

    Builds ``lam [B, C_out, C_in]``, the latency difference and the Gaussian kernel as full
    pairwise tensors, then ``mean_b G (A+ lam g - A- (1 - lam) g)`` and the clip. ``chunk``
    runs the batch in slices of that many samples (summed, then divided by ``B``) to bound
    memory; ``None`` is the released form (one pass over the whole batch).
    """
    import torch

    dtype = dtype or torch.float32
    B = pre.shape[1]
    x_pre, x_post = pre.to(dtype), post.to(dtype)  # [T, B, C]
    p = (x_pre.mean(dim=0) > 0).to(dtype)  # [B, C_in] fired (mean over time > 0)
    q = (x_post.mean(dim=0) > 0).to(dtype)  # [B, C_out]
    tau_pre = pairwise_latency(x_pre, latency, silent)  # [B, C_in]
    tau_post = pairwise_latency(x_post, latency, silent)  # [B, C_out]
    G = torch.ones(B, dtype=dtype, device=pre.device) if gate is None else gate.to(dtype)
    step = B if chunk is None else max(1, int(chunk))
    total = None
    for lo in range(0, B, step):
        sl = slice(lo, lo + step)
        lam = q[sl].unsqueeze(2) * p[sl].unsqueeze(1)  # [b, C_out, C_in] co-firing
        dt = tau_post[sl].unsqueeze(2).to(dtype) - tau_pre[sl].unsqueeze(1).to(dtype)
        kernel = torch.exp(-(dt**2) / (2 * sigma**2))  # [b, C_out, C_in]
        ltp = A_plus * lam * kernel
        ltd = A_minus * (1 - lam) * kernel
        part = (G[sl].view(-1, 1, 1) * (ltp - ltd)).sum(dim=0)  # [C_out, C_in]
        total = part if total is None else total + part
    dw = total / B
    return dw.clamp(-clip, clip) if clip is not None else dw


def pairwise_chunk(size: RuleSize, limit: int) -> int | None:
    """Batch chunk for the pairwise side: ``None`` (whole batch) when ``B C_out C_in <=
    limit``, else the largest chunk whose pairwise tensor fits in ``limit`` elements."""
    if size.B * size.C_out * size.C_in <= limit:
        return None
    return max(1, limit // (size.C_out * size.C_in))


def float64_check(T: int = 4, rate: float = 0.3) -> float:
    """Max |library - pairwise| in float64 over :data:`CHECK_SHAPES`, both latency conventions,
    silent latency ``T`` and ``0``, with and without a gate, chunked and not."""
    import torch

    worst = 0.0
    for k, (B, C_out, C_in) in enumerate(CHECK_SHAPES):
        pre, post, gate = make_inputs(B, C_out, C_in, T=T, rate=rate, seed=100 + k)
        for latency in ("first", "last"):
            for silent in (None, 0):
                for g in (gate, None):
                    kw = dict(latency=latency, silent=silent, dtype=torch.float64)
                    ref = pairwise_delta_w(pre, post, g, chunk=1 + B // 3, **kw)
                    ours = library_delta_w(pre, post, g, **kw)
                    worst = max(worst, float((ours - ref).abs().max()))
    return worst


# --------------------------------------------------------------------------- one side, timed
def run_side(spec: dict[str, Any]) -> dict[str, Any]:
    """Time one side at one size in *this* process and report its peak memory.

    ``spec`` keys: ``side`` (``library`` | ``pairwise`` | ``idle``), ``B``, ``C_out``, ``C_in``,
    ``T``, ``rate``, ``seed``, ``latency``, ``reps``, ``warmup``, ``chunk``, ``device``,
    ``threads``, ``save`` (path for the float32 dW, or ``None``).

    Returns ``{"times": [s, ...], "maxrss_before_kb": int, "maxrss_kb": int,
    "cuda_peak_bytes": int | None}``: the peak RSS (:func:`peak_rss_kb`) reset to the current
    RSS just before the first full-size call (inputs built, tiny calls made), and at the end.
    """
    import torch

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    pre, post, gate = make_inputs(
        spec["B"], spec["C_out"], spec["C_in"], T=spec["T"], rate=spec["rate"],
        seed=spec["seed"], device=device,
    )  # fmt: skip
    # Both sides once at a tiny size: lazy initialisation belongs to the baseline.
    tiny = make_inputs(2, 3, 5, T=spec["T"], seed=1, device=device)
    library_delta_w(*tiny, latency=spec["latency"])
    pairwise_delta_w(*tiny, latency=spec["latency"])
    out: dict[str, Any] = {"times": [], "maxrss_kb": 0, "cuda_peak_bytes": None}
    out["maxrss_before_kb"] = H.peak_rss_kb(reset=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    if spec["side"] != "idle":
        if spec["side"] == "library":
            fn = lambda: library_delta_w(pre, post, gate, latency=spec["latency"])  # noqa: E731
        elif spec["side"] == "pairwise":
            fn = lambda: pairwise_delta_w(  # noqa: E731
                pre, post, gate, latency=spec["latency"], chunk=spec["chunk"]
            )
        else:
            raise ValueError(f"side must be library, pairwise or idle, got {spec['side']!r}")
        dw = None
        for i in range(spec["warmup"] + spec["reps"]):
            del dw  # free the previous result before the next call, as a training loop does
            sec, dw = H.timed(fn, device)
            if i >= spec["warmup"]:
                out["times"].append(sec)
        if spec.get("save"):
            torch.save(dw.float().cpu(), spec["save"])
    if device.type == "cuda":
        out["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated(device) - base)
    out["maxrss_kb"] = H.peak_rss_kb()
    return out


def run_side_subprocess(spec: dict[str, Any], *, memory: bool = False) -> dict[str, Any]:
    """:func:`run_side` in a fresh Python process (so its peak RSS is its own).

    ``memory=True`` fixes glibc's mmap threshold at 128 KiB (``MALLOC_MMAP_THRESHOLD_``):
    every tensor buffer above it is mapped on allocation and unmapped on free, so the RSS
    high-water mark follows the live tensors instead of the allocator's adaptive reuse (whose
    leftovers made repeated measurements of the same call differ by ~10 MB). The timing
    workers run with the default allocator.
    """
    env = dict(os.environ)
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    return H.in_fresh_process(H.function("dassdp.bench.rule:run_side"), {"spec": spec}, env=env)


# ------------------------------------------------------------------------------ the benchmark
def bench_size(
    size: RuleSize, *, T: int = 4, rate: float = 0.2, reps: int = 5, warmup: int = 1,
    latency: str = "first", device: str = "cpu", threads: int = 1,
    pairwise_limit: int = DEFAULT_PAIRWISE_LIMIT, pairwise_reps: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Measure both sides at ``size``; returns one result row (see :func:`markdown`).

    CPU peak memory: growth of the peak RSS over one full-size call in a fresh memory worker
    (its RSS just before the call is the baseline); the growth over a separate idle worker's
    peak RSS is reported too (``*_vs_idle``). ``pairwise_reps``: timed calls of
    the pairwise side when it is chunked (default 1, it is slow; no warm-up call then).
    """
    import torch

    chunk = pairwise_chunk(size, pairwise_limit)
    pw_reps, pw_warmup = (reps, warmup) if chunk is None else (pairwise_reps or 1, 0)
    base = {
        "B": size.B, "C_out": size.C_out, "C_in": size.C_in, "T": T, "rate": rate,
        "seed": seed, "latency": latency, "device": device, "threads": threads, "save": None,
    }  # fmt: skip
    timing: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="dassdp-bench-rule-") as tmp:
        for side in ("library", "pairwise"):
            pw = side == "pairwise"
            timing[side] = run_side_subprocess(
                {**base, "side": side, "chunk": chunk if pw else None,
                 "reps": pw_reps if pw else reps, "warmup": pw_warmup if pw else warmup,
                 "save": str(Path(tmp) / f"{side}.pt")}
            )  # fmt: skip
        dws = [torch.load(Path(tmp) / f"{side}.pt") for side in ("library", "pairwise")]
        diff = float((dws[0] - dws[1]).abs().max())
    peak: dict[str, float] = {}
    idle_peak: dict[str, float] = {"library": math.nan, "pairwise": math.nan}
    if device.startswith("cuda"):
        peak = {side: r["cuda_peak_bytes"] / 2**20 for side, r in timing.items()}
    else:  # separate memory workers: fixed malloc mmap threshold, one full-size call each
        kb = {
            side: run_side_subprocess(
                {**base, "side": side, "chunk": chunk if side == "pairwise" else None,
                 "reps": 1, "warmup": 0},
                memory=True,
            )
            for side in ("idle", "library", "pairwise")
        }  # fmt: skip
        for side in ("library", "pairwise"):
            r = kb[side]
            peak[side] = max(0, r["maxrss_kb"] - r["maxrss_before_kb"]) / 1024
            idle_peak[side] = max(0, r["maxrss_kb"] - kb["idle"]["maxrss_kb"]) / 1024

    lib_s = H.median(timing["library"]["times"])
    pw_s = H.median(timing["pairwise"]["times"])
    lib_mb, pw_mb = peak["library"], peak["pairwise"]
    speedup = pw_s / lib_s if lib_s > 0 else math.inf
    mem_ratio = pw_mb / lib_mb if lib_mb > 0 else math.inf
    met = ""
    if size.target:
        met = "yes" if speedup >= TARGET_SPEEDUP and mem_ratio >= TARGET_MEMORY else "no"
    return {
        "size": size.name, "B": size.B, "C_out": size.C_out, "C_in": size.C_in, "T": T,
        "device": device, "library_ms": round(lib_s * 1e3, 4), "pairwise_ms": round(pw_s * 1e3, 2),
        "speedup": round(speedup, 1), "library_peak_mb": round(lib_mb, 2),
        "pairwise_peak_mb": round(pw_mb, 1), "memory_ratio": round(mem_ratio, 1),
        "max_abs_diff_fp32": f"{diff:.3g}",
        "library_peak_mb_vs_idle": round(idle_peak["library"], 2),
        "pairwise_peak_mb_vs_idle": round(idle_peak["pairwise"], 1),
        "pairwise_mode": "whole batch" if chunk is None else f"batch chunks of {chunk}",
        "library_reps": reps, "pairwise_reps": pw_reps,
        "target": "yes" if size.target else "no", "target_met": met,
    }  # fmt: skip


def markdown(
    rows: list[dict[str, Any]], facts: list[str], *, check64: float, latency: str, rate: float
) -> str:
    """The ``## rule`` section body: the module docstring, the facts, the table, notes."""
    lines = [
        *H.describe(__doc__),
        "",
        f"- activity: random spikes, each step active with probability {rate}; per-sample gate "
        f"in [0, 2]; latency `{latency}`; `A+ 1.5e-3, A- 1e-4, sigma 1, clip 1`; time: median "
        "of the timed calls after a warm-up call",
        "- targets (rows marked *target*): >= 100x faster and >= 100x less peak memory",
        f"- float64 agreement (library vs pairwise, shapes {list(CHECK_SHAPES)}, latency first "
        f"and last, silent T and 0, gate and none): max |diff| = {check64:.3g}",
        *facts,
        "",
        "| size | B | C_out x C_in | library ms | pairwise ms | speed-up | library peak MB "
        "| pairwise peak MB | memory ratio | max abs diff (fp32) | pairwise ran as | target met |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in rows:
        met = r["target_met"] or "(no target)"
        lines.append(
            f"| {r['size']} | {r['B']} | {r['C_out']} x {r['C_in']} | {r['library_ms']:.3f} | "
            f"{r['pairwise_ms']:.1f} | {_ratio(r['speedup'])} | {r['library_peak_mb']:.2f} | "
            f"{r['pairwise_peak_mb']:.1f} | {_ratio(r['memory_ratio'])} | "
            f"{r['max_abs_diff_fp32']} | {r['pairwise_mode']} | {met} |"
        )
    floors = [
        f"{r['size']} {r['pairwise_peak_mb'] / (r['C_out'] * r['C_in'] * 4 / 2**20):.0f}x"
        for r in rows
        if r["target_met"]
    ]
    if floors:
        lines += ["", "The library's peak includes the float32 `dW` it returns (`C_out C_in` x 4 "
                  "bytes, which the pairwise side also returns), so no implementation can beat "
                  f"the pairwise peak / output size: {', '.join(floors)}."]  # fmt: skip
    for r in rows:
        if r["pairwise_mode"] != "whole batch":
            n = -(-r["B"] // int(r["pairwise_mode"].rsplit(" ", 1)[1]))
            gib = r["pairwise_peak_mb"] * n / 1024
            lines += ["", f"{r['size']}: the pairwise side ran over the whole batch in {n} "
                      f"chunks ({r['pairwise_mode']}; {r['pairwise_reps']} timed call): its time "
                      "is the whole batch's, measured; its peak is the chunked peak, measured. "
                      f"The unchunked released form would need about {n}x that peak "
                      f"(~{gib:.1f} GiB, extrapolated, not run)."]  # fmt: skip
    return "\n".join(lines)


def _ratio(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:,.1f}x"


# ------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    H.add_options(
        parser,
        sizes=(list(SIZES), f"preset sizes ({', '.join(SIZES)}) or custom B:C_OUTxC_IN",
               {"metavar": "SIZE"}),
        T=(4, "time steps"),
        rate=(0.2, "per-step spike probability"),
        latency=("first", "latency", {"choices": ("first", "last")}),
        reps=(5, "timed calls per side"),
        warmup=(1, "untimed calls first"),
        pairwise_limit=(DEFAULT_PAIRWISE_LIMIT, "max B*C_out*C_in elements of one pairwise "
                        "pass before the batch is chunked (the default chunks the stress size)"),
        pairwise_reps=(1, "timed calls of a chunked pairwise side"),
    )  # fmt: skip
    H.add_run_arguments(parser, "input seed")
    H.add_output_arguments(parser, "rule")


def run(args: argparse.Namespace) -> int:
    import torch

    H.check_positive(args, "T", "reps", "threads", "pairwise_limit", "pairwise_reps")
    if args.warmup < 0 or not 0 < args.rate < 1:
        raise ValueError("--warmup must be >= 0 and --rate in (0, 1)")
    sizes = [parse_size(s) for s in args.sizes]
    device = str(H.device_of(args.device))
    torch.set_num_threads(args.threads)
    load_before = H.load_average()
    check64 = float64_check(args.T)
    print(f"float64 agreement, library vs pairwise: max |diff| = {check64:.3g}", flush=True)
    rows = []
    for size in sizes:
        row = bench_size(
            size, T=args.T, rate=args.rate, latency=args.latency, device=device, reps=args.reps,
            warmup=args.warmup, threads=args.threads, pairwise_limit=args.pairwise_limit,
            pairwise_reps=args.pairwise_reps, seed=args.seed,
        )  # fmt: skip
        print(
            f"{size.name:<22} library {row['library_ms']:9.3f} ms {row['library_peak_mb']:8.2f} MB"
            f"  pairwise {row['pairwise_ms']:10.1f} ms {row['pairwise_peak_mb']:9.1f} MB"
            f"  x{row['speedup']:,.1f} time x{row['memory_ratio']:,.1f} memory"
            f"  diff {row['max_abs_diff_fp32']}  ({row['pairwise_mode']})",
            flush=True,
        )
        rows.append(row)

    def body(facts: list[str]) -> str:
        return markdown(rows, facts, check64=check64, latency=args.latency, rate=args.rate)

    return H.save(args, "rule", rows, body, device=device, load_before=load_before)
