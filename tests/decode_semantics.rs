//! Decoding semantics (DESIGN.md §4) on the CPU, independent of any model: a fake
//! `StepBackend` returns scripted logits per slot and the host selection
//! (`decode::cpu::score_and_select`) picks the commits; the runner does the rest. Then end to
//! end on random tiny-llada / tiny-dream weights through the `Engine`: every policy finishes,
//! determinism, batching invariance, and bad input.
mod common;

use common::{ids_request, seq_state};
use demask::batch::RowBatch;
use demask::checkpoint::random_weights;
use demask::config::ModelConfig;
use demask::decode::canvas::CanvasSpec;
use demask::decode::cpu::score_and_select;
use demask::decode::prior::Prior;
use demask::decode::runner::{self, SeqState, StepEvent};
use demask::decode::step::{Commit, SeqWork, SlotScores, StepBackend};
use demask::decode::{Policy, Sampling};
use demask::engine::{Device, Engine, EngineOptions, Output, Prompt, Request};
use demask::tokenizer::Tokenizer;
use demask::Result;

const V: usize = 16;
const MASK: u32 = 15;
const EOS: u32 = 14;
const EOT: u32 = 13;

fn fake_cfg(preset: &str) -> ModelConfig {
    ModelConfig {
        vocab: V,
        mask_id: MASK,
        eos_id: EOS,
        eot_id: EOT,
        max_seq_len: 64,
        ..ModelConfig::preset(preset).unwrap()
    }
}

/// The logit row of one slot: (canvas position, the sequence's step) → row.
type Script = Box<dyn FnMut(u32, u32) -> Vec<f32>>;

/// Scripted logits; records every batch and work list it is given.
struct Fake {
    cfg: ModelConfig,
    /// One script per sequence of the run (indexed by `SeqWork::seq_id`).
    scripts: Vec<Script>,
    batches: Vec<RowBatch>,
    works: Vec<Vec<SeqWork>>,
}

impl Fake {
    fn new(cfg: ModelConfig, scripts: Vec<Script>) -> Self {
        Fake { cfg, scripts, batches: Vec::new(), works: Vec::new() }
    }
}

impl StepBackend for Fake {
    fn step(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<Vec<Vec<Commit>>> {
        Ok(self.step_scored(batch, work)?.0)
    }
    fn step_scored(&mut self, batch: &RowBatch, work: &[SeqWork]) -> Result<(Vec<Vec<Commit>>, Vec<SlotScores>)> {
        self.batches.push(batch.clone());
        self.works.push(work.to_vec());
        // Rows nobody reads hold NaN, so reading a wrong row shows.
        let mut logits = vec![f32::NAN; batch.logit_rows.len() * V];
        for w in work {
            for (&pos, &r) in w.eligible.iter().zip(&w.logit_index) {
                let row = (self.scripts[w.seq_id as usize])(pos, w.step);
                logits[r as usize * V..(r as usize + 1) * V].copy_from_slice(&row);
            }
        }
        score_and_select(&logits, V, MASK, work)
    }
    fn config(&self) -> &ModelConfig {
        &self.cfg
    }
}

/// A row whose argmax is `tok` with probability `p` (> 1/15) among the 15 non-mask tokens.
fn row_p(tok: u32, p: f64) -> Vec<f32> {
    let mut r = vec![0f32; V];
    r[tok as usize] = (p * 14.0 / (1.0 - p)).ln() as f32;
    r[MASK as usize] = 50.0; // the mask's logit is ignored
    r
}

/// A row where `tok` (< 12) ties with token 12 and nothing else has mass: p = 0.5 exactly.
fn row_half(tok: u32) -> Vec<f32> {
    let mut r = vec![-1e30f32; V];
    r[tok as usize] = 0.0;
    r[12] = 0.0;
    r
}

fn seq(
    cfg: &ModelConfig,
    prompt: &[u32],
    gen: u32,
    block: u32,
    policy: &str,
    prior: Option<Prior>,
    stop: bool,
) -> SeqState {
    let prior = prior.map(|p| p.resolve(gen, cfg, None).unwrap()).unwrap_or_default();
    let spec = CanvasSpec { gen_len: gen, block_len: block, stop_at_eos: stop };
    seq_state(cfg, prompt, &prior, spec, policy, 7, 0)
}

/// Runs one sequence with a script; returns it, the fake, and the commits of each step.
fn run_one(cfg: ModelConfig, mut s: SeqState, script: Script) -> (SeqState, Fake, Vec<Vec<Commit>>) {
    let mut fake = Fake::new(cfg, vec![script]);
    let mut steps: Vec<Vec<Commit>> = Vec::new();
    let mut cb = |e: &StepEvent| steps.push(e.commits.to_vec());
    runner::run(&mut fake, std::slice::from_mut(&mut s), Some(&mut cb)).unwrap();
    (s, fake, steps)
}

/// Confidence of the slot at `pos` for the given table over gen offsets.
fn by_offset(prompt_len: u32, conf: &'static [f64]) -> Script {
    Box::new(move |pos, _| row_p(3, conf[(pos - prompt_len) as usize]))
}

#[test]
fn schedule_counts_over_a_whole_block_and_most_confident_first() {
    let cfg = fake_cfg("tiny-llada");
    // m = 10, S = 4: k = 3, 3, 2, 2.
    const C: [f64; 10] = [0.30, 0.90, 0.40, 0.80, 0.50, 0.70, 0.60, 0.95, 0.35, 0.45];
    let (s, fake, steps) =
        run_one(cfg.clone(), seq(&cfg, &[1, 2, 3], 10, 10, "schedule:4", None, false), by_offset(3, &C));
    assert_eq!(s.commits_per_step, [3, 3, 2, 2]);
    let offs: Vec<Vec<u32>> = steps.iter().map(|c| c.iter().map(|c| c.pos - 3).collect()).collect();
    assert_eq!(offs, [vec![7, 1, 3], vec![5, 6, 4], vec![9, 2], vec![8, 0]], "rank order by confidence");
    let ctx: Vec<_> = fake.works.iter().map(|w| (w[0].ctx.step, w[0].ctx.block_masked, w[0].ctx.masked)).collect();
    assert_eq!(ctx, [(0, 10, 10), (1, 10, 7), (2, 10, 4), (3, 10, 2)]);
    assert!(s.canvas.gen().iter().all(|&t| t == 3));
}

#[test]
fn threshold_commits_at_exactly_tau_and_at_least_one() {
    let cfg = fake_cfg("tiny-llada");
    let script: Script = Box::new(|pos, _| match pos - 2 {
        0 => row_half(4),
        1 => row_p(5, 0.3),
        2 => row_half(6),
        _ => row_p(7, 0.2),
    });
    let (s, _, steps) = run_one(cfg.clone(), seq(&cfg, &[1, 2], 4, 4, "threshold:0.5", None, false), script);
    assert_eq!(steps[0], [Commit { pos: 2, token: 4 }, Commit { pos: 4, token: 6 }], "conf == tau commits");
    assert_eq!(steps[1], [Commit { pos: 3, token: 5 }], "none passes: the most confident alone");
    assert_eq!(steps[2], [Commit { pos: 5, token: 7 }]);
    assert_eq!(s.commits_per_step, [2, 1, 1]);
}

#[test]
fn ties_go_to_the_lower_position() {
    let cfg = fake_cfg("tiny-llada");
    let script: Script = Box::new(|_, _| row_p(9, 0.6));
    let (_, _, steps) = run_one(cfg.clone(), seq(&cfg, &[1], 8, 8, "schedule:4", None, false), script);
    let pos: Vec<Vec<u32>> = steps.iter().map(|c| c.iter().map(|c| c.pos).collect()).collect();
    assert_eq!(pos, [[1, 2], [3, 4], [5, 6], [7, 8]]);
}

#[test]
fn factor_commits_the_longest_passing_prefix() {
    let cfg = fake_cfg("tiny-llada");
    // f = 1: n-th slot needs c_n >= 1 - 1/(n+1): 0.5, 0.667, 0.75, ...
    const C: [f64; 5] = [0.55, 0.9, 0.7, 0.6, 0.8];
    let (s, _, steps) = run_one(cfg.clone(), seq(&cfg, &[1], 5, 5, "factor:1", None, false), by_offset(1, &C));
    // [0.9, 0.8 | 0.7 < 0.75] → 2; then 0.7 ≥ 0.5 but 0.6 < 0.667 → 1; then 1, 1.
    assert_eq!(s.commits_per_step, [2, 1, 1, 1]);
    assert_eq!(steps[0].iter().map(|c| c.pos - 1).collect::<Vec<_>>(), [1, 4]);
}

/// Dream's count, computed here independently: timesteps torch.linspace(1, 1e-3, S+1) in f32
/// (PyTorch's CPU kernel: fma from the start for the first half, from the end for the second),
/// int(left · (1 − ts[i+1]/ts[i])) in f32 (0 allowed), all the rest on the last step.
fn dream_expected(m: u32, steps: u32) -> Vec<u32> {
    let n = steps + 1;
    let step = (1e-3f32 - 1.0) / steps as f32;
    let ts: Vec<f32> = (0..n).map(|j| if j < n / 2 { step.mul_add(j as f32, 1.0) } else { (-step).mul_add((n - 1 - j) as f32, 1e-3) }).collect();
    let mut left = m;
    let mut out = Vec::new();
    for i in 0..steps as usize {
        let k = if i + 1 == steps as usize { left } else { (left as f32 * (1.0 - ts[i + 1] / ts[i])) as u32 };
        out.push(k);
        left -= k;
    }
    out
}

#[test]
fn dream_counts_floor_and_last_step_all() {
    let cfg = fake_cfg("tiny-dream");
    const C: [f64; 10] = [0.30, 0.90, 0.40, 0.80, 0.50, 0.70, 0.60, 0.95, 0.35, 0.45];
    let (s, _, _) =
        run_one(cfg.clone(), seq(&cfg, &[1, 2], 10, 10, "dream:maskgit_plus,4", None, false), by_offset(2, &C));
    assert_eq!(dream_expected(10, 4), [2, 2, 2, 4]);
    assert_eq!(s.commits_per_step, [2, 2, 2, 4]);
    // m = 3, S = 8: the count is 0 for six steps; every one of the 8 steps runs and counts
    // (Dream's reference does the same), the last commits what is left.
    let (s, _, steps) =
        run_one(cfg.clone(), seq(&cfg, &[1, 2], 3, 3, "dream:topk_margin,8", None, false), by_offset(2, &C));
    assert_eq!(dream_expected(3, 8), [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(s.commits_per_step, [0, 0, 0, 0, 0, 0, 1, 2]);
    assert_eq!(steps.len(), 8, "zero-commit steps still run a forward");
    assert!(s.canvas.is_done());
}

#[test]
fn structure_priors_are_untouched_and_not_counted() {
    let cfg = fake_cfg("tiny-llada");
    // gen 8, blocks of 4: block 0 has offsets 1, 2 fixed; block 1 is fully fixed (no step).
    let prior = Prior::Fixed(vec![(1, 7), (2, 8), (4, 9), (5, 9), (6, 9), (7, 9)]);
    let script: Script = Box::new(|_, _| row_p(3, 0.99));
    let (s, fake, _) = run_one(cfg.clone(), seq(&cfg, &[1, 2], 8, 4, "schedule:2", Some(prior), false), script);
    assert_eq!(s.canvas.gen(), [3, 7, 8, 3, 9, 9, 9, 9]);
    assert_eq!(s.commits_per_step, [1, 1], "two steps over the two masked slots, none for block 1");
    for w in fake.works.iter().flatten() {
        assert!(w.eligible.iter().all(|&p| p == 2 || p == 5), "eligible {:?}", w.eligible);
        assert_eq!(w.ctx.block_masked, 2);
    }
    // Template priors (holes only need no tokenizer) resolve the same way.
    let slots = Prior::Template("<mask:3>".into()).resolve(8, &cfg, None).unwrap();
    assert_eq!(slots, [None; 8]);
}

#[test]
fn eos_in_a_finished_block_stops_and_fills_the_rest() {
    let cfg = fake_cfg("tiny-llada");
    let prior = Prior::Fixed(vec![(6, 9)]);
    for stop_tok in [EOS, EOT] {
        let script: Script = Box::new(move |pos, _| if pos == 2 { row_p(stop_tok, 0.9) } else { row_p(3, 0.8) });
        let (s, _, _) = run_one(cfg.clone(), seq(&cfg, &[1], 8, 4, "schedule:2", Some(prior.clone()), true), script);
        assert_eq!(s.canvas.gen(), [3, stop_tok, 3, 3, EOS, EOS, 9, EOS]);
        assert!(s.canvas.stopped_at_eos());
        assert_eq!(s.commits_per_step.len(), 2, "only block 0 took steps");
    }
    // Without the stop rule the next block is decoded.
    let script: Script = Box::new(|pos, _| if pos == 2 { row_p(EOS, 0.9) } else { row_p(3, 0.8) });
    let (s, _, _) = run_one(cfg.clone(), seq(&cfg, &[1], 8, 4, "schedule:2", Some(prior), false), script);
    assert_eq!(s.canvas.gen(), [3, EOS, 3, 3, 3, 3, 9, 3]);
    assert!(!s.canvas.stopped_at_eos());
}

#[test]
fn blocks_advance_in_order_and_every_row_is_live() {
    let cfg = fake_cfg("tiny-llada");
    let script: Script = Box::new(|pos, _| row_p(pos % 10, 0.7));
    let (s, fake, _) = run_one(cfg.clone(), seq(&cfg, &[1, 2, 3], 6, 2, "schedule:2", None, false), script);
    let seen: Vec<(Vec<u32>, u32)> = fake.works.iter().map(|w| (w[0].eligible.clone(), w[0].ctx.step)).collect();
    assert_eq!(seen, [(vec![3, 4], 0), (vec![4], 1), (vec![5, 6], 0), (vec![6], 1), (vec![7, 8], 0), (vec![8], 1)]);
    let steps: Vec<u32> = fake.works.iter().map(|w| w[0].step).collect();
    assert_eq!(steps, [0, 1, 2, 3, 4, 5], "global step number keys the RNG");
    for b in &fake.batches {
        assert_eq!(b.positions, (0..9).collect::<Vec<u32>>(), "no cache: every row live");
    }
    assert_eq!(s.canvas.gen(), [3, 4, 5, 6, 7, 8]);
}

#[test]
fn shifted_logit_rows_cross_the_prompt_boundary() {
    let cfg = fake_cfg("tiny-dream");
    let a = seq(&cfg, &[1, 2, 3], 4, 4, "schedule:4", None, false);
    let mut b = seq(&cfg, &[], 4, 2, "schedule:2", None, false);
    b.seq_id = 1;
    // Slot p must see the logits of row p - 1: script by position, NaN elsewhere.
    let scripts: Vec<Script> = vec![Box::new(|pos, _| row_p(pos % 10, 0.6)), Box::new(|pos, _| row_p(pos % 10, 0.6))];
    let mut fake = Fake::new(cfg.clone(), scripts);
    let mut seqs = vec![a, b];
    runner::run(&mut fake, &mut seqs, None).unwrap();
    let (b0, w0) = (&fake.batches[0], &fake.works[0]);
    assert_eq!(b0.seqs[1].row_start, 7);
    // A: slots 3..7 → rows 2..6 (slot 3, the first gen slot, reads the last prompt row).
    // B (empty prompt, rows from 7): slots 0 and 1 both read its row 0.
    assert_eq!(b0.logit_rows, [2, 3, 4, 5, 7]);
    assert_eq!(w0[0].eligible, [3, 4, 5, 6]);
    assert_eq!(w0[0].logit_index, [0, 1, 2, 3]);
    assert_eq!(w0[1].eligible, [0, 1]);
    assert_eq!(w0[1].logit_index, [4, 4]);
    // LLaDA reads the slot's own row.
    let cfg_l = fake_cfg("tiny-llada");
    let (batch, work) = runner::build_step(&[&seq(&cfg_l, &[1, 2, 3], 4, 4, "schedule:4", None, false)], false).unwrap();
    assert_eq!(batch.logit_rows, [3, 4, 5, 6]);
    assert_eq!(work[0].logit_index, [0, 1, 2, 3]);
    // Both take 4 steps (A: 1 block x 4, B: 2 blocks x 2), so every batch holds both.
    assert!(fake.batches.iter().all(|b| b.seqs.len() == 2));
    assert_eq!(seqs[0].canvas.gen(), [3, 4, 5, 6]);
    // B's slots 0 and 1 share row 0, which holds the script's row of slot 1 (written last).
    assert_eq!(seqs[1].canvas.gen(), [1, 1, 2, 3]);
}

#[test]
fn finished_sequences_leave_the_batch() {
    let cfg = fake_cfg("tiny-llada");
    let a = seq(&cfg, &[1], 2, 2, "schedule:1", None, false);
    let mut b = seq(&cfg, &[1, 2], 6, 2, "schedule:2", None, false);
    b.seq_id = 1;
    let scripts: Vec<Script> = vec![Box::new(|_, _| row_p(4, 0.6)), Box::new(|_, _| row_p(5, 0.6))];
    let mut fake = Fake::new(cfg, scripts);
    let mut seqs = vec![a, b];
    runner::run(&mut fake, &mut seqs, None).unwrap();
    let sizes: Vec<usize> = fake.batches.iter().map(|b| b.seqs.len()).collect();
    assert_eq!(sizes, [2, 1, 1, 1, 1, 1]);
    assert_eq!(fake.batches[1].tokens.len(), 8, "only B's rows");
    assert_eq!(fake.works[1][0].seq_id, 1);
}

// ---- end to end on random tiny weights ----

const POLICIES: &[&str] = &[
    "schedule:4",
    "random:4",
    "threshold:0.9",
    "confident:0.9,4",
    "factor:1",
    "dream:origin,4",
    "dream:maskgit_plus,4",
    "dream:topk_margin,4",
    "dream:entropy,4",
];

fn engine(preset: &str) -> Engine {
    let cfg = ModelConfig::preset(preset).unwrap();
    let tok = Tokenizer::tiny(&cfg).unwrap();
    Engine::from_weights(
        random_weights(&cfg, 3),
        Some(tok),
        EngineOptions { device: Device::Cpu, ..Default::default() },
    )
    .unwrap()
}

/// Every slot filled; `committed` (the masked slots) committed once each.
fn check_complete(o: &Output, gen: usize, committed: usize, mask: u32) {
    assert_eq!(o.tokens.len(), gen);
    assert!(o.tokens.iter().all(|&t| t != mask), "mask left: {:?}", o.tokens);
    assert_eq!(o.commits_per_step.iter().sum::<u32>() as usize, committed);
    assert_eq!(o.commits_per_step.len(), o.steps as usize);
    assert_eq!(o.step_ms.len(), o.steps as usize);
    assert!(o.commits_per_step.iter().all(|&k| k >= 1));
}

#[test]
fn every_policy_runs_to_completion_on_random_weights() {
    for preset in ["tiny-llada", "tiny-dream"] {
        let mut e = engine(preset);
        let mask = e.config().mask_id;
        for &p in POLICIES {
            let o = e.generate(&[ids_request(&[72, 101, 108, 108, 111], 16, 8, p)]).unwrap().remove(0);
            check_complete(&o, 16, 16, mask);
            if p.starts_with("schedule") || p.starts_with("random") || p.starts_with("dream") {
                assert_eq!(o.steps, 8, "{preset} {p}: 2 blocks x 4 steps");
            }
            assert!(o.text.is_some());
        }
    }
}

#[test]
fn same_seed_same_tokens_and_different_seeds_differ() {
    for preset in ["tiny-llada", "tiny-dream"] {
        let mut e = engine(preset);
        let mut r = ids_request(&[1, 2, 3, 4], 16, 8, "threshold:0.5");
        let g1 = e.generate(&[r.clone()]).unwrap().remove(0);
        let g2 = e.generate(&[r.clone()]).unwrap().remove(0);
        assert_eq!(g1.tokens, g2.tokens, "{preset} greedy");
        r.sampling = Sampling { temperature: 1.0, top_k: 0, top_p: 1.0 };
        r.seed = 11;
        let s1 = e.generate(&[r.clone()]).unwrap().remove(0);
        let s1b = e.generate(&[r.clone()]).unwrap().remove(0);
        assert_eq!(s1.tokens, s1b.tokens, "{preset} sampled, same seed");
        r.seed = 12;
        let s2 = e.generate(&[r.clone()]).unwrap().remove(0);
        assert_ne!(s1.tokens, s2.tokens, "{preset}: seeds 11 and 12 gave the same 16 tokens");
        assert_ne!(s1.tokens, g1.tokens, "{preset}: T = 1 equals greedy");
    }
}

#[test]
fn a_request_alone_equals_it_in_a_batch_of_three() {
    for preset in ["tiny-llada", "tiny-dream"] {
        let mut e = engine(preset);
        for temperature in [0.0, 0.8] {
            let mut r = ids_request(&[10, 20, 30, 40, 50, 60, 70], 16, 4, "confident:0.8,4");
            r.sampling.temperature = temperature;
            r.seed = 5;
            let mut x = ids_request(&[99], 8, 8, "schedule:3");
            x.seed = 6;
            let mut y = ids_request(&[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], 24, 8, "factor:1");
            y.sampling.temperature = 0.5;
            let alone = e.generate(&[r.clone()]).unwrap().remove(0);
            let batch = e.generate(&[x, r, y]).unwrap();
            assert_eq!(alone.tokens, batch[1].tokens, "{preset} T={temperature}");
            assert_eq!(alone.commits_per_step, batch[1].commits_per_step);
        }
    }
}

#[test]
fn waves_bounded_by_max_batch_and_max_rows_give_the_same_tokens() {
    let cfg = ModelConfig::preset("tiny-dream").unwrap();
    let reqs: Vec<Request> = (0..4u32)
        .map(|i| {
            let mut r = ids_request(&(1..4 + 3 * i).collect::<Vec<u32>>(), 8, 4, "threshold:0.7");
            r.sampling.temperature = 0.9;
            r.seed = 40 + i as u64;
            r
        })
        .collect();
    let all = engine("tiny-dream").generate(&reqs).unwrap();
    for (max_batch, max_rows) in [(1, 0), (3, 0), (0, 30)] {
        let opts = EngineOptions { device: Device::Cpu, max_batch, max_rows, ..Default::default() };
        let mut e = Engine::from_weights(random_weights(&cfg, 3), None, opts).unwrap();
        let mut seen = vec![0u32; 4];
        let mut cb = |ev: &StepEvent| seen[ev.index] += 1;
        let waves = e.generate_with(&reqs, &mut cb).unwrap();
        for (i, (a, b)) in all.iter().zip(&waves).enumerate() {
            assert_eq!(a.tokens, b.tokens, "max_batch {max_batch} max_rows {max_rows} request {i}");
            assert_eq!(seen[i], b.steps, "callback index of request {i}");
        }
    }
    let opts = EngineOptions { device: Device::Cpu, max_rows: 13, ..Default::default() };
    let mut e = Engine::from_weights(random_weights(&cfg, 3), None, opts).unwrap();
    let m = e.generate(&reqs).unwrap_err().to_string();
    assert!(m.contains("request 1") && m.contains("max_rows 13"), "{m}");
}

#[test]
fn stop_at_eos_counts_only_real_tokens() {
    let mut e = engine("tiny-llada");
    let cfg = e.config().clone();
    // Fixed EOS in block 0 forces the stop once block 0 is finished.
    let mut r = ids_request(&[1, 2, 3], 16, 4, "threshold:0.9");
    r.stop_at_eos = true;
    r.prior = Some(Prior::Fixed(vec![(1, cfg.eos_id), (9, 65)]));
    let o = e.generate(&[r]).unwrap().remove(0);
    assert!(o.stopped_at_eos);
    assert_eq!(o.tokens[1], cfg.eos_id);
    assert_eq!(o.tokens[9], 65, "fixed slot kept");
    assert!(o.tokens[4..].iter().enumerate().all(|(i, &t)| i + 4 == 9 || t == cfg.eos_id));
    let real = o.tokens[..4].iter().enumerate().filter(|&(i, &t)| i != 1 && t != cfg.eos_id && t != cfg.eot_id).count();
    assert_eq!(o.generated_tokens, real);
    assert!(o.commits_per_step.iter().sum::<u32>() == 3, "only block 0's three masked slots");
}

#[test]
fn text_prompts_chat_and_template_priors() {
    let mut e = engine("tiny-dream");
    let r = Request::text("Hi")
        .chat(true)
        .gen_len(24)
        .block_len(8)
        .policy("threshold:0.9".parse().unwrap())
        .prior(Prior::Template("{\"a\": <mask:3>}".into()))
        .stop_at_eos(false);
    let o = e.generate(&[r]).unwrap().remove(0);
    let chat = e.tokenizer().unwrap().apply_chat("Hi").unwrap();
    assert_eq!(o.prompt_len, e.tokenizer().unwrap().encode(&chat, false).unwrap().len());
    assert_eq!(&o.tokens[..6], b"{\"a\": ".iter().map(|&b| b as u32).collect::<Vec<_>>().as_slice());
    assert_eq!(o.tokens[9], b'}' as u32);
    check_complete(&o, 24, 24 - 7, e.config().mask_id);
}

#[test]
fn engine_loads_a_checkpoint_directory() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let dir = std::env::temp_dir().join(format!("demask-decode-semantics-{}", std::process::id()));
    demask::checkpoint::write_checkpoint(&cfg, 1, &dir, true, |_: &str| {}).unwrap();
    let mut e = Engine::load(&dir, EngineOptions { device: Device::Cpu, ..Default::default() }).unwrap();
    let o = e.generate(&[ids_request(&[1, 2, 3], 32, 8, "threshold:0.9")]).unwrap().remove(0);
    check_complete(&o, 32, 32, cfg.mask_id);
    let r = Request::text("abc").gen_len(8).policy("schedule:2".parse().unwrap());
    assert!(e.generate(&[r]).unwrap()[0].text.is_some());
    // cuda:0 either opens (a GPU machine: then it decodes too) or fails naming the device.
    match Engine::load(&dir, EngineOptions { device: Device::Cuda(0), ..Default::default() }) {
        Ok(mut e) => {
            let o = e.generate(&[ids_request(&[1, 2, 3], 32, 8, "threshold:0.9")]).unwrap().remove(0);
            check_complete(&o, 32, 32, cfg.mask_id);
        }
        Err(e) => assert!(e.to_string().contains("cuda:0"), "{e}"),
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn bad_input_is_refused_with_clear_errors() {
    let cfg = ModelConfig::preset("tiny-llada").unwrap();
    let mut e = engine("tiny-llada");
    let mut no_tok = Engine::from_weights(random_weights(&cfg, 3), None, EngineOptions::default()).unwrap();
    let err = |e: &mut Engine, r: Request| e.generate(&[r]).unwrap_err().to_string();
    let base = || ids_request(&[1, 2, 3], 16, 8, "schedule:4");
    let with_prompt = |p: Prompt| {
        let mut r = base();
        r.prompt = p;
        r
    };
    assert!(e.generate(&[]).unwrap_err().to_string().contains("no requests"));
    let m = err(&mut e, with_prompt(Prompt::Ids(vec![1, 512])));
    assert!(m.contains("512") && m.contains("vocabulary"), "{m}");
    let m = err(&mut e, with_prompt(Prompt::Ids(vec![1; 1020])));
    assert!(m.contains("1036") && m.contains("context"), "{m}");
    assert!(err(&mut e, base().block_len(0)).contains("block_len must be > 0"));
    assert!(err(&mut e, base().gen_len(0)).contains("gen_len must be > 0"));
    let m = err(&mut e, base().gen_len(20).block_len(8));
    assert!(m.contains("20") && m.contains("8") && m.contains("multiple"), "{m}");
    for bad in ["schedule:0", "threshold:2", "bogus:1", "dream:x,4"] {
        assert!(bad.parse::<Policy>().unwrap_err().to_string().contains("policy"), "{bad}");
    }
    let m = err(&mut e, base().sampling(Sampling { temperature: -0.1, ..Sampling::default() }));
    assert!(m.contains("temperature"), "{m}");
    for p in [0.0, 1.5, f32::NAN] {
        let m = err(&mut e, base().sampling(Sampling { top_p: p, ..Sampling::default() }));
        assert!(m.contains("top_p"), "{m}");
    }
    let m = err(&mut no_tok, with_prompt(Prompt::Text { text: "hi".into(), chat: false }));
    assert!(m.contains("tokenizer"), "{m}");
    let m = err(&mut e, base().prior(Prior::Template("abc<mask:14>".into())));
    assert!(m.contains("at least 17") && m.contains("gen_len is 16"), "{m}");
    let m = err(&mut e, base().prior(Prior::Fixed(vec![(16, 3)])));
    assert!(m.contains("offset 16"), "{m}");
    // The failing request is named in a batch.
    let m = e.generate(&[base(), base().gen_len(0)]).unwrap_err().to_string();
    assert!(m.contains("request 1"), "{m}");
    assert!("cuda:x".parse::<Device>().is_err());
}
