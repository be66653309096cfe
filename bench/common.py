"""Plumbing shared by the benchmarks: device facts, timing, memory probes, one subprocess per variant,
the results JSON and the markdown table.

Every variant runs in a fresh child process (`<script> <same args> --worker VARIANT`): its peak memory is
its own (on CPU `ru_maxrss` is a process-lifetime peak, so a fresh process is the only clean way to read it),
an OOM or a crash in one variant does not take the others down, and vLLM gets the one engine per process it
wants. The parent collects each child's JSON, prints the table and writes `--out`.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repo's modules (model.py, grpo.py, rollout.py)
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

# Qwen2-1.5B's shape (DeepSeek-R1-Distill-Qwen-1.5B / DeepScaleR, the paper's base): random weights, no download.
QWEN2_1_5B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=28,
    num_attention_heads=12,
    num_key_value_heads=2,
    vocab_size=151936,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1e6,
)

# Dense (no 2:4 sparsity) bf16 tensor-core peaks, TFLOP/s, from the vendors' data sheets.
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0}


def add_common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu | cuda")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--iters", type=int, default=3, help="timed iterations (the median is reported)")
    p.add_argument("--out", default=None, help="results JSON (default bench/results/<name>-<device>.json)")
    p.add_argument("--variant-timeout", type=float, default=None, help="seconds before a variant's process is killed")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one variant
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({cpu_model()}, {len(os.sched_getaffinity(0))} cores)"


def cpu_model() -> str:
    """The CPU's model name and its bf16 instructions (these machines differ: some have AMX, some only AVX2)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    isa = [
        n
        for n, ok in (
            ("AMX", getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()),
            ("AVX512-BF16", getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()),
        )
        if ok
    ]
    return f"{name}, {'+'.join(isa) or 'no bf16 instructions'}"


def peak_tflops(device: str, override: float | None) -> float | None:
    """Peak bf16 dense TFLOP/s of the GPU (by name), `override` when given, None on CPU / unknown GPUs."""
    if override:
        return override
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("transformers", "vllm", "flash-attn"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_fn(fn, device: str, warmup: int, iters: int) -> list[float]:
    """Seconds of each timed call of fn() after `warmup` untimed ones (CUDA events on GPU)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MemoryProbe:
    """Peak memory above a baseline taken at start(): torch.cuda.max_memory_allocated on GPU; on CPU the
    process's peak RSS (ru_maxrss) minus its RSS at start() -- meaningful because each variant has a
    fresh process, so the lifetime peak is this variant's unless the setup before start() peaked higher."""

    def __init__(self, device: str):
        self.device = device

    def start(self) -> "MemoryProbe":
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = _rss_bytes()
        return self

    def stop(self) -> dict:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return {
                "peak_bytes": peak - self.base,
                "base_bytes": self.base,
                "peak_abs_bytes": peak,
                "memory_source": "torch.cuda.max_memory_allocated",
            }
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        return {
            "peak_bytes": peak - self.base,
            "base_bytes": self.base,
            "peak_abs_bytes": peak,
            "memory_source": "ru_maxrss - rss at start (fresh process)",
        }


def run_variants(script: str, variants: list[str], timeout: float | None = None) -> dict[str, dict]:
    """Run `script` once per variant in a child process with this process's arguments plus --worker."""
    results = {}
    for v in variants:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            cmd = [sys.executable, script, *sys.argv[1:], "--worker", v, "--worker-out", out]
            print(f"[{Path(script).stem}] variant {v} ...", file=sys.stderr, flush=True)
            try:
                proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=timeout)
                log, rc = proc.stdout, proc.returncode
            except subprocess.TimeoutExpired as e:
                log, rc = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
            if os.path.exists(out):
                with open(out) as f:
                    results[v] = json.load(f)
            else:
                tail = "\n".join(log.strip().splitlines()[-15:])
                print(f"[{Path(script).stem}] variant {v} failed (exit {rc}):\n{tail}", file=sys.stderr)
                results[v] = {"error": f"exit {rc}: " + (tail.splitlines()[-1] if tail else "no output")}
    return results


def worker_main(args, measure) -> None:
    """In the child: measure(args.worker, args) -> dict, written to --worker-out; a failure is written too."""
    try:
        result = measure(args.worker, args)
    except Exception as e:  # noqa: BLE001 -- OOM, missing kernels, ...: reported per variant
        if isinstance(e, torch.OutOfMemoryError):
            result = {"error": "OOM: " + str(e).splitlines()[0][:200]}
        else:
            result = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
        print(f"variant {args.worker}: {result['error']}", file=sys.stderr)
    with open(args.worker_out, "w") as f:
        json.dump(result, f)


def default_out(name: str, device: str) -> Path:
    """bench/results/<name>-<where>.json, <where> naming the machine: e.g. cpu-amd-epyc, nvidia-h100-80gb-hbm3."""
    where = device_name(device) if device.startswith("cuda") else "cpu " + cpu_model().split(",")[0]
    return ROOT / "bench" / "results" / f"{name}-{re.sub(r'[^a-z0-9]+', '-', where.lower()).strip('-')}.json"


def write_results(name: str, args, results: dict, extra: dict | None = None) -> Path:
    path = Path(args.out) if args.out else default_out(name, args.device)
    path.parent.mkdir(parents=True, exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("worker", "worker_out")}
    doc = {
        "benchmark": name,
        "command": " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "device": device_name(args.device),
        "versions": versions(),
        "config": config,
        **(extra or {}),
        "results": results,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(f"\nwrote {path}")
    return path


def table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Markdown table; cols = (key, header, format spec); missing / None values print as '-'."""

    def cell(row, key, fmt):
        v = row.get(key)
        return "-" if v is None else (format(v, fmt) if fmt and isinstance(v, (int, float)) else str(v))

    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, k, f) for k, _, f in cols) + " |" for r in rows]
    return "\n".join(lines)


GiB = 1024**3
