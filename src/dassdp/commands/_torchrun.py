"""``python -m dassdp.commands._torchrun ARGS``: torchrun (``torch.distributed.run ARGS``)
that ends with the ``dassdp train --nproc`` process that started it.

That process puts its pid in :data:`LAUNCHER_ENV`; this agent dies with it
(:func:`dassdp._util.process.die_with_parent`), and each rank, which inherits the variable,
dies with this agent or with that process (``commands/train.py``). Without this, a SIGKILL
of ``dassdp train --nproc 2`` left torchrun and both ranks training, reparented to init.
"""

from __future__ import annotations

import os
import runpy
import signal
import sys

LAUNCHER_ENV = "DASSDP_LAUNCHER_PID"  # pid of the `dassdp train --nproc` process


def main() -> None:
    """Follow the launcher, then run torchrun in this process with this process's argv. A
    signal that stops it (Ctrl-C: the ranks got it too, and rank 0 said where it stopped)
    ends it with ``128 + signal`` and no traceback of torchrun's."""
    from torch.distributed.elastic.multiprocessing.api import SignalException

    from dassdp._util.process import die_with_parent

    die_with_parent(int(os.environ[LAUNCHER_ENV]))
    try:
        runpy.run_module("torch.distributed.run", run_name="__main__", alter_sys=True)
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
    except SignalException as err:
        sys.exit(128 + int(err.sigval))


if __name__ == "__main__":
    main()
