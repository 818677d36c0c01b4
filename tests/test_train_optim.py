"""lorakit.train.optim.AdamW: torch's fused AdamW, bit for bit, through the lean step where it
applies and through torch's own step everywhere else."""

from __future__ import annotations

import copy

import pytest
import torch

from lorakit.train.loop import adamw
from lorakit.train.optim import AdamW


def params(seed: int = 0, dtypes=(torch.float32,) * 4 + (torch.bfloat16,) * 2, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 16), (16, 4), (2, 8), (8, 2), (4, 16), (16, 4)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device=device, dtype=dt))
            for s, dt in zip(shapes, dtypes)]


def groups(ps, **extra):
    """Two parameter groups with their own hyperparameters (as a user's decay / no-decay split)."""
    return [{"params": ps[:3], "weight_decay": 0.1, **extra},
            {"params": ps[3:], "weight_decay": 0.0, "lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6}]


def set_grads(pairs, step: int, skip=()):
    g = torch.Generator().manual_seed(100 + step)
    for i, (a, b) in enumerate(pairs):
        grad = None if i in skip else torch.randn(a.shape, generator=g).to(a.device, a.dtype)
        a.grad = grad
        b.grad = None if grad is None else grad.clone()


def run_both(steps=5, make=lambda ps: AdamW(groups(ps), lr=1e-2, fused=True),
             ref=lambda qs: torch.optim.AdamW(groups(qs), lr=1e-2, fused=True), skip=lambda step: (), lr_at=None):
    ps, qs = params(), params()
    ours, theirs = make(ps), ref(qs)
    for step in range(steps):
        if lr_at is not None:
            for o in (ours, theirs):
                for grp in o.param_groups:
                    grp["lr"] = lr_at(step)
        set_grads(list(zip(ps, qs)), step, skip(step))
        ours.step()
        theirs.step()
    return ps, qs, ours, theirs


def assert_same(ps, qs, ours, theirs):
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
    sa, sb = ours.state_dict(), theirs.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)


def test_lean_step_is_torch_fused_adamw_bit_for_bit_and_skips_torchs_per_parameter_walk(monkeypatch):
    """Two groups, float32 and bfloat16 parameters, a schedule changing lr every step: the same
    bits as torch.optim.AdamW(fused=True), and after the first step torch's step never runs."""
    calls = []
    init_group = torch.optim.AdamW._init_group          # (torch._dynamo sets its own on each optimizer class)
    monkeypatch.setattr(torch.optim.AdamW, "_init_group", lambda self, *a, **k: calls.append(type(self)) or
                        init_group(self, *a, **k))
    ps, qs, ours, theirs = run_both(steps=6, lr_at=lambda s: 1e-2 * (0.5 + 0.1 * s))
    assert_same(ps, qs, ours, theirs)
    assert calls.count(AdamW) == 2                          # the first step (one per group), then lean
    assert calls.count(torch.optim.AdamW) == 12
    assert [len(parts) for parts in ours._lean] == [1, 2]   # group 2: one float32 part, one bfloat16


def test_lean_step_matches_the_default_implementation_closely():
    """Against torch's default (for-loop) AdamW: the same update up to float rounding."""
    ps, qs, ours, theirs = run_both(ref=lambda qs: torch.optim.AdamW(groups(qs), lr=1e-2))
    for a, b in zip(ps, qs):
        tol = dict(rtol=1e-6, atol=1e-6) if a.dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(a, b, **tol)


def test_a_parameter_without_gradient_takes_torchs_step_and_stays_the_same():
    ps, qs, ours, theirs = run_both(steps=5, skip=lambda s: (2,) if s in (2, 3) else ())
    assert_same(ps, qs, ours, theirs)
    assert ours.state_dict()["state"][2]["step"].item() == 3.0


@pytest.mark.parametrize("extra", [{"amsgrad": True}, {"maximize": True}])
def test_options_the_lists_do_not_cover_run_torchs_step(extra):
    ps, qs, ours, theirs = run_both(make=lambda ps: AdamW(groups(ps, **extra), lr=1e-2, fused=True),
                                    ref=lambda qs: torch.optim.AdamW(groups(qs, **extra), lr=1e-2, fused=True))
    assert_same(ps, qs, ours, theirs)
    assert ours._lean == []


def test_a_grad_scalers_found_inf_runs_torchs_step():
    """GradScaler hands a fused optimizer grad_scale / found_inf as attributes: torch's step
    then skips the update (found_inf = 1) and rolls the step counters back."""
    ps, qs, ours, theirs = run_both(steps=3)
    set_grads(list(zip(ps, qs)), 9)
    for o in (ours, theirs):
        o.grad_scale, o.found_inf = torch.tensor(2.0), torch.tensor(1.0)
        o.step()
        del o.grad_scale, o.found_inf
    assert_same(ps, qs, ours, theirs)
    assert ours.state_dict()["state"][0]["step"].item() == 3.0


def test_state_dict_round_trip_and_load_state_dict_mid_run():
    """A checkpoint's state loads into a fresh optimizer (lorakit's or torch's) and training goes
    on identically; loading an older state into a running optimizer replaces what it steps."""
    ps, qs, ours, theirs = run_both(steps=3)
    saved = copy.deepcopy(ours.state_dict())
    snap_p = [p.detach().clone() for p in ps]
    for step in (3, 4):
        set_grads(list(zip(ps, qs)), step)
        ours.step()
        theirs.step()
    assert_same(ps, qs, ours, theirs)
    # back to step 3 in both (the running lorakit optimizer and a fresh torch one)
    with torch.no_grad():
        for p, q, s in zip(ps, qs, snap_p):
            p.copy_(s)
            q.copy_(s)
    ours.load_state_dict(copy.deepcopy(saved))
    theirs = torch.optim.AdamW(groups(qs), lr=1e-2, fused=True)
    theirs.load_state_dict(copy.deepcopy(saved))
    for step in (3, 4):
        set_grads(list(zip(ps, qs)), step)
        ours.step()
        theirs.step()
    assert_same(ps, qs, ours, theirs)
    assert ours.state_dict()["state"][0]["step"].item() == 5.0


def test_closure_and_add_param_group():
    ps, qs = params(), params()
    ours, theirs = AdamW([ps[0]], lr=1e-2, fused=True), torch.optim.AdamW([qs[0]], lr=1e-2, fused=True)
    for step in range(2):
        set_grads([(ps[0], qs[0])], step)
        ours.step()
        theirs.step()
    for o, extra in ((ours, ps[1:3]), (theirs, qs[1:3])):
        o.add_param_group({"params": list(extra), "lr": 5e-3})
    for step in range(2, 4):
        set_grads(list(zip(ps[:3], qs[:3])), step)
        assert ours.step(closure=lambda: torch.tensor(1.5)) == torch.tensor(1.5)
        theirs.step()
    for a, b in zip(ps[:3], qs[:3]):
        assert torch.equal(a, b)
    set_grads(list(zip(ps[:3], qs[:3])), 5)
    ours.step()
    theirs.step()
    for a, b in zip(ps[:3], qs[:3]):
        assert torch.equal(a, b)
    assert len(ours._lean) == 2


def test_a_parameter_appended_to_a_group_is_stepped():
    """A parameter appended to a group's list (no add_param_group) joins the update: the lists
    are remade when a group's parameter count changes."""
    ps, qs, ours, theirs = run_both(make=lambda ps: AdamW([ps[0]], lr=1e-2, fused=True),
                                    ref=lambda qs: torch.optim.AdamW([qs[0]], lr=1e-2, fused=True), steps=2)
    ours.param_groups[0]["params"].append(ps[1])
    theirs.param_groups[0]["params"].append(qs[1])
    for step in range(2, 5):
        set_grads(list(zip(ps[:2], qs[:2])), step)
        ours.step()
        theirs.step()
    for a, b in zip(ps[:2], qs[:2]):
        assert torch.equal(a, b)
    assert sum(len(p[0]) for p in ours._lean[0]) == 2


def test_adamw_factory_fuses_where_torch_has_the_kernel():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = adamw([p], lr=0.1, weight_decay=0.0)
    assert type(opt) is AdamW and opt.defaults["fused"] is True and opt.defaults["lr"] == 0.1
    m = torch.nn.Parameter(torch.zeros(3, device="meta"))
    plain = adamw([m], lr=0.1)
    assert type(plain) is torch.optim.AdamW and not plain.defaults.get("fused")


def test_lr_scheduler_drives_the_lean_step():
    ps, qs = params(), params()
    ours, theirs = AdamW(groups(ps), lr=1e-2, fused=True), torch.optim.AdamW(groups(qs), lr=1e-2, fused=True)
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0 / (1 + s)) for o in (ours, theirs)]
    for step in range(5):
        set_grads(list(zip(ps, qs)), step)
        for o, s in zip((ours, theirs), scheds):
            o.step()
            s.step()
    assert_same(ps, qs, ours, theirs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_lean_step_is_torch_fused_adamw_bit_for_bit():
    ps, qs = params(device="cuda"), params(device="cuda")
    ours, theirs = AdamW(groups(ps), lr=1e-2, fused=True), torch.optim.AdamW(groups(qs), lr=1e-2, fused=True)
    for step in range(5):
        set_grads(list(zip(ps, qs)), step)
        ours.step()
        theirs.step()
    assert_same(ps, qs, ours, theirs)
    assert ours._lean and len(ours._lean) == 2
