//! Fidelity of FP8 weights, measured the same way on any checkpoint: how far a model's FP8
//! version is from its bf16 weights, per linear weight (relative Frobenius error) and at the
//! final logits (relative error, top-1 agreement of the candidates).
//!
//! [`fake_quant`] makes the FP8 model as host weights: every linear layer replaced by what
//! the W8A16 kernel multiplies (`Fp8Matrix::mma_operands` times the per-channel factor,
//! rounded to bf16: exact for block scales, one extra 2⁻⁹ rounding for channel scales), so
//! the f32 CPU backend runs the FP8 model and tests/gpu_fp8/model.rs can hold the GPU's FP8
//! forward to it. [`compare_logits`] is the metric both use. [`commit_agreement`] decodes
//! with a reference backend and, at every step, asks a second backend (the FP8 model) for its
//! commits on the same canvas: the per-step commit agreement over whole decodes.
//! [`compare_layers`] measures the hidden state after every transformer block (relative L2 of
//! the residual stream), from `CpuModel::forward_full_layers` or `GpuModel::layer_hidden`;
//! [`cpu_layer_fidelity`] runs it, and the logit comparison, for two host models on the CPU.
//!
//! The W8A8 model (the GPU's path above 64 rows: activations quantised to E4M3 per row too) is
//! `fake_quant`'s weights on a `CpuModel` with `ActQuant::Fp8Row`
//! ([`cpu_layer_fidelity_act`]; `CpuStepper::with_act_quant` for [`commit_agreement`]).
use half::bf16;

use crate::batch::RowBatch;
use crate::cpu::forward::{ActQuant, CpuModel};
use crate::decode::policy::{Policy, StepCtx};
use crate::decode::step::{Commit, SeqWork, StepBackend};
use crate::error::Result;
use crate::quant::{Fp8Matrix, ScaleLayout};
use crate::weights::HostWeights;

/// Relative error of one linear weight: ‖W − deq(Q(W))‖ / ‖W‖.
#[derive(Clone, Debug, serde::Serialize)]
pub struct WeightError {
    pub layer: usize,
    pub name: &'static str,
    pub rel_err: f64,
}

/// `w` with every linear layer quantised to FP8 (`layout`) and dequantised back to bf16, and
/// the per-weight relative errors. NaN / ±∞ weights are refused, naming the tensor.
pub fn fake_quant(w: &HostWeights, layout: ScaleLayout) -> Result<(HostWeights, Vec<WeightError>)> {
    fake_quant_with(w, layout, false)
}

/// [`fake_quant`], optionally with the LM head quantised too (`lm_head`: the measurement
/// behind keeping it bf16, docs/fp8.md; its error is reported as layer `n_layers`).
pub fn fake_quant_with(w: &HostWeights, layout: ScaleLayout, lm_head: bool) -> Result<(HostWeights, Vec<WeightError>)> {
    let cfg = &w.cfg;
    let (h, q, qkv, df) = (cfg.hidden, cfg.q_dim(), cfg.qkv_dim(), cfg.dense_ffn());
    let arch = if cfg.llada2.is_some() { "LLaDA2" } else { "LLaDA-MoE" };
    if cfg.moe.is_some() && layout != ScaleLayout::Channel {
        return Err(crate::error::Error::bad_input(format!(
            "FP8 with {} scales: {arch}'s FP8 expert kernels take per-channel scales only",
            layout.name()
        )));
    }
    let mut out = w.clone();
    let mut errs = Vec::new();
    let rel = |(num, den): (f64, f64)| (num / den.max(f64::MIN_POSITIVE)).sqrt();
    for (i, l) in out.layers.iter_mut().enumerate() {
        let mut parts: Vec<(&'static str, &mut Vec<bf16>, usize, usize)> =
            vec![("q|k|v projection", &mut l.wqkv, qkv, h), ("o projection", &mut l.wo, h, q)];
        if !cfg.is_moe_layer(i) {
            parts.push(("gate|up projection", &mut l.w_gate_up, 2 * df, h));
            parts.push(("down projection", &mut l.w_down, h, df));
        }
        for (name, t, n, k) in parts {
            errs.push(WeightError { layer: i, name, rel_err: rel(fake_matrix(&format!("layer {i} {name}"), t, n, k, layout)?) });
        }
        let Some(m) = l.moe.as_mut().filter(|_| cfg.is_moe_layer(i)) else { continue };
        // Routed experts: each expert's [n, k] matrix with its own channel scales (the router
        // stays bf16); LLaDA2's shared expert as a dense linear pair.
        let f = cfg.ffn;
        let sf = cfg.llada2.as_ref().map_or(0, |l| l.shared_ffn);
        let experts: [(&'static str, &mut Vec<bf16>, usize, usize); 2] =
            [("experts gate|up", &mut m.w_gate_up, 2 * f, h), ("experts down", &mut m.w_down, h, f)];
        for (name, t, n, k) in experts {
            let (mut num, mut den) = (0f64, 0f64);
            for (e, we) in t.chunks_mut(n * k).enumerate() {
                let (a, b) = fake_matrix(&format!("layer {i} {name} expert {e}"), we, n, k, layout)?;
                (num, den) = (num + a, den + b);
            }
            errs.push(WeightError { layer: i, name, rel_err: rel((num, den)) });
        }
        if sf > 0 {
            let shared: [(&'static str, &mut Vec<bf16>, usize, usize); 2] =
                [("shared expert gate|up", &mut m.shared_gate_up, 2 * sf, h), ("shared expert down", &mut m.shared_down, h, sf)];
            for (name, t, n, k) in shared {
                errs.push(WeightError { layer: i, name, rel_err: rel(fake_matrix(&format!("layer {i} {name}"), t, n, k, layout)?) });
            }
        }
    }
    if lm_head {
        let (v, h) = (cfg.vocab, cfg.hidden);
        let m = Fp8Matrix::quantize_bf16("LM head", &out.lm_head, v, h, layout)?;
        let (ops, post) = m.mma_operands();
        let (mut num, mut den) = (0f64, 0f64);
        for (r, (row, orig)) in ops.chunks(h).zip(out.lm_head.chunks_mut(h)).enumerate() {
            for (o, &x) in orig.iter_mut().zip(row) {
                let deq = x * post[r];
                num += ((deq - o.to_f32()) as f64).powi(2);
                den += (o.to_f32() as f64).powi(2);
                *o = bf16::from_f32(deq);
            }
        }
        errs.push(WeightError { layer: cfg.n_layers, name: "LM head", rel_err: (num / den.max(f64::MIN_POSITIVE)).sqrt() });
    }
    Ok((out, errs))
}

/// Replaces the `[n, k]` bf16 weight `t` by its FP8 version as the W8A16 kernels multiply it
/// (`mma_operands` times the per-row factor, rounded to bf16); returns (Σ error², Σ w²).
fn fake_matrix(name: &str, t: &mut [bf16], n: usize, k: usize, layout: ScaleLayout) -> Result<(f64, f64)> {
    let m = Fp8Matrix::quantize_bf16(name, t, n, k, layout)?;
    let (ops, post) = m.mma_operands();
    let (mut num, mut den) = (0f64, 0f64);
    for (r, (row, orig)) in ops.chunks(k).zip(t.chunks_mut(k)).enumerate() {
        for (o, &v) in orig.iter_mut().zip(row) {
            let deq = v * post[r];
            let x = o.to_f32();
            num += ((deq - x) as f64).powi(2);
            den += (x as f64).powi(2);
            *o = bf16::from_f32(deq);
        }
    }
    Ok((num, den))
}

/// Logits of one model (`got`) against another (`want`), `[rows, vocab]` each.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LogitCmp {
    pub rows: usize,
    /// ‖got − want‖ / ‖want‖ over all logits.
    pub rel_l2: f64,
    /// Largest per-row max|got − want| / max|want|.
    pub worst_row_rel: f64,
    /// Rows whose argmax agrees, among rows whose `want` top-2 gap exceeds the tie gap.
    pub top1_agree: usize,
    /// Rows compared for top-1 (not near-ties).
    pub top1_rows: usize,
    /// Rows whose `want` top-2 gap is at most the tie gap (counted, not compared).
    pub near_ties: usize,
}

impl LogitCmp {
    /// Top-1 agreement as a fraction of the compared rows (1 when none is compared).
    pub fn agreement(&self) -> f64 {
        if self.top1_rows == 0 {
            1.0
        } else {
            self.top1_agree as f64 / self.top1_rows as f64
        }
    }
}

/// Index of the largest value (ties to the lowest index) and the second largest value.
fn top2(v: &[f32]) -> (usize, f32, f32) {
    let (mut i1, mut v1, mut v2) = (0usize, f32::NEG_INFINITY, f32::NEG_INFINITY);
    for (i, &x) in v.iter().enumerate() {
        if x > v1 {
            v2 = v1;
            i1 = i;
            v1 = x;
        } else if x > v2 {
            v2 = x;
        }
    }
    (i1, v1, v2)
}

/// Compares `got` with `want` row by row (see [`LogitCmp`]); `tie_gap` in logit units.
pub fn compare_logits(got: &[f32], want: &[f32], vocab: usize, tie_gap: f32) -> LogitCmp {
    let mut c = LogitCmp { rows: want.len() / vocab.max(1), ..Default::default() };
    let (mut num, mut den) = (0f64, 0f64);
    for (g, w) in got.chunks(vocab).zip(want.chunks(vocab)) {
        let scale = w.iter().fold(0f32, |m, v| m.max(v.abs()));
        let mut err = 0f32;
        for (a, b) in g.iter().zip(w) {
            err = err.max((a - b).abs());
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        // A NaN anywhere makes the row's error NaN, which `max` would drop: count it as ∞.
        let row = if g.iter().all(|v| v.is_finite()) { (err / scale) as f64 } else { f64::INFINITY };
        c.worst_row_rel = c.worst_row_rel.max(row);
        let (wi, w1, w2) = top2(w);
        if w1 - w2 <= tie_gap {
            c.near_ties += 1;
        } else {
            c.top1_rows += 1;
            c.top1_agree += (top2(g).0 == wi) as usize;
        }
    }
    c.rel_l2 = (num / den.max(f64::MIN_POSITIVE)).sqrt();
    c
}

/// The residual stream after one transformer block of one model (`got`) against another's
/// (`want`), `[rows, hidden]` each.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct LayerCmp {
    pub layer: usize,
    pub rows: usize,
    /// ‖got − want‖ / ‖want‖ over the whole layer output.
    pub rel_l2: f64,
    /// Largest per-row ‖got − want‖ / ‖want‖ (∞ for a row with a non-finite value).
    pub worst_row_rel: f64,
}

/// Relative L2 of the hidden state after every layer: `got[l]` against `want[l]`, each
/// `[rows, hidden]` (from `CpuModel::forward_full_layers`, `GpuModel::layer_hidden`). The
/// error of one layer includes what the earlier layers passed on: it is the error of the
/// model up to that layer, not of the layer alone. Layers beyond the shorter list are not
/// compared.
pub fn compare_layers(got: &[Vec<f32>], want: &[Vec<f32>], hidden: usize) -> Vec<LayerCmp> {
    got.iter()
        .zip(want)
        .enumerate()
        .map(|(layer, (g, w))| {
            let mut c = LayerCmp { layer, rows: w.len() / hidden.max(1), ..Default::default() };
            let (mut num, mut den) = (0f64, 0f64);
            for (gr, wr) in g.chunks(hidden).zip(w.chunks(hidden)) {
                let (mut rn, mut rd) = (0f64, 0f64);
                for (a, b) in gr.iter().zip(wr) {
                    rn += ((a - b) as f64).powi(2);
                    rd += (*b as f64).powi(2);
                }
                num += rn;
                den += rd;
                // A NaN would vanish in `max`: count a non-finite row as ∞.
                let row = if gr.iter().all(|v| v.is_finite()) { (rn / rd.max(f64::MIN_POSITIVE)).sqrt() } else { f64::INFINITY };
                c.worst_row_rel = c.worst_row_rel.max(row);
            }
            c.rel_l2 = if num.is_finite() { (num / den.max(f64::MIN_POSITIVE)).sqrt() } else { f64::INFINITY };
            c
        })
        .collect()
}

/// Per-layer and final-logit comparison of two host models on the f32 CPU backend (full
/// forwards of `seqs`): `test` (e.g. `fake_quant`'s FP8 model) against `reference`.
pub fn cpu_layer_fidelity(
    reference: &HostWeights,
    test: &HostWeights,
    seqs: &[Vec<u32>],
    tie_gap: f32,
) -> Result<(Vec<LayerCmp>, LogitCmp)> {
    cpu_layer_fidelity_act(reference, test, ActQuant::None, seqs, tie_gap)
}

/// [`cpu_layer_fidelity`] with the test model's activations quantised by `test_act`:
/// `ActQuant::Fp8Row` on `fake_quant` weights measures the W8A8 model (the reference runs f32
/// activations).
pub fn cpu_layer_fidelity_act(
    reference: &HostWeights,
    test: &HostWeights,
    test_act: ActQuant,
    seqs: &[Vec<u32>],
    tie_gap: f32,
) -> Result<(Vec<LayerCmp>, LogitCmp)> {
    let cfg = &reference.cfg;
    let (want, want_l) = CpuModel::new(reference)?.forward_full_layers(seqs)?;
    let mut t = CpuModel::new(test)?;
    t.set_act_quant(test_act);
    let (got, got_l) = t.forward_full_layers(seqs)?;
    Ok((compare_layers(&got_l, &want_l, cfg.hidden), compare_logits(&got, &want, cfg.vocab, tie_gap)))
}

/// A step backend whose canvas can be set from the host (the GPU keeps one on the device).
pub trait CanvasBackend: StepBackend {
    /// Makes sequence `seq`'s canvas `tokens` before a step.
    fn load(&mut self, seq: usize, tokens: &[u32]) -> Result<()>;
}

impl CanvasBackend for crate::decode::cpu::CpuStepper {
    fn load(&mut self, _seq: usize, _tokens: &[u32]) -> Result<()> {
        Ok(()) // the CPU step reads the batch's tokens only
    }
}

#[cfg(feature = "cuda")]
impl CanvasBackend for crate::decode::gpu::GpuStepper {
    fn load(&mut self, seq: usize, tokens: &[u32]) -> Result<()> {
        self.load_canvas(seq, tokens)
    }
}

/// Per-step commit agreement of two backends along the reference's trajectory.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct CommitAgreement {
    /// Steps (forwards) and sequence-steps (one commit decision each).
    pub steps: usize,
    pub seq_steps: usize,
    /// Sequence-steps whose committed (slot, token) sets are identical.
    pub same_commits: usize,
    /// Slots committed by both, and of those, with the same token.
    pub both_committed: usize,
    pub same_token: usize,
}

impl CommitAgreement {
    /// Sequence-steps with identical commits, as a fraction (1 when there were none).
    pub fn fraction(&self) -> f64 {
        if self.seq_steps == 0 {
            1.0
        } else {
            self.same_commits as f64 / self.seq_steps as f64
        }
    }

    /// Of the slots both committed, the fraction with the same token (1 when there were none).
    pub fn token_fraction(&self) -> f64 {
        if self.both_committed == 0 {
            1.0
        } else {
            self.same_token as f64 / self.both_committed as f64
        }
    }
}

/// Decodes `prompts` (greedy, `schedule:S` per block of `block` slots, no cache: every step
/// recomputes every row) with `reference`, and at every step runs `test` on the same canvas
/// and batch, counting identical commit decisions. The canvas advances by the reference's
/// commits. `gen` must be a multiple of `block`.
pub fn commit_agreement(
    reference: &mut dyn CanvasBackend,
    test: &mut dyn CanvasBackend,
    prompts: &[Vec<u32>],
    gen: usize,
    block: usize,
    steps_per_block: u32,
) -> Result<CommitAgreement> {
    let cfg = reference.config().clone();
    if block == 0 || !gen.is_multiple_of(block) || steps_per_block == 0 {
        return Err(crate::error::Error::bad_input(format!(
            "commit_agreement: block {block} must divide gen {gen}, steps > 0"
        )));
    }
    let mask = cfg.mask_id;
    let mut canvases: Vec<Vec<u32>> =
        prompts.iter().map(|p| p.iter().copied().chain(std::iter::repeat_n(mask, gen)).collect()).collect();
    let mut out = CommitAgreement::default();
    let sorted = |v: &[Commit]| {
        let mut v = v.to_vec();
        v.sort_by_key(|c| c.pos);
        v
    };
    for b in 0..gen / block {
        let block_masked: Vec<u32> = vec![block as u32; prompts.len()];
        for s in 0..steps_per_block {
            let mut batch = RowBatch::full(&canvases);
            batch.logit_rows.clear();
            let mut work = Vec::with_capacity(prompts.len());
            for (si, c) in canvases.iter().enumerate() {
                let p = prompts[si].len();
                let eligible: Vec<u32> = (p + b * block..p + (b + 1) * block).filter(|&i| c[i] == mask).map(|i| i as u32).collect();
                let start = batch.seqs[si].row_start;
                let mut logit_index = Vec::with_capacity(eligible.len());
                for &pos in &eligible {
                    let row = if cfg.shifted() { pos.max(1) - 1 } else { pos };
                    logit_index.push(batch.logit_rows.len() as u32);
                    batch.logit_rows.push(start + row);
                }
                let masked = eligible.len() as u32;
                work.push(SeqWork {
                    current: vec![mask; eligible.len()],
                    eligible,
                    logit_index,
                    policy: Policy::Schedule { steps: steps_per_block },
                    ctx: StepCtx { step: s, block_masked: block_masked[si], masked, block_len: block as u32 },
                    sampling: Default::default(),
                    seed: 0,
                    seq_id: si as u32,
                    step: b as u32 * steps_per_block + s,
                });
            }
            for (si, c) in canvases.iter().enumerate() {
                reference.load(si, c)?;
                test.load(si, c)?;
            }
            let want = reference.step(&batch, &work)?;
            let got = test.step(&batch, &work)?;
            out.steps += 1;
            for (si, (w, g)) in want.iter().zip(&got).enumerate() {
                out.seq_steps += 1;
                out.same_commits += (sorted(w) == sorted(g)) as usize;
                for c in w {
                    if let Some(o) = g.iter().find(|o| o.pos == c.pos) {
                        out.both_committed += 1;
                        out.same_token += (o.token == c.token) as usize;
                    }
                }
                for c in w {
                    canvases[si][c.pos as usize] = c.token;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_counts_agreement_ties_and_errors() {
        // Row 0: same argmax, small error; row 1: a near-tie; row 2: argmax flipped.
        let want = [1.0, 3.0, 0.0, 2.0, 2.01, 0.0, 5.0, 1.0, 0.0];
        let got = [1.1, 3.0, 0.0, 2.5, 2.0, 0.0, 1.0, 5.0, 0.0];
        let c = compare_logits(&got, &want, 3, 0.05);
        assert_eq!((c.rows, c.near_ties, c.top1_rows, c.top1_agree), (3, 1, 2, 1));
        assert!((c.worst_row_rel - 0.8).abs() < 1e-6, "{}", c.worst_row_rel);
        assert!((c.agreement() - 0.5).abs() < 1e-12);
        let nan = compare_logits(&[f32::NAN, 0.0, 0.0], &want[..3], 3, 0.05);
        assert!(nan.worst_row_rel.is_infinite());
    }

    #[test]
    fn compare_layers_measures_relative_l2_per_layer_and_row() {
        // Layer 0 identical; layer 1: row 0 off by 10 %, row 1 exact; layer 2 has a NaN.
        let want = vec![vec![3.0, 4.0, 1.0, 0.0]; 3];
        let got = vec![vec![3.0, 4.0, 1.0, 0.0], vec![3.3, 4.4, 1.0, 0.0], vec![3.0, f32::NAN, 1.0, 0.0]];
        let c = compare_layers(&got, &want, 2);
        assert_eq!(c.len(), 3);
        assert_eq!((c[0].layer, c[0].rows, c[0].rel_l2, c[0].worst_row_rel), (0, 2, 0.0, 0.0));
        assert!((c[1].worst_row_rel - 0.1).abs() < 1e-6, "{:?}", c[1]);
        // ‖(0.3, 0.4)‖ / ‖(3, 4, 1, 0)‖ = 0.5 / √26.
        assert!((c[1].rel_l2 - 0.5 / 26f64.sqrt()).abs() < 1e-6, "{:?}", c[1]);
        assert!(c[2].rel_l2.is_infinite() && c[2].worst_row_rel.is_infinite(), "{:?}", c[2]);
    }

    #[test]
    fn fake_quant_changes_only_linear_layers() {
        let cfg = crate::config::ModelConfig::preset("tiny-llada").unwrap();
        let w = crate::checkpoint::random_weights(&cfg, 4);
        for layout in [ScaleLayout::Channel, ScaleLayout::Block128] {
            let (q, errs) = fake_quant(&w, layout).unwrap();
            assert_eq!(errs.len(), 4 * cfg.n_layers);
            // E4M3 keeps 3 mantissa bits: about 2-3 % relative error on Gaussian weights.
            for e in &errs {
                assert!((0.005..0.05).contains(&e.rel_err), "{layout:?} {e:?}");
            }
            assert!(q.embed == w.embed && q.lm_head == w.lm_head && q.final_norm == w.final_norm);
            assert!(q.layers[0].attn_norm == w.layers[0].attn_norm && q.layers[1].ffn_norm == w.layers[1].ffn_norm);
            assert!(q.layers[0].wqkv != w.layers[0].wqkv);
        }
    }
}
