"""``benchmarks/epoch.py``: fresh ``dassdp train`` processes on a tiny synthetic config."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import yaml

from bench_scripts import SRC, load
from dassdp._util import allocator as _malloc
from engine_fixtures import tiny_dict

epoch = load("epoch")


def _parse(argv: list[str]) -> argparse.Namespace:
    assert argv[0] == "epoch"  # the former `dassdp bench epoch`
    return epoch.parser().parse_args(argv[1:])


@pytest.fixture
def config(tmp_path: Path) -> str:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(epochs=1, plasticity={"warmup_epochs": 0})))
    return str(path)


@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_epoch_rows_ratios_and_section(tmp_path, config, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "epoch.csv"
    doc.write_text("# Benchmarks\n\n## epoch\n\nstale\n\n## other\n\nkept\n")
    args = _parse(
        ["epoch", "--config", config, "--amp", "fp32", "bf16",
         "--baseline-src", SRC, "--set", "subset=64", "--out", str(out), "--doc", str(doc)]
    )  # fmt: skip
    assert epoch.run(args) == 0
    rows = list(csv.DictReader(out.open()))
    # the baseline runs fp32 only (--baseline-amp), first: the reference of the ratios
    assert [(r["side"], r["amp"]) for r in rows] == [
        ("baseline", "fp32"), ("this checkout", "fp32"), ("this checkout", "bf16")
    ]  # fmt: skip
    for r in rows:
        assert r["repeats"] == "1" and r["train_samples"] == "64"  # --set reached every run
        assert float(r["epoch_s"]) > 0 and float(r["peak_rss_mib"]) > 100
        assert float(r["wall_s"]) >= float(r["epoch_s"])
        ips = float(r["train_samples"]) / float(r["epoch_s"])
        assert float(r["images_per_s"]) == pytest.approx(ips, rel=0.01)
    base = rows[0]
    assert float(base["ratio"]) == 1.0 and float(base["rss_ratio"]) == 1.0
    for r in rows[1:]:
        ratio = float(r["images_per_s"]) / float(base["images_per_s"])
        assert float(r["ratio"]) == pytest.approx(ratio, rel=0.01)
    text = doc.read_text()
    assert "stale" not in text and "## other\n\nkept" in text
    assert "| baseline | fp32 | glibc | 1 | 1 | 64 |" in text
    # Another checkout starts without this process's preload (glibc's defaults); this
    # checkout's `dassdp train` chooses as the CLI does: the best allocator installed.
    auto = next(
        (n for n in ("jemalloc", "tcmalloc") if _malloc.find_library(n)), "glibc tuned"
    )  # fmt: skip
    assert [r["allocator"] for r in rows] == ["glibc", auto, auto]
    assert capsys.readouterr().out.count("[1/1]") == 3


def test_repeats_alternate_the_sides_and_report_medians(monkeypatch, tmp_path, config):
    calls = []
    times = iter([10.0, 5.0, 30.0, 7.0, 20.0, 6.0])  # baseline, this, baseline, this, ...

    def fake(config, *, src, amp, threads, epochs, overrides, workdir):
        calls.append("baseline" if src else "this")
        t = next(times)
        return {
            "epoch_s": [t],
            "train_samples": 100,
            "wall_s": t + 1,
            "peak_rss_mib": 10 * t,
            "allocator": "glibc" if src else "jemalloc",
        }

    monkeypatch.setattr(epoch, "train_process", fake)
    args = _parse(["epoch", "--config", config, "--repeats", "3", "--baseline-src", SRC])
    rows = epoch.measure(args, log=lambda s: None)
    assert calls == ["baseline", "this"] * 3
    base, this = rows
    assert (base["epoch_s"], this["epoch_s"]) == (20.0, 6.0)  # medians
    assert this["ratio"] == pytest.approx((100 / 6) / (100 / 20), abs=1e-3)
    assert this["rss_ratio"] == 0.3 and base["ratio"] == 1.0


def test_a_failing_run_is_an_error_naming_the_sources_and_the_cause(tmp_path, config):
    args = _parse(["epoch", "--config", config, "--set", "optimizer=nope",
                   "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path / "b.md")])  # fmt: skip
    with pytest.raises(RuntimeError, match=r"dassdp train failed \(exit 2; sources .*optimizer"):
        epoch.run(args)
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize(
    ("argv", "exc", "match"),
    [
        (["--config", "/nonexistent.yaml"], FileNotFoundError, "no such file"),
        (["--repeats", "0"], ValueError, "must be >= 1"),
        (["--baseline-src", "/nonexistent"], ValueError, "no dassdp package"),
    ],
)
def test_epoch_argument_errors(argv, exc, match, tmp_path, config):
    argv = ["--config", config, *argv] if "--config" not in argv else argv
    args = _parse(["epoch", *argv, "--out", str(tmp_path / "x.csv"), "--doc", str(tmp_path)])
    with pytest.raises(exc, match=match):
        epoch.run(args)
