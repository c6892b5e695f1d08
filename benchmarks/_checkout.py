"""What the before/after scripts share: this checkout's library, another checkout's
sources, and running this checkout's measuring code over another checkout's library.

The scripts run over this checkout's ``dassdp`` (:func:`use_this_checkout`). A process
imports one ``dassdp``, so to time another checkout's models with *this* checkout's training
step and harness, a fresh process puts the other checkout's sources on ``PYTHONPATH`` and
loads named modules of this checkout over them (:func:`graft`): ``dassdp.engine.step``
imports only torch, ``dassdp.reset`` and ``dassdp.plasticity.distributed``, and the bench
harness only the standard library at import, so both load over every version since the
base commit; the models, neurons and learner measured are the other checkout's.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"  # this checkout's sources


def use_this_checkout() -> None:
    """Import ``dassdp`` from this checkout's ``src/`` in this process (a script's first
    call; not in a grafted child, which imports the other checkout's)."""
    if str(SRC) not in sys.path:
        sys.path.insert(0, str(SRC))


def source_dir(src: str | None) -> str:
    """The directory holding a ``dassdp`` package: ``src`` (checked: an error naming it when
    it has none) or, for ``None``, this checkout's."""
    if src is None:
        return str(SRC)
    if not (Path(src) / "dassdp" / "__init__.py").is_file():
        raise ValueError(f"--baseline-src {src}: no dassdp package in that directory")
    return str(Path(src).resolve())


def graft(names: Sequence[str]) -> None:
    """Load this checkout's modules or packages ``names`` (dotted, e.g. ``dassdp._util``,
    ``dassdp.engine.step``), in order, over the ``dassdp`` this process imports: later imports
    of those names (and of a grafted package's submodules) get this checkout's code."""
    for name in names:
        path = SRC.joinpath(*name.split("."))
        parent, _, leaf = name.rpartition(".")
        package = importlib.import_module(parent)
        if path.is_dir():  # a package: its submodules are found in this checkout too
            spec = importlib.util.spec_from_file_location(
                name, path / "__init__.py", submodule_search_locations=[str(path)]
            )
        else:
            spec = importlib.util.spec_from_file_location(name, path.with_suffix(".py"))
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        setattr(package, leaf, module)


def grafted_child(names: Sequence[str]) -> None:
    """The fresh process of :func:`in_checkout`: graft ``names`` and this checkout's program
    start (``dassdp.commands._launch``, which installs the allocator the environment names,
    as the ``dassdp`` program does), then run the harness's child (``argv[1:]`` = target,
    JSON spec)."""
    graft(["dassdp._util", "dassdp.commands._launch", *names])
    from dassdp.commands._launch import tune_allocator

    tune_allocator()  # glibc's settings where DASSDP_ALLOCATOR asks; preloads come by env
    from dassdp.bench.harness import child_main

    child_main()


def in_checkout(
    src: str,
    target: str,
    spec: Mapping[str, Any],
    names: Sequence[str],
    env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """``target(**spec)`` (``"module:function"``) in a fresh process over the ``dassdp`` in
    ``src``, with this checkout's modules ``names`` grafted first; returns its result."""
    from dassdp.bench.harness import in_fresh_process

    child = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import _checkout; "
        f"_checkout.grafted_child({list(names)!r})"
    )
    return in_fresh_process(["-c", child, target], spec, env=env, pythonpath=source_dir(src))
