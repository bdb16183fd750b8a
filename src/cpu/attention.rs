//! f32 reference for bidirectional varlen attention over the KV cache (no mask, GQA,
//! head_dim 128): the oracle for `kernels/attention.cu`; and its block-causal form (LLaDA2:
//! each row sees a prefix of its sequence's keys, [`attention_capped`]).
use rayon::prelude::*;

use crate::batch::SeqSpan;
use crate::config::HEAD_DIM;

/// For each sequence `s` and each of its live rows `r` (packed rows
/// `[row_start, row_start + row_count)`), and each query head `h`:
/// `out[r, h] = softmax(q[r, h] · K[s, kvh]ᵀ / sqrt(128)) · V[s, kvh]`, where K/V are the cache
/// rows `[cache_base, cache_base + kv_len)` and `kvh = h / (n_heads / n_kv_heads)`.
///
/// `q` row `r`, head `h` starts at `r * q_stride + h * 128`; cache rows have stride
/// `n_kv_heads * 128`; `out` rows have stride `n_heads * 128`. Rows of `out` not covered by any
/// sequence are left untouched. Scores and the softmax are accumulated in f64.
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    out: &mut [f32],
) {
    attention_capped(q, q_stride, k_cache, v_cache, seqs, n_heads, n_kv_heads, None, out)
}

/// As [`attention`], but packed row `r` attends only to its sequence's first
/// `min(kv_len, caps[r])` keys when `caps` is given (block-causal attention: a row in block b
/// of size B has cap `(b + 1) · B`). A cap of 0 leaves the row's output at zero.
#[allow(clippy::too_many_arguments)]
pub fn attention_capped(
    q: &[f32],
    q_stride: usize,
    k_cache: &[f32],
    v_cache: &[f32],
    seqs: &[SeqSpan],
    n_heads: usize,
    n_kv_heads: usize,
    caps: Option<&[usize]>,
    out: &mut [f32],
) {
    assert!(
        n_kv_heads > 0 && n_heads.is_multiple_of(n_kv_heads),
        "attention: n_heads {n_heads} not a multiple of n_kv_heads {n_kv_heads}"
    );
    let d = HEAD_DIM;
    let group = n_heads / n_kv_heads;
    let kv_stride = n_kv_heads * d;
    let out_stride = n_heads * d;
    let scale = 1.0 / (d as f64).sqrt();
    // Which sequence owns each packed row.
    let mut owner = vec![usize::MAX; out.len() / out_stride];
    for (si, s) in seqs.iter().enumerate() {
        for r in s.row_start..s.row_start + s.row_count {
            owner[r as usize] = si;
        }
    }
    out.par_chunks_mut(out_stride)
        .enumerate()
        .for_each(|(r, orow)| {
            let Some(s) = owner.get(r).and_then(|&si| seqs.get(si)) else {
                return;
            };
            let base = s.cache_base as usize;
            let n = caps.map_or(s.kv_len as usize, |c| c[r].min(s.kv_len as usize));
            if n == 0 {
                orow.fill(0.0);
                return;
            }
            let mut scores = vec![0f64; n];
            let mut acc = vec![0f64; d];
            for h in 0..n_heads {
                let kvh = h / group;
                let qh = &q[r * q_stride + h * d..r * q_stride + (h + 1) * d];
                let mut mx = f64::NEG_INFINITY;
                for (j, sc) in scores.iter_mut().enumerate() {
                    let k = &k_cache[(base + j) * kv_stride + kvh * d..][..d];
                    let dot: f64 = qh.iter().zip(k).map(|(&a, &b)| a as f64 * b as f64).sum();
                    *sc = dot * scale;
                    mx = mx.max(*sc);
                }
                acc.iter_mut().for_each(|a| *a = 0.0);
                let mut sum = 0f64;
                for (j, &sc) in scores.iter().enumerate() {
                    let p = (sc - mx).exp();
                    sum += p;
                    let v = &v_cache[(base + j) * kv_stride + kvh * d..][..d];
                    for (a, &x) in acc.iter_mut().zip(v) {
                        *a += p * x as f64;
                    }
                }
                for (o, a) in orow[h * d..(h + 1) * d].iter_mut().zip(&acc) {
                    *o = (a / sum) as f32;
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(row_start: u32, row_count: u32, cache_base: u32, kv_len: u32) -> SeqSpan {
        SeqSpan {
            row_start,
            row_count,
            cache_base,
            kv_len,
        }
    }

    /// Identical keys give uniform weights: every output is the mean of the values.
    #[test]
    fn uniform_keys_average_values() {
        let d = HEAD_DIM;
        let (n_heads, n_kv) = (2, 1);
        let q: Vec<f32> = (0..n_heads * d).map(|i| (i as f32 * 0.37).sin()).collect();
        let kv_len = 3;
        let k: Vec<f32> = (0..kv_len)
            .flat_map(|_| (0..d).map(|i| (i as f32 * 0.11).cos()))
            .collect();
        let v: Vec<f32> = (0..kv_len)
            .flat_map(|j| (0..d).map(move |i| (j * 10 + i % 5) as f32))
            .collect();
        let mut out = vec![f32::NAN; n_heads * d];
        attention(
            &q,
            n_heads * d,
            &k,
            &v,
            &[span(0, 1, 0, kv_len as u32)],
            n_heads,
            n_kv,
            &mut out,
        );
        for h in 0..n_heads {
            for i in 0..d {
                let want = (10 + 20) as f32 / 3.0 + (i % 5) as f32; // values 0, 10, 20 (+ i % 5)
                let got = out[h * d + i];
                assert!(
                    (got - want).abs() < 1e-4,
                    "head {h} dim {i}: got {got}, want {want}"
                );
            }
        }
    }

    /// Two keys, one query: weights are softmax([q·k0, q·k1] / sqrt(128)), computed by hand;
    /// GQA maps heads 0,1 to kv head 0 and 2,3 to kv head 1; the cache base offsets the keys.
    #[test]
    fn two_keys_gqa_and_cache_base() {
        let d = HEAD_DIM;
        let (n_heads, n_kv) = (4, 2);
        let kv_stride = n_kv * d;
        let cache_rows = 5;
        let base = 3;
        let mut k = vec![100.0f32; cache_rows * kv_stride]; // rows outside the span would dominate
        let mut v = vec![-7.0f32; cache_rows * kv_stride];
        // With q = e0: q·k0 = 0 and q·k1 = sqrt(128) * ln 3, so the scaled scores are [0, ln 3].
        let c = (d as f32).sqrt() * 3f32.ln();
        for kvh in 0..n_kv {
            for j in 0..2 {
                let row = (base + j) * kv_stride + kvh * d;
                k[row..row + d].iter_mut().for_each(|x| *x = 0.0);
                if j == 1 {
                    k[row] = c;
                }
                v[row..row + d]
                    .iter_mut()
                    .for_each(|x| *x = (j as f32 + 1.0) * (kvh as f32 + 1.0));
            }
        }
        // Query e0 for every head: weights softmax([0, ln 3]) = [1/4, 3/4]; v = (j+1)(kvh+1).
        let q_stride = (n_heads + 2 * n_kv) * d; // as in the fused QKV buffer
        let mut q = vec![0.5f32; 2 * q_stride];
        for r in 0..2 {
            for h in 0..n_heads {
                q[r * q_stride + h * d..r * q_stride + (h + 1) * d]
                    .iter_mut()
                    .for_each(|x| *x = 0.0);
                q[r * q_stride + h * d] = 1.0;
            }
        }
        let mut out = vec![f32::NAN; 2 * n_heads * d];
        // Row 0 belongs to no sequence (left untouched); row 1 is the live row.
        attention(
            &q,
            q_stride,
            &k,
            &v,
            &[span(1, 1, base as u32, 2)],
            n_heads,
            n_kv,
            &mut out,
        );
        assert!(
            out[..n_heads * d].iter().all(|x| x.is_nan()),
            "row outside every sequence was written"
        );
        for h in 0..n_heads {
            let kvh = h / 2;
            let want = 0.25 * (kvh as f32 + 1.0) + 0.75 * 2.0 * (kvh as f32 + 1.0);
            for i in 0..d {
                let got = out[n_heads * d + h * d + i];
                assert!(
                    (got - want).abs() < 1e-5,
                    "head {h} dim {i}: got {got}, want {want}"
                );
            }
        }
    }
}
