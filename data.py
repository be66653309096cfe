"""Problems, target lengths and prompts: everything the trainer and evaluator feed the model.

- `load_problems(spec)` reads GSM8K jsonl (gold after "#### "), MATH/DeepScaleR json (`problem`, `answer`),
  any local .json/.jsonl/.parquet file or hub dataset (field names via `question_field`/`answer_field`),
  or the built-in "arith" task (generated word problems, no download) into `Problem`s.
- `TargetSampler` draws target lengths n_gold in lo..hi (uniform, or log-uniform) afresh every time a prompt is used.
- `prompt_text` / `format_prompt` write the L1 prompt sentences (exact / max / none) through the chat template.
- `PromptStream` yields shuffled training batches and resumes exactly from its `state_dict`.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import json
import logging
import math
import random
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

MODES = ("exact", "max", "none", "mixed")
TARGET_DISTS = ("uniform", "log-uniform")
FILE_FORMATS = (".jsonl", ".json", ".parquet")


@dataclass
class Problem:
    question: str
    answer: str  # gold final answer as a string
    source: str
    id: str
    multiple_choice: bool = False


# ----------------------------------------------------------------------------------------------- loading
def _gold(value, gsm8k: bool) -> str | None:
    """Gold answer as a string: GSM8K keeps what follows "#### " without thousands commas; 142.0 -> "142"."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(int(value)) if float(value).is_integer() else repr(value)
    if not isinstance(value, str) or (gsm8k and "####" not in value):
        return None
    if gsm8k:
        value = re.sub(r"(?<=\d),(?=\d{3}\b)", "", value.rsplit("####", 1)[1])
    return value.strip() or None


def _read_rows(path: Path) -> list[tuple[str, object]]:
    """(where, row) pairs; `where` is "line N" (1-based) for jsonl, "row index N" for json/parquet. A jsonl line that
    is not JSON, or not UTF-8, becomes the row `_BadRow(why)`, left to the caller (an error, or --skip-bad)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors do not always name the file
            raise ValueError(f"{path}: cannot read it as parquet: {type(e).__name__}: {e}") from None
        return [(f"row index {i}", r) for i, r in enumerate(table.to_pylist())]
    raw = path.read_bytes()
    if path.suffix == ".json":
        try:
            data = json.loads(raw.decode("utf-8"))
        except UnicodeDecodeError as e:
            line = raw[: e.start].count(b"\n") + 1
            raise ValueError(f"{path}: line {line}: not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})") from None
        except json.JSONDecodeError as e:  # "Extra data" = one object per line: read it as jsonl below
            if "Extra data" not in str(e):
                raise ValueError(f"{path}: invalid JSON: {e}") from None
        else:
            if not isinstance(data, list):
                raise ValueError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
            return [(f"row index {i}", r) for i, r in enumerate(data)]
    rows = []
    for n, line in enumerate(raw.split(b"\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append((f"line {n}", json.loads(line.decode("utf-8"))))
        except UnicodeDecodeError as e:
            rows.append((f"line {n}", _BadRow(f"not UTF-8 (byte {line[e.start]:#04x} at column {e.start + 1})")))
        except json.JSONDecodeError as e:
            rows.append((f"line {n}", _BadRow(f"invalid JSON: {e}")))
    return rows


@dataclass
class _BadRow:
    why: str


def _problem_of(row, qf: str, af: str, gsm8k: bool) -> tuple[str, str] | str:
    """(question, gold answer) of a row, or why it is bad."""
    if isinstance(row, _BadRow):
        return row.why
    if not isinstance(row, dict):
        return f"a {type(row).__name__}, not an object"
    q, a = row.get(qf), row.get(af)
    if q is not None and not isinstance(q, str):
        return f"{qf!r} is a {type(q).__name__}, not text"
    if a is not None and not isinstance(a, (str, int, float)) or isinstance(a, bool):
        return f"{af!r} is a {type(a).__name__}, not text or a number"
    gold = _gold(a, gsm8k)
    if not (q or "").strip():
        return f"missing or empty {qf!r}"
    if gold is None:
        return f"missing or empty {af!r}" + (gsm8k * ' (no "#### ")')
    return q.strip(), gold


def _pick_field(keys, given: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    if given is None:
        given = next((c for c in candidates if c in keys), None)
        if given is None:
            raise ValueError(
                f"{where}: no {what} field among {list(candidates)}; fields: {sorted(keys)}; "
                f"name it with {what}_field= / --{what}-field"
            )
    elif given not in keys:
        raise ValueError(f"{where}: {what} field {given!r} (--{what}-field) not found; fields: {sorted(keys)}")
    return given


def _rows_to_problems(
    rows, where: str, source: str, *, question_field, answer_field, multiple_choice, skip_bad
) -> list[Problem]:
    if not rows:
        raise ValueError(f"{where}: dataset is empty")
    first = next((r for _, r in rows if isinstance(r, dict)), {})
    qf = _pick_field(first.keys(), question_field, ("question", "problem", "prompt"), "question", where)
    af = _pick_field(first.keys(), answer_field, ("answer",), "answer", where)
    gsm8k = isinstance(first.get(af), str) and "####" in first[af]
    problems, bad = [], []
    for i, (row_where, row) in enumerate(rows):
        got = _problem_of(row, qf, af, gsm8k)
        if isinstance(got, str):
            if not skip_bad:
                raise ValueError(f"{where}: {row_where}: {got} (pass skip_bad=True / --skip-bad to drop such rows)")
            bad.append(f"{row_where}: {got}")
            continue
        problems.append(Problem(*got, source, f"{source}:{i}", multiple_choice))
    if bad:
        log.warning("%s: skipped %d bad rows (--skip-bad), first: %s", where, len(bad), bad[0])
    if not problems:
        raise ValueError(f"{where}: no usable rows")
    return problems


def load_problems(
    spec: str,
    *,
    question_field: str | None = None,
    answer_field: str | None = None,
    split: str = "train",
    limit: int | None = None,
    multiple_choice: bool = False,
    seed: int = 0,
    n: int | None = None,
    difficulty: int | None = None,
    skip_bad: bool = False,
    config: str | None = None,
) -> list[Problem]:
    """Problems from "arith[:difficulty]", a local .jsonl/.json/.parquet file, or a hub dataset name.

    `split` picks the hub split, or "train"/"test" for arith (disjoint question sets); local files ignore it.
    `limit` keeps the first rows; for arith `n` (default `limit` or 1000) is how many to generate.
    """
    if spec == "arith" or spec.startswith("arith:"):
        d = spec.partition(":")[2]
        if d and not d.isdigit():
            raise ValueError(f"bad arith spec {spec!r}: expected 'arith' or 'arith:<difficulty>'")
        if d and difficulty is not None and int(d) != difficulty:
            raise ValueError(f"arith difficulty given twice: {spec!r} and difficulty={difficulty}")
        return arithmetic_problems(
            n or limit or 1000,
            seed=seed,
            difficulty=int(d) if d else (difficulty or 1),
            split=split,
            multiple_choice=multiple_choice,
        )[:limit]
    kw = dict(
        question_field=question_field, answer_field=answer_field, multiple_choice=multiple_choice, skip_bad=skip_bad
    )
    path = Path(spec).expanduser()
    if path.exists() or path.suffix in FILE_FORMATS or spec.startswith(("/", ".", "~")):
        if not path.is_file():
            raise FileNotFoundError(f"data file not found: {spec}")
        if path.suffix not in FILE_FORMATS:
            raise ValueError(f"{path}: unknown data format {path.suffix!r}; expected one of {FILE_FORMATS}")
        source = f"{path.parent.name}/{path.stem}"
        return _rows_to_problems(_read_rows(path), str(path), source, **kw)[:limit]
    import datasets  # hub dataset (needs network or a populated HF cache)

    try:
        ds = datasets.load_dataset(spec, config, split=split)
    except Exception as e:  # no network, no such dataset, no such split: datasets' many error types
        raise ValueError(
            f"--data {spec}: not a local file, and the hub dataset could not be loaded "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); offline, a local "
            ".jsonl / .json / .parquet file or arith works"
        ) from e
    rows = [(f"row index {i}", r) for i, r in enumerate(ds)]
    return _rows_to_problems(rows, f"{spec}[{split}]", f"{spec}/{split}", **kw)[:limit]


# ---------------------------------------------------------------------------------------- built-in arith
_NAMES = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ben", "he"),
    ("Maria", "she"),
    ("Sam", "he"),
    ("Lily", "she"),
    ("Omar", "he"),
    ("Mia", "she"),
    ("Leo", "he"),
    ("Sara", "she"),
]
# theme -> (unit in the question, add phrases, subtract phrases); {k} is the operand
_THEMES = {
    "apples": (
        "apples",
        ["buys {k} more apples", "picks {k} more apples"],
        ["eats {k} of the apples", "gives {k} apples to a friend"],
    ),
    "books": (
        "books",
        ["buys {k} more books", "gets {k} books as a gift"],
        ["gives away {k} books", "sells {k} books"],
    ),
    "coins": (
        "coins",
        ["finds {k} more coins", "gets {k} coins from a friend"],
        ["spends {k} coins", "loses {k} coins"],
    ),
    "marbles": (
        "marbles",
        ["wins {k} marbles", "buys {k} more marbles"],
        ["loses {k} marbles", "gives {k} marbles to a friend"],
    ),
    "money": (
        "dollars",
        ["earns {k} dollars", "gets {k} dollars from a friend"],
        ["spends {k} dollars", "pays {k} dollars for lunch"],
    ),
}
_TEST_BUCKETS = 10  # a question is in the test split iff crc32(question) % 10 == 0: disjoint by construction


def _arith_one(rng: random.Random, difficulty: int) -> tuple[str, int]:
    """One word problem with `difficulty` operations (+, -, x, / with exact, non-negative results)."""
    name, pron = rng.choice(_NAMES)
    unit, adds, subs = _THEMES[rng.choice(sorted(_THEMES))]
    noun = "money" if unit == "dollars" else unit
    x = rng.randint(2, 10 * difficulty + 2)
    parts = [f"{name} has {x} {unit}"]
    for step in range(difficulty):
        divisors = [k for k in range(2, 6) if x % k == 0]
        op = rng.choices(
            ["add", "sub", "mul", "div"], weights=[35, 35 if x > 1 else 0, 15 if x <= 300 else 0, 15 if divisors else 0]
        )[0]
        if op == "add":
            k = rng.randint(1, 5 * difficulty + 5)
            phrase, x = rng.choice(adds).format(k=k), x + k
        elif op == "sub":
            k = rng.randint(1, x - 1)
            phrase, x = rng.choice(subs).format(k=k), x - k
        elif op == "mul":
            k, much = rng.randint(2, 3), "much" if noun == "money" else "many"
            phrase, x = f"gets more {noun} until {pron} has {k} times as {much}", x * k
        else:
            k = rng.choice(divisors)
            phrase, x = f"splits the {noun} into {k} equal parts, keeping one part", x // k
        parts.append((" and " if step == 0 else f". Then {pron} ") + phrase)
    return "".join(parts) + f". How many {unit} does {name} have now?", x


def arithmetic_problems(
    n: int, seed: int = 0, difficulty: int = 1, *, split: str = "train", multiple_choice: bool = False
) -> list[Problem]:
    """`n` distinct generated problems, deterministic in (seed, difficulty, split); difficulty = #operations."""
    if difficulty < 1:
        raise ValueError(f"arith difficulty must be >= 1, got {difficulty}")
    if split not in ("train", "test"):
        raise ValueError(f"arith split must be 'train' or 'test', got {split!r}")
    rng, seen, out = random.Random(f"arith:{split}:{seed}:{difficulty}"), set(), []
    for _ in range(200 * n + 10_000):
        if len(out) == n:
            break
        q, a = _arith_one(rng, difficulty)
        if q not in seen and (zlib.crc32(q.encode()) % _TEST_BUCKETS == 0) == (split == "test"):
            seen.add(q)
            out.append(
                Problem(
                    q, str(a), f"arith:{difficulty}", f"arith:{difficulty}:{split}:{seed}:{len(out)}", multiple_choice
                )
            )
    if len(out) < n:
        raise ValueError(f"arith: only {len(out)} distinct {split} problems at difficulty {difficulty}, asked for {n}")
    return out


# -------------------------------------------------------------------------------------- targets, prompts
def check_targets(lo: int, hi: int, dist: str = "uniform", per_problem: int = 1, mode: str = "exact") -> None:
    """The target settings' rules, each a ValueError naming its flag: config.validate checks the command line with
    it, and TargetSampler and PromptStream their arguments."""
    if mode not in MODES:
        raise ValueError(f"--target must be {'|'.join(MODES)}, got {mode!r}")
    if not 1 <= lo <= hi:
        raise ValueError(f"--target-min/--target-max must satisfy 1 <= min <= max, got {lo}..{hi}")
    if dist not in TARGET_DISTS:
        raise ValueError(f"--target-dist must be {'|'.join(TARGET_DISTS)}, got {dist!r}")
    if not 1 <= per_problem <= hi - lo + 1:
        raise ValueError(
            f"--targets-per-problem must be in 1..{hi - lo + 1} (the size of the target range), got {per_problem}"
        )


@dataclass
class TargetSampler:
    """Target lengths n_gold in lo..hi, drawn afresh per use from a seeded `random.Random`.

    dist "uniform" is the paper's n_gold ~ Uniform{lo, ..., hi}. "log-uniform" draws log(n_gold) uniformly in
    [log lo, log(hi + 1)) and floors: each doubling of the length gets the same share of the prompts, so a range like
    16..384 puts as many targets in 16..32 as in 192..384, where a uniform draw would put 4% there.
    """

    lo: int = 100
    hi: int = 4000
    seed: int = 0
    dist: str = "uniform"
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self):
        check_targets(self.lo, self.hi, self.dist)
        self._rng = random.Random(self.seed)

    def _draw(self, a: float, b: float) -> int:
        """One target from the slice [a, b) of the range, as a fraction of it (0 <= a < b <= 1)."""
        if self.dist == "uniform":
            width = self.hi - self.lo + 1
            return self._rng.randint(self.lo + int(a * width), self.lo + int(b * width) - 1)
        lo, hi = math.log(self.lo), math.log(self.hi + 1)
        return min(self.hi, int(math.exp(self._rng.uniform(lo + a * (hi - lo), lo + b * (hi - lo)))))

    def sample(self) -> int:
        return self._draw(0.0, 1.0)

    def sample_spread(self, k: int) -> list[int]:
        """`k` targets, one draw in each of k equal slices of the range (equal in log space for log-uniform)."""
        if self.dist == "uniform":  # integer slices, so that k up to the range's size gives k distinct targets
            width = self.hi - self.lo + 1
            return [self._rng.randint(self.lo + j * width // k, self.lo + (j + 1) * width // k - 1) for j in range(k)]
        return [self._draw(j / k, (j + 1) / k) for j in range(k)]

    def state_dict(self) -> dict:
        return {"lo": self.lo, "hi": self.hi, "dist": self.dist, "rng": _rng_state(self._rng)}

    def load_state_dict(self, state: dict) -> None:
        self.lo, self.hi, self.dist = state["lo"], state["hi"], state.get("dist", "uniform")
        _set_rng_state(self._rng, state["rng"])


def _rng_state(rng: random.Random) -> list:  # JSON / torch.save friendly
    return [rng.getstate()[0], list(rng.getstate()[1]), rng.getstate()[2]]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


def prompt_text(problem: Problem, target: int | None, mode: str) -> str:
    """The user message, the L1 sentences exactly; multiple choice says "(eg, A, B, C, D) within \\boxed{}"."""
    where = "(eg, A, B, C, D) within \\boxed{}" if problem.multiple_choice else "within \\boxed{}"
    text = f"{problem.question} Let's think step by step and output the final answer {where}."
    if mode == "none":
        return text
    if mode not in ("exact", "max"):
        raise ValueError(
            f"unknown prompt mode {mode!r}: expected exact, max or none (PromptStream turns --target mixed into "
            "exact or max per prompt)"
        )
    if target is None or target < 1:
        raise ValueError(f"mode {mode!r} needs a positive target length, got {target!r}")
    return text + (f" Think for {target} tokens." if mode == "exact" else f" Think for maximum {target} tokens.")


def format_prompt(tokenizer, problem: Problem, target: int | None, mode: str) -> str:
    """`prompt_text` wrapped in the tokenizer's chat template as one user turn, generation prompt appended."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template; "
            "use an instruct/chat model (or set tokenizer.chat_template)"
        )
    messages = [{"role": "user", "content": prompt_text(problem, target, mode)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@dataclass
class Sample:
    problem: Problem
    target: int | None
    mode: str  # "exact" | "max" | "none", never "mixed"
    prompt: str


class PromptStream:
    """Endless training batches: a seeded shuffle per epoch, a fresh target per use, exact resume."""

    def __init__(
        self,
        problems: list[Problem],
        *,
        mode: str = "exact",
        target_lo: int = 100,
        target_hi: int = 4000,
        seed: int = 0,
        targets_per_problem: int = 1,
        target_dist: str = "uniform",
    ):
        check_targets(target_lo, target_hi, target_dist, targets_per_problem, mode)
        if not problems:
            raise ValueError("PromptStream: no problems (empty dataset)")
        self.problems, self.mode, self.seed = list(problems), mode, seed
        self.targets_per_problem = targets_per_problem
        self.targets = TargetSampler(target_lo, target_hi, seed, target_dist)
        self._mode_rng = random.Random(f"mode:{seed}")  # L1-Max recipe: 50/50 exact/max per prompt
        self.epoch, self.position = 0, 0
        self._order = self._shuffle(0)

    def _shuffle(self, epoch: int) -> list[int]:
        return random.Random(f"shuffle:{self.seed}:{epoch}").sample(range(len(self.problems)), len(self.problems))

    def next_batch(self, n: int, tokenizer=None) -> list[Sample]:
        """`n` samples; with `tokenizer=None` the prompt is the plain user text (no chat template).

        With `targets_per_problem=k`, each problem appears k times in a row, with targets spread over the range
        (one per k-th of it): groups that differ only in the number they are asked for.
        """
        k = self.targets_per_problem
        if n % k:
            raise ValueError(f"batch of {n} prompts is not a multiple of --targets-per-problem {k}")
        out = []
        for _ in range(n // k):
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._shuffle(self.epoch)
            problem = self.problems[self._order[self.position]]
            self.position += 1
            for target in self.targets.sample_spread(k):
                mode = self._mode_rng.choice(("exact", "max")) if self.mode == "mixed" else self.mode
                target = None if mode == "none" else target
                prompt = (
                    format_prompt(tokenizer, problem, target, mode)
                    if tokenizer is not None
                    else prompt_text(problem, target, mode)
                )
                out.append(Sample(problem, target, mode, prompt))
        return out

    def state_dict(self) -> dict:
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "position": self.position,
            "num_problems": len(self.problems),
            "targets": self.targets.state_dict(),
            "mode_rng": _rng_state(self._mode_rng),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_problems"] != len(self.problems):
            raise ValueError(
                f"PromptStream state is for {state['num_problems']} problems, "
                f"this stream has {len(self.problems)} (different --data?)"
            )
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
        self._order = self._shuffle(self.epoch)
        self.targets.load_state_dict(state["targets"])
        _set_rng_state(self._mode_rng, state["mode_rng"])
