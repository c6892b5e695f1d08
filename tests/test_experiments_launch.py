"""`dassdp compare --launcher local|slurm` through submitit (issue 20): the local launcher runs
every run once in its own job and reports exactly what the pool reports; a signalled task
stops at an epoch end, is requeued and ends bit-identical to an uninterrupted run; a
failing task is reported, not requeued, and a rerun resubmits only it; the SLURM array
(script, tasks, states) through fake `sbatch`/`squeue`/`sacct`/`srun` executables."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from dassdp.cli import main
from dassdp.engine import fit, load_checkpoint, read_metrics
from dassdp.experiments.runner import plan
from engine_fixtures import assert_same_tensors, tiny_dict
from fake_slurm import calls, install, sbatch_options

pytestmark = pytest.mark.skipif(os.name != "posix", reason="submitit needs POSIX")
REPO = Path(__file__).resolve().parents[1]
VARIANTS = ["baseline", "dassdp"]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(epochs=2)))
    return path


def _compare(config: Path, out: Path, *args: str) -> list[str]:
    return ["compare", "--config", str(config), "--out", str(out), *args]


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k != "epoch_time_s"} for r in read_metrics(run_dir)]


def _stamps(run_dir: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}


def _starts(out: Path, job: str) -> int:
    """How many times submitit started a job's task 0 (a requeue starts it again)."""
    logs = [out / "jobs" / f"{job}_0_log.{ext}" for ext in ("out", "err")]
    return sum(log.read_text().count("Starting with JobEnvironment") for log in logs)


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 900):
    cmd = [sys.executable, "-m", "dassdp", *args]
    full = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        cmd, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _ok(proc: subprocess.Popen, timeout: float = 1800) -> str:
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


# ---------------------------------------------------------------- local launcher


@pytest.mark.slow  # end to end, minutes; CI runs it (.ci/run: pytest -m slow)
def test_local_launcher_runs_each_run_once_and_reports_like_the_pool(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    seeds = ["--seeds", "0-1", "--variants", ",".join(VARIANTS)]
    pool, local = tmp_path / "pool", tmp_path / "local"
    assert main(_compare(config_file, pool, *seeds)) == 0
    opts = ["--launcher", "local", "--array-parallelism", "2", "--poll-s", "0.2"]
    assert main(_compare(config_file, local, *seeds, *opts)) == 0
    out = capsys.readouterr().out
    assert "[compare] 4 runs: 4 trained, 0 already done, 0 failed" in out
    jobs = json.loads((local / "compare.json").read_text())["invocations"][-1]["jobs"]
    assert len(set(jobs.values())) == 4 and all(jobs.values())
    for spec in plan(config_file, [0, 1], VARIANTS, local):
        run = Path(spec.run_dir)
        meta = json.loads((run / "run.json").read_text())
        assert "resumes" not in meta and meta["launch"]["job_id"] == jobs[spec.label]
        assert _starts(local, jobs[spec.label]) == 1  # every run done exactly once
        twin = pool / spec.variant / f"seed{spec.seed}"
        assert _rows(run) == _rows(twin)
        done, ref = (json.loads((d / "done.json").read_text()) for d in (run, twin))
        assert done["final_test"] == ref["final_test"]  # bit for bit (JSON floats round-trip)
        assert_same_tensors(
            load_checkpoint(run / "last.pt")["model"], load_checkpoint(twin / "last.pt")["model"]
        )
    for table in ("runs.csv", "summary.csv", "curves.csv"):
        assert (local / table).read_text() == (pool / table).read_text(), table
    # everything is done: the same command submits nothing and writes the report again
    assert main(_compare(config_file, local, *seeds, *opts)) == 0
    assert "4 already done" in capsys.readouterr().out
    assert len(json.loads((local / "compare.json").read_text())["invocations"]) == 2


def _wait_for_rows(run: Path, n: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{run}: fewer than {n} epochs after {timeout} s")


def _assert_same_end(run: Path, ref: Path) -> None:
    """The run ends as an uninterrupted one: metrics, weights, optimizer, DA-SSDP state."""
    assert _rows(run) == _rows(ref)
    got, want = load_checkpoint(run / "last.pt"), load_checkpoint(ref / "last.pt")
    for key in ("model", "optimizer", "plasticity", "scheduler", "loader", "epoch"):
        assert_same_tensors(got[key], want[key], key)


@pytest.mark.slow
def test_a_signalled_task_stops_at_an_epoch_end_is_requeued_and_ends_exactly(
    tmp_path: Path,
) -> None:
    """SIGUSR2 (what SLURM sends --signal-delay-s before the time limit): the task finishes
    its epoch (last.pt), submitit requeues it, the new task resumes; same end, bit for bit."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(epochs=5)))
    out = tmp_path / "cmp"
    args = _compare(config, out, "--seeds", "0", "--variants", "dassdp", "--launcher", "local")
    proc = _cli(*args, "--signal-delay-s", "40", "--poll-s", "0.2", "--no-report")
    run = out / "dassdp" / "seed0"
    _wait_for_rows(run, 1, proc)
    os.kill(int((run / ".lock").read_text()), signal.SIGUSR2)  # the rank-0 task process
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stdout + stderr
    log = (run / "train.log").read_text()
    stopped = int(re.search(r"stopping on request after epoch (\d+)", log).group(1))
    assert 1 <= stopped < 5
    meta = json.loads((run / "run.json").read_text())
    assert [r["launch"]["requeues"] for r in meta["resumes"]] == [1]  # one requeue
    assert meta["resumes"][0]["checkpoint"] == str(run / "last.pt")
    job = json.loads((out / "compare.json").read_text())["invocations"][0]["jobs"]["dassdp seed0"]
    assert _starts(out, job) == 2
    ref = tmp_path / "ref"
    fit(plan(config, [0], ["dassdp"], out)[0].resolve(), ref)
    _assert_same_end(run, ref)


# ---------------------------------------------------------------- options and state


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--slurm-partition", "gpu"], "--slurm-partition applies to --launcher local or slurm"),
        (["--gpus-per-run", "2"], "--gpus-per-run applies to --launcher local or slurm"),
        (["--no-wait"], "--no-wait applies to --launcher local or slurm"),
        (["--launcher", "local", "--slurm-qos", "high"], "--slurm-qos applies to --launcher slurm"),
        (["--launcher", "local", "--workers", "2"], "--workers applies to --launcher pool"),
        (["--launcher", "local", "--time-min", "0"], "--time-min must be > 0"),
        (["--launcher", "local", "--gpus-per-run", "-1"], "--gpus-per-run must be >= 0"),
        (["--launcher", "local", "--max-requeues", "9"], "--max-requeues 9: submitit's local"),
        (
            ["--launcher", "local", "--time-min", "1", "--signal-delay-s", "60"],
            "--signal-delay-s 60 must be shorter than --time-min 1",
        ),
        (["--launcher", "slurm"], "--launcher slurm needs --time-min"),
        (["--launcher", "slurm", "--time-min", "10.5"], "whole minutes, got 10.5"),
        (["--launcher", "slurm", "--time-min", "5"], "sbatch and srun not found on PATH"),
        (
            ["--launcher", "slurm", "--time-min", "5", "--slurm-extra", "mail"],
            "--slurm-extra 'mail': give KEY=VALUE",
        ),
    ],
)
def test_bad_launcher_options_are_one_error_naming_the_option(
    config_file, tmp_path, monkeypatch, capsys, args, message
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no SLURM commands here
    assert main(_compare(config_file, tmp_path / "cmp", *args)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()  # nothing was started or created


def test_status_shows_done_running_failed_interrupted_and_not_started(
    config_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    specs = plan(config_file, [0, 1, 2], VARIANTS, out)
    assert (
        main(_compare(config_file, out, "--seeds", "0", "--variants", "baseline", "--no-report"))
        == 0
    )
    dirs = [Path(s.run_dir) for s in specs]
    fit(specs[1].resolve(), dirs[1], stop_after=1)  # dassdp seed0: interrupted
    dirs[2].mkdir(parents=True)
    error = {"error": "TrainingDiverged: training diverged in epoch 2: non-finite\nmore"}
    (dirs[2] / "failed.json").write_text(json.dumps(error))
    dirs[3].mkdir(parents=True)
    (dirs[3] / ".lock.excl").write_text(
        json.dumps({"host": os.uname().nodename, "pid": os.getpid()})
    )
    capsys.readouterr()
    argv = _compare(config_file, out, "--seeds", "0-2", "--variants", ",".join(VARIANTS))
    assert main([*argv, "--status"]) == 0
    lines = dict(re.findall(r"^(\S+ seed\d)\s+\S+\s+(.*)$", capsys.readouterr().out, re.M))
    assert lines["baseline seed0"].startswith("done (final acc@1 ")
    assert lines["dassdp seed0"] == "interrupted (will resume)"
    assert (
        lines["baseline seed1"]
        == "failed: TrainingDiverged: training diverged in epoch 2: non-finite"
    )
    assert lines["dassdp seed1"] == f"running (pid {os.getpid()} on {os.uname().nodename})"
    assert lines["baseline seed2"] == lines["dassdp seed2"] == "not started"
    assert main([*argv, "--dry-run"]) == 0  # the same listing
    assert "not started" in capsys.readouterr().out


def test_a_second_compare_on_a_folder_in_use_is_refused(
    config_file: Path, tmp_path: Path, capsys
) -> None:
    """The first compare holds OUT/.lock while it runs (the pool, or a waiting launcher)."""
    from dassdp.engine.rundir import RunLock

    out = tmp_path / "cmp"
    out.mkdir()
    held = RunLock(out)  # what a running `dassdp compare` holds
    try:
        assert main(_compare(config_file, out, "--seeds", "0", "--variants", "baseline")) == 2
        assert f"another dassdp compare uses {out}" in capsys.readouterr().err
        assert not (out / "baseline").exists()
    finally:
        held.release()


def test_a_failed_run_leaves_its_error_in_failed_json_until_it_is_retried(
    config_file: Path, tmp_path: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    args = _compare(config_file, out, "--seeds", "0", "--variants", "lr=1e6", "--no-report")
    assert main(args) == 1
    assert "lr=1e6 seed0: TrainingDiverged: training diverged in epoch 2" in capsys.readouterr().err
    failed = out / "lr=1e6" / "seed0" / "failed.json"
    assert json.loads(failed.read_text())["error"].startswith("TrainingDiverged: training")
    assert main([*args, "--status"]) == 0
    assert "failed: TrainingDiverged: training diverged in epoch 2" in capsys.readouterr().out
    retry = out / "baseline" / "seed0"  # an earlier failure is cleared when the run starts
    retry.mkdir(parents=True)
    (retry / "failed.json").write_text(json.dumps({"error": "OSError: disk full"}))
    assert (
        main(_compare(config_file, out, "--seeds", "0", "--variants", "baseline", "--no-report"))
        == 0
    )
    assert not (retry / "failed.json").exists() and (retry / "done.json").is_file()


# ---------------------------------------------------------------- SLURM (fake executables)


@pytest.fixture
def fake_slurm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The fake SLURM commands first on PATH; returns their state folder."""
    env = install(tmp_path / "bin", tmp_path / "slurm")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return tmp_path / "slurm"


def _task_folders(out: Path, array: str, n: int) -> list[str]:
    """The run folder each array task resolves to (its submitted pickle)."""
    from submitit.core.utils import DelayedSubmission

    subs = [DelayedSubmission.load(out / "jobs" / f"{array}_{i}_submitted.pkl") for i in range(n)]
    return [sub.function.spec.run_dir for sub in subs]


def test_slurm_array_script_tasks_states_and_resubmission(
    config_file: Path, tmp_path: Path, fake_slurm: Path, capsys
) -> None:
    out = tmp_path / "cmp"
    grid = ["--seeds", "0-1", "--variants", ",".join(VARIANTS)]
    slurm = ["--launcher", "slurm", "--slurm-partition", "gpu", "--slurm-account", "proj"]
    slurm += ["--slurm-qos", "normal", "--slurm-constraint", "a100", "--time-min", "120"]
    slurm += ["--gpus-per-run", "2", "--cpus-per-gpu", "8", "--mem-gb", "64"]
    slurm += ["--array-parallelism", "3", "--signal-delay-s", "240", "--max-requeues", "2"]
    slurm += ["--slurm-setup", "module load cuda/12.4", "--slurm-setup", "source env.sh"]
    slurm += ["--slurm-extra", "mail-type=END", "--no-wait"]
    argv = _compare(config_file, out, *grid, *slurm)
    assert main(argv) == 0
    assert "submitted 4 runs as SLURM job array 4242" in capsys.readouterr().out
    assert len(calls(fake_slurm, "sbatch")) == 1
    script = (fake_slurm / "4242.sh").read_text()
    opts = sbatch_options(script)
    assert opts["array"] == "0-3%3" and opts["partition"] == "gpu" and opts["time"] == "120"
    assert opts["gpus-per-node"] == "2" and opts["ntasks-per-node"] == "2"
    assert opts["cpus-per-task"] == "8" and opts["mem"] == "64GB" and opts["nodes"] == "1"
    assert opts["signal"] == "USR2@240" and opts["requeue"] == "" and opts["mail-type"] == "END"
    assert (opts["account"], opts["qos"], opts["constraint"]) == ("proj", "normal", "a100")
    assert "\nmodule load cuda/12.4\nsource env.sh\n" in script
    assert re.search(
        r"^srun .* -m submitit\.core\._submit " + re.escape(str(out / "jobs")), script, re.M
    )
    record = json.loads((out / "compare.json").read_text())["invocations"][-1]
    assert record["launcher"] == "slurm" and record["array"] == "4242"
    specs = plan(config_file, [0, 1], VARIANTS, out)
    assert record["jobs"] == {s.label: f"4242_{i}" for i, s in enumerate(specs)}
    assert _task_folders(out, "4242", 4) == [s.run_dir for s in specs]  # task i -> its folder
    task = (
        __import__("submitit")
        .core.utils.DelayedSubmission.load(out / "jobs" / "4242_0_submitted.pkl")
        .function
    )
    assert (task.launcher, task.max_requeues, task.signal_delay_s) == ("slurm", 2, 240)

    # while they are queued or running, a second compare on the folder is refused
    assert main(argv) == 2
    assert "still queued or running: baseline seed0 (job 4242_0)" in capsys.readouterr().err
    assert len(calls(fake_slurm, "sbatch")) == 1
    for job, state in (("4242_1", "RUNNING"), ("4242_2", "FAILED"), ("4242_3", "CANCELLED")):
        (fake_slurm / f"{job}.state").write_text(state)
    Path(specs[2].run_dir).mkdir(parents=True)
    (Path(specs[2].run_dir) / "failed.json").write_text(json.dumps({"error": "ValueError: x"}))
    assert main([*argv, "--status"]) == 0
    status = capsys.readouterr().out
    assert "last submission: slurm job array 4242" in status
    assert re.search(r"baseline seed0 .* queued \(slurm job 4242_0\)", status)
    assert re.search(r"dassdp seed0 .* running \(slurm job 4242_1\)", status)
    assert re.search(r"baseline seed1 .* failed: ValueError: x", status)
    assert re.search(r"dassdp seed1 .* failed \(job 4242_3: CANCELLED; see .*4242_3_0_log", status)

    # all ended; one finished: the rerun submits only the three that are not done
    for job in ("4242_0", "4242_1"):
        (fake_slurm / f"{job}.state").write_text("COMPLETED")
    (Path(specs[0].run_dir)).mkdir(parents=True)
    (Path(specs[0].run_dir) / "done.json").write_text(json.dumps({"final_test_acc1": 50.0}))
    assert main(argv) == 0
    assert sbatch_options((fake_slurm / "4243.sh").read_text())["array"] == "0-2%3"
    assert _task_folders(out, "4243", 3) == [s.run_dir for s in specs[1:]]
    assert not (Path(specs[2].run_dir) / "failed.json").exists()  # the retry writes its own


def _readme_cluster_command() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Running the paper's grid on a cluster") :]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)
    command = block.replace("\\\n", " ").splitlines()[0]
    return shlex.split(command.split("#")[0])


def test_the_readme_cluster_command_submits_the_paper_grid(
    tmp_path: Path, fake_slurm: Path, capsys
) -> None:
    argv = _readme_cluster_command()
    assert argv[:2] == ["dassdp", "compare"] and "--launcher" in argv
    assert argv[argv.index("--config") + 1] == "configs/cifar10.yaml"
    argv[argv.index("--config") + 1] = str(REPO / "configs" / "cifar10.yaml")
    argv[argv.index("--out") + 1] = str(tmp_path / "grid")
    assert main([*argv[1:], "--no-wait"]) == 0
    variants = argv[argv.index("--variants") + 1].split(",")
    assert argv[argv.index("--seeds") + 1] == "0-4" and {"baseline", "dassdp"} <= set(variants)
    opts = sbatch_options((fake_slurm / "4242.sh").read_text())
    n = 5 * len(variants)
    assert opts["array"].startswith(f"0-{n - 1}%") and opts["gpus-per-node"] == "1"
    assert opts["partition"] == argv[argv.index("--slurm-partition") + 1]


# ---------------------------------------------------------------- slow: real processes, minutes


def _startup_s() -> float:
    """Seconds a process needs to import what a task imports (interpreter, torch, dassdp)."""
    start = time.monotonic()
    code = "import dassdp.experiments.launch, dassdp.engine.train"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ})
    return time.monotonic() - start


def _slow_steps(tmp_path: Path, seconds: float) -> dict[str, str]:
    """Environment that makes each training step of the processes started with it sleep
    ``seconds`` first (a ``sitecustomize``): epochs long in wall time, not in computation,
    so the tests' timing holds on a fast or a loaded machine; the numbers do not change."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('DASSDP_TEST_STEP_SLEEP'):\n"
        "    import time\n"
        "    import dassdp.engine.train as t\n"
        "    step = t.Trainer.train_step\n"
        "    def slow(self, *args, **kwargs):\n"
        "        time.sleep(float(os.environ['DASSDP_TEST_STEP_SLEEP']))\n"
        "        return step(self, *args, **kwargs)\n"
        "    t.Trainer.train_step = slow\n"
    )
    path = os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])
    return {"PYTHONPATH": path, "DASSDP_TEST_STEP_SLEEP": str(seconds)}


@pytest.mark.slow
def test_a_task_over_its_time_limit_is_requeued_and_ends_bit_identical(tmp_path: Path) -> None:
    """A real time limit (submitit's local controller signals, then kills). Epochs take
    about 3 s (16 steps of a 0.2 s sleep); the limit leaves each start time for its imports
    and 2-3 epochs, so the 6-epoch run needs requeues (and each start makes progress)."""
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(epochs=6, subset=512)))
    out, ref = tmp_path / "cmp", tmp_path / "ref"
    spec = plan(config, [0], ["dassdp"], out)[0]
    delay = 10  # the task has 5 s to end its epoch, then 5 s to requeue and exit
    limit_s = 2 * _startup_s() + 8 + delay
    args = _compare(config, out, "--seeds", "0", "--variants", "dassdp", "--launcher", "local")
    args += ["--time-min", f"{limit_s / 60:.4f}", "--signal-delay-s", str(delay)]
    args += ["--max-requeues", "5", "--poll-s", "0.2", "--no-report"]
    stdout = _ok(_cli(*args, env=_slow_steps(tmp_path, 0.2)))
    assert "[compare] 1 runs: 1 trained" in stdout
    run = Path(spec.run_dir)
    resumes = json.loads((run / "run.json").read_text())["resumes"]
    requeues = [r["launch"]["requeues"] for r in resumes]
    assert requeues == list(range(1, len(requeues) + 1)) and requeues, requeues
    fit(spec.resolve(), ref)  # the uninterrupted run
    _assert_same_end(run, ref)


@pytest.mark.slow
def test_a_signal_mid_epoch_requeues_from_the_last_checkpoint_and_ends_exactly(
    tmp_path: Path,
) -> None:
    """The epoch does not end within half the signal delay (1 s; epochs take 3 s here): the
    task is requeued at once, mid-epoch, and resumes from the previous epoch's last.pt."""
    config = tmp_path / "slow.yaml"
    config.write_text(yaml.safe_dump(tiny_dict(epochs=3, subset=512)))
    out = tmp_path / "cmp"
    args = _compare(config, out, "--seeds", "0", "--variants", "dassdp", "--launcher", "local")
    args += ["--signal-delay-s", "2", "--poll-s", "0.2", "--no-report"]
    proc = _cli(*args, env=_slow_steps(tmp_path, 0.2))
    run = out / "dassdp" / "seed0"
    _wait_for_rows(run, 1, proc)
    deadline = time.monotonic() + 300
    while not (run / "last.pt").is_file() and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)  # into epoch 2
    os.kill(int((run / ".lock").read_text()), signal.SIGUSR2)
    _ok(proc)
    log = (run / "train.log").read_text()
    assert "stopping on request" not in log  # not at an epoch end: the deadline requeued it
    assert f"resumed from {run / 'last.pt'} at epoch 1" in log
    meta = json.loads((run / "run.json").read_text())
    assert [r["launch"]["requeues"] for r in meta["resumes"]] == [1]
    ref = tmp_path / "ref"
    fit(plan(config, [0], ["dassdp"], out)[0].resolve(), ref)
    _assert_same_end(run, ref)


@pytest.mark.slow
def test_a_failing_run_is_reported_not_requeued_and_a_rerun_resubmits_only_it(
    config_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "cmp"
    args = _compare(config_file, out, "--seeds", "0", "--variants", "baseline,lr=1e6")
    args += ["--launcher", "local", "--poll-s", "0.2", "--no-report", "epochs=3"]
    proc = _cli(*args)
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 1, stdout + stderr
    error = "TrainingDiverged: training diverged in epoch 2"  # mid-run: epoch 1 was fine
    assert re.search(rf"lr=1e6 seed0: FAILED \(job \d+\): {error}", stderr)
    assert "1 trained, 0 already done, 1 failed" in stdout
    bad, good = out / "lr=1e6" / "seed0", out / "baseline" / "seed0"
    failed = json.loads((bad / "failed.json").read_text())
    assert failed["error"].startswith(error) and "Traceback" in failed["traceback"]
    assert "resumes" not in json.loads((bad / "run.json").read_text())  # not requeued
    first = json.loads((out / "compare.json").read_text())["invocations"][0]["jobs"]
    assert _starts(out, first["lr=1e6 seed0"]) == 1
    status = _cli(*args, "--status")
    assert re.search(rf"lr=1e6 seed0 .* failed: {error}", status.communicate()[0])
    before = _stamps(good)

    proc = _cli(*args)  # the same command: only the failed run is submitted again
    stdout, stderr = proc.communicate(timeout=1800)
    assert proc.returncode == 1 and "1 already done, 1 failed" in stdout, stdout + stderr
    second = json.loads((out / "compare.json").read_text())["invocations"][1]["jobs"]
    assert list(second) == ["lr=1e6 seed0"] and second["lr=1e6 seed0"] != first["lr=1e6 seed0"]
    assert _stamps(good) == before


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_runs_of_the_local_and_slurm_launchers_equal_nproc_2(
    tmp_path: Path, fake_slurm: Path
) -> None:
    """--gpus-per-run 2 without GPUs: 2 CPU processes (gloo) per run form one DDP run from
    the job's environment (submitit local; SLURM variables through the fake srun)."""
    config = tmp_path / "ddp.yaml"
    config.write_text(
        yaml.safe_dump(
            tiny_dict(
                model_args={"channels": [4, 8], "hidden": 16, "norm": False, "v_threshold": 0.2},
                batch_size=16,
                plasticity={"A_plus": 1e-2, "A_minus": 2e-3},
            )
        )
    )
    spec_args = ["--seeds", "0", "--variants", "dassdp", "--gpus-per-run", "2", "--no-report"]
    local, slurm, ref = tmp_path / "local", tmp_path / "slurm", tmp_path / "ref"
    _ok(_cli(*_compare(config, local, *spec_args, "--launcher", "local", "--poll-s", "0.2")))
    slurm_args = ["--launcher", "slurm", "--time-min", "60", "--poll-s", "0.5"]
    _ok(_cli(*_compare(config, slurm, *spec_args, *slurm_args), env={"FAKE_SLURM_RUN": "1"}))
    overrides = list(plan(config, [0], ["dassdp"], ref)[0].overrides)
    _ok(_cli("train", "--config", str(config), "--out", str(ref), "--nproc", "2", *overrides))
    for out in (local, slurm):
        run = out / "dassdp" / "seed0"
        assert json.loads((run / "run.json").read_text())["world_size"] == 2
        assert all(r["replicas_identical"] for r in read_metrics(run))
        _assert_same_end(run, ref)
    opts = sbatch_options((fake_slurm / "4242.sh").read_text())
    assert opts["ntasks-per-node"] == opts["gpus-per-node"] == "2"
