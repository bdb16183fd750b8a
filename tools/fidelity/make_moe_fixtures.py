#!/usr/bin/env python3
"""LLaDA-MoE fidelity fixtures: the official LLaDA-MoE model code, run in f32 on the CPU on a
small random checkpoint, with the official LLaDA-family decoders on top.

Writes, under --out (default tests/fixtures/fidelity/llada_moe):
  config.json + model.safetensors   LLaDA-MoE Hugging Face layout (class LLaDAMoEModelLM:
                                    model.layers.{i}.mlp.gate / mlp.experts.{e}.{gate,up,down}_proj,
                                    self_attn.{q,k}_norm, ...), bf16 values, run in f32
  golden.safetensors                `input_ids` [1, T] (i64) and `logits` [T, vocab] (f32) of one
                                    full forward of the official model
  trajectories.json                 commits of every forward of the official decoders (the
                                    schema of ../trajectories.json)

The official code is imported from checkouts given on the command line, never copied:
  --dinfer DIR      inclusionAI/dInfer   tools/configuration_lladamoe.py (the config class) and
                                         tools/modeling_fused_lladamoe.py (the model). That file's
                                         decoder layer builds `FusedLLaDAMoESparseMoeBlock` (experts
                                         stacked as w1/w2, run by a vLLM/Triton kernel); the same
                                         file's `LLaDAMoESparseMoeBlock` is the released model's
                                         block (unfused experts, the names of the HF checkpoint),
                                         so this script makes the layer build that one. The
                                         `fuse_moe` import (vLLM, Triton) is satisfied by a module
                                         whose `fused_moe` raises: it is never called.
  --fast-dllm DIR   NVlabs/Fast-dLLM     llada/generate.py `generate` (no cache; schedule and
                                         threshold)
  --llada DIR       ML-GSAI/LLaDA        generate.py (the reference LLaDA `generate`)
Needs torch and transformers 4.45-4.57 (the committed fixtures: see trajectories.json meta).
"""
import argparse
import importlib
import json
import os
import sys
import types

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_fixtures as mf  # noqa: E402  (shared helpers: loaders, recorder, checkpoint I/O)

HEAD_DIM = mf.HEAD_DIM


def load_official_lladamoe(dinfer):
    """The official config class and model module from dInfer's tools/ directory."""
    tools = os.path.join(dinfer, "tools")
    pkg = types.ModuleType("dinfer_lladamoe")
    pkg.__path__ = [tools]
    sys.modules["dinfer_lladamoe"] = pkg
    stub = types.ModuleType("dinfer_lladamoe.fuse_moe")

    def fused_moe(*_a, **_k):
        raise RuntimeError("the fused (vLLM) expert kernel is not used by these fixtures")

    stub.fused_moe = fused_moe
    sys.modules["dinfer_lladamoe.fuse_moe"] = stub
    conf = importlib.import_module("dinfer_lladamoe.configuration_lladamoe")
    modeling = importlib.import_module("dinfer_lladamoe.modeling_fused_lladamoe")
    # The released checkpoint's block: unfused experts under mlp.experts.{e}.
    modeling.FusedLLaDAMoESparseMoeBlock = modeling.LLaDAMoESparseMoeBlock
    return conf.LLaDAConfig, modeling


def moe_checkpoint(seed, hidden, layers, heads, experts, top_k, ffn, vocab, mask_id, eos_id,
                   lm_scale, router_scale, theta):
    g = torch.Generator().manual_seed(seed)
    inv = hidden ** -0.5
    randn = lambda *shape, std=1.0: mf.randn(g, *shape, std=std)  # noqa: E731
    sd = {"model.embed_tokens.weight": randn(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{n}.weight"] = randn(hidden, hidden, std=inv)
        # Per-head norms far from 1 so that a missing or misplaced norm shows in the logits.
        sd[p + "self_attn.q_norm.weight"] = 1.0 + randn(HEAD_DIM, std=0.3)
        sd[p + "self_attn.k_norm.weight"] = 1.0 + randn(HEAD_DIM, std=0.3)
        sd[p + "mlp.gate.weight"] = randn(experts, hidden, std=router_scale * inv)
        for e in range(experts):
            q = p + f"mlp.experts.{e}."
            sd[q + "gate_proj.weight"] = randn(ffn, hidden, std=inv)
            sd[q + "up_proj.weight"] = randn(ffn, hidden, std=inv)
            sd[q + "down_proj.weight"] = randn(hidden, ffn, std=ffn ** -0.5)
        sd[p + "input_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
    sd["model.norm.weight"] = 1.0 + randn(hidden, std=0.1)
    head = randn(vocab, hidden, std=lm_scale * inv)
    head[mask_id] = 0.0  # the mask token's logit is exactly 0: never the argmax
    sd["lm_head.weight"] = head
    cfg = {
        "architectures": ["LLaDAMoEModelLM"], "model_type": "llada",
        "attention_bias": False, "attention_dropout": 0.0, "clip_qkv": None,
        "dense_intermediate_size": 4 * hidden, "expert_intermediate_size": ffn,
        "shared_expert_intermediate_size": None, "eos_token_id": eos_id, "pad_token_id": eos_id,
        "mask_token_id": mask_id, "hidden_act": "silu", "hidden_size": hidden,
        "initializer_range": 0.02, "max_position_embeddings": 1024, "moe_layer_freq": [1] * layers,
        "moe_router_enable_expert_bias": False, "moe_router_score_function": "softmax",
        "norm_topk_prob": False, "num_attention_heads": heads, "num_experts": experts,
        "num_experts_per_tok": top_k, "num_hidden_layers": layers, "num_key_value_heads": heads,
        "output_router_logits": False, "partial_rotary_factor": 1.0, "qk_layernorm": True,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": theta,
        "routed_scaling_factor": 1, "router_aux_loss_coef": 0.01, "router_num_group": -2,
        "router_topk_group": -2, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "use_cache": False, "vocab_size": vocab,
    }
    return cfg, mf.bf16_exact(sd)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dinfer", required=True)
    ap.add_argument("--fast-dllm", required=True)
    ap.add_argument("--llada", required=True)
    ap.add_argument("--out", default="tests/fixtures/fidelity/llada_moe")
    ap.add_argument("--lm-scale", type=float, default=8.0,
                    help="LM head std in units of 1/sqrt(hidden): peaky enough that thresholds fire")
    ap.add_argument("--router-scale", type=float, default=3.0,
                    help="router std in units of 1/sqrt(hidden): wide gaps between expert scores, so "
                         "f32 rounding differences cannot swap the k-th and (k+1)-th expert")
    args = ap.parse_args()
    import transformers

    vocab, mask_id, eos_id = 384, 383, 382
    config_cls, modeling = load_official_lladamoe(args.dinfer)
    cfg, sd = moe_checkpoint(seed=13, hidden=256, layers=2, heads=2, experts=8, top_k=2, ffn=16,
                             vocab=vocab, mask_id=mask_id, eos_id=eos_id, lm_scale=args.lm_scale,
                             router_scale=args.router_scale, theta=50000.0)
    mf.save_checkpoint(args.out, cfg, sd)
    model = mf.build_model(modeling.FusedLLaDAMoEModelLM, config_cls, cfg, sd, attn="eager")
    blocks = [type(layer.mlp).__name__ for layer in model.model.layers]
    assert all(b == "LLaDAMoESparseMoeBlock" for b in blocks), blocks
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (HEAD_DIM,)

    # Golden logits: prompt tokens, masks and generated-looking tokens in one canvas.
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, eos_id - 2, (1, 48), generator=g)
    ids[0, 20:36] = mask_id
    ids[0, 40] = eos_id
    with torch.no_grad():
        logits = model(ids).logits[0].float().contiguous()
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(args.out, "golden.safetensors"),
              metadata={"format": "pt"})

    fd_llada = mf.load_package("fdllm_llada_model", os.path.join(args.fast_dllm, "llada", "model"))
    fd_gen = mf.load_module("fdllm_llada_generate", os.path.join(args.fast_dllm, "llada", "generate.py"),
                            {"model": fd_llada})
    ref_gen = mf.load_module("llada_reference_generate", os.path.join(args.llada, "generate.py"))
    P = mf.prompts(eos_id - 2, 4)
    cases = []

    def tensor(p):
        return torch.tensor([p], dtype=torch.long)

    def case(name, decoder, prompt, gen, block, steps, policy, call, fn_names):
        c = {"name": name, "model": "llada_moe", "decoder": decoder, "prompt": prompt, "gen_len": gen,
             "block_len": block, "policy": policy, "cache": "none", "mask_id": mask_id, "steps_arg": steps}
        with torch.no_grad():
            cases.append(mf.run_case(c, model, fn_names, call))
        print(f"{name}: {c['forwards']} forwards, {c['mask_commits']} mask commits", flush=True)

    for p, gen, block, steps in [(1, 32, 8, 16), (17, 24, 24, 24), (40, 32, 16, 8)]:
        case(f"moe-llada-generate-p{p}-g{gen}-b{block}-s{steps}", "LLaDA generate (low_confidence)",
             P[p], gen, block, steps, f"schedule:{steps // (gen // block)}",
             lambda m, p=p, gen=gen, block=block, steps=steps: ref_gen.generate(
                 m, tensor(P[p]), steps=steps, gen_length=gen, block_length=block, temperature=0.0,
                 remasking="low_confidence", mask_id=mask_id)[0].tolist(),
             ["generate"])
    for p, gen, block, steps, thr in [(17, 32, 16, 32, 0.9), (40, 24, 8, 24, 0.7), (1, 32, 8, 32, 0.8)]:
        case(f"moe-fastdllm-none-p{p}-g{gen}-b{block}-t{thr}", "Fast-dLLM generate", P[p], gen, block, steps,
             f"threshold:{thr}",
             lambda m, p=p, gen=gen, block=block, steps=steps, thr=thr: fd_gen.generate(
                 m, tensor(P[p]), steps=steps, gen_length=gen, block_length=block, temperature=0.0,
                 remasking="low_confidence", mask_id=mask_id, threshold=thr)[0][0].tolist(),
             ["generate"])

    meta = {
        "made_by": "tools/fidelity/make_moe_fixtures.py",
        "torch": torch.__version__, "transformers": transformers.__version__,
        "dinfer_commit": mf.git_head(args.dinfer), "fast_dllm_commit": mf.git_head(args.fast_dllm),
        "llada_commit": mf.git_head(args.llada), "precision": "f32 on the CPU",
        "official_model": "dInfer tools/modeling_fused_lladamoe.py with LLaDAMoESparseMoeBlock (unfused)",
        "lm_scale": args.lm_scale, "router_scale": args.router_scale,
    }
    with open(os.path.join(args.out, "trajectories.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")
    print(f"{len(cases)} cases -> {args.out}/trajectories.json")


if __name__ == "__main__":
    main()
