//! `commit_u32` (kernels/commit.cu): rank each sequence's eligible slots, count how many commit
//! by a [`CountRule`], write them into the device canvas. The kernel knows no decoding policy:
//! `decode::gpu::commit_rule` translates a `decode::Policy` into a rule (the GPU mirror of
//! `Policy::select`). Per sequence a [`SeqCommitParams`] record (its range of the slot arrays,
//! rule, [`CountCtx`], canvas row); slot arrays `positions` (uploaded by
//! [`CommitWs::set_seqs`]), `tokens` and `conf` (the confidence kernel's outputs). The kernel
//! writes committed tokens into the canvas (`u32 [canvas_rows, canvas_stride]`) and a compact
//! commit list into `out` (layout in [`CommitWs::out_len`]; read it with [`parse_commits`]).
use cudarc::driver::{LaunchConfig, PushKernelArg};

use crate::decode::step::{Commit, StepCommits};
use crate::error::{Error, Result};
use crate::gpu::{drv, DTensor, Gpu};

const OP: &str = "commit";
const THREADS: u32 = 256; // COMMIT_THREADS in the .cu

/// One sequence; mirrors `CommitSeq` in kernels/commit.cu (48 bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SeqCommitParams {
    pub slot_offset: i32,  // int
    pub slot_count: i32,   // int
    pub policy: i32,       // int: CountRule: 0 schedule, 2 threshold, 3 threshold-or-schedule, 4 factor, 5 dream, 6 max-above-schedule
    pub tau: f32,          // float
    pub factor: f32,       // float
    pub steps: u32,        // unsigned
    pub ctx_step: u32,     // unsigned
    pub block_masked: u32, // unsigned
    pub masked: u32,       // unsigned
    pub canvas_row: i32,   // int
    pub block_len: u32,    // unsigned
    pub pad: i32,          // int
}

// SAFETY: plain-old-data mirror of the C struct (i32 / u32 / f32 fields, no padding holes).
unsafe impl cudarc::driver::DeviceRepr for SeqCommitParams {}

/// How many of a sequence's ranked slots commit (the kernel's `policy` switch).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum CountRule {
    /// LLaDA's even split: `block_masked / steps + (step < block_masked % steps)`, every
    /// remaining slot on step `steps − 1` (kernel case 0).
    Schedule { steps: u32 },
    /// Every slot with confidence ≥ τ (kernel case 2).
    Threshold { tau: f32 },
    /// The slots ≥ τ, or the schedule count when none passes (kernel case 3).
    ThresholdOrSchedule { tau: f32, steps: u32 },
    /// The longest prefix of the ranking with c_n ≥ 1 − f/(n + 1) (kernel case 4).
    FactorPrefix { f: f32 },
    /// Dream's f32 count over linspace(1, 1e-3, steps + 1), 0 allowed (kernel case 5).
    DreamCount { steps: u32 },
    /// `max(#{c > τ}, n)`: every slot strictly above τ, or n, the even split of the block's
    /// length (not of its masked slots: a block may start partly filled) over `steps`, capped at
    /// the slots (every remaining slot on step `steps − 1`), when fewer pass (kernel case 6).
    MaxAboveSchedule { tau: f32, steps: u32 },
}

/// Where the sequence's block stands (the counts the rules read).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CountCtx {
    /// Steps already taken in this block.
    pub step: u32,
    /// Masked slots of the block when it started.
    pub block_masked: u32,
    /// Masked slots of the block now.
    pub masked: u32,
    /// Slots of the block (its length).
    pub block_len: u32,
}

impl SeqCommitParams {
    pub fn new(rule: CountRule, ctx: CountCtx, slot_offset: usize, slot_count: usize, canvas_row: usize) -> Self {
        let (kind, tau, factor, steps) = match rule {
            CountRule::Schedule { steps } => (0, 0.0, 0.0, steps),
            CountRule::Threshold { tau } => (2, tau, 0.0, 0),
            CountRule::ThresholdOrSchedule { tau, steps } => (3, tau, 0.0, steps),
            CountRule::FactorPrefix { f } => (4, 0.0, f, 0),
            CountRule::DreamCount { steps } => (5, 0.0, 0.0, steps),
            CountRule::MaxAboveSchedule { tau, steps } => (6, tau, 0.0, steps),
        };
        SeqCommitParams {
            slot_offset: slot_offset as i32,
            slot_count: slot_count as i32,
            policy: kind,
            tau,
            factor,
            steps,
            ctx_step: ctx.step,
            block_masked: ctx.block_masked,
            masked: ctx.masked,
            canvas_row: canvas_row as i32,
            block_len: ctx.block_len,
            pad: 0,
        }
    }
}

/// Mirrors `CommitParams` in kernels/commit.cu.
#[repr(C)]
#[derive(Clone, Copy)]
struct CommitParams {
    seqs: u64,          // const CommitSeq*
    positions: u64,     // const unsigned*
    tokens: u64,        // const unsigned*
    conf: u64,          // const float*
    canvas: u64,        // unsigned*
    out: u64,           // unsigned*
    ranked_conf: u64,   // float*
    n_seqs: i32,        // int
    n_slots: i32,       // int
    canvas_stride: i32, // int
    canvas_rows: i32,   // int
}

// SAFETY: plain-old-data mirror of the C struct (u64 pointers, i32 scalars).
unsafe impl cudarc::driver::DeviceRepr for CommitParams {}

/// Device workspace of the commit kernel: sequence records, slot positions, ranked confidences.
pub struct CommitWs {
    seqs: DTensor<SeqCommitParams>,
    positions: DTensor<u32>,
    ranked_conf: DTensor<f32>,
    max_seqs: usize,
    max_slots: usize,
    n_seqs: usize,
    n_slots: usize,
    canvas_stride: usize,
    max_canvas_row: usize,
}

impl CommitWs {
    pub fn new(gpu: &Gpu, max_seqs: usize, max_slots: usize) -> Result<Self> {
        let (s, n) = (max_seqs.max(1), max_slots.max(1));
        Ok(CommitWs {
            seqs: gpu.alloc(&[s])?,
            positions: gpu.alloc(&[n])?,
            ranked_conf: gpu.alloc(&[n])?,
            max_seqs: s,
            max_slots: n,
            n_seqs: 0,
            n_slots: 0,
            canvas_stride: 0,
            max_canvas_row: 0,
        })
    }

    /// u32 elements of `out` the kernel writes for the loaded work: `n_seqs` counts, then a
    /// (position, token) pair per slot, each sequence's pairs at `slot_offset` in rank order.
    pub fn out_len(&self) -> usize {
        self.n_seqs + 2 * self.n_slots
    }

    /// The loaded sequences' ranked confidences (`[n_slots]`, rank order within a sequence).
    pub fn ranked_conf(&self) -> &DTensor<f32> {
        &self.ranked_conf
    }

    /// Validates and uploads the sequences and slot positions. The sequences' slot ranges must
    /// tile `[0, positions.len())` in order; positions are strictly ascending within a sequence
    /// and below `canvas_stride`.
    pub fn set_seqs(
        &mut self,
        gpu: &Gpu,
        seqs: &[SeqCommitParams],
        positions: &[u32],
        canvas_stride: usize,
    ) -> Result<()> {
        if seqs.len() > self.max_seqs || positions.len() > self.max_slots {
            return Err(Error::bad_input(format!(
                "{OP}: {} sequences / {} slots, the workspace was sized for {} / {}",
                seqs.len(),
                positions.len(),
                self.max_seqs,
                self.max_slots
            )));
        }
        if canvas_stride > i32::MAX as usize {
            return Err(Error::bad_input(format!(
                "{OP}: canvas stride {canvas_stride} is too large"
            )));
        }
        let mut next = 0usize;
        for (si, q) in seqs.iter().enumerate() {
            if q.slot_offset as usize != next || q.slot_count < 0 || q.slot_offset < 0 {
                return Err(Error::bad_input(format!(
                    "{OP}: sequence {si} slots [{}, +{}) do not continue at {next}",
                    q.slot_offset, q.slot_count
                )));
            }
            next += q.slot_count as usize;
            if next > positions.len() {
                return Err(Error::bad_input(format!(
                    "{OP}: sequence {si} slots run past {}",
                    positions.len()
                )));
            }
            if !(0..=6).contains(&q.policy) || q.canvas_row < 0 {
                return Err(Error::bad_input(format!("{OP}: sequence {si} has a bad record {q:?}")));
            }
            let ps = &positions[q.slot_offset as usize..next];
            if let Some(w) = ps.windows(2).find(|w| w[0] >= w[1]) {
                return Err(Error::bad_input(format!(
                    "{OP}: sequence {si} positions are not strictly ascending ({} then {})",
                    w[0], w[1]
                )));
            }
            if let Some(&p) = ps.iter().find(|&&p| p as usize >= canvas_stride) {
                return Err(Error::bad_input(format!(
                    "{OP}: sequence {si} position {p} is not below the canvas stride {canvas_stride}"
                )));
            }
        }
        if next != positions.len() {
            return Err(Error::bad_input(format!(
                "{OP}: sequences cover {next} of {} slots",
                positions.len()
            )));
        }
        self.seqs.write(gpu, seqs)?;
        self.positions.write(gpu, positions)?;
        self.n_seqs = seqs.len();
        self.n_slots = positions.len();
        self.canvas_stride = canvas_stride;
        self.max_canvas_row = seqs.iter().map(|q| q.canvas_row as usize).max().unwrap_or(0);
        Ok(())
    }
}

/// Runs the policies of the sequences loaded by `ws.set_seqs` over `tokens` / `conf`
/// (`[>= n_slots]`), writing `canvas` (`[>= max canvas_row + 1, canvas_stride]`) and `out`
/// (`[>= ws.out_len()]`). No host synchronisation.
pub fn commit(
    gpu: &Gpu,
    ws: &mut CommitWs,
    tokens: &DTensor<u32>,
    conf: &DTensor<f32>,
    canvas: &mut DTensor<u32>,
    out: &mut DTensor<u32>,
) -> Result<()> {
    let (n_seqs, n_slots) = (ws.n_seqs, ws.n_slots);
    if n_seqs == 0 {
        return Ok(());
    }
    if tokens.len() < n_slots {
        return Err(Error::shape(OP, "tokens", &[n_slots], &tokens.dims));
    }
    if conf.len() < n_slots {
        return Err(Error::shape(OP, "conf", &[n_slots], &conf.dims));
    }
    canvas.check_rows(OP, "canvas", ws.max_canvas_row + 1, ws.canvas_stride)?;
    if out.len() < ws.out_len() {
        return Err(Error::shape(OP, "out", &[ws.out_len()], &out.dims));
    }
    if n_seqs > 65535 * 1024 {
        return Err(Error::bad_input(format!("{OP}: {n_seqs} sequences is too many")));
    }
    let params = CommitParams {
        seqs: ws.seqs.ptr(gpu),
        positions: ws.positions.ptr(gpu),
        tokens: tokens.ptr(gpu),
        conf: conf.ptr(gpu),
        canvas: canvas.ptr_mut(gpu),
        out: out.ptr_mut(gpu),
        ranked_conf: ws.ranked_conf.ptr_mut(gpu),
        n_seqs: n_seqs as i32,
        n_slots: n_slots as i32,
        canvas_stride: ws.canvas_stride as i32,
        canvas_rows: canvas.rows() as i32,
    };
    let cfg = LaunchConfig {
        grid_dim: (n_seqs as u32, 1, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    let f = gpu.func("commit", "commit_u32")?;
    let mut b = gpu.stream.launch_builder(&f);
    b.arg(&params);
    // SAFETY: params mirror CommitParams; slot ranges tile [0, n_slots) and tokens / conf /
    // positions hold n_slots elements; every position is < canvas_stride and every canvas row
    // exists (checked in set_seqs and above); out holds n_seqs + 2 * n_slots elements.
    unsafe { b.launch(cfg) }.map_err(drv("commit_u32"))?;
    gpu.after_launch("commit_u32")
}

/// Splits the downloaded `out` prefix (`ws.out_len()` elements) into per-sequence commit lists.
pub fn parse_commits(out: &[u32], seqs: &[SeqCommitParams]) -> Result<Vec<Vec<Commit>>> {
    let mut dst = StepCommits::default();
    parse_commits_into(out, seqs, &mut dst)?;
    Ok(dst.to_lists())
}

/// [`parse_commits`] into a reusable [`StepCommits`] (cleared first; no allocation once its
/// buffers hold a step's worth).
pub fn parse_commits_into(out: &[u32], seqs: &[SeqCommitParams], dst: &mut StepCommits) -> Result<()> {
    let n_seqs = seqs.len();
    dst.clear();
    for (si, q) in seqs.iter().enumerate() {
        let k = *out
            .get(si)
            .ok_or_else(|| Error::shape(OP, "out", &[n_seqs], &[out.len()]))? as usize;
        if k > q.slot_count as usize {
            return Err(Error::bad_input(format!(
                "{OP}: sequence {si} reports {k} commits of {} slots",
                q.slot_count
            )));
        }
        let base = n_seqs + 2 * q.slot_offset as usize;
        let pairs = out
            .get(base..base + 2 * k)
            .ok_or_else(|| Error::shape(OP, "out", &[base + 2 * k], &[out.len()]))?;
        for c in pairs.chunks_exact(2) {
            dst.push(Commit { pos: c[0], token: c[1] });
        }
        dst.end_seq();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_match_the_c_layout() {
        assert_eq!(std::mem::size_of::<SeqCommitParams>(), 48);
        assert_eq!(std::mem::size_of::<CommitParams>(), 72);
    }

    #[test]
    fn parse_commits_reads_counts_then_pairs_at_slot_offsets() {
        let ctx = CountCtx { step: 0, block_masked: 3, masked: 3, block_len: 3 };
        let p = CountRule::Threshold { tau: 0.5 };
        let seqs = [SeqCommitParams::new(p, ctx, 0, 3, 0), SeqCommitParams::new(p, ctx, 3, 2, 1)];
        // counts 2, 1; seq 0 ranks (7, 70) (5, 50) (9, 90); seq 1 ranks (4, 40) (6, 60)
        let out = [2, 1, 7, 70, 5, 50, 9, 90, 4, 40, 6, 60];
        let lists = parse_commits(&out, &seqs).unwrap();
        assert_eq!(lists[0], [Commit { pos: 7, token: 70 }, Commit { pos: 5, token: 50 }]);
        assert_eq!(lists[1], [Commit { pos: 4, token: 40 }]);
        assert!(
            parse_commits(&[4, 1, 7, 70], &seqs).is_err(),
            "count above the slot count"
        );
    }
}
