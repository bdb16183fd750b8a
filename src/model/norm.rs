//! The residual add and norm before a linear layer, with the W8A8 hand-offs around it.
use crate::error::Result;
use crate::ops;

/// `ops::norm::add_rmsnorm` into `h`, the input of the linear layer `next`; where that layer
/// will run on a W8A8 path, the norm also writes `h`'s E4M3 codes and row scales into the W8A8
/// scratch (`add_rmsnorm_quant`), so the GEMM skips its quantiser launch. Otherwise any
/// earlier such mark is dropped, so only the GEMM right after this norm can use the codes.
/// Where `delta` is the output of a `linear_any_deferred` whose scale epilogue is pending, the
/// norm applies it (`add_rmsnorm_deferred`).
#[allow(clippy::too_many_arguments)]
pub(super) fn norm_for(
    g: &crate::gpu::Gpu,
    t: usize,
    x: &mut crate::gpu::DTensor<half::bf16>,
    delta: Option<&crate::gpu::DTensor<half::bf16>>,
    weight: &crate::gpu::DTensor<half::bf16>,
    eps: f32,
    h: &mut crate::gpu::DTensor<half::bf16>,
    w8a8: Option<&mut crate::ops::gemm_w8a8::W8a8>,
    next: Option<&crate::ops::gemm_fp8::LinearWeight>,
) -> Result<()> {
    let Some(m) = w8a8 else { return ops::norm::add_rmsnorm(g, t, x, delta, weight, eps, h) };
    m.clear_prequantized();
    let pending = match delta {
        Some(d) => m.take_deferred(g, d)?,
        None if m.has_deferred() => {
            return Err(crate::error::Error::bad_input("norm: a deferred W8A8 scale epilogue is pending, but this norm adds no delta"))
        }
        None => None,
    };
    let quant = next.is_some_and(|w| m.takes_prequantized(t, w)) && weight.len().is_multiple_of(16);
    {
        let codes = if quant { Some(m.quant_scratch()) } else { None };
        match (pending, delta, codes) {
            (Some(ds), Some(d), codes) => ops::norm::add_rmsnorm_deferred(g, t, x, d, &ds, weight, eps, h, codes)?,
            (_, _, Some((q, s))) => ops::norm::add_rmsnorm_quant(g, t, x, delta, weight, eps, h, q, s)?,
            (_, _, None) => ops::norm::add_rmsnorm(g, t, x, delta, weight, eps, h)?,
        }
    }
    if quant {
        m.set_prequantized(g, h, t);
    }
    Ok(())
}
