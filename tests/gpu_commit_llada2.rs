//! The commit kernel's `max(#{c > τ}, n)` count rule (`CountRule::MaxAboveSchedule`, what
//! `decode::gpu::commit_rule` makes of `llada2:τ,S`) against the CPU policy
//! (`Policy::Llada2`'s `select`): the same commits in the same rank order, the same full
//! ranking, and exactly the committed slots written into the canvas. Confidences are random in
//! (0, 1) (never 0 or 1), with exact ties on a 1/64 grid, slots exactly at τ and one f32 step
//! either side of it, NaN; τ from the slots' own values, below every slot (everything passes)
//! and above every slot (nothing passes); schedule counts larger than the slots, the last step,
//! S = 1; slot counts 1..1500 (more than one ranking tile). Every branch of the rule is
//! required to occur. Skips without a GPU (fails under `DEMASK_REQUIRE_GPU=1`).
#![cfg(feature = "cuda")]

use demask::decode::gpu::{commit_rule, count_ctx};
use demask::decode::policy::{rank, schedule_count, Policy, StepCtx};
use demask::gpu::test_gpu;
use demask::ops::commit::{commit, parse_commits, CommitWs, CountRule, SeqCommitParams};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const POISON: u32 = 0xFFFF_FFFF;

/// Which half of the rule decided a sequence's count (for the coverage check).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Branch {
    NothingPasses,
    EverythingPasses,
    ThresholdWins,
    ScheduleWins,
    ScheduleCapped,
    LastStep,
}

/// One sequence of a launch: its slots and what the CPU policy says.
struct Seq {
    policy: Policy,
    ctx: StepCtx,
    pos: Vec<u32>,
    tokens: Vec<u32>,
    conf: Vec<f32>,
}

fn next_up(x: f32) -> f32 {
    f32::from_bits(x.to_bits() + 1)
}

fn next_down(x: f32) -> f32 {
    f32::from_bits(x.to_bits() - 1)
}

/// Random confidences in (0, 1): a third on a 1/64 grid (exact ties), the rest uniform.
fn confidences(rng: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n)
        .map(|j| if j % 3 == 0 { rng.gen_range(1..64) as f32 / 64.0 } else { rng.gen_range(0.001f32..0.999) })
        .collect()
}

fn make_seq(rng: &mut StdRng, si: usize, stride: usize) -> Seq {
    let counts = [1usize, 2, 7, 19, 32, 99, 111, 1500, 3, 64, 5, 31];
    let n = counts[si % counts.len()];
    let mut pos: Vec<u32> = (0..stride as u32).collect::<Vec<_>>().choose_multiple(rng, n).cloned().collect();
    pos.sort();
    let mut conf = confidences(rng, n);
    let pick = conf[rng.gen_range(0..n)];
    // τ: a slot's own value (ties at τ do not pass), one f32 step around one, below or above
    // every slot, or a random value.
    let tau = match si % 7 {
        0 => pick,
        1 => next_down(pick),
        2 => next_up(pick),
        3 => 0.0005,
        4 => 0.9995,
        5 => 0.5,
        _ => rng.gen_range(0.05f32..0.95),
    };
    if si.is_multiple_of(7) && n > 3 {
        // More slots exactly at τ and just above / below it.
        conf[1] = tau;
        conf[2] = next_up(tau);
        conf[3] = next_down(tau);
    }
    if si % 11 == 5 && n > 4 {
        conf[4] = f32::NAN;
    }
    // Schedule: S in 1..=32 steps, the block's masked count at its start ≥ the slots now,
    // sometimes far above them (n larger than the slots), the step sometimes the last or past it.
    let steps = [1u32, 2, 4, 5, 8, 32][si % 6];
    let block_masked = match si % 4 {
        0 => n as u32,
        1 => n as u32 + rng.gen_range(1..40),
        2 => (n as u32).saturating_mul(steps) + rng.gen_range(0..8),
        _ => n as u32 + rng.gen_range(0..4),
    };
    let step = if si % 5 == 4 { steps - 1 + (si as u32 % 2) } else { rng.gen_range(0..steps) };
    // The rule splits the block's length, not its masked count: the first block of an
    // unaligned prompt starts partly filled (its prompt tail), so half the sequences get a
    // block longer than its masked slots.
    let block_len = if si % 2 == 1 { block_masked + rng.gen_range(1..9) } else { block_masked };
    let ctx = StepCtx { step, block_masked, masked: n as u32, block_len };
    let tokens = (0..n).map(|_| rng.gen_range(0..157184)).collect();
    Seq { policy: Policy::Llada2 { tau, steps }, ctx, pos, tokens, conf }
}

fn branch(s: &Seq) -> Branch {
    let Policy::Llada2 { tau, steps } = s.policy else { unreachable!() };
    let n = s.conf.len();
    let passing = s.conf.iter().filter(|&&c| c > tau).count();
    let sched = schedule_count(s.ctx.block_len, steps, s.ctx.step) as usize;
    if s.ctx.step + 1 >= steps {
        Branch::LastStep
    } else if passing == 0 {
        Branch::NothingPasses
    } else if passing == n {
        Branch::EverythingPasses
    } else if sched > n {
        Branch::ScheduleCapped
    } else if passing > sched {
        Branch::ThresholdWins
    } else {
        Branch::ScheduleWins
    }
}

#[test]
fn llada2_commit_rule_matches_the_cpu_policy() {
    let Some(gpu) = test_gpu() else { return };
    let mut rng = StdRng::seed_from_u64(0x11ada2);
    let stride = 4096usize;
    let mut seen = std::collections::BTreeMap::new();
    for launch in 0..6 {
        let n_seqs = 29 + launch;
        let seqs: Vec<Seq> = (0..n_seqs).map(|si| make_seq(&mut rng, si + 3 * launch, stride)).collect();
        let mut records = Vec::new();
        let (mut positions, mut tokens, mut conf) = (Vec::new(), Vec::new(), Vec::new());
        for (si, s) in seqs.iter().enumerate() {
            let rule = commit_rule(&s.policy).unwrap();
            assert!(matches!(rule, CountRule::MaxAboveSchedule { .. }), "{}: {rule:?}", s.policy);
            records.push(SeqCommitParams::new(rule, count_ctx(s.ctx), positions.len(), s.pos.len(), n_seqs - 1 - si));
            positions.extend_from_slice(&s.pos);
            tokens.extend_from_slice(&s.tokens);
            conf.extend_from_slice(&s.conf);
            *seen.entry(branch(s)).or_insert(0usize) += 1;
        }
        let n_slots = positions.len();
        let mut ws = CommitWs::new(&gpu, n_seqs, n_slots).unwrap();
        ws.set_seqs(&gpu, &records, &positions, stride).unwrap();
        let dt = gpu.upload(&tokens, &[n_slots]).unwrap();
        let dc = gpu.upload(&conf, &[n_slots]).unwrap();
        let canvas0: Vec<u32> = (0..n_seqs * stride).map(|_| rng.gen_range(0..157184)).collect();
        let mut canvas = gpu.upload(&canvas0, &[n_seqs, stride]).unwrap();
        let out_len = ws.out_len();
        let mut out = gpu.upload(&vec![POISON; out_len], &[out_len]).unwrap();
        commit(&gpu, &mut ws, &dt, &dc, &mut canvas, &mut out).unwrap();
        let host = out.to_host(&gpu).unwrap();
        assert!(host.iter().all(|&x| x != POISON), "launch {launch}: part of the output was not written");
        let lists = parse_commits(&host, &records).unwrap();
        let mut expect_canvas = canvas0.clone();
        for (si, s) in seqs.iter().enumerate() {
            let what = format!(
                "launch {launch} sequence {si} ({}, {:?}, {} slots, {:?})",
                s.policy,
                s.ctx,
                s.pos.len(),
                branch(s)
            );
            let eligible: Vec<(u32, f32)> = s.pos.iter().copied().zip(s.conf.iter().copied()).collect();
            let tok_of = |p: u32| s.tokens[s.pos.binary_search(&p).unwrap()];
            let want: Vec<(u32, u32)> = s.policy.select(s.ctx, &eligible).into_iter().map(|p| (p, tok_of(p))).collect();
            let got: Vec<(u32, u32)> = lists[si].iter().map(|c| (c.pos, c.token)).collect();
            assert_eq!(got, want, "{what}: commits differ (count {} vs {})", got.len(), want.len());
            let mut ranked = eligible.clone();
            rank(&mut ranked);
            let base = n_seqs + 2 * records[si].slot_offset as usize;
            let full: Vec<(u32, u32)> =
                host[base..base + 2 * s.pos.len()].chunks(2).map(|c| (c[0], c[1])).collect();
            let ranked_want: Vec<(u32, u32)> = ranked.iter().map(|&(p, _)| (p, tok_of(p))).collect();
            assert_eq!(full, ranked_want, "{what}: full rank order differs");
            let row = n_seqs - 1 - si;
            for &(p, t) in &want {
                expect_canvas[row * stride + p as usize] = t;
            }
        }
        let got_canvas = canvas.to_host(&gpu).unwrap();
        let diff: Vec<usize> = (0..got_canvas.len()).filter(|&i| got_canvas[i] != expect_canvas[i]).take(8).collect();
        assert!(diff.is_empty(), "launch {launch}: canvas entries differ at {diff:?} (committed slots written, others untouched)");
        eprintln!("llada2 commit launch {launch}: {n_seqs} sequences, {n_slots} slots identical");
    }
    eprintln!("branches: {seen:?}");
    for b in [
        Branch::NothingPasses,
        Branch::EverythingPasses,
        Branch::ThresholdWins,
        Branch::ScheduleWins,
        Branch::ScheduleCapped,
        Branch::LastStep,
    ] {
        assert!(seen.get(&b).copied().unwrap_or(0) > 0, "no sequence exercised {b:?}: {seen:?}");
    }
}

/// The kernel's record for the rule, and a record with an unknown rule number refused on the
/// host before any launch.
#[test]
fn llada2_rule_record_and_bad_rule_refused() {
    let Some(gpu) = test_gpu() else { return };
    let ctx = StepCtx { step: 1, block_masked: 30, masked: 20, block_len: 32 };
    let rec = SeqCommitParams::new(commit_rule(&Policy::Llada2 { tau: 0.9, steps: 8 }).unwrap(), count_ctx(ctx), 0, 2, 0);
    assert_eq!((rec.policy, rec.tau, rec.steps, rec.ctx_step, rec.block_masked, rec.block_len), (6, 0.9, 8, 1, 30, 32));
    let mut ws = CommitWs::new(&gpu, 1, 2).unwrap();
    ws.set_seqs(&gpu, &[rec], &[3, 5], 16).unwrap();
    let bad = SeqCommitParams { policy: 7, ..rec };
    let e = ws.set_seqs(&gpu, &[bad], &[3, 5], 16).unwrap_err().to_string();
    assert!(e.contains("bad record"), "{e}");
}
