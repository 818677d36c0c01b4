#!/usr/bin/env bash
# The H200 runs behind bench/results/*_h200*: one call per stage, results under bench/results/
# and copied to $OUT (when set) as results.tar + log.txt.
#
#   bash bench/h200.sh train1b     # GPU tests, per-projection profile, training step at the 1B shape
#   bash bench/h200.sh infer8b     # inference at the 1B shape, training step at the 8B shape
#   bash bench/h200.sh run2        # the second session run: 1B re-measure, 1B inference, 8B (VARIANTS_1B,
#                                   # INFER_VARIANTS, VARIANTS_8B pick the variants)
#   bash bench/h200.sh s2-1b       # session 2: GPU tests, every 1B training variant, 1B inference
#   bash bench/h200.sh s2-8b       # session 2: 8B training (eager and compiled), adapter load times
#   bash bench/h200.sh s3-1b       # session 3: GPU tests, 1B training with the compiled operators
#   bash bench/h200.sh s3-8b       # session 3: 8B training, 1B inference
#   bash bench/h200.sh s3b-1b      # session 3: GPU tests, 1B training (fused AdamW), W' kernel
#   bash bench/h200.sh s3d         # session 3: GPU tests, 1B and 8B (eager + compiled), 1B inference
#   bash bench/h200.sh s3e         # session 3, last: GPU tests after the fusable rework, 1B eager + compiled
#   bash bench/h200.sh s4a         # session 4: GPU tests of ops, the decoding kernel (sweep), 1B inference
#   bash bench/h200.sh s4b         # session 4: the same with split-k in the kernel, decoding with the KV cache
#   bash bench/h200.sh s4c         # session 4: every GPU test, the kernel launched directly, 1B inference
#   bash bench/h200.sh s4d         # session 4, last: GPU tests of the kernels, 1B training with direct launches
#   bash bench/h200.sh s5          # next: every GPU test, 1B training (eager + compiled, with and without +gs)
#   bash bench/h200.sh s5b         # the longest training sequence per variant at the 1B shape
#   bash bench/h200.sh s6          # GPU tests, host time per step (bench/host_cost.py), 1B with q/k/v grouped or not
#   bash bench/h200.sh s6b         # q/k/v grouped under torch.compile too: compiled GPU tests, 1B eager + compiled, 8B eager
#   bash bench/h200.sh s7          # the compiled step's host time (cProfile, timeline)
#   bash bench/h200.sh s8a         # session 6: compiled+grouped GPU tests, the compiled step's host time
#                                   # (cProfile, torch.profiler, timeline), 1B eager + compiled
#   bash bench/h200.sh s8b         # the MLP's LoRA factors appended to its GEMMs: GPU tests, 1B eager + compiled
#                                   # (profiled), 8B eager
#   bash bench/h200.sh s8c         # every GPU test; where the compiled 1B step waits (timelines, bound and lorakit)
#   bash bench/h200.sh s14a        # session 10, first: every GPU test of ops, fused and compiled (the review mends
#                                   # of session 9 were interpreter-checked only), with the slowest tests listed
#   bash bench/h200.sh s14b        # where the compiled 1B step's host time goes on the current code: host_cost.py
#                                   # (cProfile and torch.profiler of lorakit+compile), 1B timelines of both compiled steps
#   bash bench/h200.sh s15i        # the GPU tests s15h's timeout cut short: q/k/v groups, compiled operators, the
#                                   # few-rows kernel
#   bash bench/h200.sh s15h        # x A^T in the merged forward's GEMM (o_proj, q/k/v): GPU tests of ops, q/k/v groups
#                                   # and the compiled operators; 1B compiled and eager: bound, lorakit, +xa-apart
#   bash bench/h200.sh s15g        # where the 1B compiled forward's host time goes, at the real shapes: cProfile of
#                                   # lorakit+compile's forward and backward apart, torch.profiler of one step
#   bash bench/h200.sh s15f        # dY = [dq | dk | dv] concatenated in the compiled graph: GPU tests of the compiled
#                                   # operators and q/k/v groups; 1B compiled: bound, lorakit (its kernels profiled)
#   bash bench/h200.sh s15e        # where the compiled step's host time goes (cProfile and torch.profiler of
#                                   # lorakit+compile and bound+compile, saved to STEM.profile.txt)
#   bash bench/h200.sh s15c        # GPU tests of the fused MLP and the compiled operators; 1B compiled: bound, lorakit,
#                                   # +dh-plain, and both steps' kernels (STEM.profile.txt)
#   bash bench/h200.sh s15d        # session 11's final code: 8B eager and compiled, 1B compiled and eager
#   bash bench/h200.sh s15b        # the row-major SwiGLU backward (its gd^T tile now loaded, not transposed) over
#                                   # row splits and stages; 1B compiled: bound, lorakit
#   bash bench/h200.sh s15a        # the SwiGLU backward with the terms on transposed tiles against row-major ones
#                                   # (bench/swiglu_terms.py --bwd-only --transposed, 1B and 8B), GPU tests of the fused MLP
#   bash bench/h200.sh s14j        # the dh-term backward through the GU path (zero B's): GPU tests of the fused MLP,
#                                   # 1B compiled: bound, lorakit, +dh-plain (the path before)
#   bash bench/h200.sh s14i        # 1B eager against PEFT (defaults and bf16 adapters) on session 10's code
#   bash bench/h200.sh s14h        # the optimizer's host time: lean step against torch's fused and foreach steps
#   bash bench/h200.sh s14g        # session 10's final code: 8B eager and compiled, 1B compiled
#   bash bench/h200.sh s14f        # the same sweep over larger tiles (DH_CONFIGS as committed after s14e)
#   bash bench/h200.sh s14e        # bench/swiglu_terms.py at 1B: the backward with dh's term alone (what 1B runs) in
#                                   # narrower, more split or more warped configurations
#   bash bench/h200.sh s14d        # the same A/B with the caches off for +gu-beside (s14c's reused lorakit's graph), 1B
#                                   # eager too, and both compiled steps' kernels (STEM.profile.txt)
#   bash bench/h200.sh s14c        # gate|up backward merged at 1B with gs in its dX GEMM, and the lean AdamW step: GPU
#                                   # tests, 1B compiled: bound, lorakit, +gu-beside (the old form), +torch-fused
#   bash bench/h200.sh s13j        # GPU tests of the kernels (s13i's timed out unreported), 1B compiled with and
#                                   # without the terms in the kernels
#   bash bench/h200.sh s13i        # session 9's final code: launch and kernel GPU tests, 1B and 8B, eager and compiled
#   bash bench/h200.sh s13h        # the terms priced per site (1B: gate|up forward merged): GPU tests, 1B eager and
#                                   # compiled with and without the terms in the kernels, 8B eager
#   bash bench/h200.sh s13f        # the LoRA terms in the SwiGLU kernels in the library: GPU tests, 8B eager:
#                                   # bound, lorakit, lorakit+gemm-terms (s13c's code)
#   bash bench/h200.sh s13g        # the same at 1B, eager and compiled
#   bash bench/h200.sh s13e        # bench/swiglu_terms.py: the LoRA terms added in the SwiGLU kernels, pipelined
#   bash bench/h200.sh s13c        # the one-kernel SwiGLU backward with dAd, dBg, dBu in the library: GPU tests,
#                                   # 8B eager: bound, lorakit, lorakit+gemm-reduce (the plain kernel and cuBLAS)
#   bash bench/h200.sh s13d        # the same at 1B, eager and compiled
#   TAG=_s13b bash bench/h200.sh s13a  # the same with dBg, dBu folded into the backward (s13a: h reductions only)
#   bash bench/h200.sh s13a        # bench/swiglu_reduce.py: SwiGLU kernels that also do the rank-r reductions
#                                   # reading h (h Ad^T forward, (dY Bd)^T h backward): correctness, GPU time
#   (s12c-s12f ran lorakit.packed, removed after s12f: check out commit 582aad2 to rerun them)
#   bash bench/h200.sh s12f        # packed weights with the factors written just before use (B's forward, A's backward):
#                                   # GPU tests, bench/augmented.py 8B, 8B and 1B eager with and without packing
#   bash bench/h200.sh s12e        # GPU tests of packed weights and the decode kernel (s12c's timed out unreported);
#                                   # bench/augmented.py with the library's packed node beside the experiment's
#   bash bench/h200.sh s12c        # packed MLP weights, the sites not merged augmented: GPU tests, mlp_forms (packed
#                                   # rows), 8B eager: bound, lorakit, lorakit+unpacked
#   bash bench/h200.sh s12b        # bench/augmented.py: the fused MLP with K-augmented GEMMs (W0 and the factors in one
#                                   # buffer, one GEMM per site), checked and timed against the node and the frozen MLP
#   bash bench/h200.sh s12a        # GPU tests of the session-7 end state; bench/swiglu_lora.py, SwiGLU kernels
#                                   # adding the LoRA terms with the plain kernels' layout (ROWS x BLOCK, rank loop
#                                   # not unrolled): correctness, GPU time
#   bash bench/h200.sh s11a        # SwiGLU kernels adding the low-rank terms as r outer products (no tl.dot):
#                                   # their GPU tests, mlp_forms, 8B and 1B steps with and without (+plain-act).
#                                   # s10b and s11a ran code since removed (commits 1ae0ee7 and 4048c78):
#                                   # check those out to rerun them
#   bash bench/h200.sh s10d        # 8B compiled on the final code
#   bash bench/h200.sh s10c        # the final code (the forms; no LoRA terms in the SwiGLU kernels): GPU
#                                   # tests, 1B eager and compiled, 8B eager
#   bash bench/h200.sh s10b        # SwiGLU kernels that add the low-rank terms (fused MLP beside W0): GPU
#                                   # tests, mlp_forms with and without them, 8B and 1B steps (+plain-act: without)
#   bash bench/h200.sh s10a        # the fused MLP's GEMM sites merged or beside W0 (bench/mlp_forms.py),
#                                   # GPU tests of fused/compiled, 8B and 1B steps with lorakit's forms and all-merged
#   bash bench/h200.sh s9a         # the rank-r reductions, cuBLAS vs Triton in GPU time (CUDA graphs); the
#                                   # rank-r GEMMs alone; 8B with q/k/v grouped at the tie or not
#   bash bench/h200.sh s8d         # q/k/v backward with dY [W' | blockdiag(B)], stacked dA outputs: GPU tests,
#                                   # 1B eager + compiled, 8B eager
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH=.
OUT=${OUT:-/tmp/lorakit-bench}
mkdir -p "$OUT" bench/results
LOG=$OUT/log.txt
R=bench/results
py() { python3 "$@" 2>&1 | tee -a "$LOG"; }
pack() { tar cf "$OUT/results.tar" $R; }
trap pack EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1 | tee -a "$LOG"
py -c "import torch, transformers, peft, triton; print(torch.__version__, transformers.__version__, peft.__version__, triton.__version__)"

case "${1:-}" in
  train1b)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_loss.py 2>&1 | tail -15 | tee -a "$LOG"
    py bench/linear_op.py --device cuda --size 1b --tokens 8192 --out $R/linear_op_1b_train_h200
    py bench/linear_op.py --device cuda --size 1b --tokens 16384 --no-grad --out $R/linear_op_1b_prefill_h200
    py bench/linear_op.py --device cuda --size 1b --tokens 8 --no-grad --out $R/linear_op_1b_decode_h200
    timeout 420 python3 bench/train_step.py --device cuda --size 1b --profile bound,lorakit \
      --out $R/train_step_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  infer8b)
    timeout 150 python3 bench/infer.py --device cuda --size 1b --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    timeout 330 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,peft,peft-bf16,lorakit,lorakit+fused-loss,bound+compile,peft+compile,lorakit+compile}" \
      --out $R/train_step_8b_h200 2>&1 | tee -a "$LOG"
    ;;
  run2)
    timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 170 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,peft-bf16,lorakit,lorakit+fused-loss}" \
      --out $R/train_step_1b_h200_run2 2>&1 | tee -a "$LOG"
    timeout 100 python3 bench/infer.py --device cuda --size 1b --gen-reps 3 --new-tokens 16 --variants "${INFER_VARIANTS:-base,lorakit,lorakit-merged,peft,peft-bf16}" \
      --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,peft,lorakit,lorakit+fused-loss}" --out $R/train_step_8b_h200 2>&1 | tee -a "$LOG"
    ;;
  s2-1b)
    timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py tests/test_loss.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 330 python3 bench/train_step.py --device cuda --size 1b --profile lorakit \
      --variants "${VARIANTS_1B:-bound,full,peft,peft-bf16,lorakit,lorakit-unfused,lorakit+fused-loss,peft@r64,lorakit@r64,bound+compile,peft+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200 2>&1 | tee -a "$LOG"
    timeout 100 python3 bench/infer.py --device cuda --size 1b --gen-reps 5 --new-tokens 16 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-merged,peft,peft-bf16}" --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s4a)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py 2>&1 | tail -5 | tee -a "$LOG"
    timeout 200 python3 bench/decode_linear.py --sweep --out $R/decode_linear_1b_h200 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/infer.py --device cuda --size 1b --gen-reps 6 --new-tokens 16 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-merged,peft-bf16}" --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s4b)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py 2>&1 | tail -5 | tee -a "$LOG"
    timeout 200 python3 bench/decode_linear.py --sweep --out $R/decode_linear_1b_h200 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/infer.py --device cuda --size 1b --gen-reps 6 --new-tokens 32 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-3ops,lorakit-merged,peft,peft-bf16}" \
      --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s4c)
    timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -8 | tee -a "$LOG"
    timeout 150 python3 bench/decode_linear.py --sweep --out $R/decode_linear_1b_h200 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/infer.py --device cuda --size 1b --gen-reps 6 --new-tokens 32 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-3ops,lorakit-merged,peft,peft-bf16}" \
      --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s4d)
    timeout 100 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py \
      tests/test_compiled.py -k "merged_weight or few_rows or swiglu or compiled or fused_matches" 2>&1 \
      | grep -E "passed|failed|Error|assert" | tail -12 | tee -a "$LOG"
    timeout 130 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s4 2>&1 | tee -a "$LOG"
    ;;
  s5)
    timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -8 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+gs,bound+compile,lorakit+compile,lorakit+gs+compile}" \
      --out $R/train_step_1b_h200_s5 2>&1 | tee -a "$LOG"
    ;;
  s6)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -8 | tee -a "$LOG"
    timeout 60 python3 bench/host_cost.py --device cuda --variants bound,lorakit,lorakit+ungrouped \
      --out $R/host_cost_h200_s6 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b --timeline lorakit \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+ungrouped,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s6 2>&1 | tee -a "$LOG"
    ;;
  s6b)
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compiled.py tests/test_grouped.py 2>&1 | tail -3 | tee -a "$LOG"
    timeout 120 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s6b 2>&1 | tee -a "$LOG"
    timeout 120 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit}" --out $R/train_step_8b_h200_s6b 2>&1 | tee -a "$LOG"
    ;;
  s7)
    # next: where the compiled step's host time goes (its forward waits on the host)
    timeout 200 python3 bench/host_cost.py --device cuda --variants bound+compile,lorakit+compile \
      --cprofile lorakit+compile,bound+compile --out $R/host_cost_compiled_h200 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 1b --timeline lorakit+compile \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s7 2>&1 | tee -a "$LOG"
    ;;
  s8a)
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compiled.py tests/test_grouped.py 2>&1 | tail -3 | tee -a "$LOG"
    timeout 200 python3 bench/host_cost.py --device cuda --variants bound,lorakit,bound+compile,lorakit+compile \
      --cprofile lorakit+compile,bound+compile --profile lorakit+compile,bound+compile \
      --out $R/host_cost_compiled_h200 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b --timeline lorakit+compile \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s8a 2>&1 | tee -a "$LOG"
    ;;
  s8b)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py tests/test_train_loop.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b --profile lorakit+compile,bound+compile,lorakit \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s8b 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit}" --out $R/train_step_8b_h200_s8b 2>&1 | tee -a "$LOG"
    ;;
  s8c)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -4 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b --timeline bound+compile,lorakit+compile \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s8c 2>&1 | tee -a "$LOG"
    ;;
  s8d)
    timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py 2>&1 | tail -3 | tee -a "$LOG"
    timeout 170 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s8d 2>&1 | tee -a "$LOG"
    timeout 130 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit}" --out $R/train_step_8b_h200_s8d 2>&1 | tee -a "$LOG"
    ;;
  s14a)
    timeout 540 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short --durations=15 tests/test_ops.py \
      tests/test_fused.py tests/test_compiled.py > $OUT/tests.txt 2>&1; tail -40 $OUT/tests.txt | tee -a "$LOG"
    ;;
  s14b)
    timeout 200 python3 bench/host_cost.py --device cuda --variants bound,lorakit,bound+compile,lorakit+compile \
      --cprofile lorakit+compile --profile lorakit+compile --out $R/host_cost_compiled_h200_s14b 2>&1 | tee -a "$LOG"
    timeout 250 python3 bench/train_step.py --device cuda --size 1b --timeline bound+compile,lorakit+compile \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s14b 2>&1 | tee -a "$LOG"
    ;;
  s15i)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_grouped.py tests/test_compiled.py \
      tests/test_ops.py -k "grouped or compiled or inductor or few_rows" > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    ;;
  s15h)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_ops.py tests/test_grouped.py \
      tests/test_compiled.py > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile,lorakit+xa-apart+compile}" --out $R/train_step_1b_h200_s15h 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 1b \
      --variants "bound,lorakit,lorakit+xa-apart" --out $R/train_step_1b_h200_s15h_eager 2>&1 | tee -a "$LOG"
    ;;
  s15g)
    timeout 400 python3 bench/host_cost.py --device cuda --size 1b --batch 8 --seq 1024 --rounds 10 \
      --variants bound+compile,lorakit+compile --cprofile lorakit+compile --profile lorakit+compile \
      --out $R/host_cost_1b_h200_s15g 2>&1 | tail -12 | tee -a "$LOG"
    ;;
  s15f)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_compiled.py tests/test_grouped.py \
      > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    timeout 220 python3 bench/train_step.py --device cuda --size 1b --profile lorakit+compile \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s15f 2>&1 | tee -a "$LOG"
    ;;
  s15e)
    timeout 300 python3 bench/host_cost.py --device cuda --variants bound+compile,lorakit+compile --rounds 20 \
      --cprofile lorakit+compile,bound+compile --profile lorakit+compile,bound+compile \
      --out $R/host_cost_compiled_h200_s15e 2>&1 | tail -30 | tee -a "$LOG"
    ;;
  s15c)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py tests/test_compiled.py \
      > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    timeout 260 python3 bench/train_step.py --device cuda --size 1b --profile bound+compile,lorakit+compile \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile,lorakit+dh-plain+compile}" \
      --out $R/train_step_1b_h200_s15c 2>&1 | tee -a "$LOG"
    ;;
  s15d)
    timeout 300 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_8b_h200_s15d 2>&1 | tee -a "$LOG"
    timeout 250 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s15d 2>&1 | tee -a "$LOG"
    ;;
  s15b)
    timeout 200 python3 bench/swiglu_terms.py --bwd-only --sizes 1b,8b --out $R/swiglu_bwd_h200_s15b 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s15b 2>&1 | tee -a "$LOG"
    ;;
  s15a)
    timeout 240 python3 bench/swiglu_terms.py --bwd-only --transposed --sizes 1b,8b --out $R/swiglu_bwd_h200_s15a 2>&1 | tee -a "$LOG"
    timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py \
      > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    ;;
  s14j)
    timeout 140 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py \
      > $OUT/tests.txt 2>&1; tail -6 $OUT/tests.txt | tee -a "$LOG"
    timeout 170 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile,lorakit+dh-plain+compile}" \
      --out $R/train_step_1b_h200_s14j 2>&1 | tee -a "$LOG"
    ;;
  s14i)
    timeout 330 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,peft,peft-bf16,lorakit}" --out $R/train_step_1b_h200_s14i 2>&1 | tee -a "$LOG"
    ;;
  s14h)
    timeout 200 python3 bench/host_cost.py --device cuda --variants bound,lorakit,lorakit+torch-fused,lorakit+foreach \
      --rounds 40 --out $R/host_cost_h200_s14h 2>&1 | tee -a "$LOG"
    ;;
  s14g)
    timeout 300 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_8b_h200_s14g 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s14g 2>&1 | tee -a "$LOG"
    ;;
  s14f)
    timeout 400 python3 bench/swiglu_terms.py --sizes 1b --out $R/swiglu_terms_h200_s14f 2>&1 | tee -a "$LOG"
    ;;
  s14e)
    timeout 400 python3 bench/swiglu_terms.py --sizes 1b --out $R/swiglu_terms_h200_s14e 2>&1 | tee -a "$LOG"
    ;;
  s14d)
    timeout 560 python3 bench/train_step.py --device cuda --size 1b --profile bound+compile,lorakit+compile \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile,lorakit+gu-beside+compile}" \
      --out $R/train_step_1b_h200_s14d 2>&1 | tee -a "$LOG"
    ;;
  s14c)
    timeout 230 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py tests/test_compiled.py \
      tests/test_train_optim.py tests/test_train_loop.py > $OUT/tests.txt 2>&1; tail -12 $OUT/tests.txt | tee -a "$LOG"
    timeout 340 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile,lorakit+gu-beside+compile,lorakit+torch-fused+compile}" \
      --out $R/train_step_1b_h200_s14c 2>&1 | tee -a "$LOG"
    ;;
  s13j)
    timeout 170 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_ops.py -k "few_rows or merged_weight or stacked or swiglu" \
      "tests/test_fused.py::test_gpu_swiglu_terms_kernels_match_reference" "tests/test_fused.py::test_gpu_swiglu_backward_reduce_matches_reference" "tests/test_fused.py::test_gpu_swiglu_kernels_match_reference" > $OUT/tests.txt 2>&1; tail -8 $OUT/tests.txt | tee -a "$LOG"
    timeout 120 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound+compile,lorakit+compile,lorakit+gemm-terms+compile}" --out $R/train_step_1b_h200_s13j 2>&1 | tee -a "$LOG"
    ;;
  s13i)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_ops.py \
      "tests/test_fused.py::test_gpu_swiglu_terms_kernels_match_reference" "tests/test_fused.py::test_gpu_swiglu_backward_reduce_matches_reference" "tests/test_fused.py::test_gpu_swiglu_kernels_match_reference" > $OUT/tests.txt 2>&1; tail -8 $OUT/tests.txt | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_1b_h200_s13i 2>&1 | tee -a "$LOG"
    timeout 260 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,bound+compile,lorakit+compile}" --out $R/train_step_8b_h200_s13i 2>&1 | tee -a "$LOG"
    ;;
  s13h)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py tests/test_compiled.py \
      > $OUT/tests.txt 2>&1; tail -12 $OUT/tests.txt | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+gemm-terms,bound+compile,lorakit+compile,lorakit+gemm-terms+compile}" \
      --out $R/train_step_1b_h200_s13h 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit}" --out $R/train_step_8b_h200_s13h 2>&1 | tee -a "$LOG"
    ;;
  s13f)
    timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py tests/test_compiled.py \
      > $OUT/tests.txt 2>&1; tail -12 $OUT/tests.txt | tee -a "$LOG"
    timeout 300 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+gemm-terms}" --out $R/train_step_8b_h200_s13f 2>&1 | tee -a "$LOG"
    ;;
  s13g)
    timeout 500 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+gemm-terms,bound+compile,lorakit+compile,lorakit+gemm-terms+compile}" \
      --out $R/train_step_1b_h200_s13g 2>&1 | tee -a "$LOG"
    ;;
  s13e)
    timeout 300 python3 bench/swiglu_terms.py --out $R/swiglu_terms_h200 2>&1 | tee -a "$LOG"
    ;;
  s13c)
    timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_fused.py tests/test_compiled.py \
      > $OUT/tests.txt 2>&1; tail -12 $OUT/tests.txt | tee -a "$LOG"
    timeout 330 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+gemm-reduce}" --out $R/train_step_8b_h200_s13c 2>&1 | tee -a "$LOG"
    ;;
  s13d)
    timeout 500 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+gemm-reduce,bound+compile,lorakit+compile,lorakit+gemm-reduce+compile}" \
      --out $R/train_step_1b_h200_s13d 2>&1 | tee -a "$LOG"
    ;;
  s13a)
    timeout 300 python3 bench/swiglu_reduce.py --out $R/swiglu_reduce_h200${TAG:-} 2>&1 | tee -a "$LOG"
    ;;
  s12f)
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_packed.py tests/test_ops.py \
      -k "packed or few_rows" 2>&1 | tail -8 | tee -a "$LOG"
    timeout 190 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+unpacked}" --out $R/train_step_8b_h200_s12f 2>&1 | tee -a "$LOG"
    timeout 60 python3 bench/augmented.py --sizes 8b --out $R/augmented_h200_s12f 2>&1 | tail -14 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+unpacked}" --out $R/train_step_1b_h200_s12f 2>&1 | tee -a "$LOG"
    ;;
  s12e)
    timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rf --tb=short tests/test_packed.py tests/test_ops.py \
      tests/test_adapters.py > $OUT/tests.txt 2>&1; tail -40 $OUT/tests.txt | tee -a "$LOG"
    timeout 150 python3 bench/augmented.py --out $R/augmented_h200_s12e 2>&1 | tee -a "$LOG"
    ;;
  s12c)
    timeout 260 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_packed.py tests/test_fused.py \
      tests/test_compiled.py tests/test_ops.py tests/test_adapters.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 80 python3 bench/mlp_forms.py --out $R/mlp_forms_h200_s12c 2>&1 | tee -a "$LOG"
    timeout 190 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+unpacked}" --out $R/train_step_8b_h200_s12c 2>&1 | tee -a "$LOG"
    ;;
  s12b)
    timeout 300 python3 bench/augmented.py --out $R/augmented_h200 2>&1 | tee -a "$LOG"
    ;;
  s12a)
    timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py tests/test_ops.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 200 python3 bench/swiglu_lora.py --out $R/swiglu_lora_h200 2>&1 | tee -a "$LOG"
    ;;
  s11a)
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 80 python3 bench/mlp_forms.py --rounds 20 --out $R/mlp_forms_h200_fma 2>&1 | tee -a "$LOG"
    timeout 110 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+plain-act}" --out $R/train_step_8b_h200_s11a 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+plain-act,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s11a 2>&1 | tee -a "$LOG"
    ;;
  s10d)
    timeout 250 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound+compile,lorakit+compile}" --out $R/train_step_8b_h200_s10d 2>&1 | tee -a "$LOG"
    ;;
  s10c)
    timeout 270 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py tests/test_ops.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 170 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s10c 2>&1 | tee -a "$LOG"
    timeout 110 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit}" --out $R/train_step_8b_h200_s10c 2>&1 | tee -a "$LOG"
    ;;
  s10b)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py tests/test_ops.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 120 python3 bench/mlp_forms.py --out $R/mlp_forms_h200_act 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+plain-act}" --out $R/train_step_8b_h200_s10b 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+plain-act,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s10b 2>&1 | tee -a "$LOG"
    ;;
  s10a)
    timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_compiled.py \
      tests/test_grouped.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 120 python3 bench/mlp_forms.py --out $R/mlp_forms_h200 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+merged-mlp}" --out $R/train_step_8b_h200_s10a 2>&1 | tee -a "$LOG"
    timeout 200 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,lorakit+merged-mlp,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_s10a 2>&1 | tee -a "$LOG"
    ;;
  s9a)
    timeout 200 python3 bench/rank_reduce.py --splits 1,4,8,16 --out $R/rank_reduce_h200 2>&1 | tee -a "$LOG"
    timeout 60 python3 bench/small_gemm.py --out $R/small_gemm_h200 2>&1 | tee -a "$LOG"
    timeout 150 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,lorakit+ungrouped}" --out $R/train_step_8b_h200_s9a 2>&1 | tee -a "$LOG"
    ;;
  s5b)
    timeout 420 python3 bench/longest_seq.py --device cuda --size 1b --batch 8 \
      --out $R/longest_seq_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s3e)
    timeout 90 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_fused.py tests/test_compiled.py \
      tests/test_train_loop.py 2>&1 | tail -3 | tee -a "$LOG"
    timeout 110 python3 bench/train_step.py --device cuda --size 1b \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_last 2>&1 | tee -a "$LOG"
    ;;
  s3d)
    timeout 60 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compiled.py 2>&1 | tail -3 | tee -a "$LOG"
    timeout 120 python3 bench/train_step.py --device cuda --size 1b --profile lorakit+compile,bound+compile,lorakit \
      --variants "${VARIANTS_1B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200_compiled 2>&1 | tee -a "$LOG"
    timeout 180 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,lorakit,bound+compile,lorakit+compile}" \
      --out $R/train_step_8b_h200 2>&1 | tee -a "$LOG"
    timeout 220 python3 bench/infer.py --device cuda --size 1b --gen-reps 8 --new-tokens 16 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-merged,peft-bf16}" \
      --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s3b-1b)
    timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py tests/test_compiled.py tests/test_train_loop.py \
      2>&1 | tail -4 | tee -a "$LOG"
    timeout 330 python3 bench/train_step.py --device cuda --size 1b --profile lorakit,lorakit+compile \
      --variants "${VARIANTS_1B:-bound,peft,peft-bf16,lorakit,lorakit+foreach,lorakit+fused-loss,lorakit@r64,bound+compile,peft+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200 2>&1 | tee -a "$LOG"
    timeout 60 python3 bench/merge_kernel.py --out $R/merge_kernel_h200 2>&1 | tee -a "$LOG"
    ;;
  s3-1b)
    timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_fused.py tests/test_compiled.py tests/test_train_loop.py \
      tests/test_loss.py 2>&1 | tail -4 | tee -a "$LOG"
    timeout 420 python3 bench/train_step.py --device cuda --size 1b --profile bound,lorakit,bound+compile,lorakit+compile \
      --variants "${VARIANTS_1B:-bound,peft,peft-bf16,lorakit,lorakit+fused-loss,bound+compile,peft+compile,lorakit+compile}" \
      --out $R/train_step_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s3-8b)
    timeout 400 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,peft,lorakit,lorakit+fused-loss,bound+compile,peft+compile,lorakit+compile}" \
      --out $R/train_step_8b_h200 2>&1 | tee -a "$LOG"
    timeout 60 python3 bench/merge_kernel.py --out $R/merge_kernel_h200 2>&1 | tee -a "$LOG"
    timeout 120 python3 bench/infer.py --device cuda --size 1b --gen-reps 10 --new-tokens 16 \
      --variants "${INFER_VARIANTS:-base,lorakit,lorakit-merged,peft-bf16}" --out $R/infer_1b_h200 2>&1 | tee -a "$LOG"
    ;;
  s2-8b)
    timeout 330 python3 bench/train_step.py --device cuda --size 8b --batch 4 \
      --variants "${VARIANTS_8B:-bound,peft,peft-bf16,lorakit,lorakit+fused-loss,bound+compile,lorakit+compile}" \
      --out $R/train_step_8b_h200 2>&1 | tee -a "$LOG"
    timeout 120 python3 bench/multi_adapter.py --only-load --out $R 2>&1 | tee -a "$LOG"
    ;;
  *)
    echo "usage: bash bench/h200.sh train1b|infer8b|run2|s2-1b|s2-8b"; exit 2 ;;
esac
