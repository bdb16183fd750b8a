//! `confidence_f32` and `confidence_cutoff_f32` (kernels/confidence.cu): the candidate token and
//! confidence of every eligible slot from f32 logits `[logit_rows, vocab]`, the GPU mirror of
//! `decode::sampling::candidate`. Each slot is a [`SlotParams`] record (logit row, confidence
//! kind, sampling, RNG key); outputs are `tokens[slot]` (u32) and `conf[slot]` (f32).
//!
//! Use: [`ConfidenceWs::set_slots`] validates and uploads the slot records (do it before the
//! forward so the copy does not wait on it), then [`confidence`] launches: the cut-off kernel
//! first when some sampled slot has top-k / top-p, then the main kernel, `splits` blocks per slot.
//! [`ConfidenceWs::set_exclude_token`] makes both read the mask token's column as `MASK_LOGIT`
//! (what [`set_column`] would write there first, one launch fewer).
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::decode::policy::ConfKind;
use crate::decode::sampling::{ConfDist, RngKey, Sampling};
use crate::error::{Error, Result};
use crate::gpu::{drv, DTensor, Gpu};

const OP: &str = "confidence";
const THREADS: u32 = 256; // CONF_THREADS in the .cu
const CUT_THREADS: u32 = 1024; // CUT_THREADS in the .cu
/// Most blocks per slot (the last block merges the partials in one warp).
pub const MAX_SPLITS: usize = 32;
/// Doubles per partial record (`Partial` in the .cu is 40 bytes).
const PARTIAL_F64S: usize = 5;

/// One eligible slot; mirrors `ConfSlot` in kernels/confidence.cu (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SlotParams {
    pub logit_row: i32,   // int: row of the logits buffer predicting the slot
    pub kind: i32,        // int: ConfKind as i32
    pub temperature: f32, // float: <= 0 = argmax
    pub top_k: i32,       // int: 0 = off
    pub top_p: f32,       // float: >= 1 = off
    pub seed_lo: u32,     // unsigned
    pub seed_hi: u32,     // unsigned
    pub seq: u32,         // unsigned
    pub step: u32,        // unsigned
    pub slot: u32,        // unsigned: canvas position
    pub dist: u32,        // unsigned: 0 = ConfDist::Raw, 1 = ConfDist::Filtered
    pub pad: u32,         // unsigned
}

// SAFETY: plain-old-data mirror of the C struct (i32 / u32 / f32 fields, no padding holes).
unsafe impl cudarc::driver::DeviceRepr for SlotParams {}

impl SlotParams {
    pub fn new(logit_row: u32, kind: ConfKind, s: &Sampling, key: RngKey) -> Self {
        SlotParams {
            logit_row: logit_row as i32,
            kind: kind as i32,
            temperature: s.temperature,
            top_k: s.top_k.min(i32::MAX as u32) as i32,
            top_p: s.top_p,
            seed_lo: key.seed as u32,
            seed_hi: (key.seed >> 32) as u32,
            seq: key.seq,
            step: key.step,
            slot: key.slot,
            dist: 0,
            pad: 0,
        }
    }

    /// The slot with confidences from `dist` (`ConfDist::Filtered`: Dream's tempered, filtered
    /// distribution, as `sampling::candidate`).
    pub fn with_dist(mut self, dist: ConfDist) -> Self {
        self.dist = match dist {
            ConfDist::Raw => 0,
            ConfDist::Filtered => 1,
        };
        self
    }

    /// Whether the slot needs the cut-off kernel: top-k or top-p on, and either sampled or
    /// with Dream's filtered confidences (which filter at temperature 0 too); the rule of
    /// `sampling::candidate`.
    pub fn filtered(&self, vocab: usize) -> bool {
        let k_on = self.top_k > 0 && (self.top_k as usize) < vocab;
        (self.temperature > 0.0 || self.dist == 1) && (k_on || self.top_p < 1.0)
    }
}

/// Mirrors `ConfidenceParams` in kernels/confidence.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct ConfidenceParams {
    logits: u64,        // const float*
    slots: u64,         // const ConfSlot*
    cut: u64,           // float*
    partials: u64,      // Partial*
    counters: u64,      // unsigned*
    tokens: u64,        // unsigned*
    conf: u64,          // float*
    n_slots: i32,       // int
    vocab: i32,         // int
    logit_rows: i32,    // int
    splits: i32,        // int
    exclude_token: i32, // int: logit column read as -1e30 (-1 = none)
    pad: i32,           // int: unused
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars).
unsafe impl cudarc::driver::DeviceRepr for ConfidenceParams {}

/// Device workspace of the confidence kernels, allocated once for up to `max_slots` slots.
pub struct ConfidenceWs {
    slots: DTensor<SlotParams>,
    cut: DTensor<f32>,
    partials: DTensor<f64>,
    /// Per-slot arrival counters; zeroed at allocation, reset by the kernel's last block.
    counters: DTensor<u32>,
    max_slots: usize,
    // What the last `set_slots` loaded.
    n_slots: usize,
    vocab: usize,
    max_logit_row: usize,
    any_filtered: bool,
    /// Logit column the kernels read as `MASK_LOGIT` (see [`ConfidenceWs::set_exclude_token`]).
    exclude_token: Option<u32>,
    /// Blocks per slot; `None` = chosen from the SM count (see [`splits_for`]).
    pub splits: Option<usize>,
}

/// Default blocks per slot: about 1.5 blocks per SM over all slots (one wave at the kernel's
/// two resident blocks per SM; measured best on an H100 for 1, 32 and 256 rows of 126464),
/// each chunk at least 2048 logits, at most [`MAX_SPLITS`].
pub fn splits_for(sm_count: usize, n_slots: usize, vocab: usize) -> usize {
    let want = (3 * sm_count.max(1)) / (2 * n_slots.max(1));
    want.min(vocab / 2048).clamp(1, MAX_SPLITS)
}

impl ConfidenceWs {
    pub fn new(gpu: &Gpu, max_slots: usize) -> Result<Self> {
        let m = max_slots.max(1);
        let mut counters = gpu.alloc::<u32>(&[m])?;
        gpu.stream
            .memset_zeros(&mut counters.buf)
            .map_err(drv("cuMemsetD8"))?;
        Ok(ConfidenceWs {
            slots: gpu.alloc(&[m])?,
            cut: gpu.alloc(&[m])?,
            partials: gpu.alloc(&[m * MAX_SPLITS * PARTIAL_F64S])?,
            counters,
            max_slots: m,
            n_slots: 0,
            vocab: 0,
            max_logit_row: 0,
            any_filtered: false,
            exclude_token: None,
            splits: None,
        })
    }

    pub fn max_slots(&self) -> usize {
        self.max_slots
    }

    /// Validates and uploads the slot records for logits rows of `vocab` entries.
    pub fn set_slots(&mut self, gpu: &Gpu, slots: &[SlotParams], vocab: usize) -> Result<()> {
        if slots.len() > self.max_slots {
            return Err(Error::bad_input(format!(
                "{OP}: {} slots, the workspace was sized for {}",
                slots.len(),
                self.max_slots
            )));
        }
        if vocab == 0 || vocab > i32::MAX as usize / 2 {
            return Err(Error::bad_input(format!(
                "{OP}: vocabulary size {vocab} is out of range"
            )));
        }
        for (i, s) in slots.iter().enumerate() {
            if s.logit_row < 0 {
                return Err(Error::bad_input(format!(
                    "{OP}: slot {i} has logit row {}",
                    s.logit_row
                )));
            }
            if !(0..=3).contains(&s.kind) {
                return Err(Error::bad_input(format!(
                    "{OP}: slot {i} has confidence kind {}",
                    s.kind
                )));
            }
            if s.temperature.is_nan() || s.top_p.is_nan() || s.top_k < 0 {
                return Err(Error::bad_input(format!(
                    "{OP}: slot {i} has bad sampling {s:?}"
                )));
            }
        }
        self.slots.write(gpu, slots)?;
        self.n_slots = slots.len();
        self.vocab = vocab;
        self.max_logit_row = slots
            .iter()
            .map(|s| s.logit_row as usize)
            .max()
            .unwrap_or(0);
        self.any_filtered = slots.iter().any(|s| s.filtered(vocab));
        Ok(())
    }

    pub fn n_slots(&self) -> usize {
        self.n_slots
    }

    /// Makes both kernels read logit column `token` (the mask token) as
    /// [`MASK_LOGIT`](crate::decode::cpu::MASK_LOGIT), so it is never a candidate: the same
    /// results, bit for bit, as `set_column(logits, rows, token, MASK_LOGIT)` before
    /// [`confidence`], without the launch and without writing the logits. `None` (the
    /// default) reads every column as it is. Stays in force until changed; `confidence`
    /// refuses a token that is not below the vocabulary size.
    pub fn set_exclude_token(&mut self, token: Option<u32>) {
        self.exclude_token = token;
    }

    pub fn exclude_token(&self) -> Option<u32> {
        self.exclude_token
    }
}

/// Candidate and confidence of every slot loaded by `ws.set_slots`, from `logits`
/// (`[>= logit_rows, vocab]` f32; each slot's row must be `< logit_rows`), into `tokens` and
/// `conf` (`[>= n_slots]`). No host synchronisation.
pub fn confidence(
    gpu: &Gpu,
    logits: &DTensor<f32>,
    logit_rows: usize,
    ws: &mut ConfidenceWs,
    tokens: &mut DTensor<u32>,
    conf: &mut DTensor<f32>,
) -> Result<()> {
    let n = ws.n_slots;
    let vocab = ws.vocab;
    if n == 0 {
        return Ok(());
    }
    logits.check_rows(OP, "logits", logit_rows, vocab)?;
    if ws.max_logit_row >= logit_rows {
        return Err(Error::bad_input(format!(
            "{OP}: a slot reads logit row {}, only {logit_rows} rows were computed",
            ws.max_logit_row
        )));
    }
    if tokens.len() < n {
        return Err(Error::shape(OP, "tokens", &[n], &tokens.dims));
    }
    if conf.len() < n {
        return Err(Error::shape(OP, "conf", &[n], &conf.dims));
    }
    let exclude_token = match ws.exclude_token {
        None => -1,
        Some(t) if (t as usize) < vocab => t as i32,
        Some(t) => {
            return Err(Error::bad_input(format!(
                "{OP}: excluded token {t} is not below the vocabulary size {vocab}"
            )))
        }
    };
    if n > 65535 {
        return Err(Error::bad_input(format!(
            "{OP}: {n} slots exceed the grid limit of 65535"
        )));
    }
    let splits = ws
        .splits
        .unwrap_or_else(|| splits_for(gpu.sm_count, n, vocab))
        .clamp(1, MAX_SPLITS);
    let params = ConfidenceParams {
        logits: logits.ptr(gpu),
        slots: ws.slots.ptr(gpu),
        cut: ws.cut.ptr_mut(gpu),
        partials: ws.partials.ptr_mut(gpu),
        counters: ws.counters.ptr_mut(gpu),
        tokens: tokens.ptr_mut(gpu),
        conf: conf.ptr_mut(gpu),
        n_slots: n as i32,
        vocab: vocab as i32,
        logit_rows: logit_rows as i32,
        splits: splits as i32,
        exclude_token,
        pad: 0,
    };
    if ws.any_filtered {
        let cfg = LaunchConfig {
            grid_dim: (n as u32, 1, 1),
            block_dim: (CUT_THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let f = gpu.func("confidence", "confidence_cutoff_f32")?;
        let mut b = gpu.stream.launch_builder(&f);
        b.arg(&params);
        // SAFETY: params mirror ConfidenceParams; every slot's logit row is < logit_rows (checked
        // above and in set_slots) of a [logit_rows, vocab] buffer; cut holds max_slots >= n floats.
        unsafe { b.launch(cfg) }.map_err(drv("confidence_cutoff_f32"))?;
        gpu.after_launch("confidence_cutoff_f32")?;
    }
    let cfg = LaunchConfig {
        grid_dim: (splits as u32, n as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("confidence", "confidence_f32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: as above; partials hold max_slots * MAX_SPLITS records >= n * splits; counters
    // hold max_slots zeros (the kernel's last block per slot resets its counter); tokens and
    // conf hold >= n elements (checked above).
    unsafe { b.launch(cfg) }.map_err(drv("confidence_f32"))?;
    gpu.after_launch("confidence_f32")
}

/// `logits[r, col] = value` for the first `rows` rows (`set_column_f32`). The decode loop
/// excludes the mask token inside the confidence kernels instead
/// ([`ConfidenceWs::set_exclude_token`]); this stays for tests that compare the two.
pub fn set_column(
    gpu: &Gpu,
    logits: &mut DTensor<f32>,
    rows: usize,
    col: usize,
    value: f32,
) -> Result<()> {
    let vocab = logits.row_len();
    if col >= vocab || rows > logits.rows() {
        return Err(Error::shape(
            "set_column",
            "logits",
            &[rows, col + 1],
            &logits.dims,
        ));
    }
    if rows == 0 {
        return Ok(());
    }
    let f = gpu.func("confidence", "set_column_f32")?;
    let ptr = logits.ptr_mut(gpu);
    let (rows_i, vocab_i, col_i) = (rows as i32, vocab as i32, col as i32);
    let cfg = LaunchConfig {
        grid_dim: ((rows as u32).div_ceil(256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    let mut b = gpu.stream.launch_builder(&f);
    // C signature: (float* logits, int rows, int vocab, int col, float value).
    b.arg(&ptr)
        .arg(&rows_i)
        .arg(&vocab_i)
        .arg(&col_i)
        .arg(&value);
    // SAFETY: the pointer is a live DTensor of at least rows × vocab f32 (checked above).
    unsafe { b.launch(cfg) }.map_err(drv("set_column_f32"))?;
    gpu.after_launch("set_column_f32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<SlotParams>(), 48);
        // 7 pointers + 6 ints (exclude_token and pad included), as the C struct.
        assert_eq!(std::mem::size_of::<ConfidenceParams>(), 80);
        assert_eq!(std::mem::align_of::<ConfidenceParams>(), 8);
        assert_eq!(
            crate::decode::cpu::MASK_LOGIT.to_bits(),
            (-1e30f32).to_bits(),
            "CONF_MASK_LOGIT in kernels/confidence.cu"
        );
    }

    #[test]
    fn filter_rule_and_splits() {
        let key = RngKey {
            seed: 0x1_0000_0002,
            seq: 3,
            step: 4,
            slot: 5,
        };
        let s = SlotParams::new(
            7,
            ConfKind::Margin,
            &Sampling {
                temperature: 1.0,
                top_k: 10,
                top_p: 1.0,
            },
            key,
        );
        assert_eq!((s.seed_lo, s.seed_hi, s.kind, s.logit_row), (2, 1, 1, 7));
        assert!(s.filtered(100));
        assert!(!s.filtered(10), "top-k >= vocab is off");
        let greedy = SlotParams::new(
            0,
            ConfKind::Prob,
            &Sampling {
                temperature: 0.0,
                top_k: 10,
                top_p: 0.5,
            },
            key,
        );
        assert!(!greedy.filtered(100), "filters apply only when sampling");
        let p = SlotParams::new(
            0,
            ConfKind::Prob,
            &Sampling {
                temperature: 0.5,
                top_k: 0,
                top_p: 0.9,
            },
            key,
        );
        assert!(p.filtered(100));
        assert_eq!(splits_for(132, 32, 126464), 6);
        assert_eq!(splits_for(132, 256, 126464), 1);
        assert_eq!(splits_for(132, 1, 126464), 32);
        assert_eq!(splits_for(132, 1000, 126464), 1);
        assert_eq!(splits_for(132, 4, 513), 1);
    }
}
