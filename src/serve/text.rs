//! What a client sees of a choice's tokens: text cut at EOS/EOT and at stop strings, streamed
//! as blocks finish, and the canvas rendered for `stream_canvas`.
use std::sync::Arc;

use crate::config::ModelConfig;
use crate::tokenizer::Tokenizer;

/// Text of a finished prefix of the gen region, cut at EOS/EOT and at the first stop string,
/// as it is streamed: `push` returns the new text and whether the choice has ended.
pub struct TextStream {
    tok: Option<Arc<Tokenizer>>,
    stop_ids: [u32; 2],
    stop: Vec<String>,
    /// Text sent so far.
    sent: String,
    /// Token ids sent so far (for tokenizer-less models, which stream ids).
    ids_sent: usize,
    pub finish: Option<&'static str>,
}

/// What one `push` produced.
pub struct Delta {
    pub text: String,
    /// New token ids (up to EOS/EOT).
    pub ids: Vec<u32>,
}

impl TextStream {
    pub fn new(tok: Option<Arc<Tokenizer>>, cfg: &ModelConfig, stop: Vec<String>) -> Self {
        TextStream { tok, stop_ids: [cfg.eos_id, cfg.eot_id], stop, sent: String::new(), ids_sent: 0, finish: None }
    }

    /// The text so far (after the last `push`).
    pub fn text(&self) -> &str {
        &self.sent
    }

    /// Takes the finalised tokens (a prefix of the gen region that grows); `last`: the request
    /// finished, so nothing is held back.
    pub fn push(&mut self, tokens: &[u32], last: bool) -> Delta {
        if self.finish.is_some() {
            return Delta { text: String::new(), ids: Vec::new() };
        }
        let eos = tokens.iter().position(|t| self.stop_ids.contains(t));
        let end = eos.unwrap_or(tokens.len());
        let ids = tokens[self.ids_sent.min(end)..end].to_vec();
        self.ids_sent = end;
        let Some(tok) = &self.tok else {
            if eos.is_some() || last {
                self.finish = Some(if eos.is_some() { "stop" } else { "length" });
            }
            return Delta { text: String::new(), ids };
        };
        let mut text = tok.decode(&tokens[..end], true).unwrap_or_default();
        let mut finish = None;
        if let Some(cut) = self.stop.iter().filter_map(|s| text.find(s.as_str())).min() {
            text.truncate(cut);
            finish = Some("stop");
        } else if eos.is_some() {
            finish = Some("stop");
        } else if last {
            finish = Some("length");
        }
        let mut visible = text.len();
        if finish.is_none() {
            // Hold back a partial UTF-8 character and any tail that may grow into a stop string.
            visible = text.trim_end_matches('\u{FFFD}').len();
            let shown = &text[..visible];
            let hold = self
                .stop
                .iter()
                .filter_map(|s| (1..s.len()).rev().find(|&k| s.is_char_boundary(k) && shown.ends_with(&s[..k])))
                .max()
                .unwrap_or(0);
            visible -= hold;
        }
        let visible_text = &text[..visible];
        let delta = match visible_text.strip_prefix(self.sent.as_str()) {
            Some(d) => d.to_string(),
            // Decoding a longer prefix changed earlier text (rare with byte-level BPE): send
            // nothing now; the final push sends what is consistent.
            None => String::new(),
        };
        if visible_text.starts_with(self.sent.as_str()) {
            self.sent = visible_text.to_string();
        }
        self.finish = finish;
        Delta { text: delta, ids }
    }
}

/// The gen region of a canvas as text: runs of tokens decoded together, masks as `░`.
pub fn render_canvas(tokens: &[u32], mask_id: u32, tok: Option<&Tokenizer>) -> String {
    let Some(tok) = tok else {
        return tokens.iter().map(|&t| if t == mask_id { "_".to_string() } else { t.to_string() }).collect::<Vec<_>>().join(" ");
    };
    let mut out = String::new();
    for run in tokens.chunk_by(|a, b| (*a == mask_id) == (*b == mask_id)) {
        if run[0] == mask_id {
            out.extend(std::iter::repeat_n('░', run.len()));
        } else {
            out.push_str(&tok.decode(run, false).unwrap_or_default());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, Arc<Tokenizer>) {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let tok = Arc::new(Tokenizer::tiny(&cfg).unwrap());
        (cfg, tok)
    }

    fn ids(t: &Tokenizer, s: &str) -> Vec<u32> {
        t.encode(s, false).unwrap()
    }

    #[test]
    fn stream_holds_back_a_possible_stop_string_and_cuts_at_it() {
        let (cfg, tok) = tiny();
        let mut ts = TextStream::new(Some(tok.clone()), &cfg, vec!["END".into()]);
        // "abcE" may grow into "END": "E" waits.
        let d = ts.push(&ids(&tok, "abcE"), false);
        assert_eq!((d.text.as_str(), ts.finish), ("abc", None));
        // "abcEx": the E was not a stop string after all.
        let d = ts.push(&ids(&tok, "abcExyEN"), false);
        assert_eq!((d.text.as_str(), ts.finish), ("Exy", None));
        let d = ts.push(&ids(&tok, "abcExyENDzzz"), false);
        assert_eq!((d.text.as_str(), ts.finish), ("", Some("stop")));
        assert_eq!(ts.text(), "abcExy");
        // Nothing more once finished.
        assert!(ts.push(&ids(&tok, "abcExyENDzzzmore"), true).text.is_empty());
    }

    #[test]
    fn stream_ends_at_eos_and_reports_length_otherwise() {
        let (cfg, tok) = tiny();
        let mut with_eos = ids(&tok, "hi there");
        with_eos.push(cfg.eos_id);
        with_eos.extend(ids(&tok, "junk"));
        let mut ts = TextStream::new(Some(tok.clone()), &cfg, vec![]);
        let d = ts.push(&with_eos, false);
        assert_eq!((d.text.as_str(), ts.finish, d.ids.len()), ("hi there", Some("stop"), 8));
        let mut ts = TextStream::new(Some(tok.clone()), &cfg, vec![]);
        assert_eq!(ts.push(&ids(&tok, "ab"), false).text, "ab");
        assert_eq!(ts.push(&ids(&tok, "abcd"), true).text, "cd");
        assert_eq!(ts.finish, Some("length"));
    }

    #[test]
    fn stream_waits_for_the_rest_of_a_utf8_character() {
        let (cfg, tok) = tiny();
        let bytes = ids(&tok, "é!"); // é is two bytes
        assert_eq!(bytes.len(), 3);
        let mut ts = TextStream::new(Some(tok), &cfg, vec![]);
        assert_eq!(ts.push(&bytes[..1], false).text, "");
        assert_eq!(ts.push(&bytes, true).text, "é!");
    }

    #[test]
    fn tokenizer_less_streams_ids_up_to_eos() {
        let (cfg, _) = tiny();
        let mut ts = TextStream::new(None, &cfg, vec![]);
        assert_eq!(ts.push(&[5, 6], false).ids, vec![5, 6]);
        let d = ts.push(&[5, 6, 7, cfg.eos_id, 9], false);
        assert_eq!((d.ids, ts.finish), (vec![7], Some("stop")));
    }

    #[test]
    fn canvas_shows_masks() {
        let (cfg, tok) = tiny();
        let mut c = ids(&tok, "ab");
        c.extend([cfg.mask_id, cfg.mask_id]);
        c.extend(ids(&tok, "c"));
        assert_eq!(render_canvas(&c, cfg.mask_id, Some(&tok)), "ab░░c");
        assert_eq!(render_canvas(&[7, cfg.mask_id], cfg.mask_id, None), "7 _");
    }
}
