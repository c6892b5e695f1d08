"""DA-SSDP under DDP on CPU with gloo (2 processes): ranks stay identical, 1 rank ~ 2 ranks,
and resume on 2 or 1 ranks continues the same gate."""

import functools
import json

import pytest
import torch
import torch.multiprocessing as mp

from ddp_worker import run, run_learned, run_skips
from engine_fixtures import assert_same_tensors

# 2-process gloo runs: minutes; `make test-slow` and CI run them, scripts/stress_ddp.sh repeats them
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def spawn(world, tmp_path, name, **kw):
    init = tmp_path / f"init-{name}"
    mp.spawn(
        functools.partial(_entry, world=world, init=str(init), out=str(tmp_path), **kw),
        nprocs=world,
        join=True,
    )


def _entry(rank, world, init, out, **kw):
    run(rank, world, init, out, **kw)


def load(tmp_path, name):
    return torch.load(tmp_path / f"{name}.pt", weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    spawn(2, tmp, "two", size=16, epochs=range(3), tag="two")
    spawn(1, tmp, "one", size=16, epochs=range(3), tag="one")
    spawn(2, tmp, "first", size=16, epochs=range(1), tag="first")  # stops mid-warm-up
    ckpt = str(tmp / "first.pt")
    spawn(2, tmp, "res2", size=16, epochs=range(1, 3), resume=ckpt, tag="res2")
    spawn(1, tmp, "res1", size=16, epochs=range(1, 3), resume=ckpt, tag="res1")
    return tmp


def gloo_threads_left(tmp_path, tag):
    return {r: json.loads((tmp_path / f"{tag}-threads-rank{r}.json").read_text()) for r in (0, 1)}


def test_the_process_group_is_freed_at_cleanup_not_at_interpreter_exit(runs):
    # DDP imports torch.distributed.nn.functional after the group exists, which binds it as a
    # default argument; unless cleanup_distributed drops that, gloo's threads outlive
    # destroy_process_group and a rank can abort in interpreter teardown (SIGABRT)
    for tag in ("two", "first", "res2"):
        assert gloo_threads_left(runs, tag) == {0: [], 1: []}, tag


def test_ranks_stay_bit_identical_and_fit_the_same_gate(runs):
    r0, r1 = load(runs, "two-rank0"), load(runs, "two-rank1")
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert r0["fits"] == r1["fits"] and r0["fits"]["fc2"].valid
    assert load(runs, "two")["plast"]["counters"]["applied"] == 2 * 4


def test_two_ranks_match_one_rank_with_the_global_batch(runs):
    # Not bit-identical: the gradient all-reduce and the per-shard GEMMs sum in another order.
    two, one = load(runs, "two-rank0"), load(runs, "one-rank0")
    for key in two["model"]:
        torch.testing.assert_close(two["model"][key], one["model"][key], rtol=1e-5, atol=1e-6)
    for site, fit in two["fits"].items():
        ref = one["fits"][site]
        assert fit.n == ref.n
        assert fit.k == pytest.approx(ref.k, abs=1e-6)  # losses are float32 means
        assert fit.mu == pytest.approx(ref.mu, abs=1e-12)


def test_resume_on_two_ranks_equals_uninterrupted(runs):
    full, resumed = load(runs, "two-rank0"), load(runs, "res2-rank0")
    for key in full["model"]:
        assert torch.equal(full["model"][key], resumed["model"][key]), key
    assert resumed["fits"] == full["fits"]


def test_resume_on_one_rank_keeps_every_ranks_warmup_records(runs):
    two_fit, one_fit = load(runs, "two-rank0")["fits"], load(runs, "res1-rank0")["fits"]
    for site in two_fit:
        assert one_fit[site].n == two_fit[site].n  # the 2-rank checkpoint carries all records
        assert one_fit[site].k == pytest.approx(two_fit[site].k, abs=1e-12)


def _skips_entry(rank, world, init, out):
    run_skips(rank, world, init, out)


def test_device_side_skips_hold_on_every_rank(tmp_path):
    mp.spawn(
        functools.partial(_skips_entry, world=2, init=str(tmp_path / "init"), out=str(tmp_path)),
        nprocs=2,
        join=True,
    )
    r0, r1 = load(tmp_path, "skips-rank0"), load(tmp_path, "skips-rank1")
    assert gloo_threads_left(tmp_path, "skips") == {0: [], 1: []}
    assert (
        r0["counters"]
        == r1["counters"]
        == {
            "steps": 6,
            "recorded": 3,
            "applied": 1,
            "skipped_nonfinite": 1,
            "skipped_optimizer": 1,
            "skipped_no_records": 1,
        }
    )
    for (a0, w0), (a1, w1) in zip(r0["snapshots"], r1["snapshots"], strict=True):
        assert a0 == a1 and torch.equal(w0, w1)
    assert [a for a, _ in r0["snapshots"]] == [False] * 5 + [True]
    warm = r0["snapshots"][1][1]
    assert all(torch.equal(w, warm) for _, w in r0["snapshots"][2:5])  # skipped: unchanged
    assert not torch.equal(r0["snapshots"][5][1], warm)


def _learned_entry(rank, world, init, out, hyper_step):
    run_learned(rank, world, init, out, hyper_step)


@pytest.mark.parametrize("hyper_step", ["plain", "normalized"])
def test_learned_sigma_and_amplitude_agree_on_every_rank(tmp_path, hyper_step):
    entry = functools.partial(
        _learned_entry, world=2, init=str(tmp_path / "init"), out=str(tmp_path),
        hyper_step=hyper_step,
    )  # fmt: skip
    mp.spawn(entry, nprocs=2, join=True)
    r0, r1 = load(tmp_path, "learned-rank0"), load(tmp_path, "learned-rank1")
    assert gloo_threads_left(tmp_path, "learned") == {0: [], 1: []}
    for key in r0["model"]:
        assert torch.equal(r0["model"][key], r1["model"][key]), key
    assert r0["history"] == r1["history"]  # bit-identical learned values at every step
    assert r0["counters"] == r1["counters"] and r0["counters"]["skipped_no_records"] == 1
    last = r0["history"][-1]
    assert all(v["sigma"] != 1.0 and v["amplitude"] != 1.0 for v in last.values())
    # the skipped step (epoch 1, step 2 = index 6) and the one after it leave them unchanged
    assert r0["history"][5] == r0["history"][6] == r0["history"][7]
    assert_same_tensors(r0["learned"], r1["learned"])  # running means and counts too
    if hyper_step == "normalized":  # 8 active steps: no h at the first, the skipped, the next
        assert r0["learned"]["fc2"]["steps_amplitude"] == 5
