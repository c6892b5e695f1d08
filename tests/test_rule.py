"""The rule's pure functions: hand-computed constants and parity with the naive oracle."""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dassdp.plasticity.rule import (
    FACTOR_BUDGET,
    Activity,
    delta_w,
    fired_latency,
    first_last_active,
    kernel_table,
    synchrony,
)
from oracle import naive_dw, naive_latency, naive_synchrony


def spikes_at(T: int, times: list[int]) -> torch.Tensor:
    s = torch.zeros(T, 1, 1, dtype=torch.bool)
    s[times, 0, 0] = True
    return s


def test_latency_first_last_and_silent():
    s = spikes_at(5, [1, 3])
    assert fired_latency(s, "first").latency.item() == 1
    assert fired_latency(s, "last").latency.item() == 3
    silent = spikes_at(5, [])
    act = fired_latency(silent, "first")
    assert act.latency.item() == 5 and not act.fired.item()
    assert fired_latency(silent, "last", silent=0).latency.item() == 0
    assert fired_latency(s, "first").fired.item()


def test_kernel_table_values():
    K = kernel_table(2, 1.0, dtype=torch.float64)
    expected = torch.tensor(
        [
            [1, math.exp(-0.5), math.exp(-2)],
            [math.exp(-0.5), 1, math.exp(-0.5)],
            [math.exp(-2), math.exp(-0.5), 1],
        ],
        dtype=torch.float64,
    )
    torch.testing.assert_close(K, expected, rtol=0, atol=1e-15)
    assert kernel_table(3, 2.0, dtype=torch.float64)[0, 3].item() == pytest.approx(math.exp(-9 / 8))
    assert torch.equal(kernel_table(3, float("inf")), torch.ones(4, 4))


def hand_site():
    # T=2; pre units spike at t=0, t=1, never; post units spike at t=0, never.
    pre = fired_latency(torch.tensor([[[1, 0, 0]], [[0, 1, 0]]], dtype=torch.bool))
    post = fired_latency(torch.tensor([[[1, 0]], [[0, 0]]], dtype=torch.bool))
    return pre, post


def test_dw_of_a_2x3_site_by_hand():
    pre, post = hand_site()
    assert pre.latency.tolist() == [[0, 1, 2]] and post.latency.tolist() == [[0, 2]]
    e5, e2 = math.exp(-0.5), math.exp(-2)
    # lam = [[1,1,0],[0,0,0]]; dW = g * (A+ lam - A- (1 - lam)), A+ = 2, A- = 1
    expected = torch.tensor([[2.0, 2 * e5, -e2], [-e2, -e5, -1.0]], dtype=torch.float64)
    kw = dict(T=2, A_plus=2.0, A_minus=1.0, sigma=1.0, dtype=torch.float64)
    torch.testing.assert_close(delta_w(pre, post, None, **kw), expected, rtol=0, atol=1e-15)
    clipped = delta_w(pre, post, None, clip=1.5, **kw)
    torch.testing.assert_close(clipped, expected.clamp(-1.5, 1.5), rtol=0, atol=1e-15)
    gated = delta_w(pre, post, torch.tensor([0.5]), **kw)
    torch.testing.assert_close(gated, expected / 2, rtol=0, atol=1e-15)


def random_activity(T, B, C, rate, gen):
    return torch.rand(T, B, C, generator=gen) < rate


CASES = [
    (T, B, c_in, c_out, latency, gated, rate)
    for T, (B, c_in, c_out) in zip(
        [1, 2, 4, 10, 4, 2],
        [(3, 5, 7), (8, 16, 4), (16, 33, 10), (4, 12, 12), (1, 1, 1), (32, 64, 48)],
    )
    for latency in ("first", "last")
    for gated in (False, True)
    for rate in (0.0, 0.15, 0.6, 1.0)
]


@pytest.mark.parametrize(("T", "B", "c_in", "c_out", "latency", "gated", "rate"), CASES)
def test_factorised_dw_matches_naive_oracle_float64(T, B, c_in, c_out, latency, gated, rate):
    gen = torch.Generator().manual_seed(T * 1000 + B + c_in)
    s_pre = random_activity(T, B, c_in, rate, gen)
    s_post = random_activity(T, B, c_out, rate * 0.8 if rate < 1 else 1.0, gen)
    G = torch.rand(B, generator=gen, dtype=torch.float64) * 2 if gated else None
    pre, post = fired_latency(s_pre, latency), fired_latency(s_post, latency)
    assert torch.equal(pre.latency, naive_latency(s_pre, latency))
    assert torch.equal(post.latency, naive_latency(s_post, latency))
    kw = dict(A_plus=1.5e-3, A_minus=1e-4, sigma=1.0)
    fast = delta_w(pre, post, G, T=T, dtype=torch.float64, **kw)
    slow = naive_dw(pre.fired, post.fired, pre.latency, post.latency, G, **kw)
    assert (fast - slow).abs().max().item() <= 1e-12
    fast32 = delta_w(pre, post, G, T=T, dtype=torch.float32, **kw)
    assert fast32.dtype == torch.float32
    scale = slow.abs().max().item() or 1.0
    assert (fast32.double() - slow).abs().max().item() <= 1e-6 * scale


@pytest.mark.parametrize("sigma", [0.3, 2.5, float("inf")])
def test_parity_with_independent_fired_indicator_and_sigma(sigma):
    # The compat preset's fired indicator need not agree with the latency (mean-over-time rule).
    gen = torch.Generator().manual_seed(7)
    B, c_in, c_out, T = 9, 11, 6, 4
    pre = Activity(
        torch.rand(B, c_in, generator=gen) < 0.5, torch.randint(0, T + 1, (B, c_in), generator=gen)
    )
    post = Activity(
        torch.rand(B, c_out, generator=gen) < 0.5,
        torch.randint(0, T + 1, (B, c_out), generator=gen),
    )
    G = torch.rand(B, generator=gen, dtype=torch.float64)
    kw = dict(A_plus=2e-3, A_minus=5e-4, sigma=sigma, clip=1e-3)
    fast = delta_w(pre, post, G, T=T, dtype=torch.float64, **kw)
    slow = naive_dw(pre.fired, post.fired, pre.latency, post.latency, G, **kw)
    assert (fast - slow).abs().max().item() <= 1e-12


def test_synchrony_is_mean_of_pairwise_cofiring():
    gen = torch.Generator().manual_seed(3)
    p, q = torch.rand(6, 20, generator=gen) < 0.3, torch.rand(6, 7, generator=gen) < 0.6
    torch.testing.assert_close(
        synchrony(p, q, torch.float64), naive_synchrony(p, q), rtol=0, atol=1e-15
    )


class MaxNumel(TorchDispatchMode):
    def __init__(self, skip: int | None = None):
        super().__init__()
        self.max_numel, self.skip = 0, skip  # skip: the output's size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else [out]:
            if isinstance(t, torch.Tensor) and t.numel() != self.skip:
                self.max_numel = max(self.max_numel, t.numel())
        return out


def test_no_pairwise_tensor_is_materialised():
    B, c_in, c_out, T = 64, 128, 96, 4
    gen = torch.Generator().manual_seed(0)
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    with MaxNumel() as mode:
        delta_w(pre, post, torch.rand(B), T=T, A_plus=1.0, A_minus=1.0, sigma=1.0)
    assert mode.max_numel <= 2 * B * (T + 1) * max(c_in, c_out)
    assert mode.max_numel < B * c_out * c_in / 4


@pytest.mark.parametrize("T", [1, 4, 300])  # 300: past the uint8 step weights
def test_latencies_match_the_oracle_for_any_T(T):
    gen = torch.Generator().manual_seed(T)
    s = torch.rand(T, 5, 7, generator=gen) < 2.0 / T
    s[:, 0, 0] = False  # one silent unit at least
    for mode in ("first", "last"):
        for silent in (None, 0):
            act = fired_latency(s, mode, silent)
            assert act.latency.dtype == torch.int32
            assert torch.equal(act.latency, naive_latency(s, mode, silent))
            assert torch.equal(act.fired, s.any(0))
    fired, first, last = first_last_active(s)
    assert torch.equal(fired, s.any(0))
    assert torch.equal(first, torch.where(fired, naive_latency(s, "first"), 0))
    assert torch.equal(last, torch.where(fired, naive_latency(s, "last"), 0))
    # a non-bool activity is read as != 0
    assert torch.equal(fired_latency(s.float() * 0.5).latency, fired_latency(s).latency)


@pytest.mark.parametrize("chunk", [1, 3, 64, None])
def test_dw_is_the_same_for_any_batch_chunk(chunk):
    gen = torch.Generator().manual_seed(11)
    B, c_in, c_out, T = 20, 13, 9, 3
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    G = torch.rand(B, generator=gen, dtype=torch.float64)
    kw = dict(A_plus=1.5e-3, A_minus=1e-4, sigma=1.0)
    fast = delta_w(pre, post, G, T=T, dtype=torch.float64, chunk=chunk, **kw)
    slow = naive_dw(pre.fired, post.fired, pre.latency, post.latency, G, **kw)
    assert (fast - slow).abs().max().item() <= 1e-15


class GemmInner(TorchDispatchMode):
    """Sums the inner size of every matrix product (the rule's FLOPs are C_out C_in x that)."""

    def __init__(self):
        super().__init__()
        self.inner = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.addmm.default, torch.ops.aten.addmm_.default):
            self.inner += args[1].shape[1]
        elif func in (torch.ops.aten.mm.default, torch.ops.aten.bmm.default):
            self.inner += args[0].shape[-1]
        return func(*args, **(kwargs or {}))


def test_one_gemm_with_inner_size_B_times_the_states_that_occur():
    gen = torch.Generator().manual_seed(5)
    B, c_in, c_out, T = 24, 40, 30, 4
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    kw = dict(T=T, A_plus=1.0, A_minus=1.0, sigma=1.0)
    with GemmInner() as mode:
        delta_w(pre, post, None, **kw)
    assert mode.inner == B * (T + 1)  # fired <=> latency < T: T + 1 states
    only_early = Activity(post.fired, torch.where(post.fired, 0, T))  # two states occur
    with GemmInner() as mode:
        delta_w(pre, only_early, None, **kw)
    assert mode.inner == B * 2
    unrelated = Activity(  # fired independent of latency: up to 2 (T + 1) states
        torch.rand(B, c_out, generator=gen) < 0.5,
        torch.randint(0, T + 1, (B, c_out), generator=gen),
    )
    with GemmInner() as mode:
        delta_w(pre, unrelated, None, **kw)
    assert mode.inner == B * 2 * (T + 1)


def test_factors_stay_within_the_budget():
    B, c_in, c_out, T = 256, 128, 96, 4  # unchunked factors: B (T+1) c_in = 163840 elements
    gen = torch.Generator().manual_seed(0)
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    with MaxNumel(skip=c_out * c_in) as mode:
        delta_w(pre, post, torch.rand(B), T=T, A_plus=1.0, A_minus=1.0, sigma=1.0)
    assert B * (T + 1) * c_in > FACTOR_BUDGET // 4
    assert mode.max_numel <= FACTOR_BUDGET // 4


def test_bad_inputs_are_named():
    pre, post = hand_site()
    with pytest.raises(ValueError, match="latency must be one of"):
        fired_latency(torch.zeros(2, 1, 3, dtype=torch.bool), "middle")
    with pytest.raises(ValueError, match=r"must be \[T, B, C\]"):
        fired_latency(torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"T >= 1"):
        fired_latency(torch.zeros(0, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):  # T mismatch: latencies up to 2
        delta_w(pre, post, None, T=1, A_plus=1, A_minus=1, sigma=1)
    with pytest.raises(ValueError, match="batch sizes differ"):
        delta_w(
            pre,
            Activity(post.fired.repeat(2, 1), post.latency.repeat(2, 1)),
            None,
            T=2,
            A_plus=1,
            A_minus=1,
            sigma=1,
        )
    with pytest.raises(ValueError, match="sigma must be > 0"):
        kernel_table(3, 0.0)
    with pytest.raises(ValueError, match="gate must have shape"):
        delta_w(pre, post, torch.ones(3), T=2, A_plus=1, A_minus=1, sigma=1)
    with pytest.raises(ValueError, match="chunk must be >= 1"):
        delta_w(pre, post, None, T=2, A_plus=1, A_minus=1, sigma=1, chunk=0)


@pytest.mark.parametrize("silent", [None, 0, 2])
@pytest.mark.parametrize("latency", ["first", "last"])
def test_every_choice_of_post_states_gives_the_oracle(silent, latency):
    gen = torch.Generator().manual_seed(3)
    B, c_in, c_out, T = 17, 11, 7, 3
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen), latency, silent)
    post = fired_latency(random_activity(T, B, c_out, 0.2, gen), latency, silent)
    G = torch.rand(B, generator=gen, dtype=torch.float64) * 2
    kw = dict(A_plus=1.5e-3, A_minus=1e-4, sigma=1.0)
    slow = naive_dw(pre.fired, post.fired, pre.latency, post.latency, G, **kw)
    for states in ("auto", "occurring", "all", "spiked"):
        fast = delta_w(
            pre,
            post,
            G,
            T=T,
            dtype=torch.float64,
            chunk=5,
            post_states=states,
            silent_post=silent,
            **kw,
        )
        assert (fast - slow).abs().max().item() <= 1e-15, states


def test_fixed_post_states_set_the_gemm_size_without_looking_at_the_data():
    gen = torch.Generator().manual_seed(5)
    B, c_in, c_out, T = 24, 40, 30, 4
    pre = fired_latency(random_activity(T, B, c_in, 0.3, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    only_early = Activity(post.fired, torch.where(post.fired, 0, T))  # two states occur
    kw = dict(T=T, A_plus=1.0, A_minus=1.0, sigma=1.0, check=False)
    for states, inner in (("all", 2 * (T + 1)), ("spiked", T + 1), ("occurring", 2)):
        with GemmInner() as mode:
            delta_w(pre, only_early, None, post_states=states, **kw)
        assert mode.inner == B * inner, states


class HostReads(TorchDispatchMode):
    """Counts ``.item()``-like reads and boolean-mask selections."""

    OPS = (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.lift_fresh.default)

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.n += func in self.OPS
        return func(*args, **(kwargs or {}))


def test_fixed_states_without_checks_read_nothing_back():
    gen = torch.Generator().manual_seed(2)
    pre = fired_latency(random_activity(3, 6, 5, 0.3, gen))
    post = fired_latency(random_activity(3, 6, 4, 0.3, gen))
    kw = dict(T=3, A_plus=1.0, A_minus=0.5, sigma=1.0)
    for states in ("all", "spiked"):
        with HostReads() as mode:
            delta_w(pre, post, None, post_states=states, check=False, **kw)
        assert mode.n == 0, states
        with HostReads() as mode:
            delta_w(pre, post, None, post_states=states, **kw)
        assert mode.n > 0, states  # the range checks read min/max back


def test_post_states_errors_are_named():
    pre, post = hand_site()
    kw = dict(T=2, A_plus=1, A_minus=1, sigma=1)
    with pytest.raises(ValueError, match="post_states must be one of"):
        delta_w(pre, post, None, post_states="some", **kw)
    shuffled = Activity(post.fired, post.latency.flip(1))  # fired unit now has latency T
    with pytest.raises(ValueError, match="post_states='spiked' needs fired post units"):
        delta_w(pre, shuffled, None, post_states="spiked", **kw)
    with pytest.raises(ValueError, match=r"silent latency must be in 0\.\.T"):
        delta_w(pre, post, None, post_states="spiked", silent_post=5, **kw)
    # unchecked, an out-of-range latency is not looked for (the learner's default)
    bad = Activity(post.fired, post.latency + 1)
    delta_w(pre, bad, None, post_states="all", check=False, **kw)
    with pytest.raises(ValueError, match="out of range"):
        delta_w(pre, bad, None, post_states="all", **kw)


def naive_dw_dsigma(pre, post, G, *, A_plus, A_minus, sigma):
    """d/dsigma of the oracle's dW, written out: g (tau_post - tau_pre)^2 / sigma^3."""
    p, q = pre.fired.double(), post.fired.double()
    lam = q[:, :, None] * p[:, None, :]
    diff2 = (post.latency[:, :, None] - pre.latency[:, None, :]).double() ** 2
    dg = torch.exp(-diff2 / (2 * sigma**2)) * diff2 / sigma**3
    G = torch.ones(p.shape[0], dtype=torch.float64) if G is None else G.double()
    return (G[:, None, None] * dg * (A_plus * lam - A_minus * (1 - lam))).mean(0)


@pytest.mark.parametrize("states", ["auto", "occurring", "all", "spiked"])
@pytest.mark.parametrize("sigma", [0.4, 1.0, 3.0])
def test_sigma_grad_returns_dw_and_its_derivative_in_one_pass(states, sigma):
    gen = torch.Generator().manual_seed(11)
    B, c_in, c_out, T = 13, 9, 6, 4
    pre = fired_latency(random_activity(T, B, c_in, 0.4, gen))
    post = fired_latency(random_activity(T, B, c_out, 0.3, gen))
    G = torch.rand(B, generator=gen, dtype=torch.float64) * 2
    kw = dict(T=T, A_plus=1.5e-3, A_minus=1e-4, dtype=torch.float64, post_states=states)
    with GemmInner() as mode:
        sig = torch.tensor(sigma, dtype=torch.float64)
        both = delta_w(pre, post, G, sigma=sig, chunk=4, sigma_grad=True, **kw)
    assert both.shape == (2, c_out, c_in) and both.is_contiguous()
    plain = delta_w(pre, post, G, sigma=sigma, **kw)
    assert (both[0] - plain).abs().max().item() <= 1e-15
    slow = naive_dw_dsigma(pre, post, G, A_plus=1.5e-3, A_minus=1e-4, sigma=sigma)
    assert (both[1] - slow).abs().max().item() <= 1e-15
    eps = 1e-6 * sigma  # and it is the derivative of dW: a central difference agrees
    up, down = (delta_w(pre, post, G, sigma=sigma + e, **kw) for e in (eps, -eps))
    fd = (up - down) / (2 * eps)
    torch.testing.assert_close(both[1], fd, rtol=1e-6, atol=1e-12)
    one = {"auto": T + 1, "occurring": T + 1, "all": 2 * (T + 1), "spiked": T + 1}[states]
    assert mode.inner == B * one  # one GEMM pass (chunked), not two


def test_sigma_grad_is_float32_too_and_refuses_a_clip():
    gen = torch.Generator().manual_seed(4)
    pre = fired_latency(random_activity(3, 5, 4, 0.5, gen))
    post = fired_latency(random_activity(3, 5, 3, 0.5, gen))
    kw = dict(T=3, A_plus=1.0, A_minus=0.5)
    both = delta_w(pre, post, None, sigma=torch.tensor(1.5), sigma_grad=True, **kw)
    assert both.dtype == torch.float32
    ref = delta_w(pre, post, None, sigma=1.5, dtype=torch.float64, sigma_grad=True, **kw)
    torch.testing.assert_close(both.double(), ref, rtol=1e-6, atol=1e-7)
    inf = delta_w(pre, post, None, sigma=float("inf"), sigma_grad=True, **kw)
    assert torch.equal(inf[1], torch.zeros_like(inf[1]))  # no kernel: no dependence on sigma
    with pytest.raises(ValueError, match="sigma_grad=True needs clip=None"):
        delta_w(pre, post, None, sigma=1.0, clip=0.1, sigma_grad=True, **kw)


def test_a_tensor_sigma_reads_nothing_back():
    gen = torch.Generator().manual_seed(2)
    pre = fired_latency(random_activity(3, 6, 5, 0.3, gen))
    post = fired_latency(random_activity(3, 6, 4, 0.3, gen))
    sigma = torch.tensor(0.8, dtype=torch.float64)
    kw = dict(T=3, A_plus=1.0, A_minus=0.5, post_states="spiked", check=False)
    with HostReads() as mode:
        delta_w(pre, post, None, sigma=sigma, sigma_grad=True, **kw)
        delta_w(pre, post, None, sigma=sigma, **kw)
    assert mode.n == 0
    K = kernel_table(3, sigma, dtype=torch.float64, sigma_grad=True)
    torch.testing.assert_close(K[0], kernel_table(3, 0.8, dtype=torch.float64), rtol=0, atol=0)
