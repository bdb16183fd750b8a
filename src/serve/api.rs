//! The OpenAI request bodies demask accepts, how they map to [`Request`]s, and the error
//! body every refusal carries.
//!
//! OpenAI fields: `model`, `prompt` / `messages`, `max_tokens` (chat also
//! `max_completion_tokens`), `temperature`, `top_p`, `seed`, `stop`, `n`, `stream`,
//! `stream_options.include_usage`. demask's own, as extension fields: `top_k`, `policy`,
//! `block_len`, `cache`, `prior`, `steps`, `stop_at_eos`, `stream_canvas`. `max_tokens` becomes
//! the gen length rounded up to a multiple of the block length (the response says so).
use std::sync::Arc;

use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cache::CacheScheme;
use crate::config::ModelConfig;
use crate::decode::prior::Prior;
use crate::decode::sampling::Sampling;
use crate::decode::Policy;
use crate::engine::Request;
use crate::error::Error;
use crate::tokenizer::Tokenizer;

/// Most choices one request may ask for.
pub const MAX_N: u32 = 16;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// `max_tokens` when a completion request gives none (OpenAI's default).
pub const DEFAULT_COMPLETION_TOKENS: u32 = 16;
/// `max_tokens` when a chat request gives none.
pub const DEFAULT_CHAT_TOKENS: u32 = 128;

/// An HTTP error with an OpenAI-style body:
/// `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn bad(param: impl Into<Option<String>>, message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into(), param: param.into(), code: None }
    }
    pub fn field(param: &str, message: impl Into<String>) -> Self {
        Self::bad(Some(param.to_string()), message)
    }
    pub fn status(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), param: None, code: Some(code) }
    }
    /// The engine's refusal or failure: client errors (bad input, tokenizer) are 400.
    pub fn from_engine(e: &Error) -> Self {
        if super::is_client_error(e) {
            Self::bad(None, e.to_string())
        } else {
            Self::status(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", e.to_string())
        }
    }
    pub fn kind(&self) -> &'static str {
        match self.status.as_u16() {
            401 => "authentication_error",
            404 => "not_found_error",
            429 => "rate_limit_error",
            500..=599 => "server_error",
            _ => "invalid_request_error",
        }
    }
    pub fn body(&self) -> Value {
        json!({ "error": { "message": self.message, "type": self.kind(), "param": self.param, "code": self.code } })
    }
}

/// `prompt`: a string, or token ids; a list of one of either.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum PromptField {
    Text(String),
    Ids(Vec<i64>),
    Texts(Vec<String>),
    IdLists(Vec<Vec<i64>>),
}

/// `stop`: a string or a list of strings.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum StopField {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints.
#[derive(Deserialize, Debug, Default)]
pub struct Common {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub seed: Option<u64>,
    pub stop: Option<StopField>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: Option<bool>,
    pub stream_options: Option<StreamOptions>,
    // Not supported by a diffusion decoder: refused when set to anything but the default.
    pub logprobs: Option<Value>,
    pub top_logprobs: Option<Value>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Value>,
    pub user: Option<String>,
    // demask's extension fields.
    pub top_k: Option<i64>,
    pub policy: Option<String>,
    pub block_len: Option<i64>,
    pub cache: Option<String>,
    pub prior: Option<String>,
    pub steps: Option<i64>,
    pub stop_at_eos: Option<bool>,
    pub stream_canvas: Option<bool>,
}

/// `POST /v1/completions`.
#[derive(Deserialize, Debug)]
pub struct CompletionBody {
    pub prompt: PromptField,
    pub echo: Option<bool>,
    pub suffix: Option<String>,
    pub best_of: Option<i64>,
}

/// A chat message's `content`: text, or a list of parts of which only text parts are taken.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<Value>),
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

/// `POST /v1/chat/completions`.
#[derive(Deserialize, Debug)]
pub struct ChatBody {
    pub messages: Vec<Message>,
    pub max_completion_tokens: Option<i64>,
    pub tools: Option<Value>,
    pub functions: Option<Value>,
    pub response_format: Option<Value>,
}

/// Parses a request body: a JSON object.
pub fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::bad(None, "the request body is empty: send a JSON object"));
    }
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad(None, format!("the request body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::bad(None, "the request body must be a JSON object"));
    }
    Ok(v)
}

/// Reads typed fields out of a body, naming the field a type error is about (unknown fields
/// are ignored, as OpenAI's servers do).
pub fn fields<T: serde::de::DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let msg = e.into_inner().to_string();
        // A missing field reports the path of its parent; name the field itself.
        let param = match msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
            Some(f) if path == "." => Some(f.to_string()),
            Some(f) => Some(format!("{path}.{f}")),
            None if path == "." || path.is_empty() => None,
            None => Some(path.clone()),
        };
        let at = param.as_deref().map(|p| format!("`{p}`: ")).unwrap_or_default();
        ApiError::bad(param, format!("{at}{msg}"))
    })
}

/// The server's fixed facts and defaults that every request is checked against.
pub struct Ctx {
    pub model_name: String,
    pub cfg: ModelConfig,
    pub tok: Option<Arc<Tokenizer>>,
    pub default_policy: Policy,
    pub default_cache: CacheScheme,
    pub default_block_len: u32,
}

/// A request checked and turned into the engine's terms.
#[derive(Debug)]
pub struct Parsed {
    /// One engine request per choice (`n`).
    pub reqs: Vec<Request>,
    pub prompt_tokens: usize,
    pub stream: bool,
    pub include_usage: bool,
    pub canvas: bool,
    pub stop: Vec<String>,
    /// What the request decodes with (reported in the response's `demask` object).
    pub gen_len: u32,
    pub block_len: u32,
    pub policy: Policy,
    pub cache: CacheScheme,
    /// Says how `max_tokens` was rounded, when it was.
    pub note: Option<String>,
}

fn refuse_unsupported(c: &Common) -> Result<(), ApiError> {
    let unsupported = |f: &str| ApiError::field(f, format!("`{f}` is not supported by demask's diffusion decoder"));
    if c.logprobs.as_ref().is_some_and(|v| !(v.is_null() || v == &Value::Bool(false))) {
        return Err(unsupported("logprobs"));
    }
    if c.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(unsupported("top_logprobs"));
    }
    for (f, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|x| x != 0.0) {
            return Err(unsupported(f));
        }
    }
    if c.logit_bias.as_ref().is_some_and(|v| !(v.is_null() || v.as_object().is_some_and(|o| o.is_empty()))) {
        return Err(unsupported("logit_bias"));
    }
    Ok(())
}

fn check_model(c: &Common, ctx: &Ctx) -> Result<(), ApiError> {
    match c.model.as_deref() {
        None => Ok(()),
        Some(m) if m == ctx.model_name => Ok(()),
        Some(m) => Err(ApiError {
            code: Some("model_not_found"),
            ..ApiError::field("model", format!("model `{m}` is not served here; this server serves `{}`", ctx.model_name))
        }),
    }
}

fn check_ids(ids: &[i64], vocab: usize) -> Result<Vec<u32>, ApiError> {
    ids.iter()
        .map(|&t| {
            u32::try_from(t).ok().filter(|&u| (u as usize) < vocab).ok_or_else(|| {
                ApiError::field("prompt", format!("token id {t} is out of the vocabulary (0..{vocab})"))
            })
        })
        .collect()
}

fn tokenizer<'a>(ctx: &'a Ctx, what: &str) -> Result<&'a Tokenizer, ApiError> {
    ctx.tok.as_deref().ok_or_else(|| {
        ApiError::bad(None, format!("{what} needs a tokenizer and this model has none: send `prompt` as token ids"))
    })
}

/// The prompt ids of a completion request.
pub fn completion_prompt(b: &CompletionBody, ctx: &Ctx) -> Result<Vec<u32>, ApiError> {
    if b.echo == Some(true) {
        return Err(ApiError::field("echo", "`echo` is not supported"));
    }
    if b.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::field("suffix", "`suffix` is not supported"));
    }
    if b.best_of.is_some_and(|n| n != 1) {
        return Err(ApiError::field("best_of", "`best_of` is not supported (use `n`)"));
    }
    let one = "one prompt per request: send a list of prompts as separate requests";
    let text = |t: &str| -> Result<Vec<u32>, ApiError> {
        tokenizer(ctx, "a text prompt")?.encode(t, true).map_err(|e| ApiError::field("prompt", e.to_string()))
    };
    match &b.prompt {
        PromptField::Text(t) => text(t),
        PromptField::Ids(ids) => check_ids(ids, ctx.cfg.vocab),
        PromptField::Texts(v) if v.len() == 1 => text(&v[0]),
        PromptField::IdLists(v) if v.len() == 1 => check_ids(&v[0], ctx.cfg.vocab),
        _ => Err(ApiError::field("prompt", one)),
    }
}

/// The prompt ids of a chat request: the checkpoint's chat template over the messages.
pub fn chat_prompt(b: &ChatBody, ctx: &Ctx) -> Result<Vec<u32>, ApiError> {
    if b.tools.as_ref().is_some_and(|v| !v.is_null()) || b.functions.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::field("tools", "tool calling is not supported"));
    }
    if let Some(rf) = &b.response_format {
        if rf.get("type").and_then(Value::as_str).is_some_and(|t| t != "text") {
            return Err(ApiError::field("response_format", "only `{\"type\": \"text\"}` is supported"));
        }
    }
    if b.messages.is_empty() {
        return Err(ApiError::field("messages", "`messages` must hold at least one message"));
    }
    let mut texts = Vec::with_capacity(b.messages.len());
    for (i, m) in b.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
            return Err(ApiError::field(
                &format!("messages[{i}].role"),
                format!("role `{}`: expected system, developer, user or assistant", m.role),
            ));
        }
        let text = match &m.content {
            None => String::new(),
            Some(Content::Text(t)) => t.clone(),
            Some(Content::Parts(parts)) => {
                let mut s = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::field(
                                &format!("messages[{i}].content"),
                                "only text content parts are supported",
                            ))
                        }
                    }
                }
                s
            }
        };
        // The templates know system, user and assistant.
        let role = if m.role == "developer" { "system" } else { m.role.as_str() };
        texts.push((role, text));
    }
    let tok = tokenizer(ctx, "a chat request")?;
    let msgs: Vec<(&str, &str)> = texts.iter().map(|(r, t)| (*r, t.as_str())).collect();
    let prompt = tok.apply_chat_messages(&msgs).map_err(|e| ApiError::field("messages", e.to_string()))?;
    tok.encode(&prompt, false).map_err(|e| ApiError::field("messages", e.to_string()))
}

fn positive(v: Option<i64>, field: &str) -> Result<Option<u32>, ApiError> {
    v.map(|x| {
        u32::try_from(x).ok().filter(|&u| u > 0).ok_or_else(|| ApiError::field(field, format!("`{field}` must be a positive integer, got {x}")))
    })
    .transpose()
}

/// Checks every field and builds the engine requests for a prompt of `prompt` ids.
pub fn build(c: &Common, prompt: Vec<u32>, max_tokens: Option<i64>, max_field: &str, chat: bool, ctx: &Ctx) -> Result<Parsed, ApiError> {
    check_model(c, ctx)?;
    refuse_unsupported(c)?;
    let cfg = &ctx.cfg;
    let max_tokens = positive(max_tokens, max_field)?
        .unwrap_or(if chat { DEFAULT_CHAT_TOKENS } else { DEFAULT_COMPLETION_TOKENS });
    let block_len = positive(c.block_len, "block_len")?.unwrap_or(ctx.default_block_len);
    let gen_len = max_tokens.div_ceil(block_len).saturating_mul(block_len);
    let note = (gen_len != max_tokens).then(|| {
        format!("max_tokens {max_tokens} rounded up to gen_len {gen_len}, a multiple of the block length {block_len}")
    });
    let ctx_len = cfg.max_seq_len;
    if prompt.len() >= ctx_len {
        return Err(ApiError::field(
            if chat { "messages" } else { "prompt" },
            format!("the prompt has {} tokens; the model's context is {ctx_len}", prompt.len()),
        ));
    }
    let room = ctx_len - prompt.len();
    if room < block_len as usize {
        return Err(ApiError::field(
            "block_len",
            format!(
                "the prompt ({} tokens) leaves {room} of the model's {ctx_len} context tokens, less than one block of {block_len}; \
                 lower `block_len` or shorten the prompt",
                prompt.len()
            ),
        ));
    }
    if prompt.len() + gen_len as usize > ctx_len {
        return Err(ApiError::field(
            max_field,
            format!(
                "the prompt ({} tokens) plus gen_len {gen_len} exceeds the model's context of {ctx_len} tokens; \
                 lower `{max_field}` to at most {}",
                prompt.len(),
                (ctx_len - prompt.len()) / block_len as usize * block_len as usize
            ),
        ));
    }
    let temperature = c.temperature.unwrap_or(0.0);
    if !(temperature.is_finite() && temperature >= 0.0) {
        return Err(ApiError::field("temperature", format!("`temperature` must be a finite number >= 0, got {temperature}")));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field("top_p", format!("`top_p` must lie in (0, 1], got {top_p}")));
    }
    let top_k = match c.top_k {
        None => Sampling::POLICY_TOP_K,
        Some(k) => u32::try_from(k).map_err(|_| ApiError::field("top_k", format!("`top_k` must be an integer >= 0, got {k}")))?,
    };
    let n = match c.n {
        None => 1,
        Some(n) => u32::try_from(n)
            .ok()
            .filter(|&u| (1..=MAX_N).contains(&u))
            .ok_or_else(|| ApiError::field("n", format!("`n` must lie in 1..={MAX_N}, got {n}")))?,
    };
    let stop = match &c.stop {
        None => Vec::new(),
        Some(StopField::One(s)) => vec![s.clone()],
        Some(StopField::Many(v)) => v.clone(),
    };
    if stop.len() > MAX_STOP || stop.iter().any(String::is_empty) {
        return Err(ApiError::field("stop", format!("`stop` takes at most {MAX_STOP} non-empty strings")));
    }
    let n_blocks = gen_len / block_len;
    let policy = match (&c.policy, c.steps) {
        (Some(_), Some(_)) => return Err(ApiError::field("steps", "give `policy` or `steps`, not both")),
        (Some(p), None) => p.parse::<Policy>().map_err(|e| ApiError::field("policy", e.to_string()))?,
        (None, Some(s)) => {
            let s = positive(Some(s), "steps")?.unwrap_or(1);
            if s % n_blocks != 0 {
                return Err(ApiError::field(
                    "steps",
                    format!("`steps` {s} must be a multiple of the {n_blocks} blocks of gen_len {gen_len} (block length {block_len})"),
                ));
            }
            Policy::Schedule { steps: s / n_blocks }
        }
        (None, None) => ctx.default_policy,
    };
    let cache = match &c.cache {
        Some(s) => s.parse::<CacheScheme>().map_err(|e| ApiError::field("cache", e.to_string()))?,
        None => ctx.default_cache,
    };
    let prior = c.prior.as_ref().map(|t| Prior::Template(t.clone()));
    if prior.is_some() && ctx.tok.is_none() {
        return Err(ApiError::field("prior", "a text prior needs a tokenizer and this model has none"));
    }
    let prompt_tokens = prompt.len();
    let mut base = Request::ids(prompt)
        .gen_len(gen_len)
        .block_len(block_len)
        .policy(policy)
        .sampling(Sampling { temperature: temperature as f32, top_k, top_p: top_p as f32 })
        .seed(c.seed.unwrap_or(0))
        .stop_at_eos(c.stop_at_eos.unwrap_or(true))
        .cache(cache);
    base.prior = prior;
    let reqs = (0..n).map(|i| base.clone().seq_id(i)).collect();
    Ok(Parsed {
        reqs,
        prompt_tokens,
        stream: c.stream.unwrap_or(false),
        include_usage: c.stream_options.as_ref().is_some_and(|o| o.include_usage),
        canvas: c.stream_canvas.unwrap_or(false),
        stop,
        gen_len,
        block_len,
        policy,
        cache,
        note,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (ModelConfig, Arc<Tokenizer>) {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let tok = Arc::new(Tokenizer::tiny(&cfg).unwrap());
        (cfg, tok)
    }

    fn ctx() -> Ctx {
        let (cfg, tok) = tiny();
        Ctx {
            model_name: "m".into(),
            cfg,
            tok: Some(tok),
            default_policy: Policy::Threshold { tau: 0.9 },
            default_cache: CacheScheme::None,
            default_block_len: 32,
        }
    }

    fn common(v: Value) -> Common {
        fields(&v).unwrap()
    }

    #[test]
    fn max_tokens_rounds_up_to_the_block_and_says_so() {
        let c = ctx();
        let p = build(&common(json!({"max_tokens": 50})), vec![1, 2], Some(50), "max_tokens", false, &c).unwrap();
        assert_eq!((p.gen_len, p.block_len), (64, 32));
        assert!(p.note.unwrap().contains("rounded up to gen_len 64"));
        let p = build(&common(json!({"block_len": 8, "steps": 12, "n": 3})), vec![1], Some(24), "max_tokens", false, &c).unwrap();
        assert_eq!(p.policy, Policy::Schedule { steps: 4 });
        assert_eq!(p.reqs.iter().map(|r| r.seq_id).collect::<Vec<_>>(), [0, 1, 2]);
        assert!(p.note.is_none());
    }

    #[test]
    fn bad_fields_are_named() {
        let c = ctx();
        let param = |v: Value, max: Option<i64>| {
            build(&common(v), vec![1, 2], max, "max_tokens", false, &c).unwrap_err().param.unwrap()
        };
        assert_eq!(param(json!({}), Some(0)), "max_tokens");
        assert_eq!(param(json!({"temperature": -1.0}), None), "temperature");
        assert_eq!(param(json!({"top_p": 0.0}), None), "top_p");
        assert_eq!(param(json!({"n": 17}), None), "n");
        assert_eq!(param(json!({"stop": ["a", "b", "c", "d", "e"]}), None), "stop");
        assert_eq!(param(json!({"policy": "bogus:1"}), None), "policy");
        assert_eq!(param(json!({"cache": "sometimes"}), None), "cache");
        assert_eq!(param(json!({"steps": 3, "block_len": 8}), Some(16)), "steps");
        assert_eq!(param(json!({"model": "other"}), None), "model");
        assert_eq!(param(json!({"logprobs": 2}), None), "logprobs");
        assert_eq!(param(json!({"top_k": -1}), None), "top_k");
        // The context: 1024 tokens for tiny-llada.
        assert_eq!(param(json!({}), Some(1024)), "max_tokens");
        let e = fields::<Common>(&json!({"temperature": "hot"})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("temperature"));
        let e = fields::<CompletionBody>(&json!({"max_tokens": 3})).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
