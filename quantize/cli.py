"""`moe-pack`: the offline toolchain (quantize a checkpoint, inspect a .moepack file).

Imports are lazy: `moe-pack inspect` needs only numpy and formats/, so it starts fast and
works without torch or hqq installed. Every MoepackError ends the program with
`error: <message>` / `hint: <hint>` on stderr and exit status 1, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import json
import signal
import time
from pathlib import Path

import click

from formats.errors import ConfigError, MoepackError

from .info import package_version

_OS_HINTS = {
    errno.ENOSPC: "free some disk space, or write the output to another disk",
    errno.EACCES: "check the file permissions",
    errno.EROFS: "the disk is read-only; write the output elsewhere",
}


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _fail(message: str, hint: str | None) -> None:
    click.echo(f"error: {_one_line(message)}", err=True)
    if hint:
        click.echo(f"hint: {_one_line(hint)}", err=True)
    raise click.exceptions.Exit(1)


def user_errors(fn):
    """Turn the failures a user can act on into one-line errors with exit status 1."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MoepackError as e:
            _fail(e.message, e.hint)
        except MemoryError:
            _fail("out of memory", "close other programs; quantizing needs a few times the largest tensor in RAM")
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            _fail(f"{where}{e.strerror or e}", _OS_HINTS.get(e.errno, "check the path"))

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_version(), prog_name="moe-pack")
def cli() -> None:
    """Pack Mixtral MoE checkpoints into expert-contiguous .moepack files."""


@cli.command()
@click.argument("src")
@click.option("-o", "--output", "out", required=True, type=click.Path(), metavar="OUT.moepack",
              help="Output file. An existing file is replaced atomically: it stays intact until the new one is complete.")
@click.option("--attn-bits", type=int, default=4, show_default=True, help="Attention weights: 2, 3, 4, 8 or 16 (16 = keep fp16).")
@click.option("--expert-bits", type=int, default=2, show_default=True, help="Expert weights: 2, 3, 4, 8 or 16.")
@click.option("--lm-head-bits", type=int, default=16, show_default=True, help="Output projection: 2, 3, 4, 8 or 16.")
@click.option("--attn-group-size", type=int, default=None, help="Weights per scale/zero for attention [default: 16 at 2 bits, else 64].")
@click.option("--expert-group-size", type=int, default=None, help="Weights per scale/zero for experts [default: 16 at 2 bits, else 64].")
@click.option("--lm-head-group-size", type=int, default=None, help="Weights per scale/zero for lm_head [default: 16 at 2 bits, else 64].")
@click.option("--meta-bits", type=int, default=8, show_default=True,
              help="Bits of the stored scales/zeros: 8 (quantized, smaller), 16 (hqq's own fp16) or 4.")
@click.option("--expert-meta-bits", type=int, default=None,
              help="Scale/zero bits of the experts alone [default: 4 for 2/3-bit experts (2.56 bits/weight at 2 bits, "
                   "format version 2), else --meta-bits]. 8 gives the reference system's recipe (3.06 bits/weight).")
@click.option("--meta-group-size", type=int, default=None, help="Groups per 4/8-bit meta group [default: 128 at 2/3 bits, 256 at 4/8 bits].")
@click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True,
              help="Where HQQ runs; auto = cuda when available. CPU and CUDA results differ slightly (hqq optimizes in fp16 on CUDA).")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("--low-disk", is_flag=True,
              help="SRC a Hub repo id: download each shard beside OUT when first needed and delete it once "
                   "quantized, instead of all 93 GB (Mixtral-8x7B) into the Hub cache first; the run reports "
                   "the most shard bytes on disk at once.")
@click.option("--imatrix", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help="An importance matrix from `moe-pack imatrix`: every quantized matrix is fitted by least squares "
                   "weighted by how strongly calibration text drove each input column, instead of HQQ (much lower "
                   "perplexity at 2 and 3 bits, docs/BENCHMARKS.md).")
@click.option("--gptq", type=click.Path(path_type=Path), default=None, metavar="TEXT",
              help="A calibration text run through SRC layer by layer: scales fitted as with --imatrix, and codes "
                   "chosen by GPTQ to cancel each other's error on the text's inputs (lower perplexity still; "
                   "docs/BENCHMARKS.md).")
@click.option("--gptq-tokens", type=int, default=None, help="Use only the first N tokens of the --gptq text [default: 8192].")
@click.option("--gptq-ctx", type=int, default=None, help="Tokens per window of the --gptq text [default: 512].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def quantize(src, out, attn_bits, expert_bits, lm_head_bits, attn_group_size, expert_group_size, lm_head_group_size,
             meta_bits, expert_meta_bits, meta_group_size, device, revision, low_disk, imatrix, gptq, gptq_tokens,
             gptq_ctx, quiet):
    """Quantize the Mixtral checkpoint SRC (a local folder or a Hugging Face repo id) with HQQ,
    with an importance matrix (--imatrix), or with GPTQ over a calibration text (--gptq).

    Router, norms and embeddings stay fp16. Per-matrix relative errors are recorded in the
    file (see `moe-pack inspect`). The same inputs give the same bytes on the same device
    with the same number of torch threads (hqq's early stop sums errors in thread order).
    """
    from .recipe import QuantRecipe

    recipe = QuantRecipe(
        attn_bits=attn_bits, expert_bits=expert_bits, lm_head_bits=lm_head_bits, attn_group_size=attn_group_size,
        expert_group_size=expert_group_size, lm_head_group_size=lm_head_group_size, meta_bits=meta_bits,
        expert_meta_bits=expert_meta_bits, meta_group_size=meta_group_size,
    )
    from .convert import GptqOptions, quantize_checkpoint  # imports torch: only now that the options are valid

    calibration = None
    if gptq is None:
        for option, value in (("--gptq-tokens", gptq_tokens), ("--gptq-ctx", gptq_ctx)):
            if value is not None:
                raise ConfigError(f"{option} has no effect without --gptq", hint=f"add --gptq TEXT, or drop {option}")
    else:
        from runtime.perplexity import read_text

        given = {"ctx": gptq_ctx, "max_tokens": gptq_tokens}
        calibration = GptqOptions(read_text(gptq), **{k: v for k, v in given.items() if v is not None})
    t0 = time.perf_counter()
    result = quantize_checkpoint(src, out, recipe, device=device, revision=revision, progress=not quiet, low_disk=low_disk,
                                 imatrix=imatrix, gptq=calibration)
    from formats.report import human_bytes

    shards = ("" if result.shards_peak is None else
              f", at most {result.shards_peak} shards ({human_bytes(result.shards_peak_bytes)}) on disk at once")
    fit = ""
    if result.calibrated_fits is not None:
        weighted, equal = result.calibrated_fits
        by = imatrix if imatrix is not None else f"GPTQ over {gptq}"
        fit = f", weighted by {by}: {weighted} matrices" + (f", {equal} with equal weights (not measured)" if equal else "")
    click.echo(
        f"wrote {result.path}: {result.records} records, {human_bytes(result.file_bytes)} "
        f"({recipe.describe()}{fit}, {result.device}, {time.perf_counter() - t0:.1f} s{shards})"
    )


def _verify(mf) -> dict:
    from tqdm.auto import tqdm

    records = list(mf.records())
    total = sum(r[2] for r in records)
    # disable=None: a bar on a terminal, silence when piped (keeps --json output clean)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="verify", disable=None) as bar:
        checked = mf.verify(progress=bar.update)
    return {"ok": True, "records": len(records), "bytes": checked}


@cli.command()
@click.argument("file", type=click.Path())
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON (stable keys).")
@click.option("--verify", is_flag=True, help="Check every record's crc32 (reads the whole file).")
@click.option("--tensors", is_flag=True, help="List every tensor: name, role, shape, quant, offset, bytes, error.")
@user_errors
def inspect(file, as_json, verify, tensors):
    """Describe the .moepack FILE: model shape, quantization, sizes, errors, GPU memory needs."""
    from formats.reader import MoepackFile
    from formats.report import render_text, report_for

    with MoepackFile(file) as mf:
        report = report_for(mf, tensors=tensors)
        if verify:
            report["verify"] = _verify(mf)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(render_text(report), nl=False)


@cli.command()
@click.argument("file", type=click.Path(path_type=Path))
@click.argument("text", type=click.Path(path_type=Path))
@click.option("--max-tokens", type=int, default=8192, show_default=True, help="Route only the first N tokens of TEXT.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per forward window.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def calibrate(file, text, max_tokens, ctx, device, quiet):
    """Count each expert's routing over TEXT and store the counts in FILE's header."""
    from runtime.perplexity import read_text

    from .calibrate import calibrate as run_calibration

    t0 = time.perf_counter()
    counts, n = run_calibration(file, read_text(text), ctx=ctx, max_tokens=max_tokens, device=device,
                                progress=not quiet)
    top = max(max(row) / max(sum(row), 1) for row in counts)
    click.echo(f"wrote expert counts of {n} tokens into {file} (busiest expert takes {top:.0%} of its layer's "
               f"choices; {time.perf_counter() - t0:.1f} s)")


@cli.command("imatrix")
@click.argument("src")
@click.argument("text", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), metavar="OUT.imatrix",
              help="The importance matrix to write (safetensors); then `moe-pack quantize SRC --imatrix OUT.imatrix`.")
@click.option("--max-tokens", type=int, default=8192, show_default=True, help="Use only the first N tokens of TEXT.")
@click.option("--ctx", type=int, default=512, show_default=True, help="Tokens per forward window.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--revision", default=None, help="Hub revision (branch, tag or commit) when SRC is a repo id.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@user_errors
def imatrix_command(src, text, out, max_tokens, ctx, device, revision, quiet):
    """Measure how strongly TEXT drives each input column of every quantized matrix.

    SRC is the checkpoint you will quantize (a local folder or a Hub repo id), run one layer at
    a time in float32, or a .moepack file of it (16/16 or 4/4) run by moe-pack's runtime.
    """
    from runtime.perplexity import read_text

    from . import imatrix as im
    from .convert import check_output

    check_output(out)
    is_file = Path(src).is_file()
    if not is_file and src.endswith(".moepack"):
        raise ConfigError(f"{src}: no such .moepack file",
                          hint="SRC is a .moepack file, a checkpoint folder or a Hub repo id")
    inputs = [text.resolve()] + ([Path(src).resolve()] if Path(src).exists() else [])
    if out.resolve() in inputs:
        raise ConfigError(f"-o {out} would overwrite an input", hint="write the importance matrix to another file")
    if is_file and revision is not None:
        raise ConfigError(f"--revision has no effect with the file {src}", hint="drop --revision")
    t0 = time.perf_counter()
    if is_file:
        result = im.measure(Path(src), read_text(text), ctx=ctx, max_tokens=max_tokens, device=device,
                            progress=not quiet)
    else:
        from .imatrix_checkpoint import measure_checkpoint

        result = measure_checkpoint(src, read_text(text), ctx=ctx, max_tokens=max_tokens, device=device,
                                    revision=revision, progress=not quiet)
    im.save(result, out)
    experts, others = im.coverage(result)
    click.echo(f"wrote {out}: {result.tokens} tokens, {experts} expert and {others} attention matrices measured "
               f"({time.perf_counter() - t0:.1f} s)")


def _exit_on_sigterm(signum, frame) -> None:
    # SystemExit unwinds through the writer's context manager, which removes its temp files
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    cli(prog_name="moe-pack")


if __name__ == "__main__":
    main()
