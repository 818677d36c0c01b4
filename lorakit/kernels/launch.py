"""Launching a Triton kernel with less host time: through its compiled launcher after the first call.

``kernel[grid](*args, **constexprs)`` goes through Triton's JIT entry on every call: it binds
the arguments, specializes each one, builds a cache key (a string of the options among
it) and looks the compiled kernel up. On the H200's host that cost 25-30 us a call more
than the launch itself, more than a whole PyTorch operation (bench/decode_linear.py), and
lorakit launches its kernels hundreds of times per training step and per decoding step.

``Direct`` makes the first call through the JIT (which compiles), keeps the compiled
kernel, and launches the next calls with ``compiled[grid](*args, *constexprs)``: Triton's
own launcher for that compiled kernel (the one ``JITFunction.run`` ends with).

The caller keeps one ``Direct`` per key, and the key must fix everything the compiled
kernel was specialized on: every integer argument's value (Triton specializes integers
equal to 1 and multiples of 16), each pointer's 16-byte alignment (``aligned``), the dtypes
and the constexprs. The constexprs must be the kernel's last parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor


def aligned(*ts: Optional[Tensor]) -> tuple[bool, ...]:
    """For each tensor given, whether it starts on a 16-byte boundary (None counts as aligned):
    part of a ``Direct`` key (Triton specializes each pointer on it)."""
    return tuple(t is None or t.data_ptr() % 16 == 0 for t in ts)


class Direct:
    """One launch configuration of a ``@triton.jit`` kernel: grid, constexprs and options fixed.

    ``Direct(kernel, grid, dict(BLOCK=...), num_warps=4)(*runtime_args)``.
    """

    __slots__ = ("fn", "grid", "constexprs", "tail", "options", "run")

    def __init__(self, fn, grid: tuple[int, ...], constexprs: dict[str, Any], **options: Any) -> None:
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = constexprs
        self.tail = tuple(constexprs.values())          # in the kernel's order: its last parameters
        self.options = options
        self.run: Optional[Callable] = None

    def __call__(self, *args) -> None:
        if self.run is not None:
            self.run(*args, *self.tail)
            return
        compiled = self.fn[self.grid](*args, **self.constexprs, **self.options)
        try:
            self.run = compiled[self.grid]
        except (AttributeError, TypeError):             # a Triton whose launch returns no compiled kernel
            self.run = self._jit

    def _jit(self, *args) -> None:
        n = len(args) - len(self.tail)
        self.fn[self.grid](*args[:n], **self.constexprs, **self.options)
