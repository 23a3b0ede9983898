"""`moe-pack quantize --gptq TEXT`: the calibration text run through the checkpoint's own float
weights one decoder layer ahead of the writer, giving each quantized matrix the Gram matrix of
its inputs, H = sum_t x_t x_t^T, for quantize/gptq.py (and its diagonal / rows, E[x_j^2], for
the weighted fit of the scales, as an importance matrix would).

The forward is quantize/imatrix_checkpoint.py's (transformers' Mixtral in float32). The
writer takes records in file order, a layer's attention and then its experts, so when it asks
for the first matrix of layer L, layer L runs over every calibration token and its Gram
matrices are kept until layer L + 1 runs. Layer L's input is layer L - 1's output through the
matrices as the file stores them (the writer hands each one's bytes to `stored`): each layer is
fitted to the inputs the quantized model will give it, so it can absorb some of the error of
the layers before (GPTQ's sequential order; SmolLM2 at 4/2, BENCHMARKS.md section 38: 29.2 ->
27.6 perplexity on a text of another domain than the calibration's). Within a layer, the
sub-layers run with float weights.

Memory: the hidden states ([tokens, H] float32, twice: a layer's input and output), one
layer's stored bytes, and its Gram matrices in float32: q/k/v share one [H, H], o one, each
routed expert one [H, H] for w1/w3 and one [I, I] for w2. For Mixtral-8x7B that is ~7 GB,
nearly all w2's (14336^2 * 4 bytes = 0.8 GB per expert).
"""

from __future__ import annotations

import torch

from formats.errors import ConfigError, MoepackError

from .hqq_codec import Weighted
from .imatrix import text_sha256
from .imatrix_checkpoint import Weights, first_hidden, run_layer
from .tensors import expert_matrix_name, quantized_matrices

METHOD_VERSION = "1"  # of this calibration and quantize/gptq.py together, in the header
MIN_ROWS = 64  # calibration rows a matrix needs for GPTQ's codes; fewer: the weighted fit's


class _Grams:
    """Per-name sums of x x^T over rows (float32, on the rows' device) and row counts; names
    that share an input (q, k and v; an expert's w1 and w3) share one matrix."""

    def __init__(self):
        self.gram: dict[str, torch.Tensor] = {}
        self.rows: dict[str, int] = {}

    def add(self, names: tuple[str, ...], x: torch.Tensor) -> None:
        x = x.to(torch.float32)
        g = x.T @ x  # [cols, cols]
        first = self.gram.get(names[0])
        if first is not None:
            first += g
        for name in names:
            self.gram[name] = first if first is not None else g
            self.rows[name] = self.rows.get(name, 0) + x.shape[0]


class _NoSums:
    def add(self, names, x) -> None:
        pass


class _StoredWeights:
    """Weights' interface with the matrices the file stores (decoded to float32) in place of the
    checkpoint's; the rest (norms, routers, float16 records) from the checkpoint."""

    def __init__(self, weights: Weights, stored: dict):
        self.weights, self.stored, self.dev = weights, stored, weights.dev

    def _decoded(self, name: str) -> torch.Tensor | None:
        from runtime.dequant import component_tensors, dequantize

        hit = self.stored.get(name)
        if hit is None:
            return None
        payload, shape, spec = hit
        buf = torch.frombuffer(bytearray(payload), dtype=torch.uint8).to(self.dev)
        return dequantize(component_tensors(buf, shape, spec), shape, spec, torch.float32)

    def get(self, name: str) -> torch.Tensor:
        w = self._decoded(name)
        # a record not quantized is stored as float16 (norms, routers, 16-bit roles)
        return self.weights.get(name).half().float() if w is None else w

    def expert(self, layer: int, e: int, matrix: str) -> torch.Tensor:
        w = self._decoded(expert_matrix_name(layer, e, matrix))
        return self.weights.expert(layer, e, matrix).half().float() if w is None else w


class GptqFits:
    """What the writer's loop asks of `--imatrix`'s Fits (quantize/convert.py), from a
    calibration run instead of an importance matrix: each quantized matrix's fit, with its
    Gram matrix."""

    method = "gptq"  # the header's quantizer.method

    def __init__(self, ckpt, text: str, ctx: int, max_tokens: int | None, device: str, file_recipe):
        self.ckpt, self.text, self.ctx, self.max_tokens = ckpt, text, ctx, max_tokens
        self.device, self.recipe = device, file_recipe
        self.cols: dict[str, int] = {}
        self.layer_of: dict[str, int] = {}
        self.weighted = self.equal = 0
        self.layer = -1
        self.grams = _Grams()
        # the matrices of layer self.layer as stored: name -> (bytes, shape, spec); and that
        # layer's input, which runs through them once the layer is written
        self.stored_layer: dict[str, tuple[bytes, tuple[int, int], object]] = {}
        self.h_in = None

    def check(self, plan: list) -> None:
        """Before any work: the text gives windows, and which matrices are quantized."""
        quantized = quantized_matrices(plan, self.recipe)
        self.cols = {name: cols for name, (cols, _) in quantized.items()}
        self.layer_of = {name: layer for name, (_, layer) in quantized.items() if layer is not None}
        if not self.layer_of:
            raise ConfigError("--gptq: this recipe quantizes no attention or expert matrix",
                              hint="drop --gptq, or quantize attention or experts to 2, 3, 4 or 8 bits")
        self.weights = Weights(self.ckpt.folder, plan, torch.device(self.device))
        try:
            self.h, self.spans = first_hidden(self.ckpt, self.weights, self.text, self.ctx, self.max_tokens,
                                              self.ckpt.source)
        except torch.OutOfMemoryError:
            raise MoepackError("out of GPU memory holding the --gptq text's hidden states",
                               hint="use fewer tokens (--gptq-tokens), or --device cpu") from None

    def fit(self, name: str) -> Weighted | None:
        """The fit of the quantized matrix `name` (None for a float16 record): weighted by its
        inputs, codes by GPTQ; lm_head (no layer) and experts never routed to: equal weights."""
        cols = self.cols.get(name)
        if cols is None:
            return None
        layer = self.layer_of.get(name)
        while layer is not None and self.layer < layer:
            self._run(self.layer + 1)
        gram = self.grams.gram.get(name) if layer == self.layer else None
        if gram is None:
            self.equal += 1
            return Weighted(None)
        self.weighted += 1
        rows = self.grams.rows[name]
        imp = (torch.diagonal(gram) / rows).clamp_(min=0).cpu().numpy()
        # an expert routed a handful of times: codes fitted to those few tokens' correlations
        # would fit little else; its importances still weigh the scales
        return Weighted(imp, gram if rows >= MIN_ROWS else None)

    def stored(self, name: str, payload: bytes, shape: tuple[int, int], spec) -> None:
        """The writer's bytes of matrix `name`: the next layer's inputs come through them."""
        if name in self.layer_of and self.layer_of[name] == self.layer:
            self.stored_layer[name] = (payload, shape, spec)

    def _run(self, layer: int) -> None:
        self.grams = _Grams()  # the previous layer's are done with
        try:
            with torch.inference_mode():
                if self.h_in is not None:  # the previous layer again, through its stored matrices
                    stored = _StoredWeights(self.weights, self.stored_layer)
                    self.h = run_layer(self.ckpt.config, stored, self.layer, self.h_in, self.spans, _NoSums())
                self.stored_layer = {}
                self.h_in = self.h
                self.h = run_layer(self.ckpt.config, self.weights, layer, self.h, self.spans, self.grams)
        except torch.OutOfMemoryError:
            raise MoepackError(f"out of GPU memory running layer {layer} over the --gptq text",
                               hint="use fewer tokens (--gptq-tokens), or --device cpu") from None
        self.layer = layer

    def describe(self) -> str:
        """What goes into the header's quantizer.method_version."""
        return (f"{METHOD_VERSION}; gptq, act order, damp 0.01, on the weighted fit's scales; "
                f"{self.h.shape[0]} tokens of text sha256:{text_sha256(self.text)[:16]} in windows of {self.ctx}")

