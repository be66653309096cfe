"""Grading throughput and time bounds (grading.grade_batch): one grading child vs a pool of them.

Variants: `serial` (procs=1: one grading child, items one after another) and `pool` (procs=--procs, default
grading.default_procs()), both in this one process on the same pool (serial uses its first child only). The
grading children are started and waited for first (`grading.start_grader(wait=True)`, reported as start-up),
then every corpus is graded in batches of --responses items (256 = the paper's 2,048 responses per step /
8 ranks): --warmup untimed passes, then --iters timed ones, each batch by serial and by pool in turn (the order
alternating from pass to pass), so that a change in the machine's load hits both alike.
Corpora (seeded, the same in both variants):
  real         --responses model outputs (`response`, `gold`) sampled from results/*/eval*/samples*.jsonl*, graded
               as the CPU presets train (last-number fallback on): small-model arithmetic, so every wrong
               number goes to the symbolic path
  real-math500 --responses of SmolLM2-135M-Instruct's own answers to MATH500 problems (bench/data/, made by
               `python evaluate.py --model smollm2 --data ../shared/data/math/math500.json --limit 128
               --samples 2 --budgets 256 --target none --max-new-tokens 384 --engine vllm --seed 0`), graded with
               the last-number fallback too: what a model writes at MATH level, where a wrong answer is LaTeX
               that math-verify parses
  math500      ../shared/data/math/math500.json gold answers (skipped if absent): half rewritten in an
               equivalent form the cheap path does not match (`12` -> `11 + 1`, `\\frac{3}{4}` -> `3 \\div 4`,
               `\\sqrt{3}` -> `(3)^{\\frac{1}{2}}`, `x` -> `2 \\cdot \\frac{x}{2}`), half another problem's gold
               (wrong): every item reaches math-verify, the worst case of a larger model on MATH-level problems
  adversarial  --adversarial items built here: power towers, huge exponents and factorials, integrals / sums /
               limits, inputs only the per-item bound stops, deep nesting, 100 KB strings, Python payloads,
               unbalanced braces, long numbers, big matrices
Measured: the wall time of each batch (time.perf_counter around grade_batch; the median is reported, and
items/s = items / total wall time), and the per-item times measured inside the grading (GradeStats.item_seconds:
in-process time plus, for a symbolic item, the time from sending it to a child to its answer or kill; the wait
for a free child is not in it). p50 / p99 / max are over every item of the timed passes. Also counted: items
graded right, sent to the symbolic path, stopped by the cost screen, killed at the per-item bound, left at a
deadline, and whether a payload ran (a marker file).

  python bench/grading_throughput.py       # batches of 256, 256 adversarial items, 1 untimed + 3 timed passes
"""

from __future__ import annotations

import argparse
import glob
import gzip
import importlib.metadata
import json
import math
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import common
import grading


# ------------------------------------------------------------------------------------------------ corpora
def _boxed(answer: str) -> str:
    return f"Let's see. The final answer is $\\boxed{{{answer}}}$."


def real_corpus(n: int, seed: int, pattern: str = "results/*/eval*/samples*.jsonl*") -> list[tuple[str, str]]:
    """Model responses from evaluate.py's samples.jsonl files (gzipped where kept whole) under the repo root."""
    rows = []
    for path in sorted(glob.glob(str(common.ROOT / pattern))):
        with gzip.open(path, "rt") if path.endswith(".gz") else open(path) as f:
            rows += [(r["response"], str(r["gold"])) for r in map(json.loads, f)]
    return random.Random(seed).sample(rows, min(n, len(rows)))


def rewrite_equivalent(gold: str) -> str | None:
    """An equivalent form of a gold answer that the cheap path does not match (so math-verify decides)."""
    if re.fullmatch(r"-?\d+", gold):
        return f"{int(gold) - 1} + 1"
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", gold)
    if m:
        return rf"{m[1]}{m[2]} \div {m[3]}"
    if re.search(r"\\sqrt\{[^{}]*\}", gold):
        return re.sub(r"\\sqrt\{([^{}]*)\}", r"(\1)^{\\frac{1}{2}}", gold, count=1)
    if not re.search(r"[,=\[\]()]|\\text|\\in|\\begin|\\le|\\ge|<|>|\\infty|\^\\circ|[A-Za-z]{2}", gold):
        return rf"2 \cdot \frac{{{gold}}}{{2}}"  # a plain expression
    return None


def math500_corpus(n: int, seed: int) -> list[tuple[str, str]] | None:
    path = common.ROOT.parent / "shared/data/math/math500.json"
    if not path.exists():
        return None
    golds = [str(row["answer"]) for row in json.loads(path.read_text())]
    rng = random.Random(seed)
    equivalent = [(_boxed(r), g) for g in golds if (r := rewrite_equivalent(g)) is not None]
    wrong = [(_boxed(rng.choice(golds)), g) for g in golds]
    return rng.sample(equivalent, n // 2) + rng.sample(wrong, n - n // 2)


def adversarial_corpus(n: int, seed: int, marker: Path) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    d = lambda lo, hi: rng.randint(lo, hi)  # noqa: E731

    def tower(height):
        b = d(2, 10)
        if rng.random() < 0.3:
            return "^".join([str(b)] * height)  # `9^9^9^9`
        return f"{b}^{{" * (height - 1) + str(b) + "}" * (height - 1)  # `9^{9^{9^{9}}}`

    makers = [
        lambda: tower(d(3, 7)),
        lambda: rng.choice(
            [
                f"2^{{10^{{{d(5, 12)}}}}}",
                f"(x+1)^{{{d(10**5, 10**9)}}}",
                f"10^{{{d(10**6, 10**9)}}}",
                f"(1+\\frac{{1}}{{10^{{{d(5, 12)}}}}})^{{10^{{{d(5, 12)}}}}}",
                f"{{10^{{100}}}}^{{10^{{{d(5, 99)}}}}}",
            ]
        ),
        lambda: rng.choice([f"(10^{{{d(5, 12)}}})!", f"{d(10**6, 10**20)}!", f"({d(5, 20)}!)!", "10!!!!"]),
        lambda: rng.choice(
            [
                f"\\int e^{{-x^{{{d(100, 5000)}}}}}\\,dx",
                f"\\int_0^\\infty e^{{-x^{{{d(100, 5000)}}}}}\\,dx",
                f"\\sum_{{k=1}}^{{10^{{{d(5, 12)}}}}} k^{{k}}",
                f"\\prod_{{k=1}}^{{{d(10**3, 10**6)}}} k",
                "\\lim_{n\\to\\infty} (1+1/n)^{n}",
                "\\iint_D x^{1000} y^{1000}\\, dA",
            ]
        ),
        # only the per-item time bound stops these (the cost screen lets them through)
        lambda: rng.choice(
            [
                f"\\binom{{10^{{{d(8, 12)}}}}}{{10^{{{d(4, 5)}}}}}",
                f"\\Gamma(10^{{{d(8, 12)}}})",
                f"(x+1)^{{{d(800, 2000)}}}",
                f"\\sin(10^{{{d(50, 300)}}})",
            ]
        ),
        lambda: rng.choice(
            [
                "\\frac{1}{" * 40 + "2" + "}" * 40,
                "\\sqrt{" * 45 + "2" + "}" * 45,
                "(" * 400 + "1" + ")" * 400,
                "{" * 60 + "1" + "}" * 60,
            ]
        ),
        lambda: rng.choice(
            [
                "x" * 100_000,
                "\\boxed{" * 10_000 + "1" + "}" * 10_000,
                "{" * 10_000 + "\\boxed{" + "{" * 10_000,
                "\\boxed{1}" * 20_000,
                "9" * 100_000,
            ]
        ),
        lambda: rng.choice(
            [
                f"__import__('os').system('touch {marker}')",
                "().__class__.__bases__[0].__subclasses__()",
                f"eval(\"__import__('os').system('touch {marker}')\")",
                f"exec(open('{marker}','w'))",
                "\\input{/etc/passwd}",
                f"\\write18{{touch {marker}}}",
                "lambda: 0",
                "x.__class__",
            ]
        ),
        lambda: rng.choice(
            ["\\frac{1}{2", "}}}{{{", "\\left( 1, 2", "\\begin{pmatrix}1&2", "\\sqrt{", "^^^^", "\\\\\\\\"]
        ),
        lambda: rng.choice(["9" * 999, "0." + "3" * 990, f"10^{{-{d(1000, 9999)}}}", "1e999999999"]),
        lambda: (
            "\\det\\begin{pmatrix}"
            + "\\\\".join("&".join(str(d(1, 99)) for _ in range(12)) for _ in range(12))
            + "\\end{pmatrix}"
        ),
    ]
    corpus = []
    for i in range(n):
        answer = makers[i % len(makers)]()
        # long strings and payloads are whole responses sometimes, boxed answers otherwise
        response = answer if len(answer) > 5000 else _boxed(answer)
        corpus.append((response, str(d(2, 999))))  # no gold is 1, so no item here is right
    rng.shuffle(corpus)
    return corpus


# ---------------------------------------------------------------------------------------------- measure
def _percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, math.ceil(q * len(xs)) - 1)]


def _summary(corpus_len: int, walls: list[float], items_s: list[float], counts: dict, iters: int) -> dict:
    return {
        "items": corpus_len,
        "batch_walls_s": walls,
        "batch_wall_s": common.median(walls),
        "items_per_s": corpus_len * iters / sum(walls),
        "p50_s": _percentile(items_s, 0.5),
        "p99_s": _percentile(items_s, 0.99),
        "max_s": max(items_s),
        **{f"{k}_per_pass": v / iters for k, v in counts.items()},
    }


def grade_corpus(corpus, args, variants: dict[str, int], fallback: bool) -> dict[str, dict]:
    """Every batch of the corpus graded by each variant in turn (the order alternating from pass to pass), so
    that a change in the machine's load hits serial and pool alike."""
    batches = [corpus[i : i + args.responses] for i in range(0, len(corpus), args.responses)]
    walls = {v: [] for v in variants}
    items_s = {v: [] for v in variants}
    counts = {v: dict.fromkeys(("right", "symbolic", "too_costly", "timeouts", "left", "crashed"), 0) for v in variants}
    for it in range(args.warmup + args.iters):
        for batch in batches:
            for v in list(variants) if it % 2 == 0 else list(variants)[::-1]:
                t0 = time.perf_counter()
                res, st = grading.grade_batch(
                    [r for r, _ in batch],
                    [g for _, g in batch],
                    procs=variants[v],
                    last_number_fallback=fallback,
                    deadline=args.deadline,
                )
                wall = time.perf_counter() - t0
                if it < args.warmup:
                    continue
                walls[v].append(wall)
                items_s[v] += st.item_seconds
                counts[v]["right"] += sum(res)
                for k in ("symbolic", "too_costly", "timeouts", "left", "crashed"):
                    counts[v][k] += getattr(st, k)
    return {v: _summary(len(corpus), walls[v], items_s[v], counts[v], args.iters) for v in variants}


def measure(args) -> dict:
    """Both variants in this process: `serial` uses the pool's first child only, `pool` its first --procs."""
    variants = {"serial": 1, "pool": args.procs}
    t0 = time.perf_counter()
    grading.start_grader(args.procs, wait=True)
    out = {v: {"variant": v, "procs": n, "corpora": {}} for v, n in variants.items()}
    out["pool"]["startup_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        marker = Path(tmp) / "pwned"
        corpora = {
            "real": (real_corpus(args.responses, args.seed), True),
            "real-math500": (real_corpus(args.responses, args.seed, "bench/data/smollm2-math500-*.jsonl.gz"), True),
            "math500": (math500_corpus(args.responses, args.seed), False),
            "adversarial": (adversarial_corpus(args.adversarial, args.seed, marker), False),
        }
        for name, (corpus, fallback) in corpora.items():
            print(f"[grading_throughput] {name} ...", file=sys.stderr, flush=True)
            if corpus is None:
                for v in variants:
                    out[v]["corpora"][name] = {"skipped": "../shared/data/math/math500.json not found"}
                continue
            for v, r in grade_corpus(corpus, args, variants, fallback).items():
                out[v]["corpora"][name] = r
        for v in variants:
            out[v]["payload_ran"] = marker.exists()
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common.add_common_args(p)
    p.add_argument("--responses", type=int, default=256, help="items per batch (the paper's per-rank share)")
    p.add_argument("--adversarial", type=int, default=256, help="adversarial items")
    p.add_argument("--procs", type=int, default=grading.default_procs(), help="grading children of the pool variant")
    p.add_argument("--deadline", type=float, default=None, help="grade_batch(deadline=...) per batch (default none)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    res = measure(args)
    rows = []
    for name in ("real", "real-math500", "math500", "adversarial"):
        serial = res["serial"].get("corpora", {}).get(name, {})
        for v, r in res.items():
            c = r.get("corpora", {}).get(name, {})
            row = {
                "corpus": name,
                "variant": v,
                "procs": r.get("procs"),
                "error": r.get("error") or c.get("skipped"),
                **{k: c.get(k) for k in ("items", "items_per_s", "batch_wall_s", "max_s")},
                **{k: c.get(f"{k}_per_pass") for k in ("right", "symbolic", "too_costly", "timeouts", "left")},
            }
            for q in ("p50", "p99"):
                row[f"{q}_ms"] = c[f"{q}_s"] * 1e3 if f"{q}_s" in c else None
            if c.get("batch_wall_s") and serial.get("batch_wall_s"):
                row["speedup"] = serial["batch_wall_s"] / c["batch_wall_s"]
            rows.append(row)
    print(
        f"\nbatches of {args.responses} (the paper's per-rank share), {args.warmup} + {args.iters} passes, "
        f"{common.device_name(args.device)}; start-up of the {args.procs} grading processes (in parallel): "
        f"{res['pool']['startup_s']:.1f} s\n"
    )
    print(
        common.table(
            rows,
            [
                ("corpus", "corpus", ""),
                ("variant", "variant", ""),
                ("procs", "procs", ""),
                ("items", "items", ""),
                ("right", "right", ".0f"),
                ("symbolic", "symbolic", ".0f"),
                ("too_costly", "too costly", ".0f"),
                ("timeouts", "timeouts", ".0f"),
                ("left", "left", ".0f"),
                ("items_per_s", "items/s", ",.0f"),
                ("p50_ms", "p50 ms", ".2f"),
                ("p99_ms", "p99 ms", ".1f"),
                ("max_s", "max s", ".3f"),
                ("batch_wall_s", f"s per {args.responses}", ".3f"),
                ("speedup", "vs serial", ".2f"),
                ("error", "error", ""),
            ],
        )
    )
    print("\npayload ran: " + ", ".join(f"{v} {r.get('payload_ran')}" for v, r in res.items()))
    grader = {pkg: importlib.metadata.version(pkg) for pkg in ("math-verify", "latex2sympy2_extended", "sympy")}
    common.write_results("grading_throughput", args, res, extra={"grader_versions": grader})


if __name__ == "__main__":
    main()
