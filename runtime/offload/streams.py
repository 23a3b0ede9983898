"""Host->device copies on a dedicated CUDA stream, the events that order them against compute,
and the timing of both. On the CPU the same calls run synchronously and the events are
no-ops, so the engine has one code path.

The three orderings the engine relies on (torch.cuda semantics, nothing implicit):
  * a copy into a slot starts only after the compute that last read the slot: the copy
    stream waits on that slot's "free" event, recorded on the compute stream after its last use;
  * compute reads a slot only after the copy into it: the compute stream waits on the
    copy's "ready" event (recorded on the copy stream right after the copy);
  * a pinned staging buffer is rewritten only after the copy out of it has finished: the
    reader thread synchronizes on that copy's event before reading the file into it.
None of these blocks the host; the only host waits are on file reads.
"""

from __future__ import annotations

import time
from collections import deque

import torch


class NullEvent:
    """An already-completed event (the CPU path)."""

    def record(self, stream=None) -> None:
        pass

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass


NULL_EVENT = NullEvent()


class CopyEngine:
    """Issues copies on the copy stream and keeps the transfer statistics."""

    # fold finished timing events once this many are outstanding, so long runs stay bounded
    _FOLD_AT = 256

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self._copies: deque = deque()  # (start, end, nbytes) timing events of issued copies
        self._stalls: deque = deque()  # (start, end) on the compute stream around a wait
        self.reset_stats()

    def reset_stats(self) -> None:
        if self.cuda:  # drop the timings of copies issued before the reset
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        self._copies.clear()
        self._stalls.clear()
        self.bytes = 0
        self.copies = 0
        self.busy_s = 0.0  # copy-stream busy time (sum of copy durations)
        self.stall_s = 0.0  # time the compute stream waited on copies
        self.stalls = 0

    def event(self):
        return torch.cuda.Event() if self.cuda else NULL_EVENT

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after=None):
        """Copy host `src` into device `dst` once `after` (an event on the compute stream) has
        completed; returns the event that marks the copy's end (wait on it before reading dst)."""
        n = src.numel() * src.element_size()
        self.bytes += n
        self.copies += 1
        if not self.cuda:
            t = time.perf_counter()
            dst.copy_(src)
            self.busy_s += time.perf_counter() - t
            return NULL_EVENT
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            if after is not None and after is not NULL_EVENT:
                self.stream.wait_event(after)
            start.record(self.stream)
            # src is pinned (arena or staging buffer), so this is a true async DMA
            dst.copy_(src, non_blocking=True)
            end.record(self.stream)
        self._copies.append((start, end, n))
        if len(self._copies) > self._FOLD_AT:
            self.fold()
        return end

    def pending_bytes(self) -> int:
        """Bytes of issued copies that have not finished: the link's queue. Copies finish in
        issue order on the one copy stream, so the newest unfinished ones are counted back to
        the first finished one (a few event queries, not one per copy)."""
        n = 0
        for _, end, nbytes in reversed(self._copies):
            if end.query():
                break
            n += nbytes
        return n

    def wait(self, ready) -> None:
        """Make the current (compute) stream wait for a copy, timing the stall if any."""
        if not self.cuda or ready is NULL_EVENT or ready.query():
            return
        compute = torch.cuda.current_stream(self.device)
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record(compute)
        compute.wait_event(ready)
        t1.record(compute)
        self._stalls.append((t0, t1))
        self.stalls += 1

    def mark_used(self):
        """An event on the compute stream after everything issued so far (a slot's last read)."""
        if not self.cuda:
            return NULL_EVENT
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        return ev

    def fold(self, wait: bool = False) -> None:
        """Add finished timing events to the totals (all of them after a sync if `wait`)."""
        if not self.cuda:
            return
        if wait:
            self.stream.synchronize()
            torch.cuda.current_stream(self.device).synchronize()
        while self._copies and self._copies[0][1].query():
            start, end, _ = self._copies.popleft()
            self.busy_s += start.elapsed_time(end) / 1e3
        while self._stalls and self._stalls[0][1].query():
            t0, t1 = self._stalls.popleft()
            self.stall_s += t0.elapsed_time(t1) / 1e3

    def synchronize(self) -> None:
        if self.cuda:
            self.stream.synchronize()

    def stats(self) -> dict:
        self.fold(wait=True)
        return {
            "bytes_copied": self.bytes,
            "copies": self.copies,
            "copy_busy_s": self.busy_s,
            "copy_gbps": self.bytes / self.busy_s / 1e9 if self.busy_s > 0 else 0.0,
            "compute_wait_s": self.stall_s,
            "compute_waits": self.stalls,
        }
