"""What `moe-pack inspect` shows, as plain data (`build_report`) plus a text rendering.

The report is a dict of JSON values with stable keys, so `--json` output can be scripted
against and the runtime can reuse the same figures (e.g. the GPU memory estimate).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .layout import expert_shapes
from .spec import ALIGNMENT, EXPERT_MATRICES, PREFIX_SIZE, ROLES

if TYPE_CHECKING:
    from .header import Header
    from .reader import MoepackFile

KV_CACHE_BYTES_PER_VALUE = 2  # fp16 keys and values
GPU_EXPERT_SLOTS = (1, 2, 4)  # experts per layer resident on the GPU in the memory estimate (1: the offloading minimum)


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"count": len(values), "mean": sum(values) / len(values), "max": max(values)}


def _bpw(nbytes: int, weights: int) -> float | None:
    return nbytes * 8 / weights if weights else None


def model_section(h: "Header") -> dict:
    c = h.config
    return {
        "architecture": "mixtral",
        "layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "attention_heads": c.num_attention_heads,
        "kv_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "experts": c.num_local_experts,
        "experts_per_token": c.num_experts_per_tok,
        "vocab_size": c.vocab_size,
        "context_length": c.max_position_embeddings,
        "sliding_window": c.sliding_window,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "tie_word_embeddings": c.tie_word_embeddings,
    }


def tokenizer_section(h: "Header") -> dict:
    t = h.tokenizer
    return {
        "tokenizer_json": t.tokenizer_json is not None,
        "tokenizer_json_bytes": len(t.tokenizer_json.encode("utf-8")) if t.tokenizer_json is not None else 0,
        "chat_template": t.chat_template is not None,
        "bos_token_id": t.bos_token_id,
        "eos_token_ids": list(t.eos_token_ids),
        "add_bos_token": t.add_bos_token,
    }


def expert_section(h: "Header") -> dict:
    lay, c = h.expert_layout, h.config
    weights = sum(_numel(s) for s in expert_shapes(c).values())
    payload = sum(m.nbytes for m in lay.matrices)
    return {
        "count": len(h.experts),
        "record_size": lay.record_size,
        "record_alignment": ALIGNMENT,
        "payload_bytes": payload,  # the three matrices without the record's tail padding
        "weights": weights,
        "bits_per_weight": _bpw(lay.record_size, weights),
        "payload_bits_per_weight": _bpw(payload, weights),
        "total_bytes": lay.record_size * len(h.experts),
        "matrices": [
            {"name": m.name, "shape": list(m.shape), "quant": m.spec.describe(), "offset": m.offset, "bytes": m.nbytes,
             "bits_per_weight": _bpw(m.nbytes, _numel(m.shape))}
            for m in lay.matrices
        ],
    }


def roles_section(h: "Header") -> dict:
    """Per role: how it is stored, how many tensors, their bytes and bits per weight."""
    out = {}
    for role in ROLES:
        spec = h.recipe[role]
        if role == "experts":
            lay = h.expert_layout
            n_weights = sum(_numel(m.shape) for m in lay.matrices) * len(h.experts)
            n_bytes, n_tensors = lay.record_size * len(h.experts), len(lay.matrices) * len(h.experts)
        else:
            ts = [t for t in h.tensors if t.role == role]
            n_weights, n_bytes, n_tensors = sum(_numel(t.shape) for t in ts), sum(t.nbytes for t in ts), len(ts)
        out[role] = {
            "quant": spec.to_json(),
            "describe": spec.describe(),
            "tensors": n_tensors,
            "weights": n_weights,
            "bytes": n_bytes,
            "bits_per_weight": _bpw(n_bytes, n_weights),
        }
    return out


def errors_section(h: "Header") -> dict:
    """Recorded relative errors ||W - stored||_F / ||W||_F: per role, and per expert matrix."""
    roles = {}
    for role in ROLES:
        if role == "experts":
            vals = [v for e in h.experts if e.rel_error is not None for v in e.rel_error]
        else:
            vals = [t.rel_error for t in h.tensors if t.role == role and t.rel_error is not None]
        roles[role] = _stats(vals)
    matrices = {
        m: _stats([e.rel_error[i] for e in h.experts if e.rel_error is not None])
        for i, m in enumerate(EXPERT_MATRICES)
    }
    return {"roles": roles, "expert_matrices": matrices}


def gpu_memory_section(h: "Header") -> dict:
    """GPU bytes a runtime needs: non-expert tensors + k experts per layer + a full-context KV cache."""
    c = h.config
    non_expert = sum(t.nbytes for t in h.tensors)
    rs = h.expert_layout.record_size
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * c.max_position_embeddings * KV_CACHE_BYTES_PER_VALUE
    slots = sorted(set(k for k in GPU_EXPERT_SLOTS if k < c.num_local_experts)) + [c.num_local_experts]

    def with_records(n: int) -> dict:  # bytes with n expert records on the GPU
        return {"expert_bytes": n * rs, "weights_bytes": non_expert + n * rs, "total_bytes": non_expert + n * rs + kv}

    return {
        "non_expert_bytes": non_expert,
        "kv_cache_bytes": kv,
        "kv_cache_context": c.max_position_embeddings,
        "configs": [{"experts_per_layer": k, **with_records(k * c.num_hidden_layers)} for k in slots],
        # the runtime's smallest budget: one pool for all layers holding one layer's top-k, which
        # runs each layer's experts through it in turn (runtime.offload, --cache-policy shared-lfu)
        "shared_pool": {"experts": c.num_experts_per_tok, **with_records(c.num_experts_per_tok)},
        "assumptions": [
            "weights stay in their stored (quantized) form on the GPU, as laid out in the file",
            "every non-expert tensor (embeddings and lm_head included) is resident on the GPU",
            "experts_per_layer expert records per layer are resident (one record = record_size bytes); "
            "'k in all': one pool of k records serves every layer in turn (the offloading runtime's smallest budget)",
            f"KV cache: batch 1, fp16, full context of {c.max_position_embeddings} tokens: "
            "2 x layers x kv_heads x head_dim x context x 2 bytes",
            "not counted: activations, dequantization scratch, CUDA context, allocator overhead",
        ],
    }


def tensor_rows(h: "Header") -> list[dict]:
    """Every tensor, gguf-dump style, in file order; expert matrices named as on the Hub."""
    rows = [
        {"name": t.name, "role": t.role, "shape": list(t.shape), "quant": t.spec.describe(),
         "offset": t.offset, "bytes": t.nbytes, "rel_error": t.rel_error}
        for t in h.tensors
    ]
    for e in h.experts:
        for i, m in enumerate(h.expert_layout.matrices):
            rows.append({
                "name": f"model.layers.{e.layer}.block_sparse_moe.experts.{e.expert}.{m.name}.weight",
                "role": "experts", "shape": list(m.shape), "quant": m.spec.describe(),
                "offset": e.offset + m.offset, "bytes": m.nbytes,
                "rel_error": None if e.rel_error is None else e.rel_error[i],
            })
    return sorted(rows, key=lambda r: r["offset"])


def routing_section(h: "Header") -> dict | None:
    """Calibration routing counts (moe-pack calibrate): per layer the counts, each expert's
    share of the layer's choices, and the share of the k busiest experts (how much a cache
    of k slots per layer could hold with a static placement)."""
    if h.expert_counts is None:
        return None
    k = h.config.num_experts_per_tok
    layers = []
    for counts in h.expert_counts:
        total = sum(counts)
        shares = [c / total if total else 0.0 for c in counts]
        layers.append({"counts": list(counts), "shares": [round(v, 4) for v in shares],
                       "top_k_share": round(sum(sorted(shares, reverse=True)[:k]), 4)})
    return {"choices_per_layer": sum(h.expert_counts[0]), "experts_per_token": k, "layers": layers}


def build_report(h: "Header", *, file_size: int, data_offset: int, path: str | None = None, tensors: bool = False) -> dict:
    """The whole report as JSON-ready data. Offsets in `tensors` are relative to the data section."""
    report = {
        "file": {
            "path": path,
            "format_version": h.format_version,
            "size_bytes": file_size,
            "header_bytes": data_offset - PREFIX_SIZE,  # JSON header plus its padding to the data section
            "data_offset": data_offset,
            "data_bytes": h.data_size,
        },
        "model": model_section(h),
        "tokenizer": tokenizer_section(h),
        "quantizer": h.quantizer.to_json(),
        "roles": roles_section(h),
        "experts": expert_section(h),
        "errors": errors_section(h),
        "gpu_memory": gpu_memory_section(h),
        "has_expert_counts": h.expert_counts is not None,
        "expert_routing": routing_section(h),
    }
    if tensors:
        report["tensors"] = tensor_rows(h)
    return report


def report_for(mf: "MoepackFile", *, tensors: bool = False) -> dict:
    return build_report(mf.header, file_size=mf.size, data_offset=mf.data_offset, path=str(mf.path), tensors=tensors)


# ----------------------------------------------------------------------------- text rendering


def human_bytes(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _fmt_bpw(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def _fmt_err(s: dict | None) -> str:
    return "-" if s is None else f"mean {s['mean']:.4f}  max {s['max']:.4f}  (n={s['count']})"


def _table(rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def render_text(report: dict) -> str:
    f, m, tok, q, ex, gpu = (report[k] for k in ("file", "model", "tokenizer", "quantizer", "experts", "gpu_memory"))
    lines = [
        f"* file: {f['path'] or '-'}",
        f"  format version {f['format_version']}, {f['size_bytes']} bytes ({human_bytes(f['size_bytes'])}); "
        f"header {human_bytes(f['header_bytes'])}, data at byte {f['data_offset']}",
        "",
        "* model (mixtral)",
    ]
    model_rows = [
        ("layers", m["layers"]), ("hidden size", m["hidden_size"]), ("intermediate size", m["intermediate_size"]),
        ("attention heads", m["attention_heads"]), ("kv heads", m["kv_heads"]), ("head dim", m["head_dim"]),
        ("experts", m["experts"]), ("experts per token", m["experts_per_token"]), ("vocab size", m["vocab_size"]),
        ("context length", m["context_length"]), ("sliding window", m["sliding_window"] or "none"),
        ("rope theta", f"{m['rope_theta']:g}"), ("rms norm eps", f"{m['rms_norm_eps']:g}"),
        ("tied embeddings", "yes" if m["tie_word_embeddings"] else "no"),
    ]
    lines += ["  " + r for r in _table([[k, str(v)] for k, v in model_rows])]
    eos = ", ".join(str(i) for i in tok["eos_token_ids"]) or "none"
    lines += [
        "",
        "* tokenizer",
        f"  tokenizer.json: {'present (' + human_bytes(tok['tokenizer_json_bytes']) + ')' if tok['tokenizer_json'] else 'absent'}; "
        f"chat template: {'present' if tok['chat_template'] else 'absent'}",
        f"  bos {tok['bos_token_id'] if tok['bos_token_id'] is not None else 'none'}, eos {eos}, add bos: {'yes' if tok['add_bos_token'] else 'no'}",
        "",
        "* quantizer",
        f"  {q['name']} {q['version']}, method {q['method']} {q['method_version']}",
        f"  source: {q['source']}",
        "",
        "* storage by role",
    ]
    rows = [["role", "quant", "tensors", "bytes", "size", "bits/weight"]]
    for role, r in report["roles"].items():
        rows.append([role, r["describe"], str(r["tensors"]), str(r["bytes"]), human_bytes(r["bytes"]), _fmt_bpw(r["bits_per_weight"])])
    lines += ["  " + r for r in _table(rows, right={2, 3, 4, 5})]
    lines += [
        "",
        "* expert records",
        f"  {ex['count']} records of {ex['record_size']} bytes ({human_bytes(ex['record_size'])}), aligned to {ex['record_alignment']} bytes; "
        f"{human_bytes(ex['total_bytes'])} in all",
        f"  per expert: {ex['weights']} weights, {ex['payload_bytes']} payload bytes; "
        f"{_fmt_bpw(ex['bits_per_weight'])} bits/weight (record), {_fmt_bpw(ex['payload_bits_per_weight'])} (payload)",
    ]
    rows = [["matrix", "shape", "quant", "offset", "bytes", "bits/weight"]]
    for mx in ex["matrices"]:
        rows.append([mx["name"], "x".join(map(str, mx["shape"])), mx["quant"], str(mx["offset"]), str(mx["bytes"]), _fmt_bpw(mx["bits_per_weight"])])
    lines += ["  " + r for r in _table(rows, right={3, 4, 5})]
    errs = report["errors"]
    lines += ["", "* recorded quantization error (||W - stored||_F / ||W||_F)"]
    rows = [[role, _fmt_err(s)] for role, s in errs["roles"].items() if s is not None]
    rows += [[f"experts.{name}", _fmt_err(s)] for name, s in errs["expert_matrices"].items() if s is not None]
    lines += ["  " + r for r in _table(rows)] if rows else ["  none recorded"]
    lines += [
        "",
        "* GPU memory estimate",
        f"  non-expert tensors {human_bytes(gpu['non_expert_bytes'])}; KV cache for {gpu['kv_cache_context']} tokens "
        f"{human_bytes(gpu['kv_cache_bytes'])}",
    ]
    rows = [["experts/layer", "experts", "weights", "with KV cache"]]
    sp = gpu["shared_pool"]
    for label, c in [(f"{sp['experts']} in all", sp), *((str(c["experts_per_layer"]), c) for c in gpu["configs"])]:
        rows.append([label, human_bytes(c["expert_bytes"]), human_bytes(c["weights_bytes"]), human_bytes(c["total_bytes"])])
    lines += ["  " + r for r in _table(rows, right={0, 1, 2, 3})]
    lines += ["  assumptions:"] + [f"  - {a}" for a in gpu["assumptions"]]
    lines += ["", "* expert routing counts (moe-pack calibrate)"]
    rt = report.get("expert_routing")
    if rt is None:
        lines += ["  none recorded (run `moe-pack calibrate FILE TEXT`)"]
    else:
        lines += [f"  {rt['choices_per_layer']} choices per layer ({rt['experts_per_token']} per token); "
                  f"share of each expert, and of the {rt['experts_per_token']} busiest"]
        rows = [["layer", "shares", "top-k"]]
        for i, layer in enumerate(rt["layers"]):
            rows.append([str(i), " ".join(f"{v:.2f}" for v in layer["shares"]), f"{layer['top_k_share']:.2f}"])
        lines += ["  " + r for r in _table(rows, right={0, 2})]
    if "verify" in report:
        v = report["verify"]
        lines += ["", f"* verify: all {v['records']} records match their crc32 ({human_bytes(v['bytes'])} checked)"]
    if "tensors" in report:
        lines += ["", f"* tensors ({len(report['tensors'])}; offsets relative to the data section at byte {f['data_offset']})"]
        rows = [["#", "name", "role", "shape", "quant", "offset", "bytes", "rel_error"]]
        for i, t in enumerate(report["tensors"]):
            rows.append([
                str(i), t["name"], t["role"], "x".join(map(str, t["shape"])), t["quant"], str(t["offset"]), str(t["bytes"]),
                "-" if t["rel_error"] is None else f"{t['rel_error']:.5f}",
            ])
        lines += ["  " + r for r in _table(rows, right={0, 5, 6, 7})]
    return "\n".join(lines) + "\n"
