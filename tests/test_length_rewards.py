"""The length-reward family of rewards.py: L1's reference points, exact values on a hand-computed group, each paper's
edge cases, the group rewards against a plain loop over responses, HAPO's history, the repetition measure, the
--reward flag rules, and the registry (constants, defaults, state) that grpo.py's flags come from."""

import dataclasses
import inspect
import math
import random

import pytest

import rewards as R
from rewards import Group

TIGHT = dict(abs=1e-8)

# The hand-computed group: L = 100, T = 50; two correct (40 and 60 tokens, the second with 20 after its answer), a
# wrong boxed answer (30 tokens) and a response cut at the limit without an answer (100 tokens).
G4 = Group(
    correct=[True, True, False, False],
    lengths=[40, 60, 30, 100],
    repeated=[False, False, False, True],
    after=[0, 20, 0, 0],
    boxed=[True, True, True, False],
    target=50,
    mode="exact",
    limit=100,
    key="p0",
)
G4_MAX = dataclasses.replace(G4, mode="max")  # the same responses to "Think for maximum 50 tokens."


def reward(name, g=G4, history=None, **constants):
    base, length = R.score_group(name, g, constants, history)
    assert len(base) == len(length) == len(g.lengths)
    return [b + x for b, x in zip(base, length)], base, length


def approx(xs):
    return pytest.approx(xs, **TIGHT)


def group(correct, lengths, boxed=None, limit=100, target=50, key="p", mode="exact"):
    """A group whose responses repeat nothing and have nothing after their answer; each wrote a \\boxed{} answer
    unless `boxed` says otherwise."""
    return Group(
        correct=correct,
        lengths=lengths,
        repeated=[False] * len(correct),
        after=[0] * len(correct),
        boxed=boxed or [True] * len(correct),
        target=target,
        mode=mode,
        limit=limit,
        key=key,
    )


def single(correct, n, target=None, mode="none", limit=10_000, key="p") -> Group:
    """A group of one response (`group`)."""
    return group([correct], [n], limit=limit, target=target, key=key, mode=mode)


# ------------------------------------------------------------------------------------- L1's reference points
def _one(name, correct, n, target, mode="exact", **constants):
    """The reward of one response (its correctness term plus its length term), limit 10,000."""
    g = single(correct, n, target, mode)
    base, length = R.score_group(name, g, constants)
    return base[0] + length[0]


def test_lcpo_max_reference_points():
    b = 2000
    assert _one("lcpo-max", True, b - 500, b) == pytest.approx(1.0, abs=1e-12)  # 500 under
    assert _one("lcpo-max", True, b, b) == pytest.approx(0.5, abs=1e-12)  # at budget
    assert _one("lcpo-max", True, b + 250, b) == pytest.approx(0.25, abs=1e-12)  # 250 over
    assert _one("lcpo-max", True, b + 500, b) == pytest.approx(0.0, abs=1e-12)  # 500 over
    assert _one("lcpo-max", True, b + 3000, b) == 0.0  # clipped at 0
    for n_y in (b - 500, b, b + 250, b + 500, b + 3000, 1):
        assert _one("lcpo-max", False, n_y, b) == 0.0


def test_lcpo_exact_reference_points():
    assert _one("lcpo-exact", True, 1500, 1500) == pytest.approx(1.0, abs=1e-12)
    assert _one("lcpo-exact", True, 2500, 1500) == pytest.approx(0.7, abs=1e-12)
    assert _one("lcpo-exact", True, 500, 1500) == pytest.approx(0.7, abs=1e-12)  # symmetric
    assert _one("lcpo-exact", False, 2500, 1500) == pytest.approx(-0.3, abs=1e-12)
    assert _one("lcpo-exact", False, 6500, 1500) == pytest.approx(-1.5, abs=1e-12)  # no clipping
    original_code = _one("lcpo-exact", True, 2500, 1500, alpha_exact=1 / 3000)
    assert original_code == pytest.approx(2 / 3, abs=1e-12)


def test_lcpo_follows_the_prompts_sentence():
    """--reward lcpo scores each prompt by its own sentence (exact or max), as the L1-Max recipe's mixed prompts
    need; it refuses a prompt without a target."""
    assert _one("lcpo", True, 2500, 1500, "exact") == pytest.approx(0.7, abs=1e-12)
    assert _one("lcpo", True, 2250, 2000, "max") == pytest.approx(0.25, abs=1e-12)
    assert _one("lcpo", False, 2250, 2000, "max") == 0.0
    g = single(True, 9999)
    assert R.score_group("correctness", g, {}) == ([1.0], [0.0])
    with pytest.raises(ValueError, match="--reward lcpo needs a target length in the prompt.*--target none"):
        R.score_group("lcpo", g, {})
    with pytest.raises(ValueError, match="--reward must be one of"):
        R.score_group("shortest", g, {})


# ---------------------------------------------------------------------------------------------- the family


COS = {n: math.cos(math.pi * n / 100) for n in (30, 40, 60, 100)}


@pytest.mark.parametrize(
    "name, constants, rewards, base",
    [
        ("lcpo-exact", dict(alpha_exact=0.01), [0.9, 0.9, -0.2, -0.5], [1, 1, 0, 0]),  # c - 0.01 |50 - n|
        ("lcpo-max", dict(alpha_max=0.01), [0.6, 0.4, 0.0, 0.0], [1, 1, 0, 0]),  # c clip(0.01 (50 - n) + 0.5, 0, 1)
        ("correctness", {}, [1, 1, 0, 0], [1, 1, 0, 0]),
        ("dapo", dict(dapo_cache=20), [1, 1, -1, -2], [1, 1, -1, -1]),  # +-1, then (80 - n) / 20 past 80: -1 at 100
        (
            "laser",
            dict(laser_budget=50),
            [1.5, 1, -0.5, -1],
            [1, 1, -0.5, -1],
        ),  # R0 +1 / -0.5 / -1 (no box), +0.5 if n <= 50
        (
            "thinkprune",
            dict(thinkprune_cap=50),
            [1, 0, 0, 0],
            [1, 1, 0, 0],
        ),  # the 60-token correct answer is over the cap
        (
            "cosine",
            {},
            [
                0.5 + 0.25 * (1 + COS[40]),
                0.5 + 0.25 * (1 + COS[60]),
                -0.5 - 0.25 * (1 + COS[30]),
                -0.5 - 0.25 * (1 + COS[100]),
            ],
            [1.0, 1.0, -1.0, -1.0],
        ),
        # lambda = 0.5 - (n - 30) / 70: 5/14, 1/14, 0.5, -0.5; correct + 0.5 lambda, wrong 0.5 min(0, lambda)
        ("kimi", dict(kimi_weight=0.5), [1 + 5 / 28, 1 + 1 / 28, 0.0, -0.25], [1, 1, 0, 0]),
        # correct lengths 40, 60 (the cut one is wrong): mean 50, population std 10, z = -1, +1
        (
            "efficient",
            dict(efficient_alpha=0.1),
            [1 - 0.1 / (1 + math.e), 1 - 0.1 / (1 + math.exp(-1)), 0, 0],
            [1, 1, 0, 0],
        ),
        (
            "shorterbetter",
            dict(shorterbetter_a=2.0, shorterbetter_b=0.01),
            [2.0, 1.8, -0.1, -0.6],
            [2, 2, 0, 0],
        ),  # SOL = 40
        # correct: sample std 10 sqrt(2), z = -+1/sqrt(2); wrong boxed -1, no answer 0
        (
            "grpo-lead",
            dict(lead_alpha=0.05),
            [math.exp(0.05 / math.sqrt(2)), math.exp(-0.05 / math.sqrt(2)), -1.0, 0.0],
            [1, 1, -1, 0],
        ),
        ("alp", dict(alp_beta=0.5), [0.9, 0.85, -0.075, -0.25], [1, 1, 0, 0]),  # half solved: 0.5 * 0.5 * n / 100
    ],
)
def test_exact_values_on_a_hand_computed_group(name, constants, rewards, base):
    r, b, _ = reward(name, **constants)
    assert r == approx(rewards) and b == approx(base)


def test_hapo_values_and_history():
    # h unset: no length term
    assert reward("hapo", history=R.HapoHistory())[0] == approx([1, 1, 0, 0])
    history = R.HapoHistory()
    history.update({"p0": 50})
    f = [math.cos(math.pi / 2 * n / 50) for n in (40, 60, 30)]  # n < 2h; n = 100 = 2h gives -1
    r, _, _ = reward("hapo", history=history, hapo_weight=1.0)
    assert r == approx([1 + f[0], 1 + max(-0.7, f[1]), min(0.0, f[2]), -1.0])
    assert f[2] > 0 and f[1] < 0  # so the clips matter: a wrong short answer gets 0, not a bonus
    far = single(True, 90, limit=100, key="p0")
    assert reward("hapo", far, history=history)[0] == approx([1 - 0.7])  # cos(0.9 pi) = -0.95, clipped at -0.7
    # the history keeps the shortest correct length per problem, across steps and ranks
    assert history.shortest_correct([G4]) == {"p0": 40}
    history.update(history.shortest_correct([G4]))
    history.update({"p0": 45, "p1": 7})
    assert history.h == {"p0": 40, "p1": 7}
    again = R.HapoHistory()
    again.load_state_dict(history.state_dict())
    assert again.h == history.h
    # after a step it takes every rank's groups (gather): the shortest over all of them
    history.after_step([G4], gather=lambda mine: [mine, {"p0": 30, "p9": 5}])
    assert history.h == {"p0": 30, "p1": 7, "p9": 5}


def test_defaults_at_our_scale():
    """A length constant of 0 is derived from the limit L (100 here) as each docstring says."""
    assert reward("dapo")[0] == reward("dapo", dapo_cache=20)[0]  # L // 5
    assert reward("laser")[0] == reward("laser", laser_budget=25)[0]  # L // 4: no correct answer is that short
    assert reward("thinkprune")[0] == reward("thinkprune", thinkprune_cap=75)[0] == approx([1, 1, 0, 0])
    assert reward("cosine")[0] == reward("cosine", cosine_len=100)[0]
    assert reward("shorterbetter")[0] == approx(reward("shorterbetter", shorterbetter_b=0.06)[0])  # 0.001 * 6000 / L
    # LCPO's defaults are the paper's
    assert reward("lcpo-exact")[0] == approx([1 - 0.003, 1 - 0.003, -0.006, -0.015])


def test_edge_cases_each_paper_defines():
    none_right = group([False] * 3, [10, 20, 30])
    assert reward("efficient", none_right)[0] == [0, 0, 0]
    assert reward("shorterbetter", none_right, shorterbetter_b=0.1)[0] == approx(
        [-1.0, 0.0, -1.0]
    )  # SOL = the mean length, 20
    assert reward("grpo-lead", none_right)[0] == [-1, -1, -1]
    assert reward("kimi", none_right, kimi_weight=1.0)[0] == approx([0, 0, -0.5])  # wrong: only the penalty side
    assert reward("alp", none_right, alp_beta=1.0)[0] == approx([-0.1 / 3, -0.2 / 3, -0.1])  # p_solved floored at 1/G
    equal = group([True, False, True], [20, 20, 20])
    assert reward("kimi", equal)[0] == [1, 0, 1]  # lambda = 0 when all lengths are equal
    assert reward("efficient", equal, efficient_alpha=0.1)[0] == approx([0.95, 0, 0.95])  # z = 0: 1 - alpha / 2
    assert reward("grpo-lead", equal)[0] == approx([1, -1, 1])
    single = group([False, True, False], [10, 20, 30])
    assert reward("efficient", single, efficient_alpha=0.1)[0] == approx([0, 0.95, 0])
    assert reward("grpo-lead", single)[0] == approx([-1, 1, -1])  # std taken as 1: z = 0
    assert reward("shorterbetter", single, shorterbetter_b=0.1)[0] == approx([-1.0, 2.0, -1.0])  # SOL = its own length
    cut = group([True, True], [50, 100])  # the second ran into the limit
    assert reward("efficient", cut, efficient_alpha=0.1)[0] == approx([0.95, 0])  # cut: 0, and not in the statistics
    assert reward("dapo", cut)[0] == approx([1, 0])
    assert reward("thinkprune", cut)[0] == approx([1, 0])
    assert reward("cosine", cut)[0] == approx([0.75, 0.5])


def _loop_reference(name, g: Group, **k):
    """The group rewards written as a plain loop over responses, straight from the papers' equations."""
    out = []
    right = [n for n, c in zip(g.lengths, g.correct) if c]
    for c, n in zip(g.correct, g.lengths):
        if name == "kimi":
            lo, hi = min(g.lengths), max(g.lengths)
            lam = 0.0 if lo == hi else 0.5 - (n - lo) / (hi - lo)
            out.append(float(c) + k["kimi_weight"] * (lam if c else min(0.0, lam)))
        elif name == "efficient":
            ok = [m for m, cc in zip(g.lengths, g.correct) if cc and m < g.limit]
            if not (c and n < g.limit):
                out.append(0.0)
                continue
            mean = sum(ok) / len(ok)
            std = math.sqrt(sum((m - mean) ** 2 for m in ok) / len(ok))
            out.append(1 - k["efficient_alpha"] / (1 + math.exp(-(n - mean) / (std + 1e-7))))
        elif name == "shorterbetter":
            sol = min(right) if right else sum(g.lengths) / len(g.lengths)
            out.append(k["shorterbetter_a"] * c - k["shorterbetter_b"] * abs(n - sol))
        elif name == "grpo-lead":
            if not c:
                out.append(-1.0)
                continue
            mean = sum(right) / len(right)
            std = math.sqrt(sum((m - mean) ** 2 for m in right) / (len(right) - 1)) if len(right) > 1 else 1.0
            out.append(math.exp(-k["lead_alpha"] * (n - mean) / (std + 1e-6)))
        elif name == "alp":
            out.append(float(c) - k["alp_beta"] * max(len(right) / len(g.correct), 1 / len(g.correct)) * n / g.limit)
    return out


@pytest.mark.parametrize(
    "name, k",
    [
        ("kimi", dict(kimi_weight=0.7)),
        ("efficient", dict(efficient_alpha=0.3)),
        ("shorterbetter", dict(shorterbetter_a=2.0, shorterbetter_b=0.02)),
        ("grpo-lead", dict(lead_alpha=0.05)),
        ("alp", dict(alp_beta=0.4)),
    ],
)
def test_group_rewards_against_a_loop(name, k):
    rng = random.Random(0)
    for _ in range(200):
        size = rng.randint(1, 8)
        g = group([rng.random() < 0.5 for _ in range(size)], [rng.randint(1, 100) for _ in range(size)])
        assert reward(name, g, **k)[0] == approx(_loop_reference(name, g, **k)), g


def test_score_group_and_target_rules():
    no_target = single(True, 5, limit=100)
    needs_target = [name for name, r in R.REWARDS.items() if r.needs_target]
    assert needs_target == ["lcpo", "lcpo-exact", "lcpo-max", "lcpo-norepeat", "lcpo-noafter"]
    for name in needs_target:
        with pytest.raises(ValueError, match=f"--reward {name} needs a target.*--target none"):
            R.score_group(name, no_target, {})
    for name in set(R.REWARDS) - set(needs_target):
        base, length = R.score_group(name, no_target, {}, R.HapoHistory())
        assert len(base) == len(length) == 1
    mixed = [G4, G4_MAX]  # lcpo follows each prompt's sentence
    consts = dict(alpha_exact=0.01, alpha_max=0.01, delta_max=0.5)
    assert [sum(map(sum, R.score_group("lcpo", g, consts))) for g in mixed] == approx([1.1, 1.0])


def test_lcpo_norepeat_takes_the_penalty_from_a_repeating_response_only():
    # G4's last response repeats itself: LCPO's reward (lcpo-exact above) less rho, in the length term.
    assert reward("lcpo-norepeat")[0] == approx([1 - 0.003, 1 - 0.003, -0.006, -0.015 - 1.0])
    total, base, length = reward("lcpo-norepeat", repeat_penalty=0.25, alpha_exact=0.01)
    assert total == approx([0.9, 0.9, -0.2, -0.5 - 0.25]) and base == [1.0, 1.0, 0.0, 0.0]
    # max prompts: lcpo-max's reward, less the same penalty
    assert reward("lcpo-norepeat", G4_MAX)[0] == approx([0.51, 0.49, 0.0, -1.0])


def test_lcpo_noafter_pays_nothing_for_tokens_after_the_answer():
    # G4's second response has 20 of its 60 tokens after its answer: on top of lcpo-norepeat, alpha per such token.
    total, base, length = reward("lcpo-noafter", alpha_exact=0.01)
    assert total == approx([0.9, 0.9 - 0.2, -0.2, -0.5 - 1.0]) and base == [1.0, 1.0, 0.0, 0.0]
    # under the target, answering at the same token and then writing on earns nothing: 30 tokens and an answer at
    # the end score the same as 45 tokens with 15 after the answer (T = 50); the solution written longer does gain
    padded = dataclasses.replace(group([True] * 3, [30, 45, 45]), after=[0, 15, 0])
    assert reward("lcpo-noafter", padded, alpha_exact=0.01)[0] == approx([0.8, 0.8, 0.95])
    assert reward("lcpo-norepeat", padded, alpha_exact=0.01)[0] == approx([0.8, 0.95, 0.95])  # padding pays there
    # max prompts: lcpo-norepeat's reward, shorter already pays
    assert reward("lcpo-noafter", G4_MAX)[0] == reward("lcpo-norepeat", G4_MAX)[0]


def test_repeats():
    sentence = [11, 12, 13, 14, 15, 16, 17, 18, 19]
    assert R.repeats(sentence * 3)  # the same 9-token line three times
    assert not R.repeats(sentence * 2 + [1, 2, 3])
    assert R.repeats([7] * 10)  # one token over and over: the 8-gram occurs 3 times (overlapping)
    assert not R.repeats([7] * 9) and not R.repeats(list(range(200)))
    assert not R.repeats([])


def test_a_reward_is_registered_by_its_decorator(monkeypatch):
    """@reward: a function's keyword parameters are its constants (grpo.py's flags), one default each, shared by
    name; its docstring lines are their help; a reward with a state across steps takes it second."""
    assert inspect.signature(R.lcpo_exact).parameters["alpha_exact"].default == R.CONSTANTS["alpha_exact"].default
    assert R.lcpo_max(G4) == R.lcpo_max(G4, 0.001, 0.5) == R.lcpo(G4_MAX)
    assert R.REWARDS["lcpo"].constants == ("alpha_exact", "alpha_max", "delta_max")
    assert [c.name for c in R.CONSTANTS.values() if c.tokens] == [
        "dapo_cache",
        "laser_budget",
        "thinkprune_cap",
        "cosine_len",
    ]
    assert isinstance(R.REWARDS["hapo"].new_state(), R.HapoHistory) and R.REWARDS["lcpo"].new_state() is None
    monkeypatch.setattr(R, "REWARDS", dict(R.REWARDS))  # the toys below stay in this test
    monkeypatch.setattr(R, "CONSTANTS", dict(R.CONSTANTS))

    @R.reward("toy", needs_target=True)
    def toy(g: Group, alpha_exact: float, toy_scale: float = 2.0) -> R.Terms:
        """toy_scale: what a correct answer is worth"""
        return [toy_scale * c for c in g.correct], [-alpha_exact * abs(g.target - n) for n in g.lengths]

    assert R.REWARDS["toy"].constants == ("alpha_exact", "toy_scale") and R.REWARDS["toy"].needs_target
    assert R.CONSTANTS["toy_scale"] == R.Constant("toy_scale", 2.0, float, "what a correct answer is worth", False)
    assert reward("toy")[0] == approx([2 - 0.003, 2 - 0.003, -0.006, -0.015])  # alpha_exact's default: lcpo's
    with pytest.raises(ValueError, match="defined twice"):
        R.reward("toy")(toy)
    with pytest.raises(TypeError, match="alpha_exact has its default in an earlier reward"):
        R.reward("again")(lambda g, alpha_exact=0.1: None)
    with pytest.raises(TypeError, match="constant unknown needs a default"):
        R.reward("nodefault")(lambda g, unknown: None)
    with pytest.raises(TypeError, match="its docstring needs a line `toy_undocumented: what it is`"):
        R.reward("undocumented")(lambda g, toy_undocumented=1.0: None)

    class Seen:
        def __init__(self):
            self.steps = 0

    @R.reward("stateful", state=Seen)
    def stateful(g: Group, seen: Seen) -> R.Terms:
        """Scores the steps seen so far."""
        return [float(seen.steps)] * len(g.correct), [0.0] * len(g.correct)

    assert R.REWARDS["stateful"].constants == () and isinstance(R.REWARDS["stateful"].new_state(), Seen)
    state = R.REWARDS["stateful"].new_state()
    state.steps = 3
    assert R.score_group("stateful", G4, {}, state)[0] == [3.0] * 4
    with pytest.raises(ValueError, match="--reward stateful keeps a state across steps: pass its Seen"):
        R.score_group("stateful", G4, {})
