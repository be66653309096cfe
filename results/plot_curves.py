"""Training curves of one or more runs from their metrics.jsonl (one line per step, written by grpo.py).

    python results/plot_curves.py runs/cpu-exact/metrics.jsonl runs/cpu-max/metrics.jsonl \
        --labels exact max --out results/l1-smollm2-cpu/curves.png

Each panel shows the per-step value (thin) and a 5-step moving average (thick); a run that did not log a
metric leaves its panel empty. `--from-step N` keeps steps >= N (runs branched from one checkpoint). `--table K`
also prints, per run, the plain means of those metrics over windows of K steps as a markdown table (the tables in
the results READMEs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [
    ("reward", "mean reward"),
    ("accuracy", "training accuracy"),
    ("rel_len_dev", "mean |n_y - n_gold| / n_gold"),
    ("response_len", "mean response tokens"),
    ("over_target", "fraction over target"),
    ("len_target_corr", "r(target, response tokens) per step"),
    ("repeats", "fraction repeating a span"),
]


def moving_average(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1) : i + 1]) / len(xs[max(0, i - k + 1) : i + 1]) for i in range(len(xs))]


def window_table(rows: list[dict], k: int) -> str:
    """Markdown table: plain means of the PANELS metrics (and s/step) over consecutive windows of k steps."""
    keys = [key for key, _ in PANELS] + ["time_step"]
    lines = ["| steps | " + " | ".join(keys) + " |", "| --- " * (len(keys) + 1) + "|"]
    for i in range(0, len(rows), k):
        w = rows[i : i + k]
        cells = []
        for key in keys:
            vals = [r[key] for r in w if r.get(key) is not None]
            cells.append(f"{sum(vals) / len(vals):.2f}" if vals else "")
        lines.append(f"| {w[0]['step']}-{w[-1]['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--table", type=int, metavar="K", help="also print per-run means over windows of K steps")
    p.add_argument("--from-step", type=int, default=0, metavar="N", help="only steps >= N (a branch's stretch)")
    a = p.parse_args()
    labels = a.labels or [Path(m).parent.name for m in a.metrics]
    if a.table is not None and a.table < 1:
        p.error(f"--table: K must be >= 1, got {a.table}")
    if len(labels) != len(a.metrics):
        p.error(f"--labels: need {len(a.metrics)} labels")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(3.6 * len(PANELS), 3.4))
    for i, (path, label) in enumerate(zip(a.metrics, labels)):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r["step"] >= a.from_step]
        if a.table:
            print(f"\n{label} ({path})\n\n{window_table(rows, a.table)}\n")
        for ax, (key, title) in zip(axes, PANELS):
            logged = [r for r in rows if r.get(key) is not None]  # older runs lack len_target_corr
            xs, ys = [r["step"] for r in logged], [r[key] for r in logged]
            ax.plot(xs, ys, lw=0.8, alpha=0.35, color=f"C{i}")  # one colour per run in every panel
            ax.plot(xs, moving_average(ys), lw=2, color=f"C{i}", label=label)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
    axes[0].legend()
    fig.tight_layout()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
