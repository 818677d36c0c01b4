"""Packed MLP weights: each frozen W0 of a fused gated MLP (lorakit.fused) shares one buffer with
room for the LoRA factors, so each of the MLP's GEMM sites can run as ONE GEMM whose K grows by
the rank (the *augmented* form), instead of writing the rank-r product into the output first.

    Fgu = [[Wg,     Bg, 0 ],                Fd = [[Wd, Bd],
           [Wu,     0,  Bu],                      [Ad, 0 ]]      (H + td, I + td)
           [Ag; Au, 0,  0 ]]   (2I + t, H + t)

    t >= rg + ru and td >= rd, multiples of TAIL_ALIGN (16-byte rows in bfloat16, as TMA needs)

The parameters ``gate_proj.base.weight`` etc. become views of these buffers (``Fgu[:I, :H]``,
``Fgu[I:2I, :H]``, ``Fd[:H, :I]``): the same values, a row stride of H + t (I + td) instead of
H (I), 0.4-0.8% more bytes. Every PyTorch operation and lorakit kernel takes such strided
weights. The factors are copied into the tails by ``refresh`` before each use (they change at
every optimizer step; a copy of d r + r k elements), so adapters stay ordinary parameters.

Each GEMM site then reads (fused.mlp_forward / mlp_backward):

    [g | u] = [x | sg x Ag^T | su x Au^T | 0] Fgu[:2I]^T          (K = H + t)
    y       = [h | sd h Ad^T | 0] Fd[:H]^T                         (K = I + td)
    dh      = [dY | sd dY Bd | 0] Fd[:, :I]                        (K = H + td)
    dx      = [dg | du | sg dg Bg | su du Bu | 0] Fgu[:, :H]        (K = 2I + t)

The activations' tails are written by the rank-r GEMMs that run in every form; the SwiGLU
kernels write h and [dg | du] straight into their augmented buffers, and x and dY are copied
into theirs (one (N, H) copy each, against the (N, 2I) or (N, I) write and epilogue read that
adding beside W0 costs). Measured at the 8B shape (``bench/results/augmented_h200.md``): the MLP's
forward 62 us and backward 51 us faster per layer than beside W0.

``buffers`` finds the packing from the weights' own storage (no registry: a model moved with
``.to()`` gets contiguous weights back, and the node falls back to its other forms until it
is packed again). The buffer tensors it returns are fresh tensor objects over that storage, so
refreshing the tails never bumps the version counter of a weight that autograd has saved.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

TAIL_ALIGN = 8


def tail(r: int) -> int:
    """The tail width for rank(s) summing to r: r rounded up to a multiple of TAIL_ALIGN."""
    return -(-r // TAIL_ALIGN) * TAIL_ALIGN


def _weight(layer: nn.Module) -> nn.Parameter:
    return layer._modules["base"]._parameters["weight"]


def _over(w: Tensor, rows: int, cols: int) -> Tensor:
    """A new tensor object (its own version counter) viewing w's whole storage as (rows, cols)."""
    return w.new_empty(0).set_(w.untyped_storage(), 0, (rows, cols), (cols, 1))


def buffers(wg: Tensor, wu: Tensor, wd: Tensor, r_gu: int, r_d: int) -> Optional[tuple[Tensor, Tensor]]:
    """(Fgu, Fd) when wg, wu, wd are packed with tails of at least r_gu and r_d columns, else None."""
    i, h = wg.shape
    cols, cols_d = wg.stride(0), wd.stride(0)
    t, td = cols - h, cols_d - i
    if t < r_gu or td < r_d or t <= 0 or td <= 0:
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


def refresh(fgu: Tensor, fd: Tensor, ag: Tensor, bg: Tensor, au: Tensor, bu: Tensor, ad: Tensor, bd: Tensor) -> None:
    """Copy the (unscaled) factors into the buffers' tails, in one ``_foreach_copy_``; the rest of
    the tails stays zero (``pack`` zeroes it; the activations' unused tail columns are zero too)."""
    rg, ru, rd = ag.shape[0], au.shape[0], ad.shape[0]
    i, h = bg.shape[0], ag.shape[1]
    dst = [fgu[:i, h:h + rg], fgu[i:2 * i, h + rg:h + rg + ru], fgu[2 * i:2 * i + rg, :h],
           fgu[2 * i + rg:2 * i + rg + ru, :h], fd[:h, i:i + rd], fd[h:h + rd, :i]]
    torch._foreach_copy_(dst, [bg, bu, ag, au, bd, ad])


@torch.no_grad()
def pack(gate: nn.Module, up: nn.Module, down: nn.Module, r_gu: int, r_d: int) -> bool:
    """Move the three LoRA layers' base weights into packed buffers with tails for ranks r_gu
    (gate's plus up's) and r_d. Values unchanged; returns False (nothing done) when the weights
    do not fit the layout (shapes, devices or dtypes differ) or are already packed wide enough."""
    wg, wu, wd = _weight(gate), _weight(up), _weight(down)
    i, h = wg.shape
    if (wu.shape != (i, h) or wd.shape != (h, i) or not (wg.device == wu.device == wd.device)
            or not (wg.dtype == wu.dtype == wd.dtype) or not wg.dtype.is_floating_point):
        return False
    if buffers(wg, wu, wd, r_gu, r_d) is not None:
        return False
    wg.data, wu.data, wd.data = packed_copies(wg.data, wu.data, wd.data, r_gu, r_d)
    return True


def packed_copies(wg: Tensor, wu: Tensor, wd: Tensor, r_gu: int, r_d: int, align: int = TAIL_ALIGN
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """Copies of wg (I, H), wu, wd (H, I) as views of new packed buffers (zero tails rounded up to
    multiples of ``align``)."""
    i, h = wg.shape
    t, td = -(-r_gu // align) * align, -(-r_d // align) * align
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
    r_gu, r_d = ws[0].stride(0) - ws[0].shape[1], ws[2].stride(0) - ws[2].shape[1]
    if r_gu <= 0 or buffers(*ws, r_gu, r_d) is None:
        return False
    for w in ws:
        w.data = w.data.clone(memory_format=torch.contiguous_format)
    return True


def packed(gate: nn.Module, up: nn.Module, down: nn.Module) -> bool:
    """Whether the three layers' base weights are packed (any tail width)."""
    ws = [_weight(m) for m in (gate, up, down)]
    return ws[0].stride(0) > ws[0].shape[1] and buffers(*ws, 1, 1) is not None
