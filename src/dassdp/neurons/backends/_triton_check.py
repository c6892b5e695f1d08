"""Triton's self-check: before the Triton LIF runs on a (device, dtype), it must agree there with
the torch backend, forward and backward. Run once per (device, dtype) and process, on first
use, with the parameters of the first layer that asks; the result is cached.

What runs: ``T = 6`` steps of ``N = 2 * 1024 + 45`` neurons (two full programs of the largest
block and a masked tail), ``x = 1.5 * randn`` with a quarter of the neurons exactly on the
threshold at ``t = 0``, gradients ``randn``; once with the fixed ``k = 1 / tau`` (LIF) and once
with a learnable one-element ``k = 0.4`` (PLIF: ``k`` read through its pointer, its gradient
summed over the programs). For fp16 / bf16 the fp32 check on the device must pass first, and
the reference runs in fp32 on the same (exactly upcast) input: what the kernels compute in
their fp32 registers.

It passes when

* the spikes equal the reference's exactly (the same operations in the same order, no FMA);
* ``|gX - gX_ref| <= tol * max|gX_ref|`` and ``|gk - gk_ref| <= tol * Σ|gH dH/dk|`` (the sum
  of the absolute terms: a different summation order, tree on a GPU and sequential in the
  interpreter, moves the result by at most a few ``ε`` of that sum, however much the terms
  cancel), with ``tol = 64 T ε`` for fp32 / fp64 (``ε`` of the compute dtype). The two
  implementations order a few multiply-adds of each step differently, a few roundings per
  step that the recurrence carries over ``T`` steps: about ``8 T ε``; 64 leaves 8x margin and
  is still five orders of magnitude below the ``O(1)`` error of a wrong kernel. fp16 / bf16
  add ``2 (π/2) α ε_in max(1, |V_th|) / min(k, 1) + ε_in`` (``ε_in`` of the input format): the
  backward reads ``H`` rounded to it, which near the threshold, where the surrogate is
  largest, moves ``H`` by up to ``ε_in |V_th|``; the surrogate's relative slope is at most
  ``(π/2) α``; the recurrence adds the steps' errors with weights ``(1 - k)^j`` (sum
  ``1 / k``); ``gX`` is rounded to the input format once more; 2 is the margin.

Anything raised while compiling or launching fails the check, with its first line as the
reason. The check runs with autograd on, autocast off, the caller's dispatch modes (e.g.
``torch.compile``'s fake tensors, operation counters) and CUDA sync-debug mode out of the way,
on the given device, with its own random generator (the global RNG is not touched).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from dassdp.neurons.backends.torch_fused import lif_multistep_fused
from dassdp.neurons.lif import LIFParams
from dassdp.neurons.surrogate import get_surrogate

__all__ = ["check", "tolerance"]

# run(x, k_tensor or None, k, params) -> spikes: the Triton LIF as it runs, with autograd
Runner = Callable[[Tensor, Tensor | None, float, LIFParams], Tensor]

_T, _N = 6, 2 * 1024 + 45
_K_LEARNED = 0.4
_HALF = (torch.float16, torch.bfloat16)


def tolerance(dtype: torch.dtype, params: LIFParams, k: float) -> float:
    """The check's relative gradient tolerance for inputs of ``dtype`` (module docstring)."""
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    tol = 64 * _T * torch.finfo(compute).eps
    if dtype in _HALF:
        alpha = float(get_surrogate(params.surrogate)[1] if params.alpha is None else params.alpha)
        eps = torch.finfo(dtype).eps
        tol += 2 * (math.pi / 2) * alpha * eps * max(1.0, abs(params.v_threshold)) / min(k, 1.0)
        tol += eps
    return tol


def check(device: torch.device, dtype: torch.dtype, params: LIFParams, run: Runner) -> str | None:
    """Why ``run`` (the Triton LIF) disagrees with the torch backend on ``(device, dtype)``
    (module docstring), or ``None``. The caller runs it under the device guard, caches the
    answer and, for fp16 / bf16, checks fp32 first."""
    try:
        with _isolated(device):
            for learn_k in (False, True):
                why = _compare(device, dtype, params, learn_k, run)
                if why is not None:
                    return why
    except Exception as err:  # a compile or launch failure of any kind fails the check
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    return None


@contextlib.contextmanager
def _isolated(device: torch.device) -> Iterator[None]:
    from torch.utils._python_dispatch import _disable_current_modes

    sync = torch.cuda.get_sync_debug_mode() if device.type == "cuda" else 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(_disable_current_modes())
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.enable_grad())
        stack.enter_context(torch.autocast(device.type, enabled=False))
        if sync:
            torch.cuda.set_sync_debug_mode(0)
        try:
            yield
        finally:
            if sync:
                torch.cuda.set_sync_debug_mode(sync)


def _input(params: LIFParams, k: float, gen: torch.Generator) -> Tensor:
    """``1.5 * randn`` ``[T, N]`` (float64) with a quarter of the neurons on ``V_th`` at t=0."""
    x = 1.5 * torch.randn(_T, _N, generator=gen, dtype=torch.float64)
    v_r = 0.0 if params.v_reset is None else params.v_reset
    x0 = params.v_threshold / k - v_r if params.decay_input else params.v_threshold - v_r * k
    x[0][torch.rand(_N, generator=gen) < 0.25] = x0
    return x


def _grads(
    fn: Callable[[Tensor, Tensor | None], Tensor], x: Tensor, k: Tensor | None, g: Tensor
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(spikes, gX, gk)`` of ``fn(x, k) -> spikes`` for incoming gradient ``g``."""
    xi = x.detach().clone().requires_grad_(True)
    ki = None if k is None else k.detach().clone().requires_grad_(True)
    s = fn(xi, ki)
    leaves = [xi] if ki is None else [xi, ki]
    grads = torch.autograd.grad(s, leaves, g)
    return s.detach(), grads[0], grads[1] if ki is not None else None


def _compare(
    device: torch.device, dtype: torch.dtype, params: LIFParams, learn_k: bool, run: Runner
) -> str | None:
    """Why the Triton LIF disagrees with the torch backend on one case, or ``None``."""
    gen = torch.Generator().manual_seed(0x5EED + learn_k)
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    k = _K_LEARNED if learn_k else 1.0 / params.tau
    k_t = torch.tensor(k, dtype=compute, device=device) if learn_k else None
    x = _input(params, k, gen).to(dtype).to(device)
    g = torch.randn(_T, _N, generator=gen, dtype=torch.float64).to(dtype).to(device)
    s, gx, gk = _grads(lambda xi, ki: run(xi, ki, k, params), x, k_t, g)
    membrane: list[Tensor] = []

    def reference(xi: Tensor, ki: Tensor | None) -> Tensor:
        s_ref, v_ref = lif_multistep_fused(xi, params, ki, return_membrane=True)
        membrane.append(v_ref.detach())
        return s_ref

    x_ref, g_ref = x.to(compute), g.to(compute)
    s_ref, gx_ref, gk_ref = _grads(reference, x_ref, k_t, g_ref)
    path = "PLIF (learnable tau)" if learn_k else "LIF"
    if not torch.equal(s.to(compute), s_ref):
        wrong = int((s.to(compute) != s_ref).sum())
        return f"{wrong} of {s.numel()} spikes differ from the torch backend's ({path})"
    tol = tolerance(dtype, params, k)
    err = float((gx.to(compute) - gx_ref).abs().max())
    scale = float(gx_ref.abs().max()) or 1.0
    if not err <= tol * scale:
        rel = err / scale
        return f"input gradients differ by {rel:.2e} of their largest (allowed {tol:.1e}, {path})"
    if gk is not None and gk_ref is not None:
        terms = _abs_terms(x_ref, membrane[0], gx_ref, k, params)
        err = abs(float(gk) - float(gk_ref))
        if not err <= tol * terms:
            return f"the tau gradient differs by {err:.3e} (allowed {tol * terms:.3e}, {path})"
    return None


def _abs_terms(x: Tensor, v: Tensor, gx: Tensor, k: float, params: LIFParams) -> float:
    """``Σ |gH dH/dk|`` of the reference: ``gH`` from ``gX``, ``V[t-1]`` from the membranes."""
    v_prev = torch.zeros_like(v)
    v_prev[1:] = v[:-1]
    v_r = 0.0 if params.v_reset is None else params.v_reset
    dh_dk = x - (v_prev - v_r) if params.decay_input else v_r - v_prev
    g_h = gx / k if params.decay_input else gx
    return float((g_h.double() * dh_dk.double()).abs().sum())
