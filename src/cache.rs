//! KV-cache plans (docs/design.md §5): which canvas rows a decoding step recomputes ("live") and
//! which it reads from the per-sequence KV cache. Pure host logic, no GPU.
//!
//! A sequence's canvas is `[prompt (P rows) | gen (G slots)]`, the gen region cut into blocks of
//! `block_len` (the last block may be shorter). Attention always reads every row `[0, P+G)` of
//! the sequence's cache; a step recomputes only its live rows, whose fresh K/V overwrite their
//! cache rows, and every other row keeps the K/V computed at the last step where it was live. A
//! cache scheme is therefore exactly the live set of each step:
//!
//! | scheme | matches | full steps | live rows of the other steps |
//! |---|---|---|---|
//! | `none` | exact decoding | every step | — |
//! | `prefix` | Fast-dLLM PrefixCache | first step of each block (`i == 0`) | `[block_start, P+G)` |
//! | `dual` | Fast-dLLM DualCache | first step of each block (`i == 0`) | `[block_start, block_end)` |
//! | `prompt` | Dimple prefilling | global step 0 | `[P, P+G)` (shifted: also `P−1`) |
//! | `dkv:R` | dKV-Cache-Decode | `i == 0`, `i == 1`, `i % R == 0` | still-masked rows (all blocks) ∪ rows committed at step `n−1` |
//! | `dkv-greedy[:W]` | dKV-Cache-Greedy | as `dkv:4` | still-masked rows of the current block, each with `W` neighbours per side (default `W = 2`) |
//! | `block` | block diffusion (LLaDA2; SGLang, dInfer) | none by rule | `n == 0`: `[0, block_end)`; `i == 0`: `[previous block start, block_end)`; else `[block_start, block_end)` |
//!
//! `n` is the sequence's global step (0-based), `i` the step's index within its block.
//! - `dkv:R` caches a row one step after its token was committed: a row committed at step `c`
//!   is live at step `c+1` (its input is now the real token, no longer the mask) and cached from
//!   `c+2` on. Prompt rows (and slots a structure prior fixes) count as committed before step 0.
//! - `dkv-greedy[:W]` caches a row from the step after the one that committed it, with no extra
//!   recompute, so its cached K/V saw the mask as input. Its refresh period is fixed at 4 (full
//!   steps at `i == 0`, `i == 1` and `i % 4 == 0`, like `dkv:4`); `W` only sets the window.
//! - `block` is exact for block-causal attention (a query sees the keys of its own attention
//!   block and earlier ones; the engine refuses it for any other model, and for decode blocks
//!   that are not whole attention blocks): no row after the current block is ever computed or
//!   read. The sequence's first step prefills every row before the block together with it; the
//!   first step of each later block also recomputes the previous decoded block (from its start,
//!   and any fully fixed block skipped since) with its final tokens, which writes its final K/V
//!   in the same forward instead of one more forward of its own; cached rows are then final.
//!   The previous block's start is found from the rows committed at step `n−1` (they lie in it)
//!   on the grid of the block bounds the plan is given, `block_start − k·block_len`, so the plan
//!   holds for any block alignment; without that record, `block_start − block_len` (≥ 0).
//! - Shifted models (Dream: row `p−1` gives the logits of slot `p`): every live set also holds
//!   the row before each eligible slot (none for `p == 0`), including `P−1` across the
//!   prompt/gen boundary.
//!
//! Every live set contains every eligible slot (and, shifted, its predecessor); this is
//! debug-asserted and tested. [`StepRows::full`] is true exactly when the live set is every row,
//! whether by a refresh or because the partial set happens to cover the canvas.
use std::fmt;
use std::str::FromStr;

use crate::error::{Error, Result};

/// Refresh period of `dkv-greedy` (full steps at `i == 0`, `i == 1`, `i % 4 == 0`).
pub const DKV_GREEDY_REFRESH: u32 = 4;
/// Default neighbour window of `dkv-greedy`.
pub const DKV_GREEDY_DEFAULT_WINDOW: u32 = 2;

/// Which rows a step recomputes; CLI names `none`, `prompt`, `prefix`, `dual`, `dkv:R`,
/// `dkv-greedy[:W]`, `block` (see the module table).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CacheScheme {
    /// Every step recomputes every row (exact).
    #[default]
    None,
    /// Step 0 full, then only gen rows (shifted: plus the last prompt row).
    Prompt,
    /// Block start full, then `[block_start, P+G)`.
    Prefix,
    /// Block start full, then the block's rows.
    Dual,
    /// dKV-Cache-Decode with a full refresh every `refresh` steps of a block (≥ 1).
    Dkv { refresh: u32 },
    /// dKV-Cache-Greedy: the current block's masked rows ± `window` neighbours.
    DkvGreedy { window: u32 },
    /// The exact cache of block-causal attention (LLaDA2): the current block's rows, plus the
    /// rows before it on the sequence's first step and the previous block's on a block's first.
    Block,
}

impl CacheScheme {
    /// Canonical name (parses back to the same scheme); `dkv-greedy` always shows its window.
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// True for the scheme that recomputes every row every step (exact decoding).
    pub fn is_exact(&self) -> bool {
        matches!(self, CacheScheme::None)
    }

    /// True for a scheme that is only valid under block-causal attention (`block`: with
    /// bidirectional attention its live rows would read the never-written rows after the
    /// block). The engine refuses it for every other model.
    pub fn needs_block_causal(&self) -> bool {
        matches!(self, CacheScheme::Block)
    }
}

impl FromStr for CacheScheme {
    type Err = Error;
    fn from_str(full: &str) -> Result<Self> {
        let (name, arg) = match full.split_once(':') {
            Some((n, a)) => (n, Some(a)),
            None => (full, None),
        };
        let no_arg = |s: CacheScheme| match arg {
            None => Ok(s),
            Some(a) => {
                Err(Error::bad_input(format!("cache scheme `{full}`: `{name}` takes no parameter (got `:{a}`)")))
            }
        };
        let int = |a: &str, what: &str| {
            a.trim().parse::<u32>().map_err(|_| {
                Error::bad_input(format!("cache scheme `{full}`: {what} `{a}` is not a non-negative integer"))
            })
        };
        match name.trim() {
            "none" => no_arg(CacheScheme::None),
            "prompt" => no_arg(CacheScheme::Prompt),
            "prefix" => no_arg(CacheScheme::Prefix),
            "dual" => no_arg(CacheScheme::Dual),
            "block" => no_arg(CacheScheme::Block),
            "dkv" => {
                let a = arg.ok_or_else(|| {
                    Error::bad_input(format!("cache scheme `{full}`: expected dkv:R (refresh period R >= 1)"))
                })?;
                let refresh = int(a, "refresh period")?;
                if refresh == 0 {
                    return Err(Error::bad_input(format!(
                        "cache scheme `{full}`: refresh period R must be >= 1, got 0"
                    )));
                }
                Ok(CacheScheme::Dkv { refresh })
            }
            "dkv-greedy" => {
                let window = match arg {
                    None => DKV_GREEDY_DEFAULT_WINDOW,
                    Some(a) => int(a, "window")?,
                };
                Ok(CacheScheme::DkvGreedy { window })
            }
            _ => Err(Error::bad_input(format!(
                "unknown cache scheme `{full}` (none, prompt, prefix, dual, dkv:R, dkv-greedy[:W], block)"
            ))),
        }
    }
}

impl fmt::Display for CacheScheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CacheScheme::None => write!(f, "none"),
            CacheScheme::Prompt => write!(f, "prompt"),
            CacheScheme::Prefix => write!(f, "prefix"),
            CacheScheme::Dual => write!(f, "dual"),
            CacheScheme::Dkv { refresh } => write!(f, "dkv:{refresh}"),
            CacheScheme::DkvGreedy { window } => write!(f, "dkv-greedy:{window}"),
            CacheScheme::Block => write!(f, "block"),
        }
    }
}

/// The rows one step of one sequence recomputes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StepRows {
    /// Every row `[0, P+G)` is live (a refresh, or a partial set that covers the canvas).
    pub full: bool,
    /// Live canvas positions, ascending, unique; all of `0..P+G` when `full`.
    pub live: Vec<u32>,
}

/// Per-sequence cache plan: the scheduler asks [`CachePlan::live_rows`] before each step and
/// reports the step's commits with [`CachePlan::committed`] after it.
#[derive(Clone, Debug)]
pub struct CachePlan {
    scheme: CacheScheme,
    prompt_len: u32,
    gen_len: u32,
    block_len: u32,
    shifted: bool,
    refresh_every_step: bool,
    /// Step of the latest [`CachePlan::committed`] call (None before the first) and the
    /// positions committed at it (room for a block's slots from the start, so reporting a
    /// step's commits never allocates).
    last_step: Option<u32>,
    last_rows: Vec<u32>,
}

impl CachePlan {
    /// A plan for a canvas of `prompt_len` prompt rows and `gen_len` gen slots cut into blocks
    /// of `block_len` (the last block may be shorter); `shifted` for Dream-style logits.
    pub fn new(
        scheme: CacheScheme,
        prompt_len: usize,
        gen_len: usize,
        block_len: usize,
        shifted: bool,
    ) -> Result<Self> {
        if gen_len == 0 {
            return Err(Error::config("gen_len", "must be >= 1"));
        }
        if block_len == 0 {
            return Err(Error::config("block_len", "must be >= 1"));
        }
        let total = prompt_len.checked_add(gen_len).filter(|&t| t <= u32::MAX as usize);
        if total.is_none() {
            return Err(Error::config(
                "gen_len",
                format!("prompt_len {prompt_len} + gen_len {gen_len} does not fit in u32 positions"),
            ));
        }
        Ok(CachePlan {
            scheme,
            prompt_len: prompt_len as u32,
            gen_len: gen_len as u32,
            block_len: block_len.min(gen_len) as u32,
            shifted,
            refresh_every_step: false,
            last_step: None,
            last_rows: Vec::with_capacity(block_len.min(gen_len)),
        })
    }

    pub fn scheme(&self) -> CacheScheme {
        self.scheme
    }

    /// Rows of the canvas, `P + G`.
    pub fn rows(&self) -> u32 {
        self.prompt_len + self.gen_len
    }

    /// Test knob: force a full refresh every step (then every scheme equals `none`).
    pub fn set_refresh_every_step(&mut self, on: bool) {
        self.refresh_every_step = on;
    }

    /// Whether step `n` (index `i` within its block) recomputes every row by rule.
    fn refresh(&self, n: u32, i: u32) -> bool {
        let dkv = |r: u32| i == 0 || i == 1 || i.is_multiple_of(r);
        self.refresh_every_step
            || match self.scheme {
                CacheScheme::None => true,
                CacheScheme::Prompt => n == 0,
                CacheScheme::Prefix | CacheScheme::Dual => i == 0,
                CacheScheme::Dkv { refresh } => dkv(refresh),
                CacheScheme::DkvGreedy { .. } => dkv(DKV_GREEDY_REFRESH),
                // Its first step covers the canvas only when the first block is the last.
                CacheScheme::Block => false,
            }
    }

    /// Live rows for the coming step. Inputs: the sequence's global step number `n`
    /// (0-based), the step index `i` within the current block (0 = first step of the block),
    /// the current block `[block_start, block_end)` in canvas positions, `masked` = canvas
    /// positions still masked (all blocks, ascending), `eligible` = masked positions of the
    /// current block (ascending).
    pub fn live_rows(&self, n: u32, i: u32, block: (u32, u32), masked: &[u32], eligible: &[u32]) -> StepRows {
        let mut live = Vec::new();
        let full = self.live_rows_into(n, i, block, masked, eligible, &mut live);
        StepRows { full, live }
    }

    /// [`live_rows`](Self::live_rows) into `out` (cleared first; it allocates nothing once
    /// `out` has held `P + G` rows); returns `full`.
    pub fn live_rows_into(
        &self,
        n: u32,
        i: u32,
        block: (u32, u32),
        masked: &[u32],
        eligible: &[u32],
        out: &mut Vec<u32>,
    ) -> bool {
        let total = self.rows();
        self.debug_check_inputs(block, masked, eligible);
        out.clear();
        if self.refresh(n, i) {
            out.extend(0..total);
            return true;
        }
        // `out` first holds one mark per row (1 = live), then is compacted in place to the
        // live positions.
        out.resize(total as usize, 0);
        let mut mark = |lo: u32, hi: u32| out[lo as usize..hi.min(total) as usize].fill(1);
        match self.scheme {
            CacheScheme::None => mark(0, total),
            CacheScheme::Prompt => {
                let lo = if self.shifted { self.prompt_len.saturating_sub(1) } else { self.prompt_len };
                mark(lo, total);
            }
            CacheScheme::Prefix => mark(block.0, total),
            CacheScheme::Dual => mark(block.0, block.1),
            CacheScheme::Dkv { .. } => {
                for &p in masked {
                    mark(p, p + 1);
                }
                if let Some(c) = self.last_step {
                    if n >= 1 && c == n - 1 {
                        for &p in &self.last_rows {
                            mark(p, p + 1);
                        }
                    }
                }
            }
            CacheScheme::DkvGreedy { window } => {
                for &p in eligible {
                    mark(p.saturating_sub(window), p.saturating_add(window).saturating_add(1));
                }
            }
            CacheScheme::Block => {
                let lo = if n == 0 {
                    0
                } else if i == 0 {
                    self.previous_block_start(n, block)
                } else {
                    block.0
                };
                mark(lo, block.1);
            }
        }
        if self.shifted {
            for &p in eligible {
                if p > 0 {
                    out[p as usize - 1] = 1;
                }
            }
        }
        debug_assert!(
            eligible.iter().all(|&p| out[p as usize] == 1),
            "cache plan {}: an eligible slot is not live at step {n}",
            self.scheme
        );
        let mut k = 0;
        for p in 0..total as usize {
            if out[p] != 0 {
                out[k] = p as u32;
                k += 1;
            }
        }
        out.truncate(k);
        k == total as usize
    }

    /// `block`'s first step of a block at step `n`: the start of the block step `n−1` ran in
    /// (the block finished there), on the grid `block.0 − k·block_len` of the current block's
    /// bounds; it lies before any fully fixed block skipped since. From the rows committed at
    /// step `n−1` (the step that finished a block commits at least one of its slots); without
    /// that record, the block just before, `block.0 − block_len` clamped to 0.
    fn previous_block_start(&self, n: u32, block: (u32, u32)) -> u32 {
        let bl = self.block_len;
        let first = match self.last_step {
            Some(c) if n >= 1 && c == n - 1 => self.last_rows.iter().copied().min(),
            _ => None,
        };
        match first {
            Some(q) if q < block.0 => block.0 - ((block.0 - q - 1) / bl + 1).saturating_mul(bl).min(block.0),
            _ => block.0.saturating_sub(bl),
        }
    }

    /// Tell the plan which positions were committed at step `n` (after the step ran). Several
    /// calls for the same step accumulate.
    pub fn committed(&mut self, n: u32, positions: &[u32]) {
        debug_assert!(
            positions.iter().all(|&p| p >= self.prompt_len && p < self.rows()),
            "cache plan: committed positions {positions:?} outside the gen region [{}, {})",
            self.prompt_len,
            self.rows()
        );
        if self.last_step != Some(n) {
            self.last_step = Some(n);
            self.last_rows.clear();
        }
        self.last_rows.extend_from_slice(positions);
    }

    fn debug_check_inputs(&self, block: (u32, u32), masked: &[u32], eligible: &[u32]) {
        if !cfg!(debug_assertions) {
            return;
        }
        let (p, total) = (self.prompt_len, self.rows());
        let (lo, hi) = block;
        assert!(
            lo >= p
                && lo < hi
                && hi <= total
                && (lo - p).is_multiple_of(self.block_len)
                && hi == (lo + self.block_len).min(total),
            "cache plan: block [{lo}, {hi}) is not a block of the gen region [{p}, {total}) cut by {}",
            self.block_len
        );
        let ascending = |v: &[u32]| v.windows(2).all(|w| w[0] < w[1]);
        assert!(ascending(masked) && masked.iter().all(|&q| q >= p && q < total), "cache plan: bad masked {masked:?}");
        assert!(
            ascending(eligible) && eligible.iter().all(|&q| q >= lo && q < hi && masked.binary_search(&q).is_ok()),
            "cache plan: eligible {eligible:?} is not the masked positions of block [{lo}, {hi})"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_round_trip() {
        for s in ["none", "prompt", "prefix", "dual", "dkv:1", "dkv:4", "dkv-greedy:0", "dkv-greedy:3", "block"] {
            let c: CacheScheme = s.parse().unwrap();
            assert_eq!(c.name(), s);
        }
        assert_eq!("dkv-greedy".parse::<CacheScheme>().unwrap(), CacheScheme::DkvGreedy { window: 2 });
    }

    #[test]
    fn dual_step_by_hand() {
        // P = 2, G = 4, block 2: second block is [4, 6); step 1 of it, slot 5 left.
        let plan = CachePlan::new(CacheScheme::Dual, 2, 4, 2, true).unwrap();
        let r = plan.live_rows(3, 1, (4, 6), &[5], &[5]);
        assert_eq!(r, StepRows { full: false, live: vec![4, 5] });
        let r = plan.live_rows(2, 0, (4, 6), &[4, 5], &[4, 5]);
        assert_eq!(r, StepRows { full: true, live: (0..6).collect() });
    }
}
