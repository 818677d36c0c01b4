"""AdamW over the adapter parameters, with a lean step.

A LoRA model trains many small tensors: r=16 on the 7 projections of a 16-layer Llama is
224 of them. torch's fused AdamW updates them all in a few kernel launches, but before those
launches its ``step`` walks every parameter in Python (``Adam._init_group``: the gradient, the
state's lookup and seven list appends per parameter) and groups the lists by device and dtype
again. On the H200's host torch's fused step and zero_grad take 2.26 ms per step, this step
1.38 ms (bench/host_cost.py, ``host_cost_h200_s14h.md``: 224 adapters), while the GPU, its
backward done, waits: 1% of a compiled 1B training step, a cost the frozen bound (nothing to
update) does not pay. (On 2 CPU cores torch's fused step takes 2.0 ms of Python and kernel, this
one 1.2 ms; torch's default for-loop step 21.7 ms.)

``AdamW`` is ``torch.optim.AdamW``: same constructor, state, ``state_dict`` and update (it calls
the same ``torch._fused_adamw_`` kernel with the same arguments, so the results are bit for bit
torch's). With ``fused=True``, after the first step (torch's own, which creates the state) it
keeps, per parameter group and per (device, dtype), the lists of parameters, moments and step
counters, and each step only gathers the gradients and launches:

    steps += 1                                   one _foreach_add_
    p, m, v = fused_adamw(p, g, m, v, steps)     one _fused_adamw_ (lr, betas, eps, weight decay
                                                 read from the group each step: schedulers work)

Anything the lists do not cover runs torch's step instead: a closure, a parameter without a
gradient, amsgrad, maximize, capturable or differentiable groups, a tensor learning rate,
complex parameters, a GradScaler's ``grad_scale`` / ``found_inf`` (fp16). ``load_state_dict`` and
``add_param_group`` drop the lists, and they are remade when the state changes size or a group's
parameter count changes.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

_LEAN_OFF = ("amsgrad", "maximize", "capturable", "differentiable")


def fused_supported(p: Tensor) -> bool:
    """Whether torch has a fused AdamW kernel for ``p`` (floating point, on a device it lists);
    torch itself checks only at the first step."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:                               # a torch that does not say: the two we know
        devices = ["cuda", "cpu"]
    return torch.is_floating_point(p) and p.device.type in devices


class AdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` whose fused step skips torch's per-parameter Python (module docstring)."""

    def __init__(self, params, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self._lean: Optional[list] = None            # per group: [(params, exp_avgs, exp_avg_sqs, steps)]; None: to make
        self._lean_key: tuple = ()                   # what the lists were made from (``_key``)

    def step(self, closure=None):
        if closure is None and self._lean_step():
            return None
        return super().step(closure)                 # in place: the lists stay valid

    def load_state_dict(self, state_dict) -> None:
        self._lean = None
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group) -> None:
        self._lean = None
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ the lean step
    def _lean_step(self) -> bool:
        """One update through the kept lists; False (nothing done) where torch's step must run."""
        if getattr(self, "grad_scale", None) is not None or getattr(self, "found_inf", None) is not None:
            return False
        key = self._key()
        if self._lean is None or self._lean_key != key:
            self._lean = self._lean_lists() or []    # []: torch's step, until the key changes
            self._lean_key = key
        if not self._lean:
            return False
        work = []
        for group, parts in zip(self.param_groups, self._lean):
            if isinstance(group["lr"], Tensor):
                return False
            for ps, ms, vs, ss in parts:
                grads = [p.grad for p in ps]
                if any(g is None for g in grads):
                    return False
                work.append((group, ps, grads, ms, vs, ss))
        for group, ps, grads, ms, vs, ss in work:       # every check passed: now update
            beta1, beta2 = group["betas"]
            adamw = torch._fused_adamw_ if group.get("decoupled_weight_decay", True) else torch._fused_adam_
            torch._foreach_add_(ss, 1)
            adamw(ps, grads, ms, vs, [], ss, amsgrad=False, lr=group["lr"], beta1=float(beta1),
                  beta2=float(beta2), weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
                  grad_scale=None, found_inf=None)
        return True

    def _key(self) -> tuple:
        """The state dict's identity and size and each group's parameter count: the lists are
        remade when one changes (state created by torch's step, parameters appended to a group)."""
        return (id(self.state), len(self.state), tuple(len(g["params"]) for g in self.param_groups))

    def _lean_lists(self) -> Optional[list]:
        """Per group, per (device, dtype): ([p], [exp_avg], [exp_avg_sq], [step]), or None where a
        group is not fused, has an option the lists do not cover, or a parameter without state."""
        out = []
        for group in self.param_groups:
            if not group.get("fused") or any(group.get(k) for k in _LEAN_OFF):
                return None
            parts: dict = {}
            for p in group["params"]:
                st = self.state.get(p)
                if not st or torch.is_complex(p) or not all(k in st for k in ("step", "exp_avg", "exp_avg_sq")):
                    return None
                lists = parts.setdefault((p.device, p.dtype), ([], [], [], []))
                for lst, t in zip(lists, (p, st["exp_avg"], st["exp_avg_sq"], st["step"])):
                    lst.append(t)
            out.append(list(parts.values()))
        return out
