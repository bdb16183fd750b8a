//! GPU side of the benchmark: ceilings and the forward workload.
use std::sync::Arc;

use half::bf16;

use super::*;
use crate::error::Result;
use crate::gpu::{drv, gemm::linear, Gpu, Timer};
use crate::model::GpuModel;
use crate::ops;

pub fn measure_ceilings(gpu: &Arc<Gpu>) -> Result<Ceilings> {
    // Copy: 1 GiB device to device, 10 times.
    let n = 1usize << 29; // bf16 elements = 1 GiB
    let mut a = gpu.alloc::<bf16>(&[n])?;
    let mut b = gpu.alloc::<bf16>(&[n])?;
    ops::fill::fill_normal(gpu, &mut a, 1, 0.0, 1.0)?;
    let timer = Timer::new(gpu)?;
    gpu.stream.memcpy_dtod(&a.buf, &mut b.buf).map_err(drv("cuMemcpyDtoD"))?;
    let mut best = f64::MAX;
    for _ in 0..5 {
        timer.start(gpu)?;
        for _ in 0..4 {
            gpu.stream.memcpy_dtod(&a.buf, &mut b.buf).map_err(drv("cuMemcpyDtoD"))?;
        }
        best = best.min(timer.stop_ms(gpu)? as f64 / 4.0);
    }
    let copy_gbps = 2.0 * (n * 2) as f64 / (best * 1e-3) / 1e9;
    drop((a, b));
    // GEMM: 8192³ bf16 on random data.
    let m = 8192usize;
    let mut x = gpu.alloc::<bf16>(&[m, m])?;
    let mut w = gpu.alloc::<bf16>(&[m, m])?;
    let mut y = gpu.alloc::<bf16>(&[m, m])?;
    ops::fill::fill_normal(gpu, &mut x, 2, 0.0, 1.0)?;
    ops::fill::fill_normal(gpu, &mut w, 3, 0.0, 0.01)?;
    linear(gpu, m, &x, &w, None, &mut y)?;
    let mut times = Vec::new();
    for _ in 0..10 {
        timer.start(gpu)?;
        linear(gpu, m, &x, &w, None, &mut y)?;
        times.push(timer.stop_ms(gpu)? as f64);
    }
    let t = Stats::of(&times).median_ms;
    let gemm_tflops = 2.0 * (m * m * m) as f64 / (t * 1e-3) / 1e12;
    // Never fatal: a bf16 bench must not fail on the FP8 path.
    let (fp8_tflops, fp8_path) = match measure_fp8(gpu, &x, &w, &timer) {
        Ok(Some((r, p))) => (Some(r), Some(p.name())),
        Ok(None) => (None, None),
        Err(e) => {
            eprintln!("note: FP8 GEMM ceiling not measured: {e}");
            (None, None)
        }
    };
    Ok(Ceilings { device: gpu.name.clone(), sm_count: gpu.sm_count, copy_gbps, gemm_tflops, fp8_tflops, fp8_path })
}

/// The W8A8 GEMM (`ops::gemm_w8a8`, the path `DEMASK_W8A8` allows, default the first
/// that runs) on the 8192² operands `x` and `w`, quantised once: TFLOP/s (median of 10)
/// and the path, or `None` where cuBLASLt cannot run it.
fn measure_fp8(
    gpu: &Arc<Gpu>,
    x: &crate::gpu::DTensor<bf16>,
    w: &crate::gpu::DTensor<bf16>,
    timer: &Timer,
) -> Result<Option<(f64, crate::ops::gemm_w8a8::W8a8Path)>> {
    use crate::ops::{gemm_fp8::Fp8Weight, gemm_w8a8::W8a8};
    let m = x.rows();
    let wq = Fp8Weight::quantize(gpu, w, crate::quant::ScaleLayout::Channel)?;
    let mut y = gpu.alloc::<bf16>(&[m, m])?;
    let mut mm = W8a8::new(gpu, m, m)?;
    if matches!(mm.selected(), crate::ops::gemm_w8a8::W8a8Select::Skinny | crate::ops::gemm_w8a8::W8a8Select::Stream) {
        // `DEMASK_W8A8=skinny|stream` picks a decode kernel (at most 64 rows): the ceiling is the
        // large-row rate, so measure it on the paths `auto` would take (the line names it).
        mm.select(gpu, crate::ops::gemm_w8a8::W8a8Select::Auto)?;
    }
    let Some(path) = mm.linear(gpu, m, x, &wq, None, &mut y)? else {
        return Ok(None);
    };
    let mut times = Vec::new();
    for _ in 0..10 {
        timer.start(gpu)?;
        mm.linear(gpu, m, x, &wq, None, &mut y)?;
        times.push(timer.stop_ms(gpu)? as f64);
    }
    // Includes the activation quantiser (reads 128 MB, writes 64 MB: ≈ 0.07 ms of ≈ 0.8),
    // which is part of every W8A8 GEMM, and on `split-scale` the scale epilogue (reads and
    // writes 128 MB: ≈ 0.08 ms).
    let t = Stats::of(&times).median_ms;
    Ok(Some((2.0 * (m * m * m) as f64 / (t * 1e-3) / 1e12, path)))
}

/// A decode-shaped batch: `batch` sequences of `len` positions, of which the `live` rows
/// starting at `start` are recomputed (the rest read from the KV cache), with logits for
/// every live row — e.g. a `dual` step is live = block_len rows of a len-row canvas.
pub fn decode_batch(cfg: &ModelConfig, len: usize, live: usize, start: usize, batch: usize) -> crate::batch::RowBatch {
    use crate::batch::{RowBatch, SeqSpan};
    let mut b = RowBatch::default();
    for i in 0..batch {
        let row_start = b.tokens.len() as u32;
        b.tokens.extend(synthetic_tokens(live, cfg.vocab, 31 + i as u64));
        b.positions.extend((start..start + live).map(|p| p as u32));
        b.seqs.push(SeqSpan { row_start, row_count: live as u32, cache_base: (i * len) as u32, kv_len: len as u32 });
    }
    b.logit_rows = (0..b.tokens.len() as u32).collect();
    b
}

/// Times `iters` forwards of `b` after `warmup` (CUDA events; median of the iterations).
pub fn time_batch(model: &mut GpuModel, b: &crate::batch::RowBatch, warmup: usize, iters: usize) -> Result<Stats> {
    let gpu = model.gpu.clone();
    for _ in 0..warmup {
        model.forward(b)?;
    }
    gpu.synchronize()?;
    let timer = Timer::new(&gpu)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        timer.start(&gpu)?;
        model.forward(b)?;
        times.push(timer.stop_ms(&gpu)? as f64);
    }
    Ok(Stats::of(&times))
}

/// Times `iters` full-canvas forwards of `batch` sequences of `len` tokens.
pub fn bench_forward(
    model: &mut GpuModel,
    len: usize,
    batch: usize,
    warmup: usize,
    iters: usize,
) -> Result<Stats> {
    let vocab = model.cfg.vocab;
    let seqs: Vec<Vec<u32>> = (0..batch).map(|i| synthetic_tokens(len, vocab, 17 + i as u64)).collect();
    let b = crate::batch::RowBatch::full(&seqs);
    let gpu = model.gpu.clone();
    for _ in 0..warmup {
        model.forward(&b)?;
    }
    gpu.synchronize()?;
    let timer = Timer::new(&gpu)?;
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        timer.start(&gpu)?;
        model.forward(&b)?;
        times.push(timer.stop_ms(&gpu)? as f64);
    }
    Ok(Stats::of(&times))
}
