"""cProfile of one 128-token prompt through a 4-layer Mixtral-8x7B-shape model (recipe 4/2m4) on
the CPU, as docs/BENCHMARKS.md section 32 quotes it:

    OMP_NUM_THREADS=2 PYTHONPATH=. python docs/results/2026-11-24-dev-cpu/session25/prompt_profile.py
"""
import cProfile, pstats, time, sys, torch
from pathlib import Path
from runtime.baseline_bench import bench_config, bench_recipe
from runtime.offload.synthfile import write_bench_file
from runtime.loader import load_model
path = Path("/tmp/b4.moepack")
if not path.exists():
    write_bench_file(path, bench_config(4, False), bench_recipe("4/2m4"), seed=0, progress=False)
model, file = load_model(path, torch.device("cpu"), torch.float32, ctx=300)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, 32000, (128,), generator=g)
with torch.inference_mode():
    model(prompt, 0, last_only=True)
    t0 = time.perf_counter(); model(prompt, 0, last_only=True); print("prefill s", time.perf_counter() - t0)
    pr = cProfile.Profile(); pr.enable(); model(prompt, 0, last_only=True); pr.disable()
pstats.Stats(pr).sort_stats("tottime").print_stats(25)
