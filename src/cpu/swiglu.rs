//! SwiGLU: `out = silu(gate) * up`, silu(g) = g / (1 + exp(-g)).
use rayon::prelude::*;

/// `gu` is `[rows, 2*ffn]` (gate | up per row), `out` is `[rows, ffn]`.
pub fn swiglu(gu: &[f32], ffn: usize, out: &mut [f32]) {
    assert!(
        ffn > 0 && out.len().is_multiple_of(ffn),
        "swiglu: out is not [rows, {ffn}]"
    );
    assert_eq!(gu.len(), out.len() * 2, "swiglu: gu is not [rows, 2*{ffn}]");
    out.par_chunks_mut(ffn)
        .zip(gu.par_chunks(2 * ffn))
        .for_each(|(o, row)| {
            let (g, u) = row.split_at(ffn);
            for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                *o = g / (1.0 + (-g).exp()) * u;
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silu_times_up() {
        // silu(0) = 0, silu(ln 3) = ln3 * 3/4, silu(-ln 3) = -ln3 / 4.
        let l3 = 3f32.ln();
        let gu = [0.0, l3, -l3, 2.5, 2.0, -4.0];
        let mut out = [f32::NAN; 3];
        swiglu(&gu, 3, &mut out);
        let want = [0.0, l3 * 0.75 * 2.0, -l3 / 4.0 * -4.0];
        for (g, w) in out.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{out:?} vs {want:?}");
        }
    }

    #[test]
    fn rows_are_independent() {
        let gu = [1.0, 2.0, -1.0, 3.0];
        let mut out = [0.0; 2];
        swiglu(&gu, 1, &mut out);
        let s1 = 1.0 / (1.0 + (-1f32).exp());
        let sm1 = -1.0 / (1.0 + 1f32.exp());
        assert!(
            (out[0] - 2.0 * s1).abs() < 1e-6 && (out[1] - 3.0 * sm1).abs() < 1e-6,
            "{out:?}"
        );
    }
}
