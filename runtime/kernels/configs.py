"""Launch configurations of the fused GEMV kernel: a shape heuristic, a table of tuned
overrides (filled from the per-GPU tuning cache, runtime/kernels/tuning.py, which
`python -m runtime.tune` writes), and the candidate set the tuner and the benchmark time."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import lru_cache

from formats.errors import ConfigError
from formats.qtensor import QuantSpec

from .words import int_x_ok

# Below this many programs per SM-wave the GPU idles on narrow matrices (k/v projections,
# w2): split K instead. H100 SXM has 132 SMs; used when the device cannot be asked.
DEFAULT_SM_COUNT = 132
PROGRAMS_PER_SM = 2
# A split-K slice shorter than this many tiles spends more on its partial-sum traffic than
# it gains in parallelism.
MIN_TILES_PER_SPLIT = 4
MAX_SPLIT_K = 16
# FMA contraction, stated at every launch: the kernels' float arithmetic and tools/sass_stats.py's
# counts assume it, and triton 3.10 turns it off unless asked (3.9 warns of the change). The
# dequantize kernels ask for it off instead: their results match the reference bit for bit.
FP_FUSION = {"enable_fp_fusion": True}
# "0" keeps the heuristic on the float path (int16 activations, GemvConfig.int_x, are its
# default where the layout allows)
INT_X_ENV = "MOEPACK_GEMV_INT"


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


@dataclass(frozen=True)
class GemvConfig:
    """One launch of the fused GEMV: BLOCK_N output rows x BLOCK_K input columns per tile,
    K cut into `split_k` slices whose fp32 partials are summed afterwards."""

    block_n: int = 32
    block_k: int = 256
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 2
    # read activations permuted to [T, PER, K/PER] (contiguous per code position) instead of
    # gathering them at stride PER; costs a small copy of x unless the producer wrote it so
    permute_x: bool = True
    # quantize x to int16 per word first (one small launch) and multiply with dp2a
    # (triton_gemv._tile_update_int); layouts it does not cover keep the float path
    int_x: bool = False

    def __post_init__(self) -> None:
        for name in ("block_n", "block_k", "num_warps"):
            if not _pow2(getattr(self, name)):
                raise ConfigError(f"GemvConfig.{name}={getattr(self, name)} must be a power of two")
        if self.block_k < 32:
            raise ConfigError(f"GemvConfig.block_k={self.block_k} must be at least 32 (one 1-bit plane word)")
        if not 1 <= self.split_k <= 1024:
            raise ConfigError(f"GemvConfig.split_k={self.split_k} must be in [1, 1024]")
        if not 1 <= self.num_stages <= 8:
            raise ConfigError(f"GemvConfig.num_stages={self.num_stages} must be in [1, 8]")

    def for_matrix(self, k: int, spec: QuantSpec) -> "GemvConfig":
        """This config made valid for a K-column matrix: tiles no wider than the matrix needs
        and no empty split-K slices. (Groups may span tiles: the kernel works per word.)"""
        return _for_matrix(self, k, spec)

    def short(self) -> str:
        return f"n{self.block_n}k{self.block_k}s{self.split_k}w{self.num_warps}p{self.num_stages}" + (
            "-i" if self.int_x else "" if self.permute_x else "-xs")


# Configs are frozen values: memoize the pure functions of them that run per kernel call
# (dataclasses.replace and __post_init__ cost tens of microseconds of host time per call).
@lru_cache(maxsize=1024)
def _for_matrix(cfg: GemvConfig, k: int, spec: QuantSpec) -> GemvConfig:
    block_k = min(cfg.block_k, max(_next_pow2(k), 32))
    tiles = -(-k // block_k)
    split = max(1, min(cfg.split_k, tiles))
    # equal slices of whole tiles; recompute the count so none is empty
    per_split = -(-tiles // split)
    split = -(-tiles // per_split)
    int_x = cfg.int_x and int_x_ok(k, spec)
    # int16 activations come from their own layout: the float path's x order does not apply
    return replace(cfg, block_k=block_k, split_k=split, int_x=int_x, permute_x=cfg.permute_x and not int_x)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


@dataclass(frozen=True)
class GemvProblem:
    """One distinct GEMV launch of the decode path: y[tokens, n] = x[tokens, k] @ W.T for a
    packed W of `spec` (two such matrices fused with the SiLU gate when `gated`). What a
    tuned config is keyed by."""

    n: int
    k: int
    spec: QuantSpec
    tokens: int
    gated: bool = False

    @property
    def key(self) -> tuple:
        return _key(self.n, self.k, self.tokens, self.spec, self.gated)

    def describe(self) -> str:
        return f"{self.n}x{self.k} {self.spec.describe()}" + (" gated" if self.gated else "") + f" T={self.tokens}"


# (rows, cols, bits, group_size, meta_bits, meta_group_size, tokens, gated) -> config; filled
# at start-up from the tuning cache (tuning.ensure_loaded) or by register_config. A plain
# tuple, not a GemvProblem: it is built on every kernel call once the table is not empty.
TUNED: dict[tuple, GemvConfig] = {}


def _key(n: int, k: int, t: int, spec: QuantSpec, gated: bool) -> tuple:
    return (n, k, spec.bits, spec.group_size, spec.meta_bits, spec.meta_group_size, t, gated)


def register_config(n: int, k: int, t: int, spec: QuantSpec, gated: bool, config: GemvConfig) -> None:
    TUNED[_key(n, k, t, spec, gated)] = config


def pick_gemv_config(n: int, k: int, t: int, spec: QuantSpec, gated: bool = False,
                     sm_count: int = DEFAULT_SM_COUNT) -> GemvConfig:
    """The config for y[t, n] = x[t, k] @ W.T: a tuned entry if there is one, else a heuristic
    that reads 32 words (128 bytes) of the low bit plane per row per tile and splits K when
    there are too few row blocks to fill the GPU."""
    # looked up every call (TUNED may change at run time), after a cheap test for the usual empty table
    tuned = TUNED.get(_key(n, k, t, spec, gated)) if TUNED else None
    if tuned is None and TUNED and spec.meta_bits == 4:
        # 4-bit meta codes change the loads of 1/g of the bytes, not the tile: borrow the 8-bit
        # meta entry of the same problem until one is tuned for 4 bits
        tuned = TUNED.get(_key(n, k, t, replace(spec, meta_bits=8), gated))
    if tuned is not None:
        return tuned.for_matrix(k, spec)
    return _heuristic_config(n, k, t, spec, gated, sm_count, _int_x_default())


def _int_x_default() -> bool:
    return os.environ.get(INT_X_ENV, "1") != "0"


def heuristic_config(n: int, k: int, t: int, spec: QuantSpec, gated: bool = False,
                     sm_count: int = DEFAULT_SM_COUNT) -> GemvConfig:
    """What pick_gemv_config returns when nothing is tuned for this problem."""
    return _heuristic_config(n, k, t, spec, gated, sm_count, _int_x_default())


@lru_cache(maxsize=1024)
def _heuristic_config(n: int, k: int, t: int, spec: QuantSpec, gated: bool, sm_count: int,
                      int_x: bool) -> GemvConfig:
    plane_bits = 2 if spec.bits == 3 else spec.bits
    block_k = 1024 // plane_bits
    # every token multiplies the whole tile again: keep the tile (registers) smaller for more tokens
    block_n = 32 if t <= 2 else 16 if t <= 8 else 8
    int_path = int_x and spec.bits in (2, 3, 4) and int_x_ok(k, spec)
    if gated:
        # two matrices per program; the int path's tile at 16 tokens is 4 rows, as 8 rows of
        # 512 columns spilled to thread-local memory (LDL + STL per loop: 1785 for 2-bit
        # w1/w3; issue bound 178 against 66 us; tools/sass_stats.py, sm_90)
        block_n = max(4 if int_path and t > 8 else 8, block_n // 2)
    # int16 activations for 2-, 3- and 4-bit codes: at 2 bits 0.5 dp2a and 1.4 integer
    # instructions per weight in all against 2.6 float ones, which bound the float path for
    # Mixtral's w1/w3 at 25 us of issue (floor 15); at 3 bits 11 against 37 us; at 4 bits (q
    # projection) 1.4 against 3.8 us (tools/sass_stats.py, sm_90). That costs a launch that
    # quantizes x, unless its producer writes that format (the decode step's fused norm does).
    # runtime.tune times both paths everywhere.
    cfg = GemvConfig(block_n=block_n, block_k=block_k, int_x=int_path).for_matrix(k, spec)
    if gated and t > 4 and not cfg.int_x and plane_bits == 2:
        # (the float path here: MOEPACK_GEMV_INT=0, or a layout the int path does not take)
        # it keeps t tokens' products of two matrices live: at 512 columns ptxas
        # moved them to thread-local memory (sm_90, tools/sass_stats.py, LDL + STL per loop:
        # 3-bit w1/w3 802 at 8 tokens, 8908 at 16; 2-bit 42 and 110); at 256 none at 8 tokens
        # and 442 at 16, and the issue bound drops 204 -> 147 us and 802 -> 298 us (3-bit). The
        # H100 had timed the 3-bit expert at 8 tokens at 2.78 ms, 7x the 2-bit one.
        cfg = replace(cfg, block_k=cfg.block_k // 2).for_matrix(k, spec)
    programs = -(-n // block_n)
    want = PROGRAMS_PER_SM * sm_count
    tiles = -(-k // cfg.block_k)
    split = 1
    if programs < want:
        split = min(-(-want // programs), max(1, tiles // MIN_TILES_PER_SPLIT), MAX_SPLIT_K)
        split = _exact_split(tiles, split)
    return replace(cfg, split_k=max(1, split)).for_matrix(k, spec)


def _exact_split(tiles: int, split: int) -> int:
    """`split`, or the nearest larger count up to twice it that divides the tiles evenly: then
    no K slice runs masked tiles past the end of the row and, with whole row blocks, the kernel
    loads without masks (EVEN), a few integer instructions fewer per loaded element."""
    for s in range(split, min(2 * split, tiles) + 1):
        if tiles % s == 0 and tiles // s >= MIN_TILES_PER_SPLIT:
            return s
    return split


def candidate_configs(n: int, k: int, t: int, spec: QuantSpec, gated: bool = False,
                      sm_count: int = DEFAULT_SM_COUNT) -> list[GemvConfig]:
    """The configs runtime.tune and tools/kernel_bench.py --sweep time for one shape: the
    heuristic's pick (first) and one-knob-at-a-time variations of it plus a few wider tiles
    (about 20, each a compile on the GPU, and as many again with int16 activations),
    deduplicated after being made valid for the shape."""
    # from the heuristic, not pick_gemv_config: a loaded tuning cache must not move the
    # candidate set (re-tuning would then drift away from the heuristic it is measured against)
    # the varied base is the float heuristic, whose x order is a knob of its own; the actual
    # heuristic (int16 activations where the layout allows) is timed first
    base = _heuristic_config(n, k, t, spec, gated, sm_count, False)
    variants = [_heuristic_config(n, k, t, spec, gated, sm_count, _int_x_default()), base]
    variants += [replace(base, block_n=bn) for bn in (8, 16, 32, 64)]
    variants += [replace(base, block_k=max(32, base.block_k // 2)), replace(base, block_k=base.block_k * 2)]
    variants += [replace(base, num_warps=w) for w in (2, 8)]
    variants += [replace(base, num_stages=p) for p in (1, 3, 4)]
    variants += [replace(base, split_k=s) for s in (1, 2, max(1, base.split_k // 2), base.split_k * 2, base.split_k * 4)]
    variants += [replace(base, permute_x=False)]
    variants += [
        replace(base, block_n=64, num_warps=8),
        replace(base, block_n=16, block_k=base.block_k * 2, num_warps=8),
        replace(base, block_n=8, block_k=base.block_k * 2, num_warps=4, num_stages=3),
        replace(base, block_n=32, block_k=base.block_k * 2, num_warps=8, num_stages=3),
    ]
    # each of them with int16 activations too, where the layout allows (for_matrix drops the
    # flag otherwise, and the duplicates go)
    variants += [replace(v, int_x=True) for v in variants if v.permute_x]
    out: dict[GemvConfig, None] = {}
    for v in variants:
        if v.block_n * v.block_k <= 32768:  # larger tiles spill registers at any warp count
            out[v.for_matrix(k, spec)] = None
    return list(out)
