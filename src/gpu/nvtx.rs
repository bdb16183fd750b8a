//! NVTX ranges and marks for nsys / ncu timelines (per decode step, per layer). Built over the
//! header-only NVTX v3 through `csrc/nvtx_shim.c`, which build.rs compiles when it finds the
//! `nvtx3` headers (then `cfg(demask_nvtx)` is set); without them every call here is an empty
//! inline function. With the shim but no tool attached (no `NVTX_INJECTION64_PATH`, which nsys
//! and ncu set) the header turns every call into a cheap no-op after the first, so ranges stay
//! on unconditionally.
//!
//! Hot paths pass static C strings and allocate nothing: `let _r = nvtx::range(c"layer");`.
//! Rare, formatted names go through [`Range::dynamic`] / [`push_str`] (one allocation each).
//! NVTX push/pop ranges are per thread, so [`Range`] is not `Send`: it pops on the thread
//! that pushed. Tools copy the name when a range is pushed; it need not outlive the call.
use std::ffi::{CStr, CString};
use std::marker::PhantomData;

#[cfg(demask_nvtx)]
mod ffi {
    use std::os::raw::c_char;

    extern "C" {
        pub fn demask_nvtx_push(name: *const c_char);
        pub fn demask_nvtx_pop();
        pub fn demask_nvtx_mark(name: *const c_char);
    }
}

/// Whether this build emits NVTX ranges (build.rs found the nvtx3 headers).
pub const fn enabled() -> bool {
    cfg!(demask_nvtx)
}

/// Opens a range on this thread's NVTX stack; close it with [`pop`] on the same thread.
#[inline(always)]
pub fn push(name: &CStr) {
    #[cfg(demask_nvtx)]
    // SAFETY: `name` is a valid NUL-terminated string for the duration of the call; the NVTX
    // implementation (or the attached tool) copies it before returning.
    unsafe {
        ffi::demask_nvtx_push(name.as_ptr())
    };
    #[cfg(not(demask_nvtx))]
    let _ = name;
}

/// [`push`] for a Rust string: allocates a C string (cut at the first NUL), so keep it off
/// hot paths.
pub fn push_str(name: &str) {
    push(&c_string(name));
}

/// Closes the innermost range this thread pushed.
#[inline(always)]
pub fn pop() {
    #[cfg(demask_nvtx)]
    // SAFETY: no arguments; popping an empty stack is defined by NVTX (returns an error code).
    unsafe {
        ffi::demask_nvtx_pop()
    };
}

/// An instantaneous marker on the timeline.
#[inline(always)]
pub fn mark(name: &CStr) {
    #[cfg(demask_nvtx)]
    // SAFETY: as in `push`: a valid NUL-terminated string, copied before the call returns.
    unsafe {
        ffi::demask_nvtx_mark(name.as_ptr())
    };
    #[cfg(not(demask_nvtx))]
    let _ = name;
}

/// A range open for this guard's lifetime: pushed by [`Range::new`], popped on drop.
#[must_use = "a Range closes when dropped; bind it: `let _r = nvtx::range(c\"step\");`"]
pub struct Range {
    /// Not `Send`/`Sync`: NVTX range stacks are per thread.
    _thread: PhantomData<*const ()>,
}

impl Range {
    /// Pushes `name`; static names (`c"step"`) cost no allocation.
    #[inline(always)]
    pub fn new(name: &CStr) -> Range {
        push(name);
        Range { _thread: PhantomData }
    }

    /// A range with a formatted name (one allocation; the name is cut at its first NUL).
    pub fn dynamic(name: String) -> Range {
        Range::new(&c_string(&name))
    }
}

impl Drop for Range {
    #[inline(always)]
    fn drop(&mut self) {
        pop();
    }
}

/// `Range::new` under a short name for call sites: `let _r = nvtx::range(c"layer");`.
#[must_use = "a Range closes when dropped; bind it: `let _r = nvtx::range(c\"layer\");`"]
#[inline(always)]
pub fn range(name: &'static CStr) -> Range {
    Range::new(name)
}

/// `name` up to its first NUL, as a C string.
fn c_string(name: &str) -> CString {
    let bytes = name.as_bytes();
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    CString::new(&bytes[..end]).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enabled_matches_build() {
        let headers = env!("DEMASK_NVTX_HEADERS");
        assert!(headers == "1" || headers == "0", "DEMASK_NVTX_HEADERS={headers}");
        assert_eq!(enabled(), headers == "1", "cfg(demask_nvtx) disagrees with build.rs");
    }

    #[test]
    fn c_string_cuts_at_nul() {
        assert_eq!(c_string("layer 3").as_bytes(), b"layer 3");
        assert_eq!(c_string("a\0b").as_bytes(), b"a");
        assert_eq!(c_string("").as_bytes(), b"");
        assert_eq!(c_string("schicht \u{e4}").as_bytes(), "schicht \u{e4}".as_bytes());
    }

    /// Balanced, nested ranges and marks with no tool attached (or whatever tool the
    /// environment names) must not crash; run many times to pass the one-time init.
    #[test]
    fn balanced_ranges() {
        for step in 0..2000u32 {
            let _s = range(c"step");
            mark(c"mark");
            for _ in 0..4 {
                let _l = Range::new(c"layer");
                push(c"attention");
                pop();
            }
            if step % 500 == 0 {
                let _d = Range::dynamic(format!("refresh {step}"));
                push_str("nul\0inside");
                pop();
            }
        }
        let handles: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for _ in 0..500 {
                        let _r = Range::dynamic(format!("thread {t}"));
                        let _i = range(c"inner");
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().expect("nvtx thread");
        }
    }

    /// A tool path that cannot be loaded must leave NVTX a no-op, not abort: re-runs
    /// `balanced_ranges` in a child process (NVTX initialises once per process).
    #[test]
    fn missing_injection_library_is_harmless() {
        if !enabled() {
            eprintln!("skipped: built without NVTX headers");
            return;
        }
        let exe = std::env::current_exe().expect("test binary path");
        let out = std::process::Command::new(exe)
            .args(["--exact", "gpu::nvtx::tests::balanced_ranges", "--test-threads=1"])
            .env("NVTX_INJECTION64_PATH", "/nonexistent/demask/libnvtx-missing.so")
            .output()
            .expect("spawn test binary");
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "child failed ({}):\n{text}", out.status);
        assert!(text.contains("1 passed"), "child did not run balanced_ranges:\n{text}");
    }
}
