"""float32 vs bfloat16 on a CPU: one rank's share of a GRPO step (generate, then update) on the embedded model.

The variants are grpo.py's `--dtype float32` and `--dtype bfloat16`: the FSDP2 policy (world-1 process group)
computes in that dtype over float32 master weights, and the engine holds its copy in it. One timed iteration:
  generate  the rollout engine (--engine, as grpo.py picks it: vLLM where it imports): --num-prompts random-token
            prompts x --samples completions, exactly --max-new-tokens each (EOS ignored, so both variants generate
            the same token count)
  update    grpo.update_policy on those completions as episodes (seeded random advantages), under the
            grpo.py preset --preset (default smollm2-lcpo-cpu: padded micro-batches, one AdamW step)
The defaults are one rank's share of `grpo.py --preset smollm2-lcpo-cpu` on 2 processes (2 prompts x 8).
`model.use_bf16` picks bfloat16 for --dtype auto on CPUs with bf16 instructions (AMX or AVX512-BF16).

  python bench/cpu_dtype.py
"""

from __future__ import annotations

import argparse
import time

import torch

import common


def measure(variant: str, args) -> dict:
    import grpo
    import model as M
    import rollout

    torch.set_num_threads(args.threads)
    bf16 = M.use_bf16(torch.device("cpu"), variant)  # the decision grpo.py makes for --dtype
    path = M.resolve_model(args.model)
    dist_info = M.init_distributed()
    cfg = grpo.parse_args(["--preset", args.preset, "--dtype", variant])
    policy = M.shard_model(M.load_model(path), mixed_precision=bf16)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
    engine = rollout.make_engine(
        args.engine,
        path,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        hf_batch_size=args.hf_batch_size,
        max_model_len=args.prompt_len + args.max_new_tokens,
        max_num_seqs=args.num_prompts * args.samples,
    )
    tokenizer = M.load_tokenizer(path)
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(len(tokenizer)) if i not in special])
    gen = torch.Generator().manual_seed(args.seed)
    sampling = rollout.SamplingConfig(
        temperature=cfg.data.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed, ignore_eos=True
    )  # both variants generate the same count

    def step():  # -> (generate s, update s, response tokens)
        prompts = [
            pool[torch.randint(0, len(pool), (args.prompt_len,), generator=gen)].tolist()
            for _ in range(args.num_prompts)
        ]  # fresh ones each step, as in training
        t0 = time.perf_counter()
        completions = engine.generate(prompts, args.samples, sampling)
        t_gen = time.perf_counter() - t0
        episodes = [
            grpo.Episode(p, c.token_ids, 0.0, float(torch.randn(1, generator=gen)), c.logprobs)
            for p, group in zip(prompts, completions)
            for c in group
        ]
        t0 = time.perf_counter()
        grpo.update_policy(policy, None, optimizer, episodes, cfg, dist_info, packed=False)
        return t_gen, time.perf_counter() - t0, sum(len(e.response_ids) for e in episodes)

    for _ in range(args.warmup):
        step()
    runs = [step() for _ in range(args.iters)]
    g, u = common.median([r[0] for r in runs]), common.median([r[1] for r in runs])
    return {
        "dtype": variant,
        "generate_s": g,
        "update_s": u,
        "step_s": g + u,
        "response_tokens": runs[0][2],
        "generate_times_s": [r[0] for r in runs],
        "update_times_s": [r[1] for r in runs],
        "engine": type(engine).__name__,
        "native_bf16": M.cpu_has_native_bf16(),
        "auto_picks_bf16": M.use_bf16(torch.device("cpu")),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--model", default="smollm2", help="model dir / hub id / smollm2 (model.resolve_model)")
    p.add_argument("--preset", default="smollm2-lcpo-cpu", help="grpo.py preset whose update settings are used")
    p.add_argument("--num-prompts", type=int, default=2)
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=60)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--hf-batch-size", type=int, default=64)
    p.add_argument("--engine", default="auto", help="rollout engine, as grpo.py --engine: auto | vllm | hf")
    p.add_argument("--threads", type=int, default=1, help="torch threads per variant (grpo.py runs 1 per process)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(device="cpu")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("cpu_dtype.py measures CPUs only (--device cpu); on a GPU grpo.py always computes in bf16")
    if args.worker:
        return common.worker_main(args, measure)

    res = common.run_variants(__file__, ["float32", "bfloat16"], args.variant_timeout)
    base = res["float32"].get("step_s")
    rows = [r | {"speedup": base / r["step_s"] if base and "step_s" in r else None} for r in res.values()]
    print(
        f"\n{args.model}: {args.num_prompts} prompts x {args.samples} samples, prompt {args.prompt_len} tokens, "
        f"{args.max_new_tokens} new tokens, {args.threads} thread(s), {common.device_name('cpu')}\n"
    )
    print(
        common.table(
            rows,
            [
                ("dtype", "dtype", ""),
                ("generate_s", "generate s", ".1f"),
                ("update_s", "update s", ".1f"),
                ("step_s", "step s", ".1f"),
                ("speedup", "speedup", ".2f"),
                ("error", "error", ""),
            ],
        )
    )
    common.write_results("cpu_dtype", args, res)


if __name__ == "__main__":
    main()
