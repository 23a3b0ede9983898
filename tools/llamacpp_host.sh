#!/usr/bin/env bash
# Build llama.cpp's llama-bench (CPU backend, -march=native) and the two ggml tools of tools/ on a
# machine that has a C/C++ compiler but neither cmake nor llama.cpp's sources: the GPU host
# (tools/gpu_all.sh stage 19), so that llama.cpp's CPU speed is measured on the same cores as
# moe-pack's. Everything comes from DIR (default .cache/llamacpp, git-ignored; pass it in the
# device call's carry):
#   llama.cpp-src.tgz   llama.cpp's sources: llama-cpp-python 0.3.36's vendor/llama.cpp (build
#                       0c1e570) without its docs, models, tests, web UI and GPU backends (~6 MB)
#   cmake-*.whl, ninja-*.whl   from PyPI (~30 MB)
# Prepare DIR on a machine with PyPI (LL: an unpacked llama.cpp tree, e.g. from the sdist):
#   pip download --only-binary :all: --no-deps --platform manylinux2014_x86_64 -d .cache/llamacpp cmake ninja
#   tar czf .cache/llamacpp/llama.cpp-src.tgz -C $LL --exclude=tools/ui --exclude=ggml/src/ggml-cuda \
#       --exclude=ggml/src/ggml-metal --exclude=ggml/src/ggml-vulkan --exclude=ggml/src/ggml-sycl \
#       --exclude=ggml/src/ggml-cann --exclude=ggml/src/ggml-musa --exclude=ggml/src/ggml-opencl \
#       CMakeLists.txt cmake ggml src include common tools vendor app LICENSE licenses
# Output in BUILD (default /tmp/llamacpp-build): llama-bench, ggml_expert_bench, ggml_mixtral_gguf.
set -eu -o pipefail
cd "$(dirname "$0")/.."
DIR=${DIR:-.cache/llamacpp}
BUILD=${BUILD:-/tmp/llamacpp-build}
PY=${PY:-python3}
JOBS=${JOBS:-$(nproc)}
for f in "$DIR"/llama.cpp-src.tgz "$DIR"/cmake-*.whl "$DIR"/ninja-*.whl; do
  [ -e "$f" ] || { echo "llamacpp_host.sh: $f is missing: prepare $DIR as this file's header says" >&2; exit 2; }
done
mkdir -p "$BUILD/src"
$PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$BUILD/site" "$DIR"/cmake-*.whl "$DIR"/ninja-*.whl
export PATH="$BUILD/site/bin:$PATH" PYTHONPATH="$BUILD/site${PYTHONPATH:+:$PYTHONPATH}"
tar xzf "$DIR/llama.cpp-src.tgz" -C "$BUILD/src"
# the configuration the comparisons on dev-cpu used (docs/BENCHMARKS.md sections 26 and 27)
# the logs stay in BUILD on the host: on failure their tail goes to stderr, which comes back
failed() { echo "llamacpp_host.sh: $1 failed; the end of $2:" >&2; tail -n 60 "$2" >&2; exit 1; }
cmake -S "$BUILD/src" -B "$BUILD/cmake" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
  -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF -DGGML_CUDA=OFF > "$BUILD/cmake.log" 2>&1 || failed cmake "$BUILD/cmake.log"
cmake --build "$BUILD/cmake" -j "$JOBS" --target llama-bench ggml ggml-base ggml-cpu > "$BUILD/build.log" 2>&1 \
  || failed "the build" "$BUILD/build.log"
cp "$BUILD/cmake/bin/llama-bench" "$BUILD/"
L="$BUILD/cmake/ggml/src"
for tool in ggml_expert_bench ggml_mixtral_gguf; do
  gcc -O2 -march=native -fopenmp -I"$BUILD/src/ggml/include" "tools/$tool.c" -o "$BUILD/$tool" \
    "$L/libggml.a" "$L/libggml-cpu.a" "$L/libggml-base.a" -lstdc++ -lm -lpthread
done
echo "built $BUILD/llama-bench $BUILD/ggml_expert_bench $BUILD/ggml_mixtral_gguf"
