"""Tiny Mixtral checkpoints built by the tests themselves (nothing is downloaded).

`make_tiny_checkpoint` saves transformers' MixtralForCausalLM with a small config and a
fixed seed as a Hugging Face folder (fp16 safetensors, sharded, with an index), plus a
byte-level BPE tokenizer trained on a short text and a chat template. The same builder
serves `make demo` (through `python -m tests.tiny`), so the demo needs no download either.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

TRAINING_TEXT = (
    "Mixture of experts models route every token to a few experts. The experts live in host memory "
    "and stream to the GPU on demand. A cache keeps the popular experts close, and a prefetcher guesses "
    "which experts the next layer will need. Quantization to two or three bits makes each expert small. "
    "The quick brown fox jumps over the lazy dog 0123456789 times, and then it rests.\n"
)

TINY_CONFIG = dict(
    vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=1, eos_token_id=2,
    tie_word_embeddings=False,
)


def make_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT] * 4, trainer=trainer)
    return tok


def make_tiny_checkpoint(out: Path, seed: int = 0, shards: int = 2, **overrides) -> Path:
    """Write a tiny fp16 Mixtral checkpoint folder at `out` and return it."""
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(**{**TINY_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = MixtralForCausalLM(cfg)
    with torch.no_grad():  # transformers' init is tiny (std 0.02): widen it so routing and logits vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 / p.shape[-1] ** 0.5)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.half()
    total = sum(p.numel() * 2 for p in model.parameters())
    model.save_pretrained(out, max_shard_size=max(total // shards + 1, 1024))
    tok = make_tokenizer(cfg.vocab_size)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
        "chat_template": CHAT_TEMPLATE, "tokenizer_class": "PreTrainedTokenizerFast",
    }, indent=1))
    return out


if __name__ == "__main__":
    print(make_tiny_checkpoint(Path(sys.argv[1] if len(sys.argv) > 1 else "out/tiny-mixtral")))
