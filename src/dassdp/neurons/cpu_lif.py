"""Multi-step LIF on the CPU as one compiled C loop per direction (the ``"cpu"`` backend of
:func:`dassdp.neurons.functional.lif_multistep`).

The torch backend (:class:`dassdp.neurons.functional._FusedLIF`) runs the fused math as a
few whole-tensor operations per time step; on the CPU each is a pass over memory (about 6
per step forward, 12 backward), and the LIF layers took about 30 % of a
``spikingresformer_cifar`` training step. Here the same math is one loop over blocks of
neurons that runs all ``T`` steps while the block is in cache: forward reads ``X`` and
writes ``H``, ``S`` and the spikes as bytes; backward reads ``H`` and ``gS`` and writes
``gX``.

Exactness: the operations are the torch backend's, in its order, each rounded to the tensor's
dtype (constants rounded to it first, as ATen does with Python numbers; no FMA contraction),
so ``H`` and the spikes are bit-identical to it and the input gradients equal to it within a
few ulps (some ATen kernels fuse a multiply-add; the sigmoid's ``exp`` is libm's). Tests check
every reset / ``decay_input`` / ``detach_reset`` / surrogate combination in fp32 and fp64.

Scope: a CPU ``x`` of dtype fp32 or fp64, a fixed time constant (``inv_tau`` ``None`` or a
number; PLIF's learnable one runs on the torch backend), no returned membrane. Threads: the
neurons are split over ``torch.get_num_threads()`` threads (the C calls release the GIL).

Build: the C source below is compiled once per machine with the system C compiler (``$CC``,
else ``cc`` / ``gcc`` / ``clang``; 1-2 s) into ``$DASSDP_KERNEL_CACHE`` (default
``~/.cache/dassdp/kernels``), named by a hash of the source, flags, compiler and CPU, written
atomically (concurrent DDP ranks are safe). No compiler, or a failed build: :func:`usable` is
false for the process, with one warning, and ``backend="auto"`` runs the torch backend.
``DASSDP_LIF_CPU=0`` switches the backend off for ``auto``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CACHE_ENV",
    "ENV",
    "MIN_NEURONS",
    "CpuLIF",
    "build",
    "disable",
    "large_enough",
    "supported",
    "usable",
]

ENV = "DASSDP_LIF_CPU"  # "0": backend="auto" never picks this backend
CACHE_ENV = "DASSDP_KERNEL_CACHE"
# backend="auto" picks this backend for layers of at least this many neurons per sample and
# time step (x [T, B, ...]: x[0, 0].numel()). Per sample, not per call, so the choice (and
# with it the last bits of the gradients) does not change with the batch size or the number
# of DDP ranks; small layers do not repay the call.
MIN_NEURONS = 4096
_BLOCK = 512  # neurons per block: the C loops keep a block's state in cache
_CHUNK = 1 << 16  # neurons per thread task when several threads run

_SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define BLOCK 512

/* Forward over neurons [n0, n1) of x [T, N]: H, S (0/1 in the dtype) and S as bytes. The
   operations and their order are those of dassdp's torch backend (_FusedLIF.forward). */
#define LIF_FWD(NAME, R)                                                                   \
void NAME(const R* restrict x, R* restrict h, R* restrict s, uint8_t* restrict bits,       \
          int64_t T, int64_t N, int64_t n0, int64_t n1, double k_, double v_th_,           \
          double v_r_, int hard, int decay_input) {                                        \
    const R k = (R)k_, v_th = (R)v_th_, v_r = (R)v_r_;                                     \
    R v[BLOCK];                                                                            \
    for (int64_t b = n0; b < n1; b += BLOCK) {                                             \
        const int64_t m = (n1 - b < BLOCK) ? n1 - b : BLOCK;                               \
        for (int64_t t = 0; t < T; ++t) {                                                  \
            const R* xt = x + t * N + b;                                                   \
            R* ht = h + t * N + b;                                                         \
            R* st = s + t * N + b;                                                         \
            uint8_t* bt = bits + t * N + b;                                                \
            for (int64_t j = 0; j < m; ++j) {                                              \
                R hj;                                                                      \
                if (t == 0 && v_r == (R)0) {                                               \
                    hj = decay_input ? xt[j] * k : xt[j];                                  \
                } else {                                                                   \
                    const R vv = (t == 0) ? (R)0 : v[j];                                   \
                    if (decay_input) {                                                     \
                        R tmp = (v_r != (R)0) ? xt[j] - (vv - v_r) : xt[j] - vv;           \
                        tmp = tmp * k;                                                     \
                        hj = vv + tmp;                                                     \
                    } else {                                                               \
                        const R tmp = (v_r != (R)0) ? (vv - v_r) * k : vv * k;             \
                        hj = (vv - tmp) + xt[j];                                           \
                    }                                                                      \
                }                                                                          \
                const int fired = hj >= v_th;                                              \
                const R sj = fired ? (R)1 : (R)0;                                          \
                v[j] = hard ? (fired ? v_r : hj) : hj - v_th * sj;                         \
                ht[j] = hj;                                                                \
                st[j] = sj;                                                                \
                bt[j] = (uint8_t)fired;                                                    \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}

/* Backward over neurons [n0, n1): gX from H and gS (_FusedLIF.backward's math, op for op).
   surrogate 0 = atan, 1 = sigmoid. Each loop below is branch-free inside, so it vectorises. */
#define LIF_BWD(NAME, R, EXP)                                                              \
void NAME(const R* restrict h, const R* restrict gs, R* restrict gx, int64_t T, int64_t N, \
          int64_t n0, int64_t n1, double k_, double v_th_, double v_r_, int hard,          \
          int decay_input, int detach, int surrogate, double alpha_) {                     \
    const R k = (R)k_, v_th = (R)v_th_, v_r = (R)v_r_, alpha = (R)alpha_;                  \
    const R c_atan = (R)(3.14159265358979323846 / 2 * alpha_), half = (R)(alpha_ / 2);     \
    const R decay = (R)(1 - k_), neg_th = (R)(-v_th_);                                     \
    R gh[BLOCK], sg[BLOCK], c[BLOCK];                                                      \
    for (int64_t b = n0; b < n1; b += BLOCK) {                                             \
        const int64_t m = (n1 - b < BLOCK) ? n1 - b : BLOCK;                               \
        for (int64_t t = T - 1; t >= 0; --t) {                                             \
            const R* restrict ht = h + t * N + b;                                          \
            const R* restrict gst = gs + t * N + b;                                        \
            R* restrict gxt = gx + t * N + b;                                              \
            if (surrogate == 0) {                                                          \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    R q = (ht[j] - v_th) * c_atan;                                         \
                    q = q * q;                                                             \
                    q = q + (R)1;                                                          \
                    q = (R)1 / q;                                                          \
                    sg[j] = q * half;                                                      \
                }                                                                          \
            } else {                                                                       \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    const R z = (ht[j] - v_th) * alpha;                                    \
                    const R sig = (R)1 / ((R)1 + EXP(-z));                                 \
                    const R om = (R)1 - sig;                                               \
                    sg[j] = (sig * alpha) * om;                                            \
                }                                                                          \
            }                                                                              \
            if (t == T - 1) {                                                              \
                for (int64_t j = 0; j < m; ++j) gh[j] = sg[j] * gst[j];                    \
            } else {                                                                       \
                if (detach && hard) {          /* R = 1 - S */                             \
                    for (int64_t j = 0; j < m; ++j)                                        \
                        c[j] = ((ht[j] >= v_th) ? (R)0 : (R)1) * decay;                    \
                } else if (detach) {           /* R = 1 */                                 \
                    for (int64_t j = 0; j < m; ++j) c[j] = decay;                          \
                } else if (hard) {             /* R = 1 - S + (V_r - H) sg */              \
                    for (int64_t j = 0; j < m; ++j) {                                      \
                        R r = (v_r - ht[j]) * sg[j];                                       \
                        r = r + ((ht[j] >= v_th) ? (R)0 : (R)1);                           \
                        c[j] = r * decay;                                                  \
                    }                                                                      \
                } else {                       /* R = 1 - V_th sg */                       \
                    for (int64_t j = 0; j < m; ++j) {                                      \
                        R r = sg[j] * neg_th;                                              \
                        r = r + (R)1;                                                      \
                        c[j] = r * decay;                                                  \
                    }                                                                      \
                }                                                                          \
                for (int64_t j = 0; j < m; ++j) {                                          \
                    const R g = sg[j] * gst[j];                                            \
                    const R p = gh[j] * c[j];                                              \
                    gh[j] = g + p;                                                         \
                }                                                                          \
            }                                                                              \
            if (decay_input) {                                                             \
                for (int64_t j = 0; j < m; ++j) gxt[j] = gh[j] * k;                        \
            } else {                                                                       \
                for (int64_t j = 0; j < m; ++j) gxt[j] = gh[j];                            \
            }                                                                              \
        }                                                                                  \
    }                                                                                      \
}

LIF_FWD(lif_fwd_f32, float)
LIF_FWD(lif_fwd_f64, double)
LIF_BWD(lif_bwd_f32, float, expf)
LIF_BWD(lif_bwd_f64, double, exp)
"""
# -ffp-contract=off: no FMA (the torch backend rounds every product); no -ffast-math.
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared"]

_LOCK = threading.Lock()
_LIB: list[Any] = []  # the loaded library, once built
_FAILED: list[str] = []  # why the backend is off for the process
_POOL: list[tuple[int, ThreadPoolExecutor]] = []  # (threads, pool)


def usable() -> bool:
    """Whether ``backend="auto"`` may pick this backend: not switched off (``ENV=0``) and no
    build failure in this process (building on first use)."""
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if _FAILED:
        return False
    try:
        build()
    except RuntimeError as err:
        disable(str(err))
        return False
    return True


def disable(reason: str) -> None:
    """Turn the backend off for ``auto`` in this process, with one warning naming ``reason``."""
    if not _FAILED:
        _FAILED.append(reason)
        warnings.warn(
            f"dassdp: the compiled CPU LIF is off for this process ({reason}); the torch "
            f"backend runs instead (set {ENV}=0 to skip the attempt)",
            RuntimeWarning,
            stacklevel=3,
        )


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        path = shutil.which(cand) if cand else None
        if path:
            return path
    return None


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags"))][:2]
    return "\n".join(keep)


def cache_dir() -> Path:
    """Where built kernels live: ``$DASSDP_KERNEL_CACHE`` or ``~/.cache/dassdp/kernels``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dassdp" / "kernels"


def build() -> Any:
    """The loaded kernel library, compiled on first use (module docstring). A missing
    compiler or a failed build is a ``RuntimeError`` saying which."""
    with _LOCK:
        if _LIB:
            return _LIB[0]
        cc = _compiler()
        if cc is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc or clang)")
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
        key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, version, _cpu_id()]).encode())
        target = cache_dir() / f"lif_{key.hexdigest()[:20]}.so"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                src, out = Path(tmp) / "lif.c", Path(tmp) / "lif.so"
                src.write_text(_SOURCE)
                done = subprocess.run(
                    [cc, *_FLAGS, str(src), "-o", str(out), "-lm"], capture_output=True, text=True
                )
                if done.returncode != 0:
                    tail = done.stderr.strip().splitlines()[-3:]
                    raise RuntimeError(f"building the CPU LIF kernels with {cc} failed: {tail}")
                os.replace(out, target)  # atomic: a concurrent build writes the same file
        try:
            lib = ctypes.CDLL(str(target))
        except OSError as err:
            raise RuntimeError(f"loading {target} failed: {err}") from None
        i64, dbl, ci, vp = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p
        for dt in ("f32", "f64"):
            fwd, bwd = getattr(lib, f"lif_fwd_{dt}"), getattr(lib, f"lif_bwd_{dt}")
            fwd.restype = bwd.restype = None
            fwd.argtypes = [vp, vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl, ci, ci]
            bwd.argtypes = [vp, vp, vp, i64, i64, i64, i64, dbl, dbl, dbl, ci, ci, ci, ci, dbl]
        _LIB.append(lib)
        return lib


def _run(fn: Any, n: int, args: tuple[Any, ...], tail: tuple[Any, ...]) -> None:
    """``fn(*args, n0, n1, *tail)`` over neurons ``[0, n)``, split over torch's threads."""
    threads = max(1, torch.get_num_threads())
    if threads == 1 or n < 2 * _CHUNK:
        fn(*args, 0, n, *tail)
        return
    if not _POOL or _POOL[0][0] != threads:
        pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dassdp-lif")
        _POOL[:] = [(threads, pool)]
    pool = _POOL[0][1]
    step = max(_CHUNK, -(-n // threads) // _BLOCK * _BLOCK)
    jobs = [pool.submit(fn, *args, a, min(a + step, n), *tail) for a in range(0, n, step)]
    for job in jobs:
        job.result()


def _as_2d(t: Tensor) -> Tensor:
    return t.contiguous().view(t.shape[0], -1)


def _reset(params: Any) -> tuple[float, int]:
    """The kernels' ``(v_r, hard)``: the reset value (0 for a soft reset) and 1 for a hard one."""
    return (0.0, 0) if params.v_reset is None else (params.v_reset, 1)


class CpuLIF(torch.autograd.Function):
    """Forward and backward through the C kernels; saves only ``H``. The spikes come out as
    the dtype and, attached for :func:`dassdp.neurons.spike_saving`, as ``bool``."""

    @staticmethod
    def forward(ctx, x: Tensor, k: float, params: Any) -> Tensor:  # type: ignore[override]
        from dassdp.neurons.saving import attach_spike_bits

        lib = build()
        x2 = _as_2d(x)
        T, n = x2.shape
        h = torch.empty_like(x2)
        # The spikes own their memory in x's shape (contiguous), so the neuron module can
        # mark them and the bytes can be attached (neither works on a view).
        s = torch.empty(x.shape, dtype=x.dtype)
        bits = torch.empty(x.shape, dtype=torch.uint8)
        fn = lib.lif_fwd_f32 if x.dtype == torch.float32 else lib.lif_fwd_f64
        _run(
            fn,
            n,
            (x2.data_ptr(), h.data_ptr(), s.data_ptr(), bits.data_ptr(), T, n),
            (k, params.v_threshold, *_reset(params), int(params.decay_input)),
        )
        ctx.save_for_backward(h)
        ctx.k, ctx.params = k, params
        attach_spike_bits(s, bits.view(torch.bool))
        return s

    @staticmethod
    @once_differentiable
    def backward(ctx, g_s: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        from dassdp.neurons.surrogate import get_surrogate

        (h,) = ctx.saved_tensors
        p = ctx.params
        alpha = float(get_surrogate(p.surrogate)[1] if p.alpha is None else p.alpha)
        lib = build()
        g2 = _as_2d(g_s).to(h.dtype)
        T, n = h.shape
        gx = torch.empty_like(h)
        fn = lib.lif_bwd_f32 if h.dtype == torch.float32 else lib.lif_bwd_f64
        _run(
            fn, n, (h.data_ptr(), g2.data_ptr(), gx.data_ptr(), T, n),
            (ctx.k, p.v_threshold, *_reset(p), int(p.decay_input), int(p.detach_reset),
             0 if p.surrogate == "atan" else 1, alpha),
        )  # fmt: skip
        return gx.view(g_s.shape), None, None


def large_enough(x: Tensor) -> bool:
    """Whether ``x`` ``[T, B, ...]`` has at least :data:`MIN_NEURONS` neurons per sample."""
    if x.numel() == 0:
        return False
    per_sample = x[0, 0].numel() if x.dim() >= 2 else x[0].numel()
    return per_sample >= MIN_NEURONS


def supported(x: Tensor, inv_tau: Tensor | float | None, return_membrane: bool) -> bool:
    """Whether this backend handles the call (the module docstring's scope)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and not isinstance(inv_tau, Tensor)
        and not return_membrane
        and x.dim() >= 1
        and x.numel() > 0
        and not torch.compiler.is_compiling()
    )
