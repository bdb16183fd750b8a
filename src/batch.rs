//! `RowBatch`: the rows one forward pass computes, shared by the CPU and GPU backends.
//!
//! Live rows of several sequences are packed (varlen, no padding); each sequence's live rows
//! are contiguous. Every live row writes its post-RoPE K/V into its sequence's cache rows at
//! `cache_base + position`; attention for a live row of sequence `s` reads cache rows
//! `[cache_base, cache_base + kv_len)` of `s`, i.e. the cached rows ∪ the live rows just
//! written. A full-canvas forward is the case where every position is live.
use crate::config::ModelConfig;
use crate::error::{Error, Result};

/// One sequence's slice of the batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqSpan {
    /// First packed row of this sequence's live rows.
    pub row_start: u32,
    /// Number of live rows.
    pub row_count: u32,
    /// First KV-cache row owned by this sequence (cache row of position 0).
    pub cache_base: u32,
    /// Keys attended: positions `[0, kv_len)` of this sequence.
    pub kv_len: u32,
}

#[derive(Clone, Debug, Default)]
pub struct RowBatch {
    /// Input token of each live row.
    pub tokens: Vec<u32>,
    /// Absolute position (from the sequence's first prompt token) of each live row.
    pub positions: Vec<u32>,
    pub seqs: Vec<SeqSpan>,
    /// Live rows (indices into `tokens`) whose logits are wanted, in output order.
    pub logit_rows: Vec<u32>,
}

impl RowBatch {
    /// Full-canvas forward of several sequences: every position live, cache rows packed
    /// back to back, logits for every row.
    pub fn full(seqs: &[Vec<u32>]) -> Self {
        let mut b = RowBatch::default();
        let mut base = 0u32;
        for s in seqs {
            let start = b.tokens.len() as u32;
            b.tokens.extend_from_slice(s);
            b.positions.extend(0..s.len() as u32);
            b.seqs.push(SeqSpan { row_start: start, row_count: s.len() as u32, cache_base: base, kv_len: s.len() as u32 });
            base += s.len() as u32;
        }
        b.logit_rows = (0..b.tokens.len() as u32).collect();
        b
    }

    pub fn rows(&self) -> usize {
        self.tokens.len()
    }

    /// KV-cache rows needed: one past the highest cache row any sequence attends.
    pub fn cache_rows_needed(&self) -> usize {
        self.seqs.iter().map(|s| (s.cache_base + s.kv_len) as usize).max().unwrap_or(0)
    }

    /// Cache row written by each live row (`cache_base + position`).
    pub fn cache_rows(&self) -> Vec<u32> {
        let mut out = vec![0u32; self.rows()];
        for s in &self.seqs {
            for r in s.row_start..s.row_start + s.row_count {
                out[r as usize] = s.cache_base + self.positions[r as usize];
            }
        }
        out
    }

    /// Host-side check of every integer that indexes device memory.
    pub fn validate(&self, cfg: &ModelConfig, cache_capacity: usize) -> Result<()> {
        let t = self.rows();
        if self.positions.len() != t {
            return Err(Error::bad_input(format!("batch: {} positions for {t} rows", self.positions.len())));
        }
        if let Some((i, &tok)) = self.tokens.iter().enumerate().find(|(_, &x)| x as usize >= cfg.vocab) {
            return Err(Error::bad_input(format!("token id {tok} at row {i} is not below the vocabulary size {}", cfg.vocab)));
        }
        let mut next = 0u32;
        for (si, s) in self.seqs.iter().enumerate() {
            if s.row_start != next {
                return Err(Error::bad_input(format!("batch: sequence {si} rows start at {}, expected {next}", s.row_start)));
            }
            next = s.row_start + s.row_count;
            if next as usize > t {
                return Err(Error::bad_input(format!("batch: sequence {si} rows run past {t}")));
            }
            if s.kv_len as usize > cfg.max_seq_len {
                return Err(Error::bad_input(format!(
                    "sequence {si}: length {} exceeds the model's context {}",
                    s.kv_len, cfg.max_seq_len
                )));
            }
            if (s.cache_base + s.kv_len) as usize > cache_capacity {
                return Err(Error::bad_input(format!(
                    "sequence {si}: cache rows [{}, {}) exceed the {cache_capacity} allocated",
                    s.cache_base,
                    s.cache_base + s.kv_len
                )));
            }
            for r in s.row_start..next {
                if self.positions[r as usize] >= s.kv_len {
                    return Err(Error::bad_input(format!(
                        "row {r}: position {} is not below sequence {si}'s length {}",
                        self.positions[r as usize], s.kv_len
                    )));
                }
            }
        }
        if next as usize != t {
            return Err(Error::bad_input(format!("batch: sequences cover {next} of {t} rows")));
        }
        if let Some(&r) = self.logit_rows.iter().find(|&&r| r as usize >= t) {
            return Err(Error::bad_input(format!("batch: logit row {r} is not below {t}")));
        }
        Ok(())
    }
}
