"""`dassdp bench ddp` at a tiny size: it trains, and writes a CSV and its Markdown section."""

import csv

import pytest

from dassdp.bench.ddp import job_config
from dassdp.cli import main


def test_bench_ddp_tiny(tmp_path):
    out, doc = tmp_path / "ddp.csv", tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\n## models\n\nkept\n")
    assert (
        main(
            [
                "bench",
                "ddp",
                "--nproc",
                "1",
                "--batch",
                "32",
                "--subset",
                "64",
                "--out",
                str(out),
                "--doc",
                str(doc),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader(out.open()))
    assert [r["ranks"] for r in rows] == ["1"] and float(rows[0]["images_per_s"]) > 0
    assert int(rows[0]["train_images"]) == 64
    text = doc.read_text()
    assert (
        "## models\n\nkept" in text
        and "## ddp" in text
        and "| 1 | cpu | none (1 process) | 32 |" in text
    )


def test_job_config_splits_the_global_batch():
    assert job_config(64, 2, 2, 512)["batch_size"] == 32
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        job_config(64, 3, 2, 512)
