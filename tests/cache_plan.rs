//! KV-cache plans (DESIGN.md §5): exact live row sets of every step of scripted decodes, written
//! out by hand; parse errors; and invariants over random commit orders.
use demask::cache::{CachePlan, CacheScheme, StepRows};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One step of a driven decode: its inputs to the plan, the plan's answer and the commits.
#[derive(Debug)]
struct Step {
    n: u32,
    i: u32,
    block: (u32, u32),
    masked: Vec<u32>,
    eligible: Vec<u32>,
    rows: StepRows,
}

/// Drive `plan` through a whole decode of a `[p | g]` canvas cut into blocks of `bl`, the way a
/// scheduler does: `choose(n, eligible)` picks the slots step `n` commits (non-empty, eligible).
fn decode(plan: &mut CachePlan, p: u32, g: u32, bl: u32, mut choose: impl FnMut(u32, &[u32]) -> Vec<u32>) -> Vec<Step> {
    let total = p + g;
    let mut masked: Vec<u32> = (p..total).collect();
    let mut steps = Vec::new();
    let mut n = 0u32;
    let mut start = p;
    while start < total {
        let end = (start + bl).min(total);
        let mut i = 0u32;
        loop {
            let eligible: Vec<u32> = masked.iter().copied().filter(|&q| q >= start && q < end).collect();
            if eligible.is_empty() {
                break;
            }
            let rows = plan.live_rows(n, i, (start, end), &masked, &eligible);
            let commit = choose(n, &eligible);
            assert!(
                !commit.is_empty() && commit.iter().all(|c| eligible.contains(c)),
                "step {n}: bad commit {commit:?}"
            );
            plan.committed(n, &commit);
            steps.push(Step { n, i, block: (start, end), masked: masked.clone(), eligible, rows });
            masked.retain(|q| !commit.contains(q));
            n += 1;
            i += 1;
        }
        start = end;
    }
    steps
}

/// Expected live set of one step.
#[derive(Clone, Copy, Debug)]
enum Want {
    Full,
    Live(&'static [u32]),
}
use Want::{Full as F, Live as L};

fn scripted(scheme: &str, shifted: bool, p: u32, g: u32, bl: u32, script: &[&[u32]], want: &[Want]) {
    let scheme: CacheScheme = scheme.parse().unwrap();
    let mut plan = CachePlan::new(scheme, p as usize, g as usize, bl as usize, shifted).unwrap();
    let steps = decode(&mut plan, p, g, bl, |n, _| script[n as usize].to_vec());
    assert_eq!(steps.len(), want.len(), "{scheme} shifted={shifted}: step count");
    for (s, w) in steps.iter().zip(want) {
        let ok = match w {
            Want::Full => s.rows.full && s.rows.live == (0..p + g).collect::<Vec<_>>(),
            Want::Live(l) => !s.rows.full && s.rows.live == *l,
        };
        assert!(
            ok,
            "{scheme} shifted={shifted} step n={} i={} block={:?} eligible={:?}: got full={} live={:?}, want {w:?}",
            s.n, s.i, s.block, s.eligible, s.rows.full, s.rows.live
        );
    }
}

// Canvas A: P = 4, G = 8, block_len 4 -> blocks [4, 8) and [8, 12); one slot per step in the
// order 6, 4, 7, 5 | 9, 11, 8, 10. Steps (n, i, eligible):
//   0,0 {4,5,6,7}   1,1 {4,5,7}   2,2 {5,7}   3,3 {5}
//   4,0 {8,9,10,11} 5,1 {8,10,11} 6,2 {8,10} 7,3 {10}
const A: (u32, u32, u32) = (4, 8, 4);
const A_SCRIPT: &[&[u32]] = &[&[6], &[4], &[7], &[5], &[9], &[11], &[8], &[10]];

fn a(scheme: &str, shifted: bool, want: &[Want]) {
    scripted(scheme, shifted, A.0, A.1, A.2, A_SCRIPT, want);
}

#[test]
fn canvas_a_none() {
    for shifted in [false, true] {
        a("none", shifted, &[F; 8]);
    }
}

#[test]
fn canvas_a_prefix() {
    const B0: &[u32] = &[4, 5, 6, 7, 8, 9, 10, 11];
    const B1: &[u32] = &[8, 9, 10, 11];
    a("prefix", false, &[F, L(B0), L(B0), L(B0), F, L(B1), L(B1), L(B1)]);
    a(
        "prefix",
        true,
        &[F, L(&[3, 4, 5, 6, 7, 8, 9, 10, 11]), L(B0), L(B0), F, L(&[7, 8, 9, 10, 11]), L(&[7, 8, 9, 10, 11]), L(B1)],
    );
}

#[test]
fn canvas_a_dual() {
    const B0: &[u32] = &[4, 5, 6, 7];
    const B1: &[u32] = &[8, 9, 10, 11];
    a("dual", false, &[F, L(B0), L(B0), L(B0), F, L(B1), L(B1), L(B1)]);
    a("dual", true, &[F, L(&[3, 4, 5, 6, 7]), L(B0), L(B0), F, L(&[7, 8, 9, 10, 11]), L(&[7, 8, 9, 10, 11]), L(B1)]);
}

#[test]
fn canvas_a_prompt() {
    const G: &[u32] = &[4, 5, 6, 7, 8, 9, 10, 11];
    const G1: &[u32] = &[3, 4, 5, 6, 7, 8, 9, 10, 11];
    a("prompt", false, &[F, L(G), L(G), L(G), L(G), L(G), L(G), L(G)]);
    a("prompt", true, &[F, L(G1), L(G1), L(G1), L(G1), L(G1), L(G1), L(G1)]);
}

#[test]
fn canvas_a_dkv() {
    // dkv:1 and dkv:2 refresh at every i in 0..=2; dkv:2 leaves i = 3 partial.
    a("dkv:1", false, &[F; 8]);
    a("dkv:1", true, &[F; 8]);
    a("dkv:2", false, &[F, F, F, L(&[5, 7, 8, 9, 10, 11]), F, F, F, L(&[8, 10])]);
    a("dkv:2", true, &[F, F, F, L(&[4, 5, 7, 8, 9, 10, 11]), F, F, F, L(&[8, 9, 10])]);
    // dkv:3 refreshes at i = 0, 1, 3.
    a("dkv:3", false, &[F, F, L(&[4, 5, 7, 8, 9, 10, 11]), F, F, F, L(&[8, 10, 11]), F]);
    a("dkv:3", true, &[F, F, L(&[4, 5, 6, 7, 8, 9, 10, 11]), F, F, F, L(&[7, 8, 9, 10, 11]), F]);
    // dkv:5 refreshes at i = 0, 1 only within these 4-step blocks.
    a(
        "dkv:5",
        false,
        &[F, F, L(&[4, 5, 7, 8, 9, 10, 11]), L(&[5, 7, 8, 9, 10, 11]), F, F, L(&[8, 10, 11]), L(&[8, 10])],
    );
    a(
        "dkv:5",
        true,
        &[
            F,
            F,
            L(&[4, 5, 6, 7, 8, 9, 10, 11]),
            L(&[4, 5, 7, 8, 9, 10, 11]),
            F,
            F,
            L(&[7, 8, 9, 10, 11]),
            L(&[8, 9, 10]),
        ],
    );
}

#[test]
fn canvas_a_dkv_greedy() {
    // Refresh as dkv:4: i = 0, 1 full; i = 2, 3 partial.
    a("dkv-greedy:0", false, &[F, F, L(&[5, 7]), L(&[5]), F, F, L(&[8, 10]), L(&[10])]);
    a("dkv-greedy:0", true, &[F, F, L(&[4, 5, 6, 7]), L(&[4, 5]), F, F, L(&[7, 8, 9, 10]), L(&[9, 10])]);
    for shifted in [false, true] {
        a(
            "dkv-greedy:1",
            shifted,
            &[F, F, L(&[4, 5, 6, 7, 8]), L(&[4, 5, 6]), F, F, L(&[7, 8, 9, 10, 11]), L(&[9, 10, 11])],
        );
        // Default window 2; step 7's window 8..=12 is clipped to the canvas end.
        let w2 =
            [F, F, L(&[3, 4, 5, 6, 7, 8, 9]), L(&[3, 4, 5, 6, 7]), F, F, L(&[6, 7, 8, 9, 10, 11]), L(&[8, 9, 10, 11])];
        a("dkv-greedy", shifted, &w2);
        a("dkv-greedy:2", shifted, &w2);
    }
}

#[test]
fn canvas_a_block() {
    // First step: prefill [0, 4) with block 0; block 1's first step recomputes block 0 with its
    // final tokens (its final K/V) together with block 1; other steps run the block alone.
    const B0: &[u32] = &[4, 5, 6, 7];
    const B1: &[u32] = &[8, 9, 10, 11];
    const B01: &[u32] = &[4, 5, 6, 7, 8, 9, 10, 11];
    a("block", false, &[L(&[0, 1, 2, 3, 4, 5, 6, 7]), L(B0), L(B0), L(B0), L(B01), L(B1), L(B1), L(B1)]);
    // Shifted: the row before each eligible slot as well (3 while slot 4 is eligible, 7 while 8 is).
    a(
        "block",
        true,
        &[L(&[0, 1, 2, 3, 4, 5, 6, 7]), L(&[3, 4, 5, 6, 7]), L(B0), L(B0), L(B01), L(&[7, 8, 9, 10, 11]), L(&[7, 8, 9, 10, 11]), L(B1)],
    );
}

/// `block` on aligned blocks of 32 as LLaDA2 decodes them (P = 32, G = 96: blocks [32, 64),
/// [64, 96), [96, 128)), counts per step; a single block is one full step, then the block.
#[test]
fn block_scheme_on_blocks_of_32() {
    let mut plan = CachePlan::new(CacheScheme::Block, 32, 96, 32, false).unwrap();
    let mut rng = StdRng::seed_from_u64(32);
    let steps = decode(&mut plan, 32, 96, 32, |_, e| {
        let k = rng.gen_range(1..=e.len().min(9));
        e.choose_multiple(&mut rng, k).copied().collect()
    });
    for s in &steps {
        let (lo, hi) = if s.n == 0 { (0, 64) } else if s.i == 0 { (s.block.0 - 32, s.block.1) } else { s.block };
        assert_eq!(s.rows.live, (lo..hi).collect::<Vec<_>>(), "n={} i={} block={:?}", s.n, s.i, s.block);
        assert!(!s.rows.full);
    }
    assert!(steps.iter().filter(|s| s.i == 0).count() == 3 && steps.len() > 6);
    let mut one = CachePlan::new(CacheScheme::Block, 32, 32, 32, false).unwrap();
    let steps = decode(&mut one, 32, 32, 32, |_, e| e[..e.len().min(5)].to_vec());
    assert!(steps[0].rows.full);
    assert!(steps[1..].iter().all(|s| !s.rows.full && s.rows.live == (32..64).collect::<Vec<_>>()));
}

/// `block` after a block a prior fixed entirely (skipped, never a step of its own): the first
/// step of the next block recomputes from the start of the block the previous step ran in, so
/// the skipped block's rows get computed with final inputs too; without a record of the
/// previous step, from one block back. Blocks given as the plan sees them.
#[test]
fn block_scheme_after_a_skipped_block() {
    // P = 32, G = 128, blocks of 32: [32, 64) decoded, [64, 96) fixed by a prior, [96, 128).
    let mut plan = CachePlan::new(CacheScheme::Block, 32, 128, 32, false).unwrap();
    let masked0: Vec<u32> = (32..64).chain(96..160).collect();
    let r = plan.live_rows(0, 0, (32, 64), &masked0, &masked0[..32]);
    assert_eq!(r.live, (0..64).collect::<Vec<_>>());
    plan.committed(0, &(33..64).collect::<Vec<_>>());
    let masked1: Vec<u32> = std::iter::once(32).chain(96..160).collect();
    assert_eq!(plan.live_rows(1, 1, (32, 64), &masked1, &[32]).live, (32..64).collect::<Vec<_>>());
    plan.committed(1, &[32]);
    let masked2: Vec<u32> = (96..160).collect();
    let r = plan.live_rows(2, 0, (96, 128), &masked2, &masked2[..32]);
    assert_eq!(r.live, (32..128).collect::<Vec<_>>(), "from the finished block's start, over the skipped one");
    plan.committed(2, &[96]);
    assert_eq!(plan.live_rows(3, 1, (96, 128), &masked2[1..], &masked2[1..32]).live, (96..128).collect::<Vec<_>>());
    // No record of step n−1 (a fresh plan): the block just before.
    let fresh = CachePlan::new(CacheScheme::Block, 32, 128, 32, false).unwrap();
    assert_eq!(fresh.live_rows(5, 0, (128, 160), &[130], &[130]).live, (96..160).collect::<Vec<_>>());
    // The last block, with the previous one: rows to the canvas end, not full (the prompt is cached).
    let r = fresh.live_rows(5, 0, (128, 160), &[130], &[130]);
    assert!(!r.full && r.live.len() == 64);
}

// Canvas B: P = 4, G = 8, one block [4, 12); two slots per step: {6,9}, {4,11}, {5,10}, {7,8}.
// Steps (n = i, eligible): 0 {4..11}  1 {4,5,7,8,10,11}  2 {5,7,8,10}  3 {7,8}.
const B_SCRIPT: &[&[u32]] = &[&[9, 6], &[4, 11], &[5, 10], &[7, 8]];

fn b(scheme: &str, shifted: bool, want: &[Want]) {
    scripted(scheme, shifted, 4, 8, 8, B_SCRIPT, want);
}

#[test]
fn canvas_b_two_commits_per_step() {
    const GEN: &[u32] = &[4, 5, 6, 7, 8, 9, 10, 11];
    for shifted in [false, true] {
        let s1 = if shifted { L(&[3, 4, 5, 6, 7, 8, 9, 10, 11]) } else { L(GEN) };
        b("prefix", shifted, &[F, s1, L(GEN), L(GEN)]);
        b("dual", shifted, &[F, s1, L(GEN), L(GEN)]);
        b("none", shifted, &[F; 4]);
        // One block that ends the canvas: the first step is every row, then the block.
        b("block", shifted, &[F, s1, L(GEN), L(GEN)]);
    }
    b("dkv:5", false, &[F, F, L(&[4, 5, 7, 8, 10, 11]), L(&[5, 7, 8, 10])]);
    b("dkv:5", true, &[F, F, L(&[4, 5, 6, 7, 8, 9, 10, 11]), L(&[5, 6, 7, 8, 10])]);
    b("dkv:3", false, &[F, F, L(&[4, 5, 7, 8, 10, 11]), F]);
    b("dkv-greedy:0", false, &[F, F, L(&[5, 7, 8, 10]), L(&[7, 8])]);
    b("dkv-greedy:0", true, &[F, F, L(&[4, 5, 6, 7, 8, 9, 10]), L(&[6, 7, 8])]);
    b("dkv-greedy:1", false, &[F, F, L(GEN), L(&[6, 7, 8, 9])]);
}

// Canvas C: no prompt, P = 0, G = 4, block_len 2; order 0, 1 | 3, 2. Shifted: slot 0 has no
// predecessor; a partial set that covers the canvas reports full.
#[test]
fn canvas_c_no_prompt() {
    let c = |scheme: &str, shifted: bool, want: &[Want]| {
        scripted(scheme, shifted, 0, 4, 2, &[&[0], &[1], &[3], &[2]], want)
    };
    for shifted in [false, true] {
        c("prompt", shifted, &[F; 4]);
    }
    c("prefix", false, &[F, F, F, L(&[2, 3])]);
    c("prefix", true, &[F, F, F, L(&[1, 2, 3])]);
    c("dual", false, &[F, L(&[0, 1]), F, L(&[2, 3])]);
    c("dual", true, &[F, L(&[0, 1]), F, L(&[1, 2, 3])]);
    c("block", false, &[L(&[0, 1]), L(&[0, 1]), F, L(&[2, 3])]);
    c("block", true, &[L(&[0, 1]), L(&[0, 1]), F, L(&[1, 2, 3])]);
}

#[test]
fn refresh_every_step_is_none() {
    let mut rng = StdRng::seed_from_u64(7);
    for scheme in ["none", "prompt", "prefix", "dual", "dkv:1", "dkv:3", "dkv:9", "dkv-greedy", "dkv-greedy:0", "block"] {
        for shifted in [false, true] {
            let mut plan = CachePlan::new(scheme.parse().unwrap(), 19, 32, 8, shifted).unwrap();
            plan.set_refresh_every_step(true);
            let steps = decode(&mut plan, 19, 32, 8, |_, e| {
                let k = rng.gen_range(1..=e.len().min(3));
                e.choose_multiple(&mut rng, k).copied().collect()
            });
            for s in &steps {
                assert!(s.rows.full && s.rows.live == (0..51).collect::<Vec<_>>(), "{scheme} step {}: not full", s.n);
            }
        }
    }
}

#[test]
fn parse_and_display() {
    let cases = [
        ("none", CacheScheme::None),
        ("prompt", CacheScheme::Prompt),
        ("prefix", CacheScheme::Prefix),
        ("dual", CacheScheme::Dual),
        ("dkv:1", CacheScheme::Dkv { refresh: 1 }),
        ("dkv:8", CacheScheme::Dkv { refresh: 8 }),
        ("dkv-greedy", CacheScheme::DkvGreedy { window: 2 }),
        ("dkv-greedy:0", CacheScheme::DkvGreedy { window: 0 }),
        ("dkv-greedy:5", CacheScheme::DkvGreedy { window: 5 }),
        ("block", CacheScheme::Block),
    ];
    for (s, want) in cases {
        let got: CacheScheme = s.parse().unwrap_or_else(|e| panic!("`{s}`: {e}"));
        assert_eq!(got, want, "`{s}`");
        assert_eq!(got.name().parse::<CacheScheme>().unwrap(), want, "round trip of `{s}`");
        assert_eq!(got.name(), got.to_string());
    }
    assert_eq!(CacheScheme::default(), CacheScheme::None);
    // Each error names the bad part.
    for (s, part) in [
        ("dkv:0", "0"),
        ("dkv:x", "`x`"),
        ("dkv:-1", "`-1`"),
        ("dkv", "dkv:R"),
        ("dual:3", ":3"),
        ("block:32", ":32"),
        ("none:1", ":1"),
        ("dkv-greedy:w", "`w`"),
        ("foo", "`foo`"),
        ("", "``"),
    ] {
        let e = s.parse::<CacheScheme>().expect_err(s).to_string();
        assert!(e.contains(part), "error for `{s}` does not name `{part}`: {e}");
        assert!(e.contains("cache scheme"), "error for `{s}` does not say what it parsed: {e}");
    }
}

#[test]
fn bad_plan_shapes() {
    assert!(CachePlan::new(CacheScheme::Dual, 4, 0, 4, false).unwrap_err().to_string().contains("gen_len"));
    assert!(CachePlan::new(CacheScheme::Dual, 4, 8, 0, false).unwrap_err().to_string().contains("block_len"));
    assert_eq!(CachePlan::new(CacheScheme::Dual, 4, 8, 4, false).unwrap().rows(), 12);
}

/// Random canvases, schemes and commit orders: every live set is ascending and in range, holds
/// every eligible slot (shifted: and its predecessor), `full` means every row; `none` is always
/// full; under `dkv:R` every cached row is committed and was last computed from its real token;
/// under `block` (unshifted), with attention blocks = the decode blocks (the prompt one more
/// block), no row after the current block is ever live and every cached row before it was
/// last computed when every row its attention reaches held its final token (exactness).
#[test]
fn invariants_random_orders() {
    let mut rng = StdRng::seed_from_u64(0x5eed_cace);
    for trial in 0..600 {
        let p = rng.gen_range(0..=7u32);
        let g = rng.gen_range(1..=24u32);
        let bl = rng.gen_range(1..=g);
        let shifted = rng.gen_bool(0.5);
        let scheme = match rng.gen_range(0..7) {
            6 => CacheScheme::Block,
            0 => CacheScheme::None,
            1 => CacheScheme::Prompt,
            2 => CacheScheme::Prefix,
            3 => CacheScheme::Dual,
            4 => CacheScheme::Dkv { refresh: rng.gen_range(1..=6) },
            _ => CacheScheme::DkvGreedy { window: rng.gen_range(0..=3) },
        };
        let total = p + g;
        let mut plan = CachePlan::new(scheme, p as usize, g as usize, bl as usize, shifted).unwrap();
        // Input each row had at the last step it was live: true = its real token (not the mask).
        let mut saw_real = vec![false; total as usize];
        let mut real: Vec<bool> = (0..total).map(|r| r < p).collect();
        // `block`: whether every row up to the end of a row's attention block was final the
        // last time the row was live.
        let mut saw_final = vec![false; total as usize];
        let attn_end = |r: u32| if r < p { p } else { (p + ((r - p) / bl + 1) * bl).min(total) };
        let steps = {
            let rng2 = &mut StdRng::seed_from_u64(trial);
            decode(&mut plan, p, g, bl, |_, e| {
                let k = rng2.gen_range(1..=e.len().min(4));
                e.choose_multiple(rng2, k).copied().collect()
            })
        };
        for s in &steps {
            let ctx = format!("trial {trial} {scheme} P={p} G={g} bl={bl} shifted={shifted} n={} i={}", s.n, s.i);
            let live = &s.rows.live;
            assert!(live.windows(2).all(|w| w[0] < w[1]), "{ctx}: live not ascending: {live:?}");
            assert!(live.iter().all(|&r| r < total), "{ctx}: live out of range: {live:?}");
            assert_eq!(s.rows.full, live.len() == total as usize, "{ctx}: full flag");
            for &e in &s.eligible {
                assert!(live.binary_search(&e).is_ok(), "{ctx}: eligible {e} not live in {live:?}");
                if shifted && e > 0 {
                    assert!(live.binary_search(&(e - 1)).is_ok(), "{ctx}: predecessor of {e} not live in {live:?}");
                }
            }
            if scheme == CacheScheme::None {
                assert!(s.rows.full, "{ctx}: none must be full");
            }
            // Replay the commits of the previous step into `real` (masked = not yet real).
            for r in p..total {
                real[r as usize] = s.masked.binary_search(&r).is_err();
            }
            if let CacheScheme::Dkv { .. } = scheme {
                for r in 0..total {
                    if live.binary_search(&r).is_err() {
                        assert!(
                            real[r as usize] && saw_real[r as usize],
                            "{ctx}: row {r} cached before its real token was computed"
                        );
                    }
                }
            }
            if scheme == CacheScheme::Block && !shifted {
                assert!(live.iter().all(|&r| r < s.block.1), "{ctx}: a row after the block is live: {live:?}");
                for r in 0..s.block.0 {
                    if live.binary_search(&r).is_err() {
                        assert!(saw_final[r as usize], "{ctx}: cached row {r} last computed before its attention's rows were final");
                    }
                }
            }
            for &r in live {
                saw_real[r as usize] = real[r as usize];
                saw_final[r as usize] = (0..attn_end(r)).all(|q| real[q as usize]);
            }
        }
    }
}
