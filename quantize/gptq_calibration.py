"""`moe-pack quantize --gptq TEXT`: the calibration text run through the checkpoint's weights
alongside the writer, giving each quantized matrix the Gram matrix of its inputs,
H = sum_t x_t x_t^T, for quantize/gptq.py (and its diagonal / rows, E[x_j^2], for the weighted
fit of the scales, as an importance matrix would).

The forward is quantize/imatrix_checkpoint.py's (transformers' Mixtral in float32), taken in
the steps of `layer_steps`: the writer takes records in file order (a layer's q, k, v, o, then
each expert's w1, w3, w2), and each step runs only when the writer asks for a matrix of that
step, reading the matrices before it as the file stores them (the writer hands each one's bytes
to `stored`). lm_head's step comes after the last layer: the final norm of its output. So
every matrix is fitted to the inputs the quantized model will give it and can
absorb some of the error of the matrices before it, within its layer as across layers (GPTQ's
"true sequential" order). Inputs through the stored layers before, with float sub-layers within
a layer, took SmolLM2 at 4/2 from 29.2 to 27.6 perplexity on a text of another domain than the
calibration's (BENCHMARKS.md section 38); section 39 has the figure for this order.

Memory: the hidden states ([tokens, H] float32, a few: a layer's input, its attention's output,
its output), the current layer's stored bytes, and the current step's Gram matrices in float32:
one [H, H] for q/k/v, or for o, or for one expert's w1/w3; one [I, I] for one expert's w2
(14336^2 * 4 bytes = 0.8 GB for Mixtral-8x7B; the largest).
"""

from __future__ import annotations

import torch

from formats.errors import ConfigError, MoepackError

from .hqq_codec import Weighted
from .imatrix import text_sha256
from .imatrix_checkpoint import Weights, first_hidden, head_steps, layer_steps
from .tensors import expert_matrix_name, quantized_matrices

METHOD_VERSION = "2"  # of this calibration and quantize/gptq.py together, in the header
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

    def clear(self) -> None:
        self.gram.clear()
        self.rows.clear()


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

    def __init__(self, ckpt, text: str, ctx: int, windows: list[list[int]], device: str, file_recipe):
        """windows: the text's (imatrix_checkpoint.checkpoint_windows), in windows of ctx."""
        self.ckpt, self.text, self.ctx, self.windows = ckpt, text, ctx, windows
        self.device, self.recipe = device, file_recipe
        self.cols: dict[str, int] = {}
        self.layer_of: dict[str, int] = {}
        self.weighted = self.equal = 0
        self.grams = _Grams()  # the current step's
        self.tokens = 0
        # the layer running: its steps, the names of the step done last, and its matrices as
        # stored so far: name -> (bytes, shape, spec)
        self.layer = -1
        self.steps = None
        self.step: tuple[str, ...] = ()
        self.stored_layer: dict[str, tuple[bytes, tuple[int, int], object]] = {}

    def check(self, plan: list) -> None:
        """Before any work: which matrices are quantized; then the text's embeddings."""
        quantized = quantized_matrices(plan, self.recipe)
        self.cols = {name: cols for name, (cols, _) in quantized.items()}
        last = self.ckpt.config.num_hidden_layers
        # lm_head comes after the last layer: its steps are the final norm's
        self.layer_of = {name: last if layer is None else layer for name, (_, layer) in quantized.items()}
        if not self.layer_of:
            raise ConfigError("--gptq: this recipe quantizes no matrix (every role 16-bit)",
                              hint="drop --gptq, or quantize some role to 2, 3, 4 or 8 bits")
        self.weights = Weights(self.ckpt.folder, plan, torch.device(self.device))
        try:
            h, self.spans = first_hidden(self.weights, self.windows)
        except torch.OutOfMemoryError:
            raise MoepackError("out of GPU memory holding the --gptq text's hidden states",
                               hint="use fewer tokens (--gptq-tokens), or --device cpu") from None
        self.tokens = h.shape[0]
        self._start(0, h)

    def fit(self, name: str) -> Weighted | None:
        """The fit of the quantized matrix `name` (None for a float16 record): weighted by its
        inputs, codes by GPTQ; experts never routed to: equal weights."""
        if name not in self.cols:
            return None
        self._reach(self.layer_of[name], name)
        gram = self.grams.gram.get(name)
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
        """The writer's bytes of matrix `name`: the steps after it run through them."""
        if self.layer_of.get(name) == self.layer:
            self.stored_layer[name] = (payload, shape, spec)

    def _start(self, layer: int, h: torch.Tensor) -> None:
        self.layer, self.step, self.stored_layer = layer, (), {}
        cfg, weights = self.ckpt.config, _StoredWeights(self.weights, self.stored_layer)
        if layer == cfg.num_hidden_layers:
            self.steps = head_steps(cfg, weights, h, self.grams)
        else:
            self.steps = layer_steps(cfg, weights, layer, h, self.spans, self.grams)

    def _reach(self, layer: int, name: str) -> None:
        """Run steps until the one that gives `name`'s inputs is done."""
        while not (self.layer == layer and name in self.step):
            if self.layer > layer:  # the writer's order is the steps' order (file order)
                raise MoepackError(f"--gptq: {name} asked for after the steps of layer {layer} ran",
                                   hint="this is a bug in moe-pack; please report it")
            self._advance()

    def _advance(self) -> None:
        self.grams.clear()  # the step before's are done with
        try:
            with torch.inference_mode():
                self.step = next(self.steps)
        except StopIteration as done:
            if self.layer == self.ckpt.config.num_hidden_layers:  # lm_head's step was the last
                raise MoepackError("--gptq: a matrix asked for after lm_head",
                                   hint="this is a bug in moe-pack; please report it") from None
            self._start(self.layer + 1, done.value)
        except torch.OutOfMemoryError:
            raise MoepackError(f"out of GPU memory running layer {self.layer} over the --gptq text",
                               hint="use fewer tokens (--gptq-tokens), or --device cpu") from None

    def describe(self) -> str:
        """What goes into the header's quantizer.method_version."""
        return (f"{METHOD_VERSION}; gptq, act order, damp 0.01, on the weighted fit's scales, each matrix after the "
                f"ones before it as stored; {self.tokens} tokens of text sha256:{text_sha256(self.text)[:16]} "
                f"in windows of {self.ctx}")
