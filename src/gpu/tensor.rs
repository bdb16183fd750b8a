//! `DTensor<T>`: a device buffer plus its dims. Row-major and contiguous; `dims` is the
//! allocated (capacity) shape: ops that work on fewer rows take the row count separately.
use cudarc::driver::{CudaSlice, DevicePtr, DevicePtrMut, DeviceRepr};

use super::{drv, Gpu};
use crate::error::{Error, Result};

pub struct DTensor<T> {
    pub buf: CudaSlice<T>,
    pub dims: Vec<usize>,
}

impl<T: DeviceRepr> DTensor<T> {
    pub fn alloc(gpu: &Gpu, dims: &[usize]) -> Result<Self> {
        let n: usize = dims.iter().product();
        let bytes = n * std::mem::size_of::<T>();
        // SAFETY: the contents are uninitialised device memory; every op writes before it reads.
        let buf = unsafe { gpu.stream.alloc::<T>(n.max(1)) }.map_err(|e| {
            let free = gpu.mem_info().map(|(f, _)| f).unwrap_or(0);
            Error::OutOfMemory(format!(
                "allocating {dims:?} ({bytes} bytes) with {free} bytes free: {e:?}"
            ))
        })?;
        Ok(DTensor { buf, dims: dims.to_vec() })
    }

    pub fn from_host(gpu: &Gpu, host: &[T], dims: &[usize]) -> Result<Self> {
        let n: usize = dims.iter().product();
        if host.len() != n {
            return Err(Error::shape("upload", "host", dims, &[host.len()]));
        }
        let mut t = Self::alloc(gpu, dims)?;
        if n > 0 {
            gpu.stream.memcpy_htod(host, &mut t.buf).map_err(drv("cuMemcpyHtoD"))?;
        }
        Ok(t)
    }

    /// Copies the first `n` elements back to the host (synchronising).
    pub fn to_host_n(&self, gpu: &Gpu, n: usize) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        if n > self.len() {
            return Err(Error::shape("download", "tensor", &[self.len()], &[n]));
        }
        let mut out = vec![T::default(); n];
        if n > 0 {
            gpu.stream.memcpy_dtoh(&self.buf.slice(0..n), &mut out).map_err(drv("cuMemcpyDtoH"))?;
        }
        Ok(out)
    }

    pub fn to_host(&self, gpu: &Gpu) -> Result<Vec<T>>
    where
        T: Default + Clone,
    {
        self.to_host_n(gpu, self.len())
    }

    /// Overwrites the first `host.len()` elements.
    pub fn write(&mut self, gpu: &Gpu, host: &[T]) -> Result<()> {
        if host.len() > self.len() {
            return Err(Error::shape("write", "tensor", &[self.len()], &[host.len()]));
        }
        if !host.is_empty() {
            let mut dst = self.buf.slice_mut(0..host.len());
            gpu.stream.memcpy_htod(host, &mut dst).map_err(drv("cuMemcpyHtoD"))?;
        }
        Ok(())
    }

    /// Copies the first `n` elements into `dst` from element `at` on (device to device, on
    /// the stream: ordered with the kernels around it; not for use inside a graph capture's
    /// hot path, which is why `GpuModel` copies only when asked).
    pub fn copy_to(&self, gpu: &Gpu, n: usize, dst: &mut DTensor<T>, at: usize) -> Result<()> {
        if n > self.len() || at + n > dst.len() {
            return Err(Error::shape("copy", "tensor", &[dst.len()], &[at + n]));
        }
        if n > 0 {
            let src = self.buf.slice(0..n);
            let mut d = dst.buf.slice_mut(at..at + n);
            gpu.stream.memcpy_dtod(&src, &mut d).map_err(drv("cuMemcpyDtoD"))?;
        }
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.dims.iter().product()
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Elements per row (product of all dims but the first).
    pub fn row_len(&self) -> usize {
        self.dims.iter().skip(1).product()
    }
    pub fn rows(&self) -> usize {
        self.dims.first().copied().unwrap_or(0)
    }
    pub fn bytes(&self) -> usize {
        self.len() * std::mem::size_of::<T>()
    }

    /// Raw device address (for kernel parameter structs). Event tracking is off (one stream).
    pub fn ptr(&self, gpu: &Gpu) -> u64 {
        let (p, _guard) = self.buf.device_ptr(&gpu.stream);
        p
    }
    pub fn ptr_mut(&mut self, gpu: &Gpu) -> u64 {
        let (p, _guard) = self.buf.device_ptr_mut(&gpu.stream);
        p
    }

    /// Checks that the tensor holds at least `rows` rows of `row_len` elements.
    pub fn check_rows(&self, op: &str, name: &str, rows: usize, row_len: usize) -> Result<()> {
        if self.row_len() != row_len || self.rows() < rows {
            return Err(Error::shape(op, name, &[rows, row_len], &self.dims));
        }
        Ok(())
    }
}
