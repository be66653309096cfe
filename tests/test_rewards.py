"""rewards.py: LCPO rewards (exact values), answer extraction, equivalence, safety/time bounds, real gold answers."""
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import rewards
from rewards import (correctness_reward, extract_answer, grade, is_correct, lcpo_exact_reward, lcpo_max_reward,
                     length_reward, normalize_answer)

TIGHT = dict(abs=1e-12)


# ------------------------------------------------------------------------------------------ length rewards
def test_lcpo_max_reference_points():
    b = 2000
    assert lcpo_max_reward(True, b - 500, b) == pytest.approx(1.0, **TIGHT)   # 500 under
    assert lcpo_max_reward(True, b, b) == pytest.approx(0.5, **TIGHT)         # at budget
    assert lcpo_max_reward(True, b + 250, b) == pytest.approx(0.25, **TIGHT)  # 250 over
    assert lcpo_max_reward(True, b + 500, b) == pytest.approx(0.0, **TIGHT)   # 500 over
    assert lcpo_max_reward(True, b + 3000, b) == 0.0                          # clipped at 0
    for n_y in (b - 500, b, b + 250, b + 500, b + 3000, 1):
        assert lcpo_max_reward(False, n_y, b) == 0.0


def test_lcpo_exact_reference_points():
    assert lcpo_exact_reward(True, 1500, 1500) == pytest.approx(1.0, **TIGHT)
    assert lcpo_exact_reward(True, 2500, 1500) == pytest.approx(0.7, **TIGHT)
    assert lcpo_exact_reward(True, 500, 1500) == pytest.approx(0.7, **TIGHT)    # symmetric
    assert lcpo_exact_reward(False, 2500, 1500) == pytest.approx(-0.3, **TIGHT)
    assert lcpo_exact_reward(False, 6500, 1500) == pytest.approx(-1.5, **TIGHT)  # no clipping
    assert lcpo_exact_reward(True, 2500, 1500, alpha=1 / 3000) == pytest.approx(2 / 3, **TIGHT)  # original code


def test_correctness_and_dispatch():
    assert correctness_reward(True) == 1.0 and correctness_reward(False) == 0.0
    assert length_reward("none", True, 9999, None) == 1.0
    assert length_reward("exact", True, 2500, 1500) == pytest.approx(0.7, **TIGHT)
    assert length_reward("exact", True, 2500, 1500, alpha_exact=0.001) == pytest.approx(0.0, **TIGHT)
    assert length_reward("max", True, 2250, 2000) == pytest.approx(0.25, **TIGHT)
    assert length_reward("max", True, 2000, 2000, delta=0.3) == pytest.approx(0.3, **TIGHT)
    with pytest.raises(ValueError, match="mode"):
        length_reward("mixed", True, 1, 1)
    with pytest.raises(ValueError, match="n_gold"):
        length_reward("max", True, 1, None)


# --------------------------------------------------------------------------------------------- extraction
@pytest.mark.parametrize("response, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"<think>maybe \boxed{3}</think> final \boxed{4}", "4"),
    (r"<think>maybe \boxed{3}</think> no box here", None),
    (r"no think tag at all \boxed{7}", "7"),
    (r"\boxed{5}</think>a</think>\boxed{6}", "6"),  # after the FIRST </think>
    (r"answer \fbox{12}", "12"),
    (r"answer $\boxed 5$.", "5"),
    (r"\boxed{1} and a truncated \boxed{12", "1"),  # last brace-matched one
    (r"\boxed {8}", "8"),
    ("nothing", None),
    ("", None),
])
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


# ------------------------------------------------------------------------------------------- equivalence
EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"), (r"\frac{1}{2}", r"\dfrac12"), (r"\frac{1}{2}", "1/2"), (r"\frac{1}{2}", ".5"),
    (r"\frac{1}{2}", r"\tfrac{1}{2}"), ("8", "$8$"), ("8", "8.0"), ("8.0", "8"), ("1,000", "1000"),
    ("1000", r"1{,}000"), ("18", r"\$18"), ("18", "18."), ("25", "025"), ("90", r"90^\circ"), ("50", r"50\%"),
    ("10", r"10\text{ cm}"), ("6", r"6 \text{ m}^2"), (r"\text{(A)}", "A"), (r"\text{(C)}", r"\text{(C)}"),
    ("3", "x=3"), ("x=3", "3"), (r"\left( 3, \frac{\pi}{2} \right)", r"(3,\frac{\pi}{2})"),
    (r"\sqrt{2}", r"\sqrt2"), (r"\frac{\sqrt{3}}{2}", r"\sin(\pi/3)"), ("x+1", "1+x"), ("2x", "x \\cdot 2"),
    (r"(1,2]", r"(1, 2]"), (r"\{1,2\}", r"\{2,1\}"), (r"[-1, 3)", r"[-1,3)"), ("-7", "- 7"),
    (r"\pi", r"\pi"), ("3+2i", "2i+3"), (r"\infty", r"\infty"),
]
NOT_EQUIVALENT = [
    (r"\frac{1}{2}", "0.51"), ("8", "8.1"), ("1000", "100"), ("x+1", "x-1"), ("(1,2)", "[1,2]"), ("(1,2]", "(1,2)"),
    (r"\{1,2\}", r"\{1,3\}"), ("A", "B"), ("3", "-3"), (r"\frac{1}{2}", r"\frac{2}{1}"), ("18", ""),
    (r"\sqrt{2}", "2"), ("12", "x=12.5"), (r"\pi", "3.14"),
]


def test_equivalent_pairs():
    golds, preds = zip(*EQUIVALENT)
    res = grade([rf"The answer is \boxed{{{p}}}." for p in preds], list(golds))
    assert [pair for pair, ok in zip(EQUIVALENT, res) if not ok] == []


def test_non_equivalent_pairs():
    golds, preds = zip(*NOT_EQUIVALENT)
    res = grade([rf"The answer is \boxed{{{p}}}." for p in preds], list(golds))
    assert [pair for pair, ok in zip(NOT_EQUIVALENT, res) if ok] == []


def test_normalize_answer():
    assert normalize_answer(r"\$1,000.") == "1000"
    assert normalize_answer(r"\left( 3, \frac{\pi}{2} \right)") == r"(3,\frac{\pi}{2})"
    assert normalize_answer(r"3 \text{ and } 5") == "3and5"  # words that are not a trailing unit stay
    assert normalize_answer("x" * (rewards.MAX_ANSWER_CHARS + 1)) is None


@pytest.mark.parametrize("response, gold, expected", [
    (r"\boxed{B}", "B", True), (r"\boxed{\text{(C)}}", "C", True), (r"\boxed{(D)}", "(D)", True),
    ("I think the answer is (B).", "B", True), ("A or C? Final: D", "D", True), (r"\boxed{B}", "C", False),
    ("no letter here", "A", False), (r"<think>B</think> so C", "C", True), (r"\boxed{B. 42}", "B", True),
])
def test_multiple_choice(response, gold, expected):
    assert is_correct(response, gold, multiple_choice=True) is expected


@pytest.mark.parametrize("response, expected", [
    ("So, the answer is 20.", "20"),
    ("6 - 4 = 2\n\nThe final answer is 2.", "2"),
    ("She has 1,234 coins and spends -3.5", "-3.5"),
    ("Total: 12,500 dollars.", "12500"),
    ("<think>I guess 7</think> The answer is 9", "9"),
    ("no digits here", None),
    ("", None),
])
def test_last_number(response, expected):
    assert rewards.last_number(response) == expected


def test_last_number_fallback_only_when_asked_and_only_without_boxed():
    responses = ["So, the answer is 20.", "So, the answer is 20.", "\\boxed{19} then 20", "I think 1,000"]
    golds = ["20", "19", "20", "1000"]
    assert grade(responses, golds) == [False, False, False, False]
    assert grade(responses, golds, last_number_fallback=True) == [True, False, False, True]  # \boxed wins


def test_grade_mixed_flags_and_length_check():
    assert grade([r"\boxed{A}", r"\boxed{4}"], ["A", "4"], [True, False]) == [True, True]
    with pytest.raises(ValueError, match="responses"):
        grade(["a"], ["a", "b"])


# ------------------------------------------------------------------------------- safety and time bounds
def _pathological(marker: Path):
    return [
        "x" * 100_000,
        "\\boxed{" * 10_000 + "1" + "}" * 10_000,
        "{" * 10_000 + "\\boxed{" + "{" * 10_000,
        "\\boxed{1}" * 20_000,  # 180 KB, ends with a valid box: graded (wrong against gold 3) but fast
        r"\boxed{9^{9^{9^{9}}}}",
        r"\boxed{9^9^9^9}",
        r"\boxed{\frac{1}{0}}",
        r"\boxed{(10^{8})!}",
        rf"\boxed{{__import__('os').system('touch {marker}')}}",
        r"\boxed{().__class__.__bases__[0].__subclasses__()}",
        rf"\boxed{{eval(\"__import__('os').system('touch {marker}')\")}}",
        rf"\boxed{{exec(open('{marker}','w'))}}",
    ]


def _grade_each_timed(responses, timeout):
    out = []
    for r in responses:
        t = time.monotonic()
        ok = is_correct(r, "3", timeout=timeout)
        out.append((ok, time.monotonic() - t))
    return out


TIMEOUT = 2.0


def _check(results, marker):
    assert [ok for ok, _ in results] == [False] * len(results)
    slow = [dt for _, dt in results if dt > TIMEOUT + 2.0]
    assert slow == []
    assert not marker.exists()


def test_pathological_main_thread(tmp_path):
    marker = tmp_path / "pwned"
    _check(_grade_each_timed(_pathological(marker), TIMEOUT), marker)


def test_pathological_in_thread(tmp_path):
    marker = tmp_path / "pwned"
    box = {}
    th = threading.Thread(target=lambda: box.setdefault("r", _grade_each_timed(_pathological(marker), TIMEOUT)))
    th.start()
    th.join(120)
    _check(box["r"], marker)


def test_pathological_in_daemonic_worker(tmp_path):
    marker = tmp_path / "pwned"
    with multiprocessing.get_context("spawn").Pool(1) as pool:  # pool workers are daemonic
        results = pool.apply_async(_grade_each_timed, (_pathological(marker), TIMEOUT)).get(120)
        ok = pool.apply(is_correct, (r"\boxed{\sin(\pi/6)}", r"\frac{1}{2}"))  # symbolic path works there
    _check(results, marker)
    assert ok is True


def test_hung_child_is_killed_within_timeout():
    assert is_correct(r"\boxed{\sin(\pi/6)}", r"\frac{1}{2}")  # child is up
    pid = rewards._SYMBOLIC.proc.pid
    os.kill(pid, signal.SIGSTOP)  # simulate a hang no in-child timer can interrupt
    t = time.monotonic()
    assert is_correct(r"\boxed{\sin(\pi/6)}", r"\frac{1}{2}", timeout=1.0) is False
    assert time.monotonic() - t < 1.0 + 1.0
    assert rewards._SYMBOLIC.proc is None  # killed, restarted lazily
    assert is_correct(r"\boxed{\sin(\pi/6)}", r"\frac{1}{2}") is True
    assert rewards._SYMBOLIC.proc.pid != pid


def test_grading_process_that_cannot_start_is_a_clear_error():
    """A child that dies before "ready" (e.g. math-verify not importable) raises with its stderr, instead of
    grading every symbolic item wrong at the cost of one failed start each."""
    sym = rewards._Symbolic()
    sym.cmd = [sys.executable, "-c", "import sys; sys.stderr.write('No module named math_verify'); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with code 3 before it was ready:\nNo module named math_verify"):
        sym.check("x+1", "1+x", 5.0)


def test_grading_process_sees_the_parents_import_path(tmp_path, monkeypatch):
    """`python -I` ignores PYTHONPATH (packages installed with pip --target, as on the GPU machine): the child
    gets the parent's sys.path. A stand-in math_verify first on the parent's path calls everything equal."""
    fake = tmp_path / "math_verify"
    fake.mkdir()
    (fake / "__init__.py").write_text("class LatexExtractionConfig:\n    def __init__(self, **kw): pass\n"
                                      "def parse(text, *a, **kw): return [text]\n"
                                      "def verify(g, p, **kw): return True\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)] + sys.path)
    sym = rewards._Symbolic()
    try:
        assert sym.check("x+1", "y", 5.0) is True  # the real math-verify says False
    finally:
        sym._kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/<pid>/limits (Linux only)")
def test_child_memory_limit():
    assert is_correct(r"\boxed{\sin(\pi/6)}", r"\frac{1}{2}")
    limits = Path(f"/proc/{rewards._SYMBOLIC.proc.pid}/limits").read_text()
    line = next(l for l in limits.splitlines() if l.startswith("Max address space"))
    assert str(rewards.CHILD_MEMORY_BYTES) in line


def test_audit_hook_policy():
    rewards._audit("compile", (b"Integer (3 )", "<string>"))
    rewards._audit("compile", (b"from sympy import *", "<string>"))
    rewards._audit("compile", (b"x = 1", "/some/module.py"))  # imports from source
    rewards._audit("open", ("/x.py", "r", os.O_RDONLY))
    for event, args in [("compile", (b"__import__('os').system('x')", "<string>")),
                        ("compile", ("Integer(1).__class__", "<string>")), ("os.system", (b"touch x",)),
                        ("subprocess.Popen", ("sh", [], None, None)), ("open", ("/tmp/x", "w", os.O_WRONLY))]:
        with pytest.raises(PermissionError):
            rewards._audit(event, args)


def test_latex_config_never_evals_model_text():
    """The finding in rewards' docstring, checked: with LatexExtractionConfig, no string compiled by
    sympify/parse_expr contains the payload (recorded by an audit hook in a separate interpreter)."""
    code = r"""
import json, sys, rewards
rewards._symbolic_equal("3", "x + 0.5")  # lazy imports (namedtuples etc. compile '<string>' code) before recording
seen = []
sys.addaudithook(lambda e, a: seen.append(str(a[0])) if e == "compile" and a[1] in ("<string>", b"<string>") else None)
for p in [r"__import__('os').system('true')", r"().__class__.__bases__[0].__subclasses__()", r"x.__class__", "0.5", "7"]:
    rewards._symbolic_equal("3", p)
print(json.dumps(seen))
"""
    env = dict(os.environ, PYTHONPATH=str(Path(rewards.__file__).parent))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen, "the hook recorded nothing: the check would be vacuous"  # sympy.Number's own numeric eval
    assert [s for s in seen if any(m in s for m in ("__import__", "system(", "__class__", "__subclasses__"))] == []


# ---------------------------------------------------------------------------- real gold answers (done-criterion)
def _boxed(golds):
    return [rf"Let's see. The final answer is $\boxed{{{g}}}$." for g in golds]


def _failures(golds, preds=None, **kw):
    preds = golds if preds is None else preds
    res = grade(_boxed(preds), golds, **kw)
    return [(g, p) for g, p, ok in zip(golds, preds, res) if not ok]


def test_math500_gold_self_agreement(shared_dir):
    golds = [row["answer"] for row in json.loads((shared_dir / "data/math/math500.json").read_text())]
    assert len(golds) == 500
    assert _failures(golds) == []
    # and the symbolic path alone (math-verify in the child) also accepts every gold answer as itself
    with rewards._SYMBOLIC.lock:
        bad = [g for g in golds if not rewards._SYMBOLIC.check(g, g, 5.0)]
    assert bad == []


def test_gsm8k_gold_self_agreement(shared_dir):
    lines = (shared_dir / "data/gsm8k/test.jsonl").read_text().splitlines()
    golds = [json.loads(l)["answer"].split("#### ")[-1].strip() for l in lines]
    assert len(golds) == 1319
    assert _failures(golds) == []
    # the same numbers written as a model would: no thousands commas, with a dollar sign, as a float
    assert _failures(golds, [g.replace(",", "") for g in golds]) == []
    assert _failures(golds, [rf"\${g}" for g in golds]) == []
    assert _failures(golds, [f"{g.replace(',', '')}.00" for g in golds]) == []


def test_competition_gold_self_agreement(shared_dir):
    for name in ("amc", "aime2024"):
        golds = [str(row["answer"]) for row in json.loads((shared_dir / f"data/competition/{name}.json").read_text())]
        assert golds and _failures(golds) == []
        as_ints = [str(int(float(g))) if float(g).is_integer() else g for g in golds]  # AMC stores 142.0; AIME 025
        assert _failures(golds, as_ints) == []
