"""The quantize pipeline's guarantees: both expert layouts give the same bytes, the same
inputs give the same bytes, failures leave nothing behind, one tensor is loaded at a time."""

from __future__ import annotations

import json
import weakref
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors.torch import save_file

import quantize.convert as convert
from formats.errors import SourceError
from quantize.convert import quantize_checkpoint
from quantize.recipe import QuantRecipe
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import checkpoint_tensors, copy_checkpoint, packed, run_cli, sha256

A4E2 = ("--attn-bits", "4", "--expert-bits", "2")


def write_fused_checkpoint(src: Path, dst: Path) -> Path:
    """The tiny checkpoint re-saved the way transformers >= 5 keeps Mixtral in memory:
    `mlp.experts.gate_up_proj` [E, 2I, H] (= cat(w1, w3) per expert), `down_proj` [E, H, I],
    router `mlp.gate.weight`; two shards with an index."""
    cfg = json.loads((src / "config.json").read_text())
    L, E = cfg["num_hidden_layers"], cfg["num_local_experts"]
    tensors = {k: torch.from_numpy(v).half() for k, v in checkpoint_tensors(src).items()}
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if ".block_sparse_moe.experts." not in name:
            out[name.replace(".block_sparse_moe.gate.", ".mlp.gate.")] = t
    for layer in range(L):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{p}{e}.w1.weight"], tensors[f"{p}{e}.w3.weight"]]) for e in range(E)])
        out[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack([tensors[f"{p}{e}.w2.weight"] for e in range(E)])
    dst.mkdir(parents=True)
    names = sorted(out)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for shard, keys in halves.items():
        save_file({k: out[k].contiguous() for k in keys}, dst / shard, metadata={"format": "pt"})
    weight_map = {k: shard for shard, keys in halves.items() for k in keys}
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


def test_fused_layout_gives_the_same_bytes(tmp_path, tiny_checkpoint, monkeypatch):
    # Same relative SRC in two folders: the header records SRC, so the files can be byte-identical.
    copy_checkpoint(tiny_checkpoint, tmp_path / "a" / "ckpt")
    write_fused_checkpoint(tiny_checkpoint, tmp_path / "b" / "ckpt")
    for d in ("a", "b"):
        monkeypatch.chdir(tmp_path / d)
        r = run_cli("quantize", "ckpt", "-o", "out.moepack", "-q", *A4E2)
        assert r.exit_code == 0, r.stderr
    assert sha256(tmp_path / "a" / "out.moepack") == sha256(tmp_path / "b" / "out.moepack")


def test_fused_layout_with_wrong_shape_is_a_source_error(tmp_path, tiny_checkpoint):
    src = write_fused_checkpoint(tiny_checkpoint, tmp_path / "fused")
    cfg = json.loads((src / "config.json").read_text())
    cfg["intermediate_size"] = 64  # the tensors hold 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SourceError, match=r"gate_up_proj in shard model-0000\d-of-00002.safetensors has shape \[4, 256, 64\], config.json implies \[4, 128, 64\]"):
        quantize_checkpoint(str(src), tmp_path / "x.moepack", progress=False)


def test_checkpoint_without_index(tmp_path_factory, tiny_checkpoint, tmp_path):
    """No model.safetensors.index.json: the shards' own headers say where each tensor is."""
    from formats.reader import MoepackFile

    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    (src / "model.safetensors.index.json").unlink()
    out = tmp_path / "noindex.moepack"
    quantize_checkpoint(str(src), out, QuantRecipe(attn_bits=16, expert_bits=16), progress=False)
    ref = packed(tmp_path_factory, tiny_checkpoint, "--attn-bits", "16", "--expert-bits", "16")
    with MoepackFile(out) as a, MoepackFile(ref) as b:
        ha, hb = a.header.to_json(), b.header.to_json()
        assert ha.pop("quantizer")["source"] == str(src) and hb.pop("quantizer")["source"] == str(tiny_checkpoint)
        assert ha == hb and bytes(a.data) == bytes(b.data)


def test_same_inputs_same_bytes(tmp_path_factory, tiny_checkpoint, tmp_path):
    first = packed(tmp_path_factory, tiny_checkpoint, *A4E2)
    threads = torch.get_num_threads()
    torch.set_num_threads(2 if threads == 1 else 1)  # a different thread count must not change a byte either
    try:
        r = run_cli("quantize", tiny_checkpoint, "-o", tmp_path / "again.moepack", "-q", *A4E2)
    finally:
        torch.set_num_threads(threads)
    assert r.exit_code == 0, r.stderr
    assert sha256(first) == sha256(tmp_path / "again.moepack")


class Boom(RuntimeError):
    pass


def _fail_after(monkeypatch, n_calls: int, exc: type[BaseException]):
    real = convert.encode_tensor
    calls = {"n": 0}

    def encode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n_calls:
            raise exc("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(convert, "encode_tensor", encode)
    return calls


def test_failure_mid_quantize_leaves_no_files(tmp_path, tiny_checkpoint, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    calls = _fail_after(monkeypatch, 8 + 3 * 5, Boom)  # embeddings + layer 0 tensors, then 5 experts
    with pytest.raises(Boom):
        quantize_checkpoint(str(tiny_checkpoint), out / "m.moepack", QuantRecipe(), progress=False)
    assert calls["n"] == 8 + 3 * 5 + 1
    assert list(out.iterdir()) == []


def test_interrupt_keeps_the_old_file(tmp_path, tiny_checkpoint, monkeypatch):
    """Ctrl-C while replacing an existing OUT: the old file is untouched, no temporaries remain."""
    out = tmp_path / "m.moepack"
    out.write_bytes(b"previous contents")
    _fail_after(monkeypatch, 20, KeyboardInterrupt)
    r = run_cli("quantize", tiny_checkpoint, "-o", out, "-q", "--attn-bits", "16", "--expert-bits", "16")
    assert r.exit_code == 1 and "Aborted" in r.stderr and "Traceback" not in r.stderr
    assert out.read_bytes() == b"previous contents"
    assert [p.name for p in tmp_path.iterdir()] == ["m.moepack"]


class LoadTracker:
    """Wraps safetensors.safe_open: every tensor it hands out is tracked with a weak reference."""

    def __init__(self, real):
        self.real, self.refs, self.loads, self.max_alive_at_load = real, [], 0, 0

    def track(self, t: torch.Tensor) -> torch.Tensor:
        alive = sum(r() is not None for r in self.refs)
        self.max_alive_at_load = max(self.max_alive_at_load, alive)
        self.refs.append(weakref.ref(t))
        self.loads += 1
        return t

    def __call__(self, *args, **kwargs):
        tracker, handle = self, self.real(*args, **kwargs)

        class Slice:
            def __init__(self, s):
                self.s = s

            def __getitem__(self, idx):
                return tracker.track(self.s[idx])

            def __getattr__(self, name):
                return getattr(self.s, name)

        class Handle:
            def __enter__(self):
                handle.__enter__()
                return self

            def __exit__(self, *exc):
                return handle.__exit__(*exc)

            def get_tensor(self, name):
                return tracker.track(handle.get_tensor(name))

            def get_slice(self, name):
                return Slice(handle.get_slice(name))

            def get_tensors(self):
                return {k: tracker.track(v) for k, v in handle.get_tensors().items()}

            def __getattr__(self, name):
                return getattr(handle, name)

        return Handle()


@pytest.fixture
def tracker(monkeypatch):
    t = LoadTracker(safetensors.safe_open)
    monkeypatch.setattr(safetensors, "safe_open", t)
    monkeypatch.setattr(safetensors.torch, "safe_open", t)  # what load_file() would use
    return t


def test_tracker_sees_tensors_kept_alive(tracker, tiny_checkpoint):
    """The check below can fail: holding two loaded tensors is detected."""
    from quantize.tensors import ShardIndex, load

    idx = ShardIndex(tiny_checkpoint)
    kept = [load(tiny_checkpoint, idx.ref(n)) for n in ("model.norm.weight", "lm_head.weight")]
    assert tracker.max_alive_at_load == 1 and len(kept) == 2
    safetensors.torch.load_file(tiny_checkpoint / "model-00001-of-00003.safetensors")
    assert tracker.max_alive_at_load > 1


@pytest.mark.parametrize("fused", [False, True], ids=["per-expert", "fused"])
def test_streaming_one_tensor_at_a_time(tracker, tiny_checkpoint, tmp_path, fused):
    src = write_fused_checkpoint(tiny_checkpoint, tmp_path / "fused") if fused else tiny_checkpoint
    quantize_checkpoint(str(src), tmp_path / "m.moepack", QuantRecipe(attn_bits=16, expert_bits=16), progress=False)
    assert tracker.loads == 17 + 2 * 4 * 3  # every matrix read exactly once (3 shards, or 2 fused ones)
    assert tracker.max_alive_at_load == 0  # the previous tensor was freed before the next read
