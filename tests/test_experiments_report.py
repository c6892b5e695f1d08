"""``dassdp report`` on a small fabricated results folder (tests/golden/compare/) with
hand-checkable numbers (see tests/golden/make_compare_golden.py)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from dassdp.cli import main

GOLDEN = Path(__file__).parent / "golden" / "compare"
FIGURES = (
    "accuracy_curves",
    "final_paired",
    "delta_vs_baseline",
    "warmup_sync_loss",
    "plasticity",
    "firing_rates",
    "robustness",
)
TABLES = ("runs", "summary", "curves", "gate", "plasticity", "firing", "robustness")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "compare"
    shutil.copytree(GOLDEN, out)
    assert main(["report", str(out)]) == 0
    return out


def test_files_are_written(report_dir: Path) -> None:
    for name in FIGURES:
        png = report_dir / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for name in (*TABLES, "robustness_summary"):
        assert (report_dir / f"{name}.csv").stat().st_size > 0, name
    text = (report_dir / "report.md").read_text()
    for name in FIGURES:
        assert f"({name}.png)" in text


def test_headline_table_numbers(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    # dassdp - baseline per seed = 0.5, 0.7, 0.3: mean +0.50, t = 4.33 (df 2) -> p = 0.0494,
    # exact Wilcoxon with 3 positive differences -> 0.25; Holm over 2 variants -> 0.0988
    assert "| baseline | 3 | 81.00 ± 1.00 | – |" in text
    assert "| dassdp | 3 | 81.50 ± 0.92 | +0.50 | [+0.30, +0.70] | 0.0494 | 0.25 | 0.0988 |" in text
    assert "| shuffled-latency | 3 | 80.97 ± 0.97 | -0.03 |" in text
    assert "not significant at α = 0.05" in text
    assert "unfinished, left out of the statistics: baseline seed3" in text


def test_tables_per_seed_gate_robustness(report_dir: Path) -> None:
    text = (report_dir / "report.md").read_text()
    assert "| 1 | 81.00 | 81.70 | 81.20 |" in text  # per-seed finals
    assert "| dassdp | classifier | 3/3 | 0.2 ± 0.1 | 0.3 ± 0 | 0.05 ± 0 |" in text
    assert "| drop=0.1 | baseline | 3 | 76.00 ± 1.00 | – | – |" in text
    assert "| drop=0.1 | dassdp | 3 | 77.50 ± 0.92 | +1.50 [+1.30, +1.70] |" in text
    with open(report_dir / "summary.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["dassdp"]["delta"]) == pytest.approx(0.5)
    assert float(rows["dassdp"]["p_ttest"]) == pytest.approx(0.049414, abs=1e-6)
    with open(report_dir / "runs.csv") as f:
        runs = list(csv.DictReader(f))
    assert len(runs) == 10 and sum(r["finished"] == "False" for r in runs) == 1


def test_report_reads_only_results(report_dir: Path) -> None:
    """No checkpoint exists in the golden folder: the report never needs one."""
    assert not list(report_dir.rglob("*.pt"))


def test_empty_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "no run folders" in capsys.readouterr().err


def _cut_line(path: Path, which: int) -> None:
    """Cut line ``which`` of a file in half, as a kill mid-write or a bad edit would."""
    lines = path.read_text().splitlines(keepends=True)
    lines[which] = lines[which][: len(lines[which]) // 2] + "\n"
    path.write_text("".join(lines))


def test_damaged_metrics_lines_neither_drop_nor_truncate_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Regression: a cut first line dropped the run (n 3 -> 2); a cut last line made "final"
    an earlier epoch (the Δ moved by 2 points). Final values come from done.json."""
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    _cut_line(out / "dassdp" / "seed0" / "metrics.jsonl", 0)
    _cut_line(out / "dassdp" / "seed1" / "metrics.jsonl", -1)
    (out / "shuffled-latency" / "seed2" / "done.json").write_text('{"variant": "base')
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| dassdp | 3 | 81.50 ± 0.92 | +0.50 |" in text  # as with intact files
    assert (
        "unfinished, left out of the statistics: baseline seed3 (1 epochs), shuffled-latency seed2"
        in text
    )
    for line in (
        "dassdp seed0: metrics.jsonl line(s) 1 damaged (skipped); metrics.jsonl holds 2 of 3",
        "dassdp seed1: metrics.jsonl line(s) 3 damaged (skipped); metrics.jsonl holds 2 of 3",
        "shuffled-latency seed2: done.json is damaged: treated as unfinished",
    ):
        assert line in text
    err = capsys.readouterr().err
    assert "[report] warning: dassdp seed0: metrics.jsonl line(s) 1 damaged" in err
    assert "[report] warning: shuffled-latency seed2: unfinished (3 epochs), left out" in err
    assert "[report] warning: baseline seed3: unfinished" in err
    with open(out / "runs.csv") as f:
        runs = {(r["variant"], r["seed"]): r for r in csv.DictReader(f)}
    assert float(runs[("dassdp", "1")]["final_acc1"]) == pytest.approx(81.7)
    assert runs[("dassdp", "1")]["problems"].startswith("metrics.jsonl line(s) 3 damaged")


def test_equal_paired_differences_report_an_undefined_p(tmp_path: Path) -> None:
    """Regression: with every paired difference equal, p was 0 and read as significant."""
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    for seed, final in enumerate([80.0, 81.0, 82.0]):  # dassdp = baseline + 1.0 on each seed
        done = out / "dassdp" / f"seed{seed}" / "done.json"
        done.write_text(json.dumps({**json.loads(done.read_text()), "final_test_acc1": final + 1}))
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "| dassdp | 3 | 82.00 ± 1.00 | +1.00 | [+1.00, +1.00] | undefined |" in text
    assert "zero variance, so the paired t p is undefined; no test." in text
    assert "**significant**" not in text


def test_synchrony_and_gate_over_training_per_epoch(report_dir: Path) -> None:
    """S and G per epoch (mean ± std over seeds), the view in which gate feedback shows."""
    text = (report_dir / "report.md").read_text()
    assert "| dassdp | classifier | 1 | warmup | 0.301 ± 0.001 | – |" in text
    assert "| dassdp | classifier | 3 | active | 0.321 ± 0.001 | 1.04 ± 0 |" in text
    assert "learned σ" not in text and not (report_dir / "learned.png").exists()


def test_learned_sigma_and_amplitude_are_reported(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    for seed in range(3):
        path = out / "dassdp" / f"seed{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        for row in rows:
            site = row["plasticity"]["sites"]["classifier"]
            if row["plasticity"]["phase"] == "active":
                site.update(sigma=0.5 * row["epoch"], amplitude=1.1 + 0.1 * seed)
                site.update(hypergrad_sigma=1e-4, hypergrad_amplitude=-2e-4)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    header = "| variant | site | epoch | phase | synchrony S | gate G | learned σ | learned a |"
    assert header in text
    row = "| dassdp | classifier | 3 | active | 0.321 ± 0.001 | 1.04 ± 0 | 1 ± 0 | 1.2 ± 0.1 |"
    assert row in text
    assert "| dassdp | classifier | 1 | warmup | 0.301 ± 0.001 | – | – | – |" in text
    assert "| baseline |" not in text.split("### Over training")[1].split("\n\n")[1]
    assert (out / "learned.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(learned.png)" in text
    with open(out / "plasticity.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "dassdp" and r["epoch"] == "2"]
    assert [float(r["amplitude"]) for r in rows] == pytest.approx([1.1, 1.2, 1.3])
    assert all(float(r["hypergrad_amplitude"]) == -2e-4 for r in rows)


def _overfit_baseline(out: Path) -> None:
    """Make the golden baseline overfit: test acc@1 peaks at epoch 2 (final + 1) and falls
    back to its final value while train acc@1 climbs 90 -> 95 -> 99."""
    for seed in range(3):
        path = out / "baseline" / f"seed{seed}" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        final = rows[-1]["test"]["acc1"]
        rows[1]["test"]["acc1"] = final + 1.0
        for row, train in zip(rows, (90.0, 95.0, 99.0)):
            row["train"]["acc1"] = train
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_best_epoch_and_train_test_gap(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    _overfit_baseline(out)
    assert main(["report", str(out)]) == 0
    text = (out / "report.md").read_text()
    assert "## Best epoch and train-test gap" in text
    # baseline: finals 80, 81, 82; best 81, 82, 83 at epoch 2; gaps 99 - final, 95 - best
    assert (
        "| baseline | 3 | 81.00 ± 1.00 | 82.00 ± 1.00 | 2.0 ± 0.0 | 99.00 ± 0.00 | "
        "18.00 ± 1.00 | 13.00 ± 1.00 | – | – | – |"
    ) in text
    # dassdp: best = final (epoch 3), train = test - 1; paired best: -0.5, -0.3, -0.7
    assert (
        "| dassdp | 3 | 81.50 ± 0.92 | 81.50 ± 0.92 | 3.0 ± 0.0 | 80.50 ± 0.92 | "
        "-1.00 ± 0.00 | -1.00 ± 0.00 | -0.50 | [-0.70, -0.30] |"
    ) in text
    assert "Mixup" not in text
    with open(out / "generalization.csv") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    assert float(rows["dassdp"]["delta_best"]) == pytest.approx(-0.5)
    assert float(rows["dassdp"]["p_ttest_best"]) == pytest.approx(0.049414, abs=1e-6)
    assert float(rows["baseline"]["gap_final_mean"]) == pytest.approx(18.0)
    with open(out / "runs.csv") as f:
        runs = {(r["variant"], r["seed"]): r for r in csv.DictReader(f)}
    base0 = runs[("baseline", "0")]
    assert float(base0["best_acc1"]) == 81.0 and float(base0["best_epoch"]) == 2
    assert float(base0["gap_final"]) == 19.0 and float(base0["gap_best"]) == 14.0
    assert float(base0["final_train_acc1"]) == 99.0 and float(base0["best_train_acc1"]) == 95.0


def test_gap_of_a_damaged_best_row_is_unknown_and_mixup_is_flagged(tmp_path: Path) -> None:
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    _overfit_baseline(out)
    run = out / "baseline" / "seed0"
    done = json.loads((run / "done.json").read_text())
    (run / "done.json").write_text(json.dumps({**done, "best_test_acc1": 81.0}))
    _cut_line(run / "metrics.jsonl", 1)  # the best epoch's row
    config = run / "config.yaml"
    config.write_text(config.read_text() + "mixup: true\n")
    assert main(["report", str(out)]) == 0
    with open(out / "runs.csv") as f:
        runs = {(r["variant"], r["seed"]): r for r in csv.DictReader(f)}
    base0 = runs[("baseline", "0")]
    assert float(base0["best_acc1"]) == 81.0  # done.json's value
    assert base0["best_epoch"] == "nan" and base0["gap_best"] == "nan"
    assert float(base0["gap_final"]) == 19.0  # the final row is intact
    text = (out / "report.md").read_text()
    assert "**Mixup/CutMix** was on in `baseline`" in text


@pytest.mark.parametrize("plan", ["compare.json", "folder layout"])
def test_planned_runs_missing_or_without_an_epoch_are_listed(
    tmp_path: Path, capsys: pytest.CaptureFixture, plan: str
) -> None:
    """Regression: a planned run whose folder holds only config.yaml (killed before its first
    epoch) counted for nothing, with no warning: its variant showed n = 1 fewer and the
    report looked complete. The golden plan is 3 variants x seeds 0-3."""
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    (out / "dassdp" / "seed3").mkdir()
    shutil.copy(out / "dassdp" / "seed0" / "config.yaml", out / "dassdp" / "seed3")
    if plan == "folder layout":
        (out / "compare.json").unlink()  # then the folders tell: every variant x every seed
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    expected = [
        "dassdp seed3: incomplete, no epoch recorded (the folder holds only config.yaml)",
        "shuffled-latency seed3: missing (no run folder)",
    ]
    for line in expected:
        assert f"[report] warning: {line}\n" in err
    assert "[report] warning: baseline seed3: unfinished (1 epochs), left out" in err
    text = (out / "report.md").read_text()
    assert (
        "- planned but missing or without a recorded epoch, not in the statistics: "
        + " | ".join(expected)
        in text
    )
    assert "| dassdp | 3 | 81.50 ± 0.92 | +0.50 |" in text  # the statistics are unchanged


def test_a_complete_plan_lists_nothing_missing(tmp_path: Path, capsys: pytest.CaptureFixture):
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    manifest = json.loads((out / "compare.json").read_text())
    (out / "compare.json").write_text(json.dumps({**manifest, "seeds": [0, 1, 2]}))
    shutil.rmtree(out / "baseline" / "seed3")
    assert main(["report", str(out)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert "planned but missing" not in (out / "report.md").read_text()


def test_bytes_that_are_not_utf8_damage_their_line_or_file_only(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Regression: one non-UTF-8 byte in a metrics.jsonl stopped the report with "'utf-8'
    codec can't decode byte ..." and no file name."""
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    with open(out / "dassdp" / "seed0" / "metrics.jsonl", "ab") as f:
        f.write(b'{"epoch": 9, "te\xff\xfest": {}}\n')
    (out / "dassdp" / "seed1" / "metrics.jsonl").write_bytes(b"\x00\xff\x01\n\xfe\xfd\n\x80\n")
    (out / "dassdp" / "seed2" / "config.yaml").write_bytes(b"model: caf\xe9\n")
    (out / "shuffled-latency" / "seed2" / "done.json").write_bytes(b'{"epochs": 3\xff}')
    assert main(["report", str(out)]) == 0
    err = capsys.readouterr().err
    assert "codec" not in err and "Traceback" not in err
    text = (out / "report.md").read_text()
    for line in (
        "dassdp seed0: metrics.jsonl line(s) 4 damaged (skipped)",
        "dassdp seed1: metrics.jsonl line(s) 1-3 damaged (skipped)",
        "dassdp seed2: config.yaml unreadable (",
        "shuffled-latency seed2: done.json is damaged: treated as unfinished",
    ):
        assert line in text and f"[report] warning: {line}" in err
    assert "line(s) 1-3 damaged (skipped); metrics.jsonl holds 0 of 3 epochs" in text
    assert "not UTF-8 text (byte 0xe9 on line 1)" in text
    assert "| dassdp | 3 | 81.50 ± 0.92 | +0.50 |" in text  # finals come from done.json


def _refuse_writes_in(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``folder`` read-only. chmod does not bind root (as in many containers), so there
    creating or opening a file for writing in it fails as the kernel would fail it for
    another user: PermissionError (EACCES) naming the path."""
    import builtins
    import errno
    import os

    folder.chmod(0o555)
    if os.geteuid() != 0:
        return

    def refused(path: object) -> bool:
        return Path(os.fsdecode(path)).absolute().parent == folder.absolute()

    def deny(path: object) -> None:
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):  # type: ignore[no-untyped-def]
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and refused(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):  # type: ignore[no-untyped-def]
        path_like = isinstance(file, str | bytes | os.PathLike)
        if path_like and set(mode) & set("wax+") and refused(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)


def test_a_read_only_folder_is_one_line_and_nothing_is_written(
    tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Regression: `report` on a read-only folder printed a PermissionError traceback."""
    out = tmp_path / "compare"
    shutil.copytree(GOLDEN, out)
    before = sorted(p.name for p in out.iterdir())
    _refuse_writes_in(out, monkeypatch)
    try:
        code = main(["report", str(out)])
    finally:
        out.chmod(0o755)
    captured = capsys.readouterr()
    errors = [line for line in captured.err.splitlines() if "warning" not in line]
    assert code == 1 and errors == [
        f"dassdp report: error: cannot write the report into {out}: Permission denied"
    ]
    assert sorted(p.name for p in out.iterdir()) == before  # no file, whole or half
