"""The transformers comparisons on a GPU in float16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from formats import MoepackFile
from runtime.loader import load_model
from tests.runtime.packing_helpers import reference_model

PROMPT = [1, 17, 250, 33, 100, 5, 77, 200, 4, 9, 18, 300, 64, 2, 123, 45]


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["16", "4/2", "4/3", "4/2m4"])
@pytest.mark.parametrize("dequantize_at_load", [False, True])
def test_cuda_float16_matches_transformers(packed_files, tiny_checkpoint, name, dequantize_at_load):
    file = MoepackFile(packed_files[name])
    ref = reference_model(tiny_checkpoint, file)
    with torch.no_grad():
        ref_logits = ref(torch.tensor([PROMPT])).logits[0]
    dev = torch.device("cuda")
    model, _ = load_model(file, dev, torch.float16, ctx=64, dequantize_at_load=dequantize_at_load)
    assert model.experts.records.device.type == "cuda"
    logits = model(torch.tensor(PROMPT, device=dev), 0).cpu()
    # per position: float16 can flip a near-tied top-2 routing choice of the tiny model at one
    # position (seen on the H100 at 4/2 with dequantize_at_load), which moves that row a lot
    row_err = (logits - ref_logits).norm(dim=-1) / ref_logits.norm(dim=-1)
    assert int((row_err >= 1e-2).sum()) <= 1, row_err
    assert float(row_err.median()) < 3e-3, row_err
    # decoding step by step through the cache agrees with the full pass
    steps = torch.cat([model(torch.tensor([t], device=dev), i) for i, t in enumerate(PROMPT)]).cpu()
    assert float((steps - logits).norm() / logits.norm()) < 1e-2
    # greedy tokens: compare the first few (float16 may flip a near tie later on)
    assert int(logits[-1].argmax()) == int(ref_logits[-1].argmax())


@pytest.mark.cuda
def test_cuda_generate_cli(capsys, packed_files):
    from runtime.generate import main

    assert main([str(packed_files["4/2"]), "-p", "The quick", "-n", "8", "--device", "cuda", "--json"]) == 0
    err = capsys.readouterr().err
    assert '"kind": "gpu"' in err and '"dtype": "float16"' in err


@pytest.mark.cuda
def test_cuda_baseline_bench_tiny(capsys):
    from runtime.baseline_bench import main

    assert main(["--tiny", "--device", "cuda", "--new-tokens", "4"]) == 0
    assert '"device": "cuda' in capsys.readouterr().out
