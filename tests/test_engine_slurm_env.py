"""`dassdp train` under a plain `srun` (no torchrun, issue 20): the ranks come from SLURM's
variables (an srun step's only), and one visible GPU per task is cuda:0. The 2-process run
itself (2 srun tasks train exactly what `--nproc 2` trains) is in test_distributed_train.py."""

from __future__ import annotations

import pytest
import torch

from dassdp.engine import distributed
from dassdp.engine.distributed import first_host, pick_device, slurm_environment

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
