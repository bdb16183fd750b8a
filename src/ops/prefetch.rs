//! `l2_prefetch` (kernels/prefetch.cu): pulls weights a later GEMM reads into L2 while the
//! kernels in between leave DRAM idle. A hint: it changes no value, only when bytes arrive.
//!
//! In a decode step of 32 rows, RoPE, attention and the quantisers between the QKV and O GEMMs
//! are latency-bound and read little; the forward ([`L2Prefetch`]) can fill that gap with the
//! O weight and part of gate|up, and the gap after the down GEMM with part of the next layer's
//! QKV weight.
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::gpu::launch::{launch_ex_on, LaunchEx};
use crate::gpu::Gpu;

/// Regions one launch can take (PF_MAX_REGIONS in the .cu).
pub const MAX_REGIONS: usize = 4;
/// Bytes per prefetch of a region taken whole (one TMA request each).
const WHOLE_CHUNK: usize = 16 << 10;
/// Bytes per prefetch of a region spread evenly: one row of a 4096-wide FP8 weight.
const SPREAD_CHUNK: usize = 4 << 10;
/// A spread region takes `take` chunks of every `SPREAD_PERIOD`.
const SPREAD_PERIOD: usize = 64;

/// Mirrors `struct PrefetchRegion` in kernels/prefetch.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PrefetchRegion {
    base: u64,
    bytes: u64,
    chunk: u32,
    period: u32,
    take: u32,
    selected: u32,
}

/// Mirrors `struct PrefetchParams` in kernels/prefetch.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct PrefetchParams {
    r: [PrefetchRegion; MAX_REGIONS],
    n_regions: i32,
    pad: i32,
}

// SAFETY: plain-old-data with the C layout of `PrefetchParams`.
unsafe impl cudarc::driver::DeviceRepr for PrefetchParams {}

/// What one `l2_prefetch` launch fetches ([`plan`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    params: PrefetchParams,
    /// Bytes the launch asks for.
    pub bytes: usize,
}

impl Plan {
    /// Prefetch requests (chunks) in the launch.
    pub fn chunks(&self) -> usize {
        self.params.r[..self.params.n_regions as usize].iter().map(|r| r.selected as usize).sum()
    }
}

/// Chunks `i < n` with `i % period < take`.
fn selected(n: usize, period: usize, take: usize) -> usize {
    n / period * take + (n % period).min(take)
}

/// Bytes of those chunks (the last chunk of the region may be short).
fn selected_bytes(bytes: usize, chunk: usize, period: usize, take: usize) -> usize {
    let n = bytes.div_ceil(chunk);
    let full = selected(n, period, take) * chunk;
    let last = n - 1;
    if last % period < take { full - (n * chunk - bytes) } else { full }
}

/// Plans a prefetch of up to `budget` bytes over `items` (device address, bytes), in order:
/// each item whole while the budget holds it; of the first item it does not hold, the part
/// the budget reaches: its first bytes, or with `spread` a share of every 64 chunks of 4 KB
/// (so every tile of the GEMM that reads it finds the same share in L2). Stops there, or after
/// [`MAX_REGIONS`] items. Bytes past the last multiple of 16 of an item are left out. An error
/// for an address that is not 16-byte aligned (the TMA's requirement).
pub fn plan(items: &[(u64, usize)], budget: usize, spread: bool) -> Result<Plan> {
    let mut p = Plan::default();
    let mut left = budget;
    for &(base, bytes) in items.iter().take(MAX_REGIONS) {
        if left < 16 {
            break;
        }
        if !base.is_multiple_of(16) {
            return Err(Error::bad_input(format!("l2_prefetch: address {base:#x} is not 16-byte aligned")));
        }
        let bytes = bytes & !15;
        if bytes == 0 {
            continue;
        }
        let (len, chunk, period, take) = if bytes <= left {
            (bytes, WHOLE_CHUNK, 1, 1)
        } else if spread {
            let take = left * SPREAD_PERIOD / bytes;
            if take == 0 {
                break;
            }
            (bytes, SPREAD_CHUNK, SPREAD_PERIOD, take)
        } else {
            (left & !15, WHOLE_CHUNK, 1, 1)
        };
        let n = selected(len.div_ceil(chunk), period, take);
        if n > u32::MAX as usize {
            return Err(Error::bad_input(format!("l2_prefetch: {len} bytes is too large a region")));
        }
        let got = selected_bytes(len, chunk, period, take);
        let i = p.params.n_regions as usize;
        p.params.r[i] = PrefetchRegion {
            base,
            bytes: len as u64,
            chunk: chunk as u32,
            period: period as u32,
            take: take as u32,
            selected: n as u32,
        };
        p.params.n_regions += 1;
        p.bytes += got;
        left -= got.min(left);
        if len < bytes || period > 1 {
            break;
        }
    }
    Ok(p)
}

/// Launches the prefetch `plan` describes (nothing for an empty plan) on the GPU's stream: one
/// warp per SM at most, one request per chunk. With programmatic dependent launch it waits for
/// the kernel before it, so the kernel after it may treat its completion as that kernel's.
pub fn l2_prefetch(gpu: &Gpu, plan: &Plan) -> Result<()> {
    l2_prefetch_on(gpu, &gpu.stream, plan)
}

/// [`l2_prefetch`] on `stream` (a side branch that the caller forks from and joins to the
/// GPU's stream with events), launched without programmatic dependent launch.
pub fn l2_prefetch_on(gpu: &Gpu, stream: &cudarc::driver::CudaStream, plan: &Plan) -> Result<()> {
    let chunks = plan.chunks();
    if chunks == 0 {
        return Ok(());
    }
    let blocks = chunks.div_ceil(32).clamp(1, gpu.sm_count.max(1));
    let main = std::ptr::eq(stream, &*gpu.stream);
    let lc = LaunchEx { grid: (blocks as u32, 1, 1), block: (32, 1, 1), smem: 0, cluster: None, pdl: main };
    // SAFETY: the params mirror PrefetchParams; a prefetch reads no memory into the program and
    // writes none, and every region lies within an allocation the caller named (the plan only
    // shrinks the items).
    unsafe { launch_ex_on(gpu, stream, "prefetch", "l2_prefetch", lc, &plan.params) }
}

/// The forward's L2 prefetches (`GpuModel::set_l2_prefetch`; `DEMASK_L2_PREFETCH` when a model
/// is made; `demask profile --variants prefetch=`). Off by default.
///
/// Written `MB[s][+MB][@side]`: `40` prefetches 40 MB after each layer's QKV GEMM (the O
/// weight, then the first rows of gate|up), `40s` spreads the gate|up share over all its rows,
/// `40s+8` also prefetches 8 MB of the next layer's QKV weight, spread, after each down GEMM;
/// `@side` launches the prefetches on a side branch of the forward (a second stream forked
/// after the GEMM and joined at the end of the forward) instead of between the GEMM and the
/// kernel after it; `0` is off. (MB = 10⁶ bytes.)
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct L2Prefetch {
    /// Bytes prefetched after each QKV GEMM (0: none).
    pub after_qkv: usize,
    /// The partial share of gate|up spread over its rows instead of its first rows.
    pub spread: bool,
    /// Bytes of the next layer's QKV weight prefetched after each down GEMM (0: none).
    pub after_down: usize,
    /// On a side branch (a second stream) rather than in line.
    pub side: bool,
}

impl L2Prefetch {
    pub const OFF: L2Prefetch = L2Prefetch { after_qkv: 0, spread: false, after_down: 0, side: false };

    pub fn is_off(&self) -> bool {
        self.after_qkv == 0 && self.after_down == 0
    }

    /// `DEMASK_L2_PREFETCH`, or off when unset; an error naming the variable when malformed.
    pub fn from_env() -> Result<L2Prefetch> {
        match std::env::var("DEMASK_L2_PREFETCH") {
            Ok(s) => s.parse().map_err(|e: Error| Error::bad_input(format!("DEMASK_L2_PREFETCH: {e}"))),
            Err(_) => Ok(L2Prefetch::OFF),
        }
    }
}

impl FromStr for L2Prefetch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::bad_input(format!("bad L2 prefetch `{s}` (expected MB[s][+MB][@side], e.g. 0, 17, 40s, 40s+8 or 40s@side)"));
        let (s, side) = match s.strip_suffix("@side") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let mb = |t: &str| -> Result<usize> {
            let v: usize = t.parse().map_err(|_| bad())?;
            v.checked_mul(1_000_000).filter(|b| *b <= 1 << 40).ok_or_else(bad)
        };
        let (first, down) = match s.split_once('+') {
            Some((a, b)) => (a, mb(b)?),
            None => (s, 0),
        };
        let (qkv, spread) = match first.strip_suffix('s') {
            Some(n) => (n, true),
            None => (first, false),
        };
        Ok(L2Prefetch { after_qkv: mb(qkv)?, spread, after_down: down, side })
    }
}

impl std::fmt::Display for L2Prefetch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}{}", self.after_qkv / 1_000_000, if self.spread { "s" } else { "" })?;
        if self.after_down > 0 {
            write!(f, "+{}", self.after_down / 1_000_000)?;
        }
        if self.side {
            f.write_str("@side")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selected_counts_every_chunk_the_kernel_visits() {
        // The kernel's map from the j-th selected chunk to its index, against a scan.
        for (n, period, take) in [(1usize, 1usize, 1usize), (100, 64, 7), (129, 64, 63), (64, 64, 64), (5, 8, 3)] {
            let scan: Vec<usize> = (0..n).filter(|i| i % period < take).collect();
            assert_eq!(selected(n, period, take), scan.len(), "{n} {period} {take}");
            let mapped: Vec<usize> = (0..scan.len()).map(|j| (j / take) * period + j % take).collect();
            assert_eq!(mapped, scan, "{n} {period} {take}");
        }
    }

    #[test]
    fn plan_takes_whole_items_then_a_share_of_the_next() {
        let (o, gu) = ((0x1000u64, 16_777_216usize), (0x200_0000_0000u64, 100_663_296usize));
        // Everything fits.
        let p = plan(&[o, gu], 200_000_000, false).unwrap();
        assert_eq!(p.bytes, o.1 + gu.1);
        assert_eq!(p.params.n_regions, 2);
        assert_eq!(p.chunks(), (o.1 + gu.1) / WHOLE_CHUNK);
        // O whole, then the head of gate|up.
        let p = plan(&[o, gu], 40_000_000, false).unwrap();
        assert_eq!(p.bytes, 40_000_000);
        assert_eq!(p.params.r[1].bytes, 40_000_000 - o.1 as u64);
        assert_eq!(p.params.r[1].period, 1);
        // Spread: a share of every 64 rows, never more than the budget.
        let p = plan(&[o, gu], 40_000_000, true).unwrap();
        let r = p.params.r[1];
        assert_eq!((r.period as usize, r.chunk as usize, r.bytes as usize), (SPREAD_PERIOD, SPREAD_CHUNK, gu.1));
        assert_eq!(r.take as usize, (40_000_000 - o.1) * 64 / gu.1);
        assert_eq!(p.bytes, o.1 + r.take as usize * gu.1 / 64);
        assert!(p.bytes <= 40_000_000 && p.bytes > 40_000_000 - gu.1 / 64, "{}", p.bytes);
        // A budget below one item's share of 64 chunks: only the whole items.
        let p = plan(&[o, gu], o.1 + 1000, true).unwrap();
        assert_eq!((p.params.n_regions, p.bytes), (1, o.1));
        // Nothing.
        assert_eq!(plan(&[o, gu], 0, true).unwrap().chunks(), 0);
        assert_eq!(plan(&[], 1 << 30, true).unwrap().chunks(), 0);
    }

    #[test]
    fn plan_trims_odd_lengths_and_refuses_misaligned_addresses() {
        let p = plan(&[(0x100, 16_400 + 7)], 1 << 30, false).unwrap();
        assert_eq!((p.bytes, p.chunks()), (16_400, 2));
        assert_eq!(selected_bytes(16_400, WHOLE_CHUNK, 1, 1), 16_400);
        let e = plan(&[(0x108, 4096)], 1 << 20, false).unwrap_err().to_string();
        assert!(e.contains("0x108") && e.contains("aligned"), "{e}");
    }

    #[test]
    fn spec_parses_and_prints_back() {
        for s in ["0", "17", "40s", "40s+8", "32+16", "40s@side", "24+8@side"] {
            assert_eq!(s.parse::<L2Prefetch>().unwrap().to_string(), s);
        }
        let p: L2Prefetch = "40s+8".parse().unwrap();
        assert_eq!(p, L2Prefetch { after_qkv: 40_000_000, spread: true, after_down: 8_000_000, side: false });
        assert!("40s@side".parse::<L2Prefetch>().unwrap().side);
        assert!("0".parse::<L2Prefetch>().unwrap().is_off() && !p.is_off());
        for bad in ["", "s", "4x", "40s+", "-1", "40+8s", "99999999999", "40@side+8", "@side"] {
            let e = bad.parse::<L2Prefetch>().unwrap_err().to_string();
            assert!(e.contains("MB[s][+MB][@side]") && e.contains(bad), "{bad}: {e}");
        }
    }
}
