"""What ``scripts/gpu_check.sh`` checks before it spends device time (standard library only).

``python scripts/gpu_preflight.py check [--no-cuda]``
    Imports every package the check needs and prints one line each: ``ok``, ``MISSING``
    (required: the line says what failed and how to get it) or ``absent`` (optional: the step
    that uses it runs without it). Exit status 1 if a required package (or, without
    ``--no-cuda``, a CUDA device) is missing, else 0.

``python scripts/gpu_preflight.py wheels DIR TARGET``
    Installs, offline, the wheels in ``DIR`` whose package does not import here into
    ``TARGET`` (``pip install --no-index --no-deps --target``; a pure-Python wheel is unpacked
    directly where pip is unusable). Packages already installed are left alone, so a wheel
    never shadows the machine's own copy. Exit status 1 if the install failed.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

WHEELS_HINT = "run `make wheels` on a machine with network and carry .whl/ (scripts/gpu_check.sh)"
MACHINE_HINT = "install it on the GPU machine (a dependency of dassdp, not in .whl/)"

# (module to import, name shown, how to get it)
REQUIRED = [
    ("torch", "torch", MACHINE_HINT),
    ("triton", "triton", MACHINE_HINT),
    ("timm", "timm", MACHINE_HINT),
    ("torchvision", "torchvision", MACHINE_HINT),
    ("numpy", "numpy", MACHINE_HINT),
    ("scipy", "scipy", MACHINE_HINT),
    ("yaml", "PyYAML", MACHINE_HINT),
    ("matplotlib", "matplotlib", MACHINE_HINT),
    ("tqdm", "tqdm", MACHINE_HINT),
    ("pytest", "pytest", WHEELS_HINT),
]
# (module to import, name shown, what runs without it)
OPTIONAL = [
    (
        "spikingjelly.activation_based.neuron",
        "spikingjelly",
        "bench throughput runs without its spikingjelly row (`make wheels` puts SpikingJelly "
        "2.0.0 and loguru into .whl/)",
    ),
]


def _import(module: str, name: str) -> tuple[str | None, str]:
    """``(version or None if the import failed, error text)``; any exception counts."""
    try:
        importlib.import_module(module)
    except Exception as err:  # a broken install raises more than ImportError
        return None, f"{type(err).__name__}: {err}"
    version = getattr(sys.modules[module.split(".")[0]], "__version__", None)
    if version is None:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "(version unknown)"
    return str(version), ""


def _cuda_line() -> tuple[bool, str]:
    """Whether torch sees a CUDA device, and a line saying what it sees."""
    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        return False, (
            f"MISSING  a CUDA device (required): torch {torch.__version__} (built for CUDA "
            f"{torch.version.cuda}) sees none"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    cap = ".".join(map(str, torch.cuda.get_device_capability(0)))
    return True, (
        f"ok       CUDA {torch.version.cuda}: {len(names)} device(s), {', '.join(names)}, "
        f"capability {cap}"
    )


def check(need_cuda: bool) -> int:
    """Print one line per package (and the CUDA device); return the exit status."""
    print(f"ok       python {sys.version.split()[0]} ({sys.executable})")
    missing = []
    for module, name, hint in REQUIRED:
        version, err = _import(module, name)
        if version is None:
            missing.append(name)
            print(f"MISSING  {name} (required): {err} -- {hint}")
        else:
            print(f"ok       {name} {version}")
    if "torch" not in missing:
        if need_cuda:
            ok, line = _cuda_line()
            print(line)
            if not ok:
                missing.append("a CUDA device")
        else:
            print("skipped  the CUDA device check (--no-cuda)")
    for module, name, without in OPTIONAL:
        version, err = _import(module, name)
        if version is None:
            print(f"absent   {name} (optional): {err} -- {without}")
        else:
            print(f"ok       {name} {version} (optional)")
    if missing:
        print(f"preflight: missing required: {', '.join(missing)}")
        return 1
    print("preflight: every required package imports")
    return 0


def _module_of(wheel: Path) -> str:
    """The import name of a wheel's package: its distribution name (the file name's first
    field), lower-cased (true of every wheel `make wheels` fetches)."""
    return wheel.name.split("-")[0].lower()


def wheels(src: Path, target: Path) -> int:
    """Install the wheels of ``src`` whose package does not import into ``target``."""
    found = sorted(src.glob("*.whl"))
    todo = [w for w in found if importlib.util.find_spec(_module_of(w)) is None]
    for w in found:
        print(f"wheels: {w.name}: {'installing' if w in todo else 'already installed, kept'}")
    if not todo:
        return 0
    target.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps"]
    cmd += ["--no-compile", "--disable-pip-version-check", "--target", str(target)]
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}  # quiet as root on a fresh machine
    done = subprocess.run([*cmd, *map(str, todo)], check=False, env=env)
    if done.returncode == 0:
        return 0
    print(f"wheels: pip exited {done.returncode}; unpacking the pure-Python wheels instead")
    status = 0
    for w in todo:
        if not w.name.endswith("-none-any.whl"):
            print(f"wheels: {w.name} is not pure Python: cannot unpack it without pip")
            status = 1
            continue
        with zipfile.ZipFile(w) as archive:
            archive.extractall(target)
    return status


def main(argv: list[str]) -> int:
    if argv[:1] == ["check"] and argv[1:] in ([], ["--no-cuda"]):
        return check(need_cuda=argv[1:] != ["--no-cuda"])
    if argv[:1] == ["wheels"] and len(argv) == 3:
        return wheels(Path(argv[1]), Path(argv[2]))
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
