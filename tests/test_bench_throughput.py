"""``dassdp bench throughput``: a tiny run (when SpikingJelly is installed) and the message
when it is not."""

from __future__ import annotations

import argparse
import csv
import sys

import pytest
import torch

from dassdp.bench import throughput as bench_throughput
from dassdp.commands import bench

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_throughput_tiny_run_writes_csv_and_section(tmp_path, capsys):
    pytest.importorskip("spikingjelly.activation_based.neuron")
    doc, out = tmp_path / "benchmarks.md", tmp_path / "bench" / "throughput.csv"
    doc.write_text("# Benchmarks\n\n## throughput\n\nstale\n")
    args = _parse(
        ["throughput", "--batch", "1", "--size", "8", "--T", "2", "--reps", "1",
         "--neuron-channels", "4", "--neuron-reps", "2", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["backend"] for r in rows] == list(bench_throughput.BACKENDS)
    for r in rows:
        assert r["batch"] == "1" and r["T"] == "2" and r["input"] == "3x8x8"
        assert float(r["images_per_s"]) > 0 and r["target_met"] in ("yes", "no")
        # Same network with either neuron: identical logits up to float rounding.
        assert float(r["first_logits_max_abs_diff"]) < 1e-5
        assert r["lif_op_shape"] == "2x1x4x8x8" and float(r["lif_op_ms"]) > 0
        assert float(r["lif_op_ratio"]) > 0 and float(r["ratio_by_min_step"]) > 0
    ratio = float(rows[0]["images_per_s"]) / float(rows[1]["images_per_s"])
    assert float(rows[0]["ratio_ours_over_sj"]) == pytest.approx(ratio, rel=1e-2)
    text = doc.read_text()
    assert "stale" not in text and text.count("## throughput") == 1
    for fact in ("command: `dassdp", f"torch {torch.__version__}", "1 thread", "CPU:",
                 "date:", "load average", "| spikingresformer_cifar | spikingjelly | 1 |",
                 "--no-deps"):  # fmt: skip
        assert fact in text, fact
    assert "images/s" in capsys.readouterr().out


def test_bench_throughput_without_spikingjelly_says_how_to_install(tmp_path, monkeypatch, capsys):
    for name in ("spikingjelly", "spikingjelly.activation_based"):
        monkeypatch.setitem(sys.modules, name, None)  # importing it -> ImportError
    with pytest.raises(RuntimeError, match="pip install --no-deps spikingjelly"):
        bench_throughput.spikingjelly_lif()
    doc = tmp_path / "d.md"
    args = _parse(["throughput", "--batch", "1", "--doc", str(doc), "--out", str(tmp_path / "t")])
    assert bench.run(args) == 3
    assert "SpikingJelly" in capsys.readouterr().err and not doc.exists()


def test_bench_throughput_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--batch"):
        bench.run(_parse(["throughput", "--batch", "0", "--doc", str(tmp_path / "d.md")]))
    with pytest.raises(ValueError, match="backend"):
        bench_throughput.build("spiking_cnn", "nope", T=2, seed=0, device="cpu")


def test_bench_throughput_loop_baseline_reports_before_after(tmp_path):
    pytest.importorskip("spikingjelly.activation_based.neuron")
    doc, out = tmp_path / "benchmarks.md", tmp_path / "throughput.csv"
    args = _parse(
        ["throughput", "--batch", "1", "--size", "8", "--T", "2", "--reps", "1",
         "--neuron-channels", "4", "--neuron-reps", "2", "--loop-baseline",
         "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["backend"] for r in rows] == ["dassdp", "spikingjelly", "dassdp-loop"]
    assert all(int(r["kernels_per_step"]) > 0 for r in rows)
    assert bench_throughput._backends(("dassdp", "dassdp-torch"), False)[-1] == "dassdp-torch"
    loop = rows[2]
    assert loop["neuron"] == "dassdp.neurons.LIF(fused=False)"
    assert float(loop["first_logits_max_abs_diff"]) < 1e-5  # the same network again
    ips = {r["backend"]: float(r["images_per_s"]) for r in rows}
    for r in rows:
        assert float(r["loop_ratio_over_sj"]) == pytest.approx(
            ips["dassdp-loop"] / ips["spikingjelly"], rel=1e-2
        )
        assert float(r["speedup_fused_over_loop"]) == pytest.approx(
            ips["dassdp"] / ips["dassdp-loop"], rel=1e-2
        )
    text = doc.read_text()
    assert "| spikingresformer_cifar | dassdp-loop | 1 |" in text
    assert "- batch 1: ours / SJ " in text and "(autograd-loop LIF) -> " in text


def test_build_loop_backend_uses_unfused_lif():
    from dassdp.neurons import LIF

    model = bench_throughput.build("spiking_cnn", "dassdp-loop", T=2, seed=0, device="cpu")
    lifs = [m for m in model.modules() if isinstance(m, LIF)]
    assert lifs and not any(m.fused for m in lifs)
    fused = bench_throughput.build("spiking_cnn", "dassdp", T=2, seed=0, device="cpu")
    assert all(m.fused for m in fused.modules() if isinstance(m, LIF))
