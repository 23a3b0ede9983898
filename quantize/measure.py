"""Figures for docs/BENCHMARKS.md: the cost of one full-size Mixtral expert at 2/3/4 bits,
and the peak memory of quantizing a checkpoint far larger than any one tensor.

    python -m quantize.measure expert --bits 2 --bits 3 --bits 4   # one 8x7B-shaped expert per width
    python -m quantize.measure make-checkpoint /tmp/ckpt-1g         # a ~1.2 GB random Mixtral checkpoint
    python -m quantize.measure memory /tmp/ckpt-1g -o /tmp/m.moepack
    python -m quantize.measure meta [--checkpoint DIR --tensor NAME ...]  # error of 16/8/4-bit meta

Each prints a markdown table; --json FILE also writes the raw figures.
"""

from __future__ import annotations

import json
import os
import resource
import time
from pathlib import Path

import click

from formats.header import ModelConfig

MIXTRAL_8X7B = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
    rope_theta=1e6, max_position_embeddings=32768,
)
MIXTRAL_SHAPES = {"w1": (14336, 4096), "w3": (14336, 4096), "w2": (4096, 14336)}
MB = 1e6
MiB = 1 << 20


def _estimate(matrix: str, measured: dict[str, float]) -> float:
    """Seconds for `matrix`: measured, else its same-shape twin (w1 <-> w3), else the slowest measured."""
    if matrix in measured:
        return measured[matrix]
    return measured.get({"w1": "w3", "w3": "w1"}.get(matrix, ""), max(measured.values()))


def _machine() -> dict:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "load_average": " ".join(f"{x:.2f}" for x in os.getloadavg())}


def _rss_bytes() -> int:
    """Current resident set size (Linux /proc; 0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _dump(data: dict, json_out: str | None) -> None:
    if json_out:
        Path(json_out).write_text(json.dumps(data, indent=2))
        click.echo(f"figures written to {json_out}")


@click.group()
def cli() -> None:
    """Measurements for docs/BENCHMARKS.md."""


@cli.command()
@click.option("--bits", "bits_list", type=int, multiple=True, default=(2, 3, 4), show_default=True)
@click.option("--matrices", default="w1,w3,w2", show_default=True,
              help="Matrices to quantize; the others are extrapolated (w3 from w1: same shape).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where hqq runs (auto: CUDA when present).")
@click.option("--fit", type=click.Choice(["hqq", "gptq"]), default="hqq", show_default=True,
              help="gptq: quantize --gptq's steps (weighted fit, then GPTQ's codes) on the Gram matrix of "
                   "2048 synthetic input rows near a rank-64 subspace (its computation not timed).")
def expert(bits_list, matrices, seed, json_out, device, fit):
    """Quantize one Mixtral-8x7B-shaped expert (Gaussian weights, std 0.02, fp16) with HQQ or GPTQ."""
    import torch

    from .convert import resolve_device

    from formats.writer import make_expert_layout

    from .encode import encode_codes, stored_error, stored_meta
    from .fit import weighted_fit
    from .gptq import gptq_codes
    from .hqq_codec import hqq_tensors
    from .recipe import QuantRecipe

    dev = resolve_device(device)
    names = [m.strip() for m in matrices.split(",") if m.strip()]
    weights = {}
    for i, name in enumerate(names):  # W: [rows, cols] fp16, as in the checkpoint
        g = torch.Generator().manual_seed(seed + i)
        weights[name] = (torch.randn(MIXTRAL_SHAPES[name], generator=g) * 0.02).half()
    grams = {}
    if fit == "gptq":
        for name, W in weights.items():
            g = torch.Generator(device=dev).manual_seed(seed + 100)
            cols = W.shape[1]
            x = torch.randn(2048, 64, generator=g, device=dev) @ torch.randn(64, cols, generator=g, device=dev)
            x += 0.3 * torch.randn(2048, cols, generator=g, device=dev)
            grams[name] = x.T @ x  # [cols, cols]
            del x
    results = {"machine": _machine(), "device": dev, "fit": fit, "shapes": {k: list(v) for k, v in MIXTRAL_SHAPES.items()}, "bits": {}}
    for bits in bits_list:
        spec = QuantRecipe(expert_bits=bits).build(MIXTRAL_8X7B)["experts"]
        layout = make_expert_layout(MIXTRAL_8X7B, spec)
        per = {}
        for name, W in weights.items():
            # the steps of quantize.hqq_codec.encode_tensor, each timed to its end on the device
            c0, t0 = time.process_time(), time.perf_counter()
            Wd = W.to(dev)
            if fit == "gptq":
                gram = grams[name]
                q, scale, zero = weighted_fit(Wd, torch.diagonal(gram) / 2048, spec.bits, spec.group_size)
                s_hat, z_hat = stored_meta(scale, zero, spec)
                groups = Wd.shape[1] // spec.group_size
                q = gptq_codes(Wd, gram, s_hat.view(-1, groups), z_hat.view(-1, groups), spec.bits, spec.group_size)
            else:
                q, scale, zero = hqq_tensors(Wd, spec, dev)
            _sync(dev)
            t1, c1 = time.perf_counter(), time.process_time()
            buf = encode_codes(Wd, q, scale, zero, spec, refit=fit == "hqq")
            payload = buf.cpu().numpy().tobytes()
            t2 = time.perf_counter()
            err = stored_error(Wd, buf, spec)
            t3 = time.perf_counter()
            del Wd, q, scale, zero, buf
            # CPU seconds (all threads) next to wall seconds: on a shared machine the wall time
            # depends on the neighbours, the CPU time much less
            per[name] = {"bytes": len(payload), "rel_error": err, "hqq_s": t1 - t0, "hqq_cpu_s": c1 - c0,
                         "encode_s": t2 - t1, "check_s": t3 - t2}
            click.echo(f"{bits}-bit {name}: {fit} {t1 - t0:.2f} s ({c1 - c0:.1f} CPU s), encode {t2 - t1:.2f} s, "
                       f"decode+error {t3 - t2:.2f} s, rel error {err:.4f}", err=True)
        measured = {n: v["hqq_s"] + v["encode_s"] + v["check_s"] for n, v in per.items()}
        estimate = {m: _estimate(m, measured) for m in MIXTRAL_SHAPES}
        weights_per_expert = sum(r * c for r, c in MIXTRAL_SHAPES.values())
        results["bits"][bits] = {
            "spec": spec.describe(),
            "record_bytes": layout.record_size,
            "payload_bytes": sum(m.nbytes for m in layout.matrices),
            "bits_per_weight": layout.record_size * 8 / weights_per_expert,
            "matrices": per,
            "seconds_per_expert": sum(estimate.values()),
            "seconds_per_expert_extrapolated": sorted(set(MIXTRAL_SHAPES) - set(per)),
        }
    click.echo(f"\nOne Mixtral-8x7B expert ({weights_per_expert:,} weights), {fit} on {dev}; machine: {results['machine']}\n")
    click.echo(f"| experts | record bytes | MB | bits/weight | rel error w1 / w3 / w2 | s per matrix ({fit} + encode + check) | s per expert |")
    click.echo("|---|---|---|---|---|---|---|")
    for bits, r in results["bits"].items():
        errs = " / ".join(f"{r['matrices'][m]['rel_error']:.4f}" if m in r["matrices"] else "-" for m in ("w1", "w3", "w2"))
        secs = " / ".join(
            f"{v['hqq_s']:.2f}+{v['encode_s']:.2f}+{v['check_s']:.2f}" for v in r["matrices"].values()
        )
        extra = f" (extrapolated {', '.join(r['seconds_per_expert_extrapolated'])})" if r["seconds_per_expert_extrapolated"] else ""
        click.echo(f"| {r['spec']} | {r['record_bytes']:,} | {r['record_bytes'] / MB:.2f} | {r['bits_per_weight']:.4f} | {errs} | {secs} | {r['seconds_per_expert']:.1f}{extra} |")
    _dump(results, json_out)


@cli.command()
@click.option("--checkpoint", type=click.Path(exists=True, file_okay=False), default=None,
              help="A local Hugging Face folder whose --tensor matrices are measured too.")
@click.option("--tensor", "tensors", multiple=True, help="A 2-D tensor of --checkpoint (repeatable).")
@click.option("--spec", "specs", multiple=True, default=("2,16,128", "3,64,128", "4,64,256"), show_default=True,
              help="bits,group_size,meta_group_size: each is measured with fp16, 8-bit and 4-bit meta.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
def meta(checkpoint, tensors, specs, json_out):
    """Relative weight error of fp16, 8-bit and 4-bit scale/zero (the stored bytes decoded, as
    `moe-pack quantize` records it) on a Gaussian [1024, 4096] matrix and checkpoint tensors."""
    import torch

    from formats.qtensor import QuantSpec

    from .hqq_codec import encode_tensor
    from .tensors import ShardIndex, load

    mats = {"gaussian 1024x4096": (torch.randn(1024, 4096, generator=torch.Generator().manual_seed(0)) * 0.02).half()}
    if tensors and checkpoint is None:
        raise click.UsageError("--tensor needs --checkpoint")
    if tensors:
        folder = Path(checkpoint)
        index = ShardIndex(folder)
        for name in tensors:
            mats[name] = load(folder, index.ref(name))
    rows = []
    for text in specs:
        bits, group, mg = (int(v) for v in text.split(","))
        for name, W in mats.items():
            errs = {mb: encode_tensor(W, QuantSpec(bits, group, mb, 0 if mb == 16 else mg), "cpu", name)[1]
                    for mb in (16, 8, 4)}
            rows.append({"matrix": name, "bits": bits, "group_size": group, "meta_group_size": mg,
                         "rel_error": {str(k): v for k, v in errs.items()}})
            click.echo(f"| {name} | {bits}-bit g{group}, meta g{mg} | {errs[16]:.4f} | {errs[8]:.4f} | {errs[4]:.4f} "
                       f"| {100 * (errs[4] / errs[16] - 1):+.1f}% |")
    _dump({"machine": _machine(), "rows": rows}, json_out)


@cli.command("make-checkpoint")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--layers", default=6, show_default=True)
@click.option("--hidden", default=1024, show_default=True)
@click.option("--intermediate", default=3584, show_default=True)
@click.option("--experts", default=8, show_default=True)
@click.option("--vocab", default=32000, show_default=True)
@click.option("--shard-mb", default=256, show_default=True)
@click.option("--seed", default=0, show_default=True)
def make_checkpoint(out, layers, hidden, intermediate, experts, vocab, shard_mb, seed):
    """Write a random fp16 Mixtral checkpoint (hub naming, sharded, with index; no tokenizer)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    from formats.layout import expected_tensors

    heads, head_dim = hidden // 128, 128
    cfg = ModelConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), head_dim=head_dim, num_local_experts=experts,
        num_experts_per_tok=2, rms_norm_eps=1e-5, rope_theta=1e6, max_position_embeddings=32768,
    )
    shapes = {n: s for n, (_, _, s) in expected_tensors(cfg).items()}
    for L in range(layers):
        for e in range(experts):
            p = f"model.layers.{L}.block_sparse_moe.experts.{e}."
            shapes.update({p + "w1.weight": (intermediate, hidden), p + "w3.weight": (intermediate, hidden), p + "w2.weight": (hidden, intermediate)})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0

    def flush():
        nonlocal current, size
        if current:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(current, out / name, metadata={"format": "pt"})
            shards.append((name, list(current)))
            current, size = {}, 0

    for name, shape in shapes.items():  # one tensor generated at a time, one shard buffered
        std = 1.0 / np.sqrt(shape[-1]) if len(shape) == 2 else 0.0
        arr = rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + (1.0 if len(shape) == 1 else 0.0)
        current[name] = torch.from_numpy(arr.astype(np.float16))
        size += arr.size * 2
        if size >= shard_mb * MiB:
            flush()
    flush()
    n = len(shards)
    weight_map = {}
    for i, (name, keys) in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map.update({k: final for k in keys})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    hf = {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], **cfg.to_json(), "hidden_act": "silu",
          "bos_token_id": 1, "eos_token_id": 2}
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    total = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    click.echo(f"wrote {out}: {n} shards, {total / MB:.0f} MB")


@cli.command()
@click.argument("src", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False))
@click.option("--attn-bits", default=4, show_default=True)
@click.option("--expert-bits", default=2, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), default=None)
@click.option("--device", default="cpu", show_default=True, type=click.Choice(["auto", "cpu", "cuda"]),
              help="Where hqq and the encoding run (the GPU's memory is not counted).")
def memory(src, out, attn_bits, expert_bits, json_out, device):
    """Quantize SRC in this process and report the RSS high-water mark against the largest tensor, and the time."""
    import hqq.core.quantize  # noqa: F401  imported up front so module memory is in the baseline
    import torch  # noqa: F401

    from .convert import quantize_checkpoint
    from .recipe import QuantRecipe
    from .tensors import ShardIndex

    idx = ShardIndex(Path(src))
    sizes = {n: (2 if d in ("F16", "BF16") else 4) * max(1, _prod(s)) for n, (_, d, s) in idx.entries.items()}
    largest = max(sizes, key=sizes.get)
    total = sum(p.stat().st_size for p in Path(src).glob("*.safetensors"))
    baseline, baseline_peak = _rss_bytes(), _peak_rss_bytes()
    t0 = time.perf_counter()
    result = quantize_checkpoint(src, out, QuantRecipe(attn_bits=attn_bits, expert_bits=expert_bits), device=device)
    elapsed = time.perf_counter() - t0
    peak = _peak_rss_bytes()
    figures = {
        "machine": _machine(), "checkpoint_bytes": total, "shards": len(idx.shards), "tensors": len(sizes),
        "largest_tensor": largest, "largest_tensor_bytes": sizes[largest], "baseline_rss_bytes": baseline,
        "baseline_peak_rss_bytes": baseline_peak, "peak_rss_bytes": peak, "peak_minus_baseline_bytes": peak - baseline,
        "peak_over_largest_tensor": (peak - baseline) / sizes[largest], "seconds": elapsed,
        "output_bytes": result.file_bytes, "recipe": f"attention {attn_bits}-bit, experts {expert_bits}-bit",
        "device": result.device,
    }
    click.echo("\n| checkpoint | largest tensor | RSS before | RSS peak | peak - before | (peak - before) / largest | time |")
    click.echo("|---|---|---|---|---|---|---|")
    click.echo(
        f"| {total / MB:.0f} MB, {len(idx.shards)} shards, {len(sizes)} tensors | {largest} {sizes[largest] / MB:.1f} MB | "
        f"{baseline / MB:.0f} MB | {peak / MB:.0f} MB | {(peak - baseline) / MB:.0f} MB | "
        f"{figures['peak_over_largest_tensor']:.1f}x | {elapsed:.0f} s |"
    )
    _dump(figures, json_out)


def _prod(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


if __name__ == "__main__":
    cli()
