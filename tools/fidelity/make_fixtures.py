#!/usr/bin/env python3
"""Fidelity fixtures: official dLLM decoders run in f32 on small random checkpoints.

Writes, under --out (default tests/fixtures/fidelity):
  llada/ dream/          config.json + model.safetensors (bf16 values; every decoder here runs
                         them in f32), in the official Hugging Face layouts
  trajectories.json      one entry per case: decoder, arguments, prompt, the commits of every
                         forward (the trajectory) and the final canvas

The official code is imported from checkouts given on the command line, never copied:
  --fast-dllm DIR   NVlabs/Fast-dLLM      (llada/generate.py + llada/model: generate, prefix and
                                           dual cache, threshold; dream/model: Dream's
                                           diffusion_generate and modeling)
  --llada DIR       ML-GSAI/LLaDA         (generate.py: the reference LLaDA `generate`)
  --dkv DIR         horseee/dKV-Cache     (dKV-Cache-Decode: generation_utils + models)
Needs torch and transformers 4.45-4.57 (4.49 is what the fixtures in the repository were made
with). Runs on the CPU (f32, deterministic): `python3 tools/fidelity/make_fixtures.py --fast-dllm
... --llada ... --dkv ...`. tests/fidelity.rs replays every case on demask's CPU backend.

A trajectory is recorded by reading the decoder's canvas (its local `x`) at every forward call
of the model, so the official functions run unmodified.
"""
import argparse
import importlib.util
import inspect
import json
import os
import subprocess
import sys
import types

import torch
from safetensors.torch import save_file

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
torch.set_num_threads(max(1, os.cpu_count() or 1))

HEAD_DIM = 128


# ------------------------------------------------------------------------- official modules

def load_package(name, path):
    """Imports the directory `path` (with an __init__.py) as package `name`."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(path, "__init__.py"),
                                                  submodule_search_locations=[path])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def load_module(name, path, aliases=None):
    """Imports the file `path` as module `name`; `aliases` maps import names it uses (e.g.
    `model`, `models`) to already loaded packages while it executes."""
    saved = {}
    for k, v in (aliases or {}).items():
        saved[k] = sys.modules.get(k)
        sys.modules[k] = v
        for sub, subv in list(sys.modules.items()):
            if sub.startswith(v.__name__ + "."):
                sys.modules[k + sub[len(v.__name__):]] = subv
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def git_head(path):
    try:
        return subprocess.check_output(["git", "-C", path, "rev-parse", "HEAD"], text=True).strip()
    except Exception:
        return "unknown"


# ------------------------------------------------------------------------- checkpoints

def randn(gen, *shape, std=1.0):
    return torch.randn(*shape, generator=gen, dtype=torch.float32) * std


def bf16_exact(sd):
    """Rounds every tensor to bf16 (stored that way; the decoders upcast to f32)."""
    return {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}


def llada_checkpoint(seed, hidden, layers, heads, ffn, vocab, mask_id, eos_id, lm_scale):
    g = torch.Generator().manual_seed(seed)
    inv = hidden ** -0.5
    sd = {"model.transformer.wte.weight": randn(g, vocab, hidden)}
    for i in range(layers):
        p = f"model.transformer.blocks.{i}."
        sd[p + "attn_norm.weight"] = 1.0 + randn(g, hidden, std=0.1)
        sd[p + "ff_norm.weight"] = 1.0 + randn(g, hidden, std=0.1)
        for n in ("q_proj", "k_proj", "v_proj", "attn_out"):
            sd[p + n + ".weight"] = randn(g, hidden, hidden, std=inv)
        sd[p + "ff_proj.weight"] = randn(g, ffn, hidden, std=inv)
        sd[p + "up_proj.weight"] = randn(g, ffn, hidden, std=inv)
        sd[p + "ff_out.weight"] = randn(g, hidden, ffn, std=ffn ** -0.5)
    sd["model.transformer.ln_f.weight"] = 1.0 + randn(g, hidden, std=0.1)
    head = randn(g, vocab, hidden, std=lm_scale * inv)
    head[mask_id] = 0.0  # the mask token's logit is exactly 0: far below the top, never argmax
    sd["model.transformer.ff_out.weight"] = head
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0,
        "architectures": ["LLaDAModelLM"], "attention_dropout": 0.0, "attention_layer_norm": False,
        "attention_layer_norm_with_affine": True, "bias_for_layer_norm": False,
        "block_group_size": 1, "block_type": "llama", "d_model": hidden, "embedding_dropout": 0.0,
        "embedding_size": vocab, "eos_token_id": eos_id, "flash_attention": False,
        "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "cpu", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": mask_id,
        "max_sequence_length": 1024, "mlp_hidden_size": ffn, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": heads,
        "n_kv_heads": heads, "n_layers": layers, "pad_token_id": eos_id, "precision": "amp_bf16",
        "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True,
        "rope_theta": 500000.0, "scale_logits": False, "torch_dtype": "bfloat16",
        "use_cache": False, "vocab_size": vocab, "weight_tying": False,
    }
    return cfg, bf16_exact(sd)


def dream_checkpoint(seed, hidden, layers, heads, kv_heads, ffn, vocab, mask_id, eos_id, lm_scale):
    g = torch.Generator().manual_seed(seed)
    inv = hidden ** -0.5
    kv = kv_heads * HEAD_DIM
    sd = {"model.embed_tokens.weight": randn(g, vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1.0 + randn(g, hidden, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + randn(g, hidden, std=0.1)
        sd[p + "self_attn.q_proj.weight"] = randn(g, hidden, hidden, std=inv)
        sd[p + "self_attn.q_proj.bias"] = randn(g, hidden, std=0.1)
        sd[p + "self_attn.k_proj.weight"] = randn(g, kv, hidden, std=inv)
        sd[p + "self_attn.k_proj.bias"] = randn(g, kv, std=0.1)
        sd[p + "self_attn.v_proj.weight"] = randn(g, kv, hidden, std=inv)
        sd[p + "self_attn.v_proj.bias"] = randn(g, kv, std=0.1)
        sd[p + "self_attn.o_proj.weight"] = randn(g, hidden, hidden, std=inv)
        sd[p + "mlp.gate_proj.weight"] = randn(g, ffn, hidden, std=inv)
        sd[p + "mlp.up_proj.weight"] = randn(g, ffn, hidden, std=inv)
        sd[p + "mlp.down_proj.weight"] = randn(g, hidden, ffn, std=ffn ** -0.5)
    sd["model.norm.weight"] = 1.0 + randn(g, hidden, std=0.1)
    head = randn(g, vocab, hidden, std=lm_scale * inv)
    head[mask_id] = 0.0
    sd["lm_head.weight"] = head
    cfg = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0, "bos_token_id": eos_id,
        "eos_token_id": eos_id, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "intermediate_size": ffn, "mask_token_id": mask_id,
        "max_position_embeddings": 1024, "max_window_layers": layers, "model_type": "Dream",
        "num_attention_heads": heads, "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads, "pad_token_id": eos_id, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "sliding_window": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": False,
        "use_sliding_window": False, "vocab_size": vocab,
    }
    return cfg, bf16_exact(sd)


def save_checkpoint(out, cfg, sd):
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)
        f.write("\n")
    save_file(sd, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})


def build_model(cls, config_cls, cfg, sd, attn=None):
    """The official model class over `cfg`, weights `sd` loaded exactly, in f32, eval mode."""
    config = config_cls(**cfg)
    if attn is not None:
        config._attn_implementation = attn
    model = cls(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if "rotary" not in m and "inv_freq" not in m]
    if missing or unexpected:
        raise SystemExit(f"{cls.__name__}: missing {missing}, unexpected {unexpected}")
    return model.float().eval()


# ------------------------------------------------------------------------- trajectories

class Recorder:
    """A forward pre-hook on the model: before every forward, reads the canvas `x` of the
    calling decoder function (one of `fn_names`)."""

    def __init__(self, model, fn_names):
        self.fn_names = set(fn_names)
        self.canvases = []
        self.handle = model.register_forward_pre_hook(self.hook)

    def hook(self, module, args):
        frame = inspect.currentframe().f_back
        while frame is not None and frame.f_code.co_name not in self.fn_names:
            frame = frame.f_back
        if frame is None:
            raise RuntimeError("model called outside a recorded decoder")
        self.canvases.append(frame.f_locals["x"][0].tolist())


def trajectory(canvases, final):
    """Commits (pos, token) of every forward: the canvas diff to the next forward (or the end)."""
    steps = []
    seq = canvases + [final]
    for a, b in zip(seq[:-1], seq[1:]):
        steps.append([[i, t] for i, (s, t) in enumerate(zip(a, b)) if s != t])
    return steps


def run_case(case, model, fn_names, call):
    rec = Recorder(model, fn_names)
    try:
        final = call(model)
    finally:
        rec.handle.remove()
    case["forwards"] = len(rec.canvases)
    case["steps"] = trajectory(rec.canvases, final)
    case["output"] = final
    n_masked = sum(1 for t in final if t == case["mask_id"])
    if n_masked:
        raise SystemExit(f"{case['name']}: {n_masked} slots still masked at the end")
    mask_commits = sum(1 for s in case["steps"] for _, t in s if t == case["mask_id"])
    case["mask_commits"] = mask_commits
    return case


def prompts(vocab_text, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randint(0, vocab_text, (n,), generator=g).tolist() for n in (1, 17, 40)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fast-dllm", required=True)
    ap.add_argument("--llada", required=True)
    ap.add_argument("--dkv", required=True)
    ap.add_argument("--out", default="tests/fixtures/fidelity")
    ap.add_argument("--lm-scale", type=float, default=8.0,
                    help="LLaDA's LM head std in units of 1/sqrt(hidden): logits peaky enough that thresholds fire")
    ap.add_argument("--dream-lm-scale", type=float, default=3.0,
                    help="Dream's LM head std in units of 1/sqrt(hidden): Dream ranks by confidence alone, and "
                         "peakier logits saturate f32 probabilities into exact ties, whose order torch.topk leaves unspecified")
    args = ap.parse_args()
    import transformers

    vocab, mask_id, eos_id = 384, 383, 382
    cases = []

    # ---------------- LLaDA family
    fd_llada = load_package("fdllm_llada_model", os.path.join(args.fast_dllm, "llada", "model"))
    fd_gen = load_module("fdllm_llada_generate", os.path.join(args.fast_dllm, "llada", "generate.py"),
                         {"model": fd_llada})
    ref_gen = load_module("llada_reference_generate", os.path.join(args.llada, "generate.py"))
    sys.path.insert(0, args.dkv)  # dKV-Cache imports its own `models` and `generation_utils`
    import models.modeling_llada_dkv_cache_decode as dkv_modeling
    import models.configuration_llada as dkv_config
    import generation_utils.llada_dkv_cache_decode as dkv_gen
    sys.path.pop(0)

    cfg, sd = llada_checkpoint(seed=11, hidden=256, layers=2, heads=2, ffn=512, vocab=vocab,
                               mask_id=mask_id, eos_id=eos_id, lm_scale=args.lm_scale)
    save_checkpoint(os.path.join(args.out, "llada"), cfg, sd)
    fd_model = build_model(fd_llada.LLaDAModelLM, fd_llada.LLaDAConfig, cfg, sd)
    dkv_model = build_model(dkv_modeling.LLaDAModelLM, dkv_config.LLaDAConfig, cfg, sd)
    P = prompts(eos_id - 2, 1)

    def llada_case(name, decoder, model, prompt, gen, block, steps, policy, cache, call, fn_names):
        c = {"name": name, "model": "llada", "decoder": decoder, "prompt": prompt, "gen_len": gen,
             "block_len": block, "policy": policy, "cache": cache, "mask_id": mask_id, "steps_arg": steps}
        cases.append(run_case(c, model, fn_names, call))
        print(f"{name}: {c['forwards']} forwards, {c['mask_commits']} mask commits", flush=True)

    def tensor(p):
        return torch.tensor([p], dtype=torch.long)

    # LLaDA reference generate (low_confidence): k per step from the block's schedule.
    for p, gen, block, steps in [(1, 32, 8, 16), (17, 24, 24, 24), (40, 32, 16, 8), (17, 32, 32, 8)]:
        per_block = steps // (gen // block)
        llada_case(f"llada-generate-p{p}-g{gen}-b{block}-s{steps}", "LLaDA generate (low_confidence)",
                   fd_model, P[p], gen, block, steps, f"schedule:{per_block}", "none",
                   lambda m, p=p, gen=gen, block=block, steps=steps: ref_gen.generate(
                       m, tensor(P[p]), steps=steps, gen_length=gen, block_length=block, temperature=0.0,
                       remasking="low_confidence", mask_id=mask_id)[0].tolist(),
                   ["generate"])

    # Fast-dLLM: no cache / prefix / dual, schedule or threshold.
    fns = {"none": (fd_gen.generate, "generate"), "prefix": (fd_gen.generate_with_prefix_cache, "generate_with_prefix_cache"),
           "dual": (fd_gen.generate_with_dual_cache, "generate_with_dual_cache")}
    for cache, (fn, fname) in fns.items():
        for p, gen, block, steps, thr in [(1, 32, 8, 16, None), (17, 32, 16, 32, 0.9), (40, 24, 8, 24, 0.7),
                                          (17, 32, 32, 8, None)]:
            policy = f"threshold:{thr}" if thr is not None else f"schedule:{steps // (gen // block)}"
            llada_case(f"fastdllm-{cache}-p{p}-g{gen}-b{block}-" + (f"t{thr}" if thr else f"s{steps}"),
                       f"Fast-dLLM {fname}", fd_model, P[p], gen, block, steps, policy, cache,
                       lambda m, fn=fn, p=p, gen=gen, block=block, steps=steps, thr=thr: fn(
                           m, tensor(P[p]), steps=steps, gen_length=gen, block_length=block, temperature=0.0,
                           remasking="low_confidence", mask_id=mask_id, threshold=thr)[0][0].tolist(),
                       [fname])

    # dKV-Cache-Decode with cache refresh every R steps.
    for p, gen, block, steps, r in [(1, 32, 8, 16, 2), (17, 32, 16, 16, 4), (40, 32, 32, 32, 4)]:
        llada_case(f"dkv-decode-p{p}-g{gen}-b{block}-s{steps}-r{r}", "dKV-Cache-Decode generate",
                   dkv_model, P[p], gen, block, steps, f"schedule:{steps // (gen // block)}", f"dkv:{r}",
                   lambda m, p=p, gen=gen, block=block, steps=steps, r=r: dkv_gen.generate(
                       m, None, tensor(P[p]), steps=steps, gen_length=gen, block_length=block, temperature=0.0,
                       remasking="low_confidence", mask_id=mask_id, enable_cache=True,
                       cache_reloading_step=r)[0].tolist(),
                   ["generate"])
    # ---------------- Dream
    dream_pkg = load_package("fdllm_dream_model", os.path.join(args.fast_dllm, "dream", "model"))
    dcfg, dsd = dream_checkpoint(seed=12, hidden=256, layers=2, heads=2, kv_heads=1, ffn=512, vocab=vocab,
                                 mask_id=mask_id, eos_id=eos_id, lm_scale=args.dream_lm_scale)
    save_checkpoint(os.path.join(args.out, "dream"), dcfg, dsd)
    dream_model = build_model(dream_pkg.DreamModel, dream_pkg.DreamConfig, dcfg, dsd, attn="sdpa")
    DP = prompts(eos_id - 2, 2)
    gen = 32
    for alg in ("maskgit_plus", "topk_margin", "entropy"):
        for steps in (gen, gen // 4):
            for p in (1, 17, 40):
                name = f"dream-{alg}-p{p}-g{gen}-s{steps}"
                c = {"name": name, "model": "dream", "decoder": "Dream diffusion_generate", "prompt": DP[p],
                     "gen_len": gen, "block_len": gen, "policy": f"dream:{alg},{steps}", "cache": "none",
                     "mask_id": mask_id, "steps_arg": steps, "top_k": 50}

                def call(m, p=p, steps=steps, alg=alg):
                    out = m.diffusion_generate(
                        tensor(DP[p]), max_new_tokens=gen, steps=steps, temperature=0.0, alg=alg,
                        alg_temp=0.0, return_dict_in_generate=False)
                    return out[0].tolist()

                cases.append(run_case(c, dream_model, ["_sample"], call))
                print(f"{name}: {c['forwards']} forwards, {c['mask_commits']} mask commits", flush=True)

    meta = {
        "made_by": "tools/fidelity/make_fixtures.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "fast_dllm_commit": git_head(args.fast_dllm), "llada_commit": git_head(args.llada),
        "dkv_commit": git_head(args.dkv), "precision": "f32 on the CPU", "lm_scale": args.lm_scale,
        "dream_lm_scale": args.dream_lm_scale,
    }
    with open(os.path.join(args.out, "trajectories.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases -> {args.out}/trajectories.json")


if __name__ == "__main__":
    main()
