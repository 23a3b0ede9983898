"""Expert time from anonymous clones vs a file-backed map vs MAP_HUGETLB (explicit 2 MB pages)."""
import sys, time, statistics, mmap, os
from pathlib import Path
ROOT = Path(__file__).resolve().parents[4]  # the repository
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]
import numpy as np, torch
import kernel_bench as kb
from formats.qtensor import QuantSpec
from runtime.cpu_expert import cpu_expert_ffn
from runtime.cpu_native import set_cpu_activations
set_cpu_activations(sys.argv[1])
pool_mib = int(sys.argv[2])
kinds = sys.argv[3].split(",")
layout = kb.expert_layout(4096, 14336, QuantSpec(2, 16, 4, 128))
rs = layout.record_size
gen = torch.Generator().manual_seed(0)
first = kb.random_record(layout, torch.device("cpu"), gen)
n = max(2, -(-(pool_mib << 20) // rs))
x = torch.randn(1, 4096)
def pools():
    for kind in kinds:
        if kind == "anon":
            yield kind, [first.clone() for _ in range(n)]
        elif kind == "file":
            path = "/tmp/mapexp.bin"
            with open(path, "wb") as f:
                for _ in range(n): f.write(first.numpy().tobytes())
            arr = np.memmap(path, dtype=np.uint8, mode="r")
            import warnings; warnings.simplefilter("ignore")
            recs = [torch.from_numpy(arr[i * rs:(i + 1) * rs]) for i in range(n)]
            for r in recs: r.sum()  # fault every page in
            yield kind, recs
        elif kind == "huge":
            size = -(-(n * rs) // (2 << 20)) * (2 << 20)
            m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)
            arr = np.frombuffer(m, dtype=np.uint8)
            recs = [torch.from_numpy(arr[i * rs:(i + 1) * rs]) for i in range(n)]
            for r in recs: r.copy_(first)
            yield kind, recs
for kind, recs in pools():
    cpu_expert_ffn(recs[0], layout, x, threads=2)
    ts = []
    for i in range(30):
        t = time.perf_counter(); cpu_expert_ffn(recs[i % n], layout, x, threads=2); ts.append(time.perf_counter() - t)
    print(f"{kind:5s} pool {n} x {rs/1e6:.1f} MB: median {statistics.median(ts)*1e3:.2f} ms min {min(ts)*1e3:.2f}", flush=True)
    del recs
    if kind == "file": os.remove("/tmp/mapexp.bin")
