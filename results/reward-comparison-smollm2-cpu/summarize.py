"""The reward comparison's table and plot, from what run.sh wrote under runs/compare/.

    python results/reward-comparison-smollm2-cpu/summarize.py runs/compare --steps 20

Per reward: the prompt's target sentence, training minutes, the mean training reward, accuracy and length over the
last 5 steps (metrics.jsonl), then the held-out evaluation averaged over its budgets (evaluate.py results.json):
accuracy, mean tokens, the fraction of responses that repeat a span (rewards.repeats) and, for the rewards whose
prompt has a target, the mean relative deviation from it. Writes table.md, comparison.json and
accuracy_vs_tokens.png next to this file.
"""

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVALS = {"exact": "eval-exact", "max": "eval-max", "none": "eval-none"}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", type=Path)
    p.add_argument("--steps", type=int, required=True)
    a = p.parse_args()
    seconds = dict(line.split() for line in (a.runs / "train_seconds.txt").read_text().splitlines() if line.strip())
    summaries = {t: json.loads((a.runs / d / "results.json").read_text())["summary"] for t, d in EVALS.items()}
    rows = []
    for name in ["base", *seconds]:
        for target, summary in summaries.items():
            if name == "base":
                cfg = {"data": {"target": target}}
            else:
                cfg = json.loads((a.runs / name / "config.json").read_text())
                if cfg["data"]["target"] != target:
                    continue
            series = next(s for k, s in summary.items() if k.split(" · ")[0] == name)
            cells = list(series["average"].values())
            row = {
                "reward": name,
                "target": target,
                "eval_accuracy": _mean(cells, "accuracy"),
                "eval_tokens": _mean(cells, "mean_tokens"),
                "eval_repeats": _mean(cells, "repeats"),
                "eval_rel_dev": _mean(cells, "rel_dev") if target != "none" else None,
            }
            if name != "base":
                m = [json.loads(x) for x in (a.runs / name / "metrics.jsonl").read_text().splitlines() if x.strip()]
                last = m[-5:]
                row |= {
                    "train_minutes": float(seconds[name]) / 60,
                    "steps": len(m),
                    **{
                        f"train_{k}": sum(x[k] for x in last) / len(last)
                        for k in ("reward", "accuracy", "response_len", "repeats", "length_term")
                    },
                }
            rows.append(row)
    cols = [
        ("reward", "reward", ""),
        ("target", "prompt target", ""),
        ("train_minutes", "train min", ".1f"),
        ("train_accuracy", "train acc (last 5)", ".2f"),
        ("train_response_len", "train tokens (last 5)", ".0f"),
        ("train_length_term", "length term (last 5)", "+.3f"),
        ("eval_accuracy", "held-out acc", ".1%"),
        ("eval_tokens", "held-out tokens", ".0f"),
        ("eval_repeats", "repeats", ".0%"),
        ("eval_rel_dev", "dev from target", ".0%"),
    ]
    lines = ["| " + " | ".join(h for _, h, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join("-" if r.get(k) is None else format(r[k], f) for k, _, f in cols) + " |")
    table = "\n".join(lines)
    print(table)
    (HERE / "table.md").write_text(table + "\n")
    (HERE / "comparison.json").write_text(json.dumps({"steps": a.steps, "rows": rows}, indent=1) + "\n")
    _plot(rows, HERE / "accuracy_vs_tokens.png")


def _mean(cells, key):
    vals = [c[key] for c in cells if c.get(key) is not None]
    return sum(vals) / len(vals) if vals else None


def _plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    marker = {"exact": "s", "max": "^", "none": "o"}
    for r in rows:
        color = "k" if r["reward"] == "base" else None
        ax.scatter(r["eval_tokens"], 100 * r["eval_accuracy"], marker=marker[r["target"]], s=60, color=color)
        ax.annotate(
            f"{r['reward']}" + (f" ({r['target']})" if r["reward"] == "base" else ""),
            (r["eval_tokens"], 100 * r["eval_accuracy"]),
            textcoords="offset points",
            xytext=(5, 4),
            fontsize=8,
        )
    ax.set(
        xlabel="mean generated tokens (held-out arith, mean over budgets 32-128)",
        ylabel="accuracy, pass@1 (%)",
        title="length rewards after the same training (SmolLM2-135M, CPU)",
    )
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
