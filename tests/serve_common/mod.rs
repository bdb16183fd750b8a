//! Shared by the `demask serve` tests (tests/serve*.rs): an in-process server on a tiny random
//! checkpoint, the request settings as the server maps them, and assertions.
#![allow(dead_code)]
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use demask::serve::client::{self, HttpResponse};
use demask::serve::{ServeOptions, ServerHandle};
use demask::prelude::*;
use serde_json::{json, Value};

pub const T: Duration = Duration::from_secs(120);
pub const EOS: u32 = demask::config::TINY_EOS;
pub const EOT: u32 = demask::config::TINY_EOT;
pub const MASK: u32 = demask::config::TINY_MASK;
pub const MODEL: &str = "tiny";
pub const CTX: usize = 1024;

/// A scratch directory, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "demask-serve-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A tiny-llada checkpoint with the byte-level tokenizer.
pub fn checkpoint(tag: &str) -> Scratch {
    let s = Scratch::new(tag);
    let dir = s.0.join("ckpt");
    demask::checkpoint::write_checkpoint(&ModelConfig::preset("tiny-llada").unwrap(), 11, &dir, true, |_| {}).unwrap();
    s
}

pub fn cpu_engine(dir: &Path, max_batch: usize) -> Engine {
    Engine::load(dir, EngineOptions { device: Device::Cpu, max_batch, ..Default::default() }).unwrap()
}

/// An in-process server on a fresh tiny checkpoint.
pub struct Srv {
    pub h: ServerHandle,
    pub addr: String,
    pub key: Option<String>,
    pub ckpt: Scratch,
}

pub fn server(tag: &str, max_batch: usize, opts: ServeOptions) -> Srv {
    let ckpt = checkpoint(tag);
    let engine = cpu_engine(&ckpt.0.join("ckpt"), max_batch);
    let key = opts.api_key.clone();
    let h = demask::serve::spawn(engine, opts).unwrap();
    let addr = h.addr.to_string();
    Srv { h, addr, key, ckpt }
}

pub fn opts() -> ServeOptions {
    ServeOptions { addr: "127.0.0.1:0".parse().unwrap(), model_name: MODEL.into(), ..Default::default() }
}

impl Srv {
    pub fn dir(&self) -> PathBuf {
        self.ckpt.0.join("ckpt")
    }
    /// A second engine on the same checkpoint, for the expected results.
    pub fn engine(&self) -> Engine {
        cpu_engine(&self.dir(), 0)
    }
    pub fn tok(&self) -> Tokenizer {
        Tokenizer::from_dir(&self.dir()).unwrap()
    }
    pub fn auth(&self) -> Vec<(String, String)> {
        self.key.iter().map(|k| ("Authorization".to_string(), format!("Bearer {k}"))).collect()
    }
    pub fn raw(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        let h = self.auth();
        let hs: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        client::request(&self.addr, method, path, &hs, body, T).unwrap()
    }
    pub fn post(&self, path: &str, body: &Value) -> HttpResponse {
        self.raw("POST", path, body.to_string().as_bytes())
    }
    pub fn get(&self, path: &str) -> HttpResponse {
        self.raw("GET", path, b"")
    }
    /// A request that must succeed: its JSON body.
    #[track_caller]
    pub fn ok(&self, path: &str, body: &Value) -> Value {
        let r = self.post(path, body);
        assert_eq!(r.status, 200, "{path} {body}: {}", r.text());
        r.json().unwrap()
    }
    /// A streaming request: the response head and the `data:` payloads.
    pub fn stream(&self, path: &str, body: &Value) -> (HttpResponse, Vec<String>) {
        let h = self.auth();
        let hs: Vec<(&str, &str)> = h.iter().map(|(a, b)| (a.as_str(), b.as_str())).collect();
        let mut events = Vec::new();
        let r = client::stream(&self.addr, path, &hs, body.to_string().as_bytes(), T, |d| {
            events.push(d.to_string());
            true
        })
        .unwrap();
        (r, events)
    }
    pub fn metrics(&self) -> String {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200);
        r.text()
    }
    /// One sample of `/metrics` (`name` with its labels but `model`, e.g.
    /// `demask_requests_total{status="ok"}`).
    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.metrics(), name)
    }
}

pub fn metric(text: &str, name: &str) -> f64 {
    let key = match name.split_once('{') {
        Some((n, labels)) => format!("{n}{{model=\"{MODEL}\",{labels}"),
        None => format!("{name}{{model=\"{MODEL}\"}}"),
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&key).and_then(|v| v.strip_prefix(' ')))
        .unwrap_or_else(|| panic!("no {key} in /metrics:\n{text}"))
        .trim()
        .parse()
        .unwrap()
}

/// Polls `cond` until it holds (panics with `what` after `secs`).
#[track_caller]
pub fn wait_for(secs: u64, what: &str, mut cond: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !cond() {
        assert!(t0.elapsed() < Duration::from_secs(secs), "timed out after {secs} s waiting for: {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The settings of a request as the server maps them (api.rs::build).
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_tokens: u32,
    pub block_len: u32,
    pub temperature: f32,
    pub top_p: f32,
    pub seed: u64,
    pub policy: &'static str,
    pub cache: &'static str,
    pub stop_at_eos: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_tokens: 16,
            block_len: 8,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            policy: "schedule:4",
            cache: "none",
            stop_at_eos: false,
        }
    }
}

impl Settings {
    pub fn gen_len(&self) -> u32 {
        self.max_tokens.div_ceil(self.block_len) * self.block_len
    }
    /// The body fields (everything but the prompt).
    pub fn body(&self) -> Value {
        json!({
            "model": MODEL, "max_tokens": self.max_tokens, "block_len": self.block_len,
            "temperature": self.temperature, "top_p": self.top_p, "seed": self.seed,
            "policy": self.policy, "cache": self.cache, "stop_at_eos": self.stop_at_eos,
        })
    }
    /// The engine request of choice `seq_id`.
    pub fn request(&self, prompt: Vec<u32>, seq_id: u32) -> Request {
        Request::ids(prompt)
            .gen_len(self.gen_len())
            .block_len(self.block_len)
            .policy(self.policy.parse().unwrap())
            .sampling(Sampling { temperature: self.temperature, top_k: Sampling::POLICY_TOP_K, top_p: self.top_p })
            .seed(self.seed)
            .seq_id(seq_id)
            .stop_at_eos(self.stop_at_eos)
            .cache(self.cache.parse().unwrap())
    }
}

pub fn with(mut body: Value, extra: Value) -> Value {
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    body
}

/// The gen tokens up to the first EOS/EOT (what the server reports as `demask.tokens`).
pub fn until_eos(tokens: &[u32]) -> Vec<u32> {
    let end = tokens.iter().position(|t| *t == EOS || *t == EOT).unwrap_or(tokens.len());
    tokens[..end].to_vec()
}

pub fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array().unwrap_or_else(|| panic!("not a list of ids: {v}")).iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn chat_ids(tok: &Tokenizer, msgs: &[(&str, &str)]) -> Vec<u32> {
    tok.encode(&tok.apply_chat_messages(msgs).unwrap(), false).unwrap()
}

/// Checks a completion/chat choice against its engine output.
#[track_caller]
pub fn same_as_generate(choice: &Value, out: &Output, what: &str) {
    assert_eq!(ids_of(&choice["demask"]["tokens"]), until_eos(&out.tokens), "{what}: tokens differ from generate");
    let text = choice["text"].as_str().or(choice["message"]["content"].as_str()).unwrap();
    assert_eq!(Some(text), out.text.as_deref(), "{what}: text differs from generate");
    assert_eq!(choice["demask"]["steps"].as_u64(), Some(out.steps as u64), "{what}: steps");
    let finish = if out.tokens.iter().any(|t| *t == EOS || *t == EOT) { "stop" } else { "length" };
    assert_eq!(choice["finish_reason"], finish, "{what}: finish_reason");
}

/// A parsed event stream: the JSON chunks (the `[DONE]` sentinel checked and dropped).
#[track_caller]
pub fn chunks(r: &HttpResponse, events: &[String]) -> Vec<Value> {
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")), "{:?}", r.headers);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "the stream ends with [DONE]: {events:?}");
    assert_eq!(events.iter().filter(|e| *e == "[DONE]").count(), 1);
    events[..events.len() - 1].iter().map(|e| serde_json::from_str(e).unwrap_or_else(|err| panic!("{err}: {e}"))).collect()
}

/// Per choice index: concatenated text, concatenated token ids, finish reason, chunk count.
pub fn assemble(chunks: &[Value], n: usize) -> Vec<(String, Vec<u32>, Option<String>, usize)> {
    let mut out = vec![(String::new(), Vec::new(), None, 0); n];
    for c in chunks {
        for ch in c["choices"].as_array().unwrap() {
            let i = ch["index"].as_u64().unwrap() as usize;
            let t = ch["text"].as_str().or(ch["delta"]["content"].as_str()).unwrap_or("");
            out[i].0.push_str(t);
            out[i].1.extend(ids_of(&ch["demask"]["tokens"]));
            if let Some(f) = ch["finish_reason"].as_str() {
                assert!(out[i].2.is_none(), "choice {i} finished twice: {chunks:?}");
                out[i].2 = Some(f.to_string());
            }
            out[i].3 += 1;
        }
    }
    out
}

/// Asserts an OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`.
#[track_caller]
pub fn refused(r: &HttpResponse, status: u16, param: Option<&str>, needle: &str) -> Value {
    assert_eq!(r.status, status, "expected HTTP {status}: {}", r.text());
    let v = r.json().unwrap();
    let e = &v["error"];
    let msg = e["message"].as_str().unwrap_or_else(|| panic!("no error.message: {v}"));
    assert!(msg.contains(needle), "error message {msg:?} does not contain {needle:?}");
    let kind = match status {
        401 => "authentication_error",
        404 => "not_found_error",
        429 => "rate_limit_error",
        500..=599 => "server_error",
        _ => "invalid_request_error",
    };
    assert_eq!(e["type"], kind, "{v}");
    assert_eq!(e["param"].as_str(), param, "error.param: {v}");
    assert!(e.get("code").is_some(), "error.code present (null or a string): {v}");
    assert!(!msg.contains("panicked"), "{msg}");
    v
}

/// Reads one whole response from a raw connection (the server closes it after).
pub fn read_response(c: &mut TcpStream) -> (u16, String) {
    let mut buf = Vec::new();
    let _ = c.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, text)
}
