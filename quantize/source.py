"""The input checkpoint: find it (local folder or Hub repo), read config.json into a
ModelConfig, and collect the tokenizer that travels inside the .moepack file.

Nothing here reads tensor data; `quantize.tensors` does, one tensor at a time.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from formats.errors import ConfigError, SourceError
from formats.header import ModelConfig, TokenizerInfo

# Only what a Mixtral conversion needs; `*.safetensors` is asked for separately, from the index,
# because some repos also ship a `consolidated.safetensors` (Mistral's own format) of the same size.
HUB_METADATA_FILES = [
    "config.json", "generation_config.json", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
]
_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+")
_CHECKPOINT_HINT = "SRC must be a Hugging Face checkpoint folder (config.json + *.safetensors) or a Hub repo id"


@dataclass(frozen=True)
class Checkpoint:
    """A local checkpoint folder, read and checked up to (not including) its tensor data."""

    folder: Path
    source: str  # SRC as the user gave it; recorded in the file's header
    config: ModelConfig
    tokenizer: TokenizerInfo


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SourceError(f"{path}: no such file", hint=_CHECKPOINT_HINT) from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SourceError(f"{path}: not valid JSON ({str(e)[:80]})", hint="the file is damaged; download it again") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object, got {type(data).__name__}", hint="the file is damaged; download it again")
    return data


def looks_like_repo_id(src: str) -> bool:
    return bool(_REPO_ID.fullmatch(src)) and not src.startswith(".")


def local_folder(src: str) -> Path | None:
    """SRC as a local folder; None when it names no local path but may be a Hub repo id."""
    path = Path(src).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SourceError(f"{src}: is a file, not a checkpoint folder", hint=_CHECKPOINT_HINT)
        return path
    if not looks_like_repo_id(src):
        raise SourceError(f"{src}: no such folder", hint=_CHECKPOINT_HINT)
    return None


def _hub(src: str, download, **kwargs) -> Path:
    if download is None:
        from huggingface_hub import snapshot_download as download
    try:
        return Path(download(src, **kwargs))
    except Exception as e:  # the Hub client raises many types (HTTP, offline, auth, bad id): all mean "cannot fetch"
        first = str(e).splitlines()[0][:120] if str(e) else ""
        raise SourceError(
            f"{src}: not a local folder, and downloading it from the Hugging Face Hub failed ({type(e).__name__}: {first})",
            hint="check the path or repo id; for gated repos run `huggingface-cli login` first",
        ) from None


def fetch_metadata(src: str, *, revision: str | None = None, download=None) -> Path:
    """The folder holding SRC's config and tokenizer files (a Hub repo: only those are fetched).

    `download` replaces huggingface_hub.snapshot_download (tests pass a fake: no network).
    """
    folder = local_folder(src)
    if folder is not None:
        return folder
    return _hub(src, download, revision=revision, allow_patterns=HUB_METADATA_FILES)


def fetch_weights(src: str, folder: Path, *, revision: str | None = None, download=None) -> Path:
    """The folder with SRC's safetensors shards: for a Hub repo, exactly the shards its index lists."""
    if local_folder(src) is not None:
        return folder
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_read_json(index).get("weight_map", {}).values()))
        if not shards:
            raise SourceError(f"{src}: model.safetensors.index.json lists no shards", hint="is this a complete checkpoint repo?")
        return _hub(src, download, revision=revision, allow_patterns=shards)
    return _hub(src, download, revision=revision, allow_patterns=["*.safetensors"], ignore_patterns=["consolidated*"])


def resolve_source(src: str, *, revision: str | None = None, download=None) -> Path:
    """The local folder with everything SRC needs (metadata and weights)."""
    folder = fetch_metadata(src, revision=revision, download=download)
    return fetch_weights(src, folder, revision=revision, download=download)


def _positive_int(cfg: dict, key: str, path: Path, default=None) -> int:
    v = cfg.get(key)
    if v is None:  # absent, or null as transformers writes for "derive it"
        v = default
    if v is None:
        raise SourceError(f"{path}: lacks {key}", hint="is this a complete Mixtral config.json?")
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise SourceError(f"{path}: {key}={v!r} must be a positive integer", hint="the config is damaged or not a Mixtral config")
    return v


def _positive_float(v, key: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise SourceError(f"{path}: {key}={v!r} must be a positive number", hint="the config is damaged or not a Mixtral config")
    return float(v)


def _rope_theta(cfg: dict, path: Path) -> float:
    """transformers 5 moves rope settings into `rope_parameters`; older configs keep `rope_theta`."""
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise SourceError(f"{path}: rope_parameters must be an object", hint="the config is damaged")
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise SourceError(
            f"{path}: rope type {rope_type!r} is not supported (only plain RoPE)",
            hint="moe-pack's runtime implements Mixtral's default rotary embedding only",
        )
    theta = params.get("rope_theta", cfg.get("rope_theta", 1e6))
    return _positive_float(theta, "rope_theta", path)


def model_config_from_hf(cfg: dict, path: Path) -> ModelConfig:
    """Map a Hugging Face Mixtral config.json (transformers 4 or 5) to formats.ModelConfig."""
    model_type = cfg.get("model_type")
    if model_type != "mixtral":
        raise SourceError(
            f"{path}: model_type is {model_type!r}, not 'mixtral'",
            hint="moe-pack packs Mixtral-architecture checkpoints (MixtralForCausalLM) only",
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise SourceError(f"{path}: hidden_act={act!r} is not supported (Mixtral uses 'silu')", hint="only Mixtral's SiLU experts are supported")
    heads = _positive_int(cfg, "num_attention_heads", path)
    hidden = _positive_int(cfg, "hidden_size", path)
    if cfg.get("head_dim") is None and hidden % heads:
        raise SourceError(f"{path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}", hint="set head_dim in config.json")
    head_dim = _positive_int(cfg, "head_dim", path, default=hidden // heads)
    window = cfg.get("sliding_window")
    if window is not None:
        window = _positive_int(cfg, "sliding_window", path)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise SourceError(f"{path}: tie_word_embeddings={tie!r} must be true or false", hint="the config is damaged")
    try:
        return ModelConfig(
            vocab_size=_positive_int(cfg, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_positive_int(cfg, "intermediate_size", path),
            num_hidden_layers=_positive_int(cfg, "num_hidden_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=_positive_int(cfg, "num_key_value_heads", path, default=heads),
            head_dim=head_dim,
            num_local_experts=_positive_int(cfg, "num_local_experts", path),
            num_experts_per_tok=_positive_int(cfg, "num_experts_per_tok", path),
            rms_norm_eps=_positive_float(cfg.get("rms_norm_eps", 1e-5), "rms_norm_eps", path),
            rope_theta=_rope_theta(cfg, path),
            # absent: MixtralConfig's own default
            max_position_embeddings=_positive_int(cfg, "max_position_embeddings", path, default=4096 * 32),
            tie_word_embeddings=tie,
            sliding_window=window,
        )
    except ConfigError as e:
        raise SourceError(f"{path}: {e.message}", hint="the config is inconsistent; check it against the model card") from None


def _token_ids(value, key: str, path: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise SourceError(f"{path}: {key}={value!r} must be a token id or a list of token ids", hint="the config is damaged")
    return tuple(values)


def _chat_template(folder: Path, tok_cfg: dict) -> str | None:
    """transformers >= 4.43 may save the template as chat_template.jinja instead of inline."""
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    t = tok_cfg.get("chat_template")
    if isinstance(t, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
        t = named.get("default")
    return t if isinstance(t, str) else None


def tokenizer_from_folder(folder: Path, cfg: dict) -> TokenizerInfo:
    """The tokenizer files as one TokenizerInfo; generation_config.json wins over config.json."""
    tok_path = folder / "tokenizer.json"
    tokenizer_json = tok_path.read_text(encoding="utf-8") if tok_path.is_file() else None
    tok_cfg_path = folder / "tokenizer_config.json"
    tok_cfg = _read_json(tok_cfg_path) if tok_cfg_path.is_file() else {}
    gen_path = folder / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    cfg_path = folder / "config.json"
    bos = _token_ids(gen.get("bos_token_id", cfg.get("bos_token_id")), "bos_token_id", gen_path if "bos_token_id" in gen else cfg_path)
    if len(bos) > 1:
        raise SourceError(f"{folder}: bos_token_id must be one id, got {list(bos)}", hint="fix generation_config.json")
    eos_src = gen_path if "eos_token_id" in gen else cfg_path
    eos = _token_ids(gen.get("eos_token_id", cfg.get("eos_token_id")), "eos_token_id", eos_src)
    add_bos = tok_cfg.get("add_bos_token", True)
    if not isinstance(add_bos, bool):
        raise SourceError(f"{tok_cfg_path}: add_bos_token={add_bos!r} must be true or false", hint="fix tokenizer_config.json")
    return TokenizerInfo(
        tokenizer_json=tokenizer_json,
        chat_template=_chat_template(folder, tok_cfg),
        bos_token_id=bos[0] if bos else None,
        eos_token_ids=tuple(dict.fromkeys(eos)),  # dedupe, keep order
        add_bos_token=add_bos,
    )


def open_checkpoint(src: str, *, revision: str | None = None, download=None,
                    check: Callable[[ModelConfig, TokenizerInfo], object] | None = None,
                    weights: bool = True) -> Checkpoint:
    """Read SRC's config and tokenizer; `check(config, tokenizer)` runs before any weights are
    downloaded, so a bad option or calibration text fails in seconds, not after fetching 90 GB.
    weights=False: a Hub repo's shards are left on the Hub (quantize/streaming.py fetches them
    one at a time)."""
    folder = fetch_metadata(src, revision=revision, download=download)
    cfg_path = folder / "config.json"
    cfg = _read_json(cfg_path)
    config = model_config_from_hf(cfg, cfg_path)
    tokenizer = tokenizer_from_folder(folder, cfg)
    if check is not None:
        check(config, tokenizer)
    if weights:
        folder = fetch_weights(src, folder, revision=revision, download=download)
    return Checkpoint(folder=folder, source=src, config=config, tokenizer=tokenizer)
