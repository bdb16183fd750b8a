//! Tokenizer (tokenizer.json via `tokenizers`) and chat templates (the checkpoint's Jinja
//! `chat_template`, rendered with minijinja as `transformers` does, or the architecture's
//! built-in one). Also the tiny byte-level tokenizer of the tiny presets: ids 0..256 are the
//! bytes (any UTF-8 text round-trips), the special tokens sit at the top of the 512 vocab.
use std::path::Path;

use crate::config::{Arch, ModelConfig, TINY_EOS, TINY_EOT, TINY_MASK};
use crate::error::{Error, Result};

/// LLaDA-8B-Instruct's chat template.
pub const LLADA_CHAT_TEMPLATE: &str = r#"{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"#;

/// Dream-7B-Instruct's (Qwen2.5) chat template, without the tool-calling branches.
pub const DREAM_CHAT_TEMPLATE: &str = r#"{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}{%- for message in messages %}{%- if not (message['role'] == 'system' and loop.first) %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"#;

/// The built-in chat template of an architecture (used when the checkpoint has none; LLaDA2
/// checkpoints ship their own, so LLaDA2 falls back to LLaDA's, which the tiny tokenizer has).
pub fn builtin_chat_template(arch: Arch) -> &'static str {
    match arch {
        Arch::Llada | Arch::LladaMoe | Arch::Llada2 => LLADA_CHAT_TEMPLATE,
        Arch::Dream => DREAM_CHAT_TEMPLATE,
    }
}

fn default_bos(arch: Arch) -> &'static str {
    match arch {
        Arch::Llada | Arch::LladaMoe | Arch::Llada2 => "<|startoftext|>",
        Arch::Dream => "",
    }
}

/// A checkpoint's tokenizer and chat template.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    arch: Arch,
    chat_template: Option<String>,
    bos_token: String,
    eos_token: String,
}

/// A special token of tokenizer_config.json: a string or `{"content": ...}`.
fn token_field(v: &serde_json::Value, key: &str) -> Option<String> {
    match v.get(key)? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

impl Tokenizer {
    /// Reads `dir/tokenizer.json` (or, when absent, the slow byte-level BPE files `vocab.json` +
    /// `merges.txt` of Dream's DreamTokenizer, with Qwen2's pre-tokenization and the
    /// `added_tokens_decoder` of tokenizer_config.json) and, if present,
    /// `dir/tokenizer_config.json` (its `chat_template`, `bos_token`, `eos_token`). The architecture (for the built-in template)
    /// comes from config.json's `model_type`, else from the vocabulary (`<|im_start|>` → Dream).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let cfg_path = dir.join("tokenizer_config.json");
        let tok_cfg = match std::fs::read_to_string(&cfg_path) {
            Ok(t) => Some(
                serde_json::from_str::<serde_json::Value>(&t)
                    .map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(Error::file(&cfg_path, e)),
        };
        let path = dir.join("tokenizer.json");
        let inner: tokenizers::Tokenizer = if !path.exists() && dir.join("vocab.json").exists() {
            let json = slow_bpe_json(dir, tok_cfg.as_ref())?;
            json.parse()
                .map_err(|e| Error::file(dir.join("vocab.json"), format!("not a usable BPE vocabulary: {e}")))?
        } else {
            let json = std::fs::read_to_string(&path).map_err(|e| Error::file(&path, e))?;
            json.parse().map_err(|e| Error::file(&path, format!("not a valid tokenizer.json: {e}")))?
        };
        let model_type = std::fs::read_to_string(dir.join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v.get("model_type")?.as_str().map(str::to_ascii_lowercase));
        let arch = match model_type.as_deref() {
            Some("llada") => Arch::Llada,
            Some("dream" | "qwen2") => Arch::Dream,
            _ if inner.token_to_id("<|im_start|>").is_some() => Arch::Dream,
            _ => Arch::Llada,
        };
        Self::from_parts(inner, arch, tok_cfg.as_ref())
    }

    /// The tokenizer a checkpoint is decoded with, by the rule `Engine::load` follows:
    /// `Tokenizer::from_dir` when `dir/tokenizer.json` is a file, `None` when there is none.
    /// A tokenizer.json that does not load is an error (so `inspect` and `generate` agree).
    pub fn load_optional(dir: &Path) -> Result<Option<Self>> {
        if dir.join("tokenizer.json").is_file() {
            Self::from_dir(dir).map(Some)
        } else {
            Ok(None)
        }
    }

    /// The tiny byte-level tokenizer of a tiny preset, in memory (what make-checkpoint writes).
    pub fn tiny(cfg: &ModelConfig) -> Result<Self> {
        if !tiny_tokenizer_fits(cfg) {
            return Err(Error::Tokenizer(format!(
                "the tiny tokenizer needs vocab 512 with mask/eos/eot = {TINY_MASK}/{TINY_EOS}/{TINY_EOT}"
            )));
        }
        let inner: tokenizers::Tokenizer =
            tiny_tokenizer_json(cfg).parse().map_err(|e| Error::Tokenizer(format!("tiny tokenizer: {e}")))?;
        let tok_cfg: serde_json::Value =
            serde_json::from_str(&tiny_tokenizer_config_json(cfg)).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Self::from_parts(inner, cfg.arch, Some(&tok_cfg))
    }

    fn from_parts(inner: tokenizers::Tokenizer, arch: Arch, tok_cfg: Option<&serde_json::Value>) -> Result<Self> {
        let chat_template = match tok_cfg.and_then(|c| c.get("chat_template")) {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template")?.as_str().map(String::from)),
            Some(other) => {
                return Err(Error::Tokenizer(format!("tokenizer_config.json: chat_template is not a string: {other}")))
            }
        };
        let bos_token =
            tok_cfg.and_then(|c| token_field(c, "bos_token")).unwrap_or_else(|| default_bos(arch).to_string());
        let eos_token = tok_cfg.and_then(|c| token_field(c, "eos_token")).unwrap_or_default();
        Ok(Tokenizer { inner, arch, chat_template, bos_token, eos_token })
    }

    /// Token ids of `text`; `add_special` runs the tokenizer's post-processor (e.g. BOS).
    /// Special tokens written in the text (e.g. `<|eot_id|>`) map to their ids.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special).map_err(|e| Error::Tokenizer(format!("encode: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Text of `ids`; `skip_special` drops special tokens. Ids the vocabulary lacks are skipped.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(format!("decode: {e}")))
    }

    /// The prompt for one user message: the checkpoint's chat template rendered with
    /// messages = [{role: user, content}], add_generation_prompt = true, bos/eos tokens; or
    /// the architecture's built-in template when the checkpoint has none.
    pub fn apply_chat(&self, user_msg: &str) -> Result<String> {
        render_chat(
            self.chat_template.as_deref().unwrap_or(builtin_chat_template(self.arch)),
            user_msg,
            &self.bos_token,
            &self.eos_token,
        )
    }

    /// The prompt for a conversation of `(role, content)` messages (roles as the template
    /// expects them: system, user, assistant), with the generation prompt.
    pub fn apply_chat_messages(&self, messages: &[(&str, &str)]) -> Result<String> {
        render_chat_messages(
            self.chat_template.as_deref().unwrap_or(builtin_chat_template(self.arch)),
            messages,
            &self.bos_token,
            &self.eos_token,
        )
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
    /// Vocabulary size including added (special) tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
    pub fn arch(&self) -> Arch {
        self.arch
    }
    /// The checkpoint's own chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }
}

/// Renders a Hugging Face chat template (Jinja, trim_blocks + lstrip_blocks as `transformers`
/// sets them) for one user message with the generation prompt.
pub fn render_chat(template: &str, user_msg: &str, bos_token: &str, eos_token: &str) -> Result<String> {
    render_chat_messages(template, &[("user", user_msg)], bos_token, eos_token)
}

/// Renders a chat template for a whole conversation of `(role, content)` messages, with the
/// generation prompt (what an OpenAI chat request becomes).
pub fn render_chat_messages(
    template: &str,
    messages: &[(&str, &str)],
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
        Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
    });
    let tpl = env.template_from_str(template).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
    tpl.render(minijinja::context! {
        messages => messages
            .iter()
            .map(|&(role, content)| minijinja::context! { role => role, content => content })
            .collect::<Vec<_>>(),
        add_generation_prompt => true,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
}

/// Whether `cfg` can use the tiny tokenizer: vocab 512, specials at the tiny ids.
pub fn tiny_tokenizer_fits(cfg: &ModelConfig) -> bool {
    cfg.vocab == 512 && cfg.mask_id == TINY_MASK && cfg.eos_id == TINY_EOS && cfg.eot_id == TINY_EOT
}

/// The tiny tokenizer's special tokens (id, content) for an architecture; ids 256..505 are
/// `<|reserved_N|>` specials so that every id below 512 decodes to something.
pub fn tiny_special_tokens(arch: Arch) -> Vec<(u32, String)> {
    let eot = match arch {
        Arch::Llada | Arch::LladaMoe | Arch::Llada2 => "<|eot_id|>",
        Arch::Dream => "<|im_end|>",
    };
    let mut out: Vec<(u32, String)> = (256..505).map(|i| (i, format!("<|reserved_{i}|>"))).collect();
    for (id, s) in [
        (505, "<|startoftext|>"),
        (506, "<|start_header_id|>"),
        (507, "<|end_header_id|>"),
        (508, "<|im_start|>"),
        (TINY_EOT, eot),
        (TINY_EOS, "<|endoftext|>"),
        (TINY_MASK, "<|mdm_mask|>"),
    ] {
        out.push((id, s.to_string()));
    }
    out
}

/// GPT-2's byte-to-character map of byte-level BPE: printable bytes map to themselves, the
/// others to U+0100 onwards in byte order.
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 256u32;
    (0..256u32)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(c).expect("below U+0200 is valid")
        })
        .collect()
}

/// tokenizer.json of the tiny byte-level tokenizer (BPE without merges over the 256 byte
/// characters, ByteLevel pre-tokenizer and decoder, specials at 256..512).
pub fn tiny_tokenizer_json(cfg: &ModelConfig) -> String {
    let mut vocab = serde_json::Map::new();
    for (b, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), b.into());
    }
    let specials = tiny_special_tokens(cfg.arch);
    let added: Vec<serde_json::Value> = specials
        .iter()
        .map(|(id, s)| {
            vocab.insert(s.clone(), (*id).into());
            serde_json::json!({ "id": id, "content": s, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true })
        })
        .collect();
    let byte_level =
        serde_json::json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true });
    let j = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": []
        }
    });
    serde_json::to_string_pretty(&j).expect("JSON values serialise") + "\n"
}

/// Qwen2's pre-tokenization regex (Dream's DreamTokenizer copies Qwen2Tokenizer).
const QWEN2_PRETOKENIZE: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenizer.json equivalent of a slow Qwen2-style tokenizer: `vocab.json` + `merges.txt`
/// (byte-level BPE, NFC, Qwen2 pre-tokenization) plus tokenizer_config.json's
/// `added_tokens_decoder` (also put in the model vocab so they keep their ids).
fn slow_bpe_json(dir: &Path, tok_cfg: Option<&serde_json::Value>) -> Result<String> {
    let vocab_path = dir.join("vocab.json");
    let text = std::fs::read_to_string(&vocab_path).map_err(|e| Error::file(&vocab_path, e))?;
    let mut vocab: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| Error::file(&vocab_path, format!("not a JSON object: {e}")))?;
    let merges_path = dir.join("merges.txt");
    let merges: Vec<String> = std::fs::read_to_string(&merges_path)
        .map_err(|e| Error::file(&merges_path, e))?
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("#version"))
        .map(String::from)
        .collect();
    let mut added = Vec::new();
    if let Some(dec) = tok_cfg.and_then(|c| c.get("added_tokens_decoder")).and_then(|d| d.as_object()) {
        for (id, tok) in dec {
            let (Ok(id), Some(content)) = (id.parse::<u32>(), tok.get("content").and_then(|c| c.as_str())) else {
                return Err(Error::Tokenizer(format!("tokenizer_config.json: bad added_tokens_decoder entry `{id}`")));
            };
            let flag = |k: &str| tok.get(k).and_then(|v| v.as_bool()).unwrap_or(false);
            vocab.insert(content.to_string(), id.into());
            added.push(serde_json::json!({ "id": id, "content": content, "single_word": flag("single_word"),
                "lstrip": flag("lstrip"), "rstrip": flag("rstrip"), "normalized": flag("normalized"),
                "special": flag("special") }));
        }
    }
    added.sort_by_key(|t| t["id"].as_u64());
    let no_regex = serde_json::json!({ "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": false, "use_regex": false });
    let j = serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": { "type": "NFC" },
        "pre_tokenizer": { "type": "Sequence", "pretokenizers": [
            { "type": "Split", "pattern": { "Regex": QWEN2_PRETOKENIZE }, "behavior": "Isolated", "invert": false },
            no_regex,
        ] },
        "post_processor": null,
        "decoder": no_regex,
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab, "merges": merges
        }
    });
    Ok(j.to_string())
}

/// tokenizer_config.json of the tiny tokenizer, with the architecture's chat template.
pub fn tiny_tokenizer_config_json(cfg: &ModelConfig) -> String {
    let specials = tiny_special_tokens(cfg.arch);
    let name = |id: u32| specials.iter().find(|(i, _)| *i == id).map(|(_, s)| s.clone());
    let bos = match cfg.arch {
        Arch::Llada | Arch::LladaMoe | Arch::Llada2 => serde_json::Value::from("<|startoftext|>"),
        Arch::Dream => serde_json::Value::Null,
    };
    let j = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": name(TINY_EOS),
        "pad_token": name(TINY_EOS),
        "mask_token": name(TINY_MASK),
        "model_max_length": cfg.max_seq_len,
        "clean_up_tokenization_spaces": false,
        "chat_template": builtin_chat_template(cfg.arch),
    });
    serde_json::to_string_pretty(&j).expect("JSON values serialise") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_chars_is_a_bijection_like_gpt2() {
        let c = byte_chars();
        assert_eq!(c[b'!' as usize], '!');
        assert_eq!(c[0], '\u{100}');
        assert_eq!(c[b' ' as usize], '\u{120}'); // GPT-2's 'Ġ'
        let set: std::collections::HashSet<char> = c.iter().copied().collect();
        assert_eq!(set.len(), 256);
    }

    #[test]
    fn tiny_specials_and_bytes() {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let t = Tokenizer::tiny(&cfg).unwrap();
        assert_eq!(t.vocab_size(), 512);
        assert_eq!(t.token_to_id("<|mdm_mask|>"), Some(TINY_MASK));
        assert_eq!(t.token_to_id("<|eot_id|>"), Some(TINY_EOT));
        assert_eq!(t.encode("Az", false).unwrap(), vec![65, 122]);
        assert_eq!(t.encode("a<|endoftext|>", false).unwrap(), vec![97, TINY_EOS]);
        assert_eq!(t.decode(&[104, 105, TINY_EOS], true).unwrap(), "hi");
        assert_eq!(t.decode(&[104, 105, TINY_EOS], false).unwrap(), "hi<|endoftext|>");
    }

    #[test]
    fn llada_template_trims_and_prepends_bos() {
        let s = render_chat(LLADA_CHAT_TEMPLATE, "  hi  ", "<BOS>", "").unwrap();
        assert_eq!(s, "<BOS><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    }

    #[test]
    fn slow_qwen2_files_load() {
        let dir = std::env::temp_dir().join(format!("demask-slow-tok-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let chars = byte_chars();
        let mut vocab: serde_json::Map<String, serde_json::Value> =
            chars.iter().enumerate().map(|(i, c)| (c.to_string(), i.into())).collect();
        // Merges: "h e" -> "he", "he llo"... and "Ġ w" (space + w).
        for (i, t) in ["he", "ll", "llo", "hello", "\u{120}w"].iter().enumerate() {
            vocab.insert(t.to_string(), (256 + i).into());
        }
        std::fs::write(dir.join("vocab.json"), serde_json::Value::Object(vocab).to_string()).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nh e\nl l\nll o\nhe llo\n\u{120} w\n").unwrap();
        let cfg = serde_json::json!({
            "added_tokens_decoder": {
                "300": { "content": "<|endoftext|>", "special": true },
                "302": { "content": "<|im_end|>", "special": true },
                "301": { "content": "<|im_start|>", "special": true },
            },
            "eos_token": "<|endoftext|>",
        });
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let t = Tokenizer::from_dir(&dir).unwrap();
        assert_eq!(t.arch(), Arch::Dream, "<|im_start|> means Qwen/Dream");
        let ids = t.encode("hello world<|im_end|>", false).unwrap();
        assert_eq!(ids, vec![259, 260, b'o' as u32, b'r' as u32, b'l' as u32, b'd' as u32, 302]);
        assert_eq!(t.decode(&ids, false).unwrap(), "hello world<|im_end|>");
        assert_eq!(t.decode(&ids, true).unwrap(), "hello world");
        assert_eq!(t.token_to_id("<|im_start|>"), Some(301));
        assert!(t.apply_chat("hi").unwrap().starts_with("<|im_start|>system"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
