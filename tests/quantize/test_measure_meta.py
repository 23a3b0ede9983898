"""`python -m quantize.measure meta`: the error of fp16, 8-bit and 4-bit scale/zero, measured on
the decoded bytes, for a Gaussian matrix and checkpoint tensors (docs/BENCHMARKS.md section 10)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from quantize.measure import cli
from tests.quantize.helpers import one_torch_thread  # noqa: F401 (autouse fixture)

pytest.importorskip("hqq")


def test_meta_table_orders_the_meta_widths(tmp_path, tiny_checkpoint):
    out = tmp_path / "meta.json"
    name = "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    r = CliRunner().invoke(cli, ["meta", "--checkpoint", str(tiny_checkpoint), "--tensor", name, "--spec", "2,16,4",
                                 "--json", str(out)])
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())["rows"]
    assert [row["matrix"] for row in rows] == ["gaussian 1024x4096", name]
    for row in rows:
        e = row["rel_error"]
        assert 0.2 < e["16"] <= e["8"] + 1e-3 and e["8"] < e["4"] < e["16"] + 0.05, e


def test_a_tensor_needs_its_checkpoint():
    r = CliRunner().invoke(cli, ["meta", "--tensor", "x"])
    assert r.exit_code != 0 and "--tensor needs --checkpoint" in r.output
