"""data.py: loaders on the real shared files, the arith task, targets, the exact L1 prompts, resume, bad input."""

import json
import logging
import math
import re

import pytest

import data
from data import Problem, PromptStream, TargetSampler, arithmetic_problems, format_prompt, load_problems, prompt_text

SHARED_COUNTS = {  # path under ../shared/data -> rows
    "gsm8k/train.jsonl": 7473,
    "gsm8k/test.jsonl": 1319,
    "math/math500.json": 500,
    "competition/amc.json": 83,
    "competition/aime2024.json": 30,
}
BOX = "Let's think step by step and output the final answer within \\boxed{}."


# ------------------------------------------------------------------------------------------ shared files
@pytest.mark.parametrize("rel,count", sorted(SHARED_COUNTS.items()))
def test_shared_file_loads(shared_dir, rel, count):
    problems = load_problems(str(shared_dir / "data" / rel))
    assert len(problems) == count
    assert all(p.question and p.answer and p.question == p.question.strip() for p in problems)
    assert len({p.id for p in problems}) == count


def test_math_train_has_four_rows_without_gold(shared_dir, caplog):
    """MATH train.json holds 7,474 rows, 4 with a null/empty answer (index 886, 1009, 5328, 5330)."""
    path = shared_dir / "data" / "math" / "train.json"
    with pytest.raises(ValueError, match=r"train\.json: row index 886: missing or empty 'answer'.*skip_bad"):
        load_problems(str(path))
    with caplog.at_level(logging.WARNING, logger="data"):
        problems = load_problems(str(path), skip_bad=True)
    assert len(problems) == 7470
    assert "skipped 4 bad rows" in caplog.text and "row index 886" in caplog.text
    assert problems[0].answer == "0" and problems[0].question.startswith("Let \\[f(x)")


def test_gsm8k_gold_normalization(shared_dir):
    path = shared_dir / "data" / "gsm8k" / "test.jsonl"
    raw = [json.loads(line) for line in path.read_text().splitlines()]
    problems = load_problems(str(path))
    assert problems[0].answer == "18"  # "... every day at the farmer’s market.\n#### 18"
    assert problems[0].question == raw[0]["question"]
    with_commas = [i for i, r in enumerate(raw) if re.search(r"#### .*\d,\d{3}", r["answer"])]
    assert len(with_commas) >= 10
    for i in with_commas:
        assert problems[i].answer == raw[i]["answer"].split("#### ")[1].replace(",", "").strip()
    assert any(raw[i]["answer"].endswith("#### 1,450,000") and problems[i].answer == "1450000" for i in with_commas)
    assert all(re.fullmatch(r"-?\d+", p.answer) for p in problems)


def test_competition_numeric_gold_is_a_string(shared_dir):
    amc = load_problems(str(shared_dir / "data" / "competition" / "amc.json"))
    assert amc[0].answer == "142"  # stored as the float 142.0
    aime = load_problems(str(shared_dir / "data" / "competition" / "aime2024.json"))
    assert aime[0].answer == "204" and aime[0].source == "competition/aime2024"


# --------------------------------------------------------------------------------- other local formats
def test_parquet_and_json_with_custom_fields(tmp_path):
    pd = pytest.importorskip("pandas")
    rows = [{"q": "What is 2+2?", "sol": "4"}, {"q": "What is 3*3?", "sol": 9}]
    pd.DataFrame(rows).astype({"sol": str}).to_parquet(tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows))  # jsonl inside a .json
    for name in ("d.parquet", "d.json", "lines.json"):
        problems = load_problems(str(tmp_path / name), question_field="q", answer_field="sol")
        assert [(p.question, p.answer) for p in problems] == [("What is 2+2?", "4"), ("What is 3*3?", "9")], name
    assert load_problems(
        str(tmp_path / "d.json"), question_field="q", answer_field="sol", limit=1, multiple_choice=True
    ) == [Problem("What is 2+2?", "4", tmp_path.name + "/d", tmp_path.name + "/d:0", True)]


def test_math_format_jsonl(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"problem": " Find $x$. ", "answer": "\\\\frac{1}{2}"}\n\n{"problem": "B", "answer": "3"}\n')
    problems = load_problems(str(path))
    assert [(p.question, p.answer) for p in problems] == [("Find $x$.", "\\frac{1}{2}"), ("B", "3")]


# ------------------------------------------------------------------------------------------- bad input
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_bad_rows_name_file_and_row(tmp_path, caplog):
    good = {"question": "Q", "answer": "1"}
    jl = _write_jsonl(tmp_path / "a.jsonl", [good, good, {"question": "  ", "answer": "2"}, good])
    with pytest.raises(ValueError, match=r"a\.jsonl: line 3: missing or empty 'question'"):
        load_problems(jl)
    js = tmp_path / "b.json"
    js.write_text(json.dumps([good, {"question": "Q"}]))
    with pytest.raises(ValueError, match=r"b\.json: row index 1: missing or empty 'answer'"):
        load_problems(str(js))
    gsm = _write_jsonl(tmp_path / "g.jsonl", [{"question": "Q", "answer": "x\n#### 5"}, good])
    with pytest.raises(ValueError, match=r"g\.jsonl: line 2: .*'answer' \(no \"#### \"\)"):
        load_problems(gsm)
    with caplog.at_level(logging.WARNING, logger="data"):
        assert [p.answer for p in load_problems(jl, skip_bad=True)] == ["1", "1", "1"]
    assert "a.jsonl: skipped 1 bad rows" in caplog.text and "line 3" in caplog.text
    bad_json = tmp_path / "c.jsonl"
    bad_json.write_text('{"question": "Q", "answer": "1"}\n{oops\n')
    with pytest.raises(ValueError, match=r"c\.jsonl: line 2: invalid JSON"):
        load_problems(str(bad_json))


def test_bad_files_and_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_problems(str(tmp_path / "nope.jsonl"))
    csv = tmp_path / "d.csv"
    csv.write_text("question,answer\nQ,1\n")
    with pytest.raises(ValueError, match=r"d\.csv: unknown data format '\.csv'"):
        load_problems(str(csv))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match=r"empty\.jsonl: dataset is empty"):
        load_problems(str(tmp_path / "empty.jsonl"))
    (tmp_path / "empty.json").write_text("[]")
    with pytest.raises(ValueError, match=r"empty\.json: dataset is empty"):
        load_problems(str(tmp_path / "empty.json"))
    f = _write_jsonl(tmp_path / "f.jsonl", [{"q": "Q", "a": "1"}])
    with pytest.raises(ValueError, match=r"f\.jsonl: no question field.*--question-field"):
        load_problems(f)
    with pytest.raises(ValueError, match=r"f\.jsonl: answer field 'ans' \(--answer-field\) not found"):
        load_problems(f, question_field="q", answer_field="ans")
    assert load_problems(f, question_field="q", answer_field="a")[0].answer == "1"


def test_bad_input_on_purpose(tmp_path, caplog):
    """Each malformed input is an error naming the file and the row or field, or with skip_bad a count in the log."""
    good = json.dumps({"question": "Q", "answer": "1"})
    cases = {
        "malformed.jsonl": (good + "\n{oops\n" + good, r"malformed\.jsonl: line 2: invalid JSON"),
        "type.jsonl": (
            good + "\n" + json.dumps({"question": 7, "answer": "1"}),
            r"type\.jsonl: line 2: 'question' is a int, not text",
        ),
        "answer_type.jsonl": (
            good + "\n" + json.dumps({"question": "Q", "answer": ["1"]}),
            r"answer_type\.jsonl: line 2: 'answer' is a list, not text or a number",
        ),
        "row.jsonl": (good + "\n[1, 2]", r"row\.jsonl: line 2: a list, not an object"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match=match):
            load_problems(str(tmp_path / name))
        with caplog.at_level(logging.WARNING, logger="data"):
            assert len(load_problems(str(tmp_path / name), skip_bad=True)) == text.count("\n")  # all but one
        assert f"{name}: skipped 1 bad rows (--skip-bad), first: line 2" in caplog.text
        caplog.clear()
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b'\n{"question": "caf\xe9", "answer": "1"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl: line 2: not UTF-8 \(byte 0xe9 at column 18\)"):
        load_problems(str(tmp_path / "latin1.jsonl"))
    assert len(load_problems(str(tmp_path / "latin1.jsonl"), skip_bad=True)) == 1
    (tmp_path / "latin1.json").write_bytes(b'[{"question": "Q",\n "answer": "caf\xe9"}]')
    with pytest.raises(ValueError, match=r"latin1\.json: line 2: not UTF-8 \(byte 0xe9 at offset 34\)"):
        load_problems(str(tmp_path / "latin1.json"))
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty\.jsonl: dataset is empty"):
        load_problems(str(tmp_path / "empty.jsonl"))
    huge = "How many? " + "x" * 3_000_000  # a row of megabytes loads (grpo.py then drops it as over the prompt limit)
    _write_jsonl(tmp_path / "huge.jsonl", [{"question": huge, "answer": "1"}, {"question": "Q", "answer": "2"}])
    assert [len(p.question) for p in load_problems(str(tmp_path / "huge.jsonl"))] == [len(huge), 1]


def test_parquet_with_missing_columns_and_a_hub_name_offline(tmp_path, monkeypatch):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"problem": ["Q"], "solution": ["1"]}), tmp_path / "cols.parquet")
    with pytest.raises(
        ValueError,
        match=r"cols\.parquet: no answer field among \['answer'\]; fields: "
        r"\['problem', 'solution'\]; name it with .*--answer-field",
    ):
        load_problems(str(tmp_path / "cols.parquet"))
    assert load_problems(str(tmp_path / "cols.parquet"), answer_field="solution")[0].answer == "1"
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot read it as parquet"):
        load_problems(str(tmp_path / "broken.parquet"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache: nothing to fall back on
    with pytest.raises(
        ValueError,
        match=r"--data no-such-org/no-such-dataset: not a local file, and the hub "
        r"dataset could not be loaded .*offline, a local",
    ):
        load_problems("no-such-org/no-such-dataset")


def test_bad_targets_and_modes():
    for lo, hi in [(500, 100), (0, 10), (-5, 10)]:
        with pytest.raises(ValueError, match=r"--target-min/--target-max must satisfy 1 <= min <= max"):
            TargetSampler(lo, hi)
    p = Problem("Q", "1", "t", "t:0")
    with pytest.raises(ValueError, match=r"--target must be exact\|max\|none\|mixed, got 'short'"):
        PromptStream([p], mode="short")
    with pytest.raises(ValueError, match=r"unknown prompt mode 'mixed': expected exact, max or none"):
        prompt_text(p, 100, "mixed")
    with pytest.raises(ValueError, match=r"'exact' needs a positive target"):
        prompt_text(p, None, "exact")
    with pytest.raises(ValueError, match="no problems"):
        PromptStream([], mode="exact")
    with pytest.raises(ValueError, match=r"arith:x"):
        load_problems("arith:x")


# ------------------------------------------------------------------------------------------------ arith
def _solve(question: str) -> tuple[int, int]:
    """Recompute an arith answer from the text alone: (answer, number of operations)."""
    body = question.rsplit(". How many ", 1)[0]
    first, *rest = body.split(". Then ")
    x, phrase = re.fullmatch(r"[A-Z][a-z]+ has (\d+) [a-z]+ and (.*)", first).groups()
    x, phrases = int(x), [phrase] + [r.split(" ", 1)[1] for r in rest]  # drop the pronoun
    for ph in phrases:
        k = int(re.search(r"\d+", ph).group())
        if "times as" in ph:
            x *= k
        elif "equal parts" in ph:
            assert x % k == 0, question
            x //= k
        elif ph.split()[0] in ("buys", "picks", "gets", "finds", "wins", "earns"):
            x += k
        else:
            assert ph.split()[0] in ("eats", "gives", "sells", "spends", "loses", "pays"), question
            x -= k
        assert x >= 0, question
    return x, len(phrases)


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_arith_answers_are_correct(difficulty):
    problems = arithmetic_problems(300, seed=3, difficulty=difficulty)
    assert len({p.question for p in problems}) == 300
    for p in problems:
        assert _solve(p.question) == (int(p.answer), difficulty)
        assert p.source == f"arith:{difficulty}" and not p.multiple_choice
    assert len({p.answer for p in problems}) > 10


def test_arith_deterministic_and_difficulty_knob():
    a = load_problems("arith", n=50, seed=1)
    assert a == load_problems("arith", n=50, seed=1) == load_problems("arith:1", n=50, seed=1)
    assert a != load_problems("arith", n=50, seed=2)
    assert load_problems("arith:2", n=50, seed=1) == load_problems("arith", n=50, seed=1, difficulty=2)
    assert {q.question for q in load_problems("arith:2", n=50, seed=1)}.isdisjoint(q.question for q in a)
    assert a[0].question.count(". Then ") == 0
    assert len(load_problems("arith", limit=7)) == 7
    with pytest.raises(ValueError, match="difficulty given twice"):
        load_problems("arith:2", difficulty=3)


def test_arith_train_and_test_are_disjoint():
    for d in (1, 2):
        train = {p.question for p in load_problems(f"arith:{d}", n=2000, split="train")}
        test = {p.question for p in load_problems(f"arith:{d}", n=300, split="test")}
        assert len(train) == 2000 and len(test) == 300 and train.isdisjoint(test)
    # other seeds draw from the same partition: still disjoint
    other = {p.question for p in load_problems("arith", n=300, split="test", seed=7)}
    assert other.isdisjoint(p.question for p in load_problems("arith", n=2000, split="train", seed=8))


# -------------------------------------------------------------------------------------------- prompts
def test_prompt_text_is_exact():
    p = Problem("What is 2+3?", "5", "t", "t:0")
    assert prompt_text(p, 512, "exact") == f"What is 2+3? {BOX} Think for 512 tokens."
    assert prompt_text(p, 512, "max") == f"What is 2+3? {BOX} Think for maximum 512 tokens."
    assert prompt_text(p, None, "none") == f"What is 2+3? {BOX}"
    assert prompt_text(p, 512, "none") == f"What is 2+3? {BOX}"
    assert (
        prompt_text(p, 512, "exact") == "What is 2+3? Let's think step by step and output the final answer "
        "within \\boxed{}. Think for 512 tokens."
    )
    mc = Problem("Which? A) 1 B) 2", "B", "t", "t:1", multiple_choice=True)
    assert (
        prompt_text(mc, 1024, "max") == "Which? A) 1 B) 2 Let's think step by step and output the final answer "
        "(eg, A, B, C, D) within \\boxed{}. Think for maximum 1024 tokens."
    )
    assert prompt_text(mc, None, "none").endswith("final answer (eg, A, B, C, D) within \\boxed{}.")


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(embedded_model_dir)


def test_format_prompt_uses_chat_template(tokenizer):
    p = Problem("What is 2+3?", "5", "t", "t:0")
    text = format_prompt(tokenizer, p, 300, "exact")
    user = f"What is 2+3? {BOX} Think for 300 tokens."
    assert text == tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True
    )
    assert f"<|im_start|>user\n{user}<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    batch = PromptStream([p], mode="max", seed=0).next_batch(2, tokenizer)
    assert batch[0].prompt == format_prompt(tokenizer, p, batch[0].target, "max")


def test_format_prompt_without_chat_template():
    class NoTemplate:
        chat_template = None
        name_or_path = "base-model"

    with pytest.raises(ValueError, match="'base-model' has no chat template"):
        format_prompt(NoTemplate(), Problem("Q", "1", "t", "t:0"), 100, "exact")


# ---------------------------------------------------------------------------------- targets and stream
def test_target_sampler_range_seed_and_resume():
    s = TargetSampler(seed=5)
    draws = [s.sample() for _ in range(2000)]
    assert min(draws) >= 100 and max(draws) <= 4000 and len(set(draws)) > 1000
    assert min(draws) < 200 and max(draws) > 3900
    same, other = TargetSampler(seed=5), TargetSampler(seed=6)
    assert draws == [same.sample() for _ in range(2000)]
    assert draws != [other.sample() for _ in range(2000)]
    small = TargetSampler(7, 9, seed=0)
    assert {small.sample() for _ in range(200)} == {7, 8, 9}
    a = TargetSampler(seed=1)
    [a.sample() for _ in range(10)]
    state = json.loads(json.dumps(a.state_dict()))  # survives a JSON round trip
    b = TargetSampler(seed=99)
    b.load_state_dict(state)
    assert [a.sample() for _ in range(20)] == [b.sample() for _ in range(20)]


def test_log_uniform_targets_give_each_doubling_the_same_share():
    s = TargetSampler(16, 383, seed=3, dist="log-uniform")  # 16..383: 16-31, 32-63, ..., 256-383 (log2 24 = 4.58)
    draws = [s.sample() for _ in range(20000)]
    assert min(draws) == 16 and max(draws) == 383
    share = [sum(lo <= d < 2 * lo for d in draws) / len(draws) for lo in (16, 32, 64, 128)]
    assert all(abs(x - 1 / math.log2(24)) < 0.015 for x in share), share  # 0.218 each
    uniform = TargetSampler(16, 383, seed=3)
    assert sum(16 <= uniform.sample() < 32 for _ in range(20000)) / 20000 < 0.05  # uniform: 16 / 368 = 4%
    # k = 4: one draw in each quarter of [log 16, log 384)
    edges = [16 * 24 ** (j / 4) for j in range(5)]  # 16, 35.3, 78.4, 173.4, 384
    for _ in range(200):
        spread = s.sample_spread(4)
        assert all(int(edges[j]) <= t <= edges[j + 1] for j, t in enumerate(spread)), spread
    state = json.loads(json.dumps(s.state_dict()))
    resumed = TargetSampler(seed=0)
    resumed.load_state_dict(state)
    assert resumed.dist == "log-uniform" and [s.sample() for _ in range(20)] == [resumed.sample() for _ in range(20)]
    stream = PromptStream(arithmetic_problems(4), target_lo=16, target_hi=383, seed=3, target_dist="log-uniform")
    reference = TargetSampler(16, 383, seed=3, dist="log-uniform")
    assert [x.target for x in stream.next_batch(4)] == [reference.sample() for _ in range(4)]
    with pytest.raises(ValueError, match=r"--target-dist must be uniform\|log-uniform, got 'normal'"):
        TargetSampler(dist="normal")


def test_stream_epochs_and_fresh_targets():
    problems = arithmetic_problems(10, seed=0)
    stream = PromptStream(problems, mode="exact", target_lo=100, target_hi=4000, seed=0)
    e0, e1 = stream.next_batch(10), stream.next_batch(10)
    assert sorted(s.problem.id for s in e0) == sorted(s.problem.id for s in e1) == sorted(p.id for p in problems)
    assert [s.problem.id for s in e0] != [s.problem.id for s in e1]  # reshuffled per epoch
    assert stream.epoch == 1
    assert all(s.mode == "exact" and 100 <= s.target <= 4000 for s in e0 + e1)
    assert all(s.prompt == prompt_text(s.problem, s.target, "exact") for s in e0)
    single = PromptStream(problems[:1], mode="max", seed=0).next_batch(20)  # same problem, fresh targets
    assert len({s.target for s in single}) > 15
    none = PromptStream(problems, mode="none", seed=0).next_batch(5)
    assert all(s.target is None and s.mode == "none" for s in none)


def test_stream_targets_per_problem_spreads_targets():
    problems = arithmetic_problems(10, seed=0)
    batch = PromptStream(problems, mode="exact", target_lo=32, target_hi=128, seed=3, targets_per_problem=2).next_batch(
        2000
    )
    pairs = [batch[i : i + 2] for i in range(0, len(batch), 2)]
    assert all(lo.problem.id == hi.problem.id for lo, hi in pairs)  # the same problem, twice in a row
    assert all(32 <= lo.target <= 79 and 80 <= hi.target <= 128 for lo, hi in pairs)  # one target per half of 32..128
    assert {lo.target for lo, _ in pairs} == set(range(32, 80)) and {hi.target for _, hi in pairs} == set(
        range(80, 129)
    )
    assert all(s.prompt == prompt_text(s.problem, s.target, "exact") for s in batch[:6])
    assert sorted(p[0].problem.id for p in pairs[:10]) == sorted(p.id for p in problems)  # one epoch = 10 problems
    # k=1 draws exactly the targets of one uniform draw per prompt, as before the option (old runs reproduce)
    sampler = TargetSampler(100, 4000, seed=5)
    assert [s.target for s in PromptStream(problems, seed=5, targets_per_problem=1).next_batch(30)] == [
        sampler.sample() for _ in range(30)
    ]
    three = PromptStream(problems, target_lo=1, target_hi=9, seed=0, targets_per_problem=3).next_batch(300)
    assert all(
        1 <= a.target <= 3 and 4 <= b.target <= 6 and 7 <= c.target <= 9
        for a, b, c in (three[i : i + 3] for i in range(0, 300, 3))
    )
    with pytest.raises(ValueError, match="not a multiple of --targets-per-problem 2"):
        PromptStream(problems, targets_per_problem=2).next_batch(3)
    with pytest.raises(ValueError, match="--targets-per-problem must be in 1..9"):
        PromptStream(problems, target_lo=1, target_hi=9, targets_per_problem=10)


def test_stream_mixed_mode():
    batch = PromptStream(arithmetic_problems(20), mode="mixed", seed=0).next_batch(400)
    modes = [s.mode for s in batch]
    assert set(modes) == {"exact", "max"} and 150 < modes.count("max") < 250
    for s in batch[:20]:
        assert s.prompt == prompt_text(s.problem, s.target, s.mode)


@pytest.mark.parametrize("mode", ["mixed", "exact"])
def test_stream_resume_is_exact(mode):
    problems = arithmetic_problems(7, seed=0)
    key = lambda batch: [(s.problem.id, s.target, s.mode, s.prompt) for s in batch]  # noqa: E731
    a = PromptStream(problems, mode=mode, target_lo=50, target_hi=5000, seed=11)
    for _ in range(3):
        a.next_batch(3)  # 9 samples: crosses an epoch boundary
    state = json.loads(json.dumps(a.state_dict()))
    expected = [key(a.next_batch(3)) for _ in range(2)]
    b = PromptStream(problems, mode=mode, target_lo=50, target_hi=5000, seed=11)
    b.load_state_dict(state)
    assert [key(b.next_batch(3)) for _ in range(2)] == expected
    c = PromptStream(problems, mode=mode, target_lo=50, target_hi=5000, seed=12)  # the state carries the seed
    c.load_state_dict(state)
    assert [key(c.next_batch(3)) for _ in range(2)] == expected
    with pytest.raises(ValueError, match="state is for 7 problems"):
        PromptStream(problems[:3], mode=mode, seed=11).load_state_dict(state)


def test_module_exports():
    assert data.MODES == ("exact", "max", "none", "mixed")


def test_hub_dataset_goes_through_datasets(monkeypatch):
    """Hub names go to datasets.load_dataset(name, config, split=...) (faked here: no network)."""
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(name, config=None, split=None):
        calls.append((name, config, split))
        return [{"question": "Q1", "answer": "step\n#### 1,000"}, {"question": "Q2", "answer": "#### 7"}]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_problems("openai/gsm8k", config="main", split="test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [(p.question, p.answer, p.id) for p in problems] == [
        ("Q1", "1000", "openai/gsm8k/test:0"),
        ("Q2", "7", "openai/gsm8k/test:1"),
    ]
