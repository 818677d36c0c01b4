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
and the constexprs. The constexprs must be the kernel's last parameters (passed in any order:
the launcher takes them in the kernel's).
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor


def aligned(*ts: Optional[Tensor]) -> tuple[bool, ...]:
    """For each tensor given, whether it starts on a 16-byte boundary (None counts as aligned):
    part of a ``Direct`` key (Triton specializes each pointer on it)."""
    return tuple(t is None or t.data_ptr() % 16 == 0 for t in ts)


def key(kernel, ints: tuple, *tensors: Tensor) -> tuple:
    """A ``Direct`` cache key for ``kernel`` launched on ``tensors`` (the first fixes dtype and
    device) whose integer arguments are ``ints`` plus the tensors' row strides."""
    t = tensors[0]
    return (kernel, ints, tuple(x.stride(0) for x in tensors), t.dtype, t.device.index, aligned(*tensors))


class Direct:
    """One launch configuration of a ``@triton.jit`` kernel: grid, constexprs and options fixed.

    ``Direct(kernel, grid, dict(BLOCK=...), num_warps=4)(*runtime_args)``.
    """

    __slots__ = ("fn", "grid", "constexprs", "tail", "options", "launcher", "run")

    def __init__(self, fn, grid: tuple[int, ...], constexprs: dict[str, Any], **options: Any) -> None:
        self.fn = fn
        self.grid = tuple(grid) + (1,) * (3 - len(grid))
        self.constexprs = constexprs
        names = getattr(fn, "arg_names", None) or list(constexprs)
        self.tail = tuple(constexprs[n] for n in names if n in constexprs)   # in the kernel's order
        self.options = options
        self.launcher: Optional[Callable] = None
        self.run: Optional[Callable] = None

    def __call__(self, *args) -> None:
        """Launch with the runtime arguments (the kernel's parameters before its constexprs)."""
        if self.run is not None:
            self.run(*args)
            return
        if self.launcher is None:                       # the first call compiles, through the JIT
            compiled = self.fn[self.grid](*args, **self.constexprs, **self.options)
            try:
                self.launcher = compiled[self.grid]
            except (AttributeError, TypeError):         # a Triton whose launch returns no compiled kernel
                self.run = self._jit
            return
        # The second call settles how the launcher takes its arguments. It parses them before
        # launching, so a call it refuses (TypeError) launched nothing.
        launcher, tail = self.launcher, self.tail
        try:
            launcher(*args, *tail)                      # Triton 3.3 and later: the constexprs too
            self.run = lambda *a: launcher(*a, *tail)
            return
        except TypeError:
            pass
        try:
            launcher(*args)                             # earlier: the runtime arguments alone
            self.run = launcher
        except TypeError:
            self.run = self._jit
            self._jit(*args)

    def _jit(self, *args) -> None:
        self.fn[self.grid](*args, **self.constexprs, **self.options)
