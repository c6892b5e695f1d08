"""The scripts of the top-level ``benchmarks/`` folder as modules, for their tests (each
imports its helper ``_checkout`` from that folder)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
SRC = str(ROOT / "src")  # this checkout's sources: a "baseline" that is this checkout


def load(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` imported as a module (its ``main`` not run)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
