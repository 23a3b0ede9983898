"""hqq's own representation of a Mixtral checkpoint (fp16 scale and zero, as HQQLinear keeps
them), loaded into transformers' MixtralForCausalLM: the baseline of the quality table.

Every matrix goes through `Quantizer.quantize(W, nbits, group_size, axis=1, optimize=True)`
on the CPU, the call moe-pack's quantizer makes, so the codes are the ones a .moepack file
holds; `Reference.check_file` proves that on every quantized matrix of a file.

One shortcut, checked by `check_file`: when expert e's w1 (or w3) is a row permutation of
expert 0's (as in checkpoints made by quantize.gguf_to_mixtral, whose experts are the dense
FFN with its hidden units shuffled), its quantization is expert 0's with the rows permuted,
because hqq's axis=1 groups never cross a row. Almost always, that is: hqq's optimizer stops
when a whole-matrix float mean stops falling, and that mean's summation order follows the row
order (and torch's thread count), so about one matrix in a thousand stops one iteration
apart. `requantize` redoes such matrices in full. w2 is permuted along its columns, across
groups, so it is always quantized in full.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

Key = str | tuple[int, int, str]  # a tensor name, or (layer, expert, "w1" | "w3" | "w2")


def hqq_fp16_meta(W: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, int, torch.Tensor]:
    """(W_r float32, bytes of hqq's packed representation, codes uint8 [rows, cols]) of W [rows, cols] fp16.

    Quantizer.quantize as moe-pack's quantizer calls it (round_zero left at its default, False;
    HQQLinear's own default config would round the zero at 4 bits), scale and zero cast to
    float16 as HQQLinear keeps them, then Quantizer.dequantize in float32."""
    from hqq.core.quantize import Quantizer

    W_q, meta = Quantizer.quantize(W, nbits=bits, group_size=group, axis=1, optimize=True, device="cpu")
    meta["scale"], meta["zero"] = meta["scale"].half(), meta["zero"].half()
    meta["compute_dtype"] = torch.float32
    W_r = Quantizer.dequantize(W_q, meta).float()  # (fp32 codes - fp16 zero) * fp16 scale, promoted to fp32
    n_groups = W.numel() // group
    codes = Quantizer.unpack[meta["packing"]](W_q, dtype=torch.float32)[:n_groups].reshape(W.shape).to(torch.uint8)
    nbytes = W_q.numel() * W_q.element_size() + n_groups * 2 * 2  # packed codes + fp16 scale and zero per group
    return W_r, nbytes, codes


def row_permutation(index: dict[bytes, int], W: torch.Tensor) -> torch.Tensor | None:
    """perm with W == base[perm], from `index` (base's row bytes -> row), or None."""
    rows = W.numpy()
    perm = [index.get(rows[i].tobytes()) for i in range(rows.shape[0])]
    return None if None in perm else torch.tensor(perm)


def file_codes(mf, key: Key) -> np.ndarray:
    """The codes a .moepack file stores for `key` (uint8 [rows, cols])."""
    from formats.packing import unpack_codes

    if isinstance(key, str):
        views, t = mf.tensor_views(key), mf.header.tensor(key)
        shape, spec = t.shape, t.spec
    else:
        L, e, m = key
        views = mf.expert_views(L, e)[m]
        mat = next(x for x in mf.header.expert_layout.matrices if x.name == m)
        shape, spec = mat.shape, mat.spec
    if not spec.quantized:
        raise ValueError(f"{key} is not quantized in {mf.path}")
    planes = [views["q"]] + ([views["q_hi"]] if "q_hi" in views else [])
    return unpack_codes(planes, spec.bits, shape[1])


class Reference:
    """MixtralForCausalLM (float32) whose attention and expert weights can be swapped for hqq's
    fp16-meta reconstruction at any bit width; the fp16 originals are kept to quantize from."""

    ROLES = ("attention", "experts")

    def __init__(self, folder: Path):
        from transformers import MixtralForCausalLM

        self.model = MixtralForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.layers = self.model.model.layers
        self.I = self.model.config.intermediate_size
        # fp16 -> fp32 -> fp16 is exact: these are the checkpoint's own fp16 values
        self.orig = {name: p.detach().half().clone() for name, p in self._params()}
        self.current: dict[str, tuple | None] = {r: None for r in self.ROLES}
        self.codes: dict[str, dict[Key, torch.Tensor]] = {r: {} for r in self.ROLES}
        self.fp16_bytes = {r: 0 for r in self.ROLES}
        for name, p in self._params():
            self.fp16_bytes[self._role(name)] += p.numel() * 2
        self.role_bytes = dict(self.fp16_bytes)
        self.other_bytes = sum(p.numel() * 2 for p in self.model.parameters()) - sum(self.fp16_bytes.values())
        self.permuted = 0  # matrices whose quantization came from a row permutation
        self.requantized = 0  # matrices quantized again in full by `requantize`

    def _params(self):
        for L, layer in enumerate(self.layers):
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                yield f"model.layers.{L}.self_attn.{proj}.weight", getattr(layer.self_attn, proj).weight
            yield f"{L}.gate_up_proj", layer.mlp.experts.gate_up_proj  # [E, 2I, H]: w1 rows, then w3 rows
            yield f"{L}.down_proj", layer.mlp.experts.down_proj  # [E, H, I]: w2

    @staticmethod
    def _role(name: str) -> str:
        return "experts" if name.endswith(("gate_up_proj", "down_proj")) else "attention"

    @property
    def nbytes(self) -> int:
        """Bytes of the whole model in the current representation (fp16 where not quantized)."""
        return self.other_bytes + sum(self.role_bytes.values())

    def set_role(self, role: str, bits: int, group: int | None) -> float:
        """Put hqq's fp16-meta reconstruction of `role` (or, at 16 bits, the originals) into the
        model. Returns the seconds spent (0 when the role already is in that state)."""
        want = None if bits == 16 else (bits, group)
        if self.current[role] == want:
            return 0.0
        t0 = time.perf_counter()
        self.codes[role] = {}
        with torch.no_grad():
            if want is None:
                for name, p in self._params():
                    if self._role(name) == role:
                        p.copy_(self.orig[name].float())
                self.role_bytes[role] = self.fp16_bytes[role]
            elif role == "attention":
                self.role_bytes[role] = self._quantize_attention(bits, group)
            else:
                self.role_bytes[role] = self._quantize_experts(bits, group)
        self.current[role] = want
        return time.perf_counter() - t0

    def _quantize_attention(self, bits: int, group: int) -> int:
        items = [(n, p) for n, p in self._params() if self._role(n) == "attention"]
        nbytes = 0
        for name, p in tqdm(items, desc=f"hqq attention {bits}-bit g{group}", unit="mat", dynamic_ncols=True):
            W_r, nb, codes = hqq_fp16_meta(self.orig[name], bits, group)
            p.copy_(W_r)
            self.codes["attention"][name] = codes
            nbytes += nb
        return nbytes

    def _quantize_experts(self, bits: int, group: int) -> int:
        nbytes = 0
        for L in tqdm(range(len(self.layers)), desc=f"hqq experts {bits}-bit g{group}", unit="layer", dynamic_ncols=True):
            gu, down = self.orig[f"{L}.gate_up_proj"], self.orig[f"{L}.down_proj"]
            experts = self.layers[L].mlp.experts
            for m, rows in (("w1", slice(0, self.I)), ("w3", slice(self.I, 2 * self.I))):
                base = None  # (row index, W_r, nbytes, codes) of the first expert quantized in full
                for e in range(gu.shape[0]):
                    W = gu[e, rows].contiguous()
                    perm = row_permutation(base[0], W) if base else None
                    if perm is None:
                        W_r, nb, codes = hqq_fp16_meta(W, bits, group)
                        if base is None:
                            base = ({r.tobytes(): i for i, r in enumerate(W.numpy())}, W_r, nb, codes)
                    else:
                        W_r, nb, codes = base[1][perm], base[2], base[3][perm]
                        self.permuted += 1
                    experts.gate_up_proj[e, rows].copy_(W_r)
                    self.codes["experts"][(L, e, m)] = codes
                    nbytes += nb
            for e in range(down.shape[0]):
                W_r, nb, codes = hqq_fp16_meta(down[e].contiguous(), bits, group)
                experts.down_proj[e].copy_(W_r)
                self.codes["experts"][(L, e, "w2")] = codes
                nbytes += nb
        return nbytes

    def requantize(self, keys: list[Key]) -> None:
        """Quantize the matrices `keys` of the current state in full (no permutation shortcut)."""
        with torch.no_grad():
            for key in keys:
                role = "attention" if isinstance(key, str) else "experts"
                bits, group = self.current[role]
                if isinstance(key, str):
                    W, target = self.orig[key], dict(self._params())[key]
                else:
                    L, e, m = key
                    experts = self.layers[L].mlp.experts
                    if m == "w2":
                        W, target = self.orig[f"{L}.down_proj"][e], experts.down_proj[e]
                    else:
                        rows = slice(0, self.I) if m == "w1" else slice(self.I, 2 * self.I)
                        W, target = self.orig[f"{L}.gate_up_proj"][e, rows], experts.gate_up_proj[e, rows]
                W_r, _, codes = hqq_fp16_meta(W.contiguous(), bits, group)
                target.copy_(W_r)
                self.codes[role][key] = codes
                self.requantized += 1

    def check_file(self, mf) -> tuple[int, list]:
        """(matrices compared, keys whose codes differ) between this reference and the
        .moepack file `mf`, over every quantized matrix of the current state."""
        n, bad = 0, []
        for role in self.ROLES:
            if self.current[role] is None:
                continue
            for key, codes in self.codes[role].items():
                if not np.array_equal(file_codes(mf, key), codes.numpy()):
                    bad.append(key)
                n += 1
        return n, bad

    def logits_fn(self):
        """ids [T] -> logits [T, V] (float32), a fresh context per call."""

        def fn(ids: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return self.model(input_ids=ids[None]).logits[0]

        return fn
