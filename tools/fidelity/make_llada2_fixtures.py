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
                                    (the schema of ../trajectories.json, plus `stop_at_eos` and
                                    `eos_id`), argmax instead of dFactory's temperature-0 sample
                                    (as the HF file and dInfer): six cases with prompts a
                                    multiple of 32 long and the EOS stop off (as first made),
                                    then prompts of any length (the first decoded block holds
                                    the prompt's tail, the canvas is padded to whole blocks)
                                    with the EOS stop off and on; with --sglang, LLaDA2.1 token
                                    editing (`edit_generate`: SGLang's JointThreshold step in
                                    the LLaDA2.1 `generate`'s block loop)

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
  --sglang DIR      a folder holding sglang/srt/dllm/algorithm/joint_threshold.py (the unpacked
                                          sglang wheel, or a checkout's python/): SGLang's
                                          official LLaDA2.1 JointThreshold, imported with its
                                          runtime imports stubbed (none is used by its per-row
                                          step). The HF LLaDA2.1 file (which needs transformers
                                          >= 5) was out of reach; see docs/fidelity.md.
Needs torch and transformers 4.51-4.57 (the committed fixtures: see golden.safetensors metadata).
"""
import argparse
import importlib
import importlib.util
import inspect
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


class FullRecorder(mf.Recorder):
    """`make_fixtures.Recorder` that also keeps the decoder's canvas tensor `x` itself: the
    official generate mutates it in place, so after the call it is the whole final canvas
    (padding slots and blocks after an EOS stop included), not only the trimmed output."""

    def hook(self, module, args):
        frame = inspect.currentframe().f_back
        while frame is not None and frame.f_code.co_name not in self.fn_names:
            frame = frame.f_back
        if frame is None:
            raise RuntimeError("model called outside a recorded decoder")
        self.x = frame.f_locals["x"]
        self.canvases.append(self.x[0].tolist())


def record(case, model, fn_name, call):
    """Runs `call()` (a decoder returning the generated ids after the prompt) and stores in
    `case` the commits (position, token) of every forward, read from the decoder's own canvas,
    and the output (prompt + what the decoder returned)."""
    rec = FullRecorder(model.model, [fn_name])
    try:
        with torch.no_grad():
            out = call()
    finally:
        rec.handle.remove()
    case["forwards"] = len(rec.canvases)
    case["steps"] = mf.trajectory(rec.canvases, rec.x[0].tolist())
    case["output"] = case["prompt"] + out
    if case["mask_id"] in out:
        raise SystemExit(f"{case['name']}: the output holds the mask token")
    if any(t == case["mask_id"] for s in case["steps"] for _, t in s):
        raise SystemExit(f"{case['name']}: a step wrote the mask token")
    return case


def stop_token(model, prompt, G, S, thr, mask_id, block):
    """An EOS id that the official decode actually produces (see `likely_eos`), from a run
    with the EOS stop off."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), temperature=0.0, block_length=block, steps=S,
                             gen_length=G, threshold=thr, eos_id=mask_id, mask_id=mask_id)[0].tolist()
    return likely_eos(out, len(prompt), block)


def likely_eos(out, P, block):
    """The most frequent token of the second decoded block of `out` (the output of a run with
    the EOS stop off) among those the output does not hold before that block (ties: the lower
    id; the most frequent of the block when every one of them occurs earlier). Runs with it as
    eos_id stop after the second block and trim inside it, which a random checkpoint with its
    own EOS would almost never show."""
    lo = (P // block + 1) * block - P  # offset of the second decoded block in the output
    second = out[lo:lo + block]
    fresh = [t for t in second if t not in out[:lo]] or second
    return min(set(fresh), key=lambda t: (-fresh.count(t), t))


def layout_and_eos_cases(model, mask_id, eos_id):
    """The official generate on prompts of any length (first decoded block = the prompt's
    tail, canvas padded to whole blocks, output x[P:P+G]) and with the EOS stop on."""
    g = torch.Generator().manual_seed(11)
    cases = []
    # (P, G, S, tau, eos): eos None = stop off (eos_id = mask id), "likely" = stop_token(),
    # an int = that id (the checkpoint's EOS, 382).
    for P, G, S, thr, eos in [(1, 40, 32, 0.95, None), (17, 48, 8, 0.7, None), (45, 20, 32, 0.9, None),
                              (70, 26, 16, 0.5, None), (17, 64, 32, 0.95, "likely"), (45, 60, 8, 0.8, "likely"),
                              (32, 96, 16, 0.9, "likely"), (70, 58, 32, 0.95, "likely"), (1, 64, 4, 0.7, "likely"),
                              (17, 48, 8, 0.7, eos_id)]:
        prompt = torch.randint(0, eos_id - 2, (P,), generator=g).tolist()
        stop = None if eos is None else (stop_token(model, prompt, G, S, thr, mask_id, 32) if eos == "likely" else eos)
        c = {"name": f"llada2-generate-p{P}-g{G}-s{S}-t{thr}" + ("" if stop is None else f"-eos{stop}"),
             "model": "llada2", "decoder": "LLaDA2 generate (argmax)", "prompt": prompt, "gen_len": G,
             "block_len": 32, "policy": f"llada2:{thr},{S}", "cache": "none", "mask_id": mask_id, "steps_arg": S,
             "stop_at_eos": stop is not None}
        if stop is not None:
            c["eos_id"] = stop

        def call(prompt=prompt, G=G, S=S, thr=thr, stop=stop):
            out = model.generate(torch.tensor([prompt]), temperature=0.0, block_length=32, steps=S, gen_length=G,
                                 threshold=thr, eos_id=mask_id if stop is None else stop, mask_id=mask_id)
            return out[0].tolist()

        cases.append(record(c, model, "generate", call))
        print(f"{c['name']}: {c['forwards']} forwards, output {len(c['output']) - P} of {G}", flush=True)
    return cases


def load_sglang_joint_threshold(root):
    """SGLang's JointThreshold (LLaDA2.1's M2T + T2T rule), imported from `root`, with the
    few SGLang runtime imports it names replaced by stubs (none of them is used by the per-row
    step). Returns (class, version)."""
    for rel in ("sglang/srt/dllm/algorithm/joint_threshold.py", "python/sglang/srt/dllm/algorithm/joint_threshold.py"):
        path = os.path.join(root, rel)
        if os.path.isfile(path):
            break
    else:
        raise SystemExit(f"--sglang {root}: no sglang/srt/dllm/algorithm/joint_threshold.py under it")
    stubs = {
        "sglang": {}, "sglang.srt": {}, "sglang.srt.dllm": {}, "sglang.srt.dllm.algorithm": {},
        "sglang.srt.dllm.algorithm.base": {"DllmAlgorithm": type("DllmAlgorithm", (), {})},
        "sglang.srt.dllm.config": {"DllmConfig": type("DllmConfig", (), {})},
        "sglang.srt.model_executor": {},
        "sglang.srt.model_executor.forward_batch_info": {"ForwardBatch": type("ForwardBatch", (), {})},
        "sglang.srt.utils": {"is_npu": lambda: False},
    }
    saved = {k: sys.modules.get(k) for k in stubs}
    for name, attrs in stubs.items():
        m = types.ModuleType(name)
        m.__path__ = []
        for k, v in attrs.items():
            setattr(m, k, v)
        sys.modules[name] = m
    spec = importlib.util.spec_from_file_location("sglang_joint_threshold", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for k, v in saved.items():
        if v is None:
            sys.modules.pop(k, None)
        else:
            sys.modules[k] = v
    version = "unknown"
    for d in os.listdir(root):
        if d.startswith("sglang-") and d.endswith(".dist-info"):
            version = d[len("sglang-"):-len(".dist-info")]
    if version == "unknown":
        version = "git " + mf.git_head(root)
    return mod.JointThreshold, version


def edit_generate(model, joint, prompt, G, tau_m, tau_e, post, mask_id, eos, block=32):
    """LLaDA2.1's `generate` with JointThreshold editing: the official canvas (padded to whole
    blocks, decoding from block P // 32, absolute positions, block-causal mask, the whole prefix
    recomputed every step, no cache). Per block: a step that starts with no mask left counts
    toward `post` and the block ends, without a forward, once more than `post` of them would
    run; otherwise one forward and SGLang's JointThreshold step (M2T: masked slots with p >
    tau_m, the best one when none passes; T2T: non-mask, non-prompt slots whose argmax differs,
    with p > tau_e); the block ends after a step that changes nothing. With an EOS id, decoding
    stops after a block that leaves x[P:end] with no mask and an EOS (eos_early_stop), and the
    output x[P:P+G] is cut after its first EOS."""
    P = len(prompt)
    nb = (P + G + block - 1) // block
    x = torch.full((1, nb * block), mask_id, dtype=torch.long)
    x[0, :P] = torch.tensor(prompt)
    attn = block_mask(nb * block, block)
    pos = torch.arange(nb * block)[None]
    algo = joint.__new__(joint)
    algo.threshold, algo.edit_threshold, algo.max_post_edit_steps = tau_m, tau_e, post
    algo.penalty_lambda, algo.vectorized_decoding, algo._use_shared_state = 0, False, False
    algo.mask_id, algo.block_size, algo.fdfo = mask_id, block, False
    for b in range(P // block, nb):
        lo, end = b * block, (b + 1) * block
        state = {"post_edit_steps": 0, "finished": False, "prompt_mask": torch.arange(lo, end) < P}
        mask_free = 0
        while True:
            if not (x[0, lo:end] == mask_id).any():
                mask_free += 1
            if mask_free > post:
                break
            logits = model(x[:, :end], attention_mask=attn[:, :, :end, :end], position_ids=pos[:, :end]).logits[0]
            batch = types.SimpleNamespace(batch_size=1, input_ids=x[0, lo:end])  # a view: steps write x
            algo.step(batch, logits[lo:end].clone(), [state])
            if state["finished"]:
                break
        done = x[0, P:end]
        if eos is not None and not (done == mask_id).any() and (done == eos).any():
            break
    out = x[0, P:P + G].tolist()
    if eos is not None and eos in out:
        out = out[:out.index(eos) + 1]
    return out


def edit_cases(model, joint, mask_id, eos_id):
    g = torch.Generator().manual_seed(13)
    cases = []
    # (P, G, tau_m, tau_e, post, eos): LLaDA2.1's quality mode (0.7, 0.5) and speed mode
    # (0.5, 0.0: any differing argmax is written), whose edits never settle on this random
    # checkpoint (every block runs its budget out); budgets 16, 4 and 0; and high editing
    # thresholds whose blocks end on a step that changes nothing.
    for P, G, tm, te, post, eos in [(17, 48, 0.7, 0.5, 16, None), (45, 40, 0.5, 0.0, 16, None),
                                    (32, 64, 0.9, 0.8, 4, None), (1, 40, 0.5, 0.0, 0, None),
                                    (17, 48, 0.9, 0.99, 16, None), (32, 64, 0.8, 0.95, 16, None),
                                    (70, 40, 0.9, 0.98, 16, "likely"), (17, 60, 0.5, 0.0, 16, "likely")]:
        prompt = torch.randint(0, eos_id - 2, (P,), generator=g).tolist()
        stop = None
        if eos == "likely":
            with torch.no_grad():
                out = edit_generate(model, joint, prompt, G, tm, te, post, mask_id, None)
            stop = likely_eos(out, P, 32)
        c = {"name": f"llada2_1-edit-p{P}-g{G}-m{tm}-e{te}-post{post}" + ("" if stop is None else f"-eos{stop}"),
             "model": "llada2", "decoder": "LLaDA2.1 generate with SGLang JointThreshold (argmax)", "prompt": prompt,
             "gen_len": G, "block_len": 32, "policy": f"edit:{tm},{te},{post}", "cache": "none", "mask_id": mask_id,
             "stop_at_eos": stop is not None}
        if stop is not None:
            c["eos_id"] = stop
        cases.append(record(c, model, "edit_generate",
                            lambda prompt=prompt, G=G, tm=tm, te=te, post=post, stop=stop:
                            edit_generate(model, joint, prompt, G, tm, te, post, mask_id, stop)))
        edits = sum(1 for i, s in enumerate(c["steps"]) for p, _ in s if p >= P and not was_masked(c, i, p))
        print(f"{c['name']}: {c['forwards']} forwards, {edits} edits, output {len(c['output']) - P} of {G}", flush=True)
    return cases


def was_masked(case, step, pos):
    """Whether `pos` was still masked when step `step` of the case began (else a commit to it
    is an edit)."""
    return all(p != pos for s in case["steps"][:step] for p, _ in s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dfactory", required=True)
    ap.add_argument("--out", default="tests/fixtures/fidelity/llada2")
    ap.add_argument("--lm-scale", type=float, default=8.0)
    ap.add_argument("--router-scale", type=float, default=3.0,
                    help="router std in units of 1/sqrt(hidden): wide gaps between expert scores")
    ap.add_argument("--bias-std", type=float, default=0.1, help="std of the random f32 expert_bias")
    ap.add_argument("--sglang", default=None,
                    help="a directory holding sglang/srt/dllm/algorithm/joint_threshold.py (the unpacked sglang "
                         "wheel, or a checkout's python/ folder): adds the edit-policy trajectories")
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
    # The first six: prompts a multiple of 32 long, EOS stop off (eos_id = mask id), as made
    # before this file learnt the rest (regenerating reproduces them byte for byte).
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
    cases += layout_and_eos_cases(model, mask_id, eos_id)
    sgl_version = None
    if args.sglang:
        joint, sgl_version = load_sglang_joint_threshold(args.sglang)
        cases += edit_cases(model, joint, mask_id, eos_id)
        meta["sglang"] = sgl_version
        meta["edit_rule"] = ("sglang/srt/dllm/algorithm/joint_threshold.py JointThreshold.step (per-row path), "
                             "driven block by block by edit_generate in this file")
    meta["sampling"] = "argmax (patched _sample_with_temperature_topk_topp)"
    with open(os.path.join(args.out, "trajectories.json"), "w") as f:
        json.dump({"meta": meta, "cases": cases}, f, separators=(",", ":"))
        f.write("\n")


if __name__ == "__main__":
    main()
