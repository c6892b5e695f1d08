"""``dassdp bench train-step`` on a tiny run, its errors, and the CLI's allocator tuning."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch

from dassdp._util import allocator as _malloc
from dassdp.bench import train_step
from dassdp.commands import bench

torch.set_num_threads(1)
SRC = str(Path(train_step.__file__).resolve().parents[2])


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_train_step_tiny_run_writes_csv_and_section(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "train-step.csv"
    doc.write_text("# Benchmarks\n\n## train-step\n\nstale\n\n## other\n\nkept\n")
    args = _parse(
        ["train-step", "--model", "spiking_cnn", "--batch", "2", "--size", "16", "--T", "2",
         "--steps", "1", "--rss-steps", "1", "--variants", "spike-saving",
         "--allocator", "tuned", "default",
         "--baseline-src", SRC, "--profile", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    got = [(r["variant"], r["allocator"]) for r in rows]
    assert got == [(v, a) for v in ("baseline", "spike-saving") for a in ("tuned", "default")]
    for r in rows:
        assert float(r["peak_rss_mib"]) > float(r["built_rss_mib"]) > 0
        assert float(r["fresh_images_per_s"]) > 0 and 0 <= float(r["sys_share"]) <= 1
        assert r["batch"] == "2" and r["amp"] == "fp32" and r["repeats"] == "1"
        ratio = float(r["fresh_images_per_s"]) / float(rows[0]["fresh_images_per_s"])
        assert float(r["fresh_ratio"]) == pytest.approx(ratio, rel=0.01)
    timed = [r for r in rows if r["images_per_s"]]
    # Only the rows of this process's allocator carry the interleaved images/s.
    here = train_step.bench_allocator(_malloc.active_allocator())
    assert {r["allocator"] for r in timed} == {here}
    assert [r["variant"] for r in timed] == ["spike-saving"]
    assert float(timed[0]["ratio"]) == 1.0
    text = doc.read_text()
    assert "stale" not in text and "## other\n\nkept" in text
    assert "Top operators" in text and "| LIF | float32 |" in text
    printed = capsys.readouterr().out
    assert "top operators" in printed and "saved by autograd" in printed


def test_repeats_run_the_fresh_processes_interleaved_and_report_medians(monkeypatch, tmp_path):
    calls = []
    secs = iter([4.0, 1.0, 2.0, 2.0, 3.0, 1.5])  # baseline, spike-saving, baseline, ...

    def fake(cfg, src=None):
        calls.append("baseline" if src else "this")
        sec = next(secs)
        steps = [{"sec": sec, "minflt": 10, "sys_share": 0.1}]
        return {"steps": steps, "peak_rss_mib": 100 * sec, "built_rss_mib": 50}

    monkeypatch.setattr(train_step, "fresh_process", fake)
    args = _parse(
        ["train-step", "--model", "spiking_cnn", "--batch", "2", "--no-time", "--repeats", "3",
         "--variants", "spike-saving", "--baseline-src", SRC,
         "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path / "b.md")]
    )  # fmt: skip
    assert bench.run(args) == 0
    assert calls == ["baseline", "this"] * 3
    base, this = list(csv.DictReader((tmp_path / "x.csv").open()))
    assert (
        float(base["fresh_images_per_s"]) == pytest.approx(2 / 3.0, abs=1e-3)
        and float(base["peak_rss_mib"]) == 300
    )
    assert (
        float(this["fresh_images_per_s"]) == pytest.approx(2 / 1.5, abs=1e-3)
        and float(this["rss_ratio"]) == 0.5
    )
    assert float(this["fresh_ratio"]) == 2.0


def test_profile_step_reports_ops_and_saved_spikes_kept_as_bool():
    ops, saved = train_step.profile_step(
        "spiking_cnn", "spike-saving", "fp32", batch=2, size=16, T=2, seed=0
    )
    assert ops and all(o["self_ms"] >= 0 for o in ops)
    assert sum(o["share"] for o in ops) <= 1.0 + 1e-6
    # The max pools save their (LIF spike) input: kept at a quarter of its float32 size.
    pool = next(s for s in saved if s["module"] == "MaxPool2d" and s["kind"] == "float32")
    assert pool["kept_mib"] == pytest.approx(pool["saved_mib"] / 4)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--batch", "0"], "must be >= 1"),
        (["--rss-warmup", "-1"], "must be >= 0"),
        (["--repeats", "0"], "must be >= 1"),
        (["--device", "cuda"], "CPU only"),
        (["--model", "spiking_cnn", "--variants", "checkpoint-all"], "needs a model with stages"),
        (["--model", "spiking_cnn", "--baseline-src", "/nonexistent", "--no-time"], "no dassdp"),
    ],
)
def test_train_step_errors(argv, match, tmp_path):
    args = _parse(["train-step", *argv, "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path)])
    with pytest.raises(ValueError, match=match):
        bench.run(args)


def test_model_args_of_variants():
    assert train_step.model_args("checkpoint-all", 3) == {
        "spike_saving": True,
        "checkpoint_stages": [0, 1, 2],
    }
    assert train_step.model_args("no-spike-saving", 0) == {"spike_saving": False}
    with pytest.raises(ValueError, match="unknown variant"):
        train_step.model_args("fast", 3)
