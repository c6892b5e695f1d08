"""Failures of the `dassdp` commands as a user meets them (issue 23): one line naming the
cause and the path or key, exit status 1, 2 or 130, nothing half-written; `--nproc` ranks
that end with their launcher; `key=value` overrides anywhere after the command."""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from dassdp.cli import main
from dassdp.engine import load_checkpoint, read_metrics
from engine_fixtures import tiny_dict


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_dict(**changes)))
    return path


def one_error_line(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


def dassdp(*argv: str, **kwargs) -> subprocess.Popen:
    """``python -m dassdp ARGV`` in a child process (text pipes)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "dassdp", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kwargs,
    )


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert path.exists(), f"{path} did not appear (exit {proc.poll()}): {proc.stderr.read()}"


# ---------------------------------------------------------------- OSError about a path


def test_a_lock_that_is_a_folder_is_one_line_naming_it(tmp_path, capsys):
    """Regression: a traceback (IsADirectoryError) instead of a line."""
    config, run = write_config(tmp_path), tmp_path / "run"
    (run / ".lock").mkdir(parents=True)
    assert main(["train", "-c", str(config), "--out", str(run)]) == 1
    assert f"dassdp train: error: {run / '.lock'}: is a directory" in one_error_line(capsys)
    assert [p.name for p in run.iterdir()] == [".lock"]


def test_a_read_only_run_folder_is_one_line_naming_the_path(tmp_path, capsys, monkeypatch):
    """Regression: PermissionError tracebacks. The tests run as root, whom no mode stops, so
    the folder refuses new files through os.open, as a read-only mount would."""
    config, run = write_config(tmp_path), tmp_path / "run"
    run.mkdir()
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if Path(path).parent == run and flags & os.O_CREAT:
            raise PermissionError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    assert main(["train", "-c", str(config), "--out", str(run)]) == 1
    assert f"{run / '.lock'}: read-only file system" in one_error_line(capsys)
    assert list(run.iterdir()) == []


def test_an_oserror_about_no_path_keeps_its_traceback(monkeypatch):
    """Only errors about a user's path become one line; anything else is a fault to report."""
    import dassdp.commands.ls as ls

    def broken(args):
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(ls, "run", broken)
    with pytest.raises(OSError, match="I/O error"):
        main(["ls", "models"])


@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_a_file_size_limit_while_writing_a_checkpoint_is_one_line_and_keeps_the_last(tmp_path):
    """Regression: `ulimit -f` (or a full disk) while writing last.pt: two chained tracebacks
    ending in "unexpected pos". The previous last.pt stays as it was."""
    config, run = write_config(tmp_path, epochs=3), tmp_path / "run"
    first = dassdp("train", "-c", str(config), "--out", str(run), "--stop-after", "1")
    assert first.wait() == 0, first.stderr.read()
    kept = (run / "last.pt").read_bytes()
    assert len(kept) > 40_000  # the limit below stops the checkpoint, not the small files

    def limit() -> None:  # Python ignores SIGXFSZ: the write fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (32_000, 32_000))

    proc = dassdp("train", "--resume", "--out", str(run), preexec_fn=limit)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    last = err.strip().splitlines()[-1]
    assert last == (
        f"dassdp train: error: file size limit exceeded (ulimit -f) writing {run / 'last.pt'}; "
        "the previous file (if any) is intact"
    ), err
    assert "Traceback" not in err and "unexpected pos" not in err
    assert (run / "last.pt").read_bytes() == kept
    assert sorted(p.name for p in run.iterdir() if ".tmp" in p.name) == []


def test_no_space_left_writing_a_checkpoint_names_it(tmp_path, capsys, monkeypatch):
    """A full disk, as torch.save meets it (an OSError under its RuntimeError)."""
    import dassdp.engine.checkpoint as checkpoint

    config, run = write_config(tmp_path), tmp_path / "run"
    real_save = torch.save

    def disk_full(obj, f, *args, **kwargs):
        if Path(f.name).parent == run:
            try:
                f.write(b"x" * 10)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            except OSError:
                raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")  # noqa: B904
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    assert main(["train", "-c", str(config), "--out", str(run)]) == 1
    err = one_error_line(capsys)
    assert f"error: no space left writing {run / 'last.pt'}" in err
    assert not (run / "last.pt").exists() and not list(run.glob(".last.pt*"))


# ---------------------------------------------------------------- Ctrl-C


def test_sigint_mid_epoch_is_one_line_exit_130_and_the_run_resumes(tmp_path):
    """Regression: Ctrl-C printed a 52-line traceback."""
    config, run = write_config(tmp_path), tmp_path / "run"
    # a shell that starts a job in the background (`cmd &`, no job control) leaves SIGINT
    # ignored, and an ignored signal stays ignored across exec: Python then installs no
    # KeyboardInterrupt handler. The child gets the default, as a terminal's job would.
    proc = dassdp(
        "train", "-c", str(config), "--out", str(run), "epochs=500",
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    try:
        wait_for(run / "last.pt", proc)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    completed = load_checkpoint(run / "last.pt")["epoch"]
    assert line == (
        f"dassdp train: interrupted in epoch {completed + 1}/500; {run / 'last.pt'} holds "
        f"{completed} complete epoch(s); resume with: dassdp train --resume --out {run}"
    )
    argv = ["train", "--resume", "--out", str(run), f"epochs={completed + 1}"]
    assert main(argv) == 0
    assert [r["epoch"] for r in read_metrics(run)] == list(range(completed + 1))


def test_ctrl_c_in_any_command_is_one_line_and_130(monkeypatch, capsys):
    import dassdp.commands.ls as ls

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(ls, "run", interrupted)
    try:
        status = main(["ls", "models"])
    except KeyboardInterrupt:  # not to pytest, which would stop the whole session
        pytest.fail("main() let the KeyboardInterrupt through")
    assert status == 130
    assert capsys.readouterr().err == "dassdp ls: interrupted\n"


# ---------------------------------------------------------------- --nproc


def test_nproc_with_a_config_error_fails_before_launching_the_ranks(tmp_path):
    """Regression: each rank printed the error, then torchrun a 35-line ChildFailedError."""
    config, run = write_config(tmp_path), tmp_path / "run"
    proc = dassdp("train", "-c", str(config), "--out", str(run), "--nproc", "2", "epohcs=3")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.startswith("dassdp train: error: override 'epohcs=3': unknown config key")
    assert len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_nproc_into_a_folder_of_another_run_fails_before_launching(tmp_path, capsys):
    config, run = write_config(tmp_path), tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: config\n")
    assert main(["train", "-c", str(config), "--out", str(run), "--nproc", "2"]) == 2
    assert "config.yaml was not written by dassdp train" in one_error_line(capsys)


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        found = children.get(todo.pop(), [])
        out += found
        todo += found
    return out


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc (Linux)")
@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_sigkill_of_nproc_takes_torchrun_and_the_ranks_with_it(tmp_path):
    """Regression: SIGKILL of `dassdp train --nproc 2` left torchrun and both ranks training,
    reparented to init. Now all its descendants end, and the folder resumes."""
    from dassdp._util.process import process_alive

    config, run = write_config(tmp_path), tmp_path / "run"
    proc = dassdp("train", "-c", str(config), "--out", str(run), "--nproc", "2", "epochs=500")
    descendants: list[int] = []
    try:
        wait_for(run / "last.pt", proc, timeout=300)
        descendants = _descendants(proc.pid)
        assert len(descendants) >= 3, descendants  # torchrun and two ranks
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 15
        while any(map(process_alive, descendants)) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [pid for pid in descendants if process_alive(pid)] == []
    finally:
        proc.kill()
        for pid in descendants:  # leave no orphan behind, whatever happened
            if process_alive(pid):
                os.kill(pid, signal.SIGKILL)
    completed = load_checkpoint(run / "last.pt")["epoch"]
    assert main(["train", "--resume", "--out", str(run), f"epochs={completed + 1}"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == list(range(completed + 1))


# ---------------------------------------------------------------- overrides


def test_overrides_may_follow_options(tmp_path, capsys):
    """Regression: `train -c f --out d lr=0.1` after a first group of overrides was
    "unrecognized arguments"."""
    config, run = write_config(tmp_path), tmp_path / "run"
    argv = ["train", "epochs=3", "-c", str(config), "--out", str(run), "lr=0.01", "seed=3"]
    assert main([*argv, "--stop-after", "1", "T=1"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert (saved["epochs"], saved["lr"], saved["seed"], saved["T"]) == (3, 0.01, 3, 1)
    capsys.readouterr()
    argv = ["eval", "--checkpoint", str(run / "last.pt"), "--json", "batch_size=16"]
    assert main([*argv, "test_subset=32"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["samples"] == 32
    with pytest.raises(SystemExit) as exit_:
        main(["train", "-c", str(config), "--out", str(run), "--bogus"])
    assert exit_.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_override_errors_blame_the_override(tmp_path, capsys):
    """Regression: `seed.x=1` was blamed on the config file. (The others listed in issue 23
    were already blamed right on main; they stay here so that they stay right.)"""
    config, with_seed = write_config(tmp_path), tmp_path / "seeded.yaml"
    with_seed.write_text(yaml.safe_dump(tiny_dict(seed=1)))
    out = ["--out", str(tmp_path / "r")]
    cases = [
        (config, "seed.x=1", "override 'seed.x=1': seed must be int, got {'x': 1}"),
        (with_seed, "seed.x=1", "override 'seed.x=1': seed is 1, a value, not a block of keys"),
        (config, "plasticity.clip=.nan", "override 'plasticity.clip=.nan': plasticity: clip"),
        (config, "plasticity.gate=sometimes", "override 'plasticity.gate=sometimes':"),
    ]
    for path, override, expected in cases:
        assert main(["train", "-c", str(path), *out, override]) == 2
        assert expected in one_error_line(capsys), override
    argv = ["compare", "-c", str(config), "--seeds", "0", "--out", str(tmp_path / "c")]
    assert main([*argv, "--variants", "baseline,dassdp+A_plus=nan", "--dry-run"]) == 2
    assert "override 'plasticity.A_plus=nan'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


# ---------------------------------------------------------------- eval


def test_eval_refuses_non_finite_weights(tmp_path, capsys):
    """Regression: eval of a checkpoint with NaN weights printed an accuracy."""
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    capsys.readouterr()
    state = load_checkpoint(run / "last.pt")
    state["model"]["fc1.weight"][0, 0] = float("inf")
    torch.save(state, tmp_path / "bad.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "bad.pt")]) == 2
    err = one_error_line(capsys)
    assert f"{tmp_path / 'bad.pt'} holds non-finite weights (NaN or inf in fc1.weight)" in err
    assert capsys.readouterr().out == ""


def test_eval_out_ending_with_a_slash_is_a_folder(tmp_path, capsys):
    """Regression: `eval --out no/such/dir/` wrote a file named `dir`."""
    config, run = write_config(tmp_path), tmp_path / "run"
    assert main(["train", "-c", str(config), "--out", str(run), "--stop-after", "1"]) == 0
    out = tmp_path / "no" / "such" / "dir"
    argv = ["eval", "--checkpoint", str(run / "last.pt"), "--drop", "0.1", "--out", f"{out}/"]
    assert main(argv) == 0
    assert json.loads((out / "robustness.json").read_text())["conditions"][1]["name"]
    assert main([*argv[:-1], str(tmp_path / "r.json")]) == 0  # a file path stays a file
    assert (tmp_path / "r.json").is_file()
