//! Candidates and confidences for one logits row (DESIGN.md §4), bit-for-bit reproducible on
//! CPU and GPU: argmax at temperature 0 (ties to the lowest id); at T > 0 Gumbel-max,
//! argmax_v(l_v / T + g_v) with g = −ln(−ln u), u at 53-bit resolution (f64) from Philox4x32-10
//! keyed by the seed and counted by (vocab pair, slot, step, sequence). Optional top-k / top-p
//! restrict the candidates first. Confidences use the untempered, unfiltered softmax, except for
//! Dream's policies ([`ConfDist::Filtered`]), whose confidences come from the tempered, filtered
//! distribution as in Dream's `sample_tokens`.
use super::policy::{ConfKind, Policy};

/// Philox4x32-10 (Salmon et al. 2011), the generator of cuRAND and PyTorch.
pub fn philox4x32(ctr: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    const M0: u64 = 0xD251_1F53;
    const M1: u64 = 0xCD9E_8D57;
    const W0: u32 = 0x9E37_79B9;
    const W1: u32 = 0xBB67_AE85;
    let (mut c, mut k) = (ctr, key);
    for _ in 0..10 {
        let p0 = M0 * c[0] as u64;
        let p1 = M1 * c[2] as u64;
        c = [
            ((p1 >> 32) as u32) ^ c[1] ^ k[0],
            p1 as u32,
            ((p0 >> 32) as u32) ^ c[3] ^ k[1],
            p0 as u32,
        ];
        k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
    }
    c
}

/// Uniform in (0, 1) from two 32-bit words at 53-bit resolution: k · 2⁻⁵³ for the 53-bit k,
/// with k = 0 mapped to 2⁻⁵⁴ so the Gumbel transform stays finite.
pub fn uniform53(hi: u32, lo: u32) -> f64 {
    let k = ((hi as u64) << 21) | (lo as u64 >> 11); // 32 + 21 = 53 bits
    if k == 0 {
        return 1.0 / (1u64 << 54) as f64;
    }
    k as f64 * (1.0 / (1u64 << 53) as f64)
}

/// Where a random number is drawn: (seed, sequence, step, slot).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RngKey {
    pub seed: u64,
    pub seq: u32,
    pub step: u32,
    pub slot: u32,
}

/// The counter word that selects the per-slot "random confidence" draw (no vocab id reaches it).
pub const RANDOM_CONF_PAIR: u32 = 0xFFFF_FFFF;

impl RngKey {
    fn key(&self) -> [u32; 2] {
        [self.seed as u32, (self.seed >> 32) as u32]
    }
    /// The uniform for vocabulary entry `v`.
    pub fn uniform(&self, v: u32) -> f64 {
        let r = philox4x32([v >> 1, self.slot, self.step, self.seq], self.key());
        if v & 1 == 0 {
            uniform53(r[0], r[1])
        } else {
            uniform53(r[2], r[3])
        }
    }
    /// Gumbel noise for vocabulary entry `v`, in f64.
    pub fn gumbel(&self, v: u32) -> f64 {
        -(-self.uniform(v).ln()).ln()
    }
    /// The slot's uniform "random" confidence.
    pub fn random_conf(&self) -> f64 {
        let r = philox4x32([RANDOM_CONF_PAIR, self.slot, self.step, self.seq], self.key());
        uniform53(r[0], r[1])
    }
}

/// How candidates are drawn.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sampling {
    /// 0 = argmax.
    pub temperature: f32,
    /// Keep the k largest logits (0 = off; [`Sampling::POLICY_TOP_K`], the default, = what the
    /// policy's reference does: 50 for Dream's policies, off for the others).
    pub top_k: u32,
    /// Keep the smallest set of largest-probability tokens whose mass reaches p (1 = off).
    pub top_p: f32,
}

impl Sampling {
    /// `top_k` value meaning "the policy's default" ([`Policy::default_top_k`]): Dream's
    /// `diffusion_generate` filters to the top 50 logits unless its caller passes `top_k=None`.
    /// Any value ≥ the vocabulary is off, so this one is off wherever it is not resolved.
    pub const POLICY_TOP_K: u32 = u32::MAX;

    /// The sampling a sequence of `policy` uses: [`Sampling::POLICY_TOP_K`] resolved.
    pub fn for_policy(self, policy: &Policy) -> Sampling {
        if self.top_k == Self::POLICY_TOP_K {
            Sampling { top_k: policy.default_top_k(), ..self }
        } else {
            self
        }
    }
}

impl Default for Sampling {
    /// Greedy (temperature 0), the policy's default top-k, no top-p.
    fn default() -> Self {
        Sampling { temperature: 0.0, top_k: Self::POLICY_TOP_K, top_p: 1.0 }
    }
}

/// Softmax statistics of one row (one pass, numerically stable).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RowStats {
    pub max: f32,
    /// Lowest id among the maxima.
    pub argmax: u32,
    /// Second-largest logit (the max again if it occurs twice).
    pub second: f32,
    /// Σ exp(l − max).
    pub sum_exp: f64,
    /// Σ p log p.
    pub neg_entropy: f64,
}

pub fn row_stats(logits: &[f32]) -> RowStats {
    let mut max = f32::NEG_INFINITY;
    let mut argmax = 0u32;
    let mut second = f32::NEG_INFINITY;
    for (v, &l) in logits.iter().enumerate() {
        if l > max {
            second = max;
            max = l;
            argmax = v as u32;
        } else if l > second {
            second = l;
        }
    }
    let (mut z, mut zl) = (0f64, 0f64);
    for &l in logits {
        let d = (l - max) as f64;
        let e = d.exp();
        z += e;
        zl += e * d;
    }
    // Σ p log p = Σ e_i (d_i − ln z) / z = zl / z − ln z
    RowStats { max, argmax, second, sum_exp: z, neg_entropy: zl / z - z.ln() }
}

/// The logit value at and above which a token survives top-k / top-p (−∞ = all survive).
/// Ties at the cut-off survive together.
pub fn filter_cutoff(logits: &[f32], s: &Sampling, st: &RowStats) -> f32 {
    let k_on = s.top_k > 0 && (s.top_k as usize) < logits.len();
    let p_on = s.top_p < 1.0;
    if !k_on && !p_on {
        return f32::NEG_INFINITY;
    }
    let mut sorted: Vec<f32> = logits.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    let mut cut = f32::NEG_INFINITY;
    if k_on {
        cut = sorted[s.top_k as usize - 1];
    }
    if p_on {
        let mut mass = 0f64;
        for &l in &sorted {
            mass += ((l - st.max) as f64).exp() / st.sum_exp;
            if mass >= s.top_p as f64 {
                cut = cut.max(l);
                break;
            }
        }
    }
    cut
}

/// Which distribution a slot's confidence comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfDist {
    /// LLaDA, Fast-dLLM, dKV-Cache, Dimple: the untempered, unfiltered softmax of the logits
    /// (top-k / top-p / temperature shape only the sample).
    Raw,
    /// Dream's `sample_tokens`: logits / T (T > 0), then the top-p and top-k filters, then the
    /// softmax over the survivors; the candidate, its probability, the margin and the entropy
    /// all come from that renormalised distribution.
    Filtered,
}

/// What a filtered-out logit reads as in [`ConfDist::Filtered`] rows (no mass, never a
/// candidate; finite so entropies stay finite). The excluded mask token reads as this value
/// too (`decode::cpu::MASK_LOGIT` is defined as it, and the GPU's CONF_MASK_LOGIT matches).
pub const FILTERED_LOGIT: f32 = -1e30;

/// Candidate token and confidence of one eligible slot.
pub fn candidate(logits: &[f32], s: &Sampling, kind: ConfKind, key: RngKey, dist: ConfDist) -> (u32, f32) {
    if dist == ConfDist::Filtered {
        return candidate_filtered(logits, s, kind, key);
    }
    let st = row_stats(logits);
    let token = if s.temperature <= 0.0 {
        st.argmax
    } else {
        let cut = filter_cutoff(logits, s, &st);
        gumbel_max(logits, cut, 1.0 / s.temperature as f64, key).unwrap_or(st.argmax)
    };
    (token, confidence(logits, &st, token, kind, key))
}

/// Gumbel-max over the logits at or above `cut`: argmax_v(l_v · inv_t + g_v), `None` when no
/// logit survives.
fn gumbel_max(logits: &[f32], cut: f32, inv_t: f64, key: RngKey) -> Option<u32> {
    let mut best = f64::NEG_INFINITY;
    let mut tok = None;
    for (v, &l) in logits.iter().enumerate() {
        if l < cut {
            continue;
        }
        let score = l as f64 * inv_t + key.gumbel(v as u32);
        if score > best {
            best = score;
            tok = Some(v as u32);
        }
    }
    tok
}

fn confidence(logits: &[f32], st: &RowStats, token: u32, kind: ConfKind, key: RngKey) -> f32 {
    let p = |l: f32| (((l - st.max) as f64).exp() / st.sum_exp) as f32;
    match kind {
        ConfKind::Prob => p(logits[token as usize]),
        ConfKind::Margin => p(st.max) - p(st.second),
        ConfKind::NegEntropy => st.neg_entropy as f32,
        ConfKind::Random => key.random_conf() as f32,
    }
}

/// [`ConfDist::Filtered`]: the row is scaled by 1/T in f32 (T > 0), filtered (top-p, top-k over
/// the scaled row), and everything (argmax, sample, confidence) is taken over the survivors.
fn candidate_filtered(logits: &[f32], s: &Sampling, kind: ConfKind, key: RngKey) -> (u32, f32) {
    // The excluded mask token (already FILTERED_LOGIT) keeps its value, as the GPU reads it.
    let mut row: Vec<f32> = if s.temperature > 0.0 {
        logits.iter().map(|&l| if l == FILTERED_LOGIT { l } else { l / s.temperature }).collect()
    } else {
        logits.to_vec()
    };
    let cut = filter_cutoff(&row, s, &row_stats(&row));
    if cut > f32::NEG_INFINITY {
        for l in &mut row {
            if *l < cut {
                *l = FILTERED_LOGIT;
            }
        }
    }
    let st = row_stats(&row);
    let token = if s.temperature <= 0.0 {
        st.argmax
    } else {
        gumbel_max(&row, f32::NEG_INFINITY, 1.0, key).unwrap_or(st.argmax)
    };
    (token, confidence(&row, &st, token, kind, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn philox_known_answer() {
        // Random123 known-answer test vectors for philox4x32-10.
        assert_eq!(philox4x32([0, 0, 0, 0], [0, 0]), [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8]);
        assert_eq!(
            philox4x32([0xffffffff; 4], [0xffffffff; 2]),
            [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd]
        );
        assert_eq!(
            philox4x32([0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344], [0xa4093822, 0x299f31d0]),
            [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1]
        );
    }

    #[test]
    fn uniform_is_open_interval() {
        assert!(uniform53(0, 0) > 0.0);
        assert!(uniform53(u32::MAX, u32::MAX) < 1.0);
    }

    #[test]
    fn argmax_ties_go_to_lowest_id_and_stats_are_right() {
        let l = [1.0f32, 3.0, 3.0, -2.0];
        let st = row_stats(&l);
        assert_eq!(st.argmax, 1);
        assert_eq!(st.second, 3.0);
        let (tok, conf) = candidate(&l, &Sampling::default(), ConfKind::Prob, RngKey { seed: 1, seq: 0, step: 0, slot: 0 }, ConfDist::Raw);
        assert_eq!(tok, 1);
        let z: f64 = l.iter().map(|&x| ((x - 3.0) as f64).exp()).sum();
        assert!((conf as f64 - 1.0 / z).abs() < 1e-6);
        let (_, margin) = candidate(&l, &Sampling::default(), ConfKind::Margin, RngKey { seed: 1, seq: 0, step: 0, slot: 0 }, ConfDist::Raw);
        assert_eq!(margin, 0.0);
        let ent: f64 = l.iter().map(|&x| { let p = ((x - 3.0) as f64).exp() / z; p * p.ln() }).sum();
        assert!((st.neg_entropy - ent).abs() < 1e-9);
    }

    #[test]
    fn policy_top_k_resolves_to_dreams_50_and_an_explicit_value_stays() {
        let dream: Policy = "dream:entropy,8".parse().unwrap();
        let llada: Policy = "schedule:8".parse().unwrap();
        assert_eq!(Sampling::default().for_policy(&dream).top_k, 50);
        assert_eq!(Sampling::default().for_policy(&llada).top_k, 0);
        let off = Sampling { top_k: 0, ..Sampling::default() };
        assert_eq!(off.for_policy(&dream).top_k, 0, "an explicit 0 turns Dream's filter off");
        let k7 = Sampling { top_k: 7, ..Sampling::default() };
        assert_eq!(k7.for_policy(&dream).top_k, 7);
    }

    #[test]
    fn filtered_confidences_renormalise_over_the_survivors() {
        // 4 logits; top-2 keeps {3.0, 2.0}: p(3) = e / (e + 1) over the survivors.
        let l = [0.0f32, 1.0, 2.0, 3.0];
        let s = Sampling { temperature: 0.0, top_k: 2, top_p: 1.0 };
        let key = RngKey { seed: 1, seq: 0, step: 0, slot: 0 };
        let (tok, p) = candidate(&l, &s, ConfKind::Prob, key, ConfDist::Filtered);
        assert_eq!(tok, 3);
        let e = std::f64::consts::E;
        assert!((p as f64 - e / (e + 1.0)).abs() < 1e-6, "{p}");
        let (_, raw) = candidate(&l, &s, ConfKind::Prob, key, ConfDist::Raw);
        assert!(raw < p - 0.05, "the raw softmax ignores top-k at T = 0: {raw} vs {p}");
        // Margin over the survivors: p1 − p2 = (e − 1) / (e + 1); one survivor: margin 1.
        let (_, m) = candidate(&l, &s, ConfKind::Margin, key, ConfDist::Filtered);
        assert!((m as f64 - (e - 1.0) / (e + 1.0)).abs() < 1e-6, "{m}");
        let one = Sampling { top_k: 1, ..s };
        assert_eq!(candidate(&l, &one, ConfKind::Margin, key, ConfDist::Filtered).1, 1.0);
        // T > 0 scales before filtering: at T = 0.5 the survivors are {6, 4}.
        let hot = Sampling { temperature: 0.5, top_k: 2, top_p: 1.0 };
        let (_, ph) = candidate(&l, &hot, ConfKind::Prob, key, ConfDist::Filtered);
        let e2 = e * e;
        assert!((ph as f64 - e2 / (e2 + 1.0)).abs() < 1e-6 || (ph as f64 - 1.0 / (e2 + 1.0)).abs() < 1e-6, "{ph}");
    }

    #[test]
    fn top_k_and_top_p_cutoffs() {
        let l = [0.0f32, 1.0, 2.0, 3.0];
        let st = row_stats(&l);
        assert_eq!(filter_cutoff(&l, &Sampling { temperature: 1.0, top_k: 2, top_p: 1.0 }, &st), 2.0);
        // p(3) = 0.6439, p(2) = 0.2369: top_p 0.8 needs both.
        assert_eq!(filter_cutoff(&l, &Sampling { temperature: 1.0, top_k: 0, top_p: 0.8 }, &st), 2.0);
        assert_eq!(filter_cutoff(&l, &Sampling { temperature: 1.0, top_k: 0, top_p: 0.5 }, &st), 3.0);
    }
}
