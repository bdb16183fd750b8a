//! What the engine is asked: [`Prompt`] and [`Request`], built with defaults and chained
//! setters. Re-exported from `engine` (and `prelude`).
use crate::cache::CacheScheme;
use crate::decode::prior::Prior;
use crate::decode::{Policy, Sampling};

/// A request's prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Prompt {
    /// Token ids, used as they are.
    Ids(Vec<u32>),
    /// Text, tokenized with the checkpoint's tokenizer; with `chat`, first wrapped in the chat
    /// template as one user message (with the generation prompt).
    Text { text: String, chat: bool },
}

impl From<Vec<u32>> for Prompt {
    fn from(ids: Vec<u32>) -> Self {
        Prompt::Ids(ids)
    }
}

impl From<&[u32]> for Prompt {
    fn from(ids: &[u32]) -> Self {
        Prompt::Ids(ids.to_vec())
    }
}

/// Plain text (no chat template).
impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text { text, chat: false }
    }
}

/// Plain text (no chat template).
impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text { text: text.to_string(), chat: false }
    }
}

/// Slots a request generates unless told otherwise ([`Request::gen_len`]).
pub const DEFAULT_GEN_LEN: u32 = 128;

/// The commit policy a request uses unless told otherwise: `threshold:0.9` (commit every slot
/// whose confidence reaches 0.9, at least one per step; Fast-dLLM's parallel decoding).
pub const DEFAULT_POLICY: Policy = Policy::Threshold { tau: 0.9 };

/// One sequence to decode: a prompt and how to decode it.
///
/// Build one with [`Request::text`], [`Request::ids`] or [`Request::new`] and chain setters
/// for what differs from the defaults:
///
/// | setting | default |
/// |---|---|
/// | [`gen_len`](Request::gen_len) | [`DEFAULT_GEN_LEN`] (128) slots |
/// | [`block_len`](Request::block_len) | one block (`gen_len`) |
/// | [`policy`](Request::policy) | [`DEFAULT_POLICY`] (`threshold:0.9`) |
/// | [`sampling`](Request::sampling) | greedy (temperature 0), no top-p, the policy's top-k ([`Sampling::POLICY_TOP_K`]: 50 for `dream:` policies, as Dream's `diffusion_generate`; off otherwise) |
/// | [`seed`](Request::seed), [`seq_id`](Request::seq_id) | 0, 0 |
/// | [`prior`](Request::prior) | none |
/// | [`stop_at_eos`](Request::stop_at_eos) | on |
/// | [`cache`](Request::cache) | [`CacheScheme::None`] (exact: every row recomputed every step) |
/// | [`chat`](Request::chat) | off (text prompts are tokenized as they are) |
///
/// Nothing is checked here: the engine validates a request when it is submitted
/// ([`Engine::submit`](crate::engine::Engine::submit), [`Engine::generate`](crate::engine::Engine::generate))
/// and names what is wrong. The public fields hold the same settings for reading (and
/// changing) after the request is built.
///
/// ```
/// use demask::prelude::*;
///
/// let r = Request::text("Write a haiku about rain.")
///     .chat(true)
///     .gen_len(64)
///     .block_len(16)
///     .policy("threshold:0.9".parse()?)
///     .cache(CacheScheme::Dual)
///     .sampling(Sampling { temperature: 0.7, top_k: 0, top_p: 0.95 })
///     .seed(42);
/// assert_eq!(r.gen_len, 64);
/// assert_eq!(r.block_len, Some(16));
/// assert_eq!(r.prompt, Prompt::Text { text: "Write a haiku about rain.".into(), chat: true });
///
/// // Token ids, everything else at its default.
/// let r = Request::ids(vec![1, 2, 3]);
/// assert_eq!((r.gen_len, r.block_len, r.policy), (DEFAULT_GEN_LEN, None, DEFAULT_POLICY));
/// # Ok::<(), demask::Error>(())
/// ```
#[derive(Clone, Debug)]
pub struct Request {
    pub prompt: Prompt,
    /// Slots to generate (> 0).
    pub gen_len: u32,
    /// Semi-autoregressive block length; must divide `gen_len`. `None`: one block of `gen_len`.
    /// LLaDA2: its attention block (config.json `block_length`, 32), which is also the default;
    /// blocks then sit at absolute multiples of it and need not divide `gen_len`.
    pub block_len: Option<u32>,
    pub policy: Policy,
    /// Temperature (0 = argmax), top-k (0 = off), top-p (1 = off).
    pub sampling: Sampling,
    pub seed: u64,
    /// The RNG's sequence id (so two requests with one seed can differ); 0 by default.
    pub seq_id: u32,
    pub prior: Option<Prior>,
    /// A finished block containing EOS/EOT ends the sequence (default on).
    pub stop_at_eos: bool,
    /// KV-cache scheme (default `none`: exact decoding, every row recomputed every step).
    pub cache: CacheScheme,
    /// Test knob (see [`Request::testing_refresh_every_step`]).
    pub(crate) refresh_every_step: bool,
}

impl Request {
    /// A request for `prompt` with every setting at its default (see the table on [`Request`]).
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        Request {
            prompt: prompt.into(),
            gen_len: DEFAULT_GEN_LEN,
            block_len: None,
            policy: DEFAULT_POLICY,
            sampling: Sampling::default(),
            seed: 0,
            seq_id: 0,
            prior: None,
            stop_at_eos: true,
            cache: CacheScheme::None,
            refresh_every_step: false,
        }
    }

    /// A text prompt (tokenized with the checkpoint's tokenizer; see [`Request::chat`]).
    pub fn text(text: impl Into<String>) -> Self {
        Self::new(Prompt::Text { text: text.into(), chat: false })
    }

    /// A prompt of token ids, used as they are.
    pub fn ids(ids: impl Into<Vec<u32>>) -> Self {
        Self::new(Prompt::Ids(ids.into()))
    }

    /// Wraps a text prompt in the checkpoint's chat template as one user message (with the
    /// generation prompt). No effect on a prompt of token ids.
    pub fn chat(mut self, on: bool) -> Self {
        if let Prompt::Text { chat, .. } = &mut self.prompt {
            *chat = on;
        }
        self
    }

    /// Slots to generate.
    pub fn gen_len(mut self, n: u32) -> Self {
        self.gen_len = n;
        self
    }

    /// Semi-autoregressive block length (must divide `gen_len`).
    pub fn block_len(mut self, n: u32) -> Self {
        self.block_len = Some(n);
        self
    }

    /// The commit policy (parse one from its CLI form: `"schedule:32".parse()?`).
    pub fn policy(mut self, p: Policy) -> Self {
        self.policy = p;
        self
    }

    /// How candidates are drawn (temperature, top-k, top-p).
    pub fn sampling(mut self, s: Sampling) -> Self {
        self.sampling = s;
        self
    }

    /// The RNG seed: sampling and random orders (same seed, same tokens).
    pub fn seed(mut self, seed: u64) -> Self {
        self.seed = seed;
        self
    }

    /// The RNG's sequence id, so two requests with one seed can draw differently.
    pub fn seq_id(mut self, id: u32) -> Self {
        self.seq_id = id;
        self
    }

    /// A structure prior over the gen region (template text with `<mask:N>` holes, or fixed
    /// token ids at gen offsets).
    pub fn prior(mut self, p: Prior) -> Self {
        self.prior = Some(p);
        self
    }

    /// Whether a finished block containing EOS/EOT ends the sequence.
    pub fn stop_at_eos(mut self, on: bool) -> Self {
        self.stop_at_eos = on;
        self
    }

    /// The KV-cache scheme (parse one from its CLI form: `"dkv:4".parse()?`).
    pub fn cache(mut self, c: CacheScheme) -> Self {
        self.cache = c;
        self
    }

    /// The block length the request decodes with: `block_len`, or `gen_len` when unset.
    pub fn effective_block_len(&self) -> u32 {
        self.block_len.unwrap_or(self.gen_len)
    }

    /// Testing hook, not part of the supported API: the cache scheme refreshes every row at
    /// every step, so every scheme must decode exactly like `none` (what the cache tests check).
    #[doc(hidden)]
    pub fn testing_refresh_every_step(mut self, on: bool) -> Self {
        self.refresh_every_step = on;
        self
    }
}
