"""``dassdp bench models`` at a tiny size, writing to a temporary directory."""

from __future__ import annotations

import argparse
import csv

import pytest
import torch

from dassdp.bench import models as bench_models
from dassdp.bench.harness import replace_section
from dassdp.commands import bench

torch.set_num_threads(1)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


def test_bench_models_writes_csv_and_only_its_own_section(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "bench" / "models.csv"
    doc.write_text(
        "# Benchmarks\n\n## rule\n\nrule numbers stay\n\n## models\n\nstale\n\n"
        "## overhead\n\noverhead numbers stay\n"
    )
    args = _parse(
        [
            "models",
            "--models",
            "spiking_cnn",
            "spikingresformer_dvsg",
            "--batch",
            "1",
            "--T",
            "2",
            "--size",
            "16",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--out",
            str(out),
            "--doc",
            str(doc),
        ]
    )
    assert bench.run(args) == 0
    assert torch.get_num_threads() == 1  # --threads default
    rows = list(csv.DictReader(out.open()))
    assert [r["model"] for r in rows] == ["spiking_cnn", "spikingresformer_dvsg"]
    for r in rows:
        assert float(r["images_per_s"]) > 0 and r["T"] == "2" and r["batch"] == "1"
    assert rows[1]["input"] == "2x16x16"
    text = doc.read_text()
    assert "stale" not in text
    assert "rule numbers stay" in text and "overhead numbers stay" in text
    assert text.count("## models") == 1
    assert text.index("## rule") < text.index("## models") < text.index("## overhead")
    section = text[text.index("## models") : text.index("## overhead")]
    for fact in (
        "command: `dassdp",
        f"torch {torch.__version__}",
        "1 thread",
        "CPU:",
        "date:",
        "| spiking_cnn |",
        "| spikingresformer_dvsg |",
    ):
        assert fact in section, fact
    assert "images/s" in capsys.readouterr().out


def test_replace_section_appends_to_new_file_and_is_idempotent(tmp_path):
    doc = tmp_path / "docs" / "benchmarks.md"
    replace_section(doc, "models", "first")
    replace_section(doc, "rule", "other")
    replace_section(doc, "models", "second")
    text = doc.read_text()
    assert "first" not in text and "second" in text and "other" in text
    assert text.count("## models") == 1 and text.startswith("# Benchmarks")
    assert not list(doc.parent.glob("*.tmp"))


def test_input_shapes_and_bad_arguments(tmp_path):
    assert bench_models.input_shape("spikingresformer_l") == (3, 64, 64)
    assert bench_models.input_shape("spikingresformer_dvsg") == (2, 32, 32)
    assert bench_models.input_shape("spiking_cnn", size=28) == (3, 28, 28)
    with pytest.raises(ValueError, match="no model matches"):
        bench.run(_parse(["models", "--models", "nope*", "--doc", str(tmp_path / "d.md")]))
    with pytest.raises(ValueError, match="--batch"):
        bench.run(_parse(["models", "--batch", "0", "--doc", str(tmp_path / "d.md")]))


def test_section_option_writes_a_second_section_and_keeps_the_default(tmp_path, capsys):
    doc, out = tmp_path / "benchmarks.md", tmp_path / "models-b2.csv"
    doc.write_text("# Benchmarks\n\n## models\n\nthe default run stays\n")
    argv = ["models", "--models", "spiking_cnn", "--batch", "2", "--T", "2", "--size", "16"]
    argv += ["--iters", "1", "--warmup", "0", "--out", str(out), "--doc", str(doc)]
    assert bench.run(_parse([*argv, "--section", "models (batch 2)"])) == 0
    text = doc.read_text()
    assert "the default run stays" in text
    assert text.index("## models\n") < text.index("## models (batch 2)")
    assert "| spiking_cnn |" in text[text.index("## models (batch 2)") :]
    assert "'## models (batch 2)' section" in capsys.readouterr().out
    again = [*argv, "--section", "models (batch 2)", "--note", "two other jobs ran"]
    assert bench.run(_parse(again)) == 0  # replaced, not added
    assert doc.read_text().count("## models (batch 2)") == 1
    assert "Note: two other jobs ran" in doc.read_text()
