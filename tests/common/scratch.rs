//! Scratch directories and checkpoint-file surgery for the loader and command-line tests.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use demask::weights::HostWeights;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("demask-test-{}-{n}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `.safetensors` files of a checkpoint directory, sorted.
pub fn shards(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Rewrites every shard through `edit(name, dtype, shape, data)` (None drops the tensor).
pub fn rewrite(dir: &Path, edit: impl Fn(&str, Dtype, &[usize], &[u8]) -> Option<(Vec<usize>, Vec<u8>)>) {
    for path in shards(dir) {
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let kept: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
            .tensors()
            .into_iter()
            .filter_map(|(n, v)| edit(&n, v.dtype(), v.shape(), v.data()).map(|(s, b)| (n, v.dtype(), s, b)))
            .collect();
        let views: Vec<(String, TensorView<'_>)> =
            kept.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
        std::fs::write(&path, safetensors::serialize(views, None).unwrap()).unwrap();
    }
}

/// The error message of loading `dir` (panics if it loads).
pub fn load_err(dir: &Path) -> String {
    match HostWeights::load(dir) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}
