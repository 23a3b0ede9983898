"""The tokenizer that travels inside a .moepack file: text <-> ids, BOS as the header says,
chat templates rendered like transformers' apply_chat_template (sandboxed jinja2), and
streaming detokenisation that never splits a multi-byte UTF-8 character."""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from formats.errors import ConfigError, MoepackError
from formats.header import TokenizerInfo


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters, which chat templates do not expect
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(source: str) -> jinja2.Template:
    # the options transformers uses, so a hub template renders the same text here
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise MoepackError(f"the file's chat template does not compile: {e}", hint="re-create the file with a valid chat template") from None


class TextTokenizer:
    def __init__(self, info: TokenizerInfo, source: str = "the file"):
        if info.tokenizer_json is None:
            raise MoepackError(
                f"{source} carries no tokenizer", hint="pass token ids with --prompt-ids, or re-create the file with its tokenizer"
            )
        try:
            self.tok = Tokenizer.from_str(info.tokenizer_json)
        except Exception as e:  # the tokenizers library raises plain Exceptions for bad JSON
            raise MoepackError(f"{source}: its tokenizer does not load ({str(e)[:120]})") from None
        self.info, self.source = info, source
        self.bos_id, self.eos_ids = info.bos_token_id, tuple(info.eos_token_ids)
        self._template = None

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; BOS prepended when the header says so (or `add_bos`)."""
        # special tokens come from the header, not the tokenizer's post-processor, so a
        # tokenizer.json that also adds BOS cannot double it
        ids = self.tok.encode(text, add_special_tokens=False).ids
        add = self.info.add_bos_token if add_bos is None else add_bos
        if add and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def token_str(self, token_id: int | None) -> str:
        if token_id is None:
            return ""
        return self.tok.id_to_token(token_id) or ""

    @property
    def has_chat_template(self) -> bool:
        return self.info.chat_template is not None

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        if self.info.chat_template is None:
            raise MoepackError(f"{self.source} has no chat template", hint="run without --chat")
        if self._template is None:
            self._template = compile_chat_template(self.info.chat_template)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.token_str(self.bos_id), eos_token=self.token_str(self.eos_ids[0] if self.eos_ids else None),
            )
        except jinja2.exceptions.TemplateError as e:
            raise ConfigError(f"the chat template rejects this conversation: {e}", hint="check --system and the roles the model supports") from None

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # like apply_chat_template(tokenize=True): the template writes any BOS itself
        return self.encode(self.render_chat(messages), add_bos=False)


class StreamDecoder:
    """Turns generated ids into text pieces as they come: re-decodes the whole generated list
    and hands out only the new suffix, holding back text that ends in U+FFFD (the first bytes
    of a character whose remaining bytes are still to come)."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """What is still held back (it may end in U+FFFD when generation stopped mid-character)."""
        return self._advance(self.tokenizer.decode(self.ids))

    def _advance(self, text: str) -> str:
        # printed text cannot be taken back: should a later token change how earlier ones
        # decode, keep counting characters from what was printed (rare; never for byte-level BPE)
        new = text[len(self.text):]
        if len(text) > len(self.text):
            self.text = text
        return new


class StopFilter:
    """Stop strings on streamed text: hands out what is safe to print, holding back a tail
    that may be the start of a stop string, and cuts the text where one appears (the stop
    string itself is not printed, as llama.cpp's server and OpenAI's API do)."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[:len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        """The held-back tail at the end of a generation that no stop string ended."""
        out, self.pending = self.pending, ""
        return out
