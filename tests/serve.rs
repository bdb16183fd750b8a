//! `demask serve` over raw HTTP: an in-process server (`demask::serve::spawn`) on a tiny random
//! checkpoint with its byte-level tokenizer, driven with `demask::serve::client`. Every answer
//! that decodes is compared with `Engine::generate` on the same checkpoint for the request
//! built the way `src/serve/api.rs::build` builds it (prompt ids through the tokenizer, gen_len
//! = max_tokens rounded up to the block length, seed, seq_id = the choice index, the policy's
//! top-k), so "a served result equals `demask generate`" is checked, not assumed.
//!
//! Also: every refusal is an OpenAI-style error body naming the field; auth; body limits;
//! the queue limit (429); slow, silent and dropped clients; a client that goes away mid-stream
//! cancels its request; 100 concurrent mixed requests. The official `openai` Python client is
//! driven against the real binary by `serve_openai_client` at the end (tools/serve/test_openai.py).
//! Runs on the CPU backend.
mod serve_common;


use demask::prelude::*;
use serde_json::{json, Value};

use serve_common::*;

#[test]
fn completions_text_and_ids_equal_generate() {
    let s = server("compl", 0, opts());
    let tok = s.tok();
    let mut eng = s.engine();

    // A text prompt, greedy, max_tokens rounded up (12 -> 16 with blocks of 8).
    let st = Settings { max_tokens: 12, ..Default::default() };
    let v = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": "Hello there" })));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["id"].as_str().unwrap().starts_with("cmpl-"), "{v}");
    assert_eq!(v["choices"].as_array().unwrap().len(), 1);
    assert_eq!(v["demask"]["gen_len"], 16);
    assert_eq!(v["demask"]["block_len"], 8);
    assert_eq!(v["demask"]["policy"], "schedule:4");
    assert!(v["demask"]["note"].as_str().unwrap().contains("rounded up"), "{v}");
    let prompt = tok.encode("Hello there", true).unwrap();
    let out = eng.generate(&[st.request(prompt.clone(), 0)]).unwrap().remove(0);
    same_as_generate(&v["choices"][0], &out, "text prompt");
    assert_eq!(out.tokens.len(), 16);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], out.generated_tokens);
    assert_eq!(v["usage"]["total_tokens"], prompt.len() + out.generated_tokens);

    // The same prompt as token ids (and as a list of one id list): the same answer.
    let v2 = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": prompt })));
    same_as_generate(&v2["choices"][0], &out, "id prompt");
    let v3 = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": [prompt] })));
    same_as_generate(&v3["choices"][0], &out, "[[ids]] prompt");
    let v4 = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": ["Hello there"] })));
    same_as_generate(&v4["choices"][0], &out, "[text] prompt");

    // Ids that are not text (specials, reserved ids), sampling with a seed, a cache scheme and
    // the threshold policy.
    let ids: Vec<u32> = vec![505, 300, 7, 200, 42, 480, 1];
    let st = Settings {
        max_tokens: 32,
        block_len: 16,
        temperature: 0.9,
        top_p: 0.95,
        seed: 1234,
        policy: "threshold:0.9",
        cache: "dual",
        stop_at_eos: true,
    };
    let v = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": ids })));
    let out = eng.generate(&[st.request(ids.clone(), 0)]).unwrap().remove(0);
    same_as_generate(&v["choices"][0], &out, "sampled id prompt");
    assert!(v["demask"]["note"].is_null(), "32 is a multiple of 16: no rounding note: {v}");

    // Defaults: max_tokens 16 -> one block of the server's default 32, threshold:0.9, no
    // cache, greedy, stop at EOS.
    let v = s.ok("/v1/completions", &json!({ "prompt": "abc" }));
    assert_eq!(v["demask"]["gen_len"], 32);
    assert_eq!(v["demask"]["block_len"], 32);
    assert_eq!(v["demask"]["policy"], "threshold:0.9");
    assert_eq!(v["demask"]["cache"], "none");
    let want = Request::ids(tok.encode("abc", true).unwrap()).gen_len(32).block_len(32);
    let out = eng.generate(&[want]).unwrap().remove(0);
    same_as_generate(&v["choices"][0], &out, "defaults");

    // `steps` instead of a policy: total steps over the blocks.
    let st = Settings { max_tokens: 16, block_len: 8, ..Default::default() };
    let mut body = with(st.body(), json!({ "prompt": "xy", "steps": 8 }));
    body.as_object_mut().unwrap().remove("policy");
    let v = s.ok("/v1/completions", &body);
    assert_eq!(v["demask"]["policy"], "schedule:4");
    let out = eng.generate(&[st.request(tok.encode("xy", true).unwrap(), 0)]).unwrap().remove(0);
    same_as_generate(&v["choices"][0], &out, "steps");
}

#[test]
fn chat_multi_message_equals_generate() {
    let s = server("chat", 0, opts());
    let tok = s.tok();
    let mut eng = s.engine();
    let st = Settings { max_tokens: 16, block_len: 8, cache: "prefix", ..Default::default() };
    let msgs = [
        ("system", "You are terse."),
        ("user", "Name a colour."),
        ("assistant", "Blue."),
        ("user", "Another one?"),
    ];
    let messages: Vec<Value> = msgs.iter().map(|(r, c)| json!({ "role": r, "content": c })).collect();
    let v = s.ok("/v1/chat/completions", &with(st.body(), json!({ "messages": messages })));
    assert_eq!(v["object"], "chat.completion");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"), "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["message"]["role"], "assistant");
    let prompt = chat_ids(&tok, &msgs);
    // The template really holds every message.
    let rendered = tok.decode(&prompt, false).unwrap();
    for (_, text) in msgs {
        assert!(rendered.contains(text), "{rendered}");
    }
    let out = eng.generate(&[st.request(prompt.clone(), 0)]).unwrap().remove(0);
    same_as_generate(c, &out, "chat");
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    // Content parts, `developer` as system, and max_completion_tokens over max_tokens.
    let body = with(
        st.body(),
        json!({
            "max_tokens": 999, "max_completion_tokens": 16,
            "messages": [
                { "role": "developer", "content": "You are terse." },
                { "role": "user", "content": [{ "type": "text", "text": "Name a " }, { "type": "text", "text": "colour." }] },
                { "role": "assistant", "content": "Blue." },
                { "role": "user", "content": "Another one?" },
            ],
        }),
    );
    let v2 = s.ok("/v1/chat/completions", &body);
    same_as_generate(&v2["choices"][0], &out, "chat with parts");

    // One user message equals the engine's own chat prompt.
    let st = Settings::default();
    let v = s.ok("/v1/chat/completions", &with(st.body(), json!({ "messages": [{ "role": "user", "content": "Hi" }] })));
    let prompt = eng.prompt_ids(&Prompt::Text { text: "Hi".into(), chat: true }).unwrap();
    let out = eng.generate(&[st.request(prompt, 0)]).unwrap().remove(0);
    same_as_generate(&v["choices"][0], &out, "one message");
}

#[test]
fn streaming_completions_and_chat() {
    let s = server("stream", 0, opts());
    let tok = s.tok();
    let mut eng = s.engine();
    let st = Settings { max_tokens: 32, block_len: 8, policy: "threshold:0.9", cache: "dual", ..Default::default() };
    let body = with(st.body(), json!({ "prompt": "Stream me" }));
    let whole = s.ok("/v1/completions", &body);

    // Completions: one chunk per finished block (4 blocks) at least; deltas concatenate to
    // the whole response; no usage chunk unless asked.
    let (r, ev) = s.stream("/v1/completions", &with(body.clone(), json!({ "stream": true })));
    let cs = chunks(&r, &ev);
    assert!(cs.len() >= 2, "{cs:?}");
    for c in &cs {
        assert_eq!(c["object"], "text_completion", "{c}");
        assert_eq!(c["model"], MODEL);
        assert_eq!(c["id"], cs[0]["id"], "one id per stream");
        assert!(c.get("usage").is_none_or(Value::is_null), "no usage chunk unless asked: {c}");
    }
    let a = assemble(&cs, 1);
    assert_eq!(a[0].0, whole["choices"][0]["text"].as_str().unwrap(), "streamed text");
    assert_eq!(a[0].1, ids_of(&whole["choices"][0]["demask"]["tokens"]), "streamed ids");
    assert_eq!(a[0].2.as_deref(), whole["choices"][0]["finish_reason"].as_str());
    let prompt = tok.encode("Stream me", true).unwrap();
    let out = eng.generate(&[st.request(prompt.clone(), 0)]).unwrap().remove(0);
    assert_eq!(a[0].1, until_eos(&out.tokens));
    if !out.tokens[..8].contains(&EOS) && !out.tokens[..8].contains(&EOT) {
        // Text arrives block by block: the first chunk holds the first block's ids.
        assert_eq!(ids_of(&cs[0]["choices"][0]["demask"]["tokens"]), out.tokens[..8].to_vec(), "{cs:?}");
    }
    assert!(cs[..cs.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()), "only the last chunk finishes");

    // include_usage: a last chunk with no choices and the usage, before [DONE].
    let (r, ev) = s.stream(
        "/v1/completions",
        &with(body.clone(), json!({ "stream": true, "stream_options": { "include_usage": true } })),
    );
    let cs = chunks(&r, &ev);
    let last = cs.last().unwrap();
    assert_eq!(last["choices"], json!([]), "{last}");
    assert_eq!(last["usage"]["prompt_tokens"], prompt.len());
    assert_eq!(last["usage"]["completion_tokens"], out.generated_tokens);
    assert_eq!(last["usage"]["total_tokens"], prompt.len() + out.generated_tokens);
    assert_eq!(assemble(&cs[..cs.len() - 1], 1)[0].0, a[0].0);

    // Chat: role in the first delta only; deltas concatenate to the whole message.
    let cbody = with(st.body(), json!({ "messages": [{ "role": "system", "content": "S" }, { "role": "user", "content": "U" }] }));
    let whole = s.ok("/v1/chat/completions", &cbody);
    let (r, ev) = s.stream("/v1/chat/completions", &with(cbody, json!({ "stream": true })));
    let cs = chunks(&r, &ev);
    for (i, c) in cs.iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk", "{c}");
        assert!(c["id"].as_str().unwrap().starts_with("chatcmpl-"));
        let role = &c["choices"][0]["delta"]["role"];
        if i == 0 {
            assert_eq!(role, "assistant", "{c}");
        } else {
            assert!(role.is_null(), "role only in the first delta: {c}");
        }
    }
    let a = assemble(&cs, 1);
    assert_eq!(a[0].0, whole["choices"][0]["message"]["content"].as_str().unwrap());
    assert_eq!(a[0].1, ids_of(&whole["choices"][0]["demask"]["tokens"]));
    assert_eq!(a[0].2.as_deref(), whole["choices"][0]["finish_reason"].as_str());
}

#[test]
fn stream_canvas_events() {
    let s = server("canvas", 0, opts());
    let tok = s.tok();
    let mut eng = s.engine();
    let st = Settings { max_tokens: 16, block_len: 8, policy: "schedule:4", ..Default::default() };
    let body = with(st.body(), json!({ "prompt": "canvas", "stream": true, "stream_canvas": true }));
    let (r, ev) = s.stream("/v1/completions", &body);
    let cs = chunks(&r, &ev);
    let out = eng.generate(&[st.request(tok.encode("canvas", true).unwrap(), 0)]).unwrap().remove(0);
    assert_eq!(out.steps, 8, "2 blocks of 4 steps");
    let canvases: Vec<&Value> = cs.iter().filter(|c| !c["choices"][0]["demask"]["canvas_ids"].is_null()).collect();
    assert_eq!(canvases.len(), out.steps as usize, "one canvas event per step: {cs:?}");
    for (k, c) in canvases.iter().enumerate() {
        let d = &c["choices"][0]["demask"];
        assert_eq!(d["step"], k, "steps in order: {c}");
        let ids = ids_of(&d["canvas_ids"]);
        assert_eq!(ids.len(), 16, "the whole gen region: {c}");
        // schedule:4 over blocks of 8: 2 slots per step.
        let masks = ids.iter().filter(|&&t| t == MASK).count();
        assert_eq!(masks, 16 - 2 * (k + 1), "step {k}: {c}");
        let text = d["canvas"].as_str().unwrap();
        assert_eq!(text.chars().filter(|&ch| ch == '░').count(), masks, "masks drawn as ░: {text:?}");
        assert_eq!(c["choices"][0]["text"], "", "canvas events carry no text");
    }
    assert_eq!(ids_of(&canvases.last().unwrap()["choices"][0]["demask"]["canvas_ids"]), out.tokens, "the last canvas is the result");
    let a = assemble(&cs, 1);
    assert_eq!(a[0].1, until_eos(&out.tokens));
    assert_eq!(Some(a[0].0.as_str()), out.text.as_deref());
}

#[test]
fn n_choices_use_seq_ids() {
    let s = server("n2", 0, opts());
    let tok = s.tok();
    let mut eng = s.engine();
    let st = Settings { max_tokens: 16, block_len: 8, temperature: 1.0, seed: 77, policy: "random:4", ..Default::default() };
    let prompt = tok.encode("two of them", true).unwrap();
    let outs = eng.generate(&[st.request(prompt.clone(), 0), st.request(prompt.clone(), 1)]).unwrap();
    assert_ne!(outs[0].tokens, outs[1].tokens, "seq_id changes the draw");

    let body = with(st.body(), json!({ "prompt": "two of them", "n": 2 }));
    let v = s.ok("/v1/completions", &body);
    let ch = v["choices"].as_array().unwrap();
    assert_eq!(ch.len(), 2);
    for (i, c) in ch.iter().enumerate() {
        assert_eq!(c["index"], i);
        same_as_generate(c, &outs[i], &format!("choice {i}"));
    }
    assert_eq!(v["usage"]["prompt_tokens"], 2 * prompt.len());
    assert_eq!(v["usage"]["completion_tokens"], outs[0].generated_tokens + outs[1].generated_tokens);

    // Streaming n=2: each index's deltas concatenate to its choice.
    let (r, ev) = s.stream("/v1/completions", &with(body, json!({ "stream": true, "stream_options": { "include_usage": true } })));
    let cs = chunks(&r, &ev);
    let a = assemble(&cs, 2);
    for i in 0..2 {
        assert_eq!(a[i].1, until_eos(&outs[i].tokens), "choice {i}");
        assert_eq!(Some(a[i].0.as_str()), outs[i].text.as_deref(), "choice {i}");
        assert!(a[i].2.is_some(), "choice {i} finished");
    }
    assert_eq!(cs.last().unwrap()["usage"]["completion_tokens"], outs[0].generated_tokens + outs[1].generated_tokens);

    // Chat n=2, streaming: each choice's first delta carries the role.
    let cbody = with(st.body(), json!({ "n": 2, "stream": true, "messages": [{ "role": "user", "content": "hi" }] }));
    let (r, ev) = s.stream("/v1/chat/completions", &cbody);
    let cs = chunks(&r, &ev);
    for i in 0..2u64 {
        let first = cs.iter().find(|c| c["choices"][0]["index"] == i).unwrap();
        assert_eq!(first["choices"][0]["delta"]["role"], "assistant", "{first}");
    }
}

/// A stop string from the middle of a text: a character that does not occur before `at`.
fn stop_from(text: &str) -> Option<(String, String)> {
    let chars: Vec<char> = text.chars().collect();
    (chars.len() / 3..chars.len()).find_map(|i| {
        let c = chars[i];
        (c != '\u{FFFD}' && !c.is_whitespace()).then(|| {
            let stop = c.to_string();
            let cut = text.find(&stop).unwrap();
            (stop, text[..cut].to_string())
        })
    })
}

#[test]
fn stop_strings_cut_the_text() {
    let s = server("stop", 0, opts());
    let st = Settings { max_tokens: 32, block_len: 8, ..Default::default() };
    // Find a prompt whose greedy text is long enough to hold a stop string in its middle.
    let (body, full) = (0..20)
        .map(|k| {
            let body = with(st.body(), json!({ "prompt": format!("stop test {k}") }));
            let t = s.ok("/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string();
            (body, t)
        })
        .find(|(_, t)| t.chars().filter(|c| *c != '\u{FFFD}' && !c.is_whitespace()).count() >= 6)
        .expect("a prompt with a text of 6 or more characters");
    let (stop, want) = stop_from(&full).unwrap();

    // Non-streaming: the text ends before the first occurrence, finish_reason "stop".
    for stop_field in [json!(stop), json!(["never-there", stop])] {
        let v = s.ok("/v1/completions", &with(body.clone(), json!({ "stop": stop_field })));
        let c = &v["choices"][0];
        assert_eq!(c["text"], want, "stop {stop:?} in {full:?}");
        assert!(!c["text"].as_str().unwrap().contains(&stop));
        assert_eq!(c["finish_reason"], "stop");
    }

    // Streaming: the same text, never the stop string, in any delta.
    let (r, ev) = s.stream("/v1/completions", &with(body.clone(), json!({ "stop": stop, "stream": true })));
    let cs = chunks(&r, &ev);
    for c in &cs {
        assert!(!c["choices"][0]["text"].as_str().unwrap_or("").contains(&stop), "{c}");
    }
    let a = assemble(&cs, 1);
    assert_eq!(a[0].0, want, "streamed text with stop {stop:?} (full {full:?})");
    assert_eq!(a[0].2.as_deref(), Some("stop"));

    // A multi-character stop string that spans a block boundary is held back, then cut.
    let chars: Vec<char> = full.chars().collect();
    if chars.len() >= 12 {
        let s2: String = chars[6..10].iter().collect();
        if !s2.contains('\u{FFFD}') {
            let want2 = &full[..full.find(&s2).unwrap()];
            let v = s.ok("/v1/completions", &with(body.clone(), json!({ "stop": s2 })));
            assert_eq!(v["choices"][0]["text"], want2);
            let (r, ev) = s.stream("/v1/completions", &with(body.clone(), json!({ "stop": s2, "stream": true })));
            let a = assemble(&chunks(&r, &ev), 1);
            assert_eq!(a[0].0, want2, "streamed, stop {s2:?}");
        }
    }

    // Chat too.
    let cbody = with(st.body(), json!({ "messages": [{ "role": "user", "content": "stop test" }] }));
    let full = s.ok("/v1/chat/completions", &cbody)["choices"][0]["message"]["content"].as_str().unwrap().to_string();
    if let Some((stop, want)) = stop_from(&full) {
        let v = s.ok("/v1/chat/completions", &with(cbody.clone(), json!({ "stop": [stop] })));
        assert_eq!(v["choices"][0]["message"]["content"], want);
        let (r, ev) = s.stream("/v1/chat/completions", &with(cbody, json!({ "stop": [stop], "stream": true })));
        assert_eq!(assemble(&chunks(&r, &ev), 1)[0].0, want);
    }
}

/// Streaming usage counts the tokens of a choice that a stop string ended early (the stream
/// stops before the engine's final output; src/serve/sse.rs counts them at the early end).
#[test]
fn streaming_usage_counts_a_choice_ended_by_a_stop_string() {
    let s = server("stopusage", 0, opts());
    let st = Settings { max_tokens: 64, block_len: 8, ..Default::default() };
    let (body, full) = (0..20)
        .map(|k| {
            let body = with(st.body(), json!({ "prompt": format!("usage {k}") }));
            let t = s.ok("/v1/completions", &body)["choices"][0]["text"].as_str().unwrap().to_string();
            (body, t)
        })
        .find(|(_, t)| t.chars().filter(|c| *c != '\u{FFFD}' && !c.is_whitespace()).count() >= 6)
        .expect("a prompt with a text of 6 or more characters");
    let (stop, _) = stop_from(&full).unwrap();
    let (r, ev) = s.stream(
        "/v1/completions",
        &with(body, json!({ "stop": stop, "stream": true, "stream_options": { "include_usage": true } })),
    );
    let cs = chunks(&r, &ev);
    let a = assemble(&cs, 1);
    assert_eq!(a[0].2.as_deref(), Some("stop"));
    let streamed = a[0].1.len() as u64;
    let usage = &cs.last().unwrap()["usage"];
    assert!(
        usage["completion_tokens"].as_u64().unwrap() >= streamed.max(1),
        "usage.completion_tokens {} but {streamed} token ids were streamed: {usage}",
        usage["completion_tokens"]
    );
}

#[test]
fn models_health_metrics() {
    let s = server("meta", 0, opts());
    let v = s.get("/v1/models").json().unwrap();
    assert_eq!(v["object"], "list");
    let data = v["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(data[0]["id"], MODEL);
    assert_eq!(data[0]["object"], "model");
    assert_eq!(data[0]["demask"]["context"], CTX);
    assert_eq!(data[0]["demask"]["vocab"], 512);
    assert_eq!(data[0]["demask"]["tokenizer"], true);

    let h = s.get("/health");
    assert_eq!(h.status, 200);
    assert_eq!(h.json().unwrap()["status"], "ok");

    let m0 = s.metrics();
    for name in ["demask_requests_total", "demask_step_latency_ms", "demask_kv_rows_used", "demask_queue_depth"] {
        assert!(m0.contains(&format!("# TYPE {name} ")), "{name} in\n{m0}");
    }
    let st = Settings { max_tokens: 16, block_len: 8, cache: "dual", ..Default::default() };
    let v = s.ok("/v1/completions", &with(st.body(), json!({ "prompt": "count me" })));
    let bad = s.post("/v1/completions", &json!({ "prompt": "x", "temperature": -1 }));
    assert_eq!(bad.status, 400);
    let m1 = s.metrics();
    let d = |name: &str| metric(&m1, name) - metric(&m0, name);
    assert_eq!(d("demask_requests_total{status=\"ok\"}"), 1.0);
    assert_eq!(d("demask_requests_total{status=\"invalid\"}"), 1.0);
    assert_eq!(d("demask_requests_total{status=\"cancelled\"}"), 0.0);
    assert_eq!(d("demask_prompt_tokens_total"), v["usage"]["prompt_tokens"].as_f64().unwrap());
    assert_eq!(d("demask_generated_tokens_total"), v["usage"]["completion_tokens"].as_f64().unwrap());
    let steps = v["choices"][0]["demask"]["steps"].as_f64().unwrap();
    assert_eq!(d("demask_steps_total"), steps, "one request alone: its steps are the engine's");
    assert_eq!(d("demask_step_latency_ms_count"), steps);
    assert_eq!(metric(&m1, "demask_active_requests"), 0.0);
    assert_eq!(metric(&m1, "demask_queue_depth"), 0.0);
    // (The kv gauge is refreshed just after the response is sent: poll.)
    wait_for(10, "a finished request frees its rows", || s.metric("demask_kv_rows_used") == 0.0);
    assert!(metric(&m1, "demask_kv_rows_capacity") > 0.0);
    assert_eq!(metric(&m1, "demask_batch_size"), 1.0);
}
