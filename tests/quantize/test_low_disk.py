"""`moe-pack quantize REPO --low-disk`: shards fetched one at a time and deleted once read, the
plan made from headers alone, the same bytes as a full download (Hub faked: no network)."""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from formats.errors import SourceError
from quantize.streaming import StreamedShards, shards_of
from quantize.tensors import TensorItem, TensorRef, read_safetensors_header
from tests.quantize.helpers import assert_user_error, one_torch_thread, run_cli  # noqa: F401 (autouse fixture)
from tests.quantize.test_source import FakeHub

REPO = "someone/tiny-mixtral"
SHARDS = 5


@pytest.fixture(scope="module")
def five_shards(tmp_path_factory) -> Path:
    from tests.tiny import make_tiny_checkpoint

    return make_tiny_checkpoint(tmp_path_factory.mktemp("low-disk") / "tiny-mixtral", shards=SHARDS)


class FakeShardHub:
    """get_safetensors_metadata and hf_hub_download over a local folder, remembering which
    shards were on disk at each download."""

    def __init__(self, folder: Path):
        self.folder, self.fetched, self.on_disk = folder, [], []

    def metadata(self, repo_id, revision=None, **kw):
        assert repo_id == REPO
        files = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            tensors = {n: SimpleNamespace(dtype=d, shape=list(s)) for n, (d, s) in read_safetensors_header(path).items()}
            files[path.name] = SimpleNamespace(tensors=tensors)
        return SimpleNamespace(files_metadata=files)

    def download(self, repo_id, filename, revision=None, local_dir=None, **kw):
        assert repo_id == REPO and local_dir is not None
        dest = Path(local_dir) / filename
        shutil.copyfile(self.folder / filename, dest)
        self.fetched.append(filename)
        self.on_disk.append(sorted(p.name for p in Path(local_dir).glob("*.safetensors")))
        return str(dest)


@pytest.fixture
def hub(five_shards, monkeypatch):
    import huggingface_hub

    fake = FakeShardHub(five_shards)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(five_shards))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", fake.metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.download)
    return fake


def test_shards_come_one_at_a_time_and_the_bytes_equal_a_full_download(hub, five_shards, tmp_path):
    args = ("--attn-bits", "16", "--expert-bits", "16", "-q")
    full = run_cli("quantize", REPO, "-o", tmp_path / "full.moepack", *args)
    assert full.exit_code == 0, full.stderr
    assert hub.fetched == []  # the full run took snapshot_download's folder
    out = tmp_path / "low" / "low.moepack"
    out.parent.mkdir()
    r = run_cli("quantize", REPO, "-o", out, "--low-disk", *args)
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes() == (tmp_path / "full.moepack").read_bytes()
    shards = sorted(p.name for p in five_shards.glob("*.safetensors"))
    assert len(shards) >= SHARDS and sorted(hub.fetched) == shards  # each downloaded once
    # each shard is on disk from the first record that reads it to the last, and only then;
    # a non-expert record far after its shard's other readers is encoded with the one before
    # (this checkpoint, as transformers 5 saves it, keeps lm_head in the first shard)
    plan = _plan(five_shards)
    uses = {}
    for i, item in enumerate(plan):
        for shard in shards_of(item):
            uses.setdefault(shard, []).append(i)
    for u in uses.values():
        while len(u) > 1 and isinstance(plan[u[-1]], TensorItem) and u[-1] - u[-2] > 1:
            u.pop()
    assert uses[plan[-1].ref.shard][-1] < len(plan) - 2  # lm_head's shard goes early: the case is covered
    first = {s: min(u) for s, u in uses.items()}
    for shard, on_disk in zip(hub.fetched, hub.on_disk):
        now = first[shard]
        # a record's shards come in name order
        assert on_disk == sorted(s for s, u in uses.items() if (first[s], s) <= (now, shard) and now <= max(u)), shard
    assert max(len(d) for d in hub.on_disk) < len(shards)
    assert "shards" in r.stdout and "on disk at once" in r.stdout
    assert [p.name for p in out.parent.iterdir()] == ["low.moepack"]  # the scratch folder is gone


def test_a_shard_held_only_for_lm_head_is_freed_unless_that_costs_too_much_ram(hub, five_shards, tmp_path, monkeypatch):
    args = ("--attn-bits", "4", "--expert-bits", "2", "-q")
    early = tmp_path / "early.moepack"
    assert run_cli("quantize", REPO, "-o", early, "--low-disk", *args).exit_code == 0
    lm_shard = _plan(five_shards)[-1].ref.shard
    assert lm_shard not in hub.on_disk[-1]  # gone before the last shard came
    hub.fetched.clear(), hub.on_disk.clear()
    monkeypatch.setattr("quantize.streaming.EARLY_BYTES", 0)  # lm_head over the cap: read in place
    late = tmp_path / "late.moepack"
    assert run_cli("quantize", REPO, "-o", late, "--low-disk", *args).exit_code == 0
    assert lm_shard in hub.on_disk[-1]
    assert early.read_bytes() == late.read_bytes()


def test_records_moved_early_follow_their_reader_when_it_moves(tmp_path):
    # shard a read by items 0, 2 and 4: 4 goes with 2, then both with 0; b is read in between
    def item(i, shard):
        return TensorItem(f"t{i}", "norms", None, (4,), TensorRef(f"t{i}", shard, (4,)))

    plan = [item(0, "a"), item(1, "b"), item(2, "a"), item(3, "b"), item(4, "a")]
    headers = {"a": {f"t{i}": ("BF16", (4,)) for i in (0, 2, 4)}, "b": {f"t{i}": ("F32", (4,)) for i in (1, 3)}}
    with StreamedShards(plan, headers, tmp_path, fetch=None) as s:
        assert s.early == {0: [2, 4], 1: [3]}
        assert s.last_use == {"a": 0, "b": 1}
        assert s.reads == [{"a"}, {"b"}, set(), set(), set()]


def _plan(folder: Path):
    from quantize.source import open_checkpoint
    from quantize.tensors import plan_records

    return plan_records(folder, open_checkpoint(str(folder)).config)


def test_a_shard_that_changed_on_the_hub_stops_the_run_and_leaves_nothing(hub, five_shards, tmp_path, monkeypatch):
    headers = hub.metadata(REPO)
    first = sorted(headers.files_metadata)[0]
    name = next(iter(headers.files_metadata[first].tensors))
    t = headers.files_metadata[first].tensors[name]
    t.dtype = "BF16" if t.dtype != "BF16" else "F16"  # what the plan was made from: as valid, but not the file
    monkeypatch.setattr("huggingface_hub.get_safetensors_metadata", lambda repo_id, **kw: headers)
    out = tmp_path / "x.moepack"
    with pytest.raises(SourceError, match=f"{first} as downloaded differs"):
        from quantize.convert import quantize_checkpoint
        from quantize.recipe import QuantRecipe

        quantize_checkpoint(REPO, out, QuantRecipe(attn_bits=16, expert_bits=16), progress=False, low_disk=True)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file, no shards folder


def test_low_disk_wants_a_hub_repo(five_shards, tmp_path):
    r = run_cli("quantize", str(five_shards), "-o", tmp_path / "x.moepack", "--low-disk")
    assert_user_error(r, "--low-disk", "local folder")


def test_unreadable_headers_are_a_source_error(five_shards, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(five_shards))
    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", offline)
    r = run_cli("quantize", REPO, "-o", tmp_path / "x.moepack", "--low-disk")
    assert_user_error(r, REPO, "safetensors headers", "OSError")
