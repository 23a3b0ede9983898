"""The input side: config.json mapping, tokenizer collection, Hub download (faked: no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from formats.errors import SourceError
from quantize.source import HUB_METADATA_FILES, looks_like_repo_id, model_config_from_hf, open_checkpoint, resolve_source
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)
from tests.quantize.helpers import copy_checkpoint, edit_json

HF4_CONFIG = {  # transformers 4.x style, as on the Hub for mistralai/Mixtral-8x7B-v0.1
    "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
    "max_position_embeddings": 32768, "sliding_window": None, "tie_word_embeddings": False, "hidden_act": "silu",
    "bos_token_id": 1, "eos_token_id": 2,
}


def test_hf4_config_maps_to_model_config():
    c = model_config_from_hf(HF4_CONFIG, Path("config.json"))
    assert (c.hidden_size, c.head_dim, c.num_key_value_heads, c.rope_theta, c.sliding_window) == (4096, 128, 8, 1e6, None)
    assert c.max_position_embeddings == 32768 and not c.tie_word_embeddings


def test_transformers5_rope_parameters_and_null_head_dim():
    cfg = {**HF4_CONFIG, "head_dim": None, "sliding_window": 4096, "tie_word_embeddings": True}
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_theta": 5e5, "rope_type": "default"}
    c = model_config_from_hf(cfg, Path("config.json"))
    assert c.rope_theta == 5e5 and c.head_dim == 128 and c.sliding_window == 4096 and c.tie_word_embeddings


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "llama"}, "model_type is 'llama'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ({"num_hidden_layers": 0}, "num_hidden_layers=0"),
    ({"hidden_size": "4096"}, "hidden_size='4096'"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok=9"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}}, "rope type 'yarn'"),
    ({"num_key_value_heads": 5}, "num_key_value_heads=5"),
])
def test_bad_configs_name_the_file_and_field(change, needle):
    with pytest.raises(SourceError) as e:
        model_config_from_hf({**HF4_CONFIG, **change}, Path("/ckpt/config.json"))
    assert "/ckpt/config.json" in e.value.message and needle in e.value.message and e.value.hint


def test_missing_required_field():
    cfg = dict(HF4_CONFIG)
    del cfg["num_local_experts"]
    with pytest.raises(SourceError, match="lacks num_local_experts"):
        model_config_from_hf(cfg, Path("config.json"))


def test_tokenizer_info_from_tiny_checkpoint(tiny_checkpoint):
    ck = open_checkpoint(str(tiny_checkpoint))
    t = ck.tokenizer
    assert t.tokenizer_json == (tiny_checkpoint / "tokenizer.json").read_text()
    assert t.chat_template == json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())["chat_template"]
    assert (t.bos_token_id, t.eos_token_ids, t.add_bos_token) == (1, (2,), True)
    assert ck.config.num_local_experts == 4 and ck.config.rope_theta == 1e6


def test_tokenizer_variants(tmp_path, tiny_checkpoint):
    """eos as a list in generation_config wins; chat_template.jinja wins; add_bos_token false is kept."""
    src = copy_checkpoint(tiny_checkpoint, tmp_path / "ckpt")
    edit_json(src / "generation_config.json", {"eos_token_id": [2, 7, 2]})
    edit_json(src / "tokenizer_config.json", {"add_bos_token": False})
    (src / "chat_template.jinja").write_text("{{ messages }}")
    t = open_checkpoint(str(src)).tokenizer
    assert t.eos_token_ids == (2, 7) and t.chat_template == "{{ messages }}" and t.add_bos_token is False
    (src / "tokenizer.json").unlink()
    (src / "chat_template.jinja").unlink()
    edit_json(src / "tokenizer_config.json", remove=("chat_template",))
    t = open_checkpoint(str(src)).tokenizer
    assert t.tokenizer_json is None and t.chat_template is None


def test_repo_id_detection():
    assert looks_like_repo_id("mistralai/Mixtral-8x7B-v0.1")
    for s in ("./ckpt", "ckpt", "/abs/path/x", "a/b/c", "../x/y"):
        assert not looks_like_repo_id(s), s


class FakeHub:
    """Stands in for huggingface_hub.snapshot_download: records calls, returns a local folder."""

    def __init__(self, folder: Path):
        self.folder, self.calls = folder, []

    def __call__(self, repo_id, **kw):
        self.calls.append((repo_id, kw))
        return str(self.folder)


def test_hub_download_fetches_only_needed_files(tiny_checkpoint, monkeypatch):
    fake = FakeHub(tiny_checkpoint)
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    ck = open_checkpoint("someone/tiny-mixtral")
    assert ck.folder == tiny_checkpoint and ck.source == "someone/tiny-mixtral"
    (repo1, kw1), (repo2, kw2) = fake.calls
    assert repo1 == repo2 == "someone/tiny-mixtral"
    assert kw1["allow_patterns"] == HUB_METADATA_FILES
    index = json.loads((tiny_checkpoint / "model.safetensors.index.json").read_text())
    assert kw2["allow_patterns"] == sorted(set(index["weight_map"].values()))  # the shards, nothing else


def test_hub_quantize_end_to_end(tiny_checkpoint, monkeypatch, tmp_path):
    """`moe-pack quantize owner/name` goes through snapshot_download and records the repo id."""
    import huggingface_hub

    from formats.reader import MoepackFile
    from tests.quantize.helpers import run_cli

    monkeypatch.setattr(huggingface_hub, "snapshot_download", FakeHub(tiny_checkpoint))
    out = tmp_path / "hub.moepack"
    r = run_cli("quantize", "someone/tiny-mixtral", "-o", out, "--attn-bits", "16", "--expert-bits", "16", "-q")
    assert r.exit_code == 0, r.stderr
    with MoepackFile(out) as mf:
        assert mf.header.quantizer.source == "someone/tiny-mixtral"


def test_hub_bad_option_fails_before_downloading_weights(tiny_checkpoint, monkeypatch, tmp_path):
    import huggingface_hub

    from tests.quantize.helpers import assert_user_error, run_cli

    fake = FakeHub(tiny_checkpoint)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    r = run_cli("quantize", "someone/tiny-mixtral", "-o", tmp_path / "x.moepack", "--expert-group-size", "24")
    assert_user_error(r, "--expert-group-size 24")
    assert [kw["allow_patterns"] for _, kw in fake.calls] == [HUB_METADATA_FILES]  # config only, no shards


def test_hub_failure_is_a_source_error(tmp_path):
    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    with pytest.raises(SourceError) as e:
        resolve_source("someone/model", download=offline)
    assert "someone/model" in e.value.message and "OSError" in e.value.message and "login" in e.value.hint


def test_local_file_is_not_a_folder(tiny_checkpoint):
    with pytest.raises(SourceError, match="is a file"):
        resolve_source(str(tiny_checkpoint / "config.json"))
