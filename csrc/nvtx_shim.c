/* C shim over the header-only NVTX v3 API, so Rust can emit ranges without bindings to the
 * headers. build.rs compiles this file only when it finds include/nvtx3/nvToolsExt.h (CUDA
 * toolkit, or the nvidia-nvtx wheel that tools/install-nvcc.sh installs into .cuda).
 *
 * The header carries the implementation: the first call reads NVTX_INJECTION64_PATH (set by
 * nsys / ncu) and dlopens that tool; with no tool attached every call is a cheap no-op.
 * Names must be NUL-terminated; the tool copies them, so the caller keeps ownership. */
#include <nvtx3/nvToolsExt.h>

void demask_nvtx_push(const char *name) { nvtxRangePushA(name); }

void demask_nvtx_pop(void) { nvtxRangePop(); }

void demask_nvtx_mark(const char *name) { nvtxMarkA(name); }
