//! `demask serve`: an OpenAI-compatible HTTP server over one [`Engine`].
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (the checkpoint's chat template),
//!   `stream: true` as server-sent events: a dLLM finalises text block by block, so each event
//!   carries the text of the blocks that finished (`stream_canvas: true` adds every step's
//!   canvas); `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).
//! - The engine runs on its own thread ([`worker`]); HTTP runs on a tokio runtime. Requests join
//!   and leave the batch at step boundaries; admission is by the engine's KV budget, and a
//!   queue limit answers 429 beyond it. A client that disconnects cancels its request.
//! - A request's tokens do not depend on its neighbours, so a served result equals
//!   `demask generate` with the same settings (tests/serve_load.rs checks it).
//! - Every refusal is an OpenAI-style error body naming the field; with an API key, `/v1/*`
//!   needs `Authorization: Bearer KEY`.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use crate::cache::CacheScheme;
use crate::decode::Policy;
use crate::engine::{Engine, Output};
use crate::error::{Error, Result};

pub mod api;
pub mod client;
pub mod loadgen;
pub mod metrics;
mod sse;
pub mod text;
pub mod worker;

use api::{ApiError, Ctx, Parsed};
use text::TextStream;
use metrics::{Metrics, Outcome};
use worker::{Event, Job};

/// Whether an engine error is the client's fault (HTTP 400) rather than the server's.
pub fn is_client_error(e: &Error) -> bool {
    matches!(e, Error::BadInput(_) | Error::Tokenizer(_))
}

/// How the server listens and what it allows.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub addr: SocketAddr,
    /// The name `/v1/models` lists and requests' `model` must match (when given).
    pub model_name: String,
    /// Requests to `/v1/*` need `Authorization: Bearer <key>`.
    pub api_key: Option<String>,
    /// Most requests waiting to join the batch; more get HTTP 429.
    pub max_queue: usize,
    /// Largest request body, bytes (HTTP 413 beyond).
    pub max_body: usize,
    /// A client has this long to send its whole body (HTTP 408 after).
    pub body_timeout: Duration,
    pub default_policy: Policy,
    pub default_cache: CacheScheme,
    pub default_block_len: u32,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            model_name: "demask".into(),
            api_key: None,
            max_queue: 1024,
            max_body: 4 << 20,
            body_timeout: Duration::from_secs(30),
            default_policy: crate::engine::DEFAULT_POLICY,
            default_cache: CacheScheme::None,
            default_block_len: 32,
        }
    }
}

pub(crate) struct AppState {
    jobs: Mutex<SyncSender<Job>>,
    /// False once the engine thread has ended (returned or panicked).
    engine_alive: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    ctx: Ctx,
    opts: ServeOptions,
}

pub(crate) type Shared = Arc<AppState>;

/// A running server: its address, its metrics, and how to stop it.
pub struct ServerHandle {
    pub addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// Stops accepting, lets open requests finish, and joins the server and engine threads.
    pub fn shutdown(mut self) {
        self.stop();
    }
    fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A non-blocking listener on `addr` (port 0: any free port) and the address it got.
fn bind(addr: SocketAddr) -> Result<(std::net::TcpListener, SocketAddr)> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|e| Error::bad_input(format!("cannot listen on {addr}: {e}")))?;
    listener.set_nonblocking(true).map_err(|e| Error::bad_input(format!("listener: {e}")))?;
    let bound = listener.local_addr().map_err(|e| Error::bad_input(format!("listener: {e}")))?;
    Ok((listener, bound))
}

/// Binds `opts.addr` (port 0: any free port) and serves on background threads; returns once
/// the socket listens.
pub fn spawn(engine: Engine, opts: ServeOptions) -> Result<ServerHandle> {
    let (listener, addr) = bind(opts.addr)?;
    let (app, metrics, engine_thread) = app(engine, opts)?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("demask-http".into())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("demask-http")
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                let _ = axum::serve(listener, app)
                    .with_graceful_shutdown(async move {
                        let _ = rx.await;
                    })
                    .await;
            });
            // The router (and with it the job sender) is gone: the engine thread drains and ends.
            let _ = engine_thread.join();
        })
        .map_err(|e| Error::bad_input(format!("cannot start the server thread: {e}")))?;
    Ok(ServerHandle { addr, metrics, shutdown: Some(tx), thread: Some(thread) })
}

/// Serves until Ctrl-C (then finishes open requests and returns).
pub fn serve_forever(engine: Engine, opts: ServeOptions) -> Result<()> {
    let (listener, addr) = bind(opts.addr)?;
    let name = opts.model_name.clone();
    let (app, _metrics, engine_thread) = app(engine, opts)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("demask-http")
        .build()
        .map_err(|e| Error::bad_input(format!("tokio runtime: {e}")))?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| Error::bad_input(format!("listener: {e}")))?;
        eprintln!("serving `{name}` on http://{addr} (OpenAI API under /v1; Ctrl-C stops)");
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
                eprintln!("demask serve: stopping (finishing open requests)");
            })
            .await
            .map_err(|e| Error::bad_input(format!("server: {e}")))
    })?;
    let _ = engine_thread.join();
    Ok(())
}

/// The router over an engine thread.
fn app(engine: Engine, opts: ServeOptions) -> Result<(Router, Arc<Metrics>, std::thread::JoinHandle<()>)> {
    let metrics = Arc::new(Metrics::default());
    let ctx = Ctx {
        model_name: opts.model_name.clone(),
        cfg: engine.config().clone(),
        tok: engine.shared_tokenizer(),
        default_policy: opts.default_policy,
        default_cache: opts.default_cache,
        default_block_len: opts.default_block_len,
    };
    // The channel is bounded by the queue limit; admission below keeps it from filling.
    let (tx, rx) = std::sync::mpsc::sync_channel::<Job>(opts.max_queue.max(1) + api::MAX_N as usize);
    let m = metrics.clone();
    let engine_alive = Arc::new(AtomicBool::new(true));
    /// Marks the engine thread gone however it ends.
    struct Alive(Arc<AtomicBool>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0.store(false, Relaxed);
        }
    }
    let alive = Alive(engine_alive.clone());
    let engine_thread = std::thread::Builder::new()
        .name("demask-engine".into())
        .spawn(move || {
            let _alive = alive;
            worker::run(engine, rx, m)
        })
        .map_err(|e| Error::bad_input(format!("cannot start the engine thread: {e}")))?;
    let state = Arc::new(AppState { jobs: Mutex::new(tx), engine_alive, metrics: metrics.clone(), ctx, opts });
    let v1 = Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), auth));
    let router = Router::new()
        .merge(v1)
        .route("/health", get(health))
        .route("/metrics", get(metrics_text))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state);
    Ok((router, metrics, engine_thread))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

async fn auth(State(s): State<Shared>, req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    if let Some(key) = &s.opts.api_key {
        let given = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        // "Bearer" is case-insensitive (RFC 7235); the key is compared in constant time.
        let token = given.get(..7).filter(|p| p.eq_ignore_ascii_case("bearer ")).map(|_| given[7..].trim());
        if !token.is_some_and(|t| same_secret(t.as_bytes(), key.as_bytes())) {
            s.metrics.count(Outcome::Invalid);
            return ApiError::status(
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "missing or wrong API key: send `Authorization: Bearer <key>`",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Byte strings equal, in time that depends only on their lengths.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn method_not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> Response {
    ApiError::status(StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed", format!("{method} is not allowed on {}", uri.path()))
        .into_response()
}

async fn not_found(uri: axum::http::Uri) -> Response {
    ApiError::status(StatusCode::NOT_FOUND, "not_found", format!("no route {uri}: see /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics"))
        .into_response()
}

async fn health(State(s): State<Shared>) -> Response {
    if s.engine_alive.load(Relaxed) {
        Json(json!({ "status": "ok", "model": s.ctx.model_name })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "status": "engine down" }))).into_response()
    }
}

async fn metrics_text(State(s): State<Shared>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], s.metrics.render(&s.ctx.model_name)).into_response()
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [{ "id": s.ctx.model_name, "object": "model", "created": now_secs(), "owned_by": "demask",
                   "demask": { "arch": format!("{:?}", s.ctx.cfg.arch), "context": s.ctx.cfg.max_seq_len,
                               "vocab": s.ctx.cfg.vocab, "tokenizer": s.ctx.tok.is_some() } }]
    }))
}

pub(crate) fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub(crate) fn request_id(prefix: &str) -> String {
    use std::sync::atomic::AtomicU64;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Relaxed);
    format!("{prefix}-{:x}{:06x}", now_secs(), n)
}

/// Reads the whole body within the size and time limits.
async fn read_body(s: &AppState, body: Body) -> Result<axum::body::Bytes, ApiError> {
    match tokio::time::timeout(s.opts.body_timeout, axum::body::to_bytes(body, s.opts.max_body)).await {
        Err(_) => Err(ApiError::status(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            format!("the request body did not arrive within {:.1} s", s.opts.body_timeout.as_secs_f64()),
        )),
        Ok(Err(e)) => {
            let too_big = std::error::Error::source(&e).is_some_and(|c| c.to_string().contains("length limit"))
                || e.to_string().contains("length limit");
            Err(if too_big {
                ApiError::status(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the request body exceeds {} bytes", s.opts.max_body),
                )
            } else {
                ApiError::bad(None, format!("reading the request body: {e}"))
            })
        }
        Ok(Ok(b)) => Ok(b),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Completion,
    Chat,
}

async fn completions(State(s): State<Shared>, body: Body) -> Response {
    let parsed = async {
        let bytes = read_body(&s, body).await?;
        let v = api::parse_json(&bytes)?;
        let b: api::CompletionBody = api::fields(&v)?;
        let c: api::Common = api::fields(&v)?;
        let prompt = api::completion_prompt(&b, &s.ctx)?;
        api::build(&c, prompt, c.max_tokens, "max_tokens", false, &s.ctx)
    }
    .await;
    respond(s, parsed, Kind::Completion).await
}

async fn chat(State(s): State<Shared>, body: Body) -> Response {
    let parsed = async {
        let bytes = read_body(&s, body).await?;
        let v = api::parse_json(&bytes)?;
        let b: api::ChatBody = api::fields(&v)?;
        let c: api::Common = api::fields(&v)?;
        let prompt = api::chat_prompt(&b, &s.ctx)?;
        let (max, field) = match (b.max_completion_tokens, c.max_tokens) {
            (Some(m), _) => (Some(m), "max_completion_tokens"),
            (None, m) => (m, "max_tokens"),
        };
        api::build(&c, prompt, max, field, true, &s.ctx)
    }
    .await;
    respond(s, parsed, Kind::Chat).await
}

/// Queues a parsed request's choices, then answers with one JSON body or an event stream.
async fn respond(s: Shared, parsed: Result<Parsed, ApiError>, kind: Kind) -> Response {
    let p = match parsed {
        Ok(p) => p,
        Err(e) => {
            s.metrics.count(Outcome::Invalid);
            return e.into_response();
        }
    };
    let n = p.reqs.len();
    // Admission: the queue limit (the KV budget is the engine's: requests wait for rows).
    let depth = s.metrics.queue_depth.fetch_add(n as u64, Relaxed);
    if depth as usize + n > s.opts.max_queue {
        s.metrics.queue_depth.fetch_sub(n as u64, Relaxed);
        s.metrics.count(Outcome::Rejected);
        return ApiError::status(
            StatusCode::TOO_MANY_REQUESTS,
            "queue_full",
            format!("the server's queue is full ({} requests waiting, limit {}); retry later", depth, s.opts.max_queue),
        )
        .into_response();
    }
    let mut rxs = Vec::with_capacity(n);
    let mut ended = Vec::with_capacity(n);
    for (i, req) in p.reqs.iter().cloned().enumerate() {
        let (tx, rx) = unbounded_channel();
        let flag = Arc::new(AtomicU64::new(worker::NOT_ENDED));
        let job = Job { req, stream: p.stream, canvas: p.canvas, tx, ended: flag.clone() };
        let sent = s.jobs.lock().map_err(|_| ()).and_then(|j| j.send(job).map_err(|_| ()));
        if sent.is_err() {
            // This choice and the ones after it never reached the engine thread.
            s.metrics.queue_depth.fetch_sub((n - i) as u64, Relaxed);
            s.metrics.count(Outcome::Failed);
            return ApiError::status(StatusCode::SERVICE_UNAVAILABLE, "engine_down", "the engine thread has stopped")
                .into_response();
        }
        rxs.push(rx);
        ended.push(flag);
    }
    // The engine's own checks answer first (Queued or Failed) for every choice.
    for rx in rxs.iter_mut() {
        match rx.recv().await {
            Some(Event::Queued) => {}
            Some(Event::Failed(e)) => return ApiError::from_engine(&e).into_response(),
            _ => return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", "the engine dropped the request").into_response(),
        }
    }
    s.metrics.prompt_tokens.fetch_add((p.prompt_tokens * n) as u64, Relaxed);
    if p.stream {
        sse::stream_response(s, p, rxs, ended, kind).into_response()
    } else {
        whole_response(s, p, rxs, kind).await
    }
}

/// The response's `demask` object: what the request decoded with.
pub(crate) fn demask_info(p: &Parsed) -> Value {
    json!({
        "gen_len": p.gen_len, "block_len": p.block_len, "policy": p.policy.to_string(),
        "cache": p.cache.to_string(), "note": p.note,
    })
}

pub(crate) fn object_name(kind: Kind, chunk: bool) -> &'static str {
    match (kind, chunk) {
        (Kind::Completion, _) => "text_completion",
        (Kind::Chat, false) => "chat.completion",
        (Kind::Chat, true) => "chat.completion.chunk",
    }
}

async fn whole_response(s: Shared, p: Parsed, mut rxs: Vec<UnboundedReceiver<Event>>, kind: Kind) -> Response {
    let mut choices = Vec::with_capacity(rxs.len());
    let mut completion_tokens = 0;
    for (i, rx) in rxs.iter_mut().enumerate() {
        let out: Output = loop {
            match rx.recv().await {
                Some(Event::Done(o)) => break *o,
                Some(Event::Failed(e)) => return ApiError::from_engine(&e).into_response(),
                Some(_) => continue,
                None => {
                    return ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", "the engine dropped the request")
                        .into_response()
                }
            }
        };
        let mut ts = TextStream::new(s.ctx.tok.clone(), &s.ctx.cfg, p.stop.clone());
        let d = ts.push(&out.tokens, true);
        let finish = ts.finish.unwrap_or("length");
        completion_tokens += out.generated_tokens;
        let extra = json!({ "tokens": d.ids, "steps": out.steps, "decode_ms": out.total_ms });
        choices.push(match kind {
            Kind::Completion => json!({ "index": i, "text": ts.text(), "logprobs": null, "finish_reason": finish, "demask": extra }),
            Kind::Chat => json!({ "index": i, "message": { "role": "assistant", "content": ts.text() },
                                  "logprobs": null, "finish_reason": finish, "demask": extra }),
        });
    }
    Json(json!({
        "id": request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        "object": object_name(kind, false),
        "created": now_secs(),
        "model": s.ctx.model_name,
        "choices": choices,
        "usage": { "prompt_tokens": p.prompt_tokens * rxs.len(), "completion_tokens": completion_tokens,
                   "total_tokens": p.prompt_tokens * rxs.len() + completion_tokens },
        "demask": demask_info(&p),
    }))
    .into_response()
}
