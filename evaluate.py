"""Evaluate length control as the L1 paper reports it (arXiv 2503.04697: accuracy and length at token budgets).

    python evaluate.py --model smollm2 --data arith ../shared/data/gsm8k/test.jsonl --budgets 512 1024 2048 3600
    torchrun --nproc_per_node 2 evaluate.py ...   # rank r takes problems r::world, rank 0 merges and writes

Per model/method, dataset and budget n_gold (k = --samples samples per problem):
  accuracy     pass@1 = mean correctness over all samples
  mean_tokens  mean n_y (generated tokens, EOS included; a cut response counts as the limit)
  rel_dev      mean |n_y - n_gold| / n_gold          over_budget  fraction with n_y > n_gold
  mean_error   mean(n_y) / n_gold - 1 (signed)       over_10pct   fraction with n_y > 1.1 n_gold
  rel_rmse     sqrt(mean((n_y / n_gold - 1)^2))
  repeats      fraction of responses that repeat a span of tokens (rewards.repeats)
  after_answer mean fraction of a correct response's characters after its answer is first stated (padding)
mean_error and rel_rmse are the length errors that the L1 paper's appendix reports; rel_dev is stricter than
mean_error, since a sample's error cannot cancel another's. And per dataset the Pearson correlation r(n_y, n_gold)
over all samples of all budgets.
Mode "none" puts no target in the prompt but is still measured against the budget.
S1 budget forcing (--baseline budget-forcing): n_y counts the thinking tokens only (model tokens plus the
appended "Wait" tokens, never more than the budget); the final-answer cue and the greedy answer are counted
separately as `answer_tokens`.
Outputs in --out: results.json, table.md, samples.jsonl, accuracy_vs_tokens.png, length_vs_target.png.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import argparse
import datetime
import gzip
import importlib.metadata
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

import data
import grading
import model as M
import rewards
import rollout
from grpo import pearson_from_sums

ROOT = Path(__file__).resolve().parent
BF_CUE = "\n\nFinal Answer: The final answer is \\boxed{"
BF_WAIT = "Wait"


@dataclass
class EvalConfig:
    models: list[str]
    labels: list[str]
    data: list[str]
    budgets: list[int]
    target: str = "exact"  # what the prompt asks: exact | max | none (no target sentence)
    baseline: str = "none"  # none | budget-forcing
    baseline_only: bool = False  # skip the --target run, only the baseline
    samples: int = 16  # k samples per problem (pass@1 averaged over k)
    limit: int | None = None  # problems per dataset
    split: str = "test"
    question_field: str | None = None
    answer_field: str | None = None
    multiple_choice: list[str] | None = None  # None: none; []: all datasets; else these specs
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int | None = None  # default 2 x budget (exact, none), 8192 (max)
    seed: int = 0
    engine: str = "auto"  # auto (vllm wherever it imports, else hf) | vllm | hf (rollout.make_engine)
    dtype: str = "auto"  # auto | bfloat16 | float32 (model.use_bf16, as in grpo.py)
    hf_batch_size: int = 16  # hf engine: sequences per forward batch
    vllm_gpu_memory_utilization: float = 0.85  # vllm on a GPU: its share of GPU memory
    vllm_kv_cache_gib: float = 0.0  # vllm: a fixed KV cache (0 = on CPU sized for the batch, on GPU the share)
    out: str | None = None
    bf_max_waits: int = 100
    bf_answer_tokens: int = 32
    bf_cue: str = BF_CUE
    last_number_fallback: bool = False  # grade a response without \boxed{} by its last number
    merge: list[str] | None = None  # only combine these earlier --out dirs into one table and plot

    def max_new(self, budget: int) -> int:
        return self.max_new_tokens or (8192 if self.target == "max" else 2 * budget)


# ----------------------------------------------------------------------------------------------- metrics
def pearson(x: list[float], y: list[float]) -> float | None:
    """Pearson r of two lists, from their sums (grpo.pearson_from_sums, which the training metrics use across
    ranks); None when undefined (fewer than 2 points, or a constant list)."""
    if len(x) < 2:
        return None
    return pearson_from_sums(len(x), sum(x), sum(y), sum(a * a for a in x), sum(b * b for b in y),
                             sum(a * b for a, b in zip(x, y)))  # fmt: skip


def series_name(rec: dict) -> str:
    """One line per checkpoint and method in tables and plots."""
    return f"{rec['model']} · {rec['method']}"


def budget_stats(recs: list[dict], budget: int) -> dict:
    """The samples of one dataset at one budget n_gold, over their N samples n_y:

    accuracy    = mean 1[correct]
    rel_dev     = mean |n_y - n_gold| / n_gold                 (per sample, then averaged)
    mean_error  = mean(n_y) / n_gold - 1                       (signed error of the mean length: L1's appendix)
    rel_rmse    = sqrt(mean (n_y / n_gold - 1)^2)              (relative RMSE over samples: L1's appendix)
    over_budget = mean 1[n_y > n_gold],  over_10pct = mean 1[n_y > 1.1 n_gold]   (max mode)
    repeats     = fraction of responses that repeat a span of tokens (rewards.repeats; None for records
                  written before evaluate.py measured it)
    after_answer = mean grading.after_answer(response, gold) over the correct responses (None without any)
    """
    n_y = [r["n_tokens"] for r in recs]
    marked = [r["repeats"] for r in recs if "repeats" in r]
    after = [
        a for r in recs if r["correct"] and (a := grading.after_answer(r.get("response"), r.get("gold"))) is not None
    ]
    mean_tokens = sum(n_y) / len(recs)
    return {
        "n": len(recs),
        "problems": len({r["problem_id"] for r in recs}),
        "accuracy": sum(bool(r["correct"]) for r in recs) / len(recs),
        "mean_tokens": mean_tokens,
        "rel_dev": sum(abs(n - budget) / budget for n in n_y) / len(recs),
        "mean_error": mean_tokens / budget - 1,
        "rel_rmse": math.sqrt(sum((n / budget - 1) ** 2 for n in n_y) / len(recs)),
        "over_budget": sum(n > budget for n in n_y) / len(recs),
        "over_10pct": sum(n > 1.1 * budget for n in n_y) / len(recs),
        "repeats": sum(marked) / len(marked) if marked else None,
        "after_answer": sum(after) / len(after) if after else None,
    }


AVERAGED = ("accuracy", "mean_tokens", "rel_dev", "mean_error", "rel_rmse", "over_budget", "over_10pct")


def summarize(records: list[dict], budgets: list[int]) -> dict:
    """{series: {"datasets": {dataset: {"budgets": {b: stats}, "pearson": r, "n": N}},
    "average": {b: mean over datasets of each of AVERAGED, repeats and after_answer}}}"""
    groups: dict[str, dict[str, list[dict]]] = {}
    for r in records:
        groups.setdefault(series_name(r), {}).setdefault(r["dataset"], []).append(r)
    out = {}
    for series, by_ds in groups.items():
        datasets = {}
        for ds, recs in by_ds.items():
            per_b = {b: budget_stats(rs, b) for b in budgets if (rs := [r for r in recs if r["budget"] == b])}
            used = [r for r in recs if r["budget"] in per_b]
            datasets[ds] = {
                "budgets": per_b,
                "n": len(used),
                "pearson": pearson([r["budget"] for r in used], [r["n_tokens"] for r in used]),
            }
        average = {}
        for b in budgets:
            cells = [d["budgets"][b] for d in datasets.values() if b in d["budgets"]]
            if cells:
                average[b] = {k: sum(c[k] for c in cells) / len(cells) for k in AVERAGED}
                for k in ("repeats", "after_answer"):  # absent for some records
                    xs = [c[k] for c in cells if c.get(k) is not None]
                    average[b][k] = sum(xs) / len(xs) if xs else None
        out[series] = {"datasets": datasets, "average": average}
    return out


def format_table(summary: dict, budgets: list[int]) -> str:
    """Markdown, one table per model/method: rows datasets, columns budgets (paper layout)."""
    lines = [
        "cell: accuracy / mean tokens used (dev: mean relative deviation |n_y - n_gold| / n_gold; err: signed error "
        "of the mean length, mean(n_y) / n_gold - 1; rmse: relative RMSE, sqrt(mean (n_y / n_gold - 1)^2); over: "
        "fraction of samples over budget; rep: fraction that repeat a span, rewards.repeats; after: mean fraction "
        "of a correct response after its answer is first stated); "
        "r: Pearson correlation of generated with requested length",
        "",
    ]
    for series, s in summary.items():
        lines += [
            f"## {series}",
            "",
            "| dataset | " + " | ".join(str(b) for b in budgets) + " | r | samples |",
            "| --- |" + " --- |" * (len(budgets) + 2),
        ]
        for ds, d in s["datasets"].items():
            cells = [_cell(d["budgets"].get(b)) for b in budgets]
            r = "-" if d["pearson"] is None else f"{d['pearson']:.2f}"
            lines.append(f"| {ds} | " + " | ".join(cells) + f" | {r} | {d['n']} |")
        if len(s["datasets"]) > 1:
            lines.append("| **average** | " + " | ".join(_cell(s["average"].get(b)) for b in budgets) + " | | |")
        lines.append("")
    return "\n".join(lines)


def _cell(c: dict | None) -> str:
    if c is None:
        return "-"
    pct = {k: 100 * c[k] for k in ("accuracy", "rel_dev", "over_budget")}
    rep = "" if c.get("repeats") is None else f", rep {100 * c['repeats']:.0f}%"
    rep += "" if c.get("after_answer") is None else f", after {100 * c['after_answer']:.0f}%"
    return (
        f"{pct['accuracy']:.1f}% / {c['mean_tokens']:.0f} (dev {pct['rel_dev']:.0f}%, "
        f"err {100 * c['mean_error']:+.0f}%, rmse {100 * c['rel_rmse']:.0f}%, over {pct['over_budget']:.0f}%{rep})"
    )


# ------------------------------------------------------------------------------------------------- plots
def plot_accuracy_vs_tokens(summary: dict, path: Path) -> None:
    """One panel per dataset (+ average): x = mean tokens used, y = accuracy, one line per series."""
    plt = _pyplot()
    panels = list(dict.fromkeys(ds for s in summary.values() for ds in s["datasets"]))
    if len(panels) > 1:
        panels.append("average")
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, ds in zip(axes[0], panels):
        for i, (series, s) in enumerate(summary.items()):
            cells = s["average"] if ds == "average" else s["datasets"].get(ds, {}).get("budgets", {})
            if not cells:
                continue
            bs = sorted(cells)
            x, y = [cells[b]["mean_tokens"] for b in bs], [100 * cells[b]["accuracy"] for b in bs]
            ax.plot(x, y, "o-", color=f"C{i}", label=series, ms=6)
            for b, xi, yi in zip(bs, x, y):
                ax.annotate(str(b), (xi, yi), textcoords="offset points", xytext=(4, 5), fontsize=8, color=f"C{i}")
        ax.set(
            title=f"{ds}: accuracy vs tokens used",
            xlabel="mean generated tokens per response",
            ylabel="accuracy, pass@1 (%)",
        )
        ax.margins(x=0.12, y=0.15)
        top = min(105, max(ax.get_ylim()[1], 5))
        ax.set_ylim(bottom=-0.03 * top, top=top)  # points at 0% stay visible
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, title="point labels: token budget", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_length_vs_target(records: list[dict], path: Path, seed: int = 0) -> None:
    """One panel per dataset: generated vs requested length per sample (jittered), mean per budget, y = x."""
    plt, rng = _pyplot(), random.Random(seed)
    datasets = list(dict.fromkeys(r["dataset"] for r in records))
    series = list(dict.fromkeys(series_name(r) for r in records))
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.2 * len(datasets), 4.6), squeeze=False)
    for ax, ds in zip(axes[0], datasets):
        recs = [r for r in records if r["dataset"] == ds]
        budgets = sorted({r["budget"] for r in recs})
        spread = 0.04 * (budgets[-1] - budgets[0] if len(budgets) > 1 else budgets[0])
        top, right = max([r["n_tokens"] for r in recs] + budgets), budgets[-1] * 1.15
        ax.plot([0, right], [0, right], "k--", lw=1, label="y = x (exact length)")
        for i, name in enumerate(series):
            rs = [r for r in recs if series_name(r) == name]
            if not rs:
                continue
            x = [r["budget"] + rng.uniform(-spread, spread) for r in rs]
            ax.scatter(x, [r["n_tokens"] for r in rs], s=12, alpha=0.35, color=f"C{i}", edgecolors="none")
            bs = sorted({r["budget"] for r in rs})
            means = [sum(r["n_tokens"] for r in rs if r["budget"] == b) / sum(r["budget"] == b for r in rs) for b in bs]
            ax.plot(bs, means, "o-", color=f"C{i}", ms=7, mec="k", label=f"{name} (mean)")
        ax.set(
            title=f"{ds}: generated vs requested length",
            xlabel="requested length n_gold (tokens)",
            ylabel="generated length n_y (tokens)",
            xlim=(0, right),
            ylim=(0, top * 1.05),
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# -------------------------------------------------------------------------------------------- generation
def budget_forcing(
    engine,
    tokenizer,
    prompt_ids: list[list[int]],
    budget: int,
    n: int,
    sampling,
    *,
    max_waits: int = 100,
    answer_tokens: int = 32,
    cue: str = BF_CUE,
    wait: str = BF_WAIT,
) -> list[list[dict]]:
    """S1 budget forcing on any Engine. While thinking < budget and the model stops: strip EOS, append "Wait",
    continue (at most max_waits times, each continuation limited to the remaining budget). Then append the cue
    and decode up to answer_tokens greedily. Returns per prompt n dicts: think_ids, answer_ids (cue included),
    waits, finish_reason ("length" when the budget was reached, else "stop")."""
    wait_ids = tokenizer(wait, add_special_tokens=False)["input_ids"]
    cue_ids = tokenizer(cue, add_special_tokens=False)["input_ids"]
    first = engine.generate(prompt_ids, n, replace(sampling, max_new_tokens=budget))
    seqs = [
        {"p": p, "think": list(c.token_ids)[:budget], "fin": c.finish_reason, "waits": 0}
        for p, cs in enumerate(first)
        for c in cs
    ]
    while True:
        active = []
        for s in seqs:
            if s["fin"] != "stop":
                continue
            s["think"], s["fin"] = s["think"][:-1], "done"  # strip the EOS
            if s["waits"] < max_waits and budget - len(s["think"]) > len(wait_ids):
                s["think"] += wait_ids
                s["waits"] += 1
                active.append(s)
        if not active:
            break
        # The Engine takes one max_new_tokens per call: sample up to the largest remaining budget and cut each
        # continuation at its own (the first k sampled tokens are distributed exactly as with a limit of k).
        room = [budget - len(s["think"]) for s in active]
        conts = engine.generate(
            [prompt_ids[s["p"]] + s["think"] for s in active], 1, replace(sampling, max_new_tokens=max(room))
        )
        for s, r, (c,) in zip(active, room, conts):
            s["think"] += list(c.token_ids)[:r]
            s["fin"] = "length" if len(c.token_ids) > r else c.finish_reason
    for s in seqs:
        s["fin"] = "length" if len(s["think"]) >= budget or s["fin"] == "length" else "stop"
    greedy = replace(sampling, temperature=0.0, top_p=1.0, max_new_tokens=answer_tokens)
    answers = engine.generate([prompt_ids[s["p"]] + s["think"] + cue_ids for s in seqs], 1, greedy)
    out: list[list[dict]] = [[] for _ in prompt_ids]
    for s, (c,) in zip(seqs, answers):
        out[s["p"]].append(
            {
                "think_ids": s["think"],
                "answer_ids": cue_ids + list(c.token_ids),
                "waits": s["waits"],
                "finish_reason": s["fin"],
            }
        )
    return out


def evaluate_model(
    engine, tokenizer, label: str, problems: dict, cfg: EvalConfig, method: str, log=print
) -> list[dict]:
    """Generate and grade every (dataset, budget, problem, sample) of one model and method; per-sample records."""
    records = []
    for ds, probs in problems.items():
        for budget in cfg.budgets:
            if not probs:  # more ranks than problems
                continue
            t0 = time.time()
            mode = "none" if method == "budget-forcing" else method
            target = None if mode == "none" else budget
            prompts = [data.format_prompt(tokenizer, p, target, mode) for _, p in probs]
            ids = [tokenizer(s, add_special_tokens=False)["input_ids"] for s in prompts]
            sampling = rollout.SamplingConfig(
                temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=cfg.max_new(budget), seed=cfg.seed
            )
            rows = []  # (problem index, problem, prompt, sample, response, n_tokens, answer_tokens, finish, waits,
            #            repeats)
            if method == "budget-forcing":
                outs = budget_forcing(
                    engine,
                    tokenizer,
                    ids,
                    budget,
                    cfg.samples,
                    sampling,
                    max_waits=cfg.bf_max_waits,
                    answer_tokens=cfg.bf_answer_tokens,
                    cue=cfg.bf_cue,
                )
                for (i, p), prompt, fs in zip(probs, prompts, outs):
                    rows += [
                        (
                            i,
                            p,
                            prompt,
                            k,
                            tokenizer.decode(f["think_ids"] + f["answer_ids"], skip_special_tokens=True),
                            len(f["think_ids"]),
                            len(f["answer_ids"]),
                            f["finish_reason"],
                            f["waits"],
                            rewards.repeats(f["think_ids"]),
                        )
                        for k, f in enumerate(fs)
                    ]
            else:
                outs = engine.generate(ids, cfg.samples, sampling)
                for (i, p), prompt, cs in zip(probs, prompts, outs):
                    rows += [
                        (i, p, prompt, k, c.text, len(c.token_ids), 0, c.finish_reason, 0, rewards.repeats(c.token_ids))
                        for k, c in enumerate(cs)
                    ]
            correct = grading.grade(
                [r[4] for r in rows],
                [r[1].answer for r in rows],
                [r[1].multiple_choice for r in rows],
                last_number_fallback=cfg.last_number_fallback,
            )
            for (i, p, prompt, k, text, n_y, n_ans, fin, waits, rep), ok in zip(rows, correct):
                records.append(
                    {
                        "model": label,
                        "method": method,
                        "dataset": ds,
                        "problem_id": p.id,
                        "problem_index": i,
                        "sample": k,
                        "budget": budget,
                        "target": target,
                        "prompt": prompt,
                        "response": text,
                        "gold": p.answer,
                        "n_tokens": n_y,
                        "answer_tokens": n_ans,
                        "finish_reason": fin,
                        "waits": waits,
                        "repeats": rep,
                        "correct": bool(ok),
                    }
                )
            acc = sum(correct) / max(1, len(correct))
            log(
                f"[{label} · {method}] {ds} budget {budget}: rank-0 shard {len(rows)} samples, acc {acc:.3f}, "
                f"mean tokens {sum(r[5] for r in rows) / max(1, len(rows)):.0f}, {time.time() - t0:.0f}s"
            )
    return records


# --------------------------------------------------------------------------------------------------- CLI
def parse_args(argv=None) -> EvalConfig:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["smollm2"], help="checkpoint dirs / hub names ('smollm2' = embedded)")
    p.add_argument("--labels", nargs="+", help="one label per --model (default: directory names)")
    p.add_argument("--data", nargs="+", default=["arith"], help="anything data.load_problems accepts")
    p.add_argument("--budgets", nargs="+", type=int, default=[512, 1024, 2048, 3600])
    p.add_argument(
        "--target",
        choices=("exact", "max", "none"),
        default="exact",
        help="the prompt's length sentence, as grpo.py's --target: 'Think for N tokens.' (exact), "
        "'Think for maximum N tokens.' (max), or none",
    )
    p.add_argument("--baseline", choices=("none", "budget-forcing"), default="none", help="also run S1 budget forcing")
    p.add_argument("--baseline-only", action="store_true", help="run only the --baseline, not --target")
    p.add_argument("--samples", type=int, default=16, help="samples per problem")
    p.add_argument("--limit", type=int, help="problems per dataset")
    p.add_argument("--split", default="test")
    p.add_argument("--question-field")
    p.add_argument("--answer-field")
    p.add_argument(
        "--multiple-choice", nargs="*", metavar="DATASET", help="letter-graded datasets (the flag alone: all of --data)"
    )
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, help="default 2 x budget (exact, none), 8192 (max)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--engine",
        choices=("hf", "vllm", "auto"),
        default="auto",
        help="auto: vllm wherever it imports, else hf (transformers)",
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "bfloat16", "float32"),
        default="auto",
        help="compute dtype; auto: bfloat16 on GPUs and on CPUs with bf16 instructions",
    )
    p.add_argument("--hf-batch-size", type=int, default=16, help="hf engine: sequences per batch")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.85, help="vllm on a GPU: share of its memory")
    p.add_argument(
        "--vllm-kv-cache-gib",
        type=float,
        default=0.0,
        help="vllm: a fixed KV cache of this many GiB (default: on CPU sized for the batch, on a GPU from "
        "the memory share). On a GPU this skips vLLM's memory profiling, which fails when another "
        "process on the GPU frees memory meanwhile (evaluating beside a training run)",
    )
    p.add_argument("--out", help="output dir (default runs/eval-<timestamp>)")
    p.add_argument("--bf-max-waits", type=int, default=100)
    p.add_argument("--bf-answer-tokens", type=int, default=32)
    p.add_argument("--bf-cue", default=BF_CUE)
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        help="generate nothing: combine the samples.jsonl (or .gz) of "
        "earlier runs (e.g. the base model, then a checkpoint) into one table and plot in --out",
    )
    p.add_argument(
        "--last-number-fallback",
        action="store_true",
        help="grade a response without \\boxed{} by its last number (for models that never box)",
    )
    a = p.parse_args(argv)
    labels = a.labels or [Path(m.rstrip("/")).name for m in a.model]
    if len(labels) != len(a.model) or len(set(labels)) != len(labels):
        p.error(f"--labels: need {len(a.model)} distinct labels for --model {a.model}, got {labels}")
    if min(a.budgets) <= 0 or a.samples <= 0:
        p.error("--budgets and --samples must be positive")
    if a.baseline_only and a.baseline == "none":
        p.error("--baseline-only needs --baseline budget-forcing")
    kw = vars(a)
    return EvalConfig(models=kw.pop("model"), **{**kw, "labels": labels})


def load_datasets(cfg: EvalConfig) -> dict[str, list]:
    """{dataset name: [(index, Problem)]} for all --data (names: parent/stem of a file, or the spec on collision)."""
    stems = [f"{Path(s).parent.name}/{Path(s).stem}".lstrip("/") if Path(s).suffix else s for s in cfg.data]
    names = stems if len(set(stems)) == len(stems) else list(cfg.data)
    mc = cfg.multiple_choice
    return {
        name: list(
            enumerate(
                data.load_problems(
                    spec,
                    question_field=cfg.question_field,
                    answer_field=cfg.answer_field,
                    split=cfg.split,
                    limit=cfg.limit,
                    multiple_choice=mc is not None and (not mc or spec in mc or name in mc),
                    seed=cfg.seed,
                )
            )
        )
        for name, spec in zip(names, cfg.data)
    }


def environment(model_dirs: dict, world: int, device: str, argv: list[str]) -> dict:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return None

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {
        "model_dirs": model_dirs,
        "world_size": world,
        "device": device,
        "python": sys.version.split()[0],
        "versions": {k: version(k) for k in ("torch", "transformers", "vllm", "math-verify")},
        "git_commit": commit,
        "argv": argv,
    }


def write_outputs(out: Path, cfg: EvalConfig, records: list[dict], env: dict, elapsed: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(records, cfg.budgets)
    # A merge generated nothing: its own flags (samples, data, ...) are defaults that did not apply; each merged
    # run's config is in env["merged_from"].
    config = {k: getattr(cfg, k) for k in ("merge", "budgets", "labels", "out")} if cfg.merge else asdict(cfg)
    (out / "results.json").write_text(
        json.dumps({"config": config, "environment": env, "elapsed_s": elapsed, "summary": summary}, indent=1) + "\n"
    )
    (out / "table.md").write_text(format_table(summary, cfg.budgets))
    with open(out / "samples.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    plot_accuracy_vs_tokens(summary, out / "accuracy_vs_tokens.png")
    plot_length_vs_target(records, out / "length_vs_target.png", seed=cfg.seed)
    return summary


def _architecture(model_dir: str) -> tuple | None:
    """The shape-defining part of a local model's config.json (None for a hub name)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return None
    c = json.loads(path.read_text())
    keys = (
        "architectures",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "tie_word_embeddings",
    )
    return tuple(json.dumps(c.get(k)) for k in keys)


def _max_model_len(tokenizer, shard: dict, cfg: EvalConfig, methods: list[str]) -> int:
    """Prompt plus response tokens of the longest sequence this evaluation can generate (vLLM's max_model_len):
    the longest prompt at the largest budget, plus the longest generation limit; budget forcing also appends its
    cue and answer after at most `budget` thinking tokens."""

    top = max(cfg.budgets)
    prompt = max(
        (
            len(
                tokenizer(
                    data.format_prompt(
                        tokenizer,
                        p,
                        None if m in ("none", "budget-forcing") else top,
                        "none" if m == "budget-forcing" else m,
                    ),
                    add_special_tokens=False,
                )["input_ids"]
            )
            for ps in shard.values()
            for _, p in ps
            for m in methods
        ),
        default=0,
    )
    cue = len(tokenizer(cfg.bf_cue, add_special_tokens=False)["input_ids"])
    response = max(cfg.max_new(top), top + cue + cfg.bf_answer_tokens if "budget-forcing" in methods else 0)
    return prompt + response


def merge_outputs(cfg: EvalConfig, argv: list[str]) -> dict:
    """--merge: records of earlier runs, in the given order, re-summarized over the union of their budgets."""
    records, runs = [], []
    for d in cfg.merge:
        # results/ keeps its samples gzipped: either file will do
        path = next((p for p in (Path(d) / "samples.jsonl", Path(d) / "samples.jsonl.gz") if p.is_file()), None)
        if path is None:
            raise SystemExit(f"--merge: {d} has neither samples.jsonl nor samples.jsonl.gz (an evaluate.py --out dir)")
        text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
        recs = [json.loads(line) for line in text.splitlines() if line.strip()]
        clash = {r["model"] for r in recs} & {r["model"] for r in records}
        if clash:
            raise SystemExit(f"--merge: model label(s) {sorted(clash)} of {d} already come from an earlier dir")
        records += recs
        meta = Path(d) / "results.json"
        runs.append(
            {
                "dir": str(d),
                **({k: v for k, v in json.loads(meta.read_text()).items() if k != "summary"} if meta.is_file() else {}),
            }
        )
    cfg.budgets = sorted({r["budget"] for r in records})
    cfg.labels = list(dict.fromkeys(r["model"] for r in records))
    out = Path(cfg.out or ROOT / "runs" / f"eval-merged-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    summary = write_outputs(out, cfg, records, {"merged_from": runs, "argv": argv}, 0.0)
    print(format_table(summary, cfg.budgets))
    return summary


def main(argv=None) -> dict | None:
    cfg = parse_args(argv)
    if cfg.merge:
        return merge_outputs(cfg, sys.argv[1:] if argv is None else list(argv))
    t0 = time.time()
    own_group = not torch.distributed.is_initialized()
    dist_info = M.init_distributed()
    rank, world = dist_info.rank, dist_info.world_size
    log = (lambda msg: print(msg, file=sys.stderr, flush=True)) if rank == 0 else (lambda msg: None)
    out = Path(cfg.out or ROOT / "runs" / f"eval-{datetime.datetime.now():%Y%m%d-%H%M%S}")
    shard = {ds: ps[rank::world] for ds, ps in load_datasets(cfg).items()}  # rank r takes problems r::world
    methods = ([] if cfg.baseline_only else [cfg.target]) + ([cfg.baseline] if cfg.baseline != "none" else [])
    records, model_dirs, engine, engine_arch = [], {}, None, None
    for name, label in zip(cfg.models, cfg.labels):
        model_dirs[label] = model_dir = M.resolve_model_on_every_rank(name, dist_info.local_rank)
        tokenizer = M.load_tokenizer(model_dir)
        arch = _architecture(model_dir)
        if engine is not None and arch is not None and arch == engine_arch:
            # Same shapes: push the next checkpoint's weights into the live engine (faster than building one).
            engine.load_weights(M.read_safetensors(model_dir).items())
        else:
            if engine is not None:
                engine.close()
            # One generate call covers a dataset's problems x samples at one budget; vLLM preallocates buffers per
            # concurrent sequence, so at most 256 run at once (its default) and the rest queue.
            max_seqs = min(256, max(len(ps) for ps in shard.values()) * cfg.samples)
            engine = rollout.make_engine(
                cfg.engine,
                model_dir,
                dist_info.device,
                seed=cfg.seed + rank,  # own stream per rank
                dtype=torch.bfloat16 if M.use_bf16(dist_info.device, cfg.dtype) else torch.float32,
                hf_batch_size=cfg.hf_batch_size,
                max_model_len=_max_model_len(tokenizer, shard, cfg, methods),
                max_num_seqs=max(1, max_seqs),
                vllm_gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                vllm_kv_cache_bytes=int(cfg.vllm_kv_cache_gib * 2**30) or None,
                # Another architecture needs another engine in this process; vLLM's sleep mode allows only one per
                # process (rollout.VLLMEngine), and evaluation has no trainer to make room for.
                vllm_sleep_mode=False,
            )
            engine_arch = arch
        for method in methods:
            records += evaluate_model(engine, tokenizer, label, shard, cfg, method, log=log)
    engine.close()
    if world > 1:  # merge on rank 0 over gloo (CPU memory; ranks that finish early may wait long)
        group = torch.distributed.new_group(backend="gloo", timeout=datetime.timedelta(hours=12))
        parts = [None] * world if rank == 0 else None
        torch.distributed.gather_object(records, parts, dst=0, group=group)
        records = [r for part in parts for r in part] if rank == 0 else []
    summary = None
    if rank == 0:
        order = {m: i for i, m in enumerate(cfg.labels)}
        records.sort(
            key=lambda r: (
                order[r["model"]],
                methods.index(r["method"]),
                list(shard).index(r["dataset"]),
                r["budget"],
                r["problem_index"],
                r["sample"],
            )
        )
        env = environment(model_dirs, world, str(dist_info.device), sys.argv[1:] if argv is None else list(argv))
        summary = write_outputs(out, cfg, records, env, time.time() - t0)
        print(format_table(summary, cfg.budgets))
        log(f"wrote {out}/ (results.json, table.md, samples.jsonl, accuracy_vs_tokens.png, length_vs_target.png)")
    if world > 1:
        torch.distributed.barrier(group=group)
    if own_group:
        torch.distributed.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
    M.exit_finished()  # written and closed: skip interpreter finalization (seconds, with vLLM)
