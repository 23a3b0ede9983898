"""Checkpoint -> .moepack: the whole `moe-pack quantize` pipeline.

Streaming: records are produced in file order and each source tensor is read, encoded,
written and dropped before the next is read, so peak memory is a small multiple of the
largest tensor (the embedding table) whatever the model size. The writer streams records to
a temporary file and renames it into place only after its header validates; any error or
Ctrl-C before then removes the temporaries and leaves OUT untouched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from formats.errors import ConfigError
from formats.header import QuantizerInfo
from formats.writer import MoepackWriter

from .info import hqq_version, package_version
from .recipe import QuantRecipe
from .source import Checkpoint, local_folder, open_checkpoint
from .streaming import StreamedShards, hub_fetch, hub_headers
from .tensors import ExpertItem, TensorItem, load, plan_records, quantized_matrices
from . import imatrix as imatrix_module
from .hqq_codec import Weighted, encode_tensor

# The weighted fit's own version (quantize/fit.py), recorded in the header with the imatrix
FIT_VERSION = "1"


class Fits:
    """Which fit each quantized matrix gets under --imatrix: weighted by its importances, or,
    where the imatrix has none (an expert never routed to in calibration, lm_head), by equal
    weights: the same least squares, every column alike."""

    method = "weighted-lsq"  # the header's quantizer.method

    def __init__(self, imatrix: imatrix_module.Imatrix, path: Path, file_recipe):
        self.imatrix, self.path, self.recipe = imatrix, path, file_recipe
        self.cols: dict[str, int] = {}
        self.weighted = self.equal = 0  # matrices fitted with importances, and with equal weights

    def check(self, plan: list) -> None:
        """Before any work: the imatrix fits this checkpoint (column counts) and covers some of
        its quantized matrices."""
        self.cols = {name: cols for name, (cols, _) in quantized_matrices(plan, self.recipe).items()}
        if not self.cols:
            raise ConfigError(f"--imatrix {self.path}: this recipe quantizes no matrix (every role 16-bit)",
                              hint="drop --imatrix, or quantize some role to 2, 3, 4 or 8 bits")
        hits = [n for n in self.cols if self.imatrix.importance(n, self.cols[n], str(self.path)) is not None]
        if not hits:
            raise imatrix_module.ImatrixError(
                f"{self.path}: no importances for any quantized matrix of this checkpoint",
                hint="the importance matrix was measured on another model; run moe-pack imatrix on a file of this checkpoint")

    def fit(self, name: str) -> Weighted | None:
        """The fit of the quantized matrix `name`; None for a record stored as float16."""
        cols = self.cols.get(name)
        if cols is None:
            return None
        imp = self.imatrix.importance(name, cols, str(self.path))
        if imp is None:
            self.equal += 1
        else:
            self.weighted += 1
        return Weighted(imp)

    def stored(self, name: str, payload: bytes, shape: tuple[int, ...], spec) -> None:
        """The bytes written for matrix `name`: a fit from an imatrix has no use for them."""

    def describe(self) -> str:
        return f"{FIT_VERSION}; {imatrix_module.describe(self.imatrix, self.path)}"


@dataclass(frozen=True)
class GptqOptions:
    """quantize --gptq: the calibration text, its window length and how many tokens to use."""

    text: str
    ctx: int = 512
    max_tokens: int | None = 8192


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    records: int
    file_bytes: int
    device: str
    shards_peak_bytes: int | None = None  # --low-disk: the most shard bytes on disk at once
    shards_peak: int | None = None  # and the most shards
    calibrated_fits: tuple[int, int] | None = None  # --imatrix or --gptq: matrices fitted with importances, with equal weights


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when torch sees a GPU, else 'cpu'."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device {device!r} is not one of auto, cpu, cuda", hint="use --device auto")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda, but torch sees no CUDA GPU", hint="use --device cpu (slower) or install a CUDA build of torch")
    return device


def check_output(out: Path) -> None:
    """Fail before any work (a Hub download, hours of quantizing) if OUT cannot be written."""
    if out.is_dir():
        raise ConfigError(f"output {out} is a folder", hint="pass a file name, e.g. -o model.moepack")
    if not out.parent.is_dir():
        raise ConfigError(f"output folder {out.parent} does not exist", hint="create it first, or pick another -o path")
    if not os.access(out.parent, os.W_OK):
        raise ConfigError(f"output folder {out.parent} is not writable", hint="pick another -o path")


def quantizer_info(source: str, fits=None) -> QuantizerInfo:
    """Provenance for the header: HQQ's version, or the fit's method and what drove it."""
    if fits is not None:
        return QuantizerInfo(name="moe-pack", version=package_version(), method=fits.method,
                             method_version=fits.describe(), source=source)
    return QuantizerInfo(name="moe-pack", version=package_version(), method="hqq", method_version=hqq_version(), source=source)


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="rec", desc="quantize", disable=not enabled, dynamic_ncols=True)


def quantize_checkpoint(
    src: str,
    out: str | os.PathLike,
    recipe: QuantRecipe = QuantRecipe(),
    *,
    device: str = "auto",
    revision: str | None = None,
    progress: bool = True,
    download: Callable | None = None,
    low_disk: bool = False,
    imatrix: str | os.PathLike | None = None,
    gptq: GptqOptions | None = None,
) -> QuantizeResult:
    """Quantize checkpoint `src` (folder or Hub repo id) into the .moepack file `out`.
    low_disk: a Hub repo's shards are downloaded one at a time and deleted once read
    (quantize/streaming.py) instead of all into the Hugging Face cache first. imatrix: an
    importance matrix file (quantize/imatrix.py): every quantized matrix is then fitted by
    weighted least squares (quantize/fit.py) instead of HQQ. gptq: a calibration text run
    through the checkpoint layer by layer: scales by the weighted fit, codes by GPTQ
    (quantize/gptq_calibration.py)."""
    out = Path(out)
    check_output(out)
    if gptq is not None:  # before a Hub download of the whole checkpoint
        from .calibrate import check_window_options

        check_window_options(gptq.ctx, gptq.max_tokens, least=2, options=("--gptq-ctx", "--gptq-tokens"))
    if gptq is not None and imatrix is not None:
        raise ConfigError("--gptq and --imatrix both choose the fit", hint="--gptq measures its own importances; drop --imatrix")
    weights = None if imatrix is None else imatrix_module.load(Path(imatrix))
    if gptq is not None and low_disk:
        raise ConfigError("--gptq reads each layer's shards again to run the layer; --low-disk deletes them",
                          hint="drop --low-disk (download the checkpoint), or drop --gptq")
    if low_disk and local_folder(src) is not None:
        raise ConfigError(f"--low-disk: {src} is a local folder, already on disk",
                          hint="--low-disk is for Hub repo ids; drop it")
    dev = resolve_device(device)
    windows: list[list[int]] = []  # --gptq's text, tokenized

    def before_weights(config, tokenizer) -> None:  # a bad option or text fails before a download
        recipe.build(config)
        if gptq is not None:
            from .imatrix_checkpoint import checkpoint_windows

            windows.extend(checkpoint_windows(config, tokenizer, gptq.text, gptq.ctx, gptq.max_tokens, src))

    ckpt: Checkpoint = open_checkpoint(src, revision=revision, download=download, check=before_weights,
                                       weights=not low_disk)
    file_recipe = recipe.build(ckpt.config)
    fits = None
    if weights is not None:
        fits = Fits(weights, Path(imatrix), file_recipe)
    elif gptq is not None:
        from .gptq_calibration import GptqFits

        fits = GptqFits(ckpt, gptq.text, gptq.ctx, windows, dev, file_recipe)
    if not low_disk:
        return _quantize(src, out, ckpt, file_recipe, plan_records(ckpt.folder, ckpt.config), dev, progress, None, fits)
    headers = hub_headers(src, revision)
    plan = plan_records(ckpt.folder, ckpt.config, headers)
    with StreamedShards(plan, headers, out.parent, lambda shard, folder: hub_fetch(src, revision, shard, folder)) as shards:
        result = _quantize(src, out, ckpt, file_recipe, plan, dev, progress, shards, fits)
    return replace(result, shards_peak_bytes=shards.peak_bytes, shards_peak=shards.peak_shards)


def _quantize(src: str, out: Path, ckpt: Checkpoint, file_recipe, plan: list, dev: str, progress: bool,
              shards: StreamedShards | None, fits: Fits | None = None) -> QuantizeResult:
    if fits is not None:
        fits.check(plan)  # before the writer's temporary and the first shard
    folder = ckpt.folder if shards is None else shards.folder
    info = quantizer_info(src, fits)
    with MoepackWriter(out, config=ckpt.config, tokenizer=ckpt.tokenizer, quantizer=info, recipe=file_recipe) as w, \
            _progress_bar(len(plan), progress) as bar:
        held: dict[int, tuple[bytes, float]] = {}  # plan index -> payload encoded early (StreamedShards.early)
        for i, item in enumerate(plan):
            bar.set_postfix_str(item.name, refresh=False)
            if shards is not None:
                shards.need(i)
            if isinstance(item, TensorItem):
                payload, err = held.pop(i) if i in held else _encode(folder, item.ref, file_recipe[item.role], dev,
                                                                     _fit(fits, item.name))
                w.add_tensor(item.name, item.role, item.layer, item.shape, payload, rel_error=err)
                if fits is not None and file_recipe[item.role].quantized:
                    fits.stored(item.name, payload, item.shape, file_recipe[item.role])
            else:
                _add_expert(w, folder, item, file_recipe["experts"], dev, fits)
            if shards is not None:
                for j in shards.early.get(i, ()):
                    held[j] = _encode(folder, plan[j].ref, file_recipe[plan[j].role], dev, _fit(fits, plan[j].name))
                shards.done(i)
            bar.update(1)
        path = w.finish()
    return QuantizeResult(path=path, records=len(plan), file_bytes=path.stat().st_size, device=dev,
                          calibrated_fits=None if fits is None else (fits.weighted, fits.equal))


def _encode(folder: Path, ref, spec, device: str, fit: Weighted | None = None) -> tuple[bytes, float]:
    W = load(folder, ref)  # the only tensor alive: it is dropped when this frame returns
    return encode_tensor(W, spec, device, ref.label(), fit if spec.quantized else None)


def _fit(fits: Fits | None, name: str) -> Weighted | None:
    return None if fits is None else fits.fit(name)


def _add_expert(w: MoepackWriter, folder: Path, item: ExpertItem, spec, device: str, fits: Fits | None = None) -> None:
    payloads, errors = {}, []
    for name, ref in item.refs:
        payloads[name], err = _encode(folder, ref, spec, device, _fit(fits, item.matrix_name(name)))
        errors.append(err)
        if fits is not None and spec.quantized:
            fits.stored(item.matrix_name(name), payloads[name], ref.shape, spec)
    w.add_expert(item.layer, item.expert, payloads, rel_error=tuple(errors))

