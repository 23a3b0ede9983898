"""The embedding table in host RAM (load_model(embed_on_host=True), what offloading on CUDA
does): the same logits, the table off the device, and the memory plan's arithmetic."""

from __future__ import annotations

import pytest
import torch

from formats.reader import MoepackFile
from formats.synthetic import write_synthetic
from runtime.loader import load_model
from runtime.offload import options
from runtime.offload.budget import GiB, MiB, embed_table_bytes, non_expert_bytes, plan_memory
from runtime.offload.options import OffloadOptions, model_bytes, preflight

from .offload_cases import CTX, EXPERTS, LAYERS, PROMPT, assert_same, greedy
from .test_offload_helpers import RECIPE_4_2, tiny_config, tiny_file, tiny_header


@pytest.fixture(scope="module")
def tiny_path(tmp_path_factory):
    return tiny_file(tmp_path_factory.mktemp("embed-host"), LAYERS, EXPERTS)


def test_host_table_gives_the_same_logits(tiny_path):
    ref = greedy(load_model(tiny_path, "cpu", torch.float32, ctx=CTX)[0])
    model, _ = load_model(tiny_path, "cpu", torch.float32, ctx=CTX, embed_on_host=True)
    assert model.embed_on_host and model.embed.device.type == "cpu"
    assert_same(ref, greedy(model), tol=0.0)  # the same rows, gathered on the host


def test_host_table_takes_tokens_from_anywhere(tiny_path):
    """A token tensor of any integer dtype on the host gives the rows of the device-side lookup."""
    model, _ = load_model(tiny_path, "cpu", torch.float32, ctx=CTX, embed_on_host=True)
    tokens = PROMPT[:5].to(torch.int32)
    want = torch.nn.functional.embedding(PROMPT[:5], model.embed).to(model.dtype)
    assert torch.equal(model.embed_tokens(tokens), want)


def test_tied_embeddings_stay_on_the_device(tmp_path):
    """A tied table is the lm_head's matrix: the flag is ignored, in the model and the plan."""
    cfg = tiny_config(2, 4, tie_word_embeddings=True)
    path = write_synthetic(tmp_path / "tied.moepack", cfg, RECIPE_4_2, seed=1)
    model, file = load_model(path, "cpu", torch.float32, ctx=CTX, embed_on_host=True)
    assert not model.embed_on_host
    h = file.header
    assert embed_table_bytes(h, 2) == 0
    assert non_expert_bytes(h, 2, embed_on_host=True) == non_expert_bytes(h, 2)
    assert not plan_memory(h, GiB, context_tokens=CTX, embed_on_host=True).embed_on_host


def test_plan_without_the_table_buys_its_bytes_in_slots():
    """Mixtral-8x7B: the fp16 table is 262 MB, ~4-5 slots of a 2-bit expert."""
    h = tiny_header(mixtral=True)
    table = embed_table_bytes(h, 2)
    assert table == 32000 * 4096 * 2
    assert non_expert_bytes(h, 2) - non_expert_bytes(h, 2, embed_on_host=True) == table
    kw = dict(context_tokens=4096, dtype_bytes=2, reserve_bytes=512 * MiB, fused=True)
    on_device, on_host = plan_memory(h, 12 * GiB, **kw), plan_memory(h, 12 * GiB, embed_on_host=True, **kw)
    assert on_device.fixed_bytes - on_host.fixed_bytes == table
    rs = h.expert_layout.record_size
    assert on_host.n_slots - on_device.n_slots in (table // rs, table // rs + 1)
    assert on_host.embed_on_host and "embeddings in host RAM" in on_host.describe()
    assert on_host.to_json()["embed_on_host"] is True


def test_model_bytes_counts_the_device_only(tiny_path):
    """What the factory re-plans with: a table in host RAM is not device memory. (On the CPU the
    host is the device, so the model pretends to live on the meta device.)"""
    model, _ = load_model(tiny_path, "cpu", torch.float32, ctx=CTX, embed_on_host=True)
    full = model_bytes(model)
    model.device = torch.device("meta")
    assert model_bytes(model) == 0  # every tensor is on the CPU, none on "the device"
    model.device = torch.device("cpu")
    assert model_bytes(model) == full


def test_preflight_stays_resident_only_if_the_table_fits_too(tiny_path, monkeypatch):
    """Nothing asked and every expert fits: resident, with the table on the device. A budget
    that fits every expert only with the table in host RAM must offload (it would not fit)."""
    file = MoepackFile(tiny_path)
    h = file.header
    monkeypatch.setattr(options, "embeds_on_host", lambda device: True)
    probe = plan_memory(h, 1 << 40, context_tokens=CTX, dtype_bytes=4, embed_on_host=True)
    all_experts = probe.fixed_bytes + probe.total_experts * probe.record_size
    table = embed_table_bytes(h, 4)
    for budget, resident in [(all_experts + table, True), (all_experts + table - 1, False)]:
        monkeypatch.setattr(options, "_budget", lambda opts, device, b=budget: (b, 0))
        plan = preflight(file, OffloadOptions(), torch.device("cpu"), torch.float32, CTX)
        assert (plan is None) == resident, budget
        if plan is not None:
            assert plan.all_resident and plan.embed_on_host



def test_preflight_counts_the_resident_prompt_scratch(tiny_path, monkeypatch):
    """With the fused kernels a resident model's prompt dequantizes several experts at once
    (kernels.grouped_prompt_ffn): a budget that fits every expert but not that scratch
    offloads, and Mixtral-8x7B's scratch is four experts' w1 and w3 in fp16."""
    from runtime.kernels.expert import prompt_chunk_experts
    from runtime.offload.budget import grouped_prompt_extra

    mixtral = tiny_header(mixtral=True)
    matrix = 4096 * 14336 * 2
    assert prompt_chunk_experts(14336, 4096, 2) == 4
    assert grouped_prompt_extra(mixtral, 2, 4) == 8 * matrix - matrix
    file = MoepackFile(tiny_path)
    h = file.header
    c = h.config
    extra = grouped_prompt_extra(h, 4, prompt_chunk_experts(c.intermediate_size, c.hidden_size, 4))
    assert extra == (2 * h.config.num_local_experts - 1) * h.config.hidden_size * h.config.intermediate_size * 4
    monkeypatch.setattr(options, "fused_kernels", lambda device: True)
    probe = plan_memory(h, 1 << 40, context_tokens=CTX, dtype_bytes=4, fused=True)
    all_experts = probe.fixed_bytes + probe.total_experts * probe.record_size
    for budget, resident in [(all_experts + extra, True), (all_experts + extra - 1, False)]:
        monkeypatch.setattr(options, "_budget", lambda opts, device, b=budget: (b, 0))
        plan = preflight(file, OffloadOptions(), torch.device("cpu"), torch.float32, CTX)
        assert (plan is None) == resident, budget
