//! `demask serve` refusals: every bad request is an OpenAI-style error body naming the field
//! (400), odd values of every field, wrong methods, body limits (413) and the API key (401).
mod serve_common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::Duration;

use demask::serve::client::{self};
use demask::serve::ServeOptions;
use serde_json::{json, Value};

use serve_common::*;

#[test]
fn bad_requests_are_400_naming_the_field() {
    let s = server("errors", 0, opts());
    let c = "/v1/completions";
    let chat = "/v1/chat/completions";
    let raw = |path: &str, body: &[u8]| s.raw("POST", path, body);

    refused(&raw(c, b"{\"prompt\": "), 400, None, "not valid JSON");
    refused(&raw(c, b"{\"prompt\": \"a\",}"), 400, None, "not valid JSON");
    refused(&raw(c, b"\xff\xfe"), 400, None, "not valid JSON");
    refused(&raw(chat, b"[1, 2]"), 400, None, "JSON object");
    refused(&raw(c, b"\"prompt\""), 400, None, "JSON object");
    refused(&raw(c, b"null"), 400, None, "JSON object");
    refused(&raw(c, b""), 400, None, "empty");
    refused(&raw(chat, b""), 400, None, "empty");

    let p = |body: Value| s.post(c, &body);
    let pc = |body: Value| s.post(chat, &body);
    refused(&p(json!({ "max_tokens": 8 })), 400, Some("prompt"), "prompt");
    refused(&pc(json!({ "max_tokens": 8 })), 400, Some("messages"), "messages");
    refused(&pc(json!({ "messages": [] })), 400, Some("messages"), "at least one");
    refused(&pc(json!({ "messages": [{ "content": "x" }] })), 400, Some("messages[0].role"), "role");
    refused(&pc(json!({ "messages": [{ "role": "wizard", "content": "x" }] })), 400, Some("messages[0].role"), "wizard");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": [{ "type": "image_url" }] }] })), 400, Some("messages[0].content"), "text");
    refused(&pc(json!({ "messages": "hello" })), 400, Some("messages"), "");

    // Wrong types name the parameter.
    refused(&p(json!({ "prompt": "a", "max_tokens": "eight" })), 400, Some("max_tokens"), "max_tokens");
    refused(&p(json!({ "prompt": "a", "temperature": "hot" })), 400, Some("temperature"), "temperature");
    refused(&p(json!({ "prompt": "a", "seed": -1 })), 400, Some("seed"), "seed");
    refused(&p(json!({ "prompt": "a", "stream": "yes" })), 400, Some("stream"), "stream");
    refused(&p(json!({ "prompt": "a", "stream_options": { "include_usage": 1 } })), 400, Some("stream_options.include_usage"), "include_usage");
    refused(&p(json!({ "prompt": 5 })), 400, Some("prompt"), "prompt");
    refused(&p(json!({ "prompt": "a", "stop": 3 })), 400, Some("stop"), "stop");

    refused(&p(json!({ "prompt": "a", "model": "gpt-4" })), 400, Some("model"), "gpt-4");
    let v = refused(&pc(json!({ "model": "nope", "messages": [{ "role": "user", "content": "x" }] })), 400, Some("model"), "nope");
    assert_eq!(v["error"]["code"], "model_not_found");

    refused(&p(json!({ "prompt": "a", "max_tokens": 0 })), 400, Some("max_tokens"), "positive");
    refused(&p(json!({ "prompt": "a", "max_tokens": -5 })), 400, Some("max_tokens"), "positive");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": "x" }], "max_completion_tokens": 0 })), 400, Some("max_completion_tokens"), "positive");
    refused(&p(json!({ "prompt": "a", "temperature": -0.1 })), 400, Some("temperature"), ">= 0");
    refused(&p(json!({ "prompt": "a", "top_p": 0 })), 400, Some("top_p"), "(0, 1]");
    refused(&p(json!({ "prompt": "a", "top_p": 1.5 })), 400, Some("top_p"), "(0, 1]");
    refused(&p(json!({ "prompt": "a", "top_p": -1 })), 400, Some("top_p"), "(0, 1]");
    refused(&p(json!({ "prompt": "a", "n": 0 })), 400, Some("n"), "1..=16");
    refused(&p(json!({ "prompt": "a", "n": 17 })), 400, Some("n"), "1..=16");
    refused(&p(json!({ "prompt": "a", "block_len": 0 })), 400, Some("block_len"), "positive");
    refused(&p(json!({ "prompt": "a", "policy": "greedy:3" })), 400, Some("policy"), "greedy");
    refused(&p(json!({ "prompt": "a", "cache": "sometimes" })), 400, Some("cache"), "sometimes");
    refused(&p(json!({ "prompt": "a", "steps": 3, "max_tokens": 16, "block_len": 8 })), 400, Some("steps"), "multiple");
    refused(&p(json!({ "prompt": "a", "steps": 4, "policy": "schedule:4" })), 400, Some("steps"), "not both");
    refused(&p(json!({ "prompt": "a", "stop": ["", "x"] })), 400, Some("stop"), "non-empty");
    refused(&p(json!({ "prompt": "a", "stop": ["a", "b", "c", "d", "e"] })), 400, Some("stop"), "at most");

    refused(&p(json!({ "prompt": [1, 2, 512] })), 400, Some("prompt"), "512");
    refused(&p(json!({ "prompt": [1, -3] })), 400, Some("prompt"), "-3");
    refused(&p(json!({ "prompt": [[1], [2]] })), 400, Some("prompt"), "one prompt");
    refused(&p(json!({ "prompt": ["a", "b"] })), 400, Some("prompt"), "one prompt");

    // The context: a prompt that fills it, and a prompt that leaves too little room.
    let long: Vec<u32> = (0..CTX as u32).map(|i| i % 256).collect();
    refused(&p(json!({ "prompt": long })), 400, Some("prompt"), "1024");
    refused(&p(json!({ "prompt": "x".repeat(CTX + 10) })), 400, Some("prompt"), "context");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": "x".repeat(CTX) }] })), 400, Some("messages"), "context");
    let near: Vec<u32> = (0..1000u32).map(|i| i % 256).collect();
    let v = refused(&p(json!({ "prompt": near, "max_tokens": 32, "block_len": 8 })), 400, Some("max_tokens"), "exceeds");
    assert!(v["error"]["message"].as_str().unwrap().contains("at most 24"), "{v}");
    // Exactly the context is fine (one block, one step: a single forward over 1024 rows).
    let near: Vec<u32> = (0..1016u32).map(|i| i % 256).collect();
    let v = s.ok(c, &json!({ "prompt": near, "max_tokens": 8, "block_len": 8, "policy": "schedule:1", "stop_at_eos": false }));
    assert_eq!(v["usage"]["prompt_tokens"], 1016);

    // Unsupported OpenAI features are refused, not ignored.
    refused(&p(json!({ "prompt": "a", "logprobs": 2 })), 400, Some("logprobs"), "not supported");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": "x" }], "logprobs": true })), 400, Some("logprobs"), "not supported");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": "x" }], "top_logprobs": 2 })), 400, Some("top_logprobs"), "not supported");
    refused(&p(json!({ "prompt": "a", "presence_penalty": 0.5 })), 400, Some("presence_penalty"), "not supported");
    refused(&p(json!({ "prompt": "a", "logit_bias": { "5": 10 } })), 400, Some("logit_bias"), "not supported");
    refused(&p(json!({ "prompt": "a", "echo": true })), 400, Some("echo"), "not supported");
    refused(&p(json!({ "prompt": "a", "best_of": 3 })), 400, Some("best_of"), "not supported");
    refused(&pc(json!({ "messages": [{ "role": "user", "content": "x" }], "tools": [{}] })), 400, Some("tools"), "not supported");
    // ... and their defaults are accepted (what clients send by default).
    s.ok(
        c,
        &json!({ "prompt": "a", "max_tokens": 8, "block_len": 8, "logprobs": null, "presence_penalty": 0,
                 "frequency_penalty": 0.0, "logit_bias": {}, "user": "u", "echo": false, "best_of": 1 }),
    );
    s.ok(
        chat,
        &json!({ "messages": [{ "role": "user", "content": "x" }], "max_tokens": 8, "block_len": 8, "logprobs": false,
                 "response_format": { "type": "text" }, "unknown_field": 1 }),
    );

    // The engine's own refusal (a schedule with more steps than a block has slots) is a 400
    // too, not a 500.
    let r = p(json!({ "prompt": "a", "max_tokens": 8, "block_len": 8, "policy": "schedule:64" }));
    refused(&r, 400, None, "");

    // Unknown routes are 404 with an error body.
    for (m, path) in [("GET", "/v1/nope"), ("POST", "/v1/embeddings"), ("GET", "/"), ("DELETE", "/v1/models/x")] {
        let r = s.raw(m, path, b"");
        refused(&r, 404, None, path);
    }
    // Nothing above took the server down.
    assert_eq!(s.get("/health").status, 200);
    assert_eq!(s.h.metrics.active.load(Ordering::Relaxed), 0);
    assert_eq!(s.h.metrics.queue_depth.load(Ordering::Relaxed), 0);
    s.ok(c, &json!({ "prompt": "still fine", "max_tokens": 8, "block_len": 8 }));
}

/// No value of any field crashes the server or gets anything but an answer (200) or an
/// OpenAI-style refusal (400).
#[test]
fn odd_values_of_every_field_are_answered_or_refused() {
    let s = server("fuzz", 0, opts());
    let values = [
        json!(null), json!(true), json!(false), json!(0), json!(1), json!(-1), json!(2.5), json!(1e300), json!(-1e300),
        json!(u64::MAX), json!(""), json!("x"), json!("schedule:1"), json!([]), json!([1]), json!([""]), json!({}),
        json!({ "a": 1 }),
    ];
    let completion_fields = [
        "model", "prompt", "max_tokens", "temperature", "top_p", "seed", "stop", "n", "stream", "stream_options",
        "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "user", "top_k", "policy",
        "block_len", "cache", "prior", "steps", "stop_at_eos", "stream_canvas", "echo", "suffix", "best_of",
    ];
    let base = json!({ "prompt": "fuzz", "max_tokens": 8, "block_len": 8, "policy": "schedule:1" });
    let cbase = json!({ "messages": [{ "role": "user", "content": "fuzz" }], "max_tokens": 8, "block_len": 8, "policy": "schedule:1" });
    let chat_fields = ["messages", "max_completion_tokens", "tools", "functions", "response_format", "temperature", "stream"];
    let mut seen = [0usize; 2];
    let cases = completion_fields
        .iter()
        .map(|f| ("/v1/completions", &base, *f))
        .chain(chat_fields.iter().map(|f| ("/v1/chat/completions", &cbase, *f)));
    for (path, base, field) in cases {
        for v in &values {
            let mut body = base.clone();
            body[field] = v.clone();
            if field == "steps" {
                body.as_object_mut().unwrap().remove("policy");
            }
            let r = s.post(path, &body);
            match r.status {
                200 => {
                    seen[0] += 1;
                    if r.header("content-type").is_some_and(|c| c.starts_with("text/event-stream")) {
                        assert!(r.text().trim_end().ends_with("data: [DONE]"), "{body}: {}", r.text());
                    } else {
                        let j = r.json().unwrap();
                        assert!(!j["choices"].as_array().unwrap().is_empty(), "{body}: {j}");
                    }
                }
                400 => {
                    seen[1] += 1;
                    let j = r.json().unwrap_or_else(|e| panic!("{body}: {e}"));
                    assert!(j["error"]["message"].is_string(), "{body}: {j}");
                    assert_eq!(j["error"]["type"], "invalid_request_error", "{body}: {j}");
                }
                other => panic!("{path} {body}: HTTP {other}: {}", r.text()),
            }
        }
    }
    assert!(seen[0] > 50 && seen[1] > 50, "answered / refused: {seen:?}");
    assert_eq!(s.get("/health").status, 200);
    s.ok("/v1/completions", &base);
    wait_for(10, "idle", || s.h.metrics.active.load(Ordering::Relaxed) == 0 && s.h.metrics.queue_depth.load(Ordering::Relaxed) == 0);
}

/// A known route with a method it does not take is a refusal too: a 405 with an OpenAI-style
/// error body (axum's default 405 has an empty one).
#[test]
fn wrong_method_is_an_error_body() {
    let s = server("method", 0, opts());
    let r = s.raw("GET", "/v1/completions", b"");
    assert_eq!(r.status, 405, "{}", r.text());
    let v = r.json().expect("a JSON error body for 405");
    assert!(v["error"]["message"].is_string(), "{v}");
}

#[test]
fn oversized_body_is_413() {
    let s = server("body", 0, ServeOptions { max_body: 1024, ..opts() });
    let big = json!({ "prompt": "x".repeat(4000), "max_tokens": 8 });
    let v = refused(&s.post("/v1/completions", &big), 413, None, "1024");
    assert_eq!(v["error"]["code"], "body_too_large");
    // Just within the limit is read (and then judged on its content; `user` pads it).
    let mut fits = json!({ "prompt": "fits", "max_tokens": 8, "block_len": 8, "user": "" });
    let pad = 1024 - fits.to_string().len();
    fits["user"] = json!("y".repeat(pad));
    assert_eq!(fits.to_string().len(), 1024);
    s.ok("/v1/completions", &fits);
    // A chunked body (no Content-Length) over the limit too.
    let mut c = TcpStream::connect(&s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut req = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                    Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        .to_vec();
    for _ in 0..4 {
        req.extend_from_slice(format!("{:x}\r\n{}\r\n", 600, " ".repeat(600)).as_bytes());
    }
    req.extend_from_slice(b"0\r\n\r\n");
    c.write_all(&req).unwrap();
    let (status, body) = read_response(&mut c);
    assert_eq!(status, 413, "{body}");
    assert_eq!(s.get("/health").status, 200);
}

#[test]
fn api_key() {
    let s = server("key", 0, ServeOptions { api_key: Some("sekrit".into()), ..opts() });
    let body = json!({ "prompt": "a", "max_tokens": 8, "block_len": 8 }).to_string();
    let req = |hs: &[(&str, &str)], method: &str, path: &str| {
        client::request(&s.addr, method, path, hs, if method == "POST" { body.as_bytes() } else { b"" }, T).unwrap()
    };
    for path in ["/v1/completions", "/v1/chat/completions"] {
        let v = refused(&req(&[], "POST", path), 401, None, "API key");
        assert_eq!(v["error"]["code"], "invalid_api_key");
        refused(&req(&[("Authorization", "Bearer wrong")], "POST", path), 401, None, "API key");
        refused(&req(&[("Authorization", "sekrit")], "POST", path), 401, None, "API key");
        refused(&req(&[("Authorization", "Bearer sekrit2")], "POST", path), 401, None, "API key");
    }
    refused(&req(&[], "GET", "/v1/models"), 401, None, "API key");
    let ok = req(&[("Authorization", "Bearer sekrit")], "POST", "/v1/completions");
    assert_eq!(ok.status, 200, "{}", ok.text());
    let ok = req(&[("Authorization", "Bearer sekrit")], "GET", "/v1/models");
    assert_eq!(ok.status, 200, "{}", ok.text());
    // Health and metrics stay open (load balancers and scrapers hold no key).
    assert_eq!(req(&[], "GET", "/health").status, 200);
    assert_eq!(req(&[], "GET", "/metrics").status, 200);
    assert_eq!(s.h.metrics.requests(demask::serve::metrics::Outcome::Ok), 1);
}
