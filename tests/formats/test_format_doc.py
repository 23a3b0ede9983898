"""docs/FORMAT.md quotes bytes and sizes computed by formats/: recompute them here so the
spec and the code cannot drift apart unnoticed."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from formats.header import ModelConfig
from formats.qtensor import QuantSpec, component_views, decode_matrix, encode_matrix, matrix_layout
from formats.spec import HEADER_MAX_BYTES, MAGIC, PREFIX, VERSIONS
from formats.writer import make_expert_layout

DOC = Path(__file__).resolve().parents[2] / "docs" / "FORMAT.md"

EXAMPLE_SPEC = QuantSpec(2, 8, 8, 4)
EXAMPLE_Q = np.array([
    [0, 1, 2, 3, 3, 2, 1, 0, 0, 0, 1, 1, 2, 2, 3, 3],
    [3, 3, 3, 3, 0, 0, 0, 0, 1, 2, 1, 2, 1, 2, 1, 2],
], np.uint8)
EXAMPLE_SCALE = np.array([0.5, 0.25, 1.0, 0.125], np.float32)
EXAMPLE_ZERO = np.array([1.5, 2.0, 1.0, 2.5], np.float32)

MIXTRAL = ModelConfig(
    vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, head_dim=128, num_local_experts=8, num_experts_per_tok=2, rms_norm_eps=1e-5,
    rope_theta=1e6, max_position_embeddings=32768,
)
EXPERT_SPECS = [
    QuantSpec(16), QuantSpec(2, 16, 8, 128), QuantSpec(2, 16, 4, 128), QuantSpec(2, 16, 16), QuantSpec(3, 64, 8, 128),
    QuantSpec(3, 64, 4, 128), QuantSpec(3, 64, 16),
    QuantSpec(4, 64, 8, 256), QuantSpec(4, 64, 16),
]


def example_component_block() -> str:
    buf = encode_matrix(EXAMPLE_SPEC, q=EXAMPLE_Q, scale=EXAMPLE_SCALE, zero=EXAMPLE_ZERO)
    comps, nbytes = matrix_layout(EXAMPLE_Q.shape, EXAMPLE_SPEC)
    lines = ["offset  component   dtype shape   bytes (hex)"]
    for c in comps:
        shape = "x".join(map(str, c.shape))
        lines.append(f"{c.offset:<7d} {c.name:<11s} {c.dtype:<5s} {shape:<7s} {buf[c.offset:c.offset + c.nbytes].hex(' ')}")
    lines.append(f"total {nbytes} bytes; every byte not listed above is 0x00")
    return "\n".join(lines)


def example_decoded_block() -> str:
    buf = encode_matrix(EXAMPLE_SPEC, q=EXAMPLE_Q, scale=EXAMPLE_SCALE, zero=EXAMPLE_ZERO)
    w = decode_matrix(component_views(buf, EXAMPLE_Q.shape, EXAMPLE_SPEC), EXAMPLE_Q.shape, EXAMPLE_SPEC)
    return "\n".join(f"row {r}: " + " ".join(f"{float(x):.8g}" for x in row) for r, row in enumerate(w))


def mixtral_rows() -> list[str]:
    weights = 3 * MIXTRAL.intermediate_size * MIXTRAL.hidden_size
    rows = []
    for spec in EXPERT_SPECS:
        lay = make_expert_layout(MIXTRAL, spec)
        w1 = lay.matrix("w1")
        rows.append(
            f"| {spec.describe()} | {w1.nbytes:,} | {lay.record_size:,} | {lay.record_size * 8 / weights:.3f} "
            f"| {lay.record_size * MIXTRAL.num_hidden_layers * MIXTRAL.num_local_experts / 1e9:.2f} |"
        )
    return rows


def test_doc_exists_and_states_the_constants():
    text = DOC.read_text()
    assert MAGIC == b"MOEPACK\x00" and "`MOEPACK\\0`" in text
    assert PREFIX.format == "<8sIIQII" and PREFIX.size == 32
    assert VERSIONS == (1, 2) and "# The `.moepack` format, versions 1 and 2" in text
    assert f"{HEADER_MAX_BYTES:,}" in text


def test_worked_example_bytes_are_in_the_doc():
    text = DOC.read_text()
    assert example_component_block() in text, "regenerate the worked example in docs/FORMAT.md:\n" + example_component_block()
    assert example_decoded_block() in text, "regenerate the decoded values in docs/FORMAT.md:\n" + example_decoded_block()


def test_mixtral_size_table_is_in_the_doc():
    text = DOC.read_text()
    for row in mixtral_rows():
        assert row in text, f"regenerate the size table in docs/FORMAT.md; missing row:\n{row}"


if __name__ == "__main__":  # python -m tests.formats.test_format_doc prints the blocks to paste
    print(example_component_block(), example_decoded_block(), *mixtral_rows(), sep="\n\n")
