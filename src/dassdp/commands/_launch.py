"""The ``dassdp`` program's start: the one place that changes the process it runs in.

:func:`entry` is the console script ``dassdp`` and ``python -m dassdp``. Before anything
else it installs the memory allocator chosen by ``DASSDP_ALLOCATOR`` (see
:mod:`dassdp._util.allocator` for the choices and the measurements behind them): it
re-executes the interpreter once with jemalloc / tcmalloc in ``LD_PRELOAD``, or applies the
glibc ``mallopt`` settings and records that in :data:`~dassdp._util.allocator.TUNED_ENV`, so
that the engine and the benchmarks report what this process runs with. Then it runs
:func:`dassdp.cli.main`, which (like ``import dassdp``) leaves the process as it found it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

from dassdp._util import allocator

__all__ = ["entry", "setup_allocator", "tune_allocator"]

_M_TRIM_THRESHOLD = -1  # glibc malloc.h parameter numbers
_M_MMAP_MAX = -4


def tune_allocator() -> bool:
    """Apply the glibc settings (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD = -1``) unless a
    preloaded allocator is active or the choice is ``system``, and record them in
    :data:`~dassdp._util.allocator.TUNED_ENV`; True if this process runs with a tuned
    allocator afterwards."""
    choice = allocator.requested_allocator()
    if choice == "system":
        return False
    if allocator.active_allocator() in allocator.PRELOADED:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(_M_MMAP_MAX, 0) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, -1) == 1 and ok
    if ok:
        os.environ[allocator.TUNED_ENV] = str(os.getpid())
    return ok


def setup_allocator() -> None:
    """Re-execute this process with the chosen library preloaded when it is not loaded yet
    (at most once; a preload the dynamic linker refused falls back to glibc tuned, with a
    note on stderr), then apply the glibc settings where no library is loaded. A bad
    ``DASSDP_ALLOCATOR`` or a missing library that was asked for by name is a ``ValueError``."""
    choice = allocator.requested_allocator()
    name = choice
    if choice == "auto":
        found = (n for n in allocator.PRELOADED if allocator.find_library(n) is not None)
        name = next(found, "glibc")
    if name in allocator.PRELOADED and allocator.active_allocator() != name:
        env = allocator.preload_env(name)
        lib = env["LD_PRELOAD"].split()[0]
        if os.environ.get(allocator.REEXEC_ENV) == lib:  # tried once already: did not load
            print(f"dassdp: could not preload {lib}; using glibc (tuned)", file=sys.stderr)
        else:
            if choice == "auto":
                env[allocator.ALLOCATOR_ENV] = "auto"  # children choose the same way
            env[allocator.REEXEC_ENV] = lib
            sys.stdout.flush()
            sys.stderr.flush()
            os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    tune_allocator()


def entry() -> None:
    """The ``dassdp`` program (console script and ``python -m dassdp``): install the memory
    allocator first (:func:`setup_allocator`; it may re-execute this process), then run
    :func:`dassdp.cli.main` and exit with its status."""
    try:
        setup_allocator()
    except ValueError as err:  # a bad DASSDP_ALLOCATOR, or a named library not installed
        print(f"dassdp: error: {err}", file=sys.stderr)
        sys.exit(2)
    from dassdp.cli import main

    sys.exit(main())
