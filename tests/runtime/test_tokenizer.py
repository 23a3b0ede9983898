"""The tokenizer inside the file: ids, BOS, chat templates, streaming detokenisation."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from formats import MoepackFile
from formats.errors import ConfigError, MoepackError
from runtime.tokenizer import StopFilter, StreamDecoder, TextTokenizer
from tests.runtime.packing_helpers import checkpoint_tokenizer

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "The quick brown fox?"},
    {"role": "assistant", "content": "jumps"},
    {"role": "user", "content": "and then?"},
]


@pytest.fixture(scope="module")
def info(tiny_checkpoint):
    return checkpoint_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_checkpoint):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_encode_matches_transformers(info, hf_tokenizer):
    tok = TextTokenizer(info)
    text = "The quick brown fox jumps over 42 experts."
    # the header, not the tokenizer.json post-processor, decides about BOS
    assert tok.encode(text, add_bos=False) == hf_tokenizer(text, add_special_tokens=False).input_ids
    assert tok.encode(text) == [info.bos_token_id] + tok.encode(text, add_bos=False)
    assert tok.decode(tok.encode(text)) == text
    no_bos = TextTokenizer(dataclasses.replace(info, add_bos_token=False))
    assert no_bos.encode(text) == tok.encode(text)[1:]


def test_chat_template_matches_transformers(info, hf_tokenizer):
    tok = TextTokenizer(info)
    for add in (True, False):
        assert tok.render_chat(MESSAGES, add_generation_prompt=add) == hf_tokenizer.apply_chat_template(
            MESSAGES, tokenize=False, add_generation_prompt=add)
    ids = hf_tokenizer.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert tok.encode_chat(MESSAGES) == list(ids)


def test_chat_template_features(info):
    template = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'tool' %}{{ raise_exception('no tools') }}{% endif %}"
        "{{ m['content'] | tojson }}{{ eos_token }}{% endfor %}"
    )
    tok = TextTokenizer(dataclasses.replace(info, chat_template=template))
    assert tok.render_chat([{"role": "user", "content": "é<b>"}]) == '<s>"é<b>"</s>'
    with pytest.raises(ConfigError, match="no tools"):
        tok.render_chat([{"role": "tool", "content": "x"}])


def test_template_sandbox(info):
    evil = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match="chat template"):
        TextTokenizer(dataclasses.replace(info, chat_template=evil)).render_chat(MESSAGES)


def test_missing_tokenizer_or_template(info, no_tokenizer_file):
    with pytest.raises(MoepackError, match="carries no tokenizer") as e:
        TextTokenizer(MoepackFile(no_tokenizer_file).header.tokenizer, "x.moepack")
    assert "--prompt-ids" in e.value.hint
    with pytest.raises(MoepackError, match="no chat template"):
        TextTokenizer(dataclasses.replace(info, chat_template=None)).render_chat(MESSAGES)
    with pytest.raises(MoepackError, match="does not compile"):
        TextTokenizer(dataclasses.replace(info, chat_template="{% for %}")).render_chat(MESSAGES)


def test_stream_decoder_never_splits_a_character(info):
    tok = TextTokenizer(info)
    text = "héllo wörld – 日本語 🦊 fox"
    ids = tok.encode(text, add_bos=False)
    # the tiny byte-level vocabulary splits these characters over several tokens
    assert any("\ufffd" in tok.decode(ids[:i]) for i in range(1, len(ids)))
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert sum(1 for p in pieces if p) > 5  # it streams, not all at the end


_texts = st.text(alphabet="ab\n", max_size=30)


@given(_texts, st.lists(st.text(alphabet="ab\n", min_size=1, max_size=4), min_size=1, max_size=3),
       st.lists(st.integers(0, 30), max_size=8))
def test_stop_filter_prints_the_text_up_to_the_first_stop(text, stops, cuts):
    # where no stop string holds another, the first to appear is also the first to finish
    stops = tuple(s for s in stops if not any(s != o and s in o for o in stops))
    bounds = sorted({0, len(text), *(min(c, len(text)) for c in cuts)})
    f = StopFilter(stops)
    printed = ""
    for a, b in zip(bounds, bounds[1:]):
        printed += f.push(text[a:b])
        if f.stopped:
            break
    if not f.stopped:
        printed += f.flush()
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    assert printed == (text[:min(hits)] if hits else text)
    assert f.stopped == bool(hits)


def test_stop_filter_holds_back_only_a_possible_start():
    f = StopFilter(("User:",))
    assert f.push("Hello Us") == "Hello " and f.push("a") == "Usa"  # "Us" could have begun "User:"
    assert f.push("U") == "" and f.push("ser: hi") == "" and f.stopped
