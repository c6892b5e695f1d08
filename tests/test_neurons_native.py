"""The compiled-kernel cache (:mod:`dassdp._util.native`): a cached library is verified
(size and sha256 recorded at build) before it is loaded, a bad one is rebuilt, and a cache
that cannot be used is a fallback to the torch backend with one warning naming the path (an
error when ``backend="cpu"`` is asked for by name).

The damaged-library cases crashed every run before (SIGBUS, SIGSEGV, AttributeError), so
they run in a fresh process each: the first run fills the cache with the code under test, the
library it wrote is damaged, and a second run must train on.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import dassdp
from dassdp._util import native as _native
from dassdp.neurons import LIF
from dassdp.neurons.backends import cpu

pytestmark = pytest.mark.skipif(
    _native.compiler() is None, reason="needs a C compiler (cc, gcc or clang)"
)
SRC = str(Path(dassdp.__file__).parents[1])

# Old API only (it must run against the code before the fix too): a cpu-backend LIF step.
RUN_CPU = """
import torch
from dassdp.neurons import LIF
x = (2 * torch.rand(3, 2, 4096)).requires_grad_(True)
s = LIF(backend="cpu")(x)
s.sum().backward()
ref = LIF(backend="torch")(x.detach())
print("RAN", type(s.grad_fn).__name__, bool(torch.equal(s, ref)))
"""

# A training step of spiking_cnn with backend "auto" (its first LIF layers are large enough
# for the cpu backend), then backend "cpu" by name; what ran, the error, the warnings.
TRAIN_STEP = """
import json, warnings
import torch
from dassdp.models import create_model
from dassdp.neurons import LIF, resolved_backends
torch.manual_seed(0)
with warnings.catch_warnings(record=True) as record:
    warnings.simplefilter("always")
    model = create_model("spiking_cnn", num_classes=10, T=2, in_channels=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.rand(2, 1, 28, 28), torch.tensor([1, 2])
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    try:
        LIF(backend="cpu")(torch.rand(2, 1, 8))
        error = None
    except RuntimeError as err:
        error = str(err)
print(json.dumps({
    "ran": resolved_backends(model), "loss": float(loss), "error": error,
    "warnings": [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)],
}))
"""


def _without_root_powers() -> None:
    """In the child before ``exec``: drop the capabilities that let root write into (or read)
    any folder (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, CAP_FOWNER) from the bounding set, so
    the exec'd Python, still root, is held to the folders' permission bits."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def _child(
    code: str, cache: Path | str, *, unprivileged: bool = False
) -> subprocess.CompletedProcess:
    """``code`` in a fresh Python with ``DASSDP_KERNEL_CACHE=cache``; ``unprivileged``: held
    to file permissions even when the tests run as root (root may write anywhere)."""
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1", _native.CACHE_ENV: str(cache)}
    env.pop(cpu.ENV, None)
    preexec = _without_root_powers if unprivileged and os.geteuid() == 0 else None
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
        preexec_fn=preexec,
    )  # fmt: skip


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory) -> Path:
    """A cache folder holding the library the code under test builds (one fresh run)."""
    cache = tmp_path_factory.mktemp("filled") / "kernels"
    done = _child(RUN_CPU, cache)
    assert done.returncode == 0 and "RAN CpuLIFBackward True" in done.stdout, done.stderr
    return cache


def _the_library(cache: Path) -> Path:
    (lib,) = cache.glob("lif_*.so")
    return lib


def _truncate(lib: Path, tmp: Path) -> None:
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 2])


def _zero_text(lib: Path, tmp: Path) -> None:
    """Zero the ``.text`` section (the machine code) of an ELF64 library in place."""
    data = bytearray(lib.read_bytes())
    u16, u32, u64 = ((lambda o, n=n: int.from_bytes(data[o : o + n], "little")) for n in (2, 4, 8))
    shoff, shentsize, shnum, shstrndx = u64(0x28), u16(0x3A), u16(0x3C), u16(0x3E)
    names = u64(shoff + shstrndx * shentsize + 0x18)  # offset of the section-name table
    for i in range(shnum):
        header = shoff + i * shentsize
        if data[names + u32(header) :].startswith(b".text\0"):
            offset, size = u64(header + 0x18), u64(header + 0x20)
            data[offset : offset + size] = bytes(size)
            lib.write_bytes(bytes(data))
            return
    raise AssertionError(f"no .text section in {lib}")


def _foreign(lib: Path, tmp: Path) -> None:
    """Another library (without the LIF kernels) under the kernel's name."""
    (tmp / "other.c").write_text("int not_the_lif(void) { return 7; }\n")
    cc = _native.compiler()
    subprocess.run([cc, "-shared", "-fPIC", "other.c", "-o", "other.so"], cwd=tmp, check=True)
    shutil.copyfile(tmp / "other.so", lib)


@pytest.mark.parametrize("damage", [_truncate, _zero_text, _foreign], ids=lambda f: f.__name__)
def test_a_damaged_cached_library_is_rebuilt_not_loaded(filled_cache, tmp_path, damage):
    cache = tmp_path / "kernels"
    shutil.copytree(filled_cache, cache)
    lib = _the_library(cache)
    good = lib.read_bytes()
    damage(lib, tmp_path)
    assert lib.read_bytes() != good
    done = _child(RUN_CPU, cache)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "RAN CpuLIFBackward True" in done.stdout
    assert f"the cached library {lib} failed verification" in done.stderr
    assert _the_library(cache).read_bytes() == good  # rebuilt: the same library again


@pytest.fixture
def shared_dir(tmp_path):
    """A folder whose read-only parts are made writable again for the clean-up."""
    yield tmp_path
    for path in tmp_path.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _train_step(cache: Path | str, *, unprivileged: bool = False) -> dict:
    done = _child(TRAIN_STEP, cache, unprivileged=unprivileged)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_read_only_empty_cache_falls_back_to_torch_with_one_warning(shared_dir):
    cache = shared_dir / "kernels"
    cache.mkdir()
    cache.chmod(0o555)  # read and enter, no writing
    out = _train_step(cache, unprivileged=True)
    assert set(out["ran"]) == {"torch"} and out["loss"] == out["loss"]  # trained on, finite
    (warning,) = [w for w in out["warnings"] if "compiled CPU LIF is off" in w]
    assert f"the kernel cache {cache} is not writable" in warning
    assert f"{cache} is not writable" in out["error"]  # by name: the error
    assert list(cache.iterdir()) == []


def test_a_read_only_cache_with_a_good_library_is_used(filled_cache, shared_dir):
    cache = shared_dir / "kernels"
    shutil.copytree(filled_cache, cache)
    for path in (*cache.iterdir(), cache):
        path.chmod(0o555 if path.is_dir() else 0o444)
    out = _train_step(cache, unprivileged=True)
    assert "cpu" in out["ran"] and out["error"] is None and out["warnings"] == []


@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_a_cache_path_that_is_a_file_falls_back_naming_it(tmp_path, monkeypatch, where):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    cache = blocker if where == "file" else blocker / "kernels"
    monkeypatch.setenv(_native.CACHE_ENV, str(cache))
    monkeypatch.delenv(cpu.ENV, raising=False)
    monkeypatch.setattr(cpu, "_LIB", [])  # nothing loaded yet in this "process"
    monkeypatch.setattr(cpu, "_FAILED", [])
    x = torch.rand(2, 1, cpu.MIN_NEURONS).requires_grad_(True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        layers = [LIF(), LIF()]
        outs = [layer(x) for layer in layers]
    assert all(type(o.grad_fn).__name__ == "_FusedLIFBackward" for o in outs)
    (warning,) = [str(w.message) for w in record if "CPU LIF is off" in str(w.message)]
    assert str(cache) in warning
    with pytest.raises(RuntimeError, match="kernel cache") as err:
        LIF(backend="cpu")(x)
    assert str(cache) in str(err.value)


def test_the_library_is_named_by_its_size_and_sha256(filled_cache):
    import hashlib

    lib = _the_library(filled_cache)
    _, _key, size, digest = lib.stem.split("_")
    data = lib.read_bytes()
    assert int(size) == len(data) and digest == hashlib.sha256(data).hexdigest()
