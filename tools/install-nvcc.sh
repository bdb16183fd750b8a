#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler (nvcc + nvvm + crt + cudart headers + cccl) and the
# header-only NVTX v3 (include/nvtx3, for build.rs's NVTX shim) from PyPI wheels into a
# project-local folder, for machines without a CUDA toolkit (CI, laptops).
# Idempotent: a second run with the same pins returns at once. The wheels are unpacked into a
# staging folder ($prefix/site), merged into one CUDA_HOME-shaped tree, and the staging folder
# is deleted (about 270 MB), so the install holds only what nvcc needs.
# Pins (docs/design.md §7): newer nvvm emits PTX that the 13.0 ptxas and the 580 driver refuse,
# so the five compiler wheels move together. nvidia-nvtx is headers only (plus a small interop
# library nothing links); it stays on the 13.0 line with them.
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${DEMASK_NVCC_PREFIX:-$here/.cuda}"
pins=(
  nvidia-cuda-nvcc==13.0.88
  nvidia-nvvm==13.0.88
  nvidia-cuda-crt==13.0.88
  nvidia-cuda-runtime==13.0.96
  nvidia-cuda-cccl==13.0.85
  nvidia-nvtx==13.0.85
)
stamp="$prefix/.pins"
if [[ -f "$stamp" && "$(cat "$stamp")" == "${pins[*]}" && -x "$prefix/bin/nvcc" &&
      -f "$prefix/include/nvtx3/nvToolsExt.h" ]]; then
  # Earlier versions of this script kept the staging folder: drop it.
  rm -rf "$prefix/site"
  echo "nvcc already installed: $prefix/bin/nvcc"
  exit 0
fi
py="$(command -v python3 || command -v python)" || { echo "install-nvcc: python3 is needed" >&2; exit 1; }
site="$prefix/site"
rm -rf "$prefix"
mkdir -p "$site"
echo "install-nvcc: installing ${pins[*]} into $prefix"
"$py" -m pip install --quiet --disable-pip-version-check --no-deps --target "$site" "${pins[@]}"
# The wheels spread the toolkit over nvidia/cu13/{bin,include,lib,nvvm}; merge them into one
# CUDA_HOME-shaped tree so nvcc finds cicc, ptxas, crt and the headers where it expects them.
root="$(find "$site/nvidia" -mindepth 1 -maxdepth 1 -type d -name 'cu13' | head -n1)"
[[ -n "$root" ]] || root="$site/nvidia/cuda_nvcc"
for d in bin include lib nvvm; do
  mkdir -p "$prefix/$d"
  for src in "$site"/nvidia/*/"$d"; do
    [[ -d "$src" ]] && cp -a "$src/." "$prefix/$d/"
  done
done
[[ -e "$prefix/lib64" ]] || ln -s lib "$prefix/lib64"
chmod +x "$prefix"/bin/* "$prefix"/nvvm/bin/* 2>/dev/null || true
"$prefix/bin/nvcc" --version | tail -n 2
[[ -f "$prefix/include/nvtx3/nvToolsExt.h" ]] || { echo "install-nvcc: nvtx3 headers missing" >&2; exit 1; }
# Everything nvcc needs was copied out of the wheels: the staging folder can go.
rm -rf "$site"
echo "${pins[*]}" > "$stamp"
echo "nvcc installed: $prefix/bin/nvcc (build.rs finds it; or export NVCC=$prefix/bin/nvcc)"
