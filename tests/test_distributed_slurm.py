"""`dassdp train` under a plain `srun` (no torchrun, issue 20): the ranks come from SLURM's
variables, and 2 srun tasks (gloo on CPU) train exactly the run that `--nproc 2` trains."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dassdp.engine import distributed
from dassdp.engine.distributed import first_host, pick_device, slurm_environment
from engine_fixtures import assert_same_tensors, tiny_dict
from fake_slurm import install

STEP = {"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0"}


def test_slurm_variables_give_rank_world_and_master():
    env = {**STEP, "SLURM_JOB_ID": "123456", "SLURM_STEP_NODELIST": "gpu[007-008]"}
    assert slurm_environment(env) == {
        "RANK": "1",
        "WORLD_SIZE": "2",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu007",
        "MASTER_PORT": str(20000 + 123456 % 40000),
    }
    given = {**env, "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29400"}
    assert slurm_environment(given)["MASTER_ADDR"] == "10.0.0.1"
    assert slurm_environment(given)["MASTER_PORT"] == "29400"
    assert slurm_environment({**env, "SLURM_STEP_NUM_TASKS": "4"})["WORLD_SIZE"] == "4"
    assert first_host("cn[01-04,9],gpu2") == "cn01" and first_host("a1,b2") == "a1"


@pytest.mark.parametrize(
    "env",
    [
        {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"},  # no srun step
        {**STEP, "SLURM_STEP_ID": "4294967294"},  # the batch script (its own step)
        {**STEP, "SLURM_STEP_ID": "batch"},
        {**STEP, "SLURM_NTASKS": "1"},  # one task: one process
        {**STEP, "RANK": "0", "WORLD_SIZE": "2"},  # torchrun / submitit already set it
        {},
    ],
)
def test_outside_a_multi_task_srun_step_nothing_is_derived(env):
    assert slurm_environment(env) is None


def test_one_visible_gpu_per_task_is_cuda0(monkeypatch):
    """With SLURM's per-task GPU binding each rank sees one device: cuda:0, not cuda:RANK."""
    monkeypatch.setattr(distributed.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 1)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda:0")
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 4)
    assert pick_device("cuda", local_rank=3) == torch.device("cuda:3")


CONFIG = tiny_dict(
    name="srun",
    model_args={"channels": [4, 8], "hidden": 16, "norm": False, "v_threshold": 0.2},
    epochs=2,
    batch_size=16,
    plasticity={"A_plus": 1e-2, "A_minus": 2e-3},
)


def _rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in rows]


def _ok(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.distributed
def test_two_srun_tasks_form_one_ddp_run_equal_to_nproc_2(tmp_path):
    cfg = tmp_path / "srun.yaml"
    cfg.write_text(yaml.safe_dump(CONFIG))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **install(tmp_path / "bin", tmp_path / "st")}
    train = [sys.executable, "-m", "dassdp", "train", "--config", str(cfg), "--out"]
    ref = _ok([*train, str(tmp_path / "torchrun"), "--nproc", "2"], env)
    slurm = {"SLURM_JOB_ID": "31337", "SLURM_JOB_NODELIST": "localhost"}
    proc = _ok(["srun", "-n", "2", *train, str(tmp_path / "srun")], {**env, **slurm})
    assert proc.stdout.count("run folder:") == 1  # rank 0 alone reports (and writes)
    run = tmp_path / "srun"
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert all(r["replicas_identical"] for r in _rows(run))
    ref_run = tmp_path / "torchrun"
    assert ref.stdout.count("run folder:") == 1
    assert _rows(run) == _rows(ref_run)
    got, want = (torch.load(p / "last.pt", weights_only=False) for p in (run, ref_run))
    assert_same_tensors(got["model"], want["model"], "model")
    assert_same_tensors(got["plasticity"], want["plasticity"], "plasticity")
