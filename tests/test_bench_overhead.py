"""``dassdp bench overhead`` at a tiny size, writing to a temporary directory."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from dassdp.bench import overhead as bench_overhead
from dassdp.commands import bench

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_overhead_tiny_run_writes_csv_and_section(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "bench" / "overhead.csv"
    doc.write_text("# Benchmarks\n\n## overhead\n\nstale\n\n## throughput\n\nstays\n")
    args = _parse(
        ["overhead", "--batch", "1", "--size", "8", "--T", "2", "--reps", "1",
         "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["condition"] for r in rows] == list(bench_overhead.CONDITIONS)
    by = {r["condition"]: r for r in rows}
    for r in rows:
        assert r["batch"] == "1" and r["T"] == "2" and r["input"] == "3x8x8"
        assert float(r["step_s"]) > 0
        assert float(r["step_s_min"]) <= float(r["step_s"]) <= float(r["step_s_max"])
    assert float(by["off"]["plast_step_ms"]) == 0 and float(by["off"]["overhead_pct"]) == 0
    assert float(by["warmup"]["plast_step_ms"]) > 0 and by["warmup"]["applied"] == "0"
    assert float(by["active"]["plast_step_ms"]) > 0 and by["active"]["applied"] == "1"
    assert by["warmup"]["target_pct"] == "0.5" and by["active"]["target_pct"] == "2.0"
    assert by["active"]["met_by_own_time"] in ("yes", "no")
    assert float(by["off"]["hooks_ms"]) == 0 and float(by["active"]["hooks_ms"]) > 0
    assert float(by["warmup"]["own_ms"]) >= float(by["warmup"]["plast_step_ms"])
    text = doc.read_text()
    assert "stale" not in text and "stays" in text and text.count("## overhead") == 1
    section = text[text.index("## overhead") : text.index("## throughput")]
    for fact in ("command: `dassdp", f"torch {torch.__version__}", "1 thread", "CPU:",
                 "date:", "load average", "<= 2.0 %", "<= 0.5 %",
                 "| spikingresformer_cifar | 1 | 3x8x8 | 2 | none | active |"):  # fmt: skip
        assert fact in section, fact
    assert "plast.step" in capsys.readouterr().out


def test_bench_overhead_bad_arguments(tmp_path):
    doc = str(tmp_path / "d.md")
    with pytest.raises(ValueError, match="--batch"):
        bench.run(_parse(["overhead", "--batch", "0", "--doc", doc]))
    with pytest.raises(ValueError, match="warm-up"):
        bench_overhead.bench_batch(batch=1, size=8, warmup=0)
    with pytest.raises(ValueError, match="cuda"):
        if torch.cuda.is_available():
            raise ValueError("cuda is available here; nothing to check")
        bench.run(_parse(["overhead", "--device", "cuda", "--doc", doc]))


def test_cuda_runs_get_their_own_section_and_csv():
    from pathlib import Path

    from dassdp.bench.harness import default_csv, section_name

    assert section_name("overhead", "cpu") == "overhead"
    assert section_name("overhead", "cuda:0") == "overhead (cuda)"
    assert default_csv("rule", "cpu") == Path("docs/bench/rule.csv")
    assert default_csv("rule", "cuda") == Path("docs/bench/rule-cuda.csv")
