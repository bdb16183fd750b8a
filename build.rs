//! Compiles every `kernels/*.cu` with nvcc (one process per file, in parallel) into a fatbin
//! (SASS for each arch + PTX for the newest) and embeds them via `$OUT_DIR/kernels.rs`.
//! Without nvcc the crate still builds: the GPU backend then reports that no kernels are built.
//! With the `cuda` feature it also compiles `csrc/nvtx_shim.c` (cc crate) when it finds the
//! header-only NVTX v3 (`include/nvtx3`, next to an nvcc the same search accepts) and sets
//! `cfg(demask_nvtx)`; `DEMASK_NVTX_HEADERS` (1|0) tells the crate's tests which way it went.
use std::path::{Path, PathBuf};
use std::process::Command;
use std::{env, fs, thread};

fn find_nvcc(root: &Path) -> Option<PathBuf> {
    nvcc_candidates(root).into_iter().find(|p| p.is_file())
}

/// Where nvcc may live, in search order (the first that exists wins).
fn nvcc_candidates(root: &Path) -> Vec<PathBuf> {
    let mut cands: Vec<PathBuf> = Vec::new();
    if let Ok(p) = env::var("NVCC") {
        cands.push(p.into());
    }
    if let Ok(h) = env::var("CUDA_HOME") {
        cands.push(Path::new(&h).join("bin/nvcc"));
    }
    if let Ok(path) = env::var("PATH") {
        cands.extend(env::split_paths(&path).map(|d| d.join("nvcc")));
    }
    cands.push("/usr/local/cuda/bin/nvcc".into());
    cands.push(root.join(".cuda/bin/nvcc"));
    cands
}

/// The include folder holding `nvtx3/nvToolsExt.h` of the first toolkit (the folder above
/// `bin/nvcc`, as given or with links resolved) along the nvcc search that has one.
fn find_nvtx_include(root: &Path) -> Option<PathBuf> {
    let nvccs = nvcc_candidates(root).into_iter().filter(|p| p.is_file());
    let nvccs = nvccs.flat_map(|p| [fs::canonicalize(&p).ok(), Some(p)]).flatten();
    nvccs
        .filter_map(|p| Some(p.parent()?.parent()?.join("include")))
        .find(|i| i.join("nvtx3/nvToolsExt.h").is_file())
}

/// Compiles the NVTX shim when the headers are there; returns whether `cfg(demask_nvtx)` is on.
fn build_nvtx(root: &Path) -> bool {
    let shim = root.join("csrc/nvtx_shim.c");
    println!("cargo:rerun-if-changed={}", shim.display());
    let pins = root.join(".cuda/.pins");
    if pins.is_file() {
        println!("cargo:rerun-if-changed={}", pins.display());
    }
    let Some(inc) = find_nvtx_include(root) else { return false };
    println!("cargo:rerun-if-changed={}", inc.join("nvtx3/nvToolsExt.h").display());
    match cc::Build::new().file(&shim).include(&inc).try_compile("demask_nvtx") {
        Ok(()) => {
            println!("cargo:rustc-link-lib=dl");
            println!("cargo:rustc-cfg=demask_nvtx");
            true
        }
        Err(e) => {
            println!("cargo:warning=demask: NVTX shim did not compile ({e}); building without NVTX ranges");
            false
        }
    }
}

/// `DEMASK_CUDA_ARCHS`: comma-separated compute capabilities, e.g. "90a,80" (default).
/// SASS is emitted for each; PTX for the first, so newer GPUs can JIT it.
fn gencode_flags() -> Vec<String> {
    let archs = env::var("DEMASK_CUDA_ARCHS").unwrap_or_else(|_| "90a,80".into());
    let archs: Vec<&str> = archs.split(',').map(str::trim).filter(|a| !a.is_empty()).collect();
    let mut flags: Vec<String> =
        archs.iter().map(|a| format!("-gencode=arch=compute_{a},code=sm_{a}")).collect();
    if let Some(last) = archs.last() {
        flags.push(format!("-gencode=arch=compute_{last},code=compute_{last}"));
    }
    flags
}

fn main() {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var("OUT_DIR").unwrap());
    for v in ["NVCC", "CUDA_HOME", "PATH", "DEMASK_CUDA_ARCHS", "DEMASK_NO_KERNELS", "DEMASK_NVCC_FLAGS"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    println!("cargo:rerun-if-changed=kernels");
    let mut sources: Vec<PathBuf> = fs::read_dir(root.join("kernels"))
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    sources.retain(|p| p.extension().is_some_and(|e| e == "cu"));
    sources.sort();
    for p in fs::read_dir(root.join("kernels")).into_iter().flatten().flatten() {
        println!("cargo:rerun-if-changed={}", p.path().display());
    }

    let cuda = env::var_os("CARGO_FEATURE_CUDA").is_some();
    println!("cargo::rustc-check-cfg=cfg(demask_nvtx)");
    let nvtx = cuda && build_nvtx(&root);
    println!("cargo:rustc-env=DEMASK_NVTX_HEADERS={}", u8::from(nvtx));
    let nvcc = if cuda && env::var_os("DEMASK_NO_KERNELS").is_none() { find_nvcc(&root) } else { None };
    let mut entries = Vec::new();
    match nvcc {
        None => {
            if cuda {
                println!(
                    "cargo:warning=demask: nvcc not found (NVCC, CUDA_HOME, PATH, /usr/local/cuda, \
                     .cuda/); building without GPU kernels. Run tools/install-nvcc.sh to get them."
                );
            }
        }
        Some(nvcc) => {
            let gencode = gencode_flags();
            // Extra nvcc flags, e.g. `-DNAME` for a kernel variant built next to the default one.
            let extra: Vec<String> =
                env::var("DEMASK_NVCC_FLAGS").unwrap_or_default().split_whitespace().map(String::from).collect();
            let jobs: Vec<_> = sources
                .iter()
                .map(|src| {
                    let stem = src.file_stem().unwrap().to_string_lossy().into_owned();
                    let dst = out.join(format!("{stem}.fatbin"));
                    let mut cmd = Command::new(&nvcc);
                    cmd.args(["--fatbin", "-O3", "-std=c++17", "-lineinfo"])
                        .arg("-I")
                        .arg(root.join("kernels"))
                        .args(&gencode)
                        .args(&extra)
                        .arg(src)
                        .arg("-o")
                        .arg(&dst);
                    (stem, dst, thread::spawn(move || cmd.output()))
                })
                .collect();
            let mut failed = false;
            for (stem, dst, job) in jobs {
                let res = job.join().expect("nvcc thread");
                match res {
                    Ok(o) if o.status.success() => entries.push((stem, dst)),
                    Ok(o) => {
                        failed = true;
                        eprintln!("nvcc failed on kernels/{stem}.cu:\n{}{}",
                            String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
                    }
                    Err(e) => {
                        failed = true;
                        eprintln!("could not run {}: {e}", nvcc.display());
                    }
                }
            }
            if failed {
                panic!("demask: kernel compilation failed (nvcc output above)");
            }
        }
    }
    let mut code = String::from("/// (module name, fatbin) for every kernels/*.cu, built by build.rs.\n");
    code.push_str("pub const FATBINS: &[(&str, &[u8])] = &[\n");
    for (stem, dst) in &entries {
        code.push_str(&format!("    ({stem:?}, include_bytes!({:?})),\n", dst.display().to_string()));
    }
    code.push_str("];\n");
    fs::write(out.join("kernels.rs"), code).unwrap();
}
