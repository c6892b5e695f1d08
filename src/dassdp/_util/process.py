"""Child processes that end with the process that started them.

A process started by another (a ``torchrun`` agent by ``dassdp train --nproc``, a training
rank by that agent) calls :func:`die_with_parent` first thing: if its parent dies, even by
SIGKILL, it ends too, instead of training on, reparented to init, behind the user's back
(and holding the run folder's lock). Two mechanisms, as either alone has a gap:

* Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills this process when the
  thread that forked it exits;
* everywhere: a daemon thread polls, every ``poll_s`` seconds, that the parent pid is still
  this process's parent (and that the ``launcher``, when given, still runs) and ends the
  process with ``os._exit(1)`` otherwise. A parent that died before the call is caught at
  once (``os.getppid()`` no longer names it).

Killing is safe for a training run: its checkpoints are written atomically and its lock is
released by the kernel, so the run folder stays resumable.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

__all__ = ["die_with_parent", "process_alive"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def process_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (a zombie, dead but not yet reaped, is not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    stat = Path(f"/proc/{pid}/stat")
    try:
        state = stat.read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc (not Linux): kill(pid, 0) is all there is
    return state not in ("Z", "X")


def die_with_parent(parent: int, launcher: int | None = None, poll_s: float = 1.0) -> None:
    """End this process when ``parent`` (the pid that should be its parent) dies, or when
    ``launcher`` (a further ancestor, optional) does; see the module docstring.

    Args:
        parent: the expected parent pid, read by the parent itself (``os.getpid()`` there,
            passed down) or by this process at its very start (``os.getppid()``).
        launcher: a further ancestor whose death also ends this process (None: none).
        poll_s: seconds between the watchdog's checks.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):
            pass

    def orphaned() -> bool:
        return os.getppid() != parent or (launcher is not None and not process_alive(launcher))

    if orphaned():  # it died before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while not orphaned():
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="dassdp-parent-watch", daemon=True).start()
