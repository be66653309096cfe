"""The trainer's memory, full fine-tuning against LoRA, per phase: measured at a size that fits, and an arithmetic
model (checked against the measurement) for the sizes that do not: which models train on one 40 GB or 80 GB GPU.

Each variant runs in a fresh process: a random Qwen2 of `--shape` (with `--layers` and `--vocab` cut down on CPU),
FSDP2 on one rank as grpo.py builds it (full: the policy and its frozen reference, fp32 master weights; LoRA: the
base in the compute dtype, fp32 adapters on every linear layer of the decoder blocks, the reference the base itself),
AdamW over what trains; then one forward + backward of the GRPO log-probs over `--tokens` tokens and one optimizer
step. Memory above the process's start, after each phase:

  model      the weights (and the reference), sharded, before any update
  backward   the peak of forward + backward: weights + gradients + activations
  step       the peak of the optimizer step: + AdamW's two moments (created at the first step)

  python bench/lora_memory.py --device cpu                   # Qwen2-1.5B blocks, 2 layers, vocab 32000, 1024 tokens
  python bench/lora_memory.py --device cuda --layers 0       # the whole 1.5B shape on a GPU
"""

from __future__ import annotations

import argparse

import torch

import common

# Qwen2 / Qwen2.5 shapes (the models' config.json): hidden, intermediate, layers, heads, kv heads, vocab, tied.
SHAPES = {
    "qwen2-1.5b": (1536, 8960, 28, 12, 2, 151936, True),
    "qwen2.5-3b": (2048, 11008, 36, 16, 2, 151936, True),
    "qwen2-7b": (3584, 18944, 28, 28, 4, 152064, False),
    "qwen2.5-14b": (5120, 13824, 48, 40, 8, 152064, False),
}
GiB = common.GiB


def counts(shape, layers: int | None = None, vocab: int | None = None, rank: int = 0) -> tuple[int, int]:
    """(parameters of the model, parameters of its LoRA adapters at `rank` on every linear layer of the blocks)."""
    h, i, n, heads, kv, v, tied = shape
    n, v = layers or n, vocab or v
    d = h // heads
    linears = [(h, h), (h, kv * d), (h, kv * d), (h, h), (h, i), (h, i), (i, h)]  # (in, out): q k v o gate up down
    block = sum(a * b for a, b in linears) + (h + 2 * kv * d) + 2 * h  # + q/k/v biases + two norms
    params = n * block + v * h * (1 if tied else 2) + h
    adapters = n * rank * sum(a + b for a, b in linears)
    return params, adapters


def model_bytes(variant: str, P: int, Pa: int, compute_bytes: int) -> dict:
    """What the trainer holds for the variant, in bytes, by part (one rank of one; divide by the world size under
    FSDP2). full: fp32 weights, an fp32 reference (--kl-coef > 0), fp32 gradients, AdamW's two fp32 moments. LoRA:
    the base in the compute dtype (bf16 on GPUs), fp32 adapters, their gradients and moments; no reference."""
    if variant == "full":
        return dict(weights=4 * P, reference=4 * P, gradients=4 * P, adam=8 * P)
    return dict(weights=compute_bytes * P + 4 * Pa, reference=0, gradients=4 * Pa, adam=8 * Pa)


def measure(variant: str, args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    import lora as L
    import model as M

    info = M.init_distributed()
    h, i, n, heads, kv, v, tied = SHAPES[args.shape]
    config = Qwen2Config(
        hidden_size=h,
        intermediate_size=i,
        num_hidden_layers=args.layers or n,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=args.vocab or v,
        tie_word_embeddings=tied,
        max_position_embeddings=32768,
    )
    bf16 = args.dtype == "bfloat16"
    rank = 0 if variant == "full" else int(variant.split("-r")[1])
    mem = common.MemoryProbe(args.device).start()

    def build(dtype):
        torch.manual_seed(0)
        net = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        return net.to(info.device)

    if rank:
        policy = build(torch.bfloat16 if bf16 else torch.float32)
        L.apply_lora(policy, rank, 32.0)
        policy, reference = M.shard_model(policy, mixed_precision=bf16), None
    else:
        policy = M.shard_model(build(torch.float32), mixed_precision=bf16)
        reference = M.shard_model(build(torch.float32), mixed_precision=bf16).requires_grad_(False)
    optimizer = torch.optim.AdamW(L.trainable_parameters(policy), lr=1e-6)
    phases = {"model": mem.stop()["peak_bytes"]}

    g = torch.Generator().manual_seed(0)
    seq = 512
    seqs = [torch.randint(0, config.vocab_size, (seq,), generator=g).tolist() for _ in range(args.tokens // seq)]
    prompt = [64] * len(seqs)
    with torch.no_grad():
        if reference is not None:
            M.response_logprobs(reference, seqs, prompt, packed=False)
        else:
            with L.adapters_off(policy):
                M.response_logprobs(policy, seqs, prompt, packed=False)
    logp, _ = M.response_logprobs(policy, seqs, prompt, packed=False)
    logp.mean().backward()
    phases["backward"] = mem.stop()["peak_bytes"]
    optimizer.step()
    phases["step"] = mem.stop()["peak_bytes"]
    P, Pa = counts(SHAPES[args.shape], args.layers, args.vocab, rank)
    return {"variant": variant, "params": P, "adapter_params": Pa, "phases": phases, "dtype": args.dtype}


def activation_bytes_per_token_layer(measured: dict, args) -> float:
    """Activations of one token in one block (bytes), from the full variant: the backward peak less weights,
    reference and gradients, over tokens x layers (the log-prob chunks are small beside it)."""
    P, _ = counts(SHAPES[args.shape], args.layers, args.vocab)
    parts = model_bytes("full", P, 0, 2)
    rest = measured["phases"]["backward"] - parts["weights"] - parts["reference"] - parts["gradients"]
    return max(rest, 0) / (args.tokens * (args.layers or SHAPES[args.shape][2]))


def fits(shape_name: str, variant: str, gpu_gib: float, per_token_layer: float, args) -> dict:
    """The arithmetic model on one GPU: generation holds the trainer's weights, reference and moments plus vLLM's
    bf16 weights and KV cache (--vllm-kv-cache-gib); the update (vLLM asleep) holds the trainer's state, gradients
    and the activations of one micro-batch (--tokens-per-microbatch), which activation checkpointing cuts to about
    one block's plus each block's input. `fits` names the first of: no flags, --activation-checkpointing, and that
    with 8192 tokens per micro-batch, under which both phases fit."""
    shape = SHAPES[shape_name]
    rank = 0 if variant == "full" else int(variant.split("-r")[1])
    P, Pa = counts(shape, rank=rank)
    parts = model_bytes("full" if not rank else "lora", P, Pa, 2)
    layers, h = shape[2], shape[0]
    static = parts["weights"] + parts["reference"] + parts["adam"]
    generate = static + 2 * P + args.kv_cache_gib * GiB
    scale = h / SHAPES[args.shape][0]  # activations per token grow with the width

    def update(tokens: int, checkpointed: bool) -> float:
        # checkpointed: one block's activations at a time, plus every block's bf16 input
        acts = per_token_layer * scale * tokens * (1 if checkpointed else layers)
        return static + parts["gradients"] + acts + (2 * h * tokens * layers if checkpointed else 0)

    options = [  # the flags to try, least intrusive first
        ("", args.tokens_per_microbatch, False),
        ("--activation-checkpointing", args.tokens_per_microbatch, True),
        ("--activation-checkpointing --tokens-per-microbatch 8192", 8192, True),
    ]
    flags = next((f for f, t, c in options if max(generate, update(t, c)) <= gpu_gib * GiB), None)
    return {
        "model": shape_name,
        "variant": variant,
        "params_b": P / 1e9,
        "static_gib": static / GiB,
        "generate_gib": generate / GiB,
        "update_gib": update(args.tokens_per_microbatch, False) / GiB,
        "update_ckpt_gib": update(args.tokens_per_microbatch, True) / GiB,
        "update_ckpt_8k_gib": update(8192, True) / GiB,
        "fits": "no" if flags is None else "yes" + (f": {flags}" if flags else ""),
        "gpu_gib": gpu_gib,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--shape", default="qwen2-1.5b", choices=sorted(SHAPES))
    p.add_argument("--layers", type=int, default=None, help="blocks (default 2 on cpu; 0 = the shape's own)")
    p.add_argument("--vocab", type=int, default=None, help="vocabulary (default 32000 on cpu; 0 = the shape's own)")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the measured micro-batch (sequences of 512)")
    p.add_argument("--dtype", default=None, help="compute dtype (default bfloat16 on cuda, float32 on cpu)")
    p.add_argument("--ranks", default="8,32", help="LoRA ranks to measure")
    p.add_argument("--tokens-per-microbatch", type=int, default=32768, help="for the one-GPU table (grpo.py's)")
    p.add_argument("--kv-cache-gib", type=float, default=8.0, help="vLLM's KV cache in the one-GPU table")
    args = p.parse_args()
    cpu = args.device == "cpu"
    args.layers = (2 if cpu else 0) if args.layers is None else args.layers
    args.vocab = (32000 if cpu else 0) if args.vocab is None else args.vocab
    args.dtype = args.dtype or ("float32" if cpu else "bfloat16")
    if args.worker:
        return common.worker_main(args, measure)

    variants = ["full"] + [f"lora-r{r}" for r in args.ranks.split(",")]
    res = common.run_variants(__file__, variants, args.variant_timeout)
    elt = 2 if args.dtype == "bfloat16" else 4
    rows = []
    for name, r in res.items():
        if "phases" not in r:
            rows.append({"variant": name, "error": r.get("error")})
            continue
        parts = model_bytes("full" if name == "full" else "lora", r["params"], r["adapter_params"], elt)
        predicted = {"model": parts["weights"] + parts["reference"]}
        rows.append(
            {"variant": name, "params_m": r["params"] / 1e6, "adapters_m": r["adapter_params"] / 1e6}
            | {f"{k}_gib": v / GiB for k, v in r["phases"].items()}
            | {"model_predicted_gib": predicted["model"] / GiB}
            | {"step_predicted_gib": (predicted["model"] + parts["gradients"] + parts["adam"]) / GiB}
        )
    full = next((r for r in rows if r["variant"] == "full" and "step_gib" in r), None)
    for r in rows:
        if full and "step_gib" in r:
            r["step_vs_full"] = r["step_gib"] / full["step_gib"]
    layers = args.layers or SHAPES[args.shape][2]
    print(
        f"\n{args.shape} blocks x {layers}, vocab {args.vocab or SHAPES[args.shape][5]}, {args.tokens} tokens, "
        f"{args.dtype}, one rank, {common.device_name(args.device)}; GiB above the process's start\n"
    )
    cols = [("variant", "variant", ""), ("params_m", "params M", ".0f"), ("adapters_m", "adapters M", ".1f")]
    cols += [("model_gib", "model", ".2f"), ("model_predicted_gib", "model (arithmetic)", ".2f")]
    cols += [("backward_gib", "fwd+bwd peak", ".2f"), ("step_gib", "step peak", ".2f")]
    cols += [("step_predicted_gib", "state (arithmetic)", ".2f"), ("step_vs_full", "step peak vs full", ".2f")]
    print(common.table(rows, cols + [("error", "error", "")]))

    extra = {}
    if "phases" in res.get("full", {}):
        per = activation_bytes_per_token_layer(res["full"], args)
        per *= 2 / elt  # the GPU computes in bf16
        table = [fits(s, v, g, per, args) for g in (40, 80) for s in SHAPES for v in ("full", "lora-r32")]
        print(
            f"\nOne GPU (arithmetic; activations scaled from this measurement, {per / 1024:.1f} KiB per token, block "
            f"in bf16 at hidden {SHAPES[args.shape][0]}), --tokens-per-microbatch {args.tokens_per_microbatch}, a "
            f"{args.kv_cache_gib:g} GiB KV cache, sleep mode between generation and update\n"
        )
        print(
            common.table(
                table,
                [
                    ("gpu_gib", "GPU GiB", ".0f"),
                    ("model", "model", ""),
                    ("params_b", "params B", ".2f"),
                    ("variant", "training", ""),
                    ("static_gib", "weights + moments", ".1f"),
                    ("generate_gib", "generate", ".1f"),
                    ("update_gib", "update", ".1f"),
                    ("update_ckpt_gib", "update, checkpointed", ".1f"),
                    ("update_ckpt_8k_gib", "the same, 8192 tokens", ".1f"),
                    ("fits", "fits", ""),
                ],
            )
        )
        extra = {"one_gpu": table, "activation_bytes_per_token_block_bf16": per}
    common.write_results("lora_memory", args, res, extra)


if __name__ == "__main__":
    main()
