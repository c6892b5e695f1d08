"""``dassdp bench train-step`` and its before/after form ``benchmarks/train_step.py`` on tiny
runs, their errors, and the allocators of the fresh processes."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from bench_scripts import SRC, load
from dassdp._util import allocator as _malloc
from dassdp.bench import train_step
from dassdp.commands import bench

torch.set_num_threads(1)
before_after = load("train_step")  # benchmarks/train_step.py


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def _parse_before_after(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "train-step"  # the former `dassdp bench train-step --baseline-src ...`
    return before_after.parser().parse_args(argv[1:])


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_bench_train_step_times_this_checkout_and_its_memory(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "train-step.csv"
    args = _parse(
        ["train-step", "--model", "spiking_cnn", "--batch", "2", "--size", "16", "--T", "2",
         "--steps", "1", "--variants", "no-spike-saving", "spike-saving", "--amp", "fp32",
         "bf16", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert bench.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    assert [(r["variant"], r["amp"]) for r in rows] == [
        ("no-spike-saving", "fp32"), ("spike-saving", "fp32"),
        ("no-spike-saving", "bf16"), ("spike-saving", "bf16"),
    ]  # fmt: skip
    here = train_step.bench_allocator(_malloc.active_allocator())
    for r in rows:  # every row timed here and in its fresh process, with this allocator
        assert r["allocator"] == here and r["source"] == "this checkout"
        assert float(r["images_per_s"]) > 0 and float(r["peak_rss_mib"]) > 0
    assert [float(rows[i]["ratio"]) for i in (0, 2)] == [1.0, 1.0]  # per amp: the first
    text = doc.read_text()
    assert "| spiking_cnn | spike-saving | bf16 |" in text and "command: `dassdp" in text
    assert "bf16" in capsys.readouterr().out


@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_train_step_tiny_run_writes_csv_and_section(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "train-step.csv"
    doc.write_text("# Benchmarks\n\n## train-step\n\nstale\n\n## other\n\nkept\n")
    args = _parse_before_after(
        ["train-step", "--model", "spiking_cnn", "--batch", "2", "--size", "16", "--T", "2",
         "--steps", "1", "--rss-steps", "1", "--variants", "spike-saving",
         "--allocator", "tuned", "default",
         "--baseline-src", SRC, "--profile", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert before_after.run(args) == 0
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

    def fake(args, batch, entry):
        calls.append("baseline" if entry["source"] else "this")
        sec = next(secs)
        steps = [{"sec": sec, "minflt": 10, "sys_share": 0.1}]
        return {"steps": steps, "peak_rss_mib": 100 * sec, "built_rss_mib": 50,
                "allocator": entry["allocator"]}  # fmt: skip

    monkeypatch.setattr(before_after, "fresh", fake)
    args = _parse_before_after(
        ["train-step", "--model", "spiking_cnn", "--batch", "2", "--no-time", "--repeats", "3",
         "--variants", "spike-saving", "--baseline-src", SRC,
         "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path / "b.md")]
    )  # fmt: skip
    assert before_after.run(args) == 0
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
    args = _parse_before_after(
        ["train-step", *argv, "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path)]
    )
    with pytest.raises(ValueError, match=match):
        before_after.run(args)


def test_model_args_of_variants():
    assert train_step.model_args("checkpoint-all", 3) == {
        "spike_saving": True,
        "checkpoint_stages": [0, 1, 2],
    }
    assert train_step.model_args("no-spike-saving", 0) == {"spike_saving": False}
    with pytest.raises(ValueError, match="unknown variant"):
        train_step.model_args("fast", 3)
