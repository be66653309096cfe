"""Rollout throughput of each engine (generated tokens/s) and the time of a full weight sync.

Per engine (hf always; vllm wherever it imports; vllm-compiled on request), in its own process, trainer order: world-1
process group, FSDP2-sharded float32 policy (model.shard_model), then the engine (its start-up timed), in the
compute dtype grpo.py would pick (--dtype). Then
  generate  engine.generate, as grpo.py calls it: --num-prompts random-token prompts x --samples completions,
            --max-new-tokens each (EOS ignored by default: SamplingConfig.ignore_eos, so every engine generates the
            same number of tokens); tokens/s counts the tokens actually returned. Wall clock (host scheduling is
            part of generation), torch.cuda.synchronize() around it.
  sync      engine.load_weights(model.iter_full_state_dict(policy)) exactly as grpo.py does it; for vLLM also
            the trainer's sleep -> wake_up(["weights"]) -> load_weights -> wake_up(["kv_cache"]) cycle.

  python bench/rollout_throughput.py --device cpu    # embedded SmolLM2-135M: 8 prompts x 4 samples x 160 new tokens
  python bench/rollout_throughput.py --device cuda --random-config qwen2-1.5b --save-dir /tmp/qwen2-1.5b-rand
The random Qwen2-1.5B-shaped model uses SmolLM2's tokenizer, so its vocab_size is len(tokenizer) = 49152
(not Qwen's 151936): generation cost differs from the real Qwen2-1.5B in the lm_head only.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import time

import torch

import common


def model_dir(args) -> str:
    """The model to serve: --model via resolve_model, or a random Qwen2-1.5B-shaped one written once to --save-dir."""
    if not args.random_config and os.path.isfile(os.path.join(args.model, "config.json")):
        return args.model  # a model directory: nothing to convert (and the parent skips importing transformers)
    import model as M

    if not args.random_config:
        return M.resolve_model(args.model)
    if not args.save_dir:
        raise SystemExit("rollout_throughput.py: --random-config needs --save-dir DIR")
    if not os.path.isfile(os.path.join(args.save_dir, "config.json")):
        from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

        tok = AutoTokenizer.from_pretrained(M.resolve_model(args.model))  # SmolLM2's unless --model says otherwise
        cfg = Qwen2Config(
            **(common.QWEN2_1_5B | dict(vocab_size=len(tok))),
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            net = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        net.save_pretrained(args.save_dir)
        tok.save_pretrained(args.save_dir)
    return args.save_dir


def wall(fn, device):
    common.sync(device)
    t0 = time.perf_counter()
    out = fn()
    common.sync(device)
    return time.perf_counter() - t0, out


def measure(kind: str, args) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model as M
    import rollout

    path, dev = model_dir(args), args.device
    dist_info = M.init_distributed()
    bf16 = M.use_bf16(dist_info.device, args.dtype)  # the decision grpo.py makes for --dtype
    policy = M.shard_model(
        AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev), mixed_precision=bf16
    )
    t0 = time.perf_counter()
    if kind.startswith("vllm"):  # vllm (eager on CPU), vllm-compiled (torch.compile: minutes of start-up on CPU)
        engine = rollout.VLLMEngine(
            path,
            device=dev,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            max_model_len=args.prompt_len + args.max_new_tokens + 16,
            max_num_seqs=args.num_prompts * args.samples,
            gpu_memory_utilization=args.gpu_memory_utilization,
            enforce_eager=kind == "vllm" if not dev.startswith("cuda") else None,
        )
    else:
        engine = rollout.make_engine(
            kind, path, device=dev, dtype=torch.bfloat16 if bf16 else torch.float32, hf_batch_size=args.hf_batch_size
        )
    startup_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(path)
    special = set(tok.all_special_ids)
    gen = torch.Generator().manual_seed(args.seed)
    pool = torch.tensor([i for i in range(len(tok)) if i not in special])
    # Fresh prompts for every call, as in training (the same prompts again would hit vLLM's prefix cache).
    prompt_sets = [
        [pool[torch.randint(0, len(pool), (args.prompt_len,), generator=gen)].tolist() for _ in range(args.num_prompts)]
        for _ in range(args.warmup + args.iters)
    ]
    sampling = rollout.SamplingConfig(
        temperature=args.temperature, max_new_tokens=args.max_new_tokens, ignore_eos=args.ignore_eos
    )

    def run():
        return [c.token_ids for g in engine.generate(prompt_sets.pop(), args.samples, sampling) for c in g]

    for _ in range(args.warmup):
        run()
    gen_times, tokens = [], []
    for _ in range(args.iters):
        t, outs = wall(run, dev)
        gen_times.append(t)
        tokens.append(sum(len(o) for o in outs))

    moved = []

    def weights():  # what grpo.py pushes, counting the bytes gathered and handed to the engine
        n = 0
        for name, t in M.iter_full_state_dict(policy):
            n += t.numel() * t.element_size()
            yield name, t
        moved.append(n)

    stages = {"sleep": [], "wake_weights": [], "load_weights": [], "wake_kv_cache": []}
    for _ in range(args.sync_repeats):
        for stage, fn in (
            ("sleep", engine.sleep),
            ("wake_weights", lambda: engine.wake_up(["weights"])),
            ("load_weights", lambda: engine.load_weights(weights())),
            ("wake_kv_cache", lambda: engine.wake_up(["kv_cache"])),
        ):
            stages[stage].append(wall(fn, dev)[0])
    sync_s = common.median(stages["load_weights"])
    i = gen_times.index(common.median(gen_times)) if len(gen_times) % 2 else 0
    out = {
        "engine": kind,
        "model_dir": path,
        "vocab_size": policy.config.vocab_size,
        "startup_s": startup_s,
        "dtype": "bfloat16" if bf16 else "float32",
        "threads": torch.get_num_threads(),
        "sequences": args.num_prompts * args.samples,
        "gen_times_s": gen_times,
        "gen_tokens": tokens,
        "median_s": common.median(gen_times),
        "tokens_per_s": common.median([n / t for n, t in zip(tokens, gen_times)]),
        "tokens_per_seq": tokens[i] / (args.num_prompts * args.samples),
        "sync_stage_times_s": stages,
        "sync_s": sync_s,
        "sync_bytes": moved[-1],
        "sync_gb_per_s": moved[-1] / sync_s / 1e9,
        "cycle_s": sum(common.median(v) for v in stages.values()),
        "ignore_eos": args.ignore_eos,
        "gpu_memory_peak_bytes": torch.cuda.max_memory_allocated() if dev.startswith("cuda") else None,
    }
    engine.close()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--model", default="smollm2", help="model dir / hub id / smollm2 (model.resolve_model)")
    p.add_argument(
        "--random-config",
        choices=["qwen2-1.5b"],
        default=None,
        help="serve a random-weights model of this shape (the tokenizer of --model), written to --save-dir",
    )
    p.add_argument("--save-dir", default=None)
    p.add_argument(
        "--engines",
        default=None,
        help="comma list of hf, vllm, vllm-compiled (default hf, plus vllm "
        "where it imports; vllm-compiled: CPU only, vLLM's torch.compile mode instead of eager)",
    )
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 (model.use_bf16, as grpo.py --dtype)")
    p.add_argument("--num-prompts", type=int, default=None, help="default 16 on cuda, 8 on cpu")
    p.add_argument("--samples", type=int, default=None, help="G completions per prompt (default 8 on cuda, 4 on cpu)")
    p.add_argument("--prompt-len", type=int, default=None, help="default 200 on cuda, 100 on cpu")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default 512 on cuda, 160 on cpu")
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--hf-batch-size", type=int, default=128)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.4, help="vLLM's share of the GPU")
    p.add_argument("--sync-repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    gpu = args.device.startswith("cuda")
    args.num_prompts = args.num_prompts or (16 if gpu else 8)
    args.samples = args.samples or (8 if gpu else 4)
    args.prompt_len = args.prompt_len or (200 if gpu else 100)
    args.max_new_tokens = args.max_new_tokens or (512 if gpu else 160)
    if args.worker:
        return common.worker_main(args, measure)

    model_dir(args)  # convert / create once, before the engine processes
    engines = (
        args.engines.split(",") if args.engines else ["hf"] + (["vllm"] if importlib.util.find_spec("vllm") else [])
    )
    res = common.run_variants(__file__, engines, args.variant_timeout)
    base = res.get("hf", {}).get("tokens_per_s")
    rows = [
        r
        | {
            "engine": k,
            "sync_gb": r["sync_bytes"] / 1e9 if "sync_bytes" in r else None,
            "vs_hf": r["tokens_per_s"] / base if base and "tokens_per_s" in r else None,
        }
        for k, r in res.items()
    ]
    print(
        f"\n{args.random_config or args.model}: {args.num_prompts} prompts x {args.samples} samples, prompt "
        f"{args.prompt_len} tokens, max_new_tokens {args.max_new_tokens}, ignore_eos {args.ignore_eos}, "
        f"{common.device_name(args.device)}\n"
    )
    print(
        common.table(
            rows,
            [
                ("engine", "engine", ""),
                ("dtype", "dtype", ""),
                ("startup_s", "start-up s", ".1f"),
                ("median_s", "generate s", ".2f"),
                ("tokens_per_seq", "tokens/seq", ".0f"),
                ("tokens_per_s", "tokens/s", ",.0f"),
                ("vs_hf", "vs hf", ".2f"),
                ("sync_s", "sync s", ".3f"),
                ("sync_gb", "sync GB", ".2f"),
                ("sync_gb_per_s", "sync GB/s", ".2f"),
                ("cycle_s", "sleep+wake+sync s", ".3f"),
                ("error", "error", ""),
            ],
        )
    )
    common.write_results("rollout_throughput", args, res)


if __name__ == "__main__":
    main()
