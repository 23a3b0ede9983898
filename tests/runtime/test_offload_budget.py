"""Size parsing, the GPU memory plan and its refusal message, and the host tier's sizing."""

from __future__ import annotations

import re

import pytest

from formats.errors import ConfigError
from formats.header import ModelConfig
from runtime.offload.budget import GiB, MiB, format_size, kv_cache_bytes, non_expert_bytes, parse_size, plan_memory, split_slots
from runtime.offload.host import arena_bytes, choose_resident, chunk_records, host_capacity, plan_host, pow2_ceil
from runtime.offload.options import OffloadOptions

from .test_offload_helpers import tiny_header


@pytest.mark.parametrize("text, expected", [
    ("12GiB", 12 * GiB), ("12gib", 12 * GiB), ("800MB", 800 * 10**6), ("1.5G", int(1.5 * GiB)), ("4096", 4096),
    ("64 MiB", 64 * MiB), ("2T", 2 << 40), ("1e3", 1000), ("512k", 512 << 10), ("3GB", 3 * 10**9), (1024, 1024),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "12 parsecs", "-1G", "0", "1..5G", "nan", "1e400"])
def test_parse_size_rejects_with_the_option_name(text):
    with pytest.raises(ConfigError) as e:
        parse_size(text, "--host-memory")
    assert "--host-memory" in e.value.message and e.value.hint


def test_format_size():
    assert format_size(12 * GiB) == "12.00GiB"
    assert format_size(800 * MiB) == "800.0MiB"
    assert format_size(100) == "100B"


def test_plan_fills_the_rest_with_slots():
    h = tiny_header(layers=3, experts=8)
    rs = h.expert_layout.record_size
    small = plan_memory(h, 1 << 40, context_tokens=64, dtype_bytes=4, reserve_bytes=0)
    assert small.n_slots == small.total_experts == 24 and small.all_resident
    fixed = small.fixed_bytes
    assert fixed == non_expert_bytes(h, 4, context_tokens=64) + kv_cache_bytes(h, 64, 4) + small.workspace_bytes
    plan = plan_memory(h, fixed + 10 * rs + rs // 2, context_tokens=64, dtype_bytes=4)
    assert plan.n_slots == 10 and not plan.all_resident
    assert plan.min_slots == 3  # one slot per layer: the planner runs a layer's experts in waves
    assert plan_memory(h, plan.budget, context_tokens=64, dtype_bytes=4, policy="shared").min_slots == 2
    assert plan_memory(h, plan.budget, context_tokens=64, dtype_bytes=4, policy="shared-lfu").min_slots == 2
    assert plan_memory(h, plan.budget, context_tokens=64, dtype_bytes=4, policy="none").min_slots == 3 * 2


def test_too_small_budget_names_the_smallest_that_works():
    h = tiny_header(layers=3, experts=8)
    probe = plan_memory(h, 1 << 40, context_tokens=128, dtype_bytes=2, reserve_bytes=MiB)
    with pytest.raises(ConfigError) as e:
        plan_memory(h, probe.min_budget - 1, context_tokens=128, dtype_bytes=2, reserve_bytes=MiB, source="x.moepack")
    msg = e.value.message
    assert "--gpu-memory" in msg and "x.moepack" in msg and "3 expert slots" in msg and "one per layer" in msg
    smallest = re.search(r"smallest budget that works is (\S+)", msg).group(1)
    assert smallest in e.value.hint
    # the advertised budget really works, and is within 1% (+1 MiB rounding) of the exact minimum
    ok = plan_memory(h, parse_size(smallest), context_tokens=128, dtype_bytes=2, reserve_bytes=MiB)
    assert ok.n_slots >= ok.min_slots
    assert parse_size(smallest) <= probe.min_budget * 1.01 + MiB
    assert plan_memory(h, probe.min_budget, context_tokens=128, dtype_bytes=2, reserve_bytes=MiB).n_slots == 3
    # a budget a per-layer cache cannot run in, but a shared pool can: the hint says so
    with pytest.raises(ConfigError) as e:
        plan_memory(h, probe.min_budget - 1, context_tokens=128, dtype_bytes=2, reserve_bytes=MiB)
    assert "--cache-policy shared-lfu" in e.value.hint
    with pytest.raises(ConfigError) as e:  # below the shared minimum too: no such hint
        plan_memory(h, probe.fixed_bytes + 1, context_tokens=128, dtype_bytes=2, reserve_bytes=MiB)
    assert "shared" not in e.value.hint
    with pytest.raises(ConfigError, match="--cache-policy 'fifo'"):
        plan_memory(h, 1 << 40, context_tokens=128, dtype_bytes=2, policy="fifo")


def test_longer_context_needs_more_memory():
    h = tiny_header()
    a = plan_memory(h, 1 << 40, context_tokens=64, dtype_bytes=2)
    b = plan_memory(h, 1 << 40, context_tokens=4096, dtype_bytes=2)
    assert b.kv_cache_bytes == 64 * a.kv_cache_bytes and b.min_budget > a.min_budget


def test_mixtral_2bit_plan_is_plausible():
    """Real Mixtral-8x7B sizes: the 2-bit experts need ~66 MB slots and 12 GiB holds about half of them."""
    h = tiny_header(mixtral=True)
    plan = plan_memory(h, 12 * GiB, context_tokens=4096, dtype_bytes=2, reserve_bytes=512 * MiB)
    assert 66e6 < h.expert_layout.record_size < 70e6
    assert 100 < plan.n_slots < 160
    assert plan.min_budget < 8 * GiB


def test_split_slots():
    assert split_slots(10, 4) == [3, 3, 2, 2]
    assert sum(split_slots(97, 32)) == 97


@pytest.mark.parametrize("n, rs", [(0, 4096), (1, 4096), (256, 67_436_544), (37, 3 << 20), (1000, 12288)])
def test_arena_chunks_round_well(n, rs):
    chunks = chunk_records(n, rs)
    assert sum(chunks) == n and all(c >= 1 for c in chunks)
    for c in chunks:
        # pinned memory is rounded up to a power of two: each chunk wastes less than one record
        # (or less than its own size, for a single record)
        assert pow2_ceil(c * rs) - c * rs < max(rs, 1) or c == 1
    assert arena_bytes(n, rs, pinned=False) == n * rs


def test_host_capacity_and_choice():
    h = tiny_header(layers=4, experts=8, counts=True)
    rs = h.expert_layout.record_size
    assert host_capacity(10**12, rs, 32, staging=2, pinned=True) == 32
    n = host_capacity(12 * rs, rs, 32, staging=2, pinned=False)
    assert n == 10
    keys = choose_resident(h, 10)
    assert len(keys) == 10
    # by popularity: expert e of every layer has count 100 - e * 10, so low ids win
    assert set(keys) <= {(L, e) for L in range(4) for e in range(3)}
    h2 = tiny_header(layers=4, experts=8)
    assert choose_resident(h2, 10) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (3, 0), (3, 1)]
    assert plan_host(h, None, pinned=False, staging=2, ram=10**12) is None
    assert plan_host(h, None, pinned=False, staging=2, ram=36 * rs) is None  # 32 records in 90% of 36: all
    # the experts do not fit the RAM: as many as 80% of it holds (16 records, less 2 staging), by popularity
    assert plan_host(h, None, pinned=False, staging=2, ram=20 * rs) == choose_resident(h, 14)
    with pytest.raises(ConfigError, match="80% of the .* of RAM available .* cannot hold the 2 staging") as e:
        plan_host(h, None, pinned=False, staging=2, ram=2 * rs)
    assert "--host-memory" in e.value.hint and "free RAM" in e.value.hint
    assert plan_host(h, 10**12, pinned=False, staging=2) is None
    with pytest.raises(ConfigError, match="--host-memory .* staging"):
        plan_host(h, rs, pinned=False, staging=2)


def test_offload_options_from_cli():
    o = OffloadOptions.from_cli(gpu_memory="1.5G", host_memory="800MB", prefetch=1, cache_policy="shared", chat=True)
    assert (o.gpu_memory, o.host_memory, o.prefetch, o.cache_policy) == (int(1.5 * GiB), 800 * 10**6, 1, "shared")
    assert o.requested and not OffloadOptions().requested
    with pytest.raises(ConfigError, match="--gpu-memory"):
        OffloadOptions.from_cli(gpu_memory="lots")
    with pytest.raises(ConfigError, match="--cache-policy"):
        OffloadOptions(cache_policy="fifo")
    with pytest.raises(ConfigError, match="--prefetch"):
        OffloadOptions(prefetch=-1)


def test_tiny_header_config():
    assert isinstance(tiny_header().config, ModelConfig)


def test_click_options_round_trip():
    import click
    from click.testing import CliRunner

    from runtime.offload.options import offload_options

    seen = {}

    @click.command()
    @click.option("--other")
    @offload_options
    def cmd(other, **kw):
        seen["opts"] = OffloadOptions.from_cli(**kw)

    r = CliRunner().invoke(cmd, ["--gpu-memory", "6GiB", "--cache-policy", "shared", "--prefetch", "1", "--prefetch-layers", "2"])
    assert r.exit_code == 0, r.output
    assert seen["opts"] == OffloadOptions(gpu_memory=6 * GiB, cache_policy="shared", prefetch=1, prefetch_layers=2)
    r = CliRunner().invoke(cmd, [])
    # no --cache-policy: the default, which a small budget may turn into shared-lfu
    assert seen["opts"] == OffloadOptions(policy_given=False) and not seen["opts"].requested
    r = CliRunner().invoke(cmd, ["--hybrid", "--prefetch-w2", "--cpu-threads", "8"])
    assert r.exit_code == 0, r.output
    assert seen["opts"] == OffloadOptions(hybrid=True, prefetch_w2=True, cpu_threads=8, policy_given=False) and seen["opts"].requested
    r = CliRunner().invoke(cmd, ["--cache-policy", "layer"])
    assert seen["opts"] == OffloadOptions() and seen["opts"].policy_given and not seen["opts"].requested
    r = CliRunner().invoke(cmd, ["--no-offload"])
    assert seen["opts"].offload is False and not seen["opts"].requested


def test_fused_kernels_need_a_smaller_workspace():
    """With the fused kernels a prefill dequantizes one matrix at a time into one scratch
    buffer in the compute dtype: for Mixtral-8x7B ~0.9 GB less than the plain path's float32
    temporaries, i.e. ~13 more 2-bit expert slots in the same budget."""
    h = tiny_header(mixtral=True)
    plain = plan_memory(h, 12 * GiB, context_tokens=4096, dtype_bytes=2, reserve_bytes=512 * MiB)
    fused = plan_memory(h, 12 * GiB, context_tokens=4096, dtype_bytes=2, reserve_bytes=512 * MiB, fused=True)
    c = h.config
    largest = max([c.hidden_size * c.intermediate_size]
                  + [t.shape[0] * t.shape[1] for t in h.tensors if t.spec.quantized])
    assert plain.workspace_bytes - fused.workspace_bytes > 800 * 10**6
    assert fused.workspace_bytes >= largest * 2  # the scratch holds the largest quantized matrix
    assert fused.n_slots - plain.n_slots >= 12


def test_plan_minimums_tool(monkeypatch, capsys):
    """tools/plan_minimums.py (BENCHMARKS.md section 31): a per-layer cache needs half the slots
    of top-k per layer, and a shared pool runs in under 3 GiB, for Mixtral-8x7B's 2-bit experts."""
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "tools"))
    import plan_minimums

    rows = {(r["expert_meta_bits"], r["policy"]): r for r in plan_minimums.rows()}
    for meta in (8, 4):
        layer, shared, none = (rows[meta, p] for p in ("layer", "shared-lfu", "none"))
        assert (layer["min_slots"], shared["min_slots"], none["min_slots"]) == (32, 2, 64)
        assert shared["min_budget_gib"] < 3 < layer["min_budget_gib"] < none["min_budget_gib"] - 1.5
        assert layer["slots_at_gib"]["4"] is None and shared["slots_at_gib"]["4"] >= 2
    small = {(r["slots"], r["policy"]): r["hit_rate"] for r in plan_minimums.small_pools(sizes=(8,), tokens=40)}
    assert small[8, "shared"] == 0 < small[8, "shared-lfu"]  # fewer slots than layers: LRU thrashes
    monkeypatch.setattr(plan_minimums, "small_pools", lambda: [])
    assert plan_minimums.main([]) == 0 and "| 8-bit | layer | 32 |" in capsys.readouterr().out


def test_short_ram_offloads_part_of_the_experts_and_never_stops_a_resident_model(tmp_path, monkeypatch):
    """RAM smaller than the experts: a resident model still loads (its experts go from the
    file's map to the device, no host arena), and an offloaded one keeps what 80% of the RAM
    holds and reads the rest from the file, with no --host-memory."""
    import torch

    from formats.reader import MoepackFile
    from runtime.loader import load_model
    from runtime.offload import host
    from runtime.offload.options import make_backend_factory, preflight

    from .test_offload_helpers import tiny_file

    path = tiny_file(tmp_path, layers=2, experts=4)
    file = MoepackFile(path)
    rs = file.header.expert_layout.record_size
    opts = OffloadOptions(expert_slots=8, staging=2)
    monkeypatch.setattr(host, "available_ram", lambda: rs)  # not even the staging buffers
    assert preflight(file, OffloadOptions(), torch.device("cpu"), torch.float32, 32) is None
    with pytest.raises(ConfigError, match="RAM available .* cannot hold the 2 staging buffers"):
        preflight(file, opts, torch.device("cpu"), torch.float32, 32)
    monkeypatch.setattr(host, "available_ram", lambda: 6 * rs)  # 8 experts, RAM for 4.8
    assert preflight(file, opts, torch.device("cpu"), torch.float32, 32) is not None
    model, _ = load_model(file, "cpu", torch.float32, make_backend_factory(opts, ctx=32, progress=False), ctx=32)
    stats = model.experts.stats()
    assert (stats["host_resident_experts"], stats["host_streamed_experts"]) == (2, 6)  # 4.8 records less 2 staging
    model(torch.tensor([1, 2, 3]), 0)
    assert model.experts.stats()["file_reads"] > 0
    model.experts.close()
