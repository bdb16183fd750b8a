//! `demask make-checkpoint`: random-weight checkpoints in the exact Hugging Face layout
//! (config.json, sharded bf16 safetensors + index, unfused tensors under their real names;
//! for the tiny presets also a byte-level tokenizer and a chat template), and
//! [`random_weights`], the same values fused in memory.
//!
//! Values are deterministic in (seed, tensor name) and independent of the thread count: each
//! tensor is generated in fixed chunks of [`GEN_CHUNK`] values, each chunk with its own RNG
//! seeded from (seed, name, chunk index).
use std::fmt;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use half::bf16;
use rand::{Rng, RngCore};
use rand_distr::StandardNormal;
use rayon::prelude::*;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::tokenizer;
use crate::weights::{assemble, tensor_specs, HostWeights, TensorRole, TensorSpec, INDEX_FILE, SINGLE_FILE};

/// Shard size cap (~2.7 GB shards): llada-8b gives 6 shards, like the real checkpoint.
pub const SHARD_BYTES: u64 = 2_750_000_000;
/// Values per independently seeded RNG chunk.
pub const GEN_CHUNK: usize = 1 << 16;

/// One planned shard file and the tensors it holds, in file order.
#[derive(Clone, Debug)]
pub struct ShardPlan {
    pub file: String,
    pub tensors: Vec<TensorSpec>,
    /// Tensor bytes (bf16), without the header.
    pub bytes: u64,
}

/// The shard layout [`write_checkpoint`] writes for `cfg` (caps at [`SHARD_BYTES`]).
pub fn plan_shards(cfg: &ModelConfig) -> Vec<ShardPlan> {
    plan_shards_with(cfg, SHARD_BYTES)
}

/// Greedy sharding in checkpoint order as `save_pretrained` does: a tensor starts a new shard
/// when it would push the current one past `max_bytes` (a tensor larger than the cap gets a
/// shard of its own). Files are named `model-0000i-of-0000N.safetensors`.
pub fn plan_shards_with(cfg: &ModelConfig, max_bytes: u64) -> Vec<ShardPlan> {
    let mut groups: Vec<(Vec<TensorSpec>, u64)> = Vec::new();
    for s in tensor_specs(cfg) {
        match groups.last_mut() {
            Some((t, b)) if *b + s.bytes() <= max_bytes => {
                *b += s.bytes();
                t.push(s);
            }
            _ => {
                let b = s.bytes();
                groups.push((vec![s], b));
            }
        }
    }
    let n = groups.len();
    groups
        .into_iter()
        .enumerate()
        .map(|(i, (tensors, bytes))| ShardPlan {
            file: format!("model-{:05}-of-{n:05}.safetensors", i + 1),
            tensors,
            bytes,
        })
        .collect()
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// xoshiro256++ (Blackman & Vigna): fast, and its stream is fixed by this code, so checkpoint
/// values do not change with the `rand` version.
struct Xoshiro256([u64; 4]);

impl Xoshiro256 {
    fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            splitmix64(x)
        };
        Xoshiro256([next(), next(), next(), next()])
    }
}

impl RngCore for Xoshiro256 {
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let r = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        r
    }
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let b = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> std::result::Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Seed of one tensor: FNV-1a of its name mixed with the checkpoint seed.
fn tensor_seed(seed: u64, name: &str) -> u64 {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3));
    splitmix64(seed ^ splitmix64(h))
}

/// (mean, std) of a tensor's initialisation: linear N(0, 1/sqrt(fan_in)), embedding N(0, 1),
/// norm weights 1 + 0.1 N(0, 1), biases 0.1 N(0, 1).
fn init_of(spec: &TensorSpec) -> (f32, f32) {
    match spec.role {
        TensorRole::Linear => (0.0, 1.0 / (spec.shape[1] as f32).sqrt()),
        TensorRole::Embedding => (0.0, 1.0),
        TensorRole::Norm => (1.0, 0.1),
        TensorRole::Bias | TensorRole::ExpertBias => (0.0, 0.1),
    }
}

/// Fills `dst` (spec.numel() values) with the random values of tensor `spec`, rounded to bf16.
fn fill_random(seed: u64, spec: &TensorSpec, dst: &mut [bf16]) {
    let (mean, std) = init_of(spec);
    let ts = tensor_seed(seed, &spec.name);
    dst.par_chunks_mut(GEN_CHUNK).enumerate().for_each(|(ci, chunk)| {
        let mut rng = Xoshiro256::new(ts ^ splitmix64(ci as u64));
        for x in chunk {
            let z: f32 = rng.sample(StandardNormal);
            *x = bf16::from_f32(mean + std * z);
        }
    });
}

/// The random values of one checkpoint tensor (unfused), exactly as the writer stores them.
pub fn random_tensor(seed: u64, spec: &TensorSpec) -> Vec<bf16> {
    let mut v = vec![bf16::ZERO; spec.numel()];
    fill_random(seed, spec, &mut v);
    v
}

/// The random values of one f32-stored tensor ([`TensorSpec::is_f32`]), not rounded.
pub fn random_tensor_f32(seed: u64, spec: &TensorSpec) -> Vec<f32> {
    let (mean, std) = init_of(spec);
    let mut rng = Xoshiro256::new(tensor_seed(seed, &spec.name));
    (0..spec.numel())
        .map(|_| {
            let z: f32 = rng.sample(StandardNormal);
            mean + std * z
        })
        .collect()
}

/// A tensor's stored bytes (little-endian bf16, or f32 for [`TensorSpec::is_f32`]).
fn random_bytes(seed: u64, spec: &TensorSpec) -> Vec<u8> {
    if spec.is_f32() {
        random_tensor_f32(seed, spec).iter().flat_map(|x| x.to_le_bytes()).collect()
    } else {
        bytemuck::cast_slice::<bf16, u8>(&random_tensor(seed, spec)).to_vec()
    }
}

/// The weights of the checkpoint `write_checkpoint(cfg, seed, ..)` writes, fused, in memory.
pub fn random_weights(cfg: &ModelConfig, seed: u64) -> HostWeights {
    assemble(
        cfg,
        |spec, dst| {
            fill_random(seed, spec, dst);
            Ok(())
        },
        |spec, dst| {
            dst.copy_from_slice(&random_tensor_f32(seed, spec));
            Ok(())
        },
    )
    .expect("tensor_specs and assemble describe the same tensors")
}

/// What [`write_checkpoint`] wrote.
#[derive(Clone, Debug)]
pub struct CheckpointSummary {
    pub dir: PathBuf,
    /// (file name, tensor bytes) per shard.
    pub shards: Vec<(String, u64)>,
    pub n_tensors: usize,
    pub params: u64,
    /// Sum of tensor bytes (the index's metadata.total_size).
    pub tensor_bytes: u64,
    /// Whether tokenizer.json and tokenizer_config.json were written (tiny presets only).
    pub tokenizer: bool,
}

impl fmt::Display for CheckpointSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "wrote {}", self.dir.display())?;
        writeln!(
            f,
            "  {} tensors, {} parameters, {} bytes in {} shard(s)",
            self.n_tensors,
            self.params,
            self.tensor_bytes,
            self.shards.len()
        )?;
        if self.tokenizer {
            write!(
                f,
                "  tokenizer: byte-level tiny tokenizer (tokenizer.json, tokenizer_config.json with chat_template)"
            )
        } else {
            write!(f, "  tokenizer: none written (copy tokenizer files from the real checkpoint to decode text)")
        }
    }
}

/// Writes a random checkpoint of `cfg` to `out` in the exact Hugging Face layout, with
/// shards capped at [`SHARD_BYTES`]. See [`write_checkpoint_with`].
pub fn write_checkpoint(
    cfg: &ModelConfig,
    seed: u64,
    out: &Path,
    overwrite: bool,
    progress: impl FnMut(&str),
) -> Result<CheckpointSummary> {
    write_checkpoint_with(cfg, seed, out, overwrite, SHARD_BYTES, progress)
}

/// Whether [`write_checkpoint`] may write to `out`: refuses a path that is a file, and a
/// directory that already holds a checkpoint (a config.json) unless `overwrite` (the CLI's
/// `--overwrite`). Cheap; run it before announcing a write.
pub fn check_output_dir(out: &Path, overwrite: bool) -> Result<()> {
    if out.exists() && !out.is_dir() {
        return Err(Error::file(out, "exists and is not a directory"));
    }
    let config_path = out.join("config.json");
    if config_path.exists() && !overwrite {
        return Err(Error::file(
            &config_path,
            "already exists; refusing to overwrite a checkpoint (pass --overwrite to replace it)",
        ));
    }
    Ok(())
}

/// Writes config.json, `model-0000i-of-0000N.safetensors` (bf16, unfused, real names) and
/// `model.safetensors.index.json`; for tiny-vocab configs also the tiny tokenizer. One tensor
/// or two are in memory at a time, never the whole model. Each shard is written to a `.partial` file
/// and renamed when complete; `progress` is called once per shard. Refuses an `out` that
/// already holds a config.json unless `overwrite` (which also removes stale
/// `model-*-of-*.safetensors` shards not in the new plan).
pub fn write_checkpoint_with(
    cfg: &ModelConfig,
    seed: u64,
    out: &Path,
    overwrite: bool,
    max_shard_bytes: u64,
    mut progress: impl FnMut(&str),
) -> Result<CheckpointSummary> {
    cfg.validate()?;
    check_output_dir(out, overwrite)?;
    let config_path = out.join("config.json");
    std::fs::create_dir_all(out).map_err(|e| Error::file(out, format!("cannot create directory: {e}")))?;
    let plan = plan_shards_with(cfg, max_shard_bytes);
    if overwrite {
        remove_stale_shards(out, &plan)?;
    }
    let config = serde_json::to_string_pretty(&cfg.to_hf_json()).map_err(|e| Error::file(&config_path, e))?;
    std::fs::write(&config_path, config + "\n").map_err(|e| Error::file(&config_path, e))?;

    let mut weight_map = serde_json::Map::new();
    for (i, shard) in plan.iter().enumerate() {
        write_shard(&out.join(&shard.file), shard, seed)?;
        for t in &shard.tensors {
            weight_map.insert(t.name.clone(), shard.file.clone().into());
        }
        progress(&format!("shard {}/{}: {} ({} bytes)", i + 1, plan.len(), shard.file, shard.bytes));
    }
    let tensor_bytes: u64 = plan.iter().map(|s| s.bytes).sum();
    let index = serde_json::json!({ "metadata": { "total_size": tensor_bytes }, "weight_map": weight_map });
    let index_path = out.join(INDEX_FILE);
    let text = serde_json::to_string_pretty(&index).map_err(|e| Error::file(&index_path, e))?;
    std::fs::write(&index_path, text + "\n").map_err(|e| Error::file(&index_path, e))?;

    let with_tokenizer = tokenizer::tiny_tokenizer_fits(cfg);
    if with_tokenizer {
        let tok = out.join("tokenizer.json");
        std::fs::write(&tok, tokenizer::tiny_tokenizer_json(cfg)).map_err(|e| Error::file(&tok, e))?;
        let tok_cfg = out.join("tokenizer_config.json");
        std::fs::write(&tok_cfg, tokenizer::tiny_tokenizer_config_json(cfg)).map_err(|e| Error::file(&tok_cfg, e))?;
        progress("tokenizer.json, tokenizer_config.json");
    }
    Ok(CheckpointSummary {
        dir: out.to_path_buf(),
        shards: plan.iter().map(|s| (s.file.clone(), s.bytes)).collect(),
        n_tensors: plan.iter().map(|s| s.tensors.len()).sum(),
        params: plan.iter().flat_map(|s| &s.tensors).map(|t| t.numel() as u64).sum(),
        tensor_bytes,
        tokenizer: with_tokenizer,
    })
}

/// The safetensors header of a shard: 8-byte little-endian length, then JSON padded with
/// spaces to a multiple of 8 bytes so tensor data starts aligned.
fn shard_header(shard: &ShardPlan) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut off = 0u64;
    for t in &shard.tensors {
        let end = off + t.bytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": if t.is_f32() { "F32" } else { "BF16" }, "shape": t.shape, "data_offsets": [off, end] }),
        );
        off = end;
    }
    let mut json = serde_json::Value::Object(map).to_string().into_bytes();
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out
}

fn write_shard(path: &Path, shard: &ShardPlan, seed: u64) -> Result<()> {
    let partial = path.with_extension("safetensors.partial");
    let io = |e: std::io::Error| Error::file(&partial, e);
    let mut w = BufWriter::with_capacity(8 << 20, File::create(&partial).map_err(io)?);
    w.write_all(&shard_header(shard)).map_err(io)?;
    // Generate the next tensor while this one is written (at most two in flight).
    std::thread::scope(|scope| -> Result<()> {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<u8>>(1);
        scope.spawn(move || {
            for t in &shard.tensors {
                if tx.send(random_bytes(seed, t)).is_err() {
                    break; // the writer failed and hung up
                }
            }
        });
        for v in rx {
            w.write_all(&v).map_err(io)?;
        }
        Ok(())
    })?;
    w.into_inner().map_err(|e| io(e.into_error()))?.sync_all().map_err(io)?;
    std::fs::rename(&partial, path).map_err(|e| Error::file(path, e))
}

/// Removes `model-*-of-*.safetensors` and `model.safetensors` files of an earlier checkpoint
/// in `dir` that the new plan does not rewrite.
fn remove_stale_shards(dir: &Path, plan: &[ShardPlan]) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::file(dir, e))?;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let shard_like = name.starts_with("model-") && name.contains("-of-") && name.ends_with(".safetensors");
        if (shard_like || name == SINGLE_FILE) && !plan.iter().any(|s| s.file == name) {
            std::fs::remove_file(entry.path()).map_err(|e| Error::file(entry.path(), e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_scales_are_realistic() {
        let cfg = ModelConfig::preset("tiny-dream").unwrap();
        let specs = tensor_specs(&cfg);
        let stats = |s: &TensorSpec| {
            let v: Vec<f64> = random_tensor(7, s).iter().map(|x| x.to_f32() as f64).collect();
            let mean = v.iter().sum::<f64>() / v.len() as f64;
            let var = v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64;
            (mean, var.sqrt())
        };
        for s in &specs {
            let (mean, std) = stats(s);
            let (want_mean, want_std) = init_of(s);
            // Means within 4 standard errors; std within 15% (at least 256 values per tensor).
            let se = want_std as f64 / (s.numel() as f64).sqrt();
            assert!((mean - want_mean as f64).abs() <= 4.0 * se + 1e-3, "{}: mean {mean}", s.name);
            assert!((std / want_std as f64 - 1.0).abs() < 0.15, "{}: std {std}, want {want_std}", s.name);
        }
        let q = specs.iter().find(|s| s.name == "model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(init_of(q), (0.0, 1.0 / (512f32).sqrt()));
    }

    #[test]
    fn values_depend_on_seed_and_name_not_on_threads() {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let specs = tensor_specs(&cfg);
        let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let three = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let embed = &specs[0];
        let a = one.install(|| random_tensor(5, embed));
        let b = three.install(|| random_tensor(5, embed));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        assert!(embed.numel() > GEN_CHUNK, "spans several chunks");
        let c = random_tensor(6, embed);
        assert!(a.iter().zip(&c).filter(|(x, y)| x.to_bits() == y.to_bits()).count() < a.len() / 50);
        // Same shape, different names: different values.
        let (q, k) = (&specs[2], &specs[3]);
        assert_eq!(q.shape, k.shape);
        let (vq, vk) = (random_tensor(5, q), random_tensor(5, k));
        assert!(vq.iter().zip(&vk).filter(|(x, y)| x.to_bits() == y.to_bits()).count() < vq.len() / 50);
    }

    #[test]
    fn header_is_aligned_and_parses() {
        let cfg = ModelConfig::preset("tiny-llada").unwrap();
        let plan = plan_shards(&cfg);
        assert_eq!(plan.len(), 1);
        let h = shard_header(&plan[0]);
        assert_eq!(h.len() % 8, 0);
        let n = u64::from_le_bytes(h[..8].try_into().unwrap()) as usize;
        assert_eq!(n + 8, h.len());
        let v: serde_json::Value = serde_json::from_slice(&h[8..]).unwrap();
        let wte = &v["model.transformer.wte.weight"];
        assert_eq!(wte["dtype"], "BF16");
        assert_eq!(wte["shape"], serde_json::json!([512, 256]));
        assert_eq!(wte["data_offsets"], serde_json::json!([0, 512 * 256 * 2]));
    }
}
