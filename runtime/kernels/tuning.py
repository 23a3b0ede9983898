"""The on-disk, per-GPU cache of tuned GEMV launch configs.

`python -m runtime.tune MODEL.moepack` times the candidate configs of every GEMV its decode
path launches and saves the winners here; the runtime loads them for its GPU on the first
kernel launch (ensure_loaded) into configs.TUNED. The best config depends on the GPU (SM
count, L2, memory bandwidth), on the compiler and on the kernels' own code, so entries are
keyed by the device name, the triton version and KERNEL_REVISION, and entries of any other
triple are ignored.

The file is only a cache: whatever is wrong with it (unreadable, not JSON, another schema,
values the kernel no longer accepts) costs a warning and the heuristic configs, never a
failed run. Location: $MOEPACK_CACHE_DIR/gemv-tuning.json, else
$XDG_CACHE_HOME/moe-pack/gemv-tuning.json, else ~/.cache/moe-pack/gemv-tuning.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from formats.errors import ConfigError, MoepackError
from formats.qtensor import QuantSpec

from .configs import GemvConfig, GemvProblem, register_config

FORMAT = "moe-pack gemv tuning"
VERSION = 3
# version 1 files predate GemvConfig.int_x: their entries read with its default (the float
# path); version 3 gives each block the KERNEL_REVISION its times were measured on
READABLE_VERSIONS = (1, 2, 3)
_V1_MISSING = frozenset({"int_x"})
# Which GEMV kernels a block was timed on. A kernel change that can change which config wins
# (a new path among the candidates, another loop body) bumps it, and entries timed on another
# revision are ignored, the built-in table's included, until runtime.tune times them again: a
# config that beat the old candidates never ran against the new ones.
#   1: the float-activation path only (version 1 files; the built-in H100 table of 2026-11-23)
#   2: int16 activations (dp2a) among the candidates (version 2 files)
#   3: the one-token int16 GEMV gathers repeated meta addresses (docs/BENCHMARKS.md section 35)
KERNEL_REVISION = 3
CACHE_FILE = "gemv-tuning.json"
CACHE_DIR_ENV = "MOEPACK_CACHE_DIR"
NO_TUNING_ENV = "MOEPACK_NO_TUNING"
# Same format as the user's cache, shipped with the package; measured by `python -m runtime.tune`
# (docs/BENCHMARKS.md section 8: an H100 80GB HBM3 under triton 3.6.0, 2026-11-23)
BUILTIN_PATH = Path(__file__).resolve().parent / "data" / "gemv-tuning-builtin.json"
REFRESH_HINT = "delete it or re-run `python -m runtime.tune MODEL.moepack`"

_DOC_FIELDS = ("devices", "format", "version")
_BLOCK_FIELDS = ("device", "entries", "kernels", "triton")
_PROBLEM_INTS = ("n", "k", "bits", "group_size", "meta_bits", "meta_group_size", "tokens")
# GemvConfig's fields with their JSON type (bool or int), from its defaults: the file
# follows the dataclass, and the format version changes when the dataclass does
_CONFIG_TYPES = {f.name: type(f.default) for f in dataclasses.fields(GemvConfig)}
_ENTRY_FIELDS = frozenset((*_PROBLEM_INTS, "gated", *_CONFIG_TYPES, "us"))


class TuningCacheWarning(UserWarning):
    """The tuning cache (or part of it) was ignored; the heuristic configs are used instead."""


class _Invalid(Exception):
    """The file breaks the schema: it is ignored as a whole."""


@dataclass(frozen=True)
class TunedEntry:
    """The winner of one problem on one GPU: its config and its measured time per call."""

    problem: GemvProblem
    config: GemvConfig
    us: float


# ------------------------------------------------------------------ where

def cache_path() -> Path:
    """The cache file this process reads and `runtime.tune` writes by default."""
    root = os.environ.get(CACHE_DIR_ENV)
    if root:
        return Path(root).expanduser() / CACHE_FILE
    xdg = os.environ.get("XDG_CACHE_HOME")
    # the XDG spec says to ignore a relative value
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "moe-pack" / CACHE_FILE


# ------------------------------------------------------------------ reading

def load_tuned(device_name: str, triton_version: str, path: str | os.PathLike | None = None, *,
               warn_stale: bool = True) -> dict[GemvProblem, GemvConfig]:
    """The tuned configs for this device name under this triton version, timed on these
    kernels. A missing file is an empty cache; a broken one is one TuningCacheWarning and an
    empty cache (entries with values GemvConfig or QuantSpec reject are dropped the same way,
    the others kept); so is a block of this device and triton timed on other kernels, unless
    not warn_stale (the built-in table: nothing for the user to do about it)."""
    return {e.problem: e.config for e in load_entries(device_name, triton_version, path, warn_stale=warn_stale)}


def load_entries(device_name: str, triton_version: str, path: str | os.PathLike | None = None, *,
                 warn_stale: bool = True, revision: int = KERNEL_REVISION) -> list[TunedEntry]:
    """load_tuned with the measured times: the entries of this (device, triton, revision)."""
    path = Path(path) if path is not None else cache_path()
    try:
        doc = _read(path)
    except _Invalid as e:
        _warn(path, str(e))
        return []
    if doc is None:
        return []
    stale = None
    for block in doc["devices"]:
        if block["device"] == device_name and block["triton"] == triton_version:
            if block["kernels"] == revision:
                return _entries(block["entries"], path)
            stale = block["kernels"]
    if stale is not None and warn_stale:
        _warn(path, f"its configs for {device_name} were timed on GEMV kernel revision {stale}, and this "
                    f"moe-pack's kernels are revision {revision}")
    return []


def _read(path: Path) -> dict | None:
    """The structurally valid document, or None when there is no file."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise _Invalid(f"cannot read it ({e.strerror or e})") from None
    try:
        doc = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError) as e:
        raise _Invalid(f"not valid JSON ({str(e).splitlines()[0]})") from None
    _check_object(doc, _DOC_FIELDS, "the document")
    if doc["format"] != FORMAT:
        raise _Invalid(f"format is {doc['format']!r}, not {FORMAT!r}")
    if type(doc["version"]) is not int or doc["version"] not in READABLE_VERSIONS:
        raise _Invalid(f"version {doc['version']!r} is not one of {', '.join(map(str, READABLE_VERSIONS))} "
                       "(written by another moe-pack)")
    if not isinstance(doc["devices"], list):
        raise _Invalid("'devices' is not a list")
    seen = set()
    for i, block in enumerate(doc["devices"]):
        where = f"devices[{i}]"
        _check_object(block, _BLOCK_FIELDS if doc["version"] >= 3 else tuple(f for f in _BLOCK_FIELDS if f != "kernels"),
                      where)
        block.setdefault("kernels", doc["version"])  # versions 1 and 2: the revision their kernels had
        for name in ("device", "triton"):
            if not isinstance(block[name], str) or not block[name]:
                raise _Invalid(f"{where}.{name} is not a non-empty string")
        if type(block["kernels"]) is not int or block["kernels"] < 1:
            raise _Invalid(f"{where}.kernels={block['kernels']!r} is not a positive integer")
        key = (block["device"], block["triton"], block["kernels"])
        if key in seen:
            raise _Invalid(f"{where} repeats device {block['device']!r} with triton {block['triton']} "
                           f"and kernel revision {block['kernels']}")
        seen.add(key)
        if not isinstance(block["entries"], list):
            raise _Invalid(f"{where}.entries is not a list")
        for j, entry in enumerate(block["entries"]):
            _check_entry_types(entry, f"{where}.entries[{j}]", doc["version"])
    return doc


def _check_object(d, fields: tuple[str, ...] | frozenset, where: str) -> None:
    if not isinstance(d, dict):
        raise _Invalid(f"{where} is not a JSON object")
    missing, extra = sorted(set(fields) - d.keys()), sorted(d.keys() - set(fields))
    if missing or extra:
        raise _Invalid(f"{where} " + "; ".join(
            ([f"lacks {', '.join(missing)}"] if missing else []) + ([f"has unknown {', '.join(extra)}"] if extra else [])))


def _check_entry_types(entry, where: str, version: int = VERSION) -> None:
    missing = _V1_MISSING if version == 1 else frozenset()
    _check_object(entry, _ENTRY_FIELDS - missing, where)
    types = {**{k: int for k in _PROBLEM_INTS}, "gated": bool,
             **{k: t for k, t in _CONFIG_TYPES.items() if k not in missing}}
    for name, want in types.items():
        if type(entry[name]) is not want:  # not isinstance: True is an int to Python, not to us
            raise _Invalid(f"{where}.{name}={entry[name]!r} is not {'a boolean' if want is bool else 'an integer'}")
    if type(entry["us"]) not in (int, float):
        raise _Invalid(f"{where}.us={entry['us']!r} is not a number")


def _entries(raw: list[dict], path: Path) -> list[TunedEntry]:
    """The block's entries as values; ones with rejected values are dropped with a warning."""
    out, bad, seen = [], [], set()
    for d in raw:
        try:
            e = _entry(d)
        except ConfigError as err:
            bad.append(err.message)
            continue
        if e.problem in seen:
            bad.append(f"{e.problem.describe()} appears twice")
            continue
        seen.add(e.problem)
        out.append(e)
    if bad:
        _warn(path, f"{len(bad)} entr{'y' if len(bad) == 1 else 'ies'} with invalid values ignored (first: {bad[0]})")
    return out


def _entry(d: dict) -> TunedEntry:
    """One entry, or ConfigError for a value out of range."""
    spec = QuantSpec(d["bits"], d["group_size"], d["meta_bits"], d["meta_group_size"])
    if not spec.quantized:
        raise ConfigError("a 16-bit matrix has no GEMV launch to tune")
    for name in ("n", "k", "tokens"):
        if d[name] < 1:
            raise ConfigError(f"{name}={d[name]} must be positive")
    if not (math.isfinite(d["us"]) and d["us"] > 0):
        raise ConfigError(f"us={d['us']} must be a positive time")
    config = GemvConfig(**{name: d[name] for name in _CONFIG_TYPES if name in d})  # version 1: defaults
    return TunedEntry(GemvProblem(d["n"], d["k"], spec, d["tokens"], d["gated"]), config, float(d["us"]))


def _warn(path: Path, why: str) -> None:
    # stacklevel 3: attributed past this helper and load_entries, to whoever asked for the configs
    warnings.warn(f"ignoring GEMV tuning cache {path}: {why}; {REFRESH_HINT}", TuningCacheWarning, stacklevel=3)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _unique_keys(pairs: list) -> dict:
    d = dict(pairs)
    if len(d) != len(pairs):
        raise ValueError("an object repeats a key")
    return d


# ------------------------------------------------------------------ writing

def save_tuned(device_name: str, triton_version: str, entries: Iterable[TunedEntry],
               path: str | os.PathLike | None = None) -> Path:
    """Merge `entries` into the cache (replacing the same problems of this device and triton
    version, and this device and triton's blocks timed on other kernel revisions, keeping
    everything else) and write it atomically: a temporary file in the same folder, fsync,
    os.replace. The bytes depend only on the content (sorted keys and entries). An unreadable
    existing file is replaced, with a warning. Returns the path."""
    path = Path(path) if path is not None else cache_path()
    try:
        doc = _read(path)
    except _Invalid as e:
        warnings.warn(f"replacing GEMV tuning cache {path}: {e}", TuningCacheWarning, stacklevel=2)
        doc = None
    blocks = {(b["device"], b["triton"], b["kernels"]): b["entries"] for b in (doc["devices"] if doc else [])}
    mine = (device_name, triton_version, KERNEL_REVISION)
    # an existing entry with a rejected value is dropped here rather than kept forever
    merged = {e.problem: e for e in _valid_entries(blocks.get(mine, []))}
    merged.update((e.problem, e) for e in entries)
    # this device and triton's stale revisions go; the other blocks are written as this version
    # writes entries (a version 1 entry lacks int_x, which version 3 requires)
    blocks = {key: [_entry_json(e) for e in _valid_entries(es)] for key, es in blocks.items() if key[:2] != mine[:2]}
    blocks[mine] = [_entry_json(e) for e in merged.values()]
    out = {
        "format": FORMAT,
        "version": VERSION,
        "devices": [{"device": dev, "triton": tv, "kernels": rev, "entries": sorted(es, key=_entry_order)}
                    for (dev, tv, rev), es in sorted(blocks.items())],
    }
    _write_atomic(path, json.dumps(out, indent=1, sort_keys=True, allow_nan=False) + "\n")
    return path


def _valid_entries(raw: list[dict]) -> list[TunedEntry]:
    out = []
    for d in raw:
        try:
            out.append(_entry(d))
        except ConfigError:
            pass
    return out


def _entry_json(e: TunedEntry) -> dict:
    p, s = e.problem, e.problem.spec
    return {
        "n": p.n, "k": p.k, "bits": s.bits, "group_size": s.group_size, "meta_bits": s.meta_bits,
        "meta_group_size": s.meta_group_size, "tokens": p.tokens, "gated": p.gated,
        **dataclasses.asdict(e.config), "us": round(float(e.us), 3),
    }


def _entry_order(d: dict) -> tuple:
    return tuple(d[k] for k in ("n", "k", "bits", "group_size", "meta_bits", "meta_group_size", "tokens", "gated"))


def _write_atomic(path: Path, text: str) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _write_error(path, e) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise _write_error(path, e) from None
        raise


def _write_error(path: Path, e: OSError) -> MoepackError:
    return MoepackError(f"cannot write the GEMV tuning cache {path}: {e.strerror or e}",
                        hint=f"check the folder's permissions, or set {CACHE_DIR_ENV} (or pass --cache)")


# ------------------------------------------------------------------ the runtime's side

# device -> entries registered; checked on every kernel launch, so the hit is one dict lookup
_LOADED: dict[torch.device, int] = {}


def ensure_loaded(device: torch.device) -> int:
    """Register this CUDA device's cached configs into configs.TUNED, once per device per
    process; the number registered. A no-op (0) on other devices, without triton, or with
    MOEPACK_NO_TUNING set to anything but '' or '0' (read once per device)."""
    n = _LOADED.get(device)
    if n is None:
        n = _LOADED[device] = _load_for(device)
    return n


def _load_for(device: torch.device) -> int:
    if device.type != "cuda" or os.environ.get(NO_TUNING_ENV, "") not in ("", "0"):
        return 0
    version = triton_version()
    if version is None:
        return 0
    tuned = tuned_for(device_name(device), version)
    for p, config in tuned.items():
        register_config(p.n, p.k, p.tokens, p.spec, p.gated, config)
    return len(tuned)


def tuned_for(device_name: str, triton_version: str, path: str | os.PathLike | None = None) -> dict[GemvProblem, GemvConfig]:
    """The configs this (device, triton) pair runs with: the package's built-in measurements
    (BUILTIN_PATH: configs runtime.tune found on GPUs the project was measured on, so such a
    GPU is fast without tuning), overridden per problem by the user's own cache."""
    return {**load_tuned(device_name, triton_version, BUILTIN_PATH, warn_stale=False),
            **load_tuned(device_name, triton_version, path)}


def device_name(device: torch.device) -> str:
    """The name entries are keyed by, e.g. 'NVIDIA H100 80GB HBM3'."""
    return torch.cuda.get_device_name(device)


def triton_version() -> str | None:
    """The installed triton's version, None without triton. Imports triton: call it only
    where the kernels are about to run (a CUDA device)."""
    from .dispatch import triton_available

    if not triton_available():
        return None
    import triton

    return str(triton.__version__)
