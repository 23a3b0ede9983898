"""The resident-experts baseline benchmark runs end to end (tiny shapes, CPU)."""

from __future__ import annotations

import json

from runtime.baseline_bench import bench_config, bench_recipe, main


def test_tiny_bench_runs(capsys, tmp_path):
    assert main(["--tiny", "--recipe", "fp16", "--recipe", "4/2", "--new-tokens", "4", "--prompt-len", "4",
                 "--device", "cpu", "--workdir", str(tmp_path)]) == 0
    results = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["recipe"] for r in results] == ["fp16", "4/2"]
    for r in results:
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["layers"] == 2 and r["device"] == "cpu"
        # decode only: the backend saw one token per layer per step, top-2 experts each
        assert r["backend"]["expert_tokens"] == 4 * 2 * 2
    # fp16 experts decode in torch; packed ones through the C step, timed against torch's step too
    from runtime.cpu_expert import _native

    assert results[0]["cpu_step"] is False and "decode_tok_s_torch_step" not in results[0]
    assert results[1]["cpu_step"] is (_native() is not None)
    assert ("decode_tok_s_torch_step" in results[1]) is results[1]["cpu_step"]
    assert results[1]["file_bytes"] < results[0]["file_bytes"]
    assert list(tmp_path.iterdir()) == []  # the synthetic files are removed


def test_mixtral_shapes():
    cfg = bench_config(2, tiny=False)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim, cfg.num_local_experts, cfg.vocab_size) == (4096, 14336, 32, 8, 128, 8, 32000)
    assert bench_recipe("4/2")["experts"].bits == 2 and bench_recipe("fp16")["attention"].bits == 16


def test_bad_recipe(capsys):
    assert main(["--tiny", "--recipe", "1/1"]) == 1  # at parse time, before any file is written
    err = capsys.readouterr().err
    assert err.startswith("error: Invalid value for '--recipe': '1/1' is not one of fp16, 4/2")
    assert len(err.strip().splitlines()) == 2  # one line plus the hint
