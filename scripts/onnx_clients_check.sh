#!/usr/bin/env bash
# The exported files in the ONNX runtimes people have: every shipped config exported
# (the book's two files; short deep_convnet_bn and photos runs on MNIST, which between
# them hold every layer kind), each run in onnxruntime 1.16.3 (needs numpy<2), 1.20.1
# and the newest, and in OpenCV's dnn, on MNIST's 10,000 test images against the
# engine and `lowmem-cnn eval`: the same prediction image for image, scores within
# 1e-4. Prints a Markdown table; exits 1 if any client differs.
#
#   scripts/onnx_clients_check.sh [VENVS]
#
# Needs lowmem-cnn with the onnx extra in the python on PATH, LOWMEM_CNN_DATA (default
# ../shared/data/mnist) and the package registry. The clients' venvs are made in VENVS
# (default /tmp/lowmem-onnx-clients) and kept for the next run.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
steps="$root/scripts/onnx_clients.py"
venvs="${1:-/tmp/lowmem-onnx-clients}"
export LOWMEM_CNN_DATA="$(realpath "${LOWMEM_CNN_DATA:-$root/../shared/data/mnist}")"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
book="$root/tests/fixtures/book"

# client name, then what pip installs for it
clients=(
  "ort-1.16.3|onnxruntime==1.16.3 numpy<2"
  "ort-1.20.1|onnxruntime==1.20.1 numpy"
  "ort-newest|onnxruntime numpy"
  "opencv|opencv-python-headless numpy"
)
for entry in "${clients[@]}"; do
  name="${entry%%|*}"
  if [ ! -x "$venvs/$name/bin/python" ]; then
    python3 -m venv "$venvs/$name"
    # shellcheck disable=SC2086  # the requirements are words
    "$venvs/$name/bin/pip" install --quiet ${entry#*|} 2>&1 | grep -v "^WARNING: Location" || true
  fi
done

# model name, parameter file, config (empty: the file's own)
train() {  # a short run of a shipped config: its weights are trained, not its starting ones
  lowmem-cnn train --config "$1" --epochs 1 --limit 1000 --max-ram 1G --out "$work/$1.pkl" \
    > "$work/$1.train.log" 2>&1
}
train deep_convnet_bn
train photos
models=(
  "simple_convnet|$book/simple_convnet_params.pkl|"
  "deep_convnet|$book/deep_convnet_params.pkl|deep_convnet"
  "deep_convnet_bn|$work/deep_convnet_bn.pkl|"
  "photos|$work/photos.pkl|"
)
for entry in "${models[@]}"; do
  IFS='|' read -r model params config <<< "$entry"
  options=()
  [ -n "$config" ] && options=(--config "$config")
  lowmem-cnn export "$params" "$work/$model.onnx" "${options[@]}" | cut -d: -f1
  lowmem-cnn eval "$params" "${options[@]}" --json --max-ram 1G > "$work/$model.eval.json" \
    2> "$work/$model.eval.log"
  python "$steps" reference "$model" "$params" "$config" "$work"
done

echo
echo "| model | client | correct | eval's | predictions differing | largest score difference | |"
echo "| --- | --- | ---: | ---: | ---: | ---: | --- |"
status=0
for entry in "${clients[@]}"; do
  name="${entry%%|*}"
  client=onnxruntime
  [ "$name" = opencv ] && client=opencv
  for model_entry in "${models[@]}"; do
    model="${model_entry%%|*}"
    version="$("$venvs/$name/bin/python" "$steps" run "$client" "$model" "$work")"
    python "$steps" compare "$model" "$work/$model.eval.json" "$work" "$version" || status=1
  done
done
exit "$status"
