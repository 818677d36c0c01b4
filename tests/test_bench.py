"""The benchmarks measure what they say: a cheap CPU check of bench/infer.py's decoding loop."""

from __future__ import annotations

import os
import sys
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lorakit  # noqa: E402
from lorakit import ops  # noqa: E402


def test_infer_decoding_runs_one_token_per_sequence_per_step(monkeypatch):
    """generate with the KV cache: after the prompt, every adapted layer sees one new token per
    sequence (the bench once decoded without the cache and re-ran the whole sequence each step)."""
    from bench import common, infer
    size = dict(hidden=32, layers=2, inter=64, heads=4, kv=2, vocab=97, tie=False)
    model = common.build_llama(size, "cpu", torch.float32, seed=0).eval()     # its config says use_cache=False
    model.generation_config.pad_token_id = 0
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=common.TARGETS7))
    rows = []
    real = ops._lora_linear_nograd

    def spy(x, *a):
        rows.append(tuple(x.shape[:-1]))
        return real(x, *a)

    monkeypatch.setattr(ops, "_lora_linear_nograd", spy)
    args = SimpleNamespace(batch=1, seq=4, gen_batch=3, prompt=5, new_tokens=4, device="cpu")
    steps = infer.generate_fn(model, args, infer.StepClock())()
    assert len(steps) == args.new_tokens                      # one time per step after the first token
    per_call = set(rows)
    assert (3, 5) in per_call and (3, 1) in per_call and per_call <= {(3, 5), (3, 1)}


def test_longest_fitting_sequence_search():
    from bench.longest_seq import longest
    for limit_fit in (1024, 1300, 5000, 8192, 100_000):
        asked = []

        def fits(n):
            asked.append(n)
            return n <= limit_fit
        got = longest(fits, 1024, 256, 65536)
        assert got == min(limit_fit // 256 * 256, 65536) and got <= limit_fit
        assert len(asked) <= 2 + 7 + 8                           # doublings, then a bisection to 256
    assert longest(lambda n: n <= 500, 1024, 256, 65536) is None  # not even the start fits
    assert longest(lambda n: True, 1024, 256, 3000) == 3000       # capped by the limit


def _trace():
    """A hand-made trace: forward launches k1 and k2 (queued behind k1); backward launches k3,
    which the GPU starts 35 us after the launch returned, after 58 us of idle GPU."""
    ev = [
        dict(ph="X", cat="user_annotation", name="phase:forward", ts=0, dur=100, tid=1),
        dict(ph="X", cat="user_annotation", name="phase:backward", ts=100, dur=100, tid=1),
        dict(ph="X", cat="cpu_op", name="_LoraLinearFn", ts=5, dur=40, tid=1),
        dict(ph="X", cat="cpu_op", name="aten::mm", ts=10, dur=20, tid=1),
        dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=15, dur=5, tid=1, args=dict(correlation=1)),
        dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=50, dur=5, tid=1, args=dict(correlation=2)),
        dict(ph="X", cat="cpu_op", name="Backward", ts=110, dur=30, tid=2),
        dict(ph="X", cat="cuda_runtime", name="cudaLaunchKernel", ts=120, dur=5, tid=2, args=dict(correlation=3)),
        dict(ph="X", cat="kernel", name="k1", ts=22, dur=50, args=dict(correlation=1)),
        dict(ph="X", cat="kernel", name="k2", ts=72, dur=30, args=dict(correlation=2)),
        dict(ph="X", cat="kernel", name="k3", ts=160, dur=10, args=dict(correlation=3)),
    ]
    return {"traceEvents": ev}


def test_timeline_splits_idle_gpu_time_into_phases_and_starved_gaps():
    from bench import timeline
    res = timeline.analyze(_trace(), slack_us=15)
    fw, bw = res["phases"]["forward"], res["phases"]["backward"]
    assert fw["kernels"] == 2 and fw["gpu_busy_ms"] == 0.080 and fw["gpu_span_ms"] == 0.080
    assert fw["idle_ms"] == 0.0 and fw["starved_ms"] == 0.0          # k1 is the first kernel: no gap before it
    assert bw["kernels"] == 1 and bw["idle_ms"] == 0.058            # 102 -> 160
    assert bw["starved_ms"] == 0.0                                  # k3 started 35 us after its launch returned
    res = timeline.analyze(_trace(), slack_us=40)
    assert res["phases"]["backward"]["starved_ms"] == 0.058
    assert res["starved_by_op_ms"] == {"Backward": 0.058}
    assert res["step"]["gpu_busy_ms"] == 0.09 and res["step"]["wall_ms"] == 0.17
    text = timeline.report(res, "x")
    assert "backward" in text and "Backward" in text


def test_host_cost_runs_on_cpu(tmp_path):
    """bench/host_cost.py end to end on the CPU (2 rounds, few calls): every row is there."""
    from bench import host_cost
    assert host_cost.main(["--device", "cpu", "--variants", "bound,lorakit", "--rounds", "2", "--calls", "2",
                           "--seq", "16", "--out", str(tmp_path / "h")]) == 0
    import json
    rows = json.loads((tmp_path / "h.json").read_text())["rows"]
    steps = {r["name"]: r for r in rows if r["kind"] == "step"}
    assert set(steps) == {"bound", "lorakit"} and steps["bound"]["extra_ms"] == 0
    assert all(r["host_us"] > 0 for r in rows if r["kind"] == "op")


def test_append_gemm_cases_compute_the_same_products():
    """bench/append_gemm.py times two forms of one computation: on the CPU (float32) the appended
    GEMM's result holds the separate GEMMs' results, at every site of a layer (smol widths)."""
    from bench import append_gemm
    for site in append_gemm.sites("smol", 16, 4):
        fns = append_gemm.cases(site, "cpu", torch.float32)
        sep, app = fns["separate"](), fns["appended"]()
        cut = site["d"] if site["dir"] == "fwd" else site["k"]
        assert torch.allclose(app[:, :cut], sep[0], rtol=1e-5, atol=1e-4)
        assert torch.allclose(app[:, cut:], sep[1], rtol=1e-5, atol=1e-4)


def test_small_gemm_sites_are_the_stacked_projections():
    from bench import small_gemm
    h, kv, m = 2048, 512, 8192
    assert small_gemm.sites("1b", 16) == [("q|k|v", 8192, h + 2 * kv, h, 48), ("o", 8192, h, h, 16),
                                          ("gate|up", 8192, 2 * m, h, 32), ("down", 8192, h, m, 16)]


def test_rank_reduce_sites_cover_every_reduction_of_a_layer():
    from bench import rank_reduce
    names = [s[0] for s in rank_reduce.sites("1b", 16)]
    assert len(names) == 8 and sum(n.startswith("dA") for n in names) == 4
    assert ("dB gate (dY)", 8192, 8192, 16) in rank_reduce.sites("1b", 16)


def test_append_gemm_main_writes_its_table(tmp_path, monkeypatch):
    """bench/append_gemm.py end to end on the CPU, its CUDA timer replaced by call counting."""
    from bench import append_gemm
    monkeypatch.setattr(append_gemm, "time_cases", lambda fns, rounds, calls: {n: 1.0 + len(n) for n in fns})
    assert append_gemm.main(["--device", "cpu", "--sizes", "smol", "--r", "4", "--out", str(tmp_path / "a")]) == 0
    import json
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert len(rows) == 8 and {r["site"] for r in rows} >= {"o fwd", "down bwd"}
    assert "appended / separate" in (tmp_path / "a.md").read_text()



def test_mlp_forms_main_runs_every_form_end_to_end(tmp_path, monkeypatch):
    """bench/mlp_forms.py on the CPU (smol widths, float32), its CUDA timer replaced by one call
    per round; every forced form gives the merged form's outputs and gradients."""
    from bench import common, mlp_forms
    from lorakit import fused
    monkeypatch.setattr(common, "cuda_timer", lambda fn, calls: lambda: (fn(), 1.0)[1])
    assert mlp_forms.main(["--device", "cpu", "--dtype", "float32", "--sizes", "smol", "--rounds", "2",
                           "--out", str(tmp_path / "m")]) == 0
    import json
    rows = json.loads((tmp_path / "m.json").read_text())["rows"]
    assert len(rows) == 8 and sum(r["chosen"] for r in rows) == 2
    assert len(json.loads((tmp_path / "m_epilogue.json").read_text())["rows"]) == 4
    t = mlp_forms.tensors("smol", 4, "cpu", torch.float32)
    ref = None
    for f in mlp_forms.FWD.values():
        for b in mlp_forms.BWD.values():
            fwd, bwd = mlp_forms.node_fns(t, f, b)
            out = [fwd()[0]] + [g for g in bwd() if g is not None]
            ref = ref or out
            for a, w in zip(out, ref):
                assert (a - w).abs().max() <= 1e-4 * w.abs().max()
    assert fused.mlp_forms(512, 1536, 576) == (False, False, False, False)


def test_swiglu_lora_reference_is_the_activation_plus_the_low_rank_terms():
    """bench/swiglu_lora.py's float32 reference: with zero factors it is lorakit's SwiGLU (forward
    and gradient); with factors, the SwiGLU of g0 + sg xag Bg^T and u0 + su xau Bu^T."""
    from bench import swiglu_lora
    from lorakit import activation
    n, i, r = 7, 24, 3
    t = swiglu_lora.inputs(n, i, r, "cpu", torch.float32)
    gu, bt, dh = t["gu"], t["bt"], t["dh"]
    h, dgu = swiglu_lora.reference(gu, bt, r, 0.7, 1.3, dh, t["gd"], torch.zeros_like(t["ad"]))
    g = gu[:, :i] + 0.7 * gu[:, 2 * i:2 * i + r] @ bt[:r]
    u = gu[:, i:2 * i] + 1.3 * gu[:, 2 * i + r:] @ bt[r:]
    plain = torch.cat([g, u], dim=1)
    assert torch.allclose(h, activation.swiglu_forward_reference(plain), atol=1e-6)
    assert torch.allclose(dgu, activation.swiglu_backward_reference(dh.clone(), plain), atol=1e-6)


def test_augmented_experiment_matches_the_fused_node():
    """bench/augmented.py's K-augmented MLP (W0 and the factors in one buffer per site) computes the
    fused node's outputs and gradients (float32, CPU), whatever the tails' padding."""
    from bench import augmented, mlp_forms
    t = mlp_forms.tensors("smol", 4, "cpu", torch.float32)
    for pad in (8, 64):
        assert augmented.check(t, pad) < 1e-5


def test_swiglu_reduce_and_terms_references_agree_with_the_library():
    """bench/swiglu_reduce.py's and bench/swiglu_terms.py's float32 references (what their kernels
    are checked against on the GPU) compute what lorakit.activation's references compute."""
    from bench import swiglu_reduce, swiglu_terms
    from lorakit import activation
    n, i, r = 9, 24, 3
    t = swiglu_reduce.inputs(n, i, r, "cpu", torch.float32)
    gu, ad, dh, gd = t["gu"], t["ad"], t["dh"], t["gd"]
    h, has, dgu, dad, dbg, dbu = swiglu_reduce.reference(gu, ad, dh, gd, 0.5, r, 0.7, 1.3)
    want = activation.swiglu_backward_reduce_reference(dh, gu, gd, 0.5, r, 0.7, 1.3, True)
    for a, b in zip((dgu, dad, dbg, dbu), want):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(h, activation.swiglu_forward_reference(gu[:, :2 * i]), atol=1e-6)
    assert torch.allclose(has, h @ ad.t(), atol=1e-5)
    t = swiglu_terms.inputs(n, i, r, "cpu", torch.float32)
    got = swiglu_terms.reference(t["gu"], t["bg"], t["bu"], t["ad"], t["dh"], t["gd"], 0.7, 1.3, 0.5)
    assert torch.allclose(got[0], activation.swiglu_forward_terms_reference(t["gu"], t["bg"], t["bu"], 0.7, 1.3),
                          atol=1e-6)
    want = activation.swiglu_backward_reduce_reference(t["dh"], t["gu"], t["gd"], 0.5, r, 0.7, 1.3, True,
                                                       t["bg"], t["bu"], t["ad"])
    for a, b in zip(got[1:], want):
        assert torch.allclose(a, b, atol=1e-5)
