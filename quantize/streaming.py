"""`moe-pack quantize REPO --low-disk`: a Hub checkpoint's shards downloaded one at a time, each
deleted once the last tensor the plan reads from it is quantized.

Why: Mixtral-8x7B's 19 shards take 93 GB, more than a free Colab's disk. The plan (record
order, names, dtypes, shapes) needs only the shards' safetensors headers, which the Hub serves
without the data (huggingface_hub.get_safetensors_metadata). Records are written in file order
(embeddings, then layer by layer), which reads the shards almost in order: on disk are the
shards of the current layer. A non-expert record that a shard's other records leave far behind
(lm_head, in a repo that stores it in its first shard) is encoded early, while that shard is on
disk for its other records, and held in RAM until its place in the file: its shard would
otherwise stay on disk through the whole model. The price: the shards are not kept in the
Hugging Face cache, so a second run downloads them again.
"""

from __future__ import annotations

import shutil
import tempfile
from math import prod
from pathlib import Path
from typing import Callable

from formats.errors import SourceError

from .tensors import ExpertItem, Headers, TensorItem, read_safetensors_header


def _hub_error(src: str, what: str, e: Exception) -> SourceError:
    first = str(e).splitlines()[0][:120] if str(e) else ""
    return SourceError(f"{src}: {what} from the Hugging Face Hub failed ({type(e).__name__}: {first})",
                       hint="check the repo id and the network; for gated repos run `huggingface-cli login` first")


def hub_headers(src: str, revision: str | None) -> Headers:
    """Every shard's tensor names, dtypes and shapes, read from the Hub without the data."""
    import huggingface_hub

    try:
        meta = huggingface_hub.get_safetensors_metadata(src, revision=revision)
    except Exception as e:  # the Hub client raises many types: all mean "cannot read the headers"
        raise _hub_error(src, "reading the safetensors headers", e) from None
    return {shard: {name: (t.dtype, tuple(t.shape)) for name, t in fm.tensors.items()}
            for shard, fm in meta.files_metadata.items()}


def hub_fetch(src: str, revision: str | None, shard: str, folder: Path) -> Path:
    """One shard downloaded into `folder` (not the Hugging Face cache, so deleting it frees the disk)."""
    import huggingface_hub

    try:
        return Path(huggingface_hub.hf_hub_download(src, shard, revision=revision, local_dir=folder))
    except Exception as e:
        raise _hub_error(src, f"downloading {shard}", e) from None


# The most source bytes of early-encoded records (see StreamedShards) held in RAM: Mixtral's
# lm_head is 262 MB in bfloat16; a record over this stays in place and keeps its shard on disk.
EARLY_BYTES = 1 << 30
_DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8}


def shards_of(item: TensorItem | ExpertItem) -> set[str]:
    refs = [item.ref] if isinstance(item, TensorItem) else [ref for _, ref in item.refs]
    return {ref.shard for ref in refs}


class StreamedShards:
    """The shards a plan reads, on disk only between their first and last use.

    need(i) before item i is read downloads its shards; done(i) after it is written deletes
    the shards no later item reads. `fetch(shard, folder) -> path` downloads one shard.
    early[i]: non-expert items to encode right after item i, while their shard is on disk for
    item i, instead of at their own place, which no other item near it reads that shard for."""

    def __init__(self, plan: list[TensorItem | ExpertItem], headers: Headers, parent: Path,
                 fetch: Callable[[str, Path], Path]):
        self.plan, self.headers, self.fetch = plan, headers, fetch
        self.reads: list[set[str]] = [shards_of(item) for item in plan]  # on disk while item i is read
        self.early: dict[int, list[int]] = {}
        self._plan_early()
        self.last_use: dict[str, int] = {}
        for i, reads in enumerate(self.reads):
            for shard in reads:
                self.last_use[shard] = i
        # beside the output: the same disk the user chose for it, removed by close() whatever happens
        self.folder = Path(tempfile.mkdtemp(prefix=".moepack-shards-", dir=parent))
        self.present: dict[str, int] = {}  # shard -> bytes on disk
        self.peak_bytes = self.peak_shards = 0

    def _plan_early(self) -> None:
        """Move each shard's last reader to its reader before, while that last reader is a
        non-expert record, items lie between the two, and the held bytes stay within EARLY_BYTES."""
        users: dict[str, list[int]] = {}
        for i, reads in enumerate(self.reads):
            for shard in reads:
                users.setdefault(shard, []).append(i)
        held = 0
        for shard in sorted(users):
            u = users[shard]
            while len(u) >= 2 and isinstance(self.plan[u[-1]], TensorItem) and u[-1] - u[-2] > 1:
                item = self.plan[u[-1]]
                dtype, _ = self.headers[shard][item.ref.name]
                size = _DTYPE_BYTES.get(dtype, 8) * prod(item.ref.shape)
                if held + size > EARLY_BYTES:
                    break
                held += size
                j = u.pop()
                # with the records moved to j before it: j no longer reads at its own place
                self.early.setdefault(u[-1], []).extend([j] + self.early.pop(j, []))
                self.reads[j] = set()

    def need(self, i: int) -> None:
        for shard in sorted(self.reads[i] - set(self.present)):
            path = self.fetch(shard, self.folder)
            # the plan was checked against the headers read at the start: a shard that changed on
            # the Hub since (a new commit) would be read with the old shapes
            if read_safetensors_header(path) != self.headers[shard]:
                raise SourceError(f"{shard} as downloaded differs from the header read when the run started",
                                  hint="the repo changed meanwhile: run again, or pin --revision to a commit")
            self.present[shard] = path.stat().st_size
            self.peak_bytes = max(self.peak_bytes, sum(self.present.values()))
            self.peak_shards = max(self.peak_shards, len(self.present))

    def done(self, i: int) -> None:
        for shard in [s for s in self.present if self.last_use[s] <= i]:
            (self.folder / shard).unlink(missing_ok=True)
            del self.present[shard]

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.present.clear()

    def __enter__(self) -> "StreamedShards":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

