"""The memory allocator of a training process on the CPU: the choice, the libraries, the
environment that starts a process with one, and what this process runs with.

This module only reads: it changes nothing about the process. Choosing and installing the
allocator (the ``mallopt`` calls, the re-execution with ``LD_PRELOAD``) is the ``dassdp``
command's job, done once at its start by :mod:`dassdp.commands._launch`; a library user
keeps the allocator their process started with.

A training step allocates and frees activation tensors of tens to hundreds of MiB. glibc
serves every block above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns it with ``munmap`` when freed, so each step faults every page of those tensors in
again (``spikingresformer_cifar``, batch 16, fp32, 1 thread: 0.7-1.2 M minor faults and
20-40 % of the CPU time in the kernel per step). Two fixes, measured in the ``train-step``
sections of ``docs/benchmarks.md``:

* **jemalloc** (or tcmalloc), preloaded: size-class arenas reuse freed blocks of the same
  size step after step, with almost no faults *and* little fragmentation. jemalloc runs with
  ``dirty_decay_ms:-1,muzzy_decay_ms:-1`` (freed pages are kept for reuse, not returned to
  the system and faulted in again; without it jemalloc is slower than glibc). At batch 16:
  1.2-1.3x the images/s of glibc's defaults at 0.78x its peak RSS (the base code, two runs).
* **glibc, tuned** (``mallopt``): ``M_MMAP_MAX = 0`` (large blocks come from the heap,
  reused step after step) and ``M_TRIM_THRESHOLD = -1`` (freed heap is kept): as fast, but
  heap fragmentation raises the peak RSS above glibc's defaults.

A library has to be loaded before the process starts (``LD_PRELOAD``), so the ``dassdp``
command re-executes itself once with the library preloaded (:func:`preload_env` is that
environment). Child processes (data-loader workers, DDP ranks, ``dassdp compare`` runs)
inherit the preload; the glibc settings hold in the process that made them (and its forks).

``DASSDP_ALLOCATOR`` chooses (the table is :data:`CHOICES`):

``auto`` (default)   jemalloc if its library is installed, else tcmalloc, else glibc tuned
``jemalloc``         jemalloc (an error if ``libjemalloc`` is not installed)
``tcmalloc``         tcmalloc (an error if ``libtcmalloc_minimal`` / ``libtcmalloc`` is not)
``glibc``            glibc with the ``mallopt`` settings above
``system``           nothing changed (glibc's defaults)

On Debian / Ubuntu ``apt install libjemalloc2`` installs jemalloc (conda: ``jemalloc``). The
older switch ``DASSDP_MALLOC_TUNE=0`` means ``system``. :func:`active_allocator` says what
this process runs with (a preloaded library is seen in the process's memory map; the glibc
settings by the record :data:`TUNED_ENV` the command leaves); ``dassdp train`` records it in
``run.json`` and the benchmarks next to their numbers.
"""

from __future__ import annotations

import ctypes.util
import glob
import os
import sys
from pathlib import Path

__all__ = [
    "ALLOCATOR_ENV",
    "CHOICES",
    "ENV",
    "JEMALLOC_CONF",
    "PRELOADED",
    "REEXEC_ENV",
    "TUNED_ENV",
    "active_allocator",
    "allocator_tuned",
    "find_library",
    "preload_env",
    "requested_allocator",
]

ENV = "DASSDP_MALLOC_TUNE"  # "0": leave the allocator alone (same as DASSDP_ALLOCATOR=system)
ALLOCATOR_ENV = "DASSDP_ALLOCATOR"
CHOICES = ("auto", "jemalloc", "tcmalloc", "glibc", "system")
PRELOADED = ("jemalloc", "tcmalloc")  # the choices that are a library to preload
JEMALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Set by the re-execution: the library it preloaded (so a failed preload does not loop).
REEXEC_ENV = "_DASSDP_PRELOADED"
# Set by the command after it applied the glibc settings: the pid of the process they hold
# in (a process started from it inherits the variable, not the settings).
TUNED_ENV = "_DASSDP_TUNED_PID"
# Library file names, most specific first; searched in the dynamic linker's cache, then in
# the interpreter's prefix (conda, a venv's base) and the usual system folders.
_LIBRARIES = {
    "jemalloc": ("jemalloc",),
    "tcmalloc": ("tcmalloc_minimal", "tcmalloc"),
}
_SEARCH_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64",
                "/usr/lib", "/usr/local/lib")  # fmt: skip


def _off(value: str | None) -> bool:
    return value is not None and value.strip().lower() in ("0", "false", "no", "off")


def requested_allocator(environ: os._Environ[str] | dict[str, str] | None = None) -> str:
    """The choice from ``DASSDP_ALLOCATOR`` (``auto`` if unset; ``system`` under
    ``DASSDP_MALLOC_TUNE=0``); anything outside :data:`CHOICES` is a ``ValueError``."""
    env = os.environ if environ is None else environ
    raw = env.get(ALLOCATOR_ENV, "").strip().lower()
    if not raw:
        return "system" if _off(env.get(ENV)) else "auto"
    if raw not in CHOICES:
        raise ValueError(
            f"{ALLOCATOR_ENV}={env[ALLOCATOR_ENV]!r} is not an allocator; "
            f"choose one of {', '.join(CHOICES)}"
        )
    return raw


def find_library(name: str) -> str | None:
    """The file of allocator ``name`` (``jemalloc`` / ``tcmalloc``) on this system, or None."""
    if name not in _LIBRARIES:
        raise ValueError(f"unknown allocator library {name!r}; choose one of {list(_LIBRARIES)}")
    dirs = [str(Path(sys.base_prefix) / "lib"), str(Path(sys.prefix) / "lib"), *_SEARCH_DIRS]
    for stem in _LIBRARIES[name]:
        for d in dirs:
            hits = sorted(glob.glob(os.path.join(d, f"lib{stem}.so*")))
            if hits:
                return hits[0]
        soname = ctypes.util.find_library(stem)  # the linker cache: a name, not a path
        if soname:
            return soname
    return None


def active_allocator() -> str:
    """What this process allocates with: ``jemalloc``, ``tcmalloc`` (mapped into it),
    ``glibc tuned`` (the ``dassdp`` command applied the ``mallopt`` settings in this very
    process, :data:`TUNED_ENV`) or ``glibc``. It reads, never changes, the process."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    for name, stems in _LIBRARIES.items():
        if any(f"/lib{stem}.so" in maps for stem in stems):
            return name
    return "glibc tuned" if os.environ.get(TUNED_ENV) == str(os.getpid()) else "glibc"


def allocator_tuned() -> bool:
    """Whether this process runs with a tuned allocator (preloaded or the glibc settings)."""
    return active_allocator() != "glibc"


def preload_env(name: str, environ: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of ``environ`` (default ``os.environ``) that starts a process with allocator
    ``name`` (one of :data:`CHOICES` but ``auto``): ``LD_PRELOAD`` holding the library (and
    jemalloc's settings in ``MALLOC_CONF`` unless set) for ``jemalloc`` / ``tcmalloc``, no
    preload and ``DASSDP_ALLOCATOR`` set for the others. A missing library is a
    ``ValueError`` saying how to install it."""
    env = dict(os.environ if environ is None else environ)
    env.pop(REEXEC_ENV, None)
    env.pop(TUNED_ENV, None)
    ours = [f"lib{stem}.so" for stems in _LIBRARIES.values() for stem in stems]
    preload = [
        p
        for p in env.get("LD_PRELOAD", "").replace(":", " ").split()
        if not any(os.path.basename(p).startswith(o) for o in ours)
    ]
    if name != "jemalloc" and env.get("MALLOC_CONF") == JEMALLOC_CONF:
        del env["MALLOC_CONF"]  # ours, not the user's
    if name in PRELOADED:
        lib = find_library(name)
        if lib is None:
            hint = "libjemalloc2" if name == "jemalloc" else "libtcmalloc-minimal4"
            raise ValueError(
                f"{ALLOCATOR_ENV}={name}: its library is not installed on this system "
                f"(Debian / Ubuntu: apt install {hint}); choose one of {', '.join(CHOICES)}"
            )
        preload.insert(0, lib)
        if name == "jemalloc" and "MALLOC_CONF" not in env:
            env["MALLOC_CONF"] = JEMALLOC_CONF
    elif name not in CHOICES or name == "auto":
        raise ValueError(f"allocator {name!r}: choose one of {', '.join(CHOICES[1:])}")
    if preload:
        env["LD_PRELOAD"] = " ".join(preload)
    else:
        env.pop("LD_PRELOAD", None)
    env[ALLOCATOR_ENV] = name
    env.pop(ENV, None)
    return env
