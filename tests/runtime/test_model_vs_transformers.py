"""The runtime's Mixtral against transformers' MixtralForCausalLM (float32, CPU) carrying
exactly the weights the file decodes to: logits and greedy continuations."""

from __future__ import annotations

import pytest
import torch

from formats import MoepackFile
from runtime.loader import load_model
from runtime.qlinear import DenseLinear, QuantLinear
from tests.runtime.packing_helpers import CPU_KERNEL_TOL, RECIPE_4_2, reference_model, write_moepack
from tests.tiny import make_tiny_checkpoint

PROMPT = [1, 17, 250, 33, 100, 5, 77, 200, 4, 9, 18, 300, 64, 2, 123, 45]
GREEDY_STEPS = 32


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def reference_greedy(ref, prompt: list[int], steps: int) -> list[int]:
    with torch.no_grad():
        out = ref.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=steps, min_new_tokens=steps,
                           attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def runtime_greedy(model, prompt: list[int], steps: int) -> list[int]:
    logits = model(torch.tensor(prompt), 0, last_only=True)
    out = [int(logits[-1].argmax())]
    for i in range(steps - 1):
        out.append(int(model(torch.tensor([out[-1]]), len(prompt) + i, last_only=True)[-1].argmax()))
    return out


@pytest.fixture(scope="module", params=["16", "4/2", "4/3", "4/2m4"])
def case(request, packed_files, tiny_checkpoint):
    file = MoepackFile(packed_files[request.param])
    ref = reference_model(tiny_checkpoint, file)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    return request.param, file, ref, ref_logits


@pytest.mark.parametrize("dequantize_at_load", [False, True])
def test_logits_match_transformers(case, dequantize_at_load):
    name, file, _, ref_logits = case
    model, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64, dequantize_at_load=dequantize_at_load)
    # q, k and v stacked where their layouts allow (Attention.fuse_qkv): not the tiny 4/2 file,
    # whose 8-bit meta groups straddle the tiny q and k
    assert all((layer.attn.qkv_proj is None) == (name.startswith("4/2") and not dequantize_at_load) for layer in model.layers)
    kinds = {type(layer.attn.qkv_proj or layer.attn.q_proj) for layer in model.layers}
    assert kinds == {QuantLinear if name != "16" and not dequantize_at_load else DenseLinear}
    logits = model(torch.tensor(PROMPT), 0)
    assert logits.dtype == torch.float32 and logits.shape == (len(PROMPT), file.config.vocab_size)
    assert rel_err(logits, ref_logits) < 1e-3
    # one row reaches lm_head's CPU kernel (int16 activations), the whole prompt its dequantize path
    last = model(torch.tensor(PROMPT), 0, last_only=True)[0]
    torch.testing.assert_close(last, logits[-1], rtol=CPU_KERNEL_TOL, atol=CPU_KERNEL_TOL)


def test_greedy_tokens_match_transformers(case):
    _, file, ref, _ = case
    model, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64)
    assert runtime_greedy(model, PROMPT, GREEDY_STEPS) == reference_greedy(ref, PROMPT, GREEDY_STEPS)


def test_fp16_file_matches_the_original_checkpoint(file16, tiny_checkpoint):
    """The 16/16 file against transformers loading the checkpoint folder itself."""
    ref = reference_model(tiny_checkpoint)
    model, _ = load_model(file16, torch.device("cpu"), torch.float32, ctx=64)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    assert rel_err(model(torch.tensor(PROMPT), 0), ref_logits) < 1e-3


def test_quantized_file_is_a_different_model(file16, file42):
    """Guards the comparisons above: they would pass vacuously if quantization changed nothing."""
    a, _ = load_model(file16, torch.device("cpu"), torch.float32, ctx=64)
    b, _ = load_model(file42, torch.device("cpu"), torch.float32, ctx=64)
    assert rel_err(b(torch.tensor(PROMPT), 0), a(torch.tensor(PROMPT), 0)) > 0.05


def test_sliding_window_and_tied_embeddings(tmp_path):
    """A window shorter than the prompt, and lm_head tied to the embeddings."""
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=3, shards=1, sliding_window=5, tie_word_embeddings=True)
    file = MoepackFile(write_moepack(ckpt, tmp_path / "sw.moepack", RECIPE_4_2))
    assert file.config.sliding_window == 5 and file.config.tie_word_embeddings
    ref = reference_model(ckpt, file)
    model, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    assert rel_err(model(torch.tensor(PROMPT), 0), ref_logits) < 1e-3
    assert runtime_greedy(model, PROMPT, 12) == reference_greedy(ref, PROMPT, 12)
    assert model.lm_head.weight.data_ptr() == model.embed.data_ptr()  # one matrix for both


def test_tied_embeddings_kept_fp16_on_the_cpu(tmp_path, monkeypatch):
    """A tied fp16 embedding over qlinear.HALF_CPU_LIMIT: one fp16 matrix serves the lm_head
    (the C GEMV, when a compiler is there) and the embedding (rows widened): the logits of the
    dense load to float32 rounding, hence its tokens, and transformers' logits. (Greedy tokens
    against transformers would test this seed's near-ties, which the dense load flips too.)"""
    from runtime import qlinear
    from runtime.cpu_expert import _native

    if _native() is None:
        pytest.skip("no compiled CPU kernel here")
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", seed=3, shards=1, tie_word_embeddings=True)
    file = MoepackFile(write_moepack(ckpt, tmp_path / "tied.moepack", RECIPE_4_2))
    ref = reference_model(ckpt, file)
    dense, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64)
    monkeypatch.setattr(qlinear, "HALF_CPU_LIMIT", 0)
    model, _ = load_model(file, torch.device("cpu"), torch.float32, ctx=64)
    assert isinstance(model.lm_head, qlinear.HalfLinear) and model.embed.dtype == torch.float16
    assert model.lm_head.weight16.data_ptr() == model.embed.data_ptr()
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    logits = model(torch.tensor(PROMPT), 0)
    assert rel_err(logits, ref_logits) < 1e-3
    torch.testing.assert_close(logits, dense(torch.tensor(PROMPT), 0), rtol=1e-5, atol=1e-5)
    assert runtime_greedy(model, PROMPT, 12) == runtime_greedy(dense, PROMPT, 12)
