//! The server's counters and gauges, rendered as Prometheus text at `GET /metrics`.
//!
//! Counters and gauges are atomics written by the engine thread and the HTTP tasks; the step
//! latency histogram sits behind a mutex taken once per step.
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Instant;

/// Upper bounds (ms) of the step latency histogram's buckets (+Inf is implied).
pub const STEP_MS_BUCKETS: [f64; 14] = [0.5, 1.0, 2.0, 4.0, 6.0, 8.0, 12.0, 16.0, 25.0, 50.0, 100.0, 250.0, 1000.0, 5000.0];

#[derive(Default)]
struct Histogram {
    counts: [u64; STEP_MS_BUCKETS.len() + 1],
    sum_ms: f64,
    n: u64,
}

/// How a request ended (the `status` label of `demask_requests_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    /// Refused before decoding: bad JSON or parameters (HTTP 4xx).
    Invalid,
    /// Refused because the queue was full (HTTP 429).
    Rejected,
    /// The client went away; its rows were freed.
    Cancelled,
    /// The engine failed while decoding it (HTTP 500 or an error event).
    Failed,
}

impl Outcome {
    const ALL: [Outcome; 5] = [Outcome::Ok, Outcome::Invalid, Outcome::Rejected, Outcome::Cancelled, Outcome::Failed];
    fn label(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Invalid => "invalid",
            Outcome::Rejected => "rejected",
            Outcome::Cancelled => "cancelled",
            Outcome::Failed => "failed",
        }
    }
}

/// Everything `/metrics` reports.
pub struct Metrics {
    started: Instant,
    requests: [AtomicU64; 5],
    pub prompt_tokens: AtomicU64,
    pub generated_tokens: AtomicU64,
    pub steps: AtomicU64,
    /// Sequences in the last step's batch.
    pub batch_size: AtomicU64,
    /// Requests accepted but not admitted to the batch yet (server channel + engine queue).
    pub queue_depth: AtomicU64,
    /// Requests decoding now.
    pub active: AtomicU64,
    pub kv_rows_used: AtomicU64,
    pub kv_rows_capacity: AtomicU64,
    pub kv_row_bytes: AtomicU64,
    /// Device memory in use (bytes; 0 on the CPU backend).
    pub device_memory_used: AtomicU64,
    pub device_memory_total: AtomicU64,
    step_ms: Mutex<Histogram>,
    /// (time, steps) at the last rate sample, for the steps/s gauge.
    rate: Mutex<(Instant, u64, f64)>,
}

impl Default for Metrics {
    fn default() -> Self {
        let now = Instant::now();
        Metrics {
            started: now,
            requests: Default::default(),
            prompt_tokens: AtomicU64::new(0),
            generated_tokens: AtomicU64::new(0),
            steps: AtomicU64::new(0),
            batch_size: AtomicU64::new(0),
            queue_depth: AtomicU64::new(0),
            active: AtomicU64::new(0),
            kv_rows_used: AtomicU64::new(0),
            kv_rows_capacity: AtomicU64::new(0),
            kv_row_bytes: AtomicU64::new(0),
            device_memory_used: AtomicU64::new(0),
            device_memory_total: AtomicU64::new(0),
            step_ms: Mutex::new(Histogram::default()),
            rate: Mutex::new((now, 0, 0.0)),
        }
    }
}

impl Metrics {
    pub fn count(&self, o: Outcome) {
        self.requests[o as usize].fetch_add(1, Relaxed);
    }

    pub fn requests(&self, o: Outcome) -> u64 {
        self.requests[o as usize].load(Relaxed)
    }

    /// One engine step of `ms` over `batch` sequences.
    pub fn observe_step(&self, ms: f64, batch: usize) {
        self.steps.fetch_add(1, Relaxed);
        self.batch_size.store(batch as u64, Relaxed);
        let mut h = self.step_ms.lock().unwrap_or_else(|p| p.into_inner());
        let b = STEP_MS_BUCKETS.iter().position(|&ub| ms <= ub).unwrap_or(STEP_MS_BUCKETS.len());
        h.counts[b] += 1;
        h.sum_ms += ms;
        h.n += 1;
    }

    /// Steps per second since the previous call that was at least a second ago (the gauge).
    fn steps_per_s(&self) -> f64 {
        let mut r = self.rate.lock().unwrap_or_else(|p| p.into_inner());
        let (t, n, last) = *r;
        let dt = t.elapsed().as_secs_f64();
        if dt < 1.0 {
            return last;
        }
        let now = self.steps.load(Relaxed);
        let rate = (now - n) as f64 / dt;
        *r = (Instant::now(), now, rate);
        rate
    }

    /// The Prometheus text exposition (version 0.0.4).
    pub fn render(&self, model: &str) -> String {
        let mut s = String::with_capacity(4096);
        let m = model.replace('\\', "\\\\").replace('"', "\\\"");
        let mut metric = |name: &str, kind: &str, help: &str, v: f64| {
            let _ = writeln!(s, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{model=\"{m}\"}} {v}");
        };
        metric("demask_uptime_seconds", "gauge", "Seconds since the server started.", self.started.elapsed().as_secs_f64());
        metric("demask_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.", self.prompt_tokens.load(Relaxed) as f64);
        metric(
            "demask_generated_tokens_total",
            "counter",
            "Generated tokens (non-EOS) of finished requests.",
            self.generated_tokens.load(Relaxed) as f64,
        );
        metric("demask_steps_total", "counter", "Engine steps (one forward over the batch each).", self.steps.load(Relaxed) as f64);
        metric("demask_steps_per_second", "gauge", "Engine steps per second over the last second or more.", self.steps_per_s());
        metric("demask_batch_size", "gauge", "Sequences in the last step.", self.batch_size.load(Relaxed) as f64);
        metric("demask_queue_depth", "gauge", "Requests waiting to join the batch.", self.queue_depth.load(Relaxed) as f64);
        metric("demask_active_requests", "gauge", "Requests decoding now.", self.active.load(Relaxed) as f64);
        metric("demask_kv_rows_used", "gauge", "KV-cache rows held by active requests.", self.kv_rows_used.load(Relaxed) as f64);
        metric("demask_kv_rows_capacity", "gauge", "KV-cache rows the engine holds.", self.kv_rows_capacity.load(Relaxed) as f64);
        let kv_bytes = self.kv_rows_used.load(Relaxed) * self.kv_row_bytes.load(Relaxed);
        metric("demask_kv_bytes_used", "gauge", "KV-cache bytes held by active requests.", kv_bytes as f64);
        metric("demask_device_memory_used_bytes", "gauge", "Device memory in use (0 on the CPU).", self.device_memory_used.load(Relaxed) as f64);
        metric("demask_device_memory_total_bytes", "gauge", "Device memory (0 on the CPU).", self.device_memory_total.load(Relaxed) as f64);
        let _ = writeln!(s, "# HELP demask_requests_total Requests by how they ended.\n# TYPE demask_requests_total counter");
        for o in Outcome::ALL {
            let _ = writeln!(s, "demask_requests_total{{model=\"{m}\",status=\"{}\"}} {}", o.label(), self.requests(o));
        }
        let h = self.step_ms.lock().unwrap_or_else(|p| p.into_inner());
        let _ = writeln!(
            s,
            "# HELP demask_step_latency_ms Wall time of one engine step (ms).\n# TYPE demask_step_latency_ms histogram"
        );
        let mut cum = 0;
        for (i, ub) in STEP_MS_BUCKETS.iter().enumerate() {
            cum += h.counts[i];
            let _ = writeln!(s, "demask_step_latency_ms_bucket{{model=\"{m}\",le=\"{ub}\"}} {cum}");
        }
        cum += h.counts[STEP_MS_BUCKETS.len()];
        let _ = writeln!(s, "demask_step_latency_ms_bucket{{model=\"{m}\",le=\"+Inf\"}} {cum}");
        let _ = writeln!(s, "demask_step_latency_ms_sum{{model=\"{m}\"}} {}", h.sum_ms);
        let _ = writeln!(s, "demask_step_latency_ms_count{{model=\"{m}\"}} {}", h.n);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_counters_render() {
        let m = Metrics::default();
        for ms in [0.3, 5.0, 7.0, 7.5, 20000.0] {
            m.observe_step(ms, 3);
        }
        m.count(Outcome::Ok);
        m.count(Outcome::Ok);
        m.count(Outcome::Rejected);
        m.generated_tokens.fetch_add(42, Relaxed);
        let t = m.render("tiny");
        assert!(t.contains("demask_step_latency_ms_bucket{model=\"tiny\",le=\"0.5\"} 1\n"), "{t}");
        assert!(t.contains("demask_step_latency_ms_bucket{model=\"tiny\",le=\"6\"} 2\n"), "{t}");
        assert!(t.contains("demask_step_latency_ms_bucket{model=\"tiny\",le=\"8\"} 4\n"), "{t}");
        assert!(t.contains("demask_step_latency_ms_bucket{model=\"tiny\",le=\"5000\"} 4\n"), "{t}");
        assert!(t.contains("demask_step_latency_ms_bucket{model=\"tiny\",le=\"+Inf\"} 5\n"), "{t}");
        assert!(t.contains("demask_step_latency_ms_count{model=\"tiny\"} 5\n"), "{t}");
        assert!(t.contains("demask_requests_total{model=\"tiny\",status=\"ok\"} 2\n"), "{t}");
        assert!(t.contains("demask_requests_total{model=\"tiny\",status=\"rejected\"} 1\n"), "{t}");
        assert!(t.contains("demask_generated_tokens_total{model=\"tiny\"} 42\n"), "{t}");
        assert!(t.contains("demask_batch_size{model=\"tiny\"} 3\n"), "{t}");
    }
}
