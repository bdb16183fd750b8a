//! The engine thread: owns the [`Engine`], takes jobs from the HTTP side, and steps while any
//! request is queued or decoding.
//!
//! Requests join and leave the running batch at step boundaries (the engine's continuous
//! batching). Each job carries an unbounded channel back to its HTTP task; a task that goes
//! away (client disconnected, stop string reached) drops its receiver, and the next boundary
//! cancels the request, which frees its cache rows. Nothing here blocks on a client.
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::metrics::{Metrics, Outcome};
use crate::engine::{Engine, Output, Request, RequestId};
use crate::error::Error;

/// What the engine thread tells a request's HTTP task.
#[derive(Debug)]
pub enum Event {
    /// The request passed the engine's checks and is queued.
    Queued,
    /// The engine refused the request (bad input: HTTP 400) or failed while decoding it.
    Failed(Error),
    /// Blocks finished so far: the gen region's tokens up to the end of the last finished
    /// block (sent when a block finishes, for streaming requests only).
    Blocks { tokens: Vec<u32> },
    /// The whole gen region after a step, masks included (`stream_canvas` requests only).
    Canvas { step: u32, tokens: Vec<u32> },
    /// The request finished.
    Done(Box<Output>),
}

/// One request for the engine thread.
pub struct Job {
    pub req: Request,
    /// Send `Blocks` events as blocks finish.
    pub stream: bool,
    /// Send a `Canvas` event after every step.
    pub canvas: bool,
    pub tx: UnboundedSender<Event>,
    /// Set by the HTTP side when it ended the choice itself (EOS or a stop string in a
    /// finished block) to the completion tokens it reported; `NOT_ENDED` otherwise. A closed
    /// channel then counts as a finished request, not a cancelled one.
    pub ended: Arc<AtomicU64>,
}

/// `Job::ended` while the HTTP side has not ended the choice.
pub const NOT_ENDED: u64 = u64::MAX;

struct Live {
    tx: UnboundedSender<Event>,
    ended: Arc<AtomicU64>,
    stream: bool,
    canvas: bool,
    /// Blocks already sent.
    blocks_sent: u32,
    /// Whether it has taken its first step (left the queue).
    started: bool,
}

/// Runs until every job sender is gone and no request is left.
pub fn run(mut engine: Engine, jobs: Receiver<Job>, m: Arc<Metrics>) {
    let mut live: HashMap<u64, Live> = HashMap::new();
    let (_, row_cap) = engine.kv_rows();
    m.kv_rows_capacity.store(row_cap as u64, Relaxed);
    m.kv_row_bytes.store(engine.kv_row_bytes(), Relaxed);
    let mut open = true;
    let mut last_mem = Instant::now();
    sample_memory(&engine, &m);
    loop {
        // Intake: block while idle, else take whatever arrived since the last step.
        if live.is_empty() {
            if !open {
                return;
            }
            match jobs.recv() {
                Ok(j) => admit(&mut engine, &mut live, &m, j),
                Err(_) => return,
            }
        }
        loop {
            match jobs.try_recv() {
                Ok(j) => admit(&mut engine, &mut live, &m, j),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    open = false;
                    break;
                }
            }
        }
        // Clients that went away: cancel at this boundary (frees their rows).
        live.retain(|&id, l| {
            if !l.tx.is_closed() {
                return true;
            }
            engine.cancel(RequestId(id));
            match l.ended.load(Relaxed) {
                NOT_ENDED => m.count(Outcome::Cancelled),
                tokens => {
                    m.count(Outcome::Ok);
                    m.generated_tokens.fetch_add(tokens, Relaxed);
                }
            }
            if l.started {
                m.active.fetch_sub(1, Relaxed);
            } else {
                m.queue_depth.fetch_sub(1, Relaxed);
            }
            false
        });
        publish_rows(&engine, &m);
        if engine.pending() + engine.active() == 0 {
            continue;
        }
        let t0 = Instant::now();
        // A plain step (a step callback would download every slot's scores); the canvases are
        // read afterwards.
        let result = engine.step();
        let finished = result.as_ref().map_or(0, Vec::len);
        let mut stepped = finished;
        for (id, c) in engine.active_canvases() {
            stepped += 1;
            let Some(l) = live.get_mut(&id.0) else { continue };
            if !l.started {
                l.started = true;
                m.queue_depth.fetch_sub(1, Relaxed);
                m.active.fetch_add(1, Relaxed);
            }
            if l.canvas {
                let _ = l.tx.send(Event::Canvas { step: c.steps().saturating_sub(1), tokens: c.gen().to_vec() });
            }
            if l.stream && c.block() > l.blocks_sent {
                l.blocks_sent = c.block();
                let end = c.finished_gen();
                let _ = l.tx.send(Event::Blocks { tokens: c.gen()[..end].to_vec() });
            }
        }
        m.observe_step(t0.elapsed().as_secs_f64() * 1e3, stepped);
        match result {
            Ok(done) => {
                for (id, out) in done {
                    let Some(l) = live.remove(&id.0) else { continue };
                    if !l.started {
                        m.queue_depth.fetch_sub(1, Relaxed);
                    } else {
                        m.active.fetch_sub(1, Relaxed);
                    }
                    if l.canvas {
                        // The finishing step's canvas (it left the active set with it).
                        let _ = l.tx.send(Event::Canvas { step: out.steps.saturating_sub(1), tokens: out.tokens.clone() });
                    }
                    m.generated_tokens.fetch_add(out.generated_tokens as u64, Relaxed);
                    m.count(Outcome::Ok);
                    let _ = l.tx.send(Event::Done(Box::new(out)));
                }
            }
            Err(e) => {
                // The step failed for the whole batch: fail every request it held, keep serving.
                eprintln!("demask serve: engine step failed: {e}");
                let msg = e.to_string();
                for (id, l) in live.drain() {
                    engine.cancel(RequestId(id));
                    if l.started {
                        m.active.fetch_sub(1, Relaxed);
                    } else {
                        m.queue_depth.fetch_sub(1, Relaxed);
                    }
                    m.count(Outcome::Failed);
                    let _ = l.tx.send(Event::Failed(Error::Driver { op: "engine step".into(), msg: msg.clone() }));
                }
            }
        }
        publish_rows(&engine, &m);
        if last_mem.elapsed().as_secs_f64() >= 1.0 {
            sample_memory(&engine, &m);
            last_mem = Instant::now();
        }
    }
}

/// The KV-row gauges (after every step, and after cancellations, which free rows too).
fn publish_rows(engine: &Engine, m: &Metrics) {
    let (used, cap) = engine.kv_rows();
    m.kv_rows_used.store(used as u64, Relaxed);
    m.kv_rows_capacity.store(cap as u64, Relaxed);
}

fn sample_memory(engine: &Engine, m: &Metrics) {
    if let Some((used, total)) = engine.device_memory() {
        m.device_memory_used.store(used, Relaxed);
        m.device_memory_total.store(total, Relaxed);
    }
}

fn admit(engine: &mut Engine, live: &mut HashMap<u64, Live>, m: &Metrics, j: Job) {
    if j.tx.is_closed() {
        m.queue_depth.fetch_sub(1, Relaxed);
        m.count(Outcome::Cancelled);
        return;
    }
    match engine.submit(j.req) {
        Ok(id) => {
            let _ = j.tx.send(Event::Queued);
            live.insert(
                id.0,
                Live { tx: j.tx, ended: j.ended, stream: j.stream, canvas: j.canvas, blocks_sent: 0, started: false },
            );
        }
        Err(e) => {
            m.queue_depth.fetch_sub(1, Relaxed);
            m.count(if super::is_client_error(&e) { Outcome::Invalid } else { Outcome::Failed });
            let _ = j.tx.send(Event::Failed(e));
        }
    }
}
