"""The GPU-completing bench code on the CPU: AMP options, peak memory, kernel / op counts,
``bench syncs`` with its before column, and ``scripts/gpu_check.sh`` (syntax, and every
benchmark command it runs parses with the real CLI)."""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import pytest
import torch

from dassdp.bench import counters, harness, syncs
from dassdp.commands import bench
from dassdp.engine.precision import optimizer_stepped

ROOT = Path(__file__).resolve().parent.parent


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    return parser.parse_args(argv)


# ----------------------------------------------------------- harness and counters
def test_amp_helpers_and_bad_value():
    assert harness.grad_scaler("cpu", "none") is None
    assert harness.grad_scaler("cpu", "bf16") is None
    assert isinstance(harness.grad_scaler("cpu", "fp16"), torch.amp.GradScaler)
    with harness.autocast("cpu", "bf16"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with harness.autocast("cpu", "none"):
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ValueError, match=r"--amp must be one of .*'fp8'"):
        harness.autocast("cpu", "fp8")


def test_scaler_stepped_is_a_device_flag_false_exactly_on_a_skip():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = harness.grad_scaler("cpu", "fp16")
    flags = []
    for bad in (False, True):
        opt.zero_grad()
        scaler.scale((w * (float("inf") if bad else 1.0)).sum()).backward()
        scaler.step(opt)
        flag = optimizer_stepped(scaler, opt)  # what the benchmarks use, as the engine does
        scaler.update()
        assert isinstance(flag, torch.Tensor) and flag.dtype == torch.bool and flag.dim() == 0
        flags.append(bool(flag))
    assert flags == [True, False]


def test_counts_and_peak_memory_on_the_cpu():
    x = torch.ones(4)
    n, out = counters.count_kernels(lambda: (x + 1) * 2, "cpu")
    assert n == 2 and torch.equal(out, torch.full((4,), 4.0))
    assert "aten ops" in counters.kernel_unit("cpu")
    assert harness.memory_kind("cpu") == "process peak RSS"
    harness.reset_peak_memory("cpu")
    assert harness.peak_memory_mib("cpu") > 10  # torch alone is far above 10 MiB


def test_range_device_ms_sums_the_named_ranges():
    class Ev:
        def __init__(self, name, us):
            self.name, self.device_time_total = name, us

    class Prof:
        def events(self):
            return [Ev("a", 1000.0), Ev("b", 500.0), Ev("a", 250.0), Ev("c", 9.0)]

    assert counters.range_device_ms(Prof(), ("a", "b", "z")) == {"a": 1.25, "b": 0.5, "z": 0.0}


# --------------------------------------------------------------------------- syncs
def test_count_ops_sees_each_kind_of_host_sync():
    x = torch.tensor([0.0, 2.0, 0.0, 3.0])

    def work():
        float(x.sum())  # _local_scalar_dense
        torch.tensor(1.5)  # lift_fresh
        x.nonzero()
        x.masked_select(x > 0)

    counts, _ = counters.count_ops(work)
    total, detail = counters.syncs_of(counts)
    assert total >= 4 and counts["ops"] > total
    for op in counters.SYNC_OPS:
        assert counts[op] >= 1, op
        assert op in detail


def test_lif_kernels_count_compute_ops_and_triton_launches(monkeypatch):
    """One LIF layer forward + backward: the Triton backend is its two launches (forward,
    backward) and nothing else; the torch and loop backends launch many kernels."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(4, 2, 8, requires_grad=True)
    per_backend = {}
    for backend in ("loop", "torch", "triton"):
        neuron = syncs.lif_factory(backend)()
        with counters.count_triton_launches() as launches:
            counts, _ = counters.count_ops(lambda n=neuron: n(x).sum().backward())
        per_backend[backend] = (counts["kernels"], launches["launches"])
    assert per_backend["triton"][1] == 2  # one forward kernel, one backward kernel
    # outside the kernels: the loss's sum and its backward fill, and the grad accumulation
    assert per_backend["triton"][0] <= 4
    assert per_backend["torch"][1] == per_backend["loop"][1] == 0
    assert per_backend["loop"][0] > per_backend["torch"][0] > 10
    counts, _ = counters.count_ops(lambda: torch.empty(3).view(1, 3).t().detach())
    assert counts["ops"] >= 3 and counts["kernels"] == 0


def test_lif_factory_backends():
    from dassdp.neurons import LIF

    assert isinstance(syncs.lif_factory("loop")(), LIF)
    assert isinstance(syncs.lif_factory("torch")(), LIF)
    with pytest.raises(ValueError, match="backend must be one of"):
        syncs.lif_factory("cupy")


def test_bench_syncs_tiny_run_writes_before_and_after(tmp_path, capsys):
    doc, out, before = tmp_path / "b.md", tmp_path / "syncs.csv", tmp_path / "before.csv"
    before.write_text(
        "quantity,backend,count,detail\nplast_step_syncs_active,torch,15,x\nlif_ops,torch,65,\n"
    )
    doc.write_text("# Benchmarks\n\n## syncs\n\nstale\n\n## rule\n\nstays\n")
    argv = ["syncs", "--model", "spiking_cnn", "--backends", "torch", "--T", "2"]
    argv += ["--batch", "2", "--size", "16", "--lif-channels", "4"]
    argv += ["--before", str(before), "--out", str(out), "--doc", str(doc)]
    assert bench.run(_parse(argv)) == 0
    rows = list(csv.DictReader(out.open()))
    got = {r["quantity"]: int(r["count"]) for r in rows}
    assert set(got) == {q for q, _ in syncs.QUANTITIES if "cuda" not in q}
    assert got["lif_ops"] > 0 and got["step_ops_active"] > got["lif_ops"]
    assert 0 < got["lif_kernels"] < got["lif_ops"]
    assert all(r["backend"] == "torch" for r in rows)
    text = doc.read_text()
    assert "stale" not in text and "stays" in text and text.count("## syncs") == 1
    section = text[text.index("## syncs") : text.index("## rule")]
    active = got["plast_step_syncs_active"]
    assert f"| host syncs: DASSDP.step (active) | torch | 15 | {active} |" in section
    assert "| host syncs: DASSDP.step (warm-up) | torch | n/a |" in section
    assert "command: `dassdp" in section and "81cbbaa" in section
    assert "DASSDP.step" in capsys.readouterr().out


def test_committed_before_csv_has_the_base_counts():
    rows = syncs.read_rows(ROOT / syncs.BEFORE_CSV)
    assert rows[("fwd_bwd_syncs_warmup", "torch")] == "38"
    assert rows[("plast_step_syncs_warmup", "torch")] == "5"
    assert rows[("plast_step_syncs_active", "torch")] == "15"


def test_bench_syncs_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="--T"):
        bench.run(_parse(["syncs", "--T", "0", "--doc", str(tmp_path / "d.md")]))


# ------------------------------------------------------------- models / overhead / ...
@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_bench_models_amp_rows_with_optimizer_in_fresh_processes(tmp_path):
    doc, out = tmp_path / "b.md", tmp_path / "m.csv"
    argv = ["models", "--models", "spiking_cnn", "--batch", "2", "--T", "2", "--size", "16"]
    argv += ["--iters", "1", "--warmup", "0", "--amp", "none", "bf16"]
    argv += ["--fresh-process", "--out", str(out), "--doc", str(doc)]
    assert bench.run(_parse(argv)) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["amp"] for r in rows] == ["none", "bf16"]
    for r in rows:
        assert r["step"] == "fwd+bwd+adamw" and r["device"] == "cpu"
        assert float(r["peak_mem_mib"]) > 10 and r["mem_kind"] == "process peak RSS"
    text = doc.read_text()
    assert "| cpu | bf16 | fwd+bwd+adamw |" in text and "CPU bfloat16 support:" in text


@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_bench_overhead_bf16_records_amp_and_peak_memory(tmp_path):
    doc, out = tmp_path / "b.md", tmp_path / "o.csv"
    argv = ["overhead", "--batch", "1", "--size", "8", "--T", "2", "--reps", "1"]
    argv += ["--amp", "bf16", "--out", str(out), "--doc", str(doc)]
    assert bench.run(_parse(argv)) == 0
    rows = list(csv.DictReader(out.open()))
    assert {r["amp"] for r in rows} == {"bf16"}
    assert all(float(r["peak_mem_mib"]) > 10 for r in rows)
    assert all(r["own_time"] == "host wall time" for r in rows)
    assert {r["condition"]: r["applied"] for r in rows}["active"] == "1"
    assert "| bf16 | active |" in doc.read_text()


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_bench_throughput_without_spikingjelly_and_with_kernel_counts(tmp_path):
    doc, out = tmp_path / "b.md", tmp_path / "t.csv"
    argv = ["throughput", "--batch", "1", "--size", "8", "--T", "2", "--reps", "1"]
    argv += ["--neuron-channels", "4", "--neuron-reps", "2", "--neurons", "dassdp"]
    argv += ["dassdp-loop", "--amp", "bf16", "--out", str(out), "--doc", str(doc)]
    assert bench.run(_parse(argv)) == 0
    rows = list(csv.DictReader(out.open()))
    assert [r["backend"] for r in rows] == ["dassdp", "dassdp-loop"]
    for r in rows:
        assert r["amp"] == "bf16" and int(r["kernels_per_step"]) > 100
        assert r["ratio_ours_over_sj"] == "" and r["target_met"] == ""
        assert float(r["peak_mem_mib"]) > 10 and "aten ops" in r["kernel_unit"]
    # the autograd loop dispatches more ops than the fused kernel
    assert int(rows[1]["kernels_per_step"]) > int(rows[0]["kernels_per_step"])
    text = doc.read_text()
    assert "| spikingresformer_cifar | dassdp-loop | 1 | 3x8x8 | 2 | bf16 |" in text
    assert "aten ops dispatched" in text


def test_bench_ddp_cuda_without_a_gpu_is_a_clear_error(tmp_path):
    from dassdp.bench.ddp import job_config

    assert job_config(64, 1, 2, 512, "cuda")["device"] == "cuda"
    if torch.cuda.is_available():
        return
    with pytest.raises(ValueError, match="no CUDA device"):
        bench.run(_parse(["ddp", "--nproc", "1", "--device", "cuda", "--doc", str(tmp_path)]))
