"""The wheel carries what the package needs at run time: ``pip wheel`` of the project, installed
into a fresh folder, trains one step on the ``cpu`` LIF backend (whose C source is package
data) in a process whose ``dassdp`` is the installed copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from dassdp._util import native as _native
from engine_fixtures import tiny_dict

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from importlib.resources import files
from pathlib import Path

import dassdp
from dassdp.engine import Trainer, config_from_dict

site, cfg_path, run_dir = sys.argv[1:]
assert Path(dassdp.__file__).resolve().is_relative_to(Path(site).resolve()), dassdp.__file__
source = files("dassdp.neurons.backends") / "cpu_lif.c"
assert Path(str(source)).resolve().is_relative_to(Path(site).resolve()), source
assert source.is_file()
trainer = Trainer(config_from_dict(json.loads(Path(cfg_path).read_text())), run_dir)
try:
    trainer.fit()
finally:
    trainer.close()
print(json.dumps(json.loads((Path(run_dir) / "run.json").read_text())["lif_backends"]))
"""


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-3000:])
    return done


@pytest.mark.skipif(_native.compiler() is None, reason="needs a C compiler (cc, gcc or clang)")
@pytest.mark.slow  # end to end in fresh processes; CI runs it (make test-slow)
def test_the_installed_wheel_trains_a_step_on_the_cpu_backend(tmp_path):
    project = tmp_path / "project"  # a copy: the build writes build/ and *.egg-info into it
    shutil.copytree(
        ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info")
    )
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    dist, site = tmp_path / "dist", tmp_path / "site"
    # --no-build-isolation: build with this environment's setuptools (no download)
    _run([*pip, "wheel", str(project), "--no-deps", "--no-build-isolation", "-w", str(dist)])
    (wheel,) = dist.glob("dassdp-*.whl")
    assert "dassdp/neurons/backends/cpu_lif.c" in zipfile.ZipFile(wheel).namelist()
    _run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)])

    cfg = tiny_dict(epochs=1, plasticity=None, lif_backend="cpu", limit_train_batches=1)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    cache = tmp_path / "kernels"
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    env[_native.CACHE_ENV] = str(cache)
    args = [str(site), str(tmp_path / "cfg.json"), str(tmp_path / "run")]
    done = _run([sys.executable, "-c", CHILD, *args], env=env, cwd=tmp_path)
    record = json.loads(done.stdout.strip().splitlines()[-1])
    # "cpu" by name: a failed build is an error, never a silent fallback; every layer ran it
    assert record["requested"] == "cpu" and list(record["layers"]) == ["cpu"]
    assert record["layers"]["cpu"] >= 3
    assert len(list(cache.glob("lif_*.so"))) == 1  # built from the installed .c
