"""Policy-update throughput: tokens/s and MFU of forward + backward of the GRPO loss, packed vs padded.

One timed iteration = the whole batch (--num-seqs sequences) through every micro-batch:
model.response_logprobs (FSDP2-sharded policy, world-1 process group) -> grpo.policy_loss -> backward
(-> with --optimizer-step, grpo.py's clip_grad_norm_ and AdamW step). Lengths follow the paper: prompts
U[100, 300], responses U[100, 4000] tokens, times --len-scale. Variants:
  packed         make_microbatches groups (token budget), one packed row each (what the trainer does)
  padded         the same groups, right-padded [B, Lmax] (the trainer with --packed off)
  padded-sorted  sorted by length, consecutive groups with B * Lmax <= budget (how much of packing's gain is
                 just less padding)
  packed-flex    packed with attn_implementation="flex_attention" (block-sparse BlockMask from the packed
                 position_ids; no backward on CPU)
--attn auto is what the trainer loads (model.load_model): on CUDA flash_attention_2 when flash-attn is installed,
else torch_varlen (PyTorch's own varlen flash kernel, model.varlen_attention_forward); sdpa on CPU.
MFU = sum_i len_i * model.model_flops_per_token(config, len_i) / time / peak, real tokens only
(model_flops_per_token already counts forward + backward: 6N + 12 * layers * d_attn * seq_len).
Settings beyond the trainer's defaults, to try side by side (bench/gpu_suite.py's tuning part):
  --compile-blocks             torch.compile each decoder block (model.shard_model; torchtitan's per-block compile)
  --optimizer-step foreach|fused   the AdamW step in the iteration; its own time is optimizer_s
  --logprob-chunk-size N       response_logprobs' lm_head chunk (the trainer's is 512)
  --no-reshard-after-forward   FSDP2 keeps each block's gathered parameters for the backward

  python bench/update_throughput.py --device cpu --config tiny --len-scale 0.05
  python bench/update_throughput.py --device cuda          # Qwen2-1.5B shape, random weights, bf16
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import sys

import torch

import common

CONFIGS = {  # random weights, built from the config (no download)
    "qwen2-1.5b": common.QWEN2_1_5B,
    "tiny": dict(
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=8192,
        tie_word_embeddings=True,
        max_position_embeddings=32768,
        rope_theta=1e6,
    ),
}
VARIANTS = ("packed", "padded", "padded-sorted", "packed-flex")


def workload(args):
    """Seeded lengths: (prompt_lens, response_lens)."""
    rng = random.Random(args.seed)
    s = args.len_scale
    prompts = [max(1, round(rng.randint(100, 300) * s)) for _ in range(args.num_seqs)]
    responses = [max(1, round(rng.randint(100, 4000) * s)) for _ in range(args.num_seqs)]
    return prompts, responses


def measure(variant: str, args) -> dict:
    from transformers import AutoModelForCausalLM, Qwen2Config

    import grpo
    import model as M
    from config import GRPOArgs

    dev = args.device
    packed = variant.startswith("packed")
    attn = "flex_attention" if variant == "packed-flex" else args.attn
    if attn == "auto":
        attn = (
            "sdpa"
            if not dev.startswith("cuda")
            else "flash_attention_2"
            if importlib.util.find_spec("flash_attn")
            else M.TORCH_VARLEN
        )
    if attn == M.TORCH_VARLEN:
        M.register_varlen_attention()
    if attn == "flex_attention":
        torch._dynamo.config.cache_size_limit = 64  # one compile per distinct micro-batch shape
    torch.manual_seed(args.seed)
    M.init_distributed()
    with torch.device(dev):  # random init directly on the device
        net = AutoModelForCausalLM.from_config(
            Qwen2Config(**CONFIGS[args.config]), attn_implementation=attn, dtype=torch.float32
        )
    M.shard_model(  # bf16 compute iff cuda
        net,
        activation_checkpointing=args.activation_checkpointing,
        compile_blocks=args.compile_blocks,
        reshard_after_forward=not args.no_reshard_after_forward,
    )
    cfg = net.config

    prompt_lens, resp_lens = workload(args)
    lengths = [p + r for p, r in zip(prompt_lens, resp_lens)]
    gen = torch.Generator().manual_seed(args.seed)
    seqs = [torch.randint(0, cfg.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    adv = torch.randn(len(seqs), generator=gen)
    budget = args.tokens_per_microbatch
    # padded-sorted: rows x longest within the budget, what the trainer does for padded batches
    groups = M.make_microbatches(lengths, budget, padded=variant == "padded-sorted")
    num_tokens = sum(resp_lens)
    opt, hp = None, GRPOArgs()  # grpo.py's optimizer settings (config.py's defaults)
    if args.optimizer_step != "none":  # with the implementation chosen
        fused = args.optimizer_step == "fused"
        opt = torch.optim.AdamW(
            net.parameters(), lr=hp.lr, weight_decay=hp.weight_decay, fused=fused, foreach=not fused
        )

    def optimizer_step():  # as grpo.update_policy ends a mini-batch
        torch.nn.utils.clip_grad_norm_(net.parameters(), hp.grad_clip)
        opt.step()

    def step():
        net.zero_grad(set_to_none=True)
        for g in groups:
            logp, _ = M.response_logprobs(
                net,
                [seqs[i] for i in g],
                [prompt_lens[i] for i in g],
                packed=packed,
                chunk_size=args.logprob_chunk_size,
            )
            lens = torch.tensor([resp_lens[i] for i in g])
            seq_ids = torch.repeat_interleave(torch.arange(len(g)), lens).to(logp.device)
            a = torch.repeat_interleave(adv[g], lens).to(logp.device)
            loss, _ = grpo.policy_loss(
                logp,
                logp.detach(),
                a,
                seq_ids,
                num_seqs=len(seqs),
                num_tokens=num_tokens,
                kl_coef=0.0,
                entropy_coef=0.0,
            )
            loss.backward()
        if opt is not None:
            optimizer_step()

    mem = common.MemoryProbe(dev).start()
    times = common.time_fn(step, dev, args.warmup, args.iters)
    t = common.median(times)
    # the optimizer step alone (the gradients of the last iteration are still there)
    opt_times = common.time_fn(optimizer_step, dev, 0, args.iters) if opt is not None else None
    real = sum(lengths)
    computed = real if packed else sum(len(g) * max(lengths[i] for i in g) for g in groups)
    flops = sum(n * M.model_flops_per_token(cfg, n) for n in lengths)
    peak = common.peak_tflops(dev, args.peak_tflops)
    mask = (
        {
            "flash_attention_2": "varlen (no mask)",
            M.TORCH_VARLEN: "varlen (no mask)",
            "flex_attention": "BlockMask (block-sparse)",
        }.get(cfg._attn_implementation, "dense block-diagonal [T,T]")
        if packed
        else "padding mask"
    )
    return {
        "variant": variant,
        "attn": cfg._attn_implementation,
        "mask": mask,
        "packed": packed,
        "tokens": real,
        "response_tokens": num_tokens,
        "computed_tokens": computed,
        "padding_waste": 1 - real / computed,
        "microbatches": len(groups),
        "max_microbatch_tokens": max(
            len(g) * max(lengths[i] for i in g) if not packed else sum(lengths[i] for i in g) for g in groups
        ),
        "times_s": times,
        "median_s": t,
        "optimizer_s": common.median(opt_times) if opt_times else None,
        "tokens_per_s": real / t,
        "tflops": flops / t / 1e12,
        "mfu": flops / t / 1e12 / peak if peak else None,
        "peak_tflops": peak,
        **mem.stop(),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--config", default=None, choices=sorted(CONFIGS), help="default qwen2-1.5b on cuda, tiny on cpu")
    p.add_argument(
        "--num-seqs", type=int, default=None, help="sequences per timed iteration (default 32 on cuda, 16 on cpu)"
    )
    p.add_argument("--len-scale", type=float, default=None, help="length multiplier (default 1 on cuda, 0.05 on cpu)")
    p.add_argument("--tokens-per-microbatch", type=int, default=None, help="default 16384 on cuda, 1024 on cpu")
    p.add_argument(
        "--attn",
        default="auto",
        choices=["auto", "flash_attention_2", "torch_varlen", "sdpa", "flex_attention", "eager"],
        help="attention of the packed/padded variants (auto: as the trainer loads it, see above)",
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {VARIANTS}")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--compile-blocks", action="store_true", help="torch.compile each decoder block")
    p.add_argument(
        "--optimizer-step",
        default="none",
        choices=["none", "foreach", "fused"],
        help="add grpo.py's grad clip + AdamW step (this implementation) to each iteration",
    )
    p.add_argument("--logprob-chunk-size", type=int, default=512, help="lm_head tokens per chunk (trainer: 512)")
    p.add_argument(
        "--no-reshard-after-forward", action="store_true", help="FSDP2 keeps gathered parameters for the backward"
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="override the GPU's peak (bf16 dense)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.num_seqs = args.num_seqs or (32 if gpu else 16)
    args.config = args.config or ("qwen2-1.5b" if gpu else "tiny")
    args.len_scale = args.len_scale if args.len_scale is not None else (1.0 if gpu else 0.05)
    args.tokens_per_microbatch = args.tokens_per_microbatch or (16384 if gpu else 1024)
    if args.worker:
        return common.worker_main(args, measure)

    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        sys.exit(f"update_throughput.py: unknown --variants {bad}; choose from {VARIANTS}")
    res = common.run_variants(__file__, variants, args.variant_timeout)
    base = res.get("padded", {}).get("tokens_per_s")
    rows = []
    for v, r in res.items():
        r.setdefault("variant", v)
        if base and r.get("tokens_per_s"):
            r["speedup_vs_padded"] = r["tokens_per_s"] / base
        rows.append(r | {"peak_gib": r["peak_bytes"] / common.GiB if "peak_bytes" in r else None})
    print(
        f"\n{args.config}, {args.num_seqs} seqs, len-scale {args.len_scale}, budget {args.tokens_per_microbatch} "
        f"tokens/micro-batch, AC {args.activation_checkpointing}, compiled blocks {args.compile_blocks}, "
        f"optimizer {args.optimizer_step}, log-prob chunk {args.logprob_chunk_size}, "
        f"reshard after forward {not args.no_reshard_after_forward}, {common.device_name(args.device)}\n"
    )
    print(
        common.table(
            rows,
            [
                ("variant", "variant", ""),
                ("attn", "attention", ""),
                ("mask", "mask", ""),
                ("microbatches", "mbs", "d"),
                ("padding_waste", "padding waste", ".1%"),
                ("median_s", "s/iter", ".3f"),
                ("optimizer_s", "optimizer s", ".3f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("speedup_vs_padded", "vs padded", ".2f"),
                ("tflops", "TFLOP/s", ".3g"),
                ("mfu", "MFU", ".1%"),
                ("peak_gib", "peak GiB", ".2f"),
                ("error", "error", ""),
            ],
        )
    )
    common.write_results("update_throughput", args, res)


if __name__ == "__main__":
    main()
