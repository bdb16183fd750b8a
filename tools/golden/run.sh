#!/usr/bin/env bash
# Regenerates the golden fixtures: makes both tiny checkpoints with the given demask binary
# (fixed seeds) and runs make_golden.py (transformers, f32, bidirectional) on each.
# Builds nothing. Needs python3 with torch, transformers, safetensors and numpy
# (PYTHON=... to choose the interpreter; /work/venv-golden is used when present).
#
#   tools/golden/run.sh path/to/demask [FIXTURE_DIR]    (default FIXTURE_DIR: tests/fixtures)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
demask="${1:?usage: tools/golden/run.sh path/to/demask [FIXTURE_DIR]}"
out="${2:-$root/tests/fixtures}"
[[ -x "$demask" ]] || { echo "golden: $demask is not an executable" >&2; exit 1; }
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x /work/venv-golden/bin/python ]]; then PYTHON=/work/venv-golden/bin/python; else PYTHON=python3; fi
fi
"$PYTHON" -c 'import torch, transformers, safetensors, numpy' || {
  echo "golden: $PYTHON lacks torch/transformers/safetensors/numpy" >&2; exit 1; }
mkdir -p "$out"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# preset:seed pairs; tests/golden.rs reads preset and seed back from the fixture metadata.
for pair in tiny-llada:7 tiny-dream:11; do
  preset="${pair%%:*}" seed="${pair##*:}"
  echo "== golden: $preset (seed $seed)"
  "$demask" make-checkpoint --preset "$preset" --seed "$seed" --out "$tmp/$preset"
  "$PYTHON" "$here/make_golden.py" --checkpoint "$tmp/$preset" --preset "$preset" --seed "$seed" \
    --len "${GOLDEN_LEN:-32}" --out "$out/golden-$preset.safetensors"
done
chmod 644 "$out"/golden-*.safetensors
ls -l "$out"/golden-*.safetensors
