"""bench/: each script runs end to end at a tiny size and writes its JSON (a smoke test that keeps the benchmarks
working as model.py changes; their numbers live in bench/README.md, not here). update_throughput.py and
logprob_memory.py run in tests/test_gpu_suite.py, inside the toy suite."""

import json
import os
import subprocess
import sys
from pathlib import Path

import grading
from conftest import HAS_VLLM

ROOT = Path(__file__).resolve().parents[1]


def run_bench(script: str, args: list[str], tmp_path: Path) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / f"{script}.py"),
            *"--device cpu --warmup 0 --iters 1 --out".split(),
            str(out),
            *args,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "|" in proc.stdout  # the markdown table
    return json.loads(out.read_text())


def test_rollout_throughput(tiny_vllm_model_dir, tmp_path):
    engines = "hf,vllm" if HAS_VLLM else "hf"
    res = run_bench(
        "rollout_throughput",
        [
            "--model",
            tiny_vllm_model_dir,
            "--engines",
            engines,
            *"--num-prompts 1 --samples 2 --prompt-len 8 --max-new-tokens 4 --sync-repeats 1".split(),
        ],
        tmp_path,
    )
    for name in engines.split(","):
        r = res["results"][name]
        assert r.get("error") is None and r["tokens_per_s"] > 0 and r["sync_s"] > 0 and r["startup_s"] > 0, r
        assert r["gen_tokens"] == [2 * 4]  # EOS ignored: every engine generates the same token count


def test_cpu_dtype_both_variants(tiny_model_dir, tmp_path):
    res = run_bench(
        "cpu_dtype",
        [
            "--model",
            tiny_model_dir,
            *"--num-prompts 1 --samples 2 --prompt-len 8 --max-new-tokens 4 --engine hf".split(),
        ],
        tmp_path,
    )
    rows = res["results"]
    assert set(rows) == {"float32", "bfloat16"}
    for r in rows.values():
        assert r.get("error") is None and r["update_s"] > 0, r
        assert r["response_tokens"] == 2 * 4  # EOS masked: both variants generate the same token count


def test_grading_throughput_serial_and_pool(tmp_path):
    res = run_bench("grading_throughput", ["--responses", "8", "--adversarial", "8", "--procs", "2"], tmp_path)
    for v, procs in (("serial", 1), ("pool", 2)):
        r = res["results"][v]
        assert r["procs"] == procs and r["payload_ran"] is False, r
        for name in ("real", "real-math500", "adversarial"):
            c = r["corpora"][name]
            assert c["items"] == 8 and c["max_s"] < grading.ITEM_TIMEOUT + 0.5 and c["left_per_pass"] == 0, (v, c)
    assert (
        res["results"]["serial"]["corpora"]["real"]["right_per_pass"]
        == (res["results"]["pool"]["corpora"]["real"]["right_per_pass"])
    )  # the same grades either way


def test_lora_memory_measures_and_models_every_variant(tmp_path):
    """Full fine-tuning and LoRA at a tiny width, each phase measured; the one-GPU table from its activations."""
    args = "--layers 1 --vocab 2000 --tokens 512 --ranks 4 --tokens-per-microbatch 4096".split()
    res = run_bench("lora_memory", args, tmp_path)
    full, lora = res["results"]["full"], res["results"]["lora-r4"]
    assert full["params"] == lora["params"] and 0 < lora["adapter_params"] < full["params"] // 50, (full, lora)
    for r in (full, lora):
        assert r["phases"]["model"] <= r["phases"]["backward"] <= r["phases"]["step"], r
    assert lora["phases"]["step"] < full["phases"]["step"]  # no reference, no gradients or moments for the base
    rows = {(r["gpu_gib"], r["model"], r["variant"]): r for r in res["one_gpu"]}
    assert rows[(80, "qwen2-7b", "full")]["fits"] == "no" and rows[(80, "qwen2-7b", "full")]["static_gib"] > 100
