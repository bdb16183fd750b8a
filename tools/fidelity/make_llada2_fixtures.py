#!/usr/bin/env python3
"""LLaDA2.0 fidelity fixtures: the official LLaDA2 model code (class LLaDA2MoeModelLM), run in
f32 on the CPU with SDPA attention on a small random checkpoint.

Writes, under --out (default tests/fixtures/fidelity/llada2):
  config.json + model.safetensors   LLaDA2 Hugging Face layout (model.word_embeddings,
                                    attention.query_key_value, attention.{query,key}_layernorm,
                                    attention.dense, dense layer 0 mlp.{gate,up,down}_proj,
                                    mlp.gate.weight + mlp.gate.expert_bias (f32, random: it is
                                    zero-initialised), mlp.experts.{e}.*, mlp.shared_experts.*),
                                    bf16 values except the f32 bias, run in f32
  golden.safetensors                `input_ids` [1, T] (i64) and `logits` [T, vocab] (f32) of one
                                    full forward with the block-causal mask of the official
                                    `generate` (block 32, additive 0/-inf, cast to f32)
  trajectories.json                 commits of every forward of the official LLaDA2 `generate`
                                    (the schema of ../trajectories.json), prompts a multiple of
                                    32 long, argmax instead of dFactory's temperature-0 sample
                                    (as the HF file and dInfer), EOS stop off (eos_id = mask id)

The official code is imported from a checkout given on the command line, never copied:
  --dfactory DIR    inclusionAI/dFactory  models/llada2_moe/{configuration,modeling}_llada2_moe.py.
                                          Its config class says model_type
                                          "llada2_moe_veomni" (dFactory's training variant, fused
                                          experts run by VeOmni); the instance is given the
                                          released model_type "llada2_moe", which builds the
                                          released block (unfused experts under
                                          mlp.experts.{e}, the HF checkpoint names). VeOmni is
                                          replaced by stubs: its loss and fused-MoE kernels are
                                          never called, liger kernels are off.
Needs torch and transformers 4.51-4.57 (the committed fixtures: see golden.safetensors metadata).
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
import make_fixtures as mf  # noqa: E402  (shared helpers: checkpoint I/O, git_head)

HEAD_DIM = mf.HEAD_DIM


def stub_veomni():
    import transformers.utils.logging as hf_logging

    def never(*_a, **_k):
        raise RuntimeError("VeOmni kernels are not used by these fixtures")

    mods = {
        "veomni": {},
        "veomni.ops": {"causallm_loss_function": never, "fused_moe_forward": never},
        "veomni.distributed": {},
        "veomni.distributed.parallel_state": {"get_parallel_state": never},
        "veomni.utils": {"logging": hf_logging},
        "veomni.utils.import_utils": {"is_liger_kernel_available": lambda: False},
    }
    for name, attrs in mods.items():
        m = types.ModuleType(name)
        m.__path__ = []
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m


def load_official_llada2(dfactory):
    stub_veomni()
    d = os.path.join(dfactory, "models", "llada2_moe")
    pkg = types.ModuleType("dfactory_llada2")
    pkg.__path__ = [d]
    sys.modules["dfactory_llada2"] = pkg
    conf = importlib.import_module("dfactory_llada2.configuration_llada2_moe")
    modeling = importlib.import_module("dfactory_llada2.modeling_llada2_moe")
    return conf.LLaDA2MoeConfig, modeling


def llada2_checkpoint(seed, hidden, layers, heads, kv_heads, experts, n_group, topk_group, top_k,
                      ffn, dense_ffn, vocab, mask_id, eos_id, lm_scale, router_scale, bias_std, theta):
    g = torch.Generator().manual_seed(seed)
    inv = hidden ** -0.5
    randn = lambda *shape, std=1.0: mf.randn(g, *shape, std=std)  # noqa: E731
    sd = {"model.word_embeddings.weight": randn(vocab, hidden)}
    bias = {}
    qkv = (heads + 2 * kv_heads) * HEAD_DIM

    def mlp(prefix, width):
        sd[prefix + "gate_proj.weight"] = randn(width, hidden, std=inv)
        sd[prefix + "up_proj.weight"] = randn(width, hidden, std=inv)
        sd[prefix + "down_proj.weight"] = randn(hidden, width, std=width ** -0.5)

    for i in range(layers):
        p = f"model.layers.{i}."
        sd[p + "attention.query_key_value.weight"] = randn(qkv, hidden, std=inv)
        # Per-head norms far from 1 so that a missing or misplaced norm shows in the logits.
        sd[p + "attention.query_layernorm.weight"] = 1.0 + randn(HEAD_DIM, std=0.3)
        sd[p + "attention.key_layernorm.weight"] = 1.0 + randn(HEAD_DIM, std=0.3)
        sd[p + "attention.dense.weight"] = randn(hidden, heads * HEAD_DIM, std=inv)
        if i == 0:
            mlp(p + "mlp.", dense_ffn)
        else:
            for e in range(experts):
                mlp(p + f"mlp.experts.{e}.", ffn)
            sd[p + "mlp.gate.weight"] = randn(experts, hidden, std=router_scale * inv)
            bias[p + "mlp.gate.expert_bias"] = randn(experts, std=bias_std)
            mlp(p + "mlp.shared_experts.", ffn)
        sd[p + "input_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + randn(hidden, std=0.1)
    sd["model.norm.weight"] = 1.0 + randn(hidden, std=0.1)
    head = randn(vocab, hidden, std=lm_scale * inv)
    head[mask_id] = 0.0  # the mask token's logit is exactly 0: never the argmax
    sd["lm_head.weight"] = head
    cfg = {
        "architectures": ["LLaDA2MoeModelLM"], "model_type": "llada2_moe",
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv_heads, "head_dim": HEAD_DIM, "intermediate_size": dense_ffn,
        "moe_intermediate_size": ffn, "num_experts": experts, "num_experts_per_tok": top_k,
        "num_shared_experts": 1, "first_k_dense_replace": 1, "n_group": n_group,
        "topk_group": topk_group, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "score_function": "sigmoid", "moe_router_enable_expert_bias": True, "router_dtype": "fp32",
        "partial_rotary_factor": 0.5, "rotary_dim": HEAD_DIM // 2, "rope_theta": theta,
        "rope_scaling": None, "rms_norm_eps": 1e-06, "vocab_size": vocab,
        "max_position_embeddings": 1024, "use_qkv_bias": False, "use_bias": False,
        "use_qk_norm": True, "norm_head": False, "use_rmsnorm": True, "use_sliding_window": False,
        "hidden_act": "silu", "embedding_dropout": 0.0, "attention_dropout": 0.0,
        "output_dropout": 0.0, "initializer_range": 0.02, "output_router_logits": False,
        "tie_word_embeddings": False, "use_cache": False, "torch_dtype": "bfloat16",
        "mask_token_id": mask_id, "eos_token_id": eos_id, "pad_token_id": eos_id,
    }
    sd = mf.bf16_exact(sd)
    sd.update({k: v.contiguous() for k, v in bias.items()})  # f32, as the released checkpoint
    return cfg, sd


def block_mask(total, block):
    """The official generate's mask: tril over blocks, repeated, 0 / -inf (built in bf16 there;
    cast to f32 for an f32 run)."""
    nb = (total + block - 1) // block
    m = torch.tril(torch.ones(nb, nb)).repeat_interleave(block, 0).repeat_interleave(block, 1)
    m = m[:total, :total].bool()[None, None]
    return torch.where(m, 0.0, float("-inf")).to(torch.bfloat16).to(torch.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dfactory", required=True)
    ap.add_argument("--out", default="tests/fixtures/fidelity/llada2")
    ap.add_argument("--lm-scale", type=float, default=8.0)
    ap.add_argument("--router-scale", type=float, default=3.0,
                    help="router std in units of 1/sqrt(hidden): wide gaps between expert scores")
    ap.add_argument("--bias-std", type=float, default=0.1, help="std of the random f32 expert_bias")
    args = ap.parse_args()
    import transformers

    vocab, mask_id, eos_id = 384, 383, 382
    config_cls, modeling = load_official_llada2(args.dfactory)
    cfg, sd = llada2_checkpoint(seed=21, hidden=256, layers=3, heads=2, kv_heads=1, experts=16,
                                n_group=4, topk_group=2, top_k=4, ffn=16, dense_ffn=64, vocab=vocab,
                                mask_id=mask_id, eos_id=eos_id, lm_scale=args.lm_scale,
                                router_scale=args.router_scale, bias_std=args.bias_std, theta=600000.0)
    mf.save_checkpoint(args.out, cfg, sd)
    config = config_cls(**{k: v for k, v in cfg.items() if k != "model_type"})
    config.model_type = "llada2_moe"  # the released model's block: unfused experts
    config._attn_implementation = "sdpa"
    model = modeling.LLaDA2MoeModelLM(config)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    missing = [m for m in missing if "rotary" not in m and "inv_freq" not in m]
    if missing or unexpected:
        raise SystemExit(f"missing {missing}, unexpected {unexpected}")
    model = model.float().eval()
    layers = model.model.layers
    assert type(layers[0].mlp).__name__ == "LLaDA2MoeMLP", type(layers[0].mlp)
    assert all(type(l.mlp).__name__ == "LLaDA2MoeSparseMoeBlock" for l in layers[1:])
    assert type(layers[1].mlp.experts).__name__ == "ModuleList"
    assert type(layers[0].attention).__name__ == "LLaDA2MoeSdpaAttention"
    assert layers[1].mlp.gate.expert_bias.dtype == torch.float32
    assert torch.equal(layers[1].mlp.gate.expert_bias, sd["model.layers.1.mlp.gate.expert_bias"])

    # Golden logits: 80 positions (two full blocks and a partial third): prompt-like tokens,
    # masks, an EOS.
    T = 80
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, eos_id - 2, (1, T), generator=g)
    ids[0, 40:70] = mask_id
    ids[0, 75] = eos_id
    mask = block_mask(T, 32)
    pos = torch.arange(T)[None]
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, position_ids=pos).logits[0].float().contiguous()
        # The official forward honours the block mask: changing block 2 leaves blocks 0-1
        ids2 = ids.clone()
        ids2[0, 64:] = (ids2[0, 64:] + 7) % (eos_id - 2)
        l2 = model(ids2, attention_mask=mask, position_ids=pos).logits[0]
        # (up to f32 rounding: the GEMMs' blocking depends on the rows of the batch)
        assert torch.allclose(l2[:64], logits[:64], rtol=1e-5, atol=1e-4), "block mask not honoured"
        assert not torch.allclose(l2[64:], logits[64:]), "block 2 did not change"
        # ...and it matters: the bidirectional forward differs in blocks 0-1.
        lb = model(ids, attention_mask=torch.zeros(1, 1, T, T), position_ids=pos).logits[0]
        assert not torch.allclose(lb[:64], logits[:64], atol=1e-3), "mask made no difference"
    meta = {
        "made_by": "tools/fidelity/make_llada2_fixtures.py", "torch": torch.__version__,
        "transformers": transformers.__version__, "dfactory_commit": mf.git_head(args.dfactory),
        "official_model": "dFactory models/llada2_moe/modeling_llada2_moe.py, model_type llada2_moe, sdpa",
        "precision": "f32 on the CPU", "block": "32", "lm_scale": str(args.lm_scale),
        "router_scale": str(args.router_scale), "bias_std": str(args.bias_std),
    }
    save_file({"input_ids": ids.contiguous(), "logits": logits}, os.path.join(args.out, "golden.safetensors"),
              metadata={"format": "pt", **meta})
    print(f"golden: {T} rows -> {args.out}; meta {meta}")

    # Trajectories of the official generate. dFactory's copy draws torch.multinomial from the
    # softmax even at temperature 0; the HF file and dInfer take the argmax: patch to that.
    def argmax_sample(self, logits, temperature=0.0, top_k=None, top_p=None):
        assert temperature == 0.0 and not top_k and (top_p is None or top_p >= 1.0)
        probs = torch.softmax(logits, dim=-1)
        p, tok = probs.max(dim=-1)
        return tok, p

    modeling.LLaDA2MoeModelLM._sample_with_temperature_topk_topp = argmax_sample

    # generate builds its 0/-inf mask in bf16, which SDPA refuses next to f32 queries: cast it
    # to the model dtype (f32), as DESIGN.md §8 says for an f32 run.
    def f32_mask(_module, args, kwargs):
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = kwargs["attention_mask"].to(torch.float32)
        return args, kwargs

    # (generate calls `self.forward` directly, so the hooks go on the inner LLaDA2MoeModel)
    model.model.register_forward_pre_hook(f32_mask, with_kwargs=True)
    g = torch.Generator().manual_seed(9)
    cases = []
    for P, G, S, thr in [(32, 64, 32, 0.95), (64, 32, 8, 0.7), (32, 32, 4, 0.9), (64, 64, 16, 0.5),
                         (32, 64, 8, 0.9999), (64, 32, 5, 0.999)]:
        prompt = torch.randint(0, eos_id - 2, (P,), generator=g).tolist()
        c = {"name": f"llada2-generate-p{P}-g{G}-s{S}-t{thr}", "model": "llada2",
             "decoder": "LLaDA2 generate (argmax)", "prompt": prompt, "gen_len": G, "block_len": 32,
             "policy": f"llada2:{thr},{S}", "cache": "none", "mask_id": mask_id, "steps_arg": S}

        def call(m, prompt=prompt, G=G, S=S, thr=thr):
            out = m.generate(torch.tensor([prompt]), temperature=0.0, block_length=32, steps=S,
                             gen_length=G, threshold=thr, eos_id=mask_id, mask_id=mask_id)
            return prompt + out[0].tolist()

        with torch.no_grad():
            cases.append(mf.run_case(c, model.model, ["generate"], lambda _inner, call=call: call(model)))
        print(f"{c['name']}: {c['forwards']} forwards", flush=True)
    meta["sampling"] = "argmax (patched _sample_with_temperature_topk_topp)"
    with open(os.path.join(args.out, "trajectories.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
