"""lorakit.kernels.launch.Direct: how a Triton kernel is launched after its first call.

Triton is not needed here: a stand-in kernel records what it is called with. The GPU tests
of each kernel (test_ops, test_fused) check the real launches against the references.
"""

from __future__ import annotations

import torch

from lorakit.kernels import launch


class FakeKernel:
    """``kernel[grid](*args, **kw)`` like a @triton.jit function; returns a compiled stand-in
    whose ``[grid]`` launcher accepts the argument convention given (or none)."""

    def __init__(self, convention: str):
        self.convention = convention          # "with-constexprs", "runtime-only", "none", "interpreter"
        self.jit_calls, self.launches = [], []

    def __getitem__(self, grid):
        def jit(*args, **kw):
            self.jit_calls.append((grid, args, kw))
            return None if self.convention == "interpreter" else Compiled(self)
        return jit


class Compiled:
    def __init__(self, k: FakeKernel):
        self.k = k

    def __getitem__(self, grid):
        if self.k.convention == "none":
            raise AttributeError("no launcher")

        def launcher(*args):
            want = 4 if self.k.convention == "with-constexprs" else 2
            if len(args) != want:
                raise TypeError(f"launcher takes {want} arguments, got {len(args)}")
            self.k.launches.append((grid, args))
        return launcher


def run(convention: str, calls: int = 4) -> FakeKernel:
    k = FakeKernel(convention)
    d = launch.Direct(k, (3, 2), dict(BLOCK=64, IEEE=False), num_warps=4)
    for i in range(calls):
        d("ptr", i)
    return k


def test_first_call_compiles_through_the_jit_then_the_compiled_launcher_runs():
    k = run("with-constexprs")
    assert k.jit_calls == [((3, 2, 1), ("ptr", 0), dict(BLOCK=64, IEEE=False, num_warps=4))]
    # calls 1..3 through the launcher, runtime arguments then the constexprs in order
    assert k.launches == [((3, 2, 1), ("ptr", i, 64, False)) for i in (1, 2, 3)]


def test_a_launcher_taking_the_runtime_arguments_alone():
    k = run("runtime-only")
    assert len(k.jit_calls) == 1
    assert k.launches == [((3, 2, 1), ("ptr", i)) for i in (1, 2, 3)]     # the refused probe launched nothing


def test_without_a_usable_launcher_every_call_goes_through_the_jit():
    for convention in ("none", "interpreter"):
        k = run(convention)
        assert [c[1] for c in k.jit_calls] == [("ptr", i) for i in range(4)] and not k.launches


def test_a_launcher_refusing_both_conventions_falls_back_to_the_jit():
    k = FakeKernel("with-constexprs")
    d = launch.Direct(k, (1,), dict(BLOCK=8))
    d("a")                                   # one runtime argument: the launcher wants 4 or 2, refuses both
    d("a")
    d("a")
    assert [c[1] for c in k.jit_calls] == [("a",)] * 3 and not k.launches


def test_aligned_reports_each_pointer():
    t = torch.zeros(64, dtype=torch.float32)
    assert launch.aligned(t, None, t[4:], t[1:]) == (True, True, True, False)


def test_disabled_switches_a_kernel_module_off_for_a_block():
    from lorakit import kernels
    before = kernels.load("merge")
    with kernels.disabled("merge"):
        assert kernels.load("merge") is None
    assert kernels.load("merge") is before


def test_key_fixes_ints_strides_dtype_and_alignment():
    t = torch.zeros(8, 16)
    base = launch.key("k", (8, 16), t, t)
    assert launch.key("k", (8, 16), t, t) == base
    assert launch.key("k", (8, 32), t, t) != base                        # an integer argument
    assert launch.key("k", (8, 16), t, t.t().contiguous()) != base       # a row stride
    assert launch.key("k", (8, 16), t.double(), t.double()) != base      # the dtype
    assert launch.key("k", (8, 16), t, t.view(-1)[1:].view(1, -1)) != base  # an unaligned pointer (and stride)
