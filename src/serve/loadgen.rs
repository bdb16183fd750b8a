//! `demask loadgen`: N concurrent clients against a running server; throughput and latency
//! percentiles, requests lost, and the server's device memory over the run (from `/metrics`).
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::json;

use super::client;

/// What to send.
#[derive(Clone, Debug)]
pub struct LoadSpec {
    /// `host:port` of the server.
    pub addr: String,
    pub api_key: Option<String>,
    /// Concurrent clients (each sends one request at a time).
    pub clients: usize,
    /// Requests in all.
    pub requests: usize,
    /// Random token-id prompts of this length.
    pub prompt_len: usize,
    /// `max_tokens` (a multiple of `block_len`, so nothing is rounded).
    pub gen_len: u32,
    pub block_len: u32,
    pub policy: String,
    pub cache: String,
    /// Streaming (`stream: true`) or whole responses.
    pub stream: bool,
    /// Let EOS end a sequence (off: every request decodes its whole gen length, as the
    /// benchmark's fixed schedules do).
    pub stop_at_eos: bool,
    pub seed: u64,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// Percentiles of a latency sample, ms.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Pcts {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Pcts {
    pub fn of(mut v: Vec<f64>) -> Self {
        if v.is_empty() {
            return Pcts::default();
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| v[((q * (v.len() - 1) as f64).round() as usize).min(v.len() - 1)];
        Pcts { p50: at(0.5), p90: at(0.9), p99: at(0.99), max: v[v.len() - 1] }
    }
}

/// What the run measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LoadReport {
    pub clients: usize,
    pub requests: usize,
    pub ok: usize,
    pub failed: usize,
    /// First few failure messages.
    pub errors: Vec<String>,
    pub wall_s: f64,
    pub completion_tokens: u64,
    pub tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Time to the first finished block (streaming) or to the whole response.
    pub first_block_ms: Pcts,
    pub completion_ms: Pcts,
    /// The server's device memory (bytes) sampled each second: first, min, max, last.
    pub device_memory: Option<[u64; 4]>,
    /// The server's `demask_batch_size` samples: mean over the run.
    pub mean_batch: f64,
}

/// Reads a gauge from the server's `/metrics`.
pub fn metric(addr: &str, name: &str) -> Option<f64> {
    let r = client::request(addr, "GET", "/metrics", &[], &[], Duration::from_secs(10)).ok()?;
    let text = r.text();
    text.lines().find(|l| l.starts_with(name) && l[name.len()..].starts_with('{')).and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// The body of request `i`: a random prompt over ids of the model's vocabulary that are not
/// special tokens.
fn body(spec: &LoadSpec, i: usize, vocab: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(spec.seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    let hi = (vocab / 2).max(2) as u32;
    let prompt: Vec<u32> = (0..spec.prompt_len).map(|_| rng.gen_range(1..hi)).collect();
    let mut b = json!({
        "prompt": prompt, "max_tokens": spec.gen_len, "block_len": spec.block_len, "policy": spec.policy,
        "cache": spec.cache, "stop_at_eos": spec.stop_at_eos, "seed": spec.seed + i as u64, "stream": spec.stream,
    });
    if spec.stream {
        b["stream_options"] = json!({ "include_usage": true });
    }
    serde_json::to_vec(&b).expect("json")
}

/// One request: (time to first block ms, completion ms, completion tokens) or an error.
fn one(spec: &LoadSpec, i: usize, vocab: usize) -> Result<(f64, f64, u64), String> {
    let auth = spec.api_key.as_ref().map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    let b = body(spec, i, vocab);
    let t0 = Instant::now();
    if !spec.stream {
        let r = client::request(&spec.addr, "POST", "/v1/completions", &headers, &b, spec.timeout).map_err(|e| e.to_string())?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let v = r.json().map_err(|e| e.to_string())?;
        if r.status != 200 {
            return Err(format!("HTTP {}: {}", r.status, v["error"]["message"]));
        }
        return Ok((ms, ms, v["usage"]["completion_tokens"].as_u64().unwrap_or(0)));
    }
    let mut first = None;
    let mut tokens = None;
    let mut done = false;
    let mut err = None;
    let r = client::stream(&spec.addr, "/v1/completions", &headers, &b, spec.timeout, |d| {
        if d == "[DONE]" {
            done = true;
            return false;
        }
        let Ok(v) = serde_json::from_str::<serde_json::Value>(d) else {
            err = Some(format!("event is not JSON: {d}"));
            return false;
        };
        if v.get("error").is_some() {
            err = Some(v["error"]["message"].to_string());
            return false;
        }
        if let Some(u) = v.get("usage") {
            tokens = u["completion_tokens"].as_u64();
        }
        let c = &v["choices"][0];
        let has = c["text"].as_str().is_some_and(|t| !t.is_empty())
            || c["demask"]["tokens"].as_array().is_some_and(|a| !a.is_empty());
        if has && first.is_none() {
            first = Some(t0.elapsed().as_secs_f64() * 1e3);
        }
        true
    })
    .map_err(|e| e.to_string())?;
    if r.status != 200 {
        return Err(format!("HTTP {}: {}", r.status, r.text()));
    }
    if let Some(e) = err {
        return Err(e);
    }
    if !done {
        return Err("the stream ended without [DONE]".into());
    }
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    Ok((first.unwrap_or(ms), ms, tokens.unwrap_or(0)))
}

/// Runs the load; `progress` is called about once a second with (done, total).
pub fn run(spec: &LoadSpec, mut progress: impl FnMut(usize, usize)) -> Result<LoadReport, String> {
    let models = client::request(&spec.addr, "GET", "/v1/models", &[], &[], Duration::from_secs(10))
        .map_err(|e| format!("cannot reach the server at {}: {e}", spec.addr))?;
    let vocab = models
        .json()
        .ok()
        .and_then(|v| v["data"][0]["demask"]["vocab"].as_u64())
        .ok_or_else(|| format!("GET /v1/models: HTTP {}: {}", models.status, models.text()))? as usize;
    let next = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::with_capacity(spec.requests)));
    let stop = Arc::new(AtomicBool::new(false));
    // Device memory (GPU servers only) and batch size, sampled each second.
    let on_device = metric(&spec.addr, "demask_device_memory_total_bytes").is_some_and(|t| t > 0.0);
    let sampler = {
        let (addr, stop) = (spec.addr.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut mem, mut batch) = (Vec::new(), Vec::new());
            while !stop.load(Relaxed) {
                if let Some(m) = metric(&addr, "demask_device_memory_used_bytes").filter(|_| on_device) {
                    mem.push(m as u64);
                }
                if let Some(b) = metric(&addr, "demask_batch_size") {
                    batch.push(b);
                }
                std::thread::sleep(Duration::from_millis(1000));
            }
            (mem, batch)
        })
    };
    let t0 = Instant::now();
    let workers: Vec<_> = (0..spec.clients.max(1))
        .map(|_| {
            let (spec, next, finished, results) = (spec.clone(), next.clone(), finished.clone(), results.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Relaxed);
                if i >= spec.requests {
                    return;
                }
                let r = one(&spec, i, vocab);
                results.lock().unwrap_or_else(|p| p.into_inner()).push(r);
                finished.fetch_add(1, Relaxed);
            })
        })
        .collect();
    let mut last = Instant::now();
    while finished.load(Relaxed) < spec.requests && workers.iter().any(|w| !w.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= Duration::from_secs(1) {
            progress(finished.load(Relaxed), spec.requests);
            last = Instant::now();
        }
    }
    for w in workers {
        let _ = w.join();
    }
    let wall_s = t0.elapsed().as_secs_f64();
    stop.store(true, Relaxed);
    let (mem, batch) = sampler.join().unwrap_or_default();
    let results = std::mem::take(&mut *results.lock().unwrap_or_else(|p| p.into_inner()));
    let mut rep = LoadReport { clients: spec.clients, requests: spec.requests, wall_s, ..Default::default() };
    let (mut first, mut total) = (Vec::new(), Vec::new());
    for r in results {
        match r {
            Ok((f, t, n)) => {
                rep.ok += 1;
                first.push(f);
                total.push(t);
                rep.completion_tokens += n;
            }
            Err(e) => {
                rep.failed += 1;
                if rep.errors.len() < 5 {
                    rep.errors.push(e);
                }
            }
        }
    }
    rep.tokens_per_s = rep.completion_tokens as f64 / wall_s.max(1e-9);
    rep.requests_per_s = rep.ok as f64 / wall_s.max(1e-9);
    rep.first_block_ms = Pcts::of(first);
    rep.completion_ms = Pcts::of(total);
    if !mem.is_empty() {
        rep.device_memory =
            Some([mem[0], *mem.iter().min().unwrap_or(&0), *mem.iter().max().unwrap_or(&0), mem[mem.len() - 1]]);
    }
    rep.mean_batch = if batch.is_empty() { 0.0 } else { batch.iter().sum::<f64>() / batch.len() as f64 };
    Ok(rep)
}

#[cfg(test)]
mod tests {
    use super::Pcts;

    #[test]
    fn percentiles_pick_ranked_samples() {
        let p = Pcts::of((1..=100).rev().map(f64::from).collect());
        assert_eq!((p.p50, p.p90, p.p99, p.max), (51.0, 90.0, 99.0, 100.0));
        assert_eq!(Pcts::of(vec![]).max, 0.0);
    }
}
