"""Seconds per training step of grpo.py itself, one run per variant: the real loop under torchrun.

Each variant is `torchrun --nproc_per_node N grpo.py --preset P --steps S <its flags>` in a fresh output directory
(the Makefile's `make train` is `--preset smollm2-cpu` on 2 processes with OMP_NUM_THREADS=1). By default the
variants are the rollout engines (`--engines`); `--variants NAME=FLAGS ...` compares any flags instead. The table
reads the run's metrics.jsonl: the median over steps 2..S (step 1 includes one-off warm-up) of each part of a step
(generate, score, train, sync: grpo.py's time_* metrics), the largest rank's peak memory (memory_peak_gib: on CPU
the process's peak RSS, its vLLM engine included), the wall time of the whole command (start-up included), and the
step speed-up against the first variant. Variants sample from the same seeds, but not always the same tokens, so
response lengths can differ a little: the table shows them.

  python bench/train_step.py                                          # make train's job, hf vs vllm, 4 steps
  python bench/train_step.py --preset smollm2-lcpo-cpu --steps 4      # the CPU LCPO recipe's step
  python bench/train_step.py --variants full= "lora-r8=--lora-rank 8" "lora-r32=--lora-rank 32"   # LoRA's cost
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common


def run(name: str, flags: list[str], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(args.nproc),
            str(common.ROOT / "grpo.py"),
            "--preset",
            args.preset,
            *flags,
            "--steps",
            str(args.steps),
            "--save-every",
            str(10**6),
            "--out",
            str(out),
            *args.extra,
        ]  # saves only the final step
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        t0 = time.perf_counter()
        proc = subprocess.run(
            cmd, cwd=common.ROOT, env=env, capture_output=True, text=True, timeout=args.variant_timeout
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1][:300]}"}
        steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    later = steps[1:] or steps
    med = {
        k: common.median([m[k] for m in later])
        for k in ("time_generate", "time_score", "time_train", "time_sync", "time_step", "response_len")
    }
    peak = max((m.get("memory_peak_gib", 0.0) for m in steps), default=None)
    return {"flags": flags, "wall_s": wall, "steps": len(steps), "per_step": steps, "memory_peak_gib": peak, **med}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="smollm2-cpu", help="grpo.py --preset (smollm2-cpu is make train's job)")
    p.add_argument("--engines", default="hf,vllm", help="comma list of grpo.py --engine values, the first the base")
    p.add_argument(
        "--variants",
        nargs="+",
        default=None,
        help="NAME=FLAGS ... (grpo.py flags, the first the base): instead of --engines",
    )
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--nproc", type=int, default=2, help="torchrun processes (make train: 2)")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per process (make train: 1)")
    p.add_argument("--variant-timeout", type=float, default=3600)
    p.add_argument("--out", default=None, help="results JSON (default bench/results/train_step-<preset>-<cpu>.json)")
    p.add_argument("extra", nargs="*", help="more grpo.py flags, after --")
    args = p.parse_args()
    args.device = "cpu"
    variants = [(e, ["--engine", e]) for e in args.engines.split(",")]
    if args.variants:
        variants = [(v.split("=", 1)[0], v.split("=", 1)[1].split() if "=" in v else []) for v in args.variants]
    res = {}
    for name, flags in variants:
        print(f"[train_step] {args.preset} {name}: {' '.join(flags)} ...", file=sys.stderr, flush=True)
        res[name] = run(name, flags, args)
    base = res[variants[0][0]].get("time_step")
    rows = [
        r | {"variant": k, "speedup": base / r["time_step"] if base and r.get("time_step") else None}
        for k, r in res.items()
    ]
    print(
        f"\ngrpo.py --preset {args.preset}, {args.steps} steps, {args.nproc} processes x {args.threads} thread(s), "
        f"{common.device_name('cpu')}; medians of steps 2-{args.steps}\n"
    )
    print(
        common.table(
            rows,
            [
                ("variant", "variant", ""),
                ("time_generate", "generate s", ".1f"),
                ("time_score", "score s", ".1f"),
                ("time_train", "train s", ".1f"),
                ("time_sync", "sync s", ".2f"),
                ("time_step", "step s", ".1f"),
                ("speedup", "step speed-up", ".2f"),
                ("response_len", "tokens/response", ".0f"),
                ("memory_peak_gib", "peak GiB/rank", ".2f"),
                ("wall_s", "command s", ".0f"),
                ("error", "error", ""),
            ],
        )
    )
    args.out = args.out or str(common.default_out(f"train_step-{args.preset}", "cpu"))
    common.write_results("train_step", args, res)


if __name__ == "__main__":
    main()
