//! CUDA graphs for the forward pass: which batch shapes replay a captured graph
//! ([`GraphCache`], keyed by [`ShapeKey`]), the capture itself ([`capture_and_launch`]), and
//! the packed index buffer that the captured kernels read ([`IndexLayout`], [`IndexViews`]).
//!
//! A forward's launches depend on its batch only through the host scalars of [`ShapeKey`]; the
//! per-step data (tokens, positions, cache rows, sequence spans, logit rows) is copied into one
//! fixed device buffer *before* a graph launches, and every kernel reads it from there. So two
//! batches with equal keys run identical launches: the first is run eagerly (it also autotunes
//! the cuBLASLt plans of its GEMM shapes, a host sync that must never happen inside a capture),
//! the second is captured into a graph and launched, later ones launch the graph only.
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::ops::Deref;
use std::sync::Arc;

use cudarc::driver::{result, sys, CudaContext, CudaGraph, CudaStream, DeviceRepr};

use super::{DTensor, Gpu};
use crate::error::{Error, Result};
use crate::ops::{attention::AttnVariant, gemm::GemmVariant, moe::MoeGemmVariant};

/// Every host scalar the forward's launches take from the batch (grid sizes, row counts,
/// branch choices). Everything else a launch uses is a fixed device address or a model
/// constant. Derived host choices are functions of these: the GEMM implementation
/// (`GemmVariant::resolve(rows or logit_rows, k)`), the attention path (`max_rows`, `seqs`,
/// the model's kv heads, the SM count), the index buffer offsets ([`IndexLayout::new`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShapeKey {
    /// Live rows (`RowBatch::rows()`).
    pub rows: usize,
    /// Sequences in the batch.
    pub seqs: usize,
    /// Most live rows of one sequence (sizes the attention grid).
    pub max_rows: usize,
    /// Rows whose logits are computed.
    pub logit_rows: usize,
    /// Logit rows are exactly `0..rows` (the LM head reads the hidden rows in place).
    pub identity: bool,
    pub gemm: GemmVariant,
    pub attn: AttnVariant,
    /// The expert-GEMM variant (MoE models; ignored by dense ones).
    pub moe: MoeGemmVariant,
}

impl Hash for ShapeKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self.rows, self.seqs, self.max_rows, self.logit_rows, self.identity).hash(h);
        (self.gemm.name(), self.attn.name(), self.moe.name()).hash(h);
    }
}

/// What a forward of a given key does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GraphStep {
    /// Launch op by op (first sighting, not capturable, or graphs off).
    Eager,
    /// Capture the launches into a graph, then launch it.
    Capture,
    /// Launch the key's graph.
    Replay,
}

/// Counters since the cache was created (for tests and bench output).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GraphStats {
    /// Graphs captured (each also ran its forward once).
    pub captures: u64,
    /// Forwards that launched a cached graph.
    pub replays: u64,
    /// Forwards that launched op by op (including failed captures' reruns).
    pub eager: u64,
    /// Captures that failed (the key then stays eager).
    pub failures: u64,
}

enum State<G> {
    Seen,
    Graph(G),
    Uncapturable,
}

struct Entry<G> {
    state: State<G>,
    last_use: u64,
}

/// Graphs by [`ShapeKey`], with the eager → capture → replay policy. Bounded: at `capacity`
/// keys the least recently used one is dropped (its graph with it). Generic over the graph type
/// so the bookkeeping is testable without a device.
pub struct GraphCache<G = Graph> {
    entries: HashMap<ShapeKey, Entry<G>>,
    capacity: usize,
    clock: u64,
    binding: Option<u64>,
    stats: GraphStats,
    last_failure: Option<String>,
}

/// A captured, instantiated CUDA graph owned by one model (derefs to cudarc's [`CudaGraph`]).
/// Unlike `CudaGraph` it is `Send`, so a model (and the engine over it) can move to another
/// thread; it is not `Sync`.
pub struct Graph {
    graph: CudaGraph,
    ctx: Arc<CudaContext>,
}

// SAFETY: `CudaGraph` is `!Send` only because it holds the raw `CUgraph` / `CUgraphExec`
// handles. CUDA lets any thread use them as long as calls on one graph are serialised (the
// driver's graph thread-safety rules) and, for launches, the owning context is current:
// `CudaGraph::launch` binds its stream's context itself, and `Drop` below binds it before the
// handles are destroyed. `Graph` is not `Sync` and is only reached through `&mut` of its
// `GraphCache`, so moving it between threads never makes two threads touch one graph.
unsafe impl Send for Graph {}

impl Deref for Graph {
    type Target = CudaGraph;
    fn deref(&self) -> &CudaGraph {
        &self.graph
    }
}

impl Drop for Graph {
    fn drop(&mut self) {
        // The graph may be dropped on a thread other than the one that captured it; make its
        // context current there before `CudaGraph`'s own drop destroys the handles.
        let _ = self.ctx.bind_to_thread();
    }
}

/// Keys (and graphs) a model keeps by default.
pub const DEFAULT_GRAPH_CAPACITY: usize = 64;

impl<G> GraphCache<G> {
    pub fn new(capacity: usize) -> Self {
        GraphCache {
            entries: HashMap::new(),
            capacity: capacity.max(1),
            clock: 0,
            binding: None,
            stats: GraphStats::default(),
            last_failure: None,
        }
    }

    /// Declares the device addresses the graphs were captured against (a fingerprint of every
    /// weight and cache buffer, see [`fingerprint`]); a change drops every graph and key.
    pub fn rebind(&mut self, binding: u64) {
        if self.binding != Some(binding) {
            self.entries.clear();
            self.binding = Some(binding);
        }
    }

    /// The step for `key` (seen once before → capture, captured → replay, else eager); records
    /// the sighting. Call [`GraphCache::captured`] or [`GraphCache::failed`] after a capture.
    pub fn plan(&mut self, key: ShapeKey) -> GraphStep {
        self.clock += 1;
        let now = self.clock;
        if let Some(e) = self.entries.get_mut(&key) {
            e.last_use = now;
            return match e.state {
                State::Seen => GraphStep::Capture,
                State::Graph(_) => {
                    self.stats.replays += 1;
                    GraphStep::Replay
                }
                State::Uncapturable => {
                    self.stats.eager += 1;
                    GraphStep::Eager
                }
            };
        }
        if self.entries.len() >= self.capacity {
            if let Some(old) = self.entries.iter().min_by_key(|(_, e)| e.last_use).map(|(k, _)| *k) {
                self.entries.remove(&old);
            }
        }
        self.entries.insert(key, Entry { state: State::Seen, last_use: now });
        self.stats.eager += 1;
        GraphStep::Eager
    }

    /// The graph captured for `key`.
    pub fn graph(&self, key: &ShapeKey) -> Option<&G> {
        match self.entries.get(key) {
            Some(Entry { state: State::Graph(g), .. }) => Some(g),
            _ => None,
        }
    }

    /// Stores the graph of a successful capture.
    pub fn captured(&mut self, key: ShapeKey, graph: G) {
        self.stats.captures += 1;
        let now = self.clock;
        self.entries.insert(key, Entry { state: State::Graph(graph), last_use: now });
    }

    /// Marks `key` as not capturable (it stays eager); its forward is rerun eagerly.
    pub fn failed(&mut self, key: ShapeKey, why: String) {
        self.stats.failures += 1;
        self.stats.eager += 1;
        self.last_failure = Some(why);
        let now = self.clock;
        self.entries.insert(key, Entry { state: State::Uncapturable, last_use: now });
    }

    /// Counts a forward run eagerly without consulting the cache (graphs off, profiling).
    pub fn note_eager(&mut self) {
        self.stats.eager += 1;
    }

    pub fn stats(&self) -> GraphStats {
        self.stats
    }

    /// Why the last capture failed.
    pub fn last_failure(&self) -> Option<&str> {
        self.last_failure.as_deref()
    }

    /// Graphs held now.
    pub fn graphs(&self) -> usize {
        self.entries.values().filter(|e| matches!(e.state, State::Graph(_))).count()
    }

    /// Drops every graph and key (counters stay).
    pub fn clear(&mut self) {
        self.entries.clear();
    }
}

/// Order-sensitive hash of device addresses and sizes (FNV-1a over u64 words).
pub fn fingerprint(words: impl IntoIterator<Item = u64>) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for w in words {
        h = (h ^ w).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// The capture mode: `DEMASK_GRAPH_CAPTURE_MODE` = `thread_local` (default), `global` or
/// `relaxed` (see cuStreamBeginCapture: which API calls of other threads / this thread are
/// refused while a capture is open).
pub fn capture_mode_from_env() -> Result<sys::CUstreamCaptureMode> {
    use sys::CUstreamCaptureMode as M;
    match std::env::var("DEMASK_GRAPH_CAPTURE_MODE").as_deref() {
        Err(_) | Ok("") | Ok("thread_local") => Ok(M::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL),
        Ok("global") => Ok(M::CU_STREAM_CAPTURE_MODE_GLOBAL),
        Ok("relaxed") => Ok(M::CU_STREAM_CAPTURE_MODE_RELAXED),
        Ok(other) => Err(Error::bad_input(format!(
            "DEMASK_GRAPH_CAPTURE_MODE={other}: expected thread_local, global or relaxed"
        ))),
    }
}

/// Why graphs cannot be captured on this stream at all, if so.
pub fn uncapturable_stream(stream: &CudaStream) -> Option<&'static str> {
    // cuStreamBeginCapture refuses the legacy NULL stream (CU_STREAM_LEGACY).
    stream.cu_stream().is_null().then_some("the GPU stream is the legacy default stream, which CUDA cannot capture")
}

/// Captures the launches `body` makes on `stream` into a graph, instantiates it and launches it
/// once (a capture records work without running it). On any failure — beginning the capture,
/// an error from `body`, ending or instantiating, the first launch — the stream is taken out of
/// capture mode and the reason is returned; nothing of `body` has run then.
pub fn capture_and_launch(
    stream: &Arc<CudaStream>,
    mode: sys::CUstreamCaptureMode,
    body: impl FnOnce() -> Result<()>,
) -> std::result::Result<Graph, String> {
    if let Some(why) = uncapturable_stream(stream) {
        return Err(why.to_string());
    }
    stream.begin_capture(mode).map_err(|e| format!("cuStreamBeginCapture: {e:?}"))?;
    let ran = body();
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    leave_capture(stream);
    match (ran, ended) {
        (Err(e), _) => Err(format!("a launch inside the capture failed: {e}")),
        (Ok(()), Err(e)) => Err(format!("cuStreamEndCapture / cuGraphInstantiate: {e:?}")),
        (Ok(()), Ok(None)) => Err("the capture recorded no work".to_string()),
        (Ok(()), Ok(Some(g))) => {
            g.launch().map_err(|e| format!("cuGraphLaunch of a new graph: {e:?}"))?;
            Ok(Graph { graph: g, ctx: stream.context().clone() })
        }
    }
}

/// Ends a capture still open on `stream` (after an error path), discarding its graph. Uses the
/// raw driver calls: cudarc's wrappers first report errors recorded earlier and would skip it.
fn leave_capture(stream: &CudaStream) {
    let s = stream.cu_stream();
    // SAFETY: `s` is the live stream of `stream`; a graph returned by the end call is owned
    // here and destroyed once.
    unsafe {
        let closed =
            matches!(result::stream::is_capturing(s), Ok(sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE));
        if !closed {
            if let Ok(g) = result::stream::end_capture(s) {
                if !g.is_null() {
                    let _ = result::graph::destroy(g);
                }
            }
        }
    }
}

/// Where the per-forward index arrays sit in the packed index buffer (u32 offsets). Compact
/// for the batch's sizes, each array starting on a 64-byte boundary; the offsets depend only on
/// (rows, seqs, logit_rows), all part of [`ShapeKey`], so a replayed graph reads the arrays of
/// the current batch at the addresses it captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IndexLayout {
    pub rows: usize,
    pub seqs: usize,
    pub logit_rows: usize,
    /// Input token per live row `[rows]`.
    pub tokens: usize,
    /// Absolute position per live row `[rows]`.
    pub positions: usize,
    /// Cache row written per live row `[rows]` (`cache_base + position`).
    pub cache_rows: usize,
    /// Sequence spans `[seqs, 4]`: row_start, row_count, cache_base, kv_len.
    pub spans: usize,
    /// Keys each sequence's live rows write `[seqs, 2]`: lo, hi (positions lo..hi; see
    /// `ops::attention::attention`'s `fresh`).
    pub fresh: usize,
    /// Rows whose logits are computed `[logit_rows]`.
    pub logit_idx: usize,
    /// Elements copied per forward (`logit_idx + logit_rows`).
    pub len: usize,
}

/// Alignment of each array in the packed buffer, in u32 (64 bytes).
const INDEX_ALIGN: usize = 16;

impl IndexLayout {
    pub fn new(rows: usize, seqs: usize, logit_rows: usize) -> Self {
        let a = |n: usize| n.next_multiple_of(INDEX_ALIGN);
        let positions = a(rows);
        let cache_rows = positions + a(rows);
        let spans = cache_rows + a(rows);
        let fresh = spans + a(4 * seqs);
        let logit_idx = fresh + a(2 * seqs);
        IndexLayout {
            rows,
            seqs,
            logit_rows,
            tokens: 0,
            positions,
            cache_rows,
            spans,
            fresh,
            logit_idx,
            len: logit_idx + logit_rows,
        }
    }
}

/// A `DTensor` over part of another tensor's allocation, borrowed from it; dropping it never
/// frees memory. Read-only (ops take index arrays as `&DTensor`).
pub struct DView<'a, T: DeviceRepr> {
    t: ManuallyDrop<DTensor<T>>,
    _owner: PhantomData<&'a DTensor<T>>,
}

impl<'a, T: DeviceRepr> DView<'a, T> {
    /// Elements `[offset, offset + len)` of `owner` as a 1-D tensor.
    pub fn new(gpu: &Gpu, owner: &'a DTensor<T>, offset: usize, len: usize) -> Result<Self> {
        if offset + len > owner.len() {
            return Err(Error::shape("view", "owner", &[offset + len], &owner.dims));
        }
        let addr = owner.ptr(gpu) + (offset * std::mem::size_of::<T>()) as u64;
        // SAFETY: [addr, addr + len·size_of T) lies inside `owner`'s allocation (checked), which
        // outlives the view ('a); the slice is never freed (Drop leaks it) and never written
        // through (no mutable access is handed out). Event tracking is off (Gpu::new), so no
        // events are created.
        let buf = unsafe { gpu.stream.upgrade_device_ptr::<T>(addr, len) };
        Ok(DView { t: ManuallyDrop::new(DTensor { buf, dims: vec![len] }), _owner: PhantomData })
    }
}

impl<T: DeviceRepr> Deref for DView<'_, T> {
    type Target = DTensor<T>;
    fn deref(&self) -> &DTensor<T> {
        &self.t
    }
}

impl<T: DeviceRepr> Drop for DView<'_, T> {
    fn drop(&mut self) {
        // SAFETY: `t` is taken exactly once, here; `leak` releases the slice's stream handle
        // without freeing the owner's memory.
        let t = unsafe { ManuallyDrop::take(&mut self.t) };
        let _ = t.buf.leak();
    }
}

/// The six index arrays of one forward, as views into the packed buffer.
pub struct IndexViews<'a> {
    pub tokens: DView<'a, u32>,
    pub positions: DView<'a, u32>,
    pub cache_rows: DView<'a, u32>,
    pub spans: DView<'a, u32>,
    pub fresh: DView<'a, u32>,
    pub logit_rows: DView<'a, u32>,
}

impl<'a> IndexViews<'a> {
    pub fn new(gpu: &Gpu, packed: &'a DTensor<u32>, l: &IndexLayout) -> Result<Self> {
        Ok(IndexViews {
            tokens: DView::new(gpu, packed, l.tokens, l.rows)?,
            positions: DView::new(gpu, packed, l.positions, l.rows)?,
            cache_rows: DView::new(gpu, packed, l.cache_rows, l.rows)?,
            spans: DView::new(gpu, packed, l.spans, 4 * l.seqs)?,
            fresh: DView::new(gpu, packed, l.fresh, 2 * l.seqs)?,
            logit_rows: DView::new(gpu, packed, l.logit_idx, l.logit_rows)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(rows: usize) -> ShapeKey {
        ShapeKey {
            rows,
            seqs: 1,
            max_rows: rows,
            logit_rows: rows,
            identity: true,
            gemm: GemmVariant::Auto,
            attn: AttnVariant::Flash,
            moe: MoeGemmVariant::Grouped,
        }
    }

    #[test]
    fn eager_then_capture_then_replay() {
        let mut c: GraphCache<u32> = GraphCache::new(8);
        let k = key(32);
        assert_eq!(c.plan(k), GraphStep::Eager);
        assert_eq!(c.plan(k), GraphStep::Capture);
        c.captured(k, 7);
        assert_eq!(c.graph(&k), Some(&7));
        for _ in 0..3 {
            assert_eq!(c.plan(k), GraphStep::Replay);
        }
        // Any differing field is another key.
        let others = [
            ShapeKey { rows: 33, ..k },
            ShapeKey { seqs: 2, ..k },
            ShapeKey { max_rows: 16, ..k },
            ShapeKey { logit_rows: 31, ..k },
            ShapeKey { identity: false, ..k },
            ShapeKey { gemm: GemmVariant::Skinny, ..k },
            ShapeKey { attn: AttnVariant::Reference, ..k },
            ShapeKey { moe: MoeGemmVariant::Reference, ..k },
        ];
        for o in others {
            assert_eq!(c.plan(o), GraphStep::Eager, "{o:?}");
            assert!(c.graph(&o).is_none());
        }
        assert_eq!(c.stats(), GraphStats { captures: 1, replays: 3, eager: 9, failures: 0 });
    }

    #[test]
    fn uncapturable_keys_stay_eager() {
        let mut c: GraphCache<u32> = GraphCache::new(8);
        let k = key(5);
        assert_eq!(c.plan(k), GraphStep::Eager);
        assert_eq!(c.plan(k), GraphStep::Capture);
        c.failed(k, "no".into());
        for _ in 0..3 {
            assert_eq!(c.plan(k), GraphStep::Eager);
        }
        assert_eq!(c.last_failure(), Some("no"));
        assert_eq!(c.stats(), GraphStats { captures: 0, replays: 0, eager: 5, failures: 1 });
        assert_eq!(c.graphs(), 0);
    }

    #[test]
    fn bounded_lru_and_rebind() {
        let mut c: GraphCache<usize> = GraphCache::new(3);
        c.rebind(1);
        for t in 1..=3 {
            c.plan(key(t));
            c.plan(key(t));
            c.captured(key(t), t);
        }
        assert_eq!(c.graphs(), 3);
        // Touch 1 and 3, so 2 is the least recently used when 4 arrives.
        assert_eq!(c.plan(key(1)), GraphStep::Replay);
        assert_eq!(c.plan(key(3)), GraphStep::Replay);
        assert_eq!(c.plan(key(4)), GraphStep::Eager);
        assert!(c.graph(&key(2)).is_none());
        assert_eq!((c.graph(&key(1)), c.graph(&key(3))), (Some(&1), Some(&3)));
        // Seen again after eviction: eager first, as if new.
        assert_eq!(c.plan(key(2)), GraphStep::Eager);
        // Same binding keeps the graphs, another drops them all.
        c.rebind(1);
        assert!(c.graphs() > 0);
        c.rebind(2);
        assert_eq!(c.graphs(), 0);
        assert_eq!(c.plan(key(1)), GraphStep::Eager);
    }

    #[test]
    fn index_layout_is_compact_aligned_and_monotone() {
        let l = IndexLayout::new(19, 3, 5);
        assert_eq!(
            (l.tokens, l.positions, l.cache_rows, l.spans, l.fresh, l.logit_idx, l.len),
            (0, 32, 64, 96, 112, 128, 133)
        );
        for (r, s, g) in [(1, 1, 1), (99, 7, 0), (111, 2, 111), (4096, 8, 512)] {
            let l = IndexLayout::new(r, s, g);
            for off in [l.positions, l.cache_rows, l.spans, l.fresh, l.logit_idx] {
                assert_eq!(off % INDEX_ALIGN, 0);
            }
            assert!(l.positions >= r && l.cache_rows - l.positions >= r && l.spans - l.cache_rows >= r);
            assert!(l.fresh - l.spans >= 4 * s && l.logit_idx - l.fresh >= 2 * s && l.len == l.logit_idx + g);
            // A buffer sized for the capacity holds every smaller batch.
            assert!(IndexLayout::new(r + 1, s + 1, g + 1).len >= l.len);
        }
        assert_eq!(fingerprint([1, 2]), fingerprint([1, 2]));
        assert_ne!(fingerprint([1, 2]), fingerprint([2, 1]));
    }
}
