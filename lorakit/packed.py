"""Packed MLP weights: each frozen W0 of a fused gated MLP (lorakit.fused) shares one buffer with
room for the LoRA factors, so each of the MLP's GEMM sites can run as ONE GEMM whose K grows by
the rank (the *augmented* form), instead of writing the rank-r product into the output first.

    Fgu = [[Wg, Bg, 0 ],                    Fd = [[Wd, Bd],
           [Wu, 0,  Bu],                          [Ad, 0 ]]      (H + td, I + td)
           [Ag, 0,  0 ],
           [Au, 0,  0 ]]   (2I + 2 th, H + 2 th)

    th >= rg, ru (each of gate's and up's factors gets its own half of the tail, so the blocks off
    the diagonal are never written and stay zero whatever the ranks of the adapters that use
    them) and td >= rd, multiples of TAIL_ALIGN (16-byte rows in bfloat16, as TMA needs)

The parameters ``gate_proj.base.weight`` etc. become views of these buffers (``Fgu[:I, :H]``,
``Fgu[I:2I, :H]``, ``Fd[:H, :I]``): the same values, a row stride of H + 2 th (I + td) instead
of H (I), 0.4-0.8% more bytes. Every PyTorch operation and lorakit kernel takes such strided
weights. The factors are copied in just before a GEMM reads them (they change at every
optimizer step), the B's in forward and the A's in backward (``write``: d r or r k elements
each), so adapters stay ordinary parameters; a smaller rank than the tail leaves stale values
beyond it, which meet zero columns of the augmented input.

Each GEMM site then reads (fused.mlp_forward / mlp_backward):

    [g | u] = [x | sg x Ag^T 0 | su x Au^T 0] Fgu[:2I]^T            (K = H + 2 th)
    y       = [h | sd h Ad^T 0] Fd[:H]^T                            (K = I + td)
    dh      = [dY | sd dY Bd 0] Fd[:, :I]                           (K = H + td)
    dx      = [dg | du | sg dg Bg 0 | su du Bu 0] Fgu[:, :H]        (K = 2I + 2 th)

The activations' tails are written by the rank-r GEMMs that run in every form; the SwiGLU
kernels write h and [dg | du] straight into their augmented buffers, and x and dY are copied
into theirs (one (N, H) copy each, against the (N, 2I) or (N, I) write and epilogue read that
adding beside W0 costs).

``buffers`` finds the packing from the weights' own storage (no registry: a model moved with
``.to()`` gets contiguous weights back, and the node falls back to its other forms until it
is packed again). The buffer tensors it returns are fresh tensor objects over that storage, so
writing the tails never bumps the version counter of a weight that autograd has saved.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

TAIL_ALIGN = 8


def tail(r: int) -> int:
    """The tail width for rank r: r rounded up to a multiple of TAIL_ALIGN."""
    return -(-r // TAIL_ALIGN) * TAIL_ALIGN


def _weight(layer: nn.Module) -> nn.Parameter:
    return layer._modules["base"]._parameters["weight"]


def _over(w: Tensor, rows: int, cols: int) -> Tensor:
    """A new tensor object (its own version counter) viewing w's whole storage as (rows, cols)."""
    return w.new_empty(0).set_(w.untyped_storage(), 0, (rows, cols), (cols, 1))


def buffers(wg: Tensor, wu: Tensor, wd: Tensor, r_half: int, r_d: int) -> Optional[tuple[Tensor, Tensor]]:
    """(Fgu, Fd) when wg, wu, wd are packed with tails of at least r_half columns each for gate's
    and up's factors and r_d for down's, else None."""
    i, h = wg.shape
    cols, cols_d = wg.stride(0), wd.stride(0)
    t, td = cols - h, cols_d - i
    if t % 2 or t // 2 < r_half or td < r_d or t <= 0 or td <= 0:
        return None
    if (wg.stride(1) != 1 or wu.stride() != wg.stride() or wd.stride(1) != 1 or wg.storage_offset() != 0
            or wu.storage_offset() != i * cols or wd.storage_offset() != 0):
        return None
    sg, sd = wg.untyped_storage(), wd.untyped_storage()
    size = wg.element_size()
    if (wu.untyped_storage().data_ptr() != sg.data_ptr() or sg.nbytes() != (2 * i + t) * cols * size
            or sd.nbytes() != (h + td) * cols_d * size or wg.dtype != wd.dtype):
        return None
    return _over(wg, 2 * i + t, cols), _over(wd, h + td, cols_d)


def half(fgu: Tensor, h: int) -> int:
    """th: the width of gate's (and of up's) half of Fgu's tail."""
    return (fgu.shape[1] - h) // 2


def write_b(fgu: Tensor, fd: Tensor, bg: Optional[Tensor], bu: Optional[Tensor], bd: Optional[Tensor]) -> None:
    """Copy the B's given (None: skip) into their tail columns: what the forward GEMMs read."""
    i, h = dims(fgu, fd)
    th = half(fgu, h)
    dst, src = [], []
    if bg is not None:
        dst += [fgu[:i, h:h + bg.shape[1]], fgu[i:2 * i, h + th:h + th + bu.shape[1]]]
        src += [bg, bu]
    if bd is not None:
        dst.append(fd[:h, i:i + bd.shape[1]])
        src.append(bd)
    if dst:
        torch._foreach_copy_(dst, src)


def write_a(fgu: Tensor, fd: Tensor, ag: Optional[Tensor], au: Optional[Tensor], ad: Optional[Tensor]) -> None:
    """Copy the A's given (None: skip) into their tail rows: what the backward GEMMs read."""
    i, h = dims(fgu, fd)
    th = half(fgu, h)
    dst, src = [], []
    if ag is not None:
        dst += [fgu[2 * i:2 * i + ag.shape[0], :h], fgu[2 * i + th:2 * i + th + au.shape[0], :h]]
        src += [ag, au]
    if ad is not None:
        dst.append(fd[h:h + ad.shape[0], :i])
        src.append(ad)
    if dst:
        torch._foreach_copy_(dst, src)


def dims(fgu: Tensor, fd: Tensor) -> tuple[int, int]:
    """(I, H) of a pair of buffers: Fgu is (2I + t, H + t), Fd (H + td, I + td)."""
    i = (fgu.shape[0] - fgu.shape[1]) - (fd.shape[1] - fd.shape[0])    # (2I - H) - (I - H)
    return i, fgu.shape[1] - (fgu.shape[0] - 2 * i)


@torch.no_grad()
def pack(gate: nn.Module, up: nn.Module, down: nn.Module, r_half: int, r_d: int) -> bool:
    """Move the three LoRA layers' base weights into packed buffers with tails for ranks up to
    r_half (gate's, and up's) and r_d (down's). Values unchanged; returns False (nothing done) when
    the weights do not fit the layout (shapes, devices or dtypes differ) or are already packed
    wide enough."""
    wg, wu, wd = _weight(gate), _weight(up), _weight(down)
    i, h = wg.shape
    if (wu.shape != (i, h) or wd.shape != (h, i) or not (wg.device == wu.device == wd.device)
            or not (wg.dtype == wu.dtype == wd.dtype) or not wg.dtype.is_floating_point):
        return False
    if buffers(wg, wu, wd, r_half, r_d) is not None:
        return False
    wg.data, wu.data, wd.data = packed_copies(wg.data, wu.data, wd.data, r_half, r_d)
    return True


def packed_copies(wg: Tensor, wu: Tensor, wd: Tensor, r_half: int, r_d: int, align: int = TAIL_ALIGN
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of wg (I, H), wu, wd (H, I) as views of new packed buffers (zero tails: two halves of
    r_half and one of r_d, each rounded up to a multiple of ``align``)."""
    i, h = wg.shape
    t, td = 2 * (-(-r_half // align) * align), -(-r_d // align) * align
    fgu = wg.new_zeros((2 * i + t, h + t))
    fgu[:i, :h] = wg
    fgu[i:2 * i, :h] = wu
    fd = wd.new_zeros((h + td, i + td))
    fd[:h, :i] = wd
    return fgu[:i, :h], fgu[i:2 * i, :h], fd[:h, :i]


@torch.no_grad()
def unpack(gate: nn.Module, up: nn.Module, down: nn.Module) -> bool:
    """Give the three base weights contiguous storage of their own again (values unchanged);
    returns whether they were packed."""
    ws = [_weight(m) for m in (gate, up, down)]
    if buffers(*ws, 1, 1) is None:
        return False
    for w in ws:
        w.data = w.data.clone(memory_format=torch.contiguous_format)
    return True


def packed(gate: nn.Module, up: nn.Module, down: nn.Module) -> bool:
    """Whether the three layers' base weights are packed (any tail width)."""
    return buffers(*[_weight(m) for m in (gate, up, down)], 1, 1) is not None
