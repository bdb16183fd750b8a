//! Commit policies (DESIGN.md §4): given the confidences of a block's eligible slots, which
//! slots take their candidate this step. Pure logic, shared by the CPU backend and, as the
//! reference, by the GPU commit kernel. Ranking is by confidence, descending; ties go to the
//! lower position. Every policy commits at least one slot per step, except Dream's, which
//! commits exactly its reference's count (0 on some steps), and `edit:`'s steps after a
//! block's last mask (they only re-write committed slots, and the last one changes nothing).
use std::fmt;
use std::str::FromStr;

use super::sampling::ConfDist;
use crate::error::{Error, Result};

/// Dream's effective default top-k (transformers' generation default, reached through
/// `DreamGenerationConfig.from_model_config`).
pub const DREAM_DEFAULT_TOP_K: u32 = 50;

/// What a slot's confidence measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfKind {
    /// `softmax(l)[candidate]` (untempered).
    Prob = 0,
    /// p1 − p2 of the untempered softmax.
    Margin = 1,
    /// Σ p log p (≤ 0; closer to 0 = more confident).
    NegEntropy = 2,
    /// Uniform in [0, 1) from the counter-based RNG (random remasking order).
    Random = 3,
}

/// Dream's `diffusion_generate` algorithms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DreamAlg {
    Origin,
    MaskgitPlus,
    TopkMargin,
    Entropy,
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Policy {
    /// `schedule:S` [LLaDA low_confidence].
    Schedule { steps: u32 },
    /// `random:S` [LLaDA random remasking].
    Random { steps: u32 },
    /// `threshold:τ` [Fast-dLLM parallel, Dimple confident decoding].
    Threshold { tau: f32 },
    /// `confident:τ,S` \[Dimple\]: threshold, falling back to the schedule count.
    Confident { tau: f32, steps: u32 },
    /// `llada2:τ,S` [the official LLaDA2 `generate`]: the `max(#{p > τ}, min(n, masked))`
    /// most confident slots, n the even split of the block length (not of its masked slots:
    /// the first block of an unaligned prompt starts partly filled) over S steps, remainder
    /// first. The engine caps S at gen_len, as the official `steps = min(steps, gen_length)`.
    Llada2 { tau: f32, steps: u32 },
    /// `edit:τm,τe,P` [LLaDA2.1 `generate`, SGLang JointThreshold]: masked slots with
    /// p > τm commit (the most confident one when none passes); in the same step every
    /// committed, non-fixed slot of the block whose argmax differs from its token with p > τe
    /// is re-written (τe = 0: any differing argmax). Once no mask is left, up to P more steps
    /// that only edit; the block ends after a step that changes nothing. Slots are scored with
    /// [`select_edits`]; CPU backend only.
    Edit { tau_m: f32, tau_e: f32, post: u32 },
    /// `factor:f` [Fast-dLLM].
    Factor { f: f32 },
    /// `dream:ALG,S` [Dream diffusion_generate].
    Dream { alg: DreamAlg, steps: u32 },
}

/// Where a sequence's current block stands when a step starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepCtx {
    /// Steps already taken in this block (0 on the block's first step).
    pub step: u32,
    /// Masked slots of the block when it started.
    pub block_masked: u32,
    /// Masked slots of the block now (the eligible ones).
    pub masked: u32,
    /// Slots of the block (its length; what `llada2:τ,S` splits over its steps).
    pub block_len: u32,
}

/// LLaDA's `get_num_transfer_tokens`: k_i = m / S + (i < m % S).
pub fn schedule_count(m: u32, steps: u32, i: u32) -> u32 {
    let s = steps.max(1);
    m / s + u32::from(i < m % s)
}

/// `torch.linspace(1, 1e-3, n)[j]` in f32 as PyTorch computes it on the CPU: step = (end −
/// start) / (n − 1); the first half is fma(step, j, start), the second fma(−step, n − 1 − j, end).
pub fn dream_timestep(n: u32, j: u32) -> f32 {
    let (start, end) = (1.0f32, 1e-3f32);
    if n <= 1 {
        return start;
    }
    let step = (end - start) / (n - 1) as f32;
    if j < n / 2 {
        step.mul_add(j as f32, start)
    } else {
        (-step).mul_add((n - 1 - j) as f32, end)
    }
}

/// Dream's `diffusion_generate`: timesteps linspace(1, 1e-3, S+1) in f32; step i goes
/// `t = ts[i]` → `s = ts[i+1]` and commits int(masked · (1 − s/t)) slots, computed in f32 and
/// truncated (0 is a valid count), and every masked slot on the last step.
pub fn dream_count(masked: u32, steps: u32, i: u32) -> u32 {
    let steps = steps.max(1);
    if i + 1 >= steps {
        return masked;
    }
    let (t, s) = (dream_timestep(steps + 1, i), dream_timestep(steps + 1, i + 1));
    let x = masked as f32 * (1.0 - s / t);
    x as u32
}

impl Policy {
    pub fn conf_kind(&self) -> ConfKind {
        match self {
            Policy::Random { .. } => ConfKind::Random,
            Policy::Dream { alg: DreamAlg::Origin, .. } => ConfKind::Random,
            Policy::Dream { alg: DreamAlg::TopkMargin, .. } => ConfKind::Margin,
            Policy::Dream { alg: DreamAlg::Entropy, .. } => ConfKind::NegEntropy,
            _ => ConfKind::Prob,
        }
    }

    /// Whether a step may commit nothing (Dream's count is 0 on some steps, e.g. step 0 when
    /// S = gen_len; the step still runs and counts). Every other policy commits at least one.
    pub fn may_commit_none(&self) -> bool {
        matches!(self, Policy::Dream { .. })
    }

    /// `edit:`'s budget of steps after a block's last mask (`Some(P)`); `None` for every
    /// policy that never re-writes a committed slot.
    pub fn edit_budget(&self) -> Option<u32> {
        match *self {
            Policy::Edit { post, .. } => Some(post),
            _ => None,
        }
    }

    /// Which distribution confidences come from: Dream's policies take them from the tempered,
    /// top-k / top-p filtered distribution (its `sample_tokens`), every other policy from the
    /// raw softmax.
    pub fn conf_dist(&self) -> ConfDist {
        match self {
            Policy::Dream { .. } => ConfDist::Filtered,
            _ => ConfDist::Raw,
        }
    }

    /// The top-k a request gets when it does not set one: Dream's `diffusion_generate` builds
    /// its generation config from the model config, whose transformers defaults carry
    /// top_k = 50, so Dream filters to the 50 largest logits unless told otherwise. 0 (off)
    /// for every other policy.
    pub fn default_top_k(&self) -> u32 {
        match self {
            Policy::Dream { .. } => DREAM_DEFAULT_TOP_K,
            _ => 0,
        }
    }

    /// Steps a block takes when the policy fixes them (schedule-like policies).
    pub fn steps(&self) -> Option<u32> {
        match *self {
            Policy::Schedule { steps } | Policy::Random { steps } | Policy::Dream { steps, .. } => Some(steps),
            _ => None,
        }
    }

    /// Number of slots to commit, given the eligible confidences sorted descending: in
    /// 1..=sorted.len() (0 only when nothing is eligible), except Dream's count, which is
    /// what its reference computes, 0 included ([`Policy::may_commit_none`]).
    pub fn commit_count(&self, ctx: StepCtx, sorted: &[f32]) -> usize {
        let n = sorted.len();
        if n == 0 {
            return 0;
        }
        let k = match *self {
            Policy::Schedule { steps } | Policy::Random { steps } => {
                if ctx.step + 1 >= steps {
                    n
                } else {
                    schedule_count(ctx.block_masked, steps, ctx.step) as usize
                }
            }
            Policy::Threshold { tau } => sorted.iter().take_while(|&&c| c >= tau).count(),
            Policy::Confident { tau, steps } => {
                let passing = sorted.iter().take_while(|&&c| c >= tau).count();
                if passing > 0 {
                    passing
                } else if ctx.step + 1 >= steps {
                    n
                } else {
                    schedule_count(ctx.block_masked, steps, ctx.step) as usize
                }
            }
            Policy::Llada2 { tau, steps } => {
                let passing = sorted.iter().take_while(|&&c| c > tau).count();
                let sched = if ctx.step + 1 >= steps { n } else { schedule_count(ctx.block_len, steps, ctx.step) as usize };
                passing.max(sched.min(n))
            }
            // The masked slots' half of the rule (edits: `select_edits`).
            Policy::Edit { tau_m, .. } => sorted.iter().take_while(|&&c| c > tau_m).count(),
            Policy::Factor { f } => sorted
                .iter()
                .enumerate()
                .take_while(|&(i, &c)| c >= 1.0 - f / (i as f32 + 2.0))
                .count(),
            Policy::Dream { steps, .. } => dream_count(ctx.masked, steps, ctx.step) as usize,
        };
        if self.may_commit_none() {
            k.min(n)
        } else {
            k.clamp(1, n)
        }
    }

    /// The eligible slots (position, confidence) that commit this step, in rank order.
    pub fn select(&self, ctx: StepCtx, eligible: &[(u32, f32)]) -> Vec<u32> {
        let mut ranked = eligible.to_vec();
        rank(&mut ranked);
        let sorted: Vec<f32> = ranked.iter().map(|&(_, c)| c).collect();
        let k = self.commit_count(ctx, &sorted);
        ranked.truncate(k);
        ranked.into_iter().map(|(p, _)| p).collect()
    }
}

/// `edit:`'s re-writes: the committed slots (`current[i] != mask_id`) whose candidate differs
/// from their token with confidence strictly above `tau_e`, in position order, as
/// (position, candidate). `eligible`, `current`, `candidate` and `conf` are parallel (the
/// scored slots of the block, ascending positions).
pub fn select_edits<'a>(
    tau_e: f32,
    mask_id: u32,
    eligible: &'a [u32],
    current: &'a [u32],
    candidate: &'a [u32],
    conf: &'a [f32],
) -> impl Iterator<Item = (u32, u32)> + 'a {
    (0..eligible.len())
        .filter(move |&i| current[i] != mask_id && candidate[i] != current[i] && conf[i] > tau_e)
        .map(move |i| (eligible[i], candidate[i]))
}

/// Sorts (position, confidence) by confidence descending, ties by lower position.
/// NaN confidences rank last.
pub fn rank(v: &mut [(u32, f32)]) {
    v.sort_by(|a, b| {
        let ca = if a.1.is_nan() { f32::NEG_INFINITY } else { a.1 };
        let cb = if b.1.is_nan() { f32::NEG_INFINITY } else { b.1 };
        cb.partial_cmp(&ca).unwrap().then(a.0.cmp(&b.0))
    });
}

fn parse_f32(s: &str, what: &str, full: &str) -> Result<f32> {
    s.trim()
        .parse::<f32>()
        .ok()
        .filter(|v| v.is_finite())
        .ok_or_else(|| Error::bad_input(format!("policy `{full}`: {what} `{s}` is not a number")))
}

fn parse_steps(s: &str, full: &str) -> Result<u32> {
    match s.trim().parse::<u32>() {
        Ok(v) if v > 0 => Ok(v),
        _ => Err(Error::bad_input(format!("policy `{full}`: steps `{s}` must be a positive integer"))),
    }
}

impl FromStr for Policy {
    type Err = Error;
    fn from_str(full: &str) -> Result<Self> {
        let (name, args) = full.split_once(':').unwrap_or((full, ""));
        let args: Vec<&str> = if args.is_empty() { Vec::new() } else { args.split(',').collect() };
        let want = |n: usize, form: &str| {
            if args.len() == n {
                Ok(())
            } else {
                Err(Error::bad_input(format!("policy `{full}`: expected {form}")))
            }
        };
        let unit = |v: f32, what: &str| {
            if (0.0..=1.0).contains(&v) {
                Ok(v)
            } else {
                Err(Error::bad_input(format!("policy `{full}`: {what} {v} must lie in [0, 1]")))
            }
        };
        let p = match name {
            "schedule" => {
                want(1, "schedule:STEPS")?;
                Policy::Schedule { steps: parse_steps(args[0], full)? }
            }
            "random" => {
                want(1, "random:STEPS")?;
                Policy::Random { steps: parse_steps(args[0], full)? }
            }
            "threshold" => {
                want(1, "threshold:TAU")?;
                Policy::Threshold { tau: unit(parse_f32(args[0], "tau", full)?, "tau")? }
            }
            "confident" => {
                want(2, "confident:TAU,STEPS")?;
                Policy::Confident { tau: unit(parse_f32(args[0], "tau", full)?, "tau")?, steps: parse_steps(args[1], full)? }
            }
            "llada2" => {
                want(2, "llada2:TAU,STEPS")?;
                Policy::Llada2 { tau: unit(parse_f32(args[0], "tau", full)?, "tau")?, steps: parse_steps(args[1], full)? }
            }
            "edit" => {
                want(3, "edit:TAU_MASK,TAU_EDIT,POST_STEPS")?;
                let post = match args[2].trim().parse::<u32>() {
                    Ok(v) => v,
                    Err(_) => {
                        return Err(Error::bad_input(format!(
                            "policy `{full}`: post steps `{}` must be a non-negative integer",
                            args[2]
                        )))
                    }
                };
                Policy::Edit {
                    tau_m: unit(parse_f32(args[0], "mask threshold", full)?, "mask threshold")?,
                    tau_e: unit(parse_f32(args[1], "edit threshold", full)?, "edit threshold")?,
                    post,
                }
            }
            "factor" => {
                want(1, "factor:F")?;
                let f = parse_f32(args[0], "factor", full)?;
                if f <= 0.0 {
                    return Err(Error::bad_input(format!("policy `{full}`: factor must be > 0")));
                }
                Policy::Factor { f }
            }
            "dream" => {
                want(2, "dream:ALG,STEPS (ALG = origin | maskgit_plus | topk_margin | entropy)")?;
                let alg = match args[0].trim() {
                    "origin" => DreamAlg::Origin,
                    "maskgit_plus" => DreamAlg::MaskgitPlus,
                    "topk_margin" => DreamAlg::TopkMargin,
                    "entropy" => DreamAlg::Entropy,
                    a => {
                        return Err(Error::bad_input(format!(
                            "policy `{full}`: unknown Dream algorithm `{a}` (origin, maskgit_plus, topk_margin, entropy)"
                        )))
                    }
                };
                Policy::Dream { alg, steps: parse_steps(args[1], full)? }
            }
            _ => {
                return Err(Error::bad_input(format!(
                    "unknown policy `{full}` (schedule:S, random:S, threshold:T, confident:T,S, llada2:T,S, edit:TM,TE,P, factor:F, dream:ALG,S)"
                )))
            }
        };
        Ok(p)
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Policy::Schedule { steps } => write!(f, "schedule:{steps}"),
            Policy::Random { steps } => write!(f, "random:{steps}"),
            Policy::Threshold { tau } => write!(f, "threshold:{tau}"),
            Policy::Confident { tau, steps } => write!(f, "confident:{tau},{steps}"),
            Policy::Llada2 { tau, steps } => write!(f, "llada2:{tau},{steps}"),
            Policy::Edit { tau_m, tau_e, post } => write!(f, "edit:{tau_m},{tau_e},{post}"),
            Policy::Factor { f: x } => write!(f, "factor:{x}"),
            Policy::Dream { alg, steps } => {
                let a = match alg {
                    DreamAlg::Origin => "origin",
                    DreamAlg::MaskgitPlus => "maskgit_plus",
                    DreamAlg::TopkMargin => "topk_margin",
                    DreamAlg::Entropy => "entropy",
                };
                write!(f, "dream:{a},{steps}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx(step: u32, block_masked: u32, masked: u32) -> StepCtx {
        StepCtx { step, block_masked, masked, block_len: block_masked }
    }

    #[test]
    fn schedule_counts_split_remainder_first() {
        // m = 10, S = 4: 3, 3, 2, 2.
        let k: Vec<u32> = (0..4).map(|i| schedule_count(10, 4, i)).collect();
        assert_eq!(k, [3, 3, 2, 2]);
        assert_eq!(k.iter().sum::<u32>(), 10);
        // m = 3, S = 5: 1, 1, 1, 0, 0 (the at-least-one rule lifts the zeros).
        let k: Vec<u32> = (0..5).map(|i| schedule_count(3, 5, i)).collect();
        assert_eq!(k, [1, 1, 1, 0, 0]);
        let p = Policy::Schedule { steps: 5 };
        assert_eq!(p.commit_count(ctx(3, 3, 1), &[0.2]), 1);
    }

    #[test]
    fn threshold_commits_at_exactly_tau_and_at_least_one() {
        let p = Policy::Threshold { tau: 0.75 };
        let sel = p.select(ctx(0, 4, 4), &[(10, 0.5), (11, 0.75), (12, 0.9), (13, 0.7499)]);
        assert_eq!(sel, [12, 11]);
        let sel = p.select(ctx(0, 3, 3), &[(10, 0.1), (11, 0.3), (12, 0.3)]);
        assert_eq!(sel, [11], "none passes: the most confident, ties to the lower position");
    }

    #[test]
    fn factor_prefix_rule() {
        // thresholds 1 - 1/(n+1): n=1: 0.5, n=2: 0.667, n=3: 0.75, n=4: 0.8
        let p = Policy::Factor { f: 1.0 };
        assert_eq!(p.commit_count(ctx(0, 5, 5), &[0.9, 0.8, 0.76, 0.79, 0.1]), 3);
        assert_eq!(p.commit_count(ctx(0, 5, 5), &[0.4, 0.3]), 1);
    }

    #[test]
    fn dream_floor_and_last_step_all() {
        // S = 4: ts = 1, 0.75025, 0.5005, 0.25075, 0.001
        assert_eq!(dream_count(10, 4, 0), 2); // 10 * (1 - 0.75025) = 2.4975
        assert_eq!(dream_count(8, 4, 1), 2); // 8 * (1 - 0.5005/0.75025) = 2.663
        assert_eq!(dream_count(5, 4, 3), 5);
        // 2 masked, S = 4: int(2 * 0.24975) = 0: the step commits nothing (and still counts).
        assert_eq!(Policy::Dream { alg: DreamAlg::Entropy, steps: 4 }.commit_count(ctx(0, 2, 2), &[-0.1, -0.2]), 0);
        // S = gen_len: step 0 commits int(32 * (1 - ts[1])) = int(32 * 0.0312...) = 0.
        assert_eq!(dream_count(32, 32, 0), 0);
        assert_eq!(dream_count(32, 32, 1), 1);
    }

    #[test]
    fn dream_timesteps_are_torch_linspace_f32() {
        // torch.linspace(1, 1e-3, n) on the CPU (f32), values where a plain `start + step * j`
        // rounds differently from PyTorch's fused multiply-add.
        assert_eq!(dream_timestep(9, 3), 0.625375f32);
        assert_eq!(dream_timestep(9, 5), 0.375625f32);
        assert_eq!(dream_timestep(11, 7), 0.3007f32);
        assert_eq!(dream_timestep(9, 0), 1.0);
        assert_eq!(dream_timestep(9, 8), 1e-3);
    }

    #[test]
    fn llada2_commits_max_of_passing_and_schedule() {
        // 32 masked, S = 8: n = 4 per step.
        let p = Policy::Llada2 { tau: 0.9, steps: 8 };
        let c = ctx(0, 32, 32);
        // 6 pass (strictly above τ): all 6.
        assert_eq!(p.commit_count(c, &[0.99, 0.98, 0.97, 0.96, 0.95, 0.91, 0.5, 0.4]), 6);
        // 2 pass: the schedule's 4; one at exactly τ does not pass.
        assert_eq!(p.commit_count(c, &[0.99, 0.95, 0.9, 0.2, 0.1]), 4);
        // Fewer eligible than n: all of them.
        assert_eq!(p.commit_count(ctx(3, 32, 3), &[0.3, 0.2, 0.1]), 3);
        // Last step: everything left.
        assert_eq!(p.commit_count(ctx(7, 32, 6), &[0.3, 0.2, 0.1, 0.1, 0.1, 0.1]), 6);
        // n splits the block length, not its masked slots: the first block of a 17-token
        // prompt has 15 masked slots of 32, and S = 8 gives n = 4 (not 15 / 8 = 2).
        let first = StepCtx { step: 0, block_masked: 15, masked: 15, block_len: 32 };
        assert_eq!(p.commit_count(first, &[0.5; 15]), 4);
        assert_eq!("llada2:0.95,32".parse::<Policy>().unwrap(), Policy::Llada2 { tau: 0.95, steps: 32 });
        assert_eq!(Policy::Llada2 { tau: 0.95, steps: 32 }.to_string(), "llada2:0.95,32");
        assert!("llada2:0.95".parse::<Policy>().is_err() && "llada2:1.5,4".parse::<Policy>().is_err());
    }

    #[test]
    fn edit_commits_above_tau_m_and_rewrites_differing_argmaxes_above_tau_e() {
        let p = Policy::Edit { tau_m: 0.7, tau_e: 0.5, post: 16 };
        // Masked slots: strictly above τm, at least one.
        assert_eq!(p.select(ctx(0, 4, 4), &[(40, 0.9), (41, 0.7), (42, 0.95), (43, 0.1)]), [42, 40]);
        assert_eq!(p.select(ctx(0, 3, 3), &[(40, 0.2), (41, 0.6), (42, 0.6)]), [41]);
        // Edits: committed, differing, strictly above τe; the mask (9) is never "edited".
        let (pos, cur, cand, conf) = ([40, 41, 42, 43, 44], [9, 3, 4, 5, 6], [1, 3, 7, 8, 2], [0.99, 0.99, 0.51, 0.5, 0.2]);
        let e: Vec<_> = select_edits(0.5, 9, &pos, &cur, &cand, &conf).collect();
        assert_eq!(e, [(42, 7)], "41 keeps its token, 43 is at τe, 44 below");
        // τe = 0 re-writes every differing argmax (SGLang's and the HF file's `p > τe`).
        let e: Vec<_> = select_edits(0.0, 9, &pos, &cur, &cand, &conf).collect();
        assert_eq!(e, [(42, 7), (43, 8), (44, 2)]);
        assert_eq!(p.edit_budget(), Some(16));
        assert_eq!(Policy::Threshold { tau: 0.9 }.edit_budget(), None);
        assert_eq!("edit:0.7,0.5,16".parse::<Policy>().unwrap(), p);
        assert_eq!(Policy::Edit { tau_m: 0.5, tau_e: 0.0, post: 0 }.to_string(), "edit:0.5,0,0");
        for (bad, what) in [
            ("edit:0.7,0.5", "expected edit:TAU_MASK,TAU_EDIT,POST_STEPS"),
            ("edit:1.2,0.5,4", "mask threshold 1.2 must lie in [0, 1]"),
            ("edit:0.7,-0.1,4", "edit threshold -0.1 must lie in [0, 1]"),
            ("edit:0.7,0.5,-1", "post steps `-1` must be a non-negative integer"),
            ("edit:0.7,x,4", "edit threshold `x` is not a number"),
        ] {
            let e = bad.parse::<Policy>().unwrap_err().to_string();
            assert!(e.contains(what), "{bad}: {e}");
        }
    }

    #[test]
    fn confident_falls_back_to_schedule() {
        let p = Policy::Confident { tau: 0.9, steps: 2 };
        assert_eq!(p.commit_count(ctx(0, 5, 5), &[0.95, 0.91, 0.5, 0.4, 0.3]), 2);
        assert_eq!(p.commit_count(ctx(0, 5, 5), &[0.8, 0.7, 0.5, 0.4, 0.3]), 3);
        assert_eq!(p.commit_count(ctx(1, 5, 2), &[0.8, 0.7]), 2);
    }

    #[test]
    fn parse_and_display_round_trip_and_errors() {
        for s in ["schedule:8", "random:4", "threshold:0.9", "confident:0.9,8", "factor:1", "dream:entropy,16", "dream:maskgit_plus,2", "edit:0.5,0,16"] {
            let p: Policy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        for bad in ["schedule", "schedule:0", "schedule:x", "threshold:1.5", "factor:-1", "dream:foo,4", "dream:origin", "nope:1", "confident:0.9"] {
            let e = bad.parse::<Policy>().unwrap_err().to_string();
            assert!(e.contains("policy"), "{bad}: {e}");
        }
    }
}
