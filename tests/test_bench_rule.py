"""``dassdp bench rule``: the pairwise baseline agrees with the library; a tiny run writes rows."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from dassdp.bench import rule as bench_rule
from dassdp.commands import bench
from dassdp.plasticity.rule import fired_latency

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("latency", ["first", "last"])
@pytest.mark.parametrize("silent", [None, 0, 2])
@pytest.mark.parametrize("T", [1, 4, 6])
def test_pairwise_latency_matches_library(latency, silent, T):
    active = torch.rand(T, 5, 7, generator=torch.Generator().manual_seed(T)) < 0.3
    if silent is not None and silent > T:
        silent = T
    ours = fired_latency(active, latency, silent)
    ref = bench_rule.pairwise_latency(active.double(), latency, silent)
    assert torch.equal(ours.latency, ref)


@pytest.mark.parametrize("latency", ["first", "last"])
@pytest.mark.parametrize("silent", [None, 0])
@pytest.mark.parametrize(
    ("B", "C_out", "C_in", "T", "rate"),
    [(1, 1, 1, 4, 0.5), (8, 16, 32, 4, 0.2), (13, 40, 7, 4, 0.3), (5, 9, 11, 10, 0.1),
     (6, 3, 4, 2, 0.9)],
)  # fmt: skip
@pytest.mark.parametrize("gated", [True, False])
def test_pairwise_matches_library_in_float64(latency, silent, B, C_out, C_in, T, rate, gated):
    pre, post, gate = bench_rule.make_inputs(B, C_out, C_in, T=T, rate=rate, seed=B + C_out)
    g = gate if gated else None
    kw = dict(latency=latency, silent=silent, dtype=torch.float64)
    ours = bench_rule.library_delta_w(pre, post, g, **kw)
    for chunk in (None, 1, 4):
        ref = bench_rule.pairwise_delta_w(pre, post, g, chunk=chunk, **kw)
        assert ref.shape == (C_out, C_in) and ref.dtype == torch.float64
        assert (ours - ref).abs().max().item() <= 1e-12


def test_pairwise_matches_library_with_other_constants():
    pre, post, gate = bench_rule.make_inputs(7, 12, 9, T=5, rate=0.3, seed=3)
    for sigma, clip in ((0.5, None), (float("inf"), 1e-4), (3.0, 1.0)):
        kw = dict(A_plus=0.02, A_minus=0.005, sigma=sigma, clip=clip, dtype=torch.float64)
        ours = bench_rule.library_delta_w(pre, post, gate, **kw)
        ref = bench_rule.pairwise_delta_w(pre, post, gate, **kw)
        assert (ours - ref).abs().max().item() <= 1e-12
    assert bench_rule.float64_check(T=3) <= 1e-12


def test_sizes_and_chunking():
    assert bench_rule.SIZES["projection-cifar"].target
    assert not bench_rule.SIZES["stress"].target
    assert bench_rule.parse_size("8:16x32") == bench_rule.RuleSize("8:16x32", 8, 16, 32)
    for bad in ("nope", "8:16", "0:1x1", "a:1x2"):
        with pytest.raises(ValueError, match="size"):
            bench_rule.parse_size(bad)
    limit = bench_rule.DEFAULT_PAIRWISE_LIMIT
    assert bench_rule.pairwise_chunk(bench_rule.SIZES["projection-imagenet-l"], limit) is None
    assert bench_rule.pairwise_chunk(bench_rule.SIZES["stress"], limit) == 16
    assert bench_rule.pairwise_chunk(bench_rule.RuleSize("x", 10, 2, 3), 13) == 2


def test_run_side_in_process_reports_times_and_memory():
    spec = dict(
        side="pairwise", B=4, C_out=3, C_in=5, T=4, rate=0.3, seed=0, latency="last",
        reps=2, warmup=1, chunk=2, device="cpu", threads=1, save=None,
    )  # fmt: skip
    out = bench_rule.run_side(spec)
    assert len(out["times"]) == 2 and all(t > 0 for t in out["times"])
    assert out["maxrss_kb"] > 0 and out["cuda_peak_bytes"] is None
    with pytest.raises(ValueError, match="side"):
        bench_rule.run_side({**spec, "side": "nope"})


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_bench_rule_tiny_run_writes_csv_and_section(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "bench" / "rule.csv"
    doc.write_text("# Benchmarks\n\n## models\n\nmodels stay\n\n## rule\n\nstale\n")
    args = _parse(
        ["rule", "--sizes", "6:5x4", "--reps", "1", "--warmup", "0", "--pairwise-limit",
         "60", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 1
    row = rows[0]
    assert (row["size"], row["B"], row["C_out"], row["C_in"]) == ("6:5x4", "6", "5", "4")
    assert row["pairwise_mode"] == "batch chunks of 3"
    for key in ("library_ms", "pairwise_ms", "speedup", "library_peak_mb", "pairwise_peak_mb"):
        assert float(row[key]) >= 0, key
    assert float(row["library_ms"]) > 0 and float(row["pairwise_ms"]) > 0
    assert float(row["max_abs_diff_fp32"]) < 1e-6
    text = doc.read_text()
    assert "stale" not in text and "models stay" in text and text.count("## rule") == 1
    section = text[text.index("## rule") :]
    for fact in ("command: `dassdp", f"torch {torch.__version__}", "1 thread", "CPU:",
                 "date:", "load average", "| 6:5x4 | 6 | 5 x 4 |", "batch chunks of 3",
                 "float64 agreement", "VmHWM"):  # fmt: skip
        assert fact in section, fact
    assert "float64 agreement" in capsys.readouterr().out


def test_bench_rule_bad_arguments(tmp_path):
    doc = str(tmp_path / "d.md")
    with pytest.raises(ValueError, match="--reps"):
        bench.run(_parse(["rule", "--reps", "0", "--doc", doc]))
    with pytest.raises(ValueError, match="unknown size"):
        bench.run(_parse(["rule", "--sizes", "huge", "--doc", doc]))
