//! Structure priors (DESIGN.md §4): slots of the gen region fixed before decoding starts.
//! A template such as `{"name": "<mask:12>", "age": <mask:3>}` lays out the gen region from
//! its first slot: `<mask:N>` stands for N masked slots, any other text for the fixed tokens it
//! tokenizes to (the checkpoint's tokenizer, no special tokens added). Slots past the template
//! stay masked. `Prior::Fixed` fixes tokens at given offsets instead. Fixed slots never change
//! and are never eligible or counted as masked.
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// A structure prior over one request's gen region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prior {
    /// Template text with `<mask:N>` holes, laid out from the first gen slot.
    Template(String),
    /// (offset into the gen region, token id) pairs.
    Fixed(Vec<(u32, u32)>),
}

/// One piece of a parsed template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Piece {
    /// Literal text: fixed tokens.
    Text(String),
    /// This many masked slots.
    Mask(u32),
}

const OPEN: &str = "<mask:";

/// Splits a template into text and `<mask:N>` pieces (N ≥ 1). A `<mask:` that is not
/// followed by a positive integer and `>` is an error, so typos do not become fixed text.
pub fn parse_template(t: &str) -> Result<Vec<Piece>> {
    let mut out = Vec::new();
    let mut rest = t;
    while let Some(at) = rest.find(OPEN) {
        if at > 0 {
            out.push(Piece::Text(rest[..at].to_string()));
        }
        let after = &rest[at + OPEN.len()..];
        let close = after.find('>').ok_or_else(|| {
            Error::bad_input(format!(
                "prior template: `{OPEN}` at byte {} has no closing `>`",
                t.len() - rest.len() + at
            ))
        })?;
        let n = &after[..close];
        match n.trim().parse::<u32>() {
            Ok(k) if k > 0 => out.push(Piece::Mask(k)),
            _ => {
                return Err(Error::bad_input(format!(
                    "prior template: `<mask:{n}>` needs a positive slot count, e.g. `<mask:8>`"
                )))
            }
        }
        rest = &after[close + 1..];
    }
    if !rest.is_empty() {
        out.push(Piece::Text(rest.to_string()));
    }
    Ok(out)
}

impl Prior {
    /// The fixed token of every gen slot (`None` = masked), `gen_len` long. Errors when the
    /// prior does not fit in `gen_len`, names a token outside the vocabulary or the mask
    /// token, fixes a slot twice, or (templates with text) when there is no tokenizer.
    pub fn resolve(&self, gen_len: u32, cfg: &ModelConfig, tok: Option<&Tokenizer>) -> Result<Vec<Option<u32>>> {
        let mut slots = vec![None; gen_len as usize];
        let check = |id: u32, what: &str| -> Result<()> {
            if id as usize >= cfg.vocab {
                return Err(Error::bad_input(format!(
                    "prior: {what} token id {id} is not below the vocabulary size {}",
                    cfg.vocab
                )));
            }
            if id == cfg.mask_id {
                return Err(Error::bad_input(format!(
                    "prior: {what} is the mask token {id}; use a mask hole instead of fixing a mask"
                )));
            }
            Ok(())
        };
        match self {
            Prior::Fixed(pairs) => {
                for &(off, id) in pairs {
                    if off >= gen_len {
                        return Err(Error::bad_input(format!(
                            "prior: offset {off} is outside the gen region of {gen_len} slots"
                        )));
                    }
                    check(id, &format!("offset {off}"))?;
                    if let Some(prev) = slots[off as usize] {
                        return Err(Error::bad_input(format!(
                            "prior: offset {off} is fixed twice (tokens {prev} and {id})"
                        )));
                    }
                    slots[off as usize] = Some(id);
                }
            }
            Prior::Template(t) => {
                let mut at = 0usize;
                for piece in parse_template(t)? {
                    let ids: Vec<Option<u32>> = match piece {
                        Piece::Mask(n) => vec![None; n as usize],
                        Piece::Text(s) => {
                            let tok = tok.ok_or_else(|| {
                                Error::bad_input(format!(
                                    "prior template has fixed text {s:?} but the model has no tokenizer \
                                     (use fixed token ids instead)"
                                ))
                            })?;
                            let ids = tok.encode(&s, false)?;
                            for &id in &ids {
                                check(id, &format!("template text {s:?}"))?;
                            }
                            ids.into_iter().map(Some).collect()
                        }
                    };
                    if at + ids.len() > gen_len as usize {
                        return Err(Error::bad_input(format!(
                            "prior template needs at least {} slots but gen_len is {gen_len}",
                            at + ids.len()
                        )));
                    }
                    slots[at..at + ids.len()].copy_from_slice(&ids);
                    at += ids.len();
                }
            }
        }
        Ok(slots)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_holes_and_text() {
        let p = parse_template(r#"{"a": "<mask:12>", "b": <mask:3>}"#).unwrap();
        assert_eq!(
            p,
            [
                Piece::Text(r#"{"a": ""#.into()),
                Piece::Mask(12),
                Piece::Text(r#"", "b": "#.into()),
                Piece::Mask(3),
                Piece::Text("}".into()),
            ]
        );
        assert_eq!(parse_template("<mask:2><mask:1>").unwrap(), [Piece::Mask(2), Piece::Mask(1)]);
        for bad in ["<mask:0>", "<mask:x>", "ab<mask:3", "<mask:-1>"] {
            let e = parse_template(bad).unwrap_err().to_string();
            assert!(e.contains("prior template"), "{bad}: {e}");
        }
    }

    #[test]
    fn resolves_with_the_tiny_tokenizer() {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let tok = Tokenizer::tiny(&cfg).unwrap();
        let s = Prior::Template("A<mask:2>BC".into()).resolve(8, &cfg, Some(&tok)).unwrap();
        assert_eq!(s, [Some(65), None, None, Some(66), Some(67), None, None, None]);
        let e = Prior::Template("A<mask:6>BC".into()).resolve(8, &cfg, Some(&tok)).unwrap_err().to_string();
        assert!(e.contains("at least 9") && e.contains("gen_len is 8"), "{e}");
        let e = Prior::Template("A<mask:2>".into()).resolve(8, &cfg, None).unwrap_err().to_string();
        assert!(e.contains("no tokenizer"), "{e}");
        // Holes only need no tokenizer.
        assert_eq!(Prior::Template("<mask:3>".into()).resolve(4, &cfg, None).unwrap(), [None; 4]);
    }

    #[test]
    fn fixed_offsets_are_checked() {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let s = Prior::Fixed(vec![(3, 7), (0, 9)]).resolve(4, &cfg, None).unwrap();
        assert_eq!(s, [Some(9), None, None, Some(7)]);
        for (bad, want) in [
            (vec![(4, 7)], "outside"),
            (vec![(1, 512)], "vocabulary"),
            (vec![(1, cfg.mask_id)], "mask token"),
            (vec![(1, 7), (1, 8)], "twice"),
        ] {
            let e = Prior::Fixed(bad).resolve(4, &cfg, None).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
