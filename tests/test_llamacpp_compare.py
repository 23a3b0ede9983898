"""tools/llamacpp_compare.py without llama.cpp: its summary of the raw rows, and a missing source
folder refused in one line before anything is built (the GPU host's time is scarce)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.runtime.test_offload_helpers import load_tool

compare = load_tool("llamacpp_compare")


def test_summary_names_every_figure():
    result = {
        "threads": [16],
        "experts": {
            "ggml": {"rows": [{"type": "q2_K", "threads": 16, "median_ms": 0.61}]},
            "moepack": {"rows": [{"expert": "2-bit g16 m4", "tokens": 1, "threads": 16, "ms": 0.7},
                                 {"expert": "2-bit g16 m4", "tokens": 1, "threads": 1, "ms": 6.9}]},
            "moepack_int8": {"rows": [{"expert": "2-bit g16 m4", "tokens": 1, "threads": 16, "ms": 0.55}]},
        },
        "model": {
            "threads": 16,
            "llama_cpp": [{"n_prompt": 128, "n_gen": 0, "n_depth": 0, "avg_ts": 40.0},
                          {"n_prompt": 0, "n_gen": 16, "n_depth": 128, "avg_ts": 9.5}],
            "moepack": [{"prefill_tokens": 16, "decode_tok_s": 8.0, "prefill_tok_s": 20.0},
                        {"prefill_tokens": 128, "decode_tok_s": 9.0, "prefill_tok_s": 30.0, "cpu_activations": "int8"}],
        },
    }
    lines = compare.summary(result)
    assert lines == [
        "ggml expert q2_K 16 threads: 0.61 ms",
        "moe-pack expert 2-bit g16 m4 16 threads, int16: 0.70 ms",  # the 1-thread row is not the count asked for
        "moe-pack expert 2-bit g16 m4 16 threads, int8: 0.55 ms",
        "llama.cpp 16 threads, 128-token prompt at depth 0: 40.00 tok/s",
        "llama.cpp 16 threads, decode at depth 128: 9.50 tok/s",
        "moe-pack 16 threads, int16, after a 16-token prompt: decode 8.00 tok/s, prompt 20.00 tok/s",
        "moe-pack 16 threads, int8, after a 128-token prompt: decode 9.00 tok/s, prompt 30.00 tok/s",
    ]


def test_missing_sources_fail_in_one_line(tmp_path, capsys):
    out = tmp_path / "r.json"
    rc = compare.main(["--json", str(out), "--threads", "1", "--dir", str(tmp_path / "none"),
                       "--build", str(tmp_path / "build")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and not out.exists()  # refused before anything was built or written
    assert len(err) == 1 and "llama.cpp-src.tgz is missing" in err[0] and "llamacpp_host.sh" in err[0]


def test_refuses_a_bad_thread_count(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        compare.main(["--json", str(tmp_path / "r.json"), "--threads", "0"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err


def test_a_failed_build_still_times_moe_pack(tmp_path, monkeypatch, capsys):
    """llama.cpp's build failing on the host (no g++, a cmake problem) costs its rows, not the
    call: moe-pack's expert and whole-model rows still run, and the workdir ends empty."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("llama.cpp-src.tgz", "cmake-3.whl", "ninja-1.whl"):
        (src / name).write_bytes(b"")
    workdir = tmp_path / "work"
    ran = []

    def fake_run(cmd, env=None, timeout=900):
        ran.append(cmd)
        if cmd[:2] == ["bash", "tools/llamacpp_host.sh"]:
            raise RuntimeError("bash exited 1: c++: command not found")
        if "--json" in cmd:  # cpu_expert_bench
            Path(cmd[cmd.index("--json") + 1]).write_text('{"rows": []}')
            return ""
        (workdir / "tmpleft").mkdir(exist_ok=True)  # what a killed baseline_bench would leave
        return '{"prefill_tokens": 16, "decode_tok_s": 1.0, "prefill_tok_s": 2.0}\n'

    monkeypatch.setattr(compare, "_run", fake_run)
    out = tmp_path / "r.json"
    rc = compare.main(["--json", str(out), "--threads", "2", "--dir", str(src), "--build", str(tmp_path / "build"),
                       "--workdir", str(workdir), "--layers", "1"])
    assert rc == 0 and "llama.cpp not built" in capsys.readouterr().err
    result = json.loads(out.read_text())
    assert "c++: command not found" in result["llama_cpp_error"]
    assert set(result["experts"]) == {"moepack", "moepack_int8"}
    assert result["model"]["llama_cpp"] == [] and len(result["model"]["moepack"]) == 3
    assert not any("ggml" in c[0] or "llama-bench" in c[0] for c in ran)
    assert list(workdir.iterdir()) == []
