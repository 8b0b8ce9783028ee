"""``torch.library`` ops whose bodies may launch Triton kernels, registered twice.

A custom op (``torch.library.custom_op``) is one opaque node to ``torch.compile``: what the
CPU kernels (raw pointers) and Triton's interpreter need. On the Triton route with
JIT-compiled kernels the same body is also registered, on first use, as a
``torch.library.triton_op``: ``torch.compile`` then traces through it (the body launches its
kernels through ``wrap_triton``) and Inductor calls the kernels itself, with nothing of the
op's Python left in the compiled step. Eager code calls neither (the units use plain autograd
Functions). ``QKFORMER_TRITON_TRACE=0`` keeps the opaque op everywhere.
"""
from __future__ import annotations

import inspect
import threading
from typing import Callable, Iterable, List, Optional

import torch

from .env import flag

__all__ = ["KernelOp", "kernel_op", "tracing_enabled", "prepare_traced", "ENV"]

ENV = "QKFORMER_TRITON_TRACE"

_ops: List["KernelOp"] = []
_lock = threading.Lock()


def tracing_enabled() -> bool:
    """``torch.compile`` may trace through the ops on the Triton route (the default)."""
    return flag(ENV, True)


class KernelOp:
    """An op ``name`` with body ``fn``: an opaque custom op, and a ``triton_op`` twin
    (``name + "_traced"``) called instead where ``traceable`` holds for the arguments.

    Args:
        name: ``"namespace::op"``.
        fn: the body, with type annotations (the schema is inferred from them).
        mutates_args: the arguments the body writes to.
        traceable: given the op's arguments by name (a dict), whether they are on the route
            whose kernels the body launches through ``wrap_triton`` (so that tracing sees
            every launch).
    """

    def __init__(self, name: str, fn: Callable, mutates_args: Iterable[str],
                 traceable: Callable[..., bool]):
        self.name, self._fn, self._mutates = name, fn, tuple(mutates_args)
        self._traceable = traceable
        params = inspect.signature(fn).parameters.values()
        self._names = tuple(p.name for p in params)
        self._defaults = {p.name: p.default for p in params if p.default is not p.empty}
        self.opaque = torch.library.custom_op(name, fn, mutates_args=self._mutates)
        self._autograd: Optional[tuple] = None
        self._traced = None
        _ops.append(self)

    def register_fake(self, fake: Callable) -> Callable:
        """The opaque op's fake kernel (the twin traces its body instead)."""
        self.opaque.register_fake(fake)
        return fake

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        self._autograd = (backward, setup_context)
        self.opaque.register_autograd(backward, setup_context=setup_context)
        if self._traced is not None:
            self._traced.register_autograd(backward, setup_context=setup_context)

    def traced(self):
        """The ``triton_op`` twin, made on first use (made outside any trace: see
        :func:`prepare_traced`)."""
        if self._traced is None:
            with _lock:
                if self._traced is None:
                    op = torch.library.triton_op(self.name + "_traced", self._fn,
                                                 mutates_args=self._mutates)
                    if self._autograd is not None:
                        backward, setup = self._autograd
                        op.register_autograd(backward, setup_context=setup)
                    self._traced = op
        return self._traced

    def uses_traced(self, *args, **kwargs) -> bool:
        if not tracing_enabled():
            return False
        named = dict(self._defaults)
        named.update(zip(self._names, args))
        named.update(kwargs)
        return bool(self._traceable(named))

    def __call__(self, *args, **kwargs):
        if self.uses_traced(*args, **kwargs):
            return self.traced()(*args, **kwargs)
        return self.opaque(*args, **kwargs)


def kernel_op(name: str, *, mutates_args: Iterable[str] = (),
              traceable: Callable[..., bool]) -> Callable[[Callable], KernelOp]:
    """Decorator form of :class:`KernelOp`."""
    return lambda fn: KernelOp(name, fn, mutates_args, traceable)


def prepare_traced() -> None:
    """Make every twin now. Dynamo cannot trace the registration of an op, so the route's
    eager self-check calls this before a graph needs a twin."""
    if tracing_enabled():
        for op in list(_ops):
            op.traced()
