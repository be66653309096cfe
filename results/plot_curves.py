"""Training curves of one or more runs from their metrics.jsonl (one line per step, written by grpo.py).

    python results/plot_curves.py runs/cpu-exact/metrics.jsonl runs/cpu-max/metrics.jsonl \
        --labels exact max --out results/l1-smollm2-cpu/curves.png

Each panel shows the per-step value (thin) and a 5-step moving average (thick); a run that did not log a
metric leaves its panel empty.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

PANELS = [("reward", "mean reward"), ("rel_len_dev", "mean |n_y - n_gold| / n_gold"),
          ("response_len", "mean response tokens"), ("over_target", "fraction over target"),
          ("len_target_corr", "r(target, response tokens) per step")]


def moving_average(xs: list[float], k: int = 5) -> list[float]:
    return [sum(xs[max(0, i - k + 1):i + 1]) / len(xs[max(0, i - k + 1):i + 1]) for i in range(len(xs))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("metrics", nargs="+", help="metrics.jsonl files")
    p.add_argument("--labels", nargs="+")
    p.add_argument("--out", required=True)
    a = p.parse_args()
    labels = a.labels or [Path(m).parent.name for m in a.metrics]
    if len(labels) != len(a.metrics):
        p.error(f"--labels: need {len(a.metrics)} labels")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for i, (path, label) in enumerate(zip(a.metrics, labels)):
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
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
