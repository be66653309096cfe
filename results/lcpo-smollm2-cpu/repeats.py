"""The fraction of this folder's evaluation samples that repeat a span (rewards.repeats), per model and budget.
These samples predate the `repeats` field of evaluate.py, so the responses are tokenized again with SmolLM2's
tokenizer.   python results/lcpo-smollm2-cpu/repeats.py"""

import collections
import gzip
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from transformers import AutoTokenizer  # noqa: E402

import model  # noqa: E402
import rewards  # noqa: E402

tok = AutoTokenizer.from_pretrained(model.resolve_model("smollm2"))
marks = collections.defaultdict(list)  # (model, budget) -> one repetition mark per sample
with gzip.open(Path(__file__).parent / "eval" / "samples.jsonl.gz", "rt") as f:
    for line in f:
        r = json.loads(line)
        ids = tok(r["response"], add_special_tokens=False)["input_ids"]
        marks[r["model"], r["budget"]].append(rewards.repeats(ids))
for name in dict.fromkeys(m for m, _ in marks):
    budgets = sorted(b for m, b in marks if m == name)
    cells = [f"{100 * sum(marks[name, b]) / len(marks[name, b]):.0f}%" for b in budgets]
    print(f"{name}: repeats at {' / '.join(map(str, budgets))} tokens: {' / '.join(cells)}")
