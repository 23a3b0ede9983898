"""`python -m runtime.tune MODEL.moepack`: tune the fused GEMV launch configs for this GPU.

Reads the file's header, collects every distinct GEMV the decode path launches (the
attention projections, a quantized lm_head, the experts' w1/w3 fused with the gate and
their w2, at each --tokens count), times every candidate config of each on random packed
data of that shape and spec (CUDA-graph replays between CUDA events, weights rotated over
copies larger than the L2 cache), and saves the fastest config per problem in the per-GPU
tuning cache (runtime/kernels/tuning.py), which the runtime loads on its first kernel
launch. Configs that fail to compile or compute a wrong result are skipped. --dry-run lists
the problems and their candidate counts without a GPU.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from formats.errors import ConfigError, MoepackError
from formats.header import Header
from formats.qtensor import QuantSpec, matrix_layout
from formats.reader import MoepackFile

from .cli import run_command
from .dequant import component_tensors, dequantize
from .qlinear import rows_concatenable
from .kernels.configs import DEFAULT_SM_COUNT, GemvConfig, GemvProblem, candidate_configs
from .kernels.qgemv import (PREFILL_THRESHOLD, codes_per_word, gemv, gemv_supported, permute_x, quantize_x,
                            unpermute_x)
from .kernels.qgemv import sm_count as device_sm_count  # `sm_count` names an argument below
from .kernels.timing import Timer, cuda_graph_timer, random_matrix, rotating, rotation_copies
from .kernels.tuning import TunedEntry, cache_path, device_name, save_tuned, triton_version

# A candidate whose result differs from the float32 reference by more than this (relative
# Frobenius norm; float16 activations) is a miscompile, not a fast config.
MAX_REL_ERR = 1e-2
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class TuneCase:
    """A problem and how the decode path launches it: `uses` names the matrices that launch
    it; `out_per` > 1: the result is written permuted for a consumer with that many codes per
    word (w1/w3 feeding w2); `x_follows_config`: the activations arrive in whichever format the
    config reads (w2 after the gated kernel: permuted, or int16 where its row blocks hold whole
    words, at one or two tokens by the heuristic), so no config pays a conversion launch."""

    problem: GemvProblem
    uses: tuple[str, ...]
    out_per: int = 1
    x_follows_config: bool = False

    @property
    def label(self) -> str:
        return "/".join(self.uses)


@dataclass(frozen=True)
class Timing:
    config: GemvConfig
    us: float | None  # None: failed (see error)
    error: str | None = None


@dataclass(frozen=True)
class CaseResult:
    case: TuneCase
    timings: tuple[Timing, ...]  # candidate order: the heuristic's config first
    heuristic: Timing = field(init=False)
    best: Timing | None = field(init=False)

    def __post_init__(self) -> None:
        ok = [t for t in self.timings if t.us is not None]
        object.__setattr__(self, "heuristic", self.timings[0])
        object.__setattr__(self, "best", min(ok, key=lambda t: t.us) if ok else None)

    @property
    def speedup(self) -> float | None:
        if self.best is None or self.heuristic.us is None:
            return None
        return self.heuristic.us / self.best.us


# ------------------------------------------------------------------ which problems

def parse_tokens(text: str) -> tuple[int, ...]:
    try:
        tokens = sorted({int(t) for t in text.split(",") if t.strip()})
    except ValueError:
        raise ConfigError(f"--tokens {text!r} is not a comma-separated list of integers", hint="e.g. --tokens 1,2,4,8") from None
    if not tokens or not all(1 <= t <= PREFILL_THRESHOLD for t in tokens):
        raise ConfigError(f"--tokens {text!r}: each count must be in [1, {PREFILL_THRESHOLD}]",
                          hint=f"more tokens than {PREFILL_THRESHOLD} take the dequantize + matmul path, which has no launch config")
    return tuple(tokens)


def collect_cases(header: Header, tokens: tuple[int, ...]) -> list[TuneCase]:
    """Every distinct GEMV launch of the decode path at each token count, in first-seen order
    of the matrices, then by tokens (deduplicated by shape, spec, tokens and gated; `uses`
    merged; where two uses launch one problem differently, the first one's way is timed)."""
    launches: list[tuple[str, tuple[int, int], QuantSpec, bool, int, bool]] = []
    stacked = _stacked_qkv(header)  # the loader stacks q, k and v (Attention.fuse_qkv): one launch
    for t in header.tensors:
        short = t.name.split(".")[-2] if t.name.endswith("_proj.weight") else t.name.removesuffix(".weight")
        if stacked is not None and short in ATTENTION[:3]:
            continue
        if short in ATTENTION or t.name == "lm_head.weight":
            launches.append((short, t.shape, t.spec, False, 1, False))
    if stacked is not None:
        launches.insert(0, ("q+k+v", *stacked, False, 1, False))
    m1, m3, m2 = (header.expert_layout.matrix(n) for n in ("w1", "w3", "w2"))
    w2_fused = _fused(m2.shape, m2.spec)
    if m1.spec == m3.spec and m1.shape == m3.shape:
        # the gated kernel writes h in w2's read order when w2 runs fused (its default config)
        launches.append(("w1+w3", m1.shape, m1.spec, True, codes_per_word(m2.spec) if w2_fused else 1, False))
    else:
        launches += [("w1", m1.shape, m1.spec, False, 1, False), ("w3", m3.shape, m3.spec, False, 1, False)]
    launches.append(("w2", m2.shape, m2.spec, False, 1, True))
    cases: dict[GemvProblem, TuneCase] = {}
    for use, shape, spec, gated, out_per, follows in launches:
        if not _fused(shape, spec):
            continue
        for t in tokens:
            p = GemvProblem(shape[0], shape[1], spec, t, gated)
            if p in cases:
                if use not in cases[p].uses:
                    cases[p] = TuneCase(p, (*cases[p].uses, use), cases[p].out_per, cases[p].x_follows_config)
            else:
                cases[p] = TuneCase(p, (use,), out_per, follows)
    return list(cases.values())


def _stacked_qkv(header: Header) -> tuple[tuple[int, int], QuantSpec] | None:
    """(shape, spec) of layer 0's stacked q, k, v projection, or None where they do not stack
    (every layer has the same shapes and recipe)."""
    try:
        qkv = [header.tensor(f"model.layers.0.self_attn.{n}.weight") for n in ATTENTION[:3]]
    except MoepackError:
        return None
    shapes = [tuple(t.shape) for t in qkv]
    if any(t.spec != qkv[0].spec for t in qkv) or not rows_concatenable(shapes, qkv[0].spec):
        return None
    return (sum(s[0] for s in shapes), shapes[0][1]), qkv[0].spec


def _fused(shape: tuple[int, ...], spec: QuantSpec) -> bool:
    return len(shape) == 2 and spec.quantized and gemv_supported(shape, spec)


def candidates(case: TuneCase, sm_count: int = DEFAULT_SM_COUNT) -> list[GemvConfig]:
    p = case.problem
    return candidate_configs(p.n, p.k, p.tokens, p.spec, p.gated, sm_count=sm_count)


# ------------------------------------------------------------------ timing

def measure_case(case: TuneCase, configs: list[GemvConfig], device: torch.device, dtype: torch.dtype,
                 timer: Timer, gen: torch.Generator, progress: Callable[[], None] = lambda: None) -> list[Timing]:
    """Each config's time per call on random packed data of the case's shape and spec, in
    order; a config that fails to compile or run, or computes a wrong result, gets an error."""
    p = case.problem
    shape, nmats = (p.n, p.k), 2 if p.gated else 1
    copies = rotation_copies(matrix_layout(shape, p.spec)[1] * nmats, device)
    mats = [[component_tensors(random_matrix(shape, p.spec, device, gen), shape, p.spec) for _ in range(nmats)]
            for _ in range(copies)]
    per = codes_per_word(p.spec)
    x = torch.randn(p.tokens, p.k, generator=gen).to(device, dtype)
    xp = permute_x(x, per).contiguous()
    xq = quantize_x(x, per) if case.x_follows_config and any(c.int_x for c in configs) else None
    ref = _reference(x, mats[0], shape, p.spec)
    out = []
    for cfg in configs:
        x_permuted = case.x_follows_config and cfg.permute_x
        xin = xp if x_permuted else x
        prepared = xq if case.x_follows_config and cfg.for_matrix(p.k, p.spec).int_x else None

        def call(i: int, cfg=cfg, xin=xin, x_permuted=x_permuted, prepared=prepared):
            return gemv(xin, mats[i], shape, p.spec, cfg, x_permuted=x_permuted, out_per=case.out_per,
                        prepared=prepared)

        try:
            y = call(0)
            if y is None:
                raise ConfigError(f"{p.describe()} does not take the fused GEMV")
            if case.out_per > 1:
                y = unpermute_x(y, case.out_per)
            err = float((y.float() - ref).norm() / ref.norm().clamp_min(1e-30))
            if not err <= MAX_REL_ERR:  # also catches NaN
                out.append(Timing(cfg, None, f"wrong result (relative error {err:.1e})"))
            else:
                out.append(Timing(cfg, timer(rotating(call, copies), copies)))
        except Exception as e:  # a config the compiler rejects (registers, shared memory) is just skipped
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            out.append(Timing(cfg, None, f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"))
        progress()
    return out


def _reference(x: torch.Tensor, mats: list[dict[str, torch.Tensor]], shape: tuple[int, int], spec: QuantSpec) -> torch.Tensor:
    ys = [F.linear(x.float(), dequantize(c, shape, spec, torch.float32)) for c in mats]
    return F.silu(ys[0]) * ys[1] if len(ys) == 2 else ys[0]


def tune_cases(cases: list[TuneCase], measure: Callable[[TuneCase, list[GemvConfig]], list[Timing]],
               sm_count: int = DEFAULT_SM_COUNT) -> list[CaseResult]:
    """measure(case, candidates) for every case -> its results (the winner is the fastest)."""
    return [CaseResult(c, tuple(measure(c, candidates(c, sm_count)))) for c in cases]


def winners(results: list[CaseResult]) -> list[TunedEntry]:
    return [TunedEntry(r.case.problem, r.best.config, r.best.us) for r in results if r.best is not None]


# ------------------------------------------------------------------ output

def _problem_json(case: TuneCase) -> dict:
    p = case.problem
    return {"uses": list(case.uses), "n": p.n, "k": p.k, **p.spec.to_json(), "tokens": p.tokens, "gated": p.gated}


def _timing_json(t: Timing | None) -> dict | None:
    if t is None:
        return None
    return {"config": asdict(t.config), "short": t.config.short(), "us": t.us, **({"error": t.error} if t.error else {})}


def _case_name(case: TuneCase, spec: bool = True) -> str:
    p = case.problem
    return f"{case.label} {p.n}x{p.k}" + (f" {p.spec.bits}-bit g{p.spec.group_size}" if spec else "") + (
        " gated" if p.gated else "")


def dry_run_report(path: Path, cases: list[TuneCase], sm_count: int, cache: Path, as_json: bool) -> str:
    counts = [len(candidates(c, sm_count)) for c in cases]
    if as_json:
        return json.dumps({"file": str(path), "cache": str(cache), "problems": [
            {**_problem_json(c), "candidates": n} for c, n in zip(cases, counts)]}, indent=1)
    lines = [f"{path}: {len(cases)} distinct GEMV problems, {sum(counts)} configs to time",
             f"{'problem':<44}{'T':>4}{'candidates':>12}  spec"]
    lines += [f"{_case_name(c, spec=False):<44}{c.problem.tokens:>4}{n:>12}  {c.problem.spec.describe()}" for c, n in zip(cases, counts)]
    lines.append(f"cache: {cache}")
    return "\n".join(lines)


def results_table(results: list[CaseResult], device: str, version: str, cache: Path | None) -> str:
    lines = [f"device: {device}   triton {version}",
             f"{'problem':<44}{'T':>4}  {'heuristic':<19}{'us':>9}  {'best':<19}{'us':>9}{'speedup':>9}  failed"]
    for r in results:
        h, b = r.heuristic, r.best
        failed = sum(t.us is None for t in r.timings)
        lines.append(
            f"{_case_name(r.case):<44}{r.case.problem.tokens:>4}  {h.config.short():<19}{_us(h):>9}  "
            f"{b.config.short() if b else '-':<19}{_us(b):>9}{f'{r.speedup:.2f}x' if r.speedup else '-':>9}  {failed}")
    if cache is not None:
        lines.append(f"saved {sum(r.best is not None for r in results)} configs to {cache}")
    return "\n".join(lines)


def _us(t: Timing | None) -> str:
    return f"{t.us:.1f}" if t is not None and t.us is not None else "-"


def results_json(results: list[CaseResult], device: str, version: str, cache: Path | None) -> str:
    return json.dumps({"device": device, "triton": version, "cache": str(cache) if cache else None, "results": [
        {"problem": _problem_json(r.case), "heuristic": _timing_json(r.heuristic), "best": _timing_json(r.best),
         "speedup": r.speedup, "candidates": len(r.timings),
         "failed": [{"config": t.config.short(), "error": t.error} for t in r.timings if t.us is None]}
        for r in results]}, indent=1)


# ------------------------------------------------------------------ the command

def cuda_device() -> torch.device:
    """The current CUDA device, or the error that says why tuning cannot run here."""
    from .kernels.dispatch import triton_available

    if not torch.cuda.is_available():
        raise MoepackError("runtime.tune needs a CUDA GPU: it times the fused kernels on the GPU that will run them",
                           hint="run it on that machine; --dry-run lists the problems without a GPU")
    if not triton_available():
        raise MoepackError("runtime.tune needs triton (the fused kernels are Triton kernels)", hint="pip install triton")
    return torch.device("cuda", torch.cuda.current_device())


@click.command(context_settings={"help_option_names": ["-h", "--help"]}, help=__doc__)
@click.argument("model_path", metavar="MODEL.moepack")
@click.option("--tokens", default="1,2,4,8", show_default=True, help="Token counts to tune (each at most 16).")
@click.option("--rep-ms", type=click.FloatRange(1, 10000), default=30, show_default=True,
              help="Measuring time per config (ms).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON instead of a table.")
@click.option("--cache", "cache", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Tuning cache file to write [default: $MOEPACK_CACHE_DIR or ~/.cache/moe-pack/gemv-tuning.json].")
@click.option("--dry-run", is_flag=True, help="List the problems and candidate counts; needs no GPU.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random weights.")
def cli(model_path, tokens, rep_ms, as_json, cache, dry_run, seed):
    counts = parse_tokens(tokens)
    file = MoepackFile(model_path)
    cases = collect_cases(file.header, counts)
    cache = cache if cache is not None else cache_path()
    if dry_run:
        click.echo(dry_run_report(file.path, cases, DEFAULT_SM_COUNT, cache, as_json))
        return
    device = cuda_device()
    name, version = device_name(device), triton_version()
    sms = device_sm_count(device)
    gen = torch.Generator().manual_seed(seed)
    timer = cuda_graph_timer(device, rep_ms)
    total = sum(len(candidates(c, sms)) for c in cases)
    with tqdm(total=total, unit="config", desc="tuning", file=sys.stderr, disable=None) as bar:
        def measure(case: TuneCase, configs: list[GemvConfig]) -> list[Timing]:
            bar.set_postfix_str(f"{_case_name(case)} T={case.problem.tokens}", refresh=False)
            out = measure_case(case, configs, device, torch.float16, timer, gen, lambda: bar.update(1))
            if device.type == "cuda":
                torch.cuda.empty_cache()  # each case's weight copies can be a sizeable share of a small GPU
            return out

        results = tune_cases(cases, measure, sms)
    entries = winners(results)
    saved = save_tuned(name, version, entries, cache) if entries else None
    click.echo(results_json(results, name, version, saved) if as_json else results_table(results, name, version, saved))
    if not entries:
        raise MoepackError("no candidate config ran on this GPU", hint="see the errors with --json")


def main(argv: list[str] | None = None) -> int:
    return run_command(cli, "python -m runtime.tune", argv)


if __name__ == "__main__":
    sys.exit(main())
