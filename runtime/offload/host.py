"""The host tier: expert records in page-locked (pinned) memory, filled from the file in large
sequential reads, and, when RAM cannot hold them all, on-demand reads of the others into a
small ring of pinned staging buffers by background threads.

Host memory is the authority: device slots are only ever overwritten, never copied back.
Pinned memory comes from torch's caching host allocator, which rounds every allocation up
to a power of two, so the arena is cut into chunks that each fill a power of two nearly
exactly (one 17 GB allocation would pin 32 GB).
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

from formats.errors import ConfigError, MoepackError
from formats.header import Header
from formats.reader import MoepackFile

from .budget import format_size
from .cache import Key

CHUNK_BYTES = 1 << 30  # smallest arena chunk: few allocations, and each rounds well
READ_BYTES = 128 << 20  # one sequential read while filling the arena


def pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def chunk_bytes_for(record_size: int, lo: int = CHUNK_BYTES, hi: int = 4 * CHUNK_BYTES) -> int:
    """The power of two in [lo, hi] (at least one record) that records fill best."""
    sizes = []
    p = max(lo, pow2_ceil(record_size))
    while p <= max(hi, pow2_ceil(record_size)):
        sizes.append(p)
        p *= 2
    return min(sizes, key=lambda p: ((p % record_size) / p, p))


def chunk_records(n_records: int, record_size: int) -> list[int]:
    """Records per arena chunk: full chunks of chunk_bytes_for(record_size), then a tail cut
    into power-of-two pieces, so the allocator's rounding wastes less than a record per chunk."""
    full = chunk_bytes_for(record_size) // record_size
    out = []
    left = n_records
    while left >= full:
        out.append(full)
        left -= full
    while left > 0:
        p = 1 << ((left * record_size).bit_length() - 1)  # largest power of two <= the tail
        take = max(1, min(left, p // record_size))
        out.append(take)
        left -= take
    return out


def arena_bytes(n_records: int, record_size: int, pinned: bool) -> int:
    """Host bytes an arena of n records really takes (power-of-two rounding when pinned)."""
    chunks = chunk_records(n_records, record_size)
    return sum(pow2_ceil(c * record_size) if pinned else c * record_size for c in chunks)


def host_capacity(budget: int, record_size: int, total: int, staging: int, pinned: bool) -> int:
    """How many records fit `budget` next to `staging` staging buffers (all of them need none)."""
    if arena_bytes(total, record_size, pinned) <= budget:
        return total
    left = budget - staging * (pow2_ceil(record_size) if pinned else record_size)
    lo, hi = 0, total - 1
    while lo < hi:  # largest n with arena_bytes(n) <= left
        mid = (lo + hi + 1) // 2
        if arena_bytes(mid, record_size, pinned) <= left:
            lo = mid
        else:
            hi = mid - 1
    return lo if arena_bytes(lo, record_size, pinned) <= left else -1


def choose_resident(header: Header, n: int) -> list[Key]:
    """The n most useful experts to keep in RAM: by the header's routing counts (share of its
    layer) when present, else layer-balanced (n // L per layer, lowest expert ids)."""
    c = header.config
    L, E = c.num_hidden_layers, c.num_local_experts
    if n >= L * E:
        return [(l, e) for l in range(L) for e in range(E)]
    if header.expert_counts is not None:
        share = []
        for l, row in enumerate(header.expert_counts):
            tot = sum(row) or 1
            share += [(-row[e] / tot, l, e) for e in range(E)]
        return sorted((l, e) for _, l, e in sorted(share)[:n])
    base, extra = divmod(n, L)
    return [(l, e) for l in range(L) for e in range(base + (1 if l < extra else 0))]


def _pread_into(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got <= 0:
            raise MoepackError(f"unexpected end of file while reading {len(view)} bytes at offset {offset}",
                               hint="the file may have been truncated while in use")
        done += got


@dataclass
class PendingRead:
    """An on-demand read of one expert into staging buffer `buf`."""

    key: Key
    buf: int
    future: Future


class HostStore:
    """Expert records in (pinned) host memory, plus on-demand file reads for the rest."""

    def __init__(self, file: MoepackFile, *, resident: list[Key] | None = None, pin: bool | None = None,
                 staging: int = 8, io_threads: int = 4, progress: bool = True,
                 device: torch.device | str | None = None):
        h = file.header
        self.file = file
        self.record_size = rs = h.expert_layout.record_size
        self.pinned = torch.cuda.is_available() if pin is None else pin
        # the reader threads wait on the copies' CUDA events; a thread's current device is its own
        # (device 0 unless set), and waiting there would create a context on GPU 0 when the model
        # is on cuda:N
        device = torch.device(device if device is not None else "cuda" if self.pinned else "cpu")
        self._cuda_index = None
        if device.type == "cuda" and torch.cuda.is_available():
            self._cuda_index = device.index if device.index is not None else torch.cuda.current_device()
        cfg = h.config
        all_keys = [(l, e) for l in range(cfg.num_hidden_layers) for e in range(cfg.num_local_experts)]
        keys = all_keys if resident is None else sorted(set(resident))
        self._file_offset = {(x.layer, x.expert): file.data_offset + x.offset for x in h.experts}
        self._fd = os.open(file.path, os.O_RDONLY)
        self._pool = ThreadPoolExecutor(max_workers=max(1, io_threads), thread_name_prefix="moepack-io")
        self._lock = threading.Lock()
        self.file_reads = 0
        self.file_read_bytes = 0
        self.file_read_s = 0.0

        # arena rows in file order, so the fill is a few long sequential reads
        keys.sort(key=self._file_offset.__getitem__)
        self.chunks: list[torch.Tensor] = []
        self._where: dict[Key, tuple[int, int]] = {}
        self._views: dict[Key, torch.Tensor] = {}  # view()'s rows, made on first use
        i = 0
        for c, n in enumerate(chunk_records(len(keys), rs)):
            try:
                self.chunks.append(torch.empty((n, rs), dtype=torch.uint8, pin_memory=self.pinned))
            except RuntimeError as e:  # cudaHostAlloc / malloc refused: too little (lockable) RAM
                raise MoepackError(
                    f"cannot allocate {format_size(n * rs)} of {'pinned ' if self.pinned else ''}host memory "
                    f"for experts ({' '.join(str(e).split())[:80]})",
                    hint="pass a smaller --host-memory: the experts that do not fit are read from the file",
                ) from None
            for r in range(n):
                self._where[keys[i]] = (c, r)
                i += 1
        self.arena_bytes = sum(t.numel() for t in self.chunks)
        self.missing = len(all_keys) - len(keys)
        self.fill_s = self._fill(keys, progress)

        self._staging: list[torch.Tensor] = []
        self._free = deque()
        self._release: list = []
        if self.missing:
            for b in range(max(1, staging)):
                self._staging.append(torch.empty(rs, dtype=torch.uint8, pin_memory=self.pinned))
                self._release.append(None)
                self._free.append(b)

    # -- the arena ------------------------------------------------------------------------
    def _fill(self, keys: list[Key], progress: bool) -> float:
        rs = self.record_size
        pieces = []  # (chunk, first row, rows, file offset), merged while file and arena are both contiguous
        for k in keys:
            c, r = self._where[k]
            off = self._file_offset[k]
            if pieces:
                pc, pr, pn, po = pieces[-1]
                if pc == c and pr + pn == r and po + pn * rs == off and (pn + 1) * rs <= READ_BYTES:
                    pieces[-1] = (pc, pr, pn + 1, po)
                    continue
            pieces.append((c, r, 1, off))
        total = len(keys) * rs
        t0 = time.perf_counter()
        try:
            os.posix_fadvise(self._fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except (AttributeError, OSError):
            pass
        views = [memoryview(t.numpy()).cast("B") for t in self.chunks]
        part = f" ({len(keys)} of {len(keys) + self.missing}; the rest read from the file)" if self.missing else ""
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="experts -> host RAM" + part,
                   disable=not progress or total < (512 << 20))

        def read(piece) -> int:
            c, r, n, off = piece
            _pread_into(self._fd, views[c][r * rs:(r + n) * rs], off)
            return n * rs

        try:
            for n in self._pool.map(read, pieces):
                bar.update(n)
        except OSError as e:
            raise MoepackError(f"{self.file.path}: reading experts failed ({e.strerror})") from None
        finally:
            bar.close()
        return time.perf_counter() - t0

    @property
    def resident_count(self) -> int:
        return len(self._where)

    def is_resident(self, key: Key) -> bool:
        return key in self._where

    def view(self, key: Key) -> torch.Tensor | None:
        """The record of a resident expert (uint8 [record_size], pinned when CUDA), else None."""
        v = self._views.get(key)
        if v is None:
            w = self._where.get(key)
            if w is None:
                return None
            # made once: a decode step asks for the same views several times, at ~1 us each
            v = self._views[key] = self.chunks[w[0]][w[1]]
        return v

    # -- on-demand reads --------------------------------------------------------------------
    def has_free_staging(self) -> bool:
        return bool(self._free)

    def read_async(self, key: Key) -> PendingRead:
        """Start reading a non-resident expert into a free staging buffer (the caller checks
        has_free_staging first and frees one by consuming an older read otherwise)."""
        if not self._free:
            raise RuntimeError("no free staging buffer")
        b = self._free.popleft()
        after, self._release[b] = self._release[b], None
        fut = self._pool.submit(self._read, key, b, after)
        return PendingRead(key, b, fut)

    def _read(self, key: Key, b: int, after) -> None:
        if after is not None:  # the previous copy out of this buffer has finished
            if self._cuda_index is None:
                after.synchronize()
            else:
                with torch.cuda.device(self._cuda_index):
                    after.synchronize()
        t = time.perf_counter()
        _pread_into(self._fd, memoryview(self._staging[b].numpy()).cast("B"), self._file_offset[key])
        with self._lock:
            self.file_reads += 1
            self.file_read_bytes += self.record_size
            self.file_read_s += time.perf_counter() - t

    def staged(self, pending: PendingRead) -> torch.Tensor:
        """Wait for a read and return its staging buffer."""
        try:
            pending.future.result()
        except OSError as e:
            raise MoepackError(f"{self.file.path}: reading expert {pending.key} failed ({e.strerror})") from None
        return self._staging[pending.buf]

    def release(self, pending: PendingRead, after=None) -> None:
        """Give a staging buffer back; `after` (the copy out of it) must finish before it is reused."""
        pending.future.result()
        self._release[pending.buf] = after
        self._free.append(pending.buf)

    def stats(self) -> dict:
        return {
            "host_resident_experts": self.resident_count,
            "host_streamed_experts": self.missing,
            "host_arena_bytes": self.arena_bytes,
            "host_pinned": self.pinned,
            "host_fill_s": self.fill_s,
            "file_reads": self.file_reads,
            "file_read_bytes": self.file_read_bytes,
            "file_read_s": self.file_read_s,
        }

    def reset_stats(self) -> None:
        with self._lock:
            self.file_reads = self.file_read_bytes = 0
            self.file_read_s = 0.0

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.chunks, self._staging, self._views = [], [], {}


def available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# Without --host-memory: every expert in RAM where they take at most RAM_FIT of the RAM available,
# else as many as RAM_SHARE of it holds (the rest read from the file on demand), so a machine
# with less RAM than the experts (a free Colab: 12.7 GB against Mixtral's ~14.4 GB at 2 bits)
# runs on its defaults, as llama.cpp's mmap does.
RAM_FIT, RAM_SHARE = 0.9, 0.8


def plan_host(header: Header, host_memory: int | None, *, pinned: bool, staging: int,
              ram: int | None = None) -> list[Key] | None:
    """The experts to keep in RAM (None: all of them) for --host-memory, or without it for the
    RAM available (`ram`, default: MemAvailable; see RAM_FIT). A ConfigError when the budget
    cannot even hold the staging buffers that reading from the file needs."""
    c = header.config
    rs, total = header.expert_layout.record_size, c.num_hidden_layers * c.num_local_experts
    given = host_memory is not None
    if given:
        budget = f"--host-memory {format_size(host_memory)}"
    else:
        ram = available_ram() if ram is None else ram
        if ram is None or arena_bytes(total, rs, pinned) <= RAM_FIT * ram:
            return None
        host_memory = int(RAM_SHARE * ram)
        budget = f"{RAM_SHARE:.0%} of the {format_size(ram)} of RAM available ({format_size(host_memory)})"
    n = host_capacity(host_memory, rs, total, staging, pinned)
    if n < 0:
        need = staging * (pow2_ceil(rs) if pinned else rs)
        raise ConfigError(
            f"{budget} cannot hold the {staging} staging buffers of "
            f"{format_size(rs)} that streaming experts from the file needs ({format_size(need)})",
            hint=f"pass --host-memory {format_size(need)} or more" + ("" if given else " (RAM allowing), or free RAM"),
        )
    return None if n >= total else choose_resident(header, n)
