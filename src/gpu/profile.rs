//! Per-op timing of a forward pass with CUDA events: `mark(name)` after each op records an
//! event; the time between consecutive marks is charged to the op that ended there. Events are
//! created once (capacity fixed at construction); enabling the profiler adds one event record
//! per op and nothing else.
use std::collections::BTreeMap;

use cudarc::driver::{sys, CudaEvent};

use super::{drv, Gpu};
use crate::error::Result;

pub struct OpProfiler {
    events: Vec<CudaEvent>,
    names: Vec<&'static str>,
    used: usize,
    /// Accumulated ms per op name over every profiled forward since `reset`.
    totals: BTreeMap<&'static str, (f64, usize)>,
    forwards: usize,
}

impl OpProfiler {
    pub fn new(gpu: &Gpu, capacity: usize) -> Result<Self> {
        let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
        let events = (0..capacity + 1)
            .map(|_| gpu.ctx.new_event(flags).map_err(drv("cuEventCreate")))
            .collect::<Result<Vec<_>>>()?;
        Ok(OpProfiler { events, names: Vec::with_capacity(capacity + 1), used: 0, totals: BTreeMap::new(), forwards: 0 })
    }

    /// Starts a forward: records the first event.
    pub fn begin(&mut self, gpu: &Gpu) -> Result<()> {
        self.used = 0;
        self.names.clear();
        self.mark(gpu, "")
    }

    /// Records the end of op `name`.
    pub fn mark(&mut self, gpu: &Gpu, name: &'static str) -> Result<()> {
        if self.used < self.events.len() {
            self.events[self.used].record(&gpu.stream).map_err(drv("cuEventRecord"))?;
            self.names.push(name);
            self.used += 1;
        }
        Ok(())
    }

    /// Ends a forward: waits for it and adds each op's time to the totals.
    pub fn end(&mut self) -> Result<()> {
        if self.used == 0 {
            return Ok(());
        }
        self.events[self.used - 1].synchronize().map_err(drv("cuEventSynchronize"))?;
        for i in 1..self.used {
            let ms = self.events[i - 1].elapsed_ms(&self.events[i]).map_err(drv("cuEventElapsedTime"))? as f64;
            let e = self.totals.entry(self.names[i]).or_insert((0.0, 0));
            e.0 += ms;
            e.1 += 1;
        }
        self.forwards += 1;
        Ok(())
    }

    pub fn reset(&mut self) {
        self.totals.clear();
        self.forwards = 0;
    }

    /// (op, ms per forward, launches per forward), largest first.
    pub fn per_forward(&self) -> Vec<(&'static str, f64, f64)> {
        let n = self.forwards.max(1) as f64;
        let mut v: Vec<_> = self.totals.iter().map(|(k, (ms, c))| (*k, ms / n, *c as f64 / n)).collect();
        v.sort_by(|a, b| b.1.total_cmp(&a.1));
        v
    }
}
