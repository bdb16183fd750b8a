//! The event stream of a `stream: true` request (server-sent events): one chunk per finished
//! block per choice, the usage chunk when asked for, then `[DONE]`.
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

use super::api::{ApiError, Parsed};
use super::text::{self, TextStream};
use super::worker::Event;
use super::{demask_info, now_secs, object_name, request_id, Kind, Shared};

/// One choice's stream state.
struct ChoiceStream {
    text: TextStream,
    role_sent: bool,
    done: bool,
    completion_tokens: usize,
}

type Merged = stream::SelectAll<stream::BoxStream<'static, (usize, Event)>>;

/// The event stream of one streaming request: chunks as its choices' blocks finish, then the
/// usage chunk (when asked for) and `[DONE]`. It ends as soon as every choice has ended, which
/// drops the receivers; a choice still decoding (stopped early by a stop string) is then
/// cancelled by the engine thread.
struct SseState {
    s: Shared,
    kind: Kind,
    id: String,
    created: u64,
    merged: Merged,
    /// Each choice's `Job::ended`.
    ended: Vec<Arc<AtomicU64>>,
    choices: Vec<ChoiceStream>,
    queue: std::collections::VecDeque<SseEvent>,
    finished: bool,
    include_usage: bool,
    prompt_tokens: usize,
    info: Value,
}

impl SseState {
    async fn next_event(&mut self) -> Option<SseEvent> {
        loop {
            if let Some(e) = self.queue.pop_front() {
                return Some(e);
            }
            if self.finished {
                return None;
            }
            match self.merged.next().await {
                Some((i, ev)) => self.on_event(i, ev),
                None => {
                    // Every sender is gone without a final event (the engine thread stopped).
                    for c in self.choices.iter_mut().filter(|c| !c.done) {
                        c.done = true;
                        let err = ApiError::status(StatusCode::INTERNAL_SERVER_ERROR, "engine_error", "the engine dropped the request");
                        self.queue.push_back(SseEvent::default().data(err.body().to_string()));
                    }
                    self.finish();
                }
            }
        }
    }

    fn chunk(&self, choice: Value) -> SseEvent {
        let body = json!({ "id": self.id, "object": object_name(self.kind, true), "created": self.created,
                           "model": self.s.ctx.model_name, "choices": [choice] });
        SseEvent::default().data(body.to_string())
    }

    /// A choice's delta chunk (`text` new text, `ids` new token ids, `extra` the `demask` object).
    fn delta(&mut self, i: usize, text: String, ids: Vec<u32>, finish: Option<&str>, mut extra: Value) -> SseEvent {
        extra["tokens"] = json!(ids);
        let v = match self.kind {
            Kind::Completion => json!({ "index": i, "text": text, "logprobs": null, "finish_reason": finish, "demask": extra }),
            Kind::Chat => {
                let mut d = json!({ "content": text });
                if !self.choices[i].role_sent {
                    d["role"] = json!("assistant");
                    self.choices[i].role_sent = true;
                }
                json!({ "index": i, "delta": d, "logprobs": null, "finish_reason": finish, "demask": extra })
            }
        };
        self.chunk(v)
    }

    fn on_event(&mut self, i: usize, ev: Event) {
        if self.choices[i].done {
            return;
        }
        match ev {
            Event::Queued => {}
            Event::Canvas { step, tokens } => {
                let canvas = text::render_canvas(&tokens, self.s.ctx.cfg.mask_id, self.s.ctx.tok.as_deref());
                let e = self.delta(i, String::new(), Vec::new(), None, json!({ "step": step, "canvas": canvas, "canvas_ids": tokens }));
                self.queue.push_back(e);
            }
            Event::Blocks { tokens } => {
                let d = self.choices[i].text.push(&tokens, false);
                let finish = self.choices[i].text.finish;
                if !d.text.is_empty() || !d.ids.is_empty() || finish.is_some() {
                    let e = self.delta(i, d.text, d.ids, finish, json!({}));
                    self.queue.push_back(e);
                }
                // EOS or a stop string ended the text: the rest of the decode is not needed
                // (the engine thread cancels it when this stream drops its receivers, and counts
                // it as finished through `ended`).
                if finish.is_some() {
                    let eos = [self.s.ctx.cfg.eos_id, self.s.ctx.cfg.eot_id];
                    let n = tokens.iter().take_while(|t| !eos.contains(t)).count();
                    self.choices[i].completion_tokens = n;
                    self.ended[i].store(n as u64, Relaxed);
                    self.choices[i].done = true;
                }
            }
            Event::Done(o) => {
                let d = self.choices[i].text.push(&o.tokens, true);
                self.choices[i].completion_tokens = o.generated_tokens;
                let finish = self.choices[i].text.finish.or(Some("length"));
                let e = self.delta(i, d.text, d.ids, finish, json!({ "steps": o.steps, "decode_ms": o.total_ms }));
                self.queue.push_back(e);
                self.choices[i].done = true;
            }
            Event::Failed(e) => {
                self.queue.push_back(SseEvent::default().data(ApiError::from_engine(&e).body().to_string()));
                self.choices[i].done = true;
            }
        }
        if self.choices.iter().all(|c| c.done) {
            self.finish();
        }
    }

    fn finish(&mut self) {
        if self.include_usage {
            let n = self.choices.len();
            let completion: usize = self.choices.iter().map(|c| c.completion_tokens).sum();
            let body = json!({ "id": self.id, "object": object_name(self.kind, true), "created": self.created,
                               "model": self.s.ctx.model_name, "choices": [],
                               "usage": { "prompt_tokens": self.prompt_tokens * n, "completion_tokens": completion,
                                          "total_tokens": self.prompt_tokens * n + completion },
                               "demask": self.info });
            self.queue.push_back(SseEvent::default().data(body.to_string()));
        }
        self.queue.push_back(SseEvent::default().data("[DONE]"));
        self.finished = true;
    }
}

pub(super) fn stream_response(
    s: Shared,
    p: Parsed,
    rxs: Vec<UnboundedReceiver<Event>>,
    ended: Vec<Arc<AtomicU64>>,
    kind: Kind,
) -> Sse<impl Stream<Item = std::result::Result<SseEvent, std::convert::Infallible>>> {
    let merged = stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        stream::unfold(rx, move |mut rx| async move { rx.recv().await.map(|e| ((i, e), rx)) }).boxed()
    }));
    let choices = p
        .reqs
        .iter()
        .map(|_| ChoiceStream {
            text: TextStream::new(s.ctx.tok.clone(), &s.ctx.cfg, p.stop.clone()),
            role_sent: false,
            done: false,
            completion_tokens: 0,
        })
        .collect();
    let state = SseState {
        id: request_id(if kind == Kind::Chat { "chatcmpl" } else { "cmpl" }),
        created: now_secs(),
        kind,
        merged,
        ended,
        choices,
        queue: Default::default(),
        finished: false,
        include_usage: p.include_usage,
        prompt_tokens: p.prompt_tokens,
        info: demask_info(&p),
        s,
    };
    let events = stream::unfold(state, |mut st| async move { st.next_event().await.map(|e| (Ok(e), st)) });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}
