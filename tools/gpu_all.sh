#!/usr/bin/env bash
# Everything that needs the GPU, in one call on the H100 host (budget: DEADLINE seconds, 560):
#   0. machine facts; hqq from carried wheels: build them here with `DISABLE_CUDA=1 pip wheel
#      --no-deps -w .whl hqq==0.2.8.post1 termcolor` (hqq imports termcolor) and pass ".whl" in
#      the call's carry (the folder is git-ignored);
#   1. the cuda-marked tests;            2. tools/kernel_bench.py (kernels vs floors);
#   3. runtime.baseline_bench (resident); 4. quantize.measure expert --device cuda, then a 1.2 GB
#      checkpoint quantized on the GPU (quantize.measure memory --device cuda);
#   5. runtime.bench (offloading) at BUDGETS, trace and model routing, naive / lru / prefetch;
#   6. tools/profile_decode.py (GPU time per kernel vs wall time of a resident decode step);
#   7. the compiled CPU kernel's tests (its 16-lane AVX-512 rows run natively here: test_cpu_wide.py),
#      then tools/cpu_expert_bench.py with it (1 token, and 16: a prompt's tokens sharing each
#      code's decode), with 8-lane rows only (MOEPACK_CPU_WIDE=0), and with numba;
#   8. runtime.bench at 12GiB with --host-memory 8GiB (experts streamed from the file);
#   9. what the session of 2026-11-22 built but could not measure: LRU vs LFU vs hybrid at 8, 12
#      and 16 GiB (trace routing), and 32 layers with every expert resident (decode with CUDA
#      graphs, 512-token prefill) for issue #6's 200 tok/s and 2958 tok/s; hybrid (whole or
#      split experts) with 8 CPU threads, trace and model routing. Trace routing waits for
#      each layer's router since 2026-11-23, so its figures are lower than the day before's.
#  11. CPU-only decode of 32 Mixtral-shape layers (4-bit attention packed, 2-bit experts) on
#      the host's cores, against llama.cpp's CPU-only figure (FACTS.md 2b);
#  12. experts with 4-bit meta codes (format version 2, 16% fewer bytes per expert): 32 layers
#      resident (step graph, 512-token prefill), then an LFU cache without and with hybrid at
#      8, 12, 16 GiB (stage 9 has the LRU policy's rows);
#  13. int16 activations (dp2a, GemvConfig.int_x) against the float path, both on the heuristic
#      configs (MOEPACK_NO_TUNING=1), so only the activation path differs: 32 layers resident
#      with 4-bit-meta 2-bit experts, each path, then the kernel table;
#  14. the decode step's small ops fused (kernels/decode_ops.py: ~6 launches per layer's dense
#      part instead of ~27) against torch's ops (MOEPACK_FUSED_DECODE=0): the cuda tests of the
#      fused kernels, the step-graph profile of 2 layers, then 32 layers resident
#      (4-bit-meta experts, step graph), each way;
#  15. hybrid splits by rows (runtime/offload/split.py) against the fixed w1/w3 | w2 cut
#      (MOEPACK_SPLIT_ROWS=0): 4-bit-meta experts, LFU + hybrid at 12 GiB, trace routing, 16 and
#      8 CPU threads;
#  16. the prompt path (kernels.grouped_prompt_ffn, a layer's experts a few per dequantize launch)
#      against the fused dequantize-GEMM (MOEPACK_PREFILL=fused): 32 resident layers, a 512-token
#      prompt, each way, then the profile of that prompt on 2 layers;
#  17. --prefetch-w2 (the next layer's likely miss has its w2 staged in a spare split scratch set)
#      against hybrid without prefetch: LFU, trace routing, 4-bit meta, 12 GiB at 16 and 8 CPU
#      threads, then 8 and 16 GiB;
#  18. the CPU's share of a split on the compiled kernel's own thread against inline
#      (MOEPACK_CPU_WORKER=0): hybrid-w2, LFU, trace routing, 4-bit meta, 12 GiB;
#  19. llama.cpp's CPU path on this host against moe-pack's (tools/llamacpp_compare.py): one expert
#      (ggml Q2_K/Q3_K against moe-pack's 2/3-bit) at 16 and 8 threads, then 32 layers CPU-only
#      at 16 (decode at depth 0 and 128, a 128-token prompt). Needs ".cache/llamacpp" in the
#      call's carry beside ".whl" (36 MB: llama.cpp's sources and the cmake and ninja wheels; how
#      to make it: tools/llamacpp_host.sh's header). Alone in a call: ~5-7 minutes (estimated
#      from dev-cpu; its JSON is written after every run, so a cut keeps what was measured).
#      Since the twenty-first session it also runs moe-pack's expert and a 32-layer run with int8
#      activations (--cpu-activations int8, BENCHMARKS.md section 28).
#  20. the hybrid engine's CPU share on int8 activations (--cpu-activations int8) against int16:
#      hybrid-w2, LFU, trace routing, 4-bit meta, 12 GiB, 16 CPU threads, each way.
#  21. small cards: LFU at 5 and 6 GiB (1-2 slots per layer) and a shared pool at 3 GiB, each
#      copying only and hybrid (BENCHMARKS.md section 31).
#  22. one token's attention split over the keys (kernels.decode_ops.attend) against torch's SDPA:
#      tools/attend_bench.py, then 32 resident layers each way (MOEPACK_FLASH_DECODE=0: SDPA).
#  10. python -m runtime.tune on one-layer Mixtral-shape files (2- and 3-bit experts, 4-bit meta
#      codes as the quantizer writes by default; TUNE_META=8 for the 8-bit ones), T=1: the
#      tuned launch configs land in $OUT/tuning/gemv-tuning.json, which every later stage of this
#      run loads (MOEPACK_CACHE_DIR); it runs right after stage 1.
# STAGES picks stages (default "1 2 3 4 5"). Results land in $OUT. Calls of at most 600 s.
# The 2026-11-23 lease ran: "1 10 2 3" (328 s), "9" (196 s), "1 7 2 11" with KB_FLAGS=--graph
# and PYTEST_ARGS=tests/runtime/test_offload_cuda.py (232 s), then single bench commands; each
# call started a fresh machine in ~30 s. The tuned configs now ship with the package
# (runtime/kernels/data/), so stage 10 is needed only after a kernel or triton change. Next
# time: STAGES="1 2 3 6" (tests, including the one-graph step and the indexed kernel on CUDA;
# kernels with the "indexed x2" and "fused qkv+o" rows; resident off / layers / step; the
# profile of step vs layers), then STAGES="9" (32 layers resident, layers vs step graphs, then
# offload and hybrid), then STAGES="7" (the CPU kernel over a 1 GiB record pool plus
# tools/cpu_diag.py). A stacked q+k+v (6144x4096) has no tuned entry yet: STAGES="10" tunes it.
# Since the third session of 2026-11-23: STAGES="12" (4-bit meta experts), after "9" for the
# 8-bit figures beside them; stage 2's kernel table has "m4" rows.
# Since the fifth session of 2026-11-23: int16 activations with dp2a for 2-bit codes (the
# heuristic's default; the built-in tuned table predates it and keeps the float path on the
# H100 for the Mixtral shapes). First call: STAGES="1 13 2" (the cuda tests include dp2a
# against its emulation, bit for bit); then STAGES="10" re-tunes with both paths among the
# candidates (copy $OUT/tuning/gemv-tuning.json to runtime/kernels/data/ if it wins), then
# "12" and "9" run on the new table.
# Since the sixth session of 2026-11-23: the fused small ops of the decode step (stage 14).
# Since the seventh session of 2026-11-23: the prompt path's launches cut (stage 16).
# Calls (each at most 600 s; a stage that no longer fits DEADLINE is skipped and logged):
# STAGES="1 16" (the cuda tests cover dp2a, the fused kernels, the row split and the grouped
# prompt path; stage 16 is issue #6's prompt figure both ways), then "14" (the A/B of the
# decode fusion), then "15" (row splits against the fixed cut, on the fused step), then
# "13 2" (int16 activations A/B, the kernel table), then "10", "12", "9", "7".
# Since the eighth session of 2026-11-23: "17" (staged w2) right after "15".
# Since the ninth session of 2026-11-23: stage 17 first times the engine's host work on this
# host's Python (tools/offload_host.py, ~15 s, no GPU), and its bench rows run with the
# embedding table in host RAM and a split's GEMVs replayed from graphs (the cuda tests of
# stage 1 check both: test_cuda_offload_keeps_the_table_in_host_ram, test_cuda_hybrid_same_as_resident).
# Since the tenth session of 2026-11-23: stage 18, the CPU's share of a split started on the
# compiled kernel's own thread (before the step's copies and launches) against inline; the
# split's graphs now capture into a pool per scratch set (a shared pool let one set's w2
# graph overwrite another set's h before it was read). Run "18" right after "17".
# Since the eleventh session of 2026-11-23: the CPU kernel's 16-lane rows (AVX-512, never run on
# AVX-512 hardware: emulated in CI) and telescoped 2-bit pairs. Run "7" right after "1 16": its
# tests check the 16-lane rows on this CPU, and its bench times them against 8 lanes; the
# hybrid stages (15, 17, 18) use whichever passed the load-time check.
# Since the thirteenth session of 2026-11-23: 3-bit codes take the int16-activation GEMV by
# default (the float path had 802 thread-local loads/stores per loop at 8 tokens). The built-in
# table's 3-bit entries are float configs, so "13 2" shows the new default only in the untuned
# kernel table (MOEPACK_NO_TUNING=1), and "10" re-tunes with both paths among the candidates.
# Since the fourteenth session: the int path loads in the tile's 3-D layout with K a constexpr
# (62-72 registers instead of 96-128: one wave for 2-bit w1/w3), and 4-bit attention takes it
# by default (BENCHMARKS section 21). Stage 1's cuda tests check it against the reference; "13
# 2" then times it untuned, and "10" decides whether the built-in table's float configs stay.
# Since the fifteenth session: at one or two tokens the gated w1/w3 writes w2's int16 input
# itself (one launch fewer per layer: 9). Stage 1's cuda tests check it against quantize_x
# (test_gated_gemv_writes_the_int16_activations_w2_reads); "13 2" times it untuned.
# Since the twenty-eighth session: tuning entries carry the kernel revision they were timed on
# (runtime/kernels/tuning.py KERNEL_REVISION, now 3), and the built-in table (revision 1, float
# path only) is no longer used, so every stage runs the heuristic configs until "10" re-tunes:
# copy $OUT/tuning/gemv-tuning.json over runtime/kernels/data/gemv-tuning-builtin.json to ship
# its winners. The one-token int16 GEMV now loads repeated meta addresses through inline asm, so
# triton 3.6 (this host's) compiles the same conversion-free loop as 3.9 (BENCHMARKS section 35).
# Since the sixteenth session: CPU-only decode runs every layer of a step in one C call
# (runtime/cpu_step.py). Stage 11 times it on 32 Mixtral-shape layers, then the torch step
# (decode_tok_s_torch_step in its JSON): CPU-only against llama.cpp's 10.4 tok/s. Run "11" after "7".
# A lease is 30 minutes of device time, three calls of ~9 minutes at most. In that order:
#   1. STAGES="1 13": the cuda tests (everything sessions 3-16 built blind), then issue #6's
#      figures on the untuned heuristic (int16 path): 32 resident layers' decode and 512-token
#      prefill, int against float, then the kernel table.
#   2. STAGES="12": the same 32 layers on the built-in tuned table, then issue #7's table: LFU
#      without and with hybrid at 8, 12 and 16 GiB with the 512-token prompt.
#   3. STAGES="17" (staged w2 at 12 GiB, 16 and 8 CPU threads; this host's engine host time), or
#      "7 11" if the CPU's figures matter more that day (the 16-lane rows, CPU-only 32 layers).
# Then, with another lease: "10" (re-tune), "16", "14", "15", "18", "9", and "4" (since the
# seventeenth session the quantizer builds each matrix's bytes on the GPU: one expert's steps
# timed, then a 1.2 GB checkpoint end to end; stage 1's test_encode.py checks its bytes there).
# Since the twentieth session: "19", alone in a call with carry [".whl", ".cache/llamacpp"] (no
# GPU work: llama.cpp's CPU figures on this host beside moe-pack's), after "7 11".
# Since the twenty-first session: int8 activations on the CPU (opt-in). Stage 7 runs their
# tests natively (vpdpbusd on AVX-512 VNNI never ran before) and times the expert with them;
# "20" (two hybrid runs at 12 GiB, ~4 minutes) belongs in call 2 or 3, after "12" or "17".
# Since the twenty-third session a model wholly on the CPU rounds to int8 by default (auto), so
# stage 11's run is int8 (its JSON's cpu_activations says which ran); --hybrid stays on int16.
# Since the twenty-fourth session a per-layer cache runs in one slot per layer and a shared pool
# in one layer's top-k (the plan used to ask for top-k per layer); stage 1's cuda tests have the
# new minimums (layer1, shared-min-pf), and "21" (~5 minutes) times 5, 6 GiB and a 3 GiB shared
# pool, copying only and hybrid. Prefetch now defaults to off at 1-3 slots per layer.
# Since the twenty-ninth session the fused decode step attends with its own split-key kernel
# (kernels/triton_decode.py attend_*), reading only the keys up to the position; stage 1's cuda
# tests (test_decode_ops.py) check it against SDPA, and "22" (~4 minutes) times it both ways.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu_all}
PY=${PY:-python3}
STAGES=${STAGES:-1 2 3 4 5}
DEADLINE=${DEADLINE:-560}
BUDGETS=${BUDGETS:---gpu-memory 12GiB}
BENCH_FLAGS=${BENCH_FLAGS:-}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export MOEPACK_CACHE_DIR=${MOEPACK_CACHE_DIR:-$OUT/tuning}
start=$(date +%s)
left() { echo $(( DEADLINE - ($(date +%s) - start) )); }
log() { echo "[$(( $(date +%s) - start )) s] $*" | tee -a "$OUT/all.log"; }
has() { [[ " $STAGES " == *" $1 "* ]]; }

if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,pcie.link.gen.current,pcie.link.width.current --format=csv
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, torch.cuda.get_device_name())"
  lscpu | grep -E "Model name|^CPU\(s\)"
  echo "vector extensions: $(grep -o -w -E 'avx2|fma|avx512[a-z_0-9]*|amx[a-z_0-9]*' /proc/cpuinfo | sort -u | tr '\n' ' ')"
  free -g | head -2
} >> "$OUT/all.log" 2>&1

run() {  # name, max seconds, command...
  local name=$1 max=$2; shift 2
  local t; t=$(left); (( t > max )) && t=$max
  if (( t < 20 )); then log "skipped $name: out of time"; return; fi
  log "start $name (limit $t s)"
  timeout "$t" "$@" >> "$OUT/all.log" 2>&1
  log "end $name: exit $?"
}

# ~290 cuda tests since the decode ops' and split graphs' files carry the marker (136 took 116 s
# on 2026-11-23, compiles included): 270 s, so that the junit file gets written; in call 1 the
# resident runs (~80 s each then) and the kernel table (~55-90 s) still fit behind it
has 1 && run pytest_cuda ${PYTEST_S:-270} $PY -m pytest -m cuda -v -p no:cacheprovider --continue-on-collection-errors -rfEs \
  --timeout ${TEST_TIMEOUT:-40} --junitxml="$OUT/pytest_cuda.xml" ${PYTEST_ARGS:-}
# the files runtime.bench names mixtral-8x7b-L1-a4-e{bits}{meta}-s0.moepack in its cache dir: the
# quantizer's default experts (4-bit meta codes, "m4") unless TUNE_META=8 asks for the 8-bit ones;
# either way the attention's problems are among each file's
TUNE_META=${TUNE_META:-4}
TUNE_TAG=$([ "$TUNE_META" = 8 ] || echo "m$TUNE_META")
has 10 && run tune_files 120 $PY -c "from runtime.bench import bench_file; [bench_file('/tmp/moe-pack-bench', 1, False, b, 0, $TUNE_META) for b in (2, 3)]"
for bits in 2 3; do
  has 10 && run tune_$bits ${TUNE_S:-240} $PY -m runtime.tune /tmp/moe-pack-bench/mixtral-8x7b-L1-a4-e$bits$TUNE_TAG-s0.moepack \
    --tokens ${TUNE_TOKENS:-1} --rep-ms 20
done
has 2 && run kernel_bench 110 $PY tools/kernel_bench.py --json "$OUT/kernel_bench.json" ${KB_FLAGS:-}
has 6 && run profile_decode 120 bash -c "$PY tools/profile_decode.py --layers 2 --recipe 4/2 --cuda-graphs step \
  && $PY tools/profile_decode.py --layers 2 --recipe 4/2 --cuda-graphs layers && $PY tools/profile_decode.py --layers 2 --recipe 4/2 --prefill 512"
has 3 && run baseline_bench ${BASELINE_S:-100} bash -c "$PY -m runtime.baseline_bench --layers 2 ${BASELINE_RECIPES:---recipe 4/2 --recipe fp16} \
  --cuda-graphs all --prompt-len 16 --new-tokens 32 > $OUT/baseline.jsonl"
has 4 && run quantize_gpu 60 $PY -m quantize.measure expert --device cuda --bits 2 --bits 3 --json "$OUT/quantize_gpu.json"
# quantize --gptq's cost per Mixtral-8x7B expert (weighted fit + GPTQ codes, BENCHMARKS.md section 38)
has 4 && run quantize_gptq_gpu 120 $PY -m quantize.measure expert --device cuda --fit gptq --bits 2 --bits 3 \
  --json "$OUT/quantize_gptq_gpu.json"
# a whole 1.2 GB checkpoint through `moe-pack quantize`'s pipeline on the GPU: time and host RSS
has 4 && run quantize_ckpt_gpu 150 bash -c "$PY -m quantize.measure make-checkpoint /tmp/ckpt-1g \
  && $PY -m quantize.measure memory /tmp/ckpt-1g -o /tmp/ckpt-1g.moepack --device cuda --json $OUT/quantize_ckpt_gpu.json"
has 5 && run bench ${BENCH_S:-600} $PY -m runtime.bench --layers 32 --expert-bits 2 --tokens ${TOKENS:-24} --warmup 8 \
  --routing all --variant all $BUDGETS --cache-dir /tmp/moe-pack-bench --json "$OUT/bench.json" --write-md "$OUT/bench.md" $BENCH_FLAGS
# graphs broke? the same at 12GiB without them, so the run still yields figures
has 5 && ! grep -q '"tok_s"' "$OUT/bench.json" 2>/dev/null && run bench_eager 90 $PY -m runtime.bench --layers 32 \
  --expert-bits 2 --tokens ${TOKENS:-24} --warmup 8 --routing trace --variant all --gpu-memory 12GiB --no-cuda-graphs \
  --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_eager.json" $BENCH_FLAGS
# the compiled CPU kernel is built here by the host's compiler (-march=native): check it first
has 7 && run cpu_diag 60 $PY tools/cpu_diag.py
# first, in a step of their own with a record of each test: the 16-lane rows and int8's
# vpdpbusd run natively nowhere else, and in one run with the rest a cut could drop them
has 7 && run cpu_wide_act8_tests 120 $PY -m pytest -q -p no:cacheprovider tests/runtime/test_cpu_wide.py \
  tests/runtime/test_cpu_act8.py --junitxml="$OUT/cpu_wide_act8.xml"
has 7 && run cpu_native_tests 120 $PY -m pytest -q -p no:cacheprovider tests/runtime/test_cpu_native.py \
  tests/runtime/test_cpu_native_prompt.py tests/runtime/test_cpu_native_callers.py tests/runtime/test_cpu_expert.py
has 7 && run cpu_expert 90 $PY tools/cpu_expert_bench.py --tokens 1 --tokens 16 --json "$OUT/cpu_expert.json"
has 7 && run cpu_expert_int8 90 $PY tools/cpu_expert_bench.py --tokens 1 --tokens 16 --cpu-activations int8 \
  --json "$OUT/cpu_expert_int8.json"
has 7 && run cpu_expert_narrow 90 env MOEPACK_CPU_WIDE=0 $PY tools/cpu_expert_bench.py --tokens 1 --tokens 16 \
  --json "$OUT/cpu_expert_narrow.json"
has 7 && run cpu_expert_numba 60 env MOEPACK_CPU_KERNEL=numba $PY tools/cpu_expert_bench.py --runs 5 --json "$OUT/cpu_expert_numba.json"
has 8 && run bench_streaming 120 $PY -m runtime.bench --layers 32 --expert-bits 2 --tokens ${TOKENS:-16} --warmup 8 --routing trace \
  --variant all --gpu-memory 12GiB --host-memory 8GiB --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_streaming.json" $BENCH_FLAGS
# issue #6's 200 tok/s and 2958 tok/s first: the offload runs below can be cut by the deadline
has 9 && run resident_32 200 bash -c "$PY -m runtime.baseline_bench --layers 32 --recipe 4/2 --cuda-graphs layers --cuda-graphs step \
  --prompt-len 512 --new-tokens 64 > $OUT/resident_32.jsonl"
# the prefill's fused dequantize-GEMM (opt-in until measured) against the line above
has 9 && run resident_32_fused_gemm 120 bash -c "MOEPACK_PREFILL=fused $PY -m runtime.baseline_bench --layers 32 --recipe 4/2 \
  --cuda-graphs step --prompt-len 512 --new-tokens 16 > $OUT/resident_32_fused_gemm.jsonl"
has 9 && run bench_policies 200 $PY -m runtime.bench --layers 32 --expert-bits 2 --tokens ${TOKENS:-16} --warmup 8 \
  --routing trace --variant lru --variant prefetch --variant hybrid --gpu-memory 8GiB --gpu-memory 12GiB --gpu-memory 16GiB \
  --prefill-len 512 \
  --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_lru_hybrid.json" $BENCH_FLAGS
has 9 && run bench_lfu 150 $PY -m runtime.bench --layers 32 --expert-bits 2 --tokens ${TOKENS:-16} --warmup 8 \
  --routing trace --variant lru --variant hybrid --cache-policy lfu --gpu-memory 12GiB \
  --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_lfu.json" $BENCH_FLAGS
has 9 && run bench_hybrid_8t 120 $PY -m runtime.bench --layers 32 --expert-bits 2 --tokens ${TOKENS:-16} --warmup 8 \
  --routing all --variant hybrid --cache-policy lfu --cpu-threads 8 --gpu-memory 12GiB \
  --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_hybrid_8t.json" $BENCH_FLAGS
# CPU only, every expert in host RAM: moe-pack's CPU path against llama.cpp's CPU-only 10.4 tok/s;
# a 128-token prompt gives each expert ~32 tokens, which share each code's decode (section 19)
# (its JSON also times the torch decode step the C one replaced: decode_tok_s_torch_step)
has 11 && run cpu_only_32 300 bash -c "$PY -m runtime.baseline_bench --device cpu --layers 32 --recipe 4/2 \
  --prompt-len 128 --new-tokens 16 --workdir /tmp/moe-pack-cpu > $OUT/cpu_only_32.jsonl"
# experts with 4-bit meta codes: fewer bytes per expert, so more slots per budget and shorter copies
has 12 && run resident_32_m4 150 bash -c "$PY -m runtime.baseline_bench --layers 32 --recipe 4/2m4 --cuda-graphs step \
  --prompt-len 512 --new-tokens 64 > $OUT/resident_32_m4.jsonl"
has 12 && run bench_m4 300 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 --tokens ${TOKENS:-16} \
  --warmup 8 --routing trace --variant lru --variant hybrid --cache-policy lfu --gpu-memory 8GiB --gpu-memory 12GiB \
  --gpu-memory 16GiB --prefill-len 512 --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_m4.json" $BENCH_FLAGS
# int16 activations against the float path: heuristic configs for both (no tuned table); the
# 32 resident layers each way first (issue #6's decode and prompt figures), then the kernel table
for path in int float; do
  has 13 && run resident_32_$path 130 bash -c "MOEPACK_NO_TUNING=1 MOEPACK_GEMV_INT=$([ $path = int ] && echo 1 || echo 0) \
    $PY -m runtime.baseline_bench --layers 32 --recipe 4/2m4 --cuda-graphs step --prompt-len 512 --new-tokens 64 \
    > $OUT/resident_32_$path.jsonl"
done
has 13 && run kernel_bench_untuned 120 env MOEPACK_NO_TUNING=1 $PY tools/kernel_bench.py \
  --json "$OUT/kernel_bench_untuned.json" ${KB_FLAGS:-}
has 14 && run pytest_fused 90 $PY -m pytest -m cuda -q -p no:cacheprovider -rfEs tests/runtime/test_decode_ops.py \
  tests/runtime/test_step_graph.py
for fused in 1 0; do
  has 14 && run profile_fused_$fused 90 env MOEPACK_FUSED_DECODE=$fused $PY tools/profile_decode.py --layers 2 \
    --recipe 4/2m4 --cuda-graphs step
  has 14 && run resident_32_fused_$fused 150 bash -c "MOEPACK_FUSED_DECODE=$fused \
    $PY -m runtime.baseline_bench --layers 32 --recipe 4/2m4 --cuda-graphs step --prompt-len 512 --new-tokens 64 \
    > $OUT/resident_32_fused_$fused.jsonl"
done
for rows in 1 0; do
  for threads in 16 8; do
    has 15 && run bench_rows_${rows}_${threads}t 150 env MOEPACK_SPLIT_ROWS=$rows $PY -m runtime.bench --layers 32 \
      --expert-bits 2 --expert-meta-bits 4 --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant hybrid \
      --cache-policy lfu --cpu-threads $threads --gpu-memory 12GiB --cache-dir /tmp/moe-pack-bench \
      --json "$OUT/bench_rows_${rows}_${threads}t.json" $BENCH_FLAGS
  done
done
# the prompt path: a layer's experts dequantized a few per launch (kernels.grouped_prompt_ffn;
# 4 Triton launches per layer where the per-expert path made 26) against the fused
# dequantize-GEMM (MOEPACK_PREFILL=fused), each on 32 resident layers; then where a prompt's
# time goes on 2 layers (GPU kernels against wall time)
for mode in dequant fused; do
  has 16 && run resident_32_prompt_$mode 150 bash -c "MOEPACK_PREFILL=$mode $PY -m runtime.baseline_bench --layers 32 \
    --recipe 4/2m4 --cuda-graphs step --prompt-len 512 --new-tokens 16 > $OUT/resident_32_prompt_$mode.jsonl"
  has 16 && run profile_prompt_$mode 90 env MOEPACK_PREFILL=$mode $PY tools/profile_decode.py --layers 2 --recipe 4/2m4 \
    --prefill 512
done
# the engine's host time per decode layer on this host's Python (the GPU's work stubbed)
has 17 && run offload_host 60 $PY tools/offload_host.py --json "$OUT/offload_host.json"
# the next layer's likely miss with its w2 staged ahead (--prefetch-w2) against hybrid without
# prefetch, LFU, trace routing, 4-bit meta: 12 GiB at 16 and 8 CPU threads, then 8 and 16 GiB
for threads in 16 8; do
  has 17 && run bench_w2_12_${threads}t 170 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 \
    --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant hybrid-only --variant hybrid-w2 --cache-policy lfu \
    --cpu-threads $threads --gpu-memory 12GiB --prefill-len 512 --cache-dir /tmp/moe-pack-bench \
    --json "$OUT/bench_w2_12_${threads}t.json" $BENCH_FLAGS
done
has 17 && run bench_w2_8_16 200 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 \
  --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant hybrid-only --variant hybrid-w2 --cache-policy lfu \
  --gpu-memory 8GiB --gpu-memory 16GiB --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_w2_8_16.json" $BENCH_FLAGS
# the CPU's share of a split started on the compiled kernel's own thread before the step's copies
# and launches (runtime/csrc/cpu_jobs.c) against inline after them (MOEPACK_CPU_WORKER=0):
# hybrid-w2, LFU, trace routing, 4-bit meta, 12 GiB, 16 CPU threads, each way
for jobs in 1 0; do
  has 18 && run bench_cpu_jobs_$jobs 170 env MOEPACK_CPU_WORKER=$jobs $PY -m runtime.bench --layers 32 --expert-bits 2 \
    --expert-meta-bits 4 --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant hybrid-w2 --cache-policy lfu \
    --gpu-memory 12GiB --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_cpu_jobs_$jobs.json" $BENCH_FLAGS
done
# llama.cpp's CPU path against moe-pack's on this host's cores (issue #7: "measure it against
# llama.cpp's CPU expert speed"): llama-bench and ggml's expert built here from the carried
# .cache/llamacpp (tools/llamacpp_host.sh), one expert at 16 and 8 threads, then 32 layers CPU-only
has 19 && run llamacpp_compare ${LLAMACPP_S:-540} $PY tools/llamacpp_compare.py --threads 16 --threads 8 \
  --json "$OUT/llamacpp_compare.json"
# issue #7's hybrid with the CPU's share on int8 activations, then int16 (BENCHMARKS.md section 28)
for act in int8 int16; do
  has 20 && run bench_hybrid_$act 170 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 \
    --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant hybrid-w2 --cache-policy lfu --gpu-memory 12GiB \
    --prefill-len 512 --cpu-activations $act --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_hybrid_$act.json" \
    $BENCH_FLAGS
done
# small cards (BENCHMARKS.md section 31): budgets below top-k slots per layer, which the plan
# refused before; per-layer LFU at 5 and 6 GiB (1-2 slots per layer, prefetch off by default
# there), copying only and hybrid; then one shared LFU pool in 3 GiB
has 21 && run bench_small 200 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 \
  --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant lru --variant hybrid-only --cache-policy lfu \
  --gpu-memory 5GiB --gpu-memory 6GiB --prefill-len 512 --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_small.json" \
  $BENCH_FLAGS
has 21 && run bench_shared_3g 120 $PY -m runtime.bench --layers 32 --expert-bits 2 --expert-meta-bits 4 \
  --tokens ${TOKENS:-16} --warmup 8 --routing trace --variant lru --variant hybrid-only --cache-policy shared-lfu \
  --gpu-memory 3GiB --cache-dir /tmp/moe-pack-bench --json "$OUT/bench_shared_3g.json" $BENCH_FLAGS
# one token's attention split over the keys (kernels.decode_ops.attend, only the keys up to the
# position read) against torch's SDPA over the whole bucket: the kernel table, then 32 resident
# layers with SDPA (stage 12/13's resident rows are the split kernel's)
has 22 && run attend_bench 60 $PY tools/attend_bench.py --json "$OUT/attend_bench.json"
has 22 && run resident_32_sdpa 150 bash -c "MOEPACK_FLASH_DECODE=0 $PY -m runtime.baseline_bench --layers 32 \
  --recipe 4/2m4 --cuda-graphs step --prompt-len 512 --new-tokens 64 > $OUT/resident_32_sdpa.jsonl"
has 22 && run resident_32_split 150 bash -c "$PY -m runtime.baseline_bench --layers 32 \
  --recipe 4/2m4 --cuda-graphs step --prompt-len 512 --new-tokens 64 > $OUT/resident_32_split.jsonl"
log "total"
tail -n 40 "$OUT/all.log"
