//! `demask serve` under load and misbehaving clients: the queue limit (429), clients that go
//! away (their requests are cancelled and their rows freed), slow, silent and broken clients,
//! 100 concurrent mixed requests each equal to `Engine::generate`, and the official `openai`
//! Python client against the real binary (tools/serve/test_openai.py).
mod serve_common;

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use demask::serve::client::{self, HttpResponse};
use demask::serve::ServeOptions;
use demask::prelude::*;
use serde_json::{json, Value};

use serve_common::*;

#[test]
fn queue_full_is_429() {
    // One sequence decodes at a time and one may wait: a long request A decodes, B waits,
    // and C finds the queue full — deterministically, since A is held running until the
    // checks are done (its client cancels it by going away).
    let s = Arc::new(server("queue", 1, ServeOptions { max_queue: 1, ..opts() }));
    let m = s.h.metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let long = json!({ "prompt": [1, 2, 3], "max_tokens": 512, "block_len": 32, "policy": "schedule:32",
                       "stream": true, "stream_canvas": true, "stop_at_eos": false });
    let (started_tx, started_rx) = mpsc::channel();
    let spawn_client = |tag: &'static str| {
        let (s, stop, long, started_tx) = (s.clone(), stop.clone(), long.clone(), started_tx.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            let r = client::stream(&s.addr, "/v1/completions", &[], long.to_string().as_bytes(), T, |_| {
                n += 1;
                if n == 1 {
                    let _ = started_tx.send(tag);
                }
                !stop.load(Ordering::Relaxed)
            })
            .unwrap();
            (r.status, n)
        })
    };
    let a = spawn_client("A");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(60)).unwrap(), "A");
    let b = spawn_client("B");
    wait_for(30, "B queued", || m.queue_depth.load(Ordering::Relaxed) == 1);
    let rejected0 = s.h.metrics.requests(demask::serve::metrics::Outcome::Rejected);

    let short = json!({ "prompt": "c", "max_tokens": 8, "block_len": 8 });
    let v = refused(&s.post("/v1/completions", &short), 429, None, "queue");
    assert_eq!(v["error"]["code"], "queue_full");
    refused(&s.post("/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "c" }], "stream": true })), 429, None, "queue");
    assert_eq!(s.h.metrics.requests(demask::serve::metrics::Outcome::Rejected), rejected0 + 2);
    assert_eq!(m.queue_depth.load(Ordering::Relaxed), 1, "a refusal leaves the queue as it was");
    assert_eq!(started_rx.try_recv().ok(), None, "B has not started while A decodes");
    // n beyond the room left is refused as a whole.
    refused(&s.post("/v1/completions", &with(short.clone(), json!({ "n": 2 }))), 429, None, "queue");

    // A and B go away; the server drains and serves again.
    stop.store(true, Ordering::Relaxed);
    let (sa, na) = a.join().unwrap();
    assert_eq!(sa, 200);
    assert!(na < 512, "A was cut short ({na} events)");
    assert_eq!(started_rx.recv_timeout(Duration::from_secs(60)).unwrap(), "B");
    let (sb, _) = b.join().unwrap();
    assert_eq!(sb, 200);
    wait_for(30, "A and B cancelled", || s.h.metrics.requests(demask::serve::metrics::Outcome::Cancelled) == 2);
    wait_for(30, "queue drained", || m.queue_depth.load(Ordering::Relaxed) == 0);
    let r = s.post("/v1/completions", &short);
    assert_eq!(r.status, 200, "{}", r.text());
}

#[test]
fn queue_limit_admits_exactly_max_queue_waiting() {
    // max_batch 1, max_queue 3: with A decoding, 3 more wait and the 5th is refused; then every
    // accepted one is answered.
    let s = Arc::new(server("queue3", 1, ServeOptions { max_queue: 3, ..opts() }));
    let m = s.h.metrics.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let a = {
        let (s, stop, tx) = (s.clone(), stop.clone(), tx.clone());
        std::thread::spawn(move || {
            let body = json!({ "prompt": [1], "max_tokens": 256, "block_len": 32, "policy": "schedule:32",
                               "stream": true, "stream_canvas": true });
            let mut first = true;
            client::stream(&s.addr, "/v1/completions", &[], body.to_string().as_bytes(), T, |_| {
                if std::mem::take(&mut first) {
                    let _ = tx.send(());
                }
                !stop.load(Ordering::Relaxed)
            })
            .unwrap()
            .status
        })
    };
    rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let waiting: Vec<_> = (0..3)
        .map(|i| {
            let s = s.clone();
            let h = std::thread::spawn(move || {
                s.post("/v1/completions", &json!({ "prompt": format!("w{i}"), "max_tokens": 8, "block_len": 8, "stop_at_eos": false }))
            });
            wait_for(30, "queued", || m.queue_depth.load(Ordering::Relaxed) == i + 1);
            h
        })
        .collect();
    refused(&s.post("/v1/completions", &json!({ "prompt": "x" })), 429, None, "limit 3");
    stop.store(true, Ordering::Relaxed);
    assert_eq!(a.join().unwrap(), 200);
    for h in waiting {
        let r = h.join().unwrap();
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(r.json().unwrap()["choices"][0]["finish_reason"].is_string(), "{}", r.text());
    }
}

/// A long streaming request whose client reads the first event and goes away.
fn drop_mid_stream(s: &Srv) -> usize {
    let body = json!({ "prompt": "drop me", "max_tokens": 512, "block_len": 32, "policy": "schedule:32",
                       "cache": "dual", "stream": true, "stop_at_eos": false });
    let mut seen = 0;
    let r = client::stream(&s.addr, "/v1/completions", &[], body.to_string().as_bytes(), T, |d| {
        seen += 1;
        assert_ne!(d, "[DONE]");
        false
    })
    .unwrap();
    assert_eq!(r.status, 200);
    seen
}

#[test]
fn dropped_stream_cancels_the_request() {
    use demask::serve::metrics::Outcome;
    let s = server("drop", 0, opts());
    let m = s.h.metrics.clone();
    assert_eq!(drop_mid_stream(&s), 1);
    wait_for(30, "the request counted as cancelled", || m.requests(Outcome::Cancelled) == 1);
    assert_eq!(m.requests(Outcome::Ok), 0, "it did not run to the end");
    // The engine stopped decoding it: no more steps.
    let steps = m.steps.load(Ordering::Relaxed);
    assert!(steps < 512, "cancelled early ({steps} steps of 512)");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(m.steps.load(Ordering::Relaxed), steps, "steps continued after the cancel");
    // The server goes on; the next request's rows are freed when it finishes, so the engine
    // holds none after it (the cancelled request's rows were given back).
    let v = s.ok("/v1/completions", &json!({ "prompt": "next", "max_tokens": 8, "block_len": 8, "cache": "dual" }));
    assert!(v["choices"][0]["finish_reason"].is_string(), "{v}");
    // (The gauge is refreshed just after the response is sent: poll.)
    wait_for(10, "kv rows back to 0 after the next request", || s.metric("demask_kv_rows_used") == 0.0);
    assert_eq!(m.requests(Outcome::Ok), 1);
}

/// A client of a whole (non-streaming) response that goes away mid-decode cancels it too.
#[test]
fn dropped_whole_response_client_cancels_the_request() {
    use demask::serve::metrics::Outcome;
    let s = server("dropwhole", 0, opts());
    let m = s.h.metrics.clone();
    let body = json!({ "prompt": [1, 2, 3], "max_tokens": 512, "block_len": 32, "policy": "schedule:32",
                       "cache": "dual", "stop_at_eos": false })
    .to_string();
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let head = format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len());
    c.write_all(head.as_bytes()).unwrap();
    c.write_all(body.as_bytes()).unwrap();
    wait_for(30, "the request decoding", || m.steps.load(Ordering::Relaxed) >= 2);
    drop(c);
    wait_for(30, "the request counted as cancelled", || m.requests(Outcome::Cancelled) == 1);
    assert_eq!(m.requests(Outcome::Ok), 0);
    let steps = m.steps.load(Ordering::Relaxed);
    assert!(steps < 512, "cancelled early ({steps} steps of 512)");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(m.steps.load(Ordering::Relaxed), steps, "steps continued after the cancel");
    s.ok("/v1/completions", &json!({ "prompt": "next", "max_tokens": 8, "block_len": 8 }));
}

/// A streaming request that a stop string ended was answered, not abandoned: it counts as
/// `ok` in `demask_requests_total`, not `cancelled` (the stream marks `Job::ended` before it
/// drops its receivers, and the engine thread reads it when it cancels the rest).
#[test]
fn stream_ended_by_a_stop_string_counts_as_ok() {
    use demask::serve::metrics::Outcome;
    let s = server("stopcount", 0, opts());
    let st = Settings { max_tokens: 64, block_len: 8, cache: "dual", ..Default::default() };
    let body = with(st.body(), json!({ "prompt": "count" }));
    let full = s.ok("/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string();
    let stop = full.chars().find(|c| *c != '\u{FFFD}' && !c.is_whitespace() && full.find(*c).unwrap() < full.len() / 2);
    let stop = stop.unwrap_or_else(|| panic!("no usable stop character in the first half of {full:?}"));
    let (r, ev) = s.stream("/v1/completions", &with(body, json!({ "stop": stop.to_string(), "stream": true })));
    assert_eq!(assemble(&chunks(&r, &ev), 1)[0].2.as_deref(), Some("stop"));
    let m = s.h.metrics.clone();
    wait_for(10, "the engine is idle", || m.queue_depth.load(Ordering::Relaxed) == 0 && m.active.load(Ordering::Relaxed) == 0);
    assert_eq!(m.requests(Outcome::Cancelled), 0, "a stop string is not a cancel");
    assert_eq!(m.requests(Outcome::Ok), 2);
}

/// After a client drops its stream, the gauges return to zero: `demask_queue_depth`,
/// `demask_active_requests` and `demask_kv_rows_used`. src/serve/worker.rs refreshes
/// `kv_rows_used` only after a step, and after the cancel of the last request (its
/// `live.retain` block) no step follows: the gauge keeps the cancelled request's rows until the
/// next request. (As committed, the cancel path also never decremented `active` for a request
/// that had started.)
#[test]
fn dropped_stream_gauges_return_to_zero() {
    use demask::serve::metrics::Outcome;
    let s = server("dropgauge", 0, opts());
    let m = s.h.metrics.clone();
    drop_mid_stream(&s);
    wait_for(30, "cancelled", || m.requests(Outcome::Cancelled) == 1);
    assert_eq!(s.metric("demask_requests_total{status=\"cancelled\"}"), 1.0);
    wait_for(5, "demask_queue_depth back to 0 after a cancel", || s.metric("demask_queue_depth") == 0.0);
    wait_for(5, "demask_active_requests back to 0 after a cancel", || s.metric("demask_active_requests") == 0.0);
    wait_for(5, "demask_kv_rows_used back to 0 after a cancel", || s.metric("demask_kv_rows_used") == 0.0);
}

/// A stop string ends a streaming request before its decode does; the rest of the decode is
/// cancelled, and the gauges still return to zero (the same stale `kv_rows_used` as
/// `dropped_stream_gauges_return_to_zero`).
#[test]
fn stop_string_stream_leaves_no_active_request() {
    let s = server("stopgauge", 0, opts());
    let st = Settings { max_tokens: 128, block_len: 8, cache: "dual", ..Default::default() };
    let body = with(st.body(), json!({ "prompt": "gauges" }));
    let full = s.ok("/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string();
    let first = full.chars().find(|c| *c != '\u{FFFD}' && !c.is_whitespace() && full.find(*c).unwrap() < 40);
    let Some(stop) = first else {
        panic!("no usable stop character early in {full:?}");
    };
    let (r, ev) = s.stream("/v1/completions", &with(body, json!({ "stop": stop.to_string(), "stream": true })));
    assert_eq!(assemble(&chunks(&r, &ev), 1)[0].2.as_deref(), Some("stop"));
    let m = s.h.metrics.clone();
    wait_for(5, "demask_queue_depth back to 0", || m.queue_depth.load(Ordering::Relaxed) == 0);
    wait_for(5, "demask_active_requests back to 0", || m.active.load(Ordering::Relaxed) == 0);
    wait_for(5, "demask_kv_rows_used back to 0", || s.metric("demask_kv_rows_used") == 0.0);
}

#[test]
fn slow_silent_and_broken_clients() {
    let s = server("slow", 0, ServeOptions { body_timeout: Duration::from_millis(1500), ..opts() });
    let body = json!({ "prompt": "slowly", "max_tokens": 8, "block_len": 8, "stop_at_eos": false }).to_string();
    let want = s.ok("/v1/completions", &serde_json::from_str(&body).unwrap());
    let head = |len: usize| {
        format!("POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };

    // Connections that say nothing, stay open, and hold nothing up.
    let idle: Vec<TcpStream> = (0..4).map(|_| TcpStream::connect(&s.addr).unwrap()).collect();
    // One that sent half its headers.
    let mut half_head = TcpStream::connect(&s.addr).unwrap();
    half_head.write_all(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le").unwrap();

    // A slow client: headers, then the body in pieces over ~0.6 s (within the timeout).
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    c.write_all(head(body.len()).as_bytes()).unwrap();
    for piece in body.as_bytes().chunks(body.len().div_ceil(4)) {
        std::thread::sleep(Duration::from_millis(150));
        c.write_all(piece).unwrap();
    }
    let (status, text) = read_response(&mut c);
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(text.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert_eq!(v["choices"][0]["demask"]["tokens"], want["choices"][0]["demask"]["tokens"]);

    // While the idle connections are open, others are served.
    let tokens = |v: &Value| v["choices"][0]["demask"]["tokens"].clone();
    assert_eq!(tokens(&s.ok("/v1/completions", &serde_json::from_str(&body).unwrap())), tokens(&want));
    drop(idle);
    drop(half_head);

    // Half a body, then the client closes: the server survives.
    for _ in 0..3 {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.write_all(head(body.len()).as_bytes()).unwrap();
        c.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
        c.shutdown(Shutdown::Write).unwrap();
        let _ = read_response(&mut c);
    }
    // Half a body then gone without a word (reset).
    {
        let mut c = TcpStream::connect(&s.addr).unwrap();
        c.write_all(head(body.len()).as_bytes()).unwrap();
        c.write_all(&body.as_bytes()[..10]).unwrap();
    }
    // Connect and close.
    for _ in 0..3 {
        drop(TcpStream::connect(&s.addr).unwrap());
    }
    // Not HTTP at all.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"\x16\x03\x01garbage\r\n\r\n").unwrap();
    let _ = read_response(&mut c);

    // A client that stops sending mid-body: 408 after the body timeout.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    c.write_all(head(body.len()).as_bytes()).unwrap();
    c.write_all(&body.as_bytes()[..body.len() / 2]).unwrap();
    let t0 = Instant::now();
    let (status, text) = read_response(&mut c);
    assert_eq!(status, 408, "{text}");
    assert!(text.contains("request_timeout"), "{text}");
    assert!(t0.elapsed() >= Duration::from_millis(1000), "not before the timeout: {:?}", t0.elapsed());

    // Everything still works.
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(tokens(&s.ok("/v1/completions", &serde_json::from_str(&body).unwrap())), tokens(&want));
    assert_eq!(s.h.metrics.active.load(Ordering::Relaxed), 0);
    assert_eq!(s.h.metrics.queue_depth.load(Ordering::Relaxed), 0);
}

/// The i-th of the concurrent requests: endpoint, body, and the engine requests it stands for.
fn mixed_request(i: usize, tok: &Tokenizer) -> (&'static str, Value, Vec<Request>, bool) {
    let st = Settings {
        max_tokens: [8, 5, 12, 3][(i / 3) % 4],
        block_len: [8, 16][(i / 2) % 2],
        temperature: if i % 4 == 1 { 0.8 } else { 0.0 },
        top_p: if i % 8 == 1 { 0.9 } else { 1.0 },
        seed: (i as u64) * 7 + 1,
        policy: ["threshold:0.9", "schedule:4", "random:2", "confident:0.5,2"][(i / 5) % 4],
        cache: ["none", "dual", "prefix"][(i / 7) % 3],
        stop_at_eos: i.is_multiple_of(6),
    };
    let n = if i.is_multiple_of(17) { 2 } else { 1 };
    let stream = i % 5 == 3;
    let mut body = with(st.body(), json!({ "n": n, "stream": stream }));
    let (path, prompt) = if i % 3 == 2 {
        let user = format!("q{i}");
        let msgs: Vec<(&str, &str)> =
            if i.is_multiple_of(4) { vec![("system", "be brief"), ("user", &user)] } else { vec![("user", &user)] };
        body["messages"] = Value::Array(msgs.iter().map(|(r, c)| json!({ "role": r, "content": c })).collect());
        ("/v1/chat/completions", chat_ids(tok, &msgs))
    } else if i.is_multiple_of(2) {
        let ids: Vec<u32> = (0..3 + i % 7).map(|k| ((k * 37 + i * 11) % 300) as u32).collect();
        body["prompt"] = json!(ids);
        ("/v1/completions", ids)
    } else {
        let text = format!("p{i} {}", ["cats", "dogs", "rain"][i % 3]);
        body["prompt"] = json!(text);
        ("/v1/completions", tok.encode(&text, true).unwrap())
    };
    let reqs = (0..n).map(|j| st.request(prompt.clone(), j)).collect();
    (path, body, reqs, stream)
}

#[test]
fn hundred_concurrent_mixed_requests_equal_generate() {
    let s = Arc::new(server("many", 0, opts()));
    let tok = s.tok();
    const N: usize = 100;
    let all: Vec<_> = (0..N).map(|i| mixed_request(i, &tok)).collect();

    // The expected outputs: the same requests through Engine::generate, all in one batch.
    let reqs: Vec<Request> = all.iter().flat_map(|(_, _, r, _)| r.clone()).collect();
    let t0 = Instant::now();
    let outs = s.engine().generate(&reqs).unwrap();
    eprintln!("generate: {} requests in {:.1} s", reqs.len(), t0.elapsed().as_secs_f64());

    let t0 = Instant::now();
    // The largest batch the engine stepped while the requests ran (continuous batching).
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (m, done) = (s.h.metrics.clone(), done.clone());
        std::thread::spawn(move || {
            let mut max = 0;
            while !done.load(Ordering::Relaxed) {
                max = max.max(m.batch_size.load(Ordering::Relaxed));
                std::thread::sleep(Duration::from_millis(2));
            }
            max
        })
    };
    let gate = Arc::new(std::sync::Barrier::new(N));
    let threads: Vec<_> = all
        .iter()
        .map(|(path, body, _, stream)| {
            let (s, gate, path, body, stream) = (s.clone(), gate.clone(), *path, body.clone(), *stream);
            std::thread::spawn(move || {
                gate.wait();
                if stream {
                    let (r, ev) = s.stream(path, &body);
                    (r.status, ev, None)
                } else {
                    let r = s.post(path, &body);
                    let v = r.json().ok();
                    (r.status, Vec::new(), v)
                }
            })
        })
        .collect();
    let mut k = 0;
    let mut answered = 0;
    for (i, t) in threads.into_iter().enumerate() {
        let (status, events, v) = t.join().unwrap();
        let (_, body, reqs, stream) = &all[i];
        assert_eq!(status, 200, "request {i} {body}: {v:?} {events:?}");
        answered += 1;
        if *stream {
            let r = HttpResponse { status, headers: vec![("content-type".into(), "text/event-stream".into())], body: vec![] };
            let a = assemble(&chunks(&r, &events), reqs.len());
            for (j, (text, ids, finish, _)) in a.iter().enumerate() {
                let out = &outs[k + j];
                assert_eq!(*ids, until_eos(&out.tokens), "request {i} choice {j} (streamed) {body}");
                assert_eq!(Some(text.as_str()), out.text.as_deref(), "request {i} choice {j} (streamed)");
                assert!(finish.is_some());
            }
        } else {
            let v = v.unwrap();
            let choices = v["choices"].as_array().unwrap();
            assert_eq!(choices.len(), reqs.len());
            for (j, c) in choices.iter().enumerate() {
                same_as_generate(c, &outs[k + j], &format!("request {i} choice {j} {body}"));
            }
        }
        k += reqs.len();
    }
    assert_eq!(answered, N);
    done.store(true, Ordering::Relaxed);
    let max_batch = sampler.join().unwrap();
    eprintln!("served: {N} concurrent requests in {:.1} s; largest batch {max_batch}", t0.elapsed().as_secs_f64());
    assert!(max_batch >= 20, "the requests were batched together (largest batch {max_batch})");
    let m = &s.h.metrics;
    assert_eq!(m.requests(demask::serve::metrics::Outcome::Ok) as usize, reqs.len());
    wait_for(10, "idle", || m.active.load(Ordering::Relaxed) == 0 && m.queue_depth.load(Ordering::Relaxed) == 0);
}

// ---- The official openai Python client against the real binary. ----

/// The `demask serve` process, killed on drop (also when a test fails).
struct ServerProcess(Child);

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn python() -> String {
    std::env::var("DEMASK_PYTHON").ok().filter(|p| !p.is_empty()).unwrap_or_else(|| "python3".into())
}

#[test]
fn serve_openai_client() {
    let py = python();
    let has_openai = Command::new(&py)
        .args(["-c", "import openai"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !has_openai {
        let why = format!("`{py} -c 'import openai'` fails (set DEMASK_PYTHON to a python with `pip install openai`)");
        if std::env::var("DEMASK_REQUIRE_OPENAI").is_ok_and(|v| v == "1") {
            panic!("DEMASK_REQUIRE_OPENAI=1 but {why}");
        }
        eprintln!("SKIPPED serve_openai_client: {why}");
        return;
    }
    let ckpt = checkpoint("openai");
    let dir = ckpt.0.join("ckpt");
    let port = free_port();
    let key = "test-key-123";
    let mut server = ServerProcess(
        Command::new(env!("CARGO_BIN_EXE_demask"))
            .args(["serve", "--model", dir.to_str().unwrap(), "--device", "cpu", "--port", &port.to_string()])
            .args(["--api-key", key, "--served-model-name", "tiny-openai", "--block-len", "8", "--max-batch", "16"])
            .env_remove("DEMASK_API_KEY")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting demask serve"),
    );
    let addr = format!("127.0.0.1:{port}");
    let t0 = Instant::now();
    loop {
        if let Ok(r) = client::request(&addr, "GET", "/health", &[], b"", Duration::from_secs(5)) {
            if r.status == 200 {
                break;
            }
        }
        if let Some(st) = server.0.try_wait().unwrap() {
            panic!("demask serve exited before it answered /health: {st}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "demask serve did not answer /health within 60 s");
        std::thread::sleep(Duration::from_millis(100));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/serve/test_openai.py");
    let out = Command::new(&py)
        .arg(&script)
        .args(["--base-url", &format!("http://{addr}/v1"), "--api-key", key, "--model", "tiny-openai"])
        .output()
        .expect("running tools/serve/test_openai.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{stdout}{stderr}");
    assert!(out.status.success(), "tools/serve/test_openai.py failed ({}):\n{stdout}\n{stderr}", out.status);
    assert!(stdout.contains("0 failed"), "{stdout}");
    // The server is still up after everything the client sent.
    assert_eq!(client::request(&addr, "GET", "/health", &[], b"", T).unwrap().status, 200);
    assert!(server.0.try_wait().unwrap().is_none(), "the server is still running");
}
