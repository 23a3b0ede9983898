"""One token's attention over the KV cache: kernels.decode_ops.attend (split over the keys,
only those up to the position read) against torch's scaled_dot_product_attention as the
decode step ran it before (Attention._attend: a bias over all `keys` bucket positions).

    python tools/attend_bench.py --json attend.json          # a GPU: Mixtral's heads
    TRITON_INTERPRET=1 python tools/attend_bench.py --tiny   # CPU smoke run (tiny shapes)

Each row is a position. `split_us`: the kernels over the whole cache, as both the step graph
and the offloading engine's per-layer graphs now call them (one graph; the kernels read the
keys up to pos). `sdpa_bucket_us`: SDPA over the power of two above pos
(step_graph.key_bucket), the step graph's fallback; `sdpa_whole_us`: SDPA over the whole cache,
as the per-layer graphs ran it. Times are CUDA-graph replays between events
(runtime.kernels.timing), one layer's cache rotated over enough layers' caches to exceed L2,
as a 32-layer step reads each layer's once. `bytes` is what the keys and values up to pos
take: the split kernel's reads.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runtime.kernels import decode_ops  # noqa: E402
from runtime.kernels.timing import cuda_graph_timer, l2_bytes, rotating, wall_clock_timer  # noqa: E402
from runtime.step_graph import key_bucket  # noqa: E402

MIXTRAL = dict(heads=32, kv_heads=8, head_dim=128, ctx=4096)
TINY = dict(heads=8, kv_heads=2, head_dim=16, ctx=256)


def positions(ctx: int) -> list[int]:
    """Just past a bucket's half and at its end, for buckets 64, 1024 and the whole cache."""
    return sorted({p for keys in (64, 1024, ctx) if keys <= ctx for p in (keys // 2 + 1, keys - 1)})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the interpreter on the CPU)")
    ap.add_argument("--rep-ms", type=float, default=20.0)
    ap.add_argument("--json", help="write the rows here as well")
    args = ap.parse_args(argv)
    shape = TINY if args.tiny else MIXTRAL
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float16 if dev.type == "cuda" else torch.float32
    h, g, d, ctx = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["ctx"]
    layer_bytes = 2 * g * ctx * d * dtype.itemsize
    copies = 1 if dev.type == "cpu" else max(2, -(-4 * l2_bytes(dev) // layer_bytes))
    gen = torch.Generator().manual_seed(0)
    caches = [torch.randn(2, g, ctx, d, generator=gen).to(dev, dtype) for _ in range(copies)]
    q = torch.randn(1, h * d, generator=gen).to(dev, dtype)
    timer = cuda_graph_timer(dev, args.rep_ms) if dev.type == "cuda" else wall_clock_timer()
    rows = []
    for pos in positions(ctx):
        p = torch.tensor([pos], device=dev)
        bucket = key_bucket(pos, ctx)

        def split(i, p=p):
            return decode_ops.attend(q, caches[i], p, ctx, None)[0]

        def sdpa_at(keys):
            bias = torch.zeros(keys, dtype=dtype, device=dev).masked_fill(torch.arange(keys, device=dev) > p,
                                                                          float("-inf")).expand(h // g, -1)

            def run(i):  # the bias built outside the timed call, as the graphs hold it
                c = caches[i]
                return torch.nn.functional.scaled_dot_product_attention(
                    q.view(g, h // g, d)[None], c[0, :, :keys][None], c[1, :, :keys][None], attn_mask=bias)[0]
            return run

        want = sdpa_at(bucket)(0).reshape(1, -1).float()
        err = (split(0).float() - want).abs().max().item()
        row = dict(pos=pos, bucket=bucket, ctx=ctx, bytes=2 * g * (pos + 1) * d * dtype.itemsize, max_abs_diff=err,
                   split_us=timer(rotating(split, copies), copies),
                   sdpa_bucket_us=timer(rotating(sdpa_at(bucket), copies), copies),
                   sdpa_whole_us=timer(rotating(sdpa_at(ctx), copies), copies),
                   splits=decode_ops.attend_splits(ctx, g, dev))
        rows.append(row)
        print(f"pos {pos:5d}: split {row['split_us']:8.1f} us   sdpa over {bucket:5d} {row['sdpa_bucket_us']:8.1f} us   "
              f"over {ctx} {row['sdpa_whole_us']:8.1f} us   ({row['bytes'] / 1e6:.2f} MB, max |diff| {err:.1e})",
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(dict(device=str(torch.cuda.get_device_name(dev)) if dev.type == "cuda"
                                                   else "cpu", shape=shape, rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
