"""The harness every ``dassdp bench`` runs on: the engine's training step bound to a model,
timing, device facts, fresh processes, and the CSV + ``docs/benchmarks.md`` output.

* **The step**: :func:`engine_step` is :func:`dassdp.engine.step.train_step` (the step the
  ``Trainer`` runs) with a grad scaler and device-side meters, so a bench times what users
  train with. ``--amp none|fp16|bf16`` picks the autocast dtype (fp16 with a grad scaler).
* **Timing and memory**: :func:`timed` synchronises CUDA before reading the clock; peak
  memory is ``torch.cuda.max_memory_allocated`` on CUDA and this process's peak resident set
  (``VmHWM``, :func:`peak_rss_kb`) on the CPU. The load average is recorded next to every
  number: other processes on a shared machine make CPU times noisy.
* **Fresh processes** (:func:`in_fresh_process`): a function run in a new interpreter, for a
  peak RSS of its own.
* **Output**: one CSV per run and one ``## <name>`` section of ``docs/benchmarks.md`` per
  benchmark (:func:`save`); a CUDA run writes ``## <name> (cuda)`` and
  ``docs/bench/<name>-cuda.csv``, so CPU numbers survive it.

Op, kernel and host-sync counters are in :mod:`dassdp.bench.counters`.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import importlib
import io
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

AMP_CHOICES = ("none", "fp16", "bf16")
DEFAULT_HEADER = (
    "# Benchmarks\n\nEach section is written by `dassdp bench <name>`; rerun it to refresh.\n"
)
SRC = Path(__file__).resolve().parents[2]  # the folder holding this checkout's dassdp


# ----------------------------------------------------------------------- the engine's step
def engine_step(
    model: Any, optimizer: Any, *, device: Any, amp: str = "none", learner: Any = None
) -> Callable[[Any, Any], Any]:
    """``step(x, y) -> StepOutput``: :func:`dassdp.engine.step.train_step` on ``model`` with
    ``optimizer`` (and DA-SSDP ``learner``), a grad scaler for ``amp="fp16"`` and the
    Trainer's device-side meters; ``x``, ``y`` already on ``device``."""
    from dassdp.engine import step as engine
    from dassdp.engine.metrics import LossMeter, PlasticityMeter

    dev = device_of(str(device))
    scaler, dtype = grad_scaler(dev, amp), amp_dtype(amp)
    meter = LossMeter(dev)
    plast = PlasticityMeter(learner) if learner is not None else None

    def step(x: Any, y: Any) -> Any:
        return engine.train_step(
            x, y, model=model, optimizer=optimizer, learner=learner, scaler=scaler,
            amp=dtype, meter=meter, plast=plast,
        )  # fmt: skip

    return step


def adamw(model: Any) -> Any:
    """The benchmarks' optimizer: AdamW, lr 5e-4, weight decay 0.01."""
    import torch

    return torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.01)


def in_channels(model: Any) -> int:
    """Input channels of the model's first conv (3 if it has none)."""
    from torch import nn

    return next((m.in_channels for m in model.modules() if isinstance(m, nn.Conv2d)), 3)


def random_batch(
    shape: Sequence[int], *, seed: int = 0, device: Any = "cpu", classes: int = 10
) -> tuple[Any, Any]:
    """A seeded batch: ``x`` uniform in [0, 1) of ``shape`` (``[B, ...]``), ``y`` ``[B]``."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(*shape, generator=gen)
    y = torch.randint(0, classes, (shape[0],), generator=gen)
    return x.to(device), y.to(device)


# ------------------------------------------------------------------ device, time, memory
def device_of(name: str) -> Any:
    """``torch.device(name)``; ``cuda`` without a visible GPU is a ``ValueError``."""
    import torch

    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device is available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be cpu or cuda[:N], got {name!r}")
    return device


def sync(device: Any) -> None:
    """Wait for queued work on ``device`` (a no-op on the CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: Any) -> tuple[float, Any]:
    """Run ``fn()`` once; return ``(seconds, result)`` with the device synchronised."""
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(
    calls: Mapping[Any, Callable[[], Any]],
    *,
    warmup: int,
    reps: int,
    device: Any,
    log: Callable[[str], None] | None = None,
) -> tuple[dict[Any, list[float]], dict[Any, Any]]:
    """Time every call of ``calls`` (name -> function) ``warmup`` times untimed, then ``reps``
    times, interleaved: one call of each per round, the order reversed every other round, so
    a change in the machine's load hits all alike. Returns the seconds per name and the
    result of each one's first call."""
    names = list(calls)
    times: dict[Any, list[float]] = {n: [] for n in names}
    first: dict[Any, Any] = {}
    for r in range(warmup + reps):
        for n in names if r % 2 == 0 else names[::-1]:
            sec, out = timed(calls[n], device)
            first.setdefault(n, out)
            if r >= warmup:
                times[n].append(sec)
            if log:
                tag = "warm-up" if r < warmup else f"step {r - warmup + 1}/{reps}"
                log(f"  {tag:<10} {' '.join(map(str, n)) if isinstance(n, tuple) else n:<22} "
                    f"{sec:8.3f} s")  # fmt: skip
    return times, first


@contextlib.contextmanager
def wrapped(owner: Any, name: str, wrapper: Callable[[Callable[..., Any]], Any]) -> Iterator[None]:
    """For the block, ``owner.<name>`` (a method of a class, or of one object) is
    ``wrapper(original)``; restored afterwards."""
    original = getattr(owner, name)
    own = isinstance(owner, type) or name in vars(owner)  # else the class's method
    setattr(owner, name, wrapper(original))
    try:
        yield
    finally:
        if own:
            setattr(owner, name, original)
        else:
            delattr(owner, name)  # the class's method shows through again


def timed_calls(
    owner: Any, name: str, acc: list[float], device: Any, range_name: str
) -> contextlib.AbstractContextManager[None]:
    """For the block, time every call of ``owner.<name>`` (see :func:`wrapped`): on the CPU
    each call's seconds are appended to ``acc``; on CUDA nothing is synchronised and each
    call runs inside ``record_function(range_name)``, whose kernels' device time a profile
    reads (:func:`dassdp.bench.counters.range_device_ms`)."""
    import torch

    cuda = torch.device(device).type == "cuda"

    def wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if cuda:
                with torch.profiler.record_function(range_name):
                    return original(*args, **kwargs)
            sec, out = timed(lambda: original(*args, **kwargs), device)
            acc.append(sec)
            return out

        return call

    return wrapped(owner, name, wrapper)


def leave_warmup(learner: Any) -> None:
    """Move a DA-SSDP learner past warm-up and fit its gate now (not inside a timed step;
    a bench's few warm-up records make a degenerate fit, ``G = 1``, whose warning is muted)."""
    import warnings

    learner.set_epoch(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        learner.fit()


def median(values: Sequence[float]) -> float:
    """Median of a sequence (``nan`` if empty)."""
    return statistics.median(values) if values else float("nan")


def load_average() -> str:
    """The 1/5/15-minute load averages as ``"a, b, c"`` (``"n/a"`` where unsupported)."""
    try:
        return ", ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def amp_dtype(amp: str) -> Any:
    """The autocast dtype of a bench ``--amp`` value (None for ``none``)."""
    import torch

    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    return {"none": None, "fp16": torch.float16, "bf16": torch.bfloat16}[amp]


def autocast(device: Any, amp: str) -> contextlib.AbstractContextManager[Any]:
    """``torch.autocast`` on ``device`` with the ``amp`` dtype (a no-op context for ``none``)."""
    import torch

    from dassdp.engine.step import autocast as engine_autocast

    return engine_autocast(torch.device(device), amp_dtype(amp))


def grad_scaler(device: Any, amp: str) -> Any:
    """A ``torch.amp.GradScaler`` for ``fp16``; ``None`` for ``none`` and ``bf16``."""
    import torch

    if amp_dtype(amp) is not torch.float16:
        return None
    return torch.amp.GradScaler(torch.device(device).type)


def memory_kind(device: Any) -> str:
    """What :func:`peak_memory_mib` measures on ``device``."""
    import torch

    cuda = torch.device(device).type == "cuda"
    return "cuda max_memory_allocated" if cuda else "process peak RSS"


def reset_peak_memory(device: Any) -> None:
    """Start a new peak: CUDA's peak statistics, or the process's RSS high-water mark."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        peak_rss_kb(reset=True)


def peak_memory_mib(device: Any) -> float:
    """Peak memory since the last :func:`reset_peak_memory` in MiB (CUDA: allocated by
    tensors; CPU: the whole process's resident set, torch and Python included)."""
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return peak_rss_kb() / 1024


def peak_rss_kb(reset: bool = False) -> int:
    """This process's own peak resident set size in KiB.

    On Linux this is ``VmHWM`` of ``/proc/self/status``: the high-water mark of this
    process's memory map only. ``getrusage(RUSAGE_SELF).ru_maxrss`` also keeps the peak of
    the process that spawned it (the kernel carries it over ``exec``), so a worker started by
    a large parent would report the parent's peak; elsewhere it is the fallback.
    ``reset=True`` first sets the high-water mark to the current RSS (``clear_refs`` 5), so
    the growth over a call is measured from what is resident now.
    """
    import resource

    if reset:
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    hwm = status_kb("VmHWM")
    return hwm if hwm is not None else int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def status_kb(key: str) -> int | None:
    """A field of ``/proc/self/status`` in KiB (``VmRSS``, ``VmHWM``); None without it."""
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in lines if line.startswith(key + ":")), None)


# -------------------------------------------------------------------------- fresh processes
CHILD = "from dassdp.bench.harness import child_main; child_main()"


def function(target: str) -> list[str]:
    """The interpreter arguments that call ``target`` (``"module:function"``) with the JSON
    spec :func:`in_fresh_process` appends as keyword arguments (:func:`child_main`)."""
    return ["-c", CHILD, target]


def in_fresh_process(
    argv: Sequence[str], spec: Mapping[str, Any], *, env: Mapping[str, str] | None = None,
    pythonpath: str | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run ``python *argv <spec as JSON>`` in a fresh process with this process's torch
    thread count; returns the JSON object of its last line of output. ``argv``: e.g.
    :func:`function`, or ``-m dassdp ...`` to start it as the ``dassdp`` program (which
    installs the allocator ``env`` asks for); ``env``: its environment (default this one's);
    ``pythonpath``: its ``PYTHONPATH`` (default this checkout's sources first)."""
    import torch

    env = dict(os.environ if env is None else env)
    if pythonpath is None:
        pythonpath = os.pathsep.join(p for p in (str(SRC), env.get("PYTHONPATH")) if p)
    env.update(PYTHONPATH=pythonpath, OMP_NUM_THREADS=str(torch.get_num_threads()))
    cmd = [sys.executable, *argv, json.dumps(dict(spec))]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv[-2:])} in a fresh process failed (exit {done.returncode}; "
            f"{dict(spec)}): {done.stderr.strip()[-2000:]}"
        )
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def child_main() -> None:
    """The fresh process of :func:`function`: ``argv[1:]`` = target, JSON spec; prints the
    target's result as the last line of stdout."""
    module, _, name = sys.argv[1].partition(":")
    result = getattr(importlib.import_module(module), name)(**json.loads(sys.argv[2]))
    print(json.dumps(result))


# ------------------------------------------------------------------------------ the output
def check_positive(args: Any, *names: str, least: int = 1) -> None:
    """A ``ValueError`` naming the options (``--batch``, ...) when any of ``names`` (argument
    attributes, lists allowed) is below ``least``."""
    values = [v for n in names for v in _as_list(getattr(args, n))]
    if values and min(values) < least:
        flags = ", ".join("--" + n.replace("_", "-") for n in names)
        raise ValueError(f"{flags} must be >= {least}")


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def save(
    args: Any,
    name: str,
    rows: Sequence[Mapping[str, Any]],
    markdown: Callable[[list[str]], str],
    *,
    device: str = "cpu",
    load_before: str | None = None,
    program: str = "dassdp",
) -> int:
    """Write ``rows`` to ``args.out`` (default :func:`default_csv`) and the section
    ``args.section`` (default :func:`section_name`) of ``args.doc`` as ``markdown(facts)``,
    ``facts`` being the :func:`provenance` lines (``program``: the command's name there);
    returns 0 (a command's exit status)."""
    out = args.out if args.out is not None else default_csv(name, device)
    write_csv(out, rows)
    load = None if load_before is None else (load_before, load_average())
    body = markdown(provenance(out, load, program))
    heading = args.section or section_name(name, device)
    if getattr(args, "note", None):
        body = body.rstrip() + f"\n\nNote: {args.note}\n"
    replace_section(args.doc, heading, body)
    print(f"wrote {out} and the '## {heading}' section of {args.doc}")
    return 0


def section_name(name: str, device: str) -> str:
    """``docs/benchmarks.md`` section of benchmark ``name`` on ``device``: ``rule`` on the CPU,
    ``rule (cuda)`` on a GPU."""
    kind = str(device).split(":")[0]
    return name if kind == "cpu" else f"{name} ({kind})"


def default_csv(name: str, device: str) -> Path:
    """Default CSV path: ``docs/bench/<name>.csv`` (CPU) or ``docs/bench/<name>-cuda.csv``."""
    kind = str(device).split(":")[0]
    return Path("docs/bench") / (f"{name}.csv" if kind == "cpu" else f"{name}-{kind}.csv")


def provenance(
    csv_path: Any, load: Sequence[str] | None = None, program: str = "dassdp"
) -> list[str]:
    """A section's bullet lines: the exact command (``program`` and this process's
    arguments), torch, threads, CPU, allocator, the date (with the load averages before and
    after the run when ``load`` is given) and the CSV path."""
    import torch

    from dassdp._util.allocator import active_allocator

    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("model name")), cpu)
    date = _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    when = f"- date: {date}; "
    if load is not None:
        when += (
            f"load average (1, 5, 15 min) before: {load[0]}, after: {load[1]} (a shared machine); "
        )
    return [
        f"- command: `{program} {' '.join(shlex.quote(a) for a in sys.argv[1:])}`",
        f"- torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU: {cpu} "
        f"({os.cpu_count()} cores), Python {platform.python_version()}, allocator "
        f"{active_allocator()}",
        when + f"CSV: `{csv_path}`",
    ]


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> list[str]:
    """A Markdown table: ``columns`` are ``(header, alignment "---" or "--:", format)``, the
    format a ``str.format`` template over a row (``"{step_s:.3f}"``)."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |"]
    lines.append("|" + "|".join(c[1] for c in columns) + "|")
    lines += ["| " + " | ".join(c[2].format(**r) for c in columns) + " |" for r in rows]
    return lines


def replace_section(path: Path, name: str, body: str) -> None:
    """Set the ``## <name>`` section of the Markdown file ``path`` to ``body``; keep the rest.

    The section runs from its heading to the next ``## `` heading (or the end). A missing
    file is created with a short header; a missing section is appended.
    """
    from dassdp._util.io import atomic_write_text

    path = Path(path)
    text = path.read_text() if path.exists() else DEFAULT_HEADER
    section = f"## {name}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(name)}[ \t]*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        new = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
    else:
        new = text.rstrip() + "\n\n" + section
    atomic_write_text(path, new)


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write ``rows`` (dicts with the same keys) as CSV, atomically."""
    from dassdp._util.io import atomic_write_text

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(Path(path), buf.getvalue())


def add_options(parser: Any, **options: tuple[Any, ...]) -> None:
    """``--name`` options from ``name=(default, help[, argparse keywords])``: a list default
    takes one or more values of its element type, ``False`` is a flag, otherwise the type is
    the default's (give ``type`` for a ``None`` default); the default joins the help."""
    for name, (default, text, *extra) in options.items():
        kwargs = {"default": default, **(extra[0] if extra else {})}
        sample = default[0] if isinstance(default, list) and default else default
        if default is False:
            kwargs["action"] = "store_true"
        elif sample is not None:
            kwargs.setdefault("type", type(sample))
        if isinstance(default, list):
            kwargs.setdefault("nargs", "+")
        if default is not None and default is not False:
            shown = " ".join(map(str, default)) if isinstance(default, list) else default
            text += f" (default {shown})"
        parser.add_argument("--" + name.replace("_", "-"), help=text, **kwargs)


def add_run_arguments(parser: Any, seed_help: str = "seed of weights and inputs") -> None:
    """``--device``, ``--threads`` and ``--seed``, shared by the device-aware benchmarks."""
    add_options(parser, device=("cpu", "cpu or cuda[:N]"), threads=(1, "torch CPU threads"),
                seed=(0, seed_help))  # fmt: skip


def add_output_arguments(parser: Any, name: str, *, per_device: bool = True) -> None:
    """``--out`` (the CSV), ``--doc`` (the Markdown file whose ``## name`` section is
    replaced), ``--section`` and ``--note``. With ``per_device`` the CSV defaults by device
    (``docs/bench/name[-cuda].csv``, resolved at run time from ``None``)."""
    cuda = f", or {name}-cuda.csv / '{name} (cuda)' on a GPU" if per_device else ""
    add_options(
        parser,
        out=(None if per_device else Path(f"docs/bench/{name}.csv"),
             f"CSV output (docs/bench/{name}.csv{cuda})", {"type": Path}),
        doc=(Path("docs/benchmarks.md"), f"Markdown file whose '## {name}' section is replaced"),
        section=(None, f"heading of the section to write instead of '{name}'{cuda}: keeps the "
                 "default section, e.g. for a run with other batch sizes", {"type": str}),
        note=(None, "a sentence appended to the section (e.g. what else loaded the machine)",
              {"type": str}),
    )  # fmt: skip


def describe(doc: str | None) -> list[str]:
    """A bench module's docstring as the Markdown lines of its section: the title line
    dropped, RST literals and roles (````x````, ``:func:`x```) as Markdown code."""
    body = (doc or "").split("\n", 1)[-1].strip()
    body = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", body).replace("``", "`")
    return body.replace("::\n", ":\n").splitlines()
