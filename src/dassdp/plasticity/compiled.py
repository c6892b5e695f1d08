"""A model already run through ``torch.compile``: make it record once the learner attaches.

Dynamo compiles a module's ``forward`` with the forward hooks that exist at that moment and,
by default, does not guard on hooks added later (``torch._dynamo.config.
skip_nnmodule_hook_guards``): a learner attached to a model that has already run compiled
would record nothing, and every ``step()`` would be a silent no-op. So the learner drops the
compiled code of that model when it attaches: the next call recompiles, with the hooks.
(Removing hooks is noticed by dynamo's guards: after ``close()`` the model recompiles
without them.)

Only the model's code is dropped, not everything compiled in the process
(``torch.compiler.reset()``): the compiled entries of each of its modules' ``forward``, of
the frames dynamo resumes them in after a graph break, and of the wrapper dynamo compiles
for modules whose own ``forward`` it skips (``nn.Sequential``: that wrapper is shared, so
other such compiled modules recompile once too). These are dynamo internals; where this
torch lacks them the whole cache is reset instead.

Should that fail (another torch), a training forward whose sites recorded nothing while
the model's own code holds compiled entries is an error at ``step()``
(:func:`stale_compiled_message`), not a silent no-op. A model called
inside another compiled function (``torch.compile(train_step)``) is compiled as part of
that function's code, which the learner does not know: attach the learner before compiling
such a function (``step()`` then warns that nothing was recorded).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["forget_compiled", "stale_compiled_message"]


def _dynamo_loaded() -> bool:
    """Nothing can have been compiled before ``torch._dynamo`` is imported."""
    return "torch._dynamo" in sys.modules


def _codes(model: nn.Module) -> Iterator[types.CodeType]:
    """The code objects dynamo may have compiled the model under: each module's ``forward``
    and, for a model of ``torch.nn`` itself (``nn.Sequential``: dynamo skips its ``forward``),
    the one wrapper frame dynamo compiles for such modules."""
    seen: set[types.CodeType] = set()
    for module in model.modules():
        forward = getattr(module, "forward", None)
        code = getattr(getattr(forward, "__func__", forward), "__code__", None)
        if code is not None and code not in seen:
            seen.add(code)
            yield code
    if not type(model).__module__.startswith("torch."):
        return
    try:
        from torch._dynamo.external_utils import wrap_inline
    except ImportError:
        return
    yield wrap_inline(len).__code__  # one code object for every wrapped module


def _resumed(code: types.CodeType) -> Iterator[types.CodeType]:
    """The frames dynamo generated to resume ``code`` after graph breaks (recursively)."""
    try:
        from torch._dynamo.resume_execution import ContinueExecutionCache
    except ImportError:
        return
    todo = [code]
    while todo:
        for resumed in (ContinueExecutionCache.cache.get(todo.pop()) or {}).values():
            yield resumed
            todo.append(resumed)


def _compiled_codes(model: nn.Module) -> Iterator[types.CodeType]:
    """The model's code objects (and their resumed frames) that hold compiled entries."""
    from torch._C._dynamo.eval_frame import _get_total_cache_entry_count

    for code in _codes(model):
        for each in (code, *_resumed(code)):
            if _get_total_cache_entry_count(each):
                yield each


def forget_compiled(model: nn.Module) -> bool:
    """Drop dynamo's compiled code of ``model`` (module docstring); True if any was dropped.

    Without dynamo imported this does nothing and costs nothing."""
    if not _dynamo_loaded():
        return False
    try:
        from torch._C._dynamo.eval_frame import reset_code

        codes = list(_compiled_codes(model))
    except ImportError:  # another torch: the whole cache, the public way
        torch.compiler.reset()
        return True
    for code in codes:
        reset_code(code)
    return bool(codes)


def stale_compiled_message(model: nn.Module) -> str | None:
    """Why a step recorded nothing when the model's own code is compiled (``None``: it is
    not): called only when a training forward of the model ran but no site recorded."""
    if not _dynamo_loaded():
        return None
    try:
        if not any(True for _ in _compiled_codes(model)):
            return None
    except ImportError:  # another torch: cannot tell
        return None
    return (
        "DASSDP.step(): the model is in train mode but no site recorded anything since the "
        "last step(), and the model runs compiled code (torch.compile): a graph traced "
        "without DASSDP's hooks skips them (dynamo does not re-check hooks added later), so "
        "every step would learn nothing. Attach DASSDP before compiling, or call "
        "torch.compiler.reset() after attaching it"
    )
