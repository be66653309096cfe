"""Length rewards: L1's LCPO and the family the field trains with, registered under their --reward names.

Every reward scores one group, the G responses of one prompt (`Group`), and is written as a correctness term plus
a length term, r_i = base_i + length_i, so the step's metrics can show the length term apart (`length_term`).
Notation: c_i in {0, 1} correct, n_i generated tokens of the response (the thinking and the answer, EOS included; a
response cut at the limit counts as the limit), a_i the tokens after its answer is first stated, T the target in
the prompt ("Think for T tokens."), L the response limit (--max-new-tokens).

| name          | r_i                                                                  | source                   |
| lcpo          | lcpo-exact or lcpo-max, as the prompt's sentence says               | L1 (the L1-Max recipe)   |
| lcpo-exact    | c - alpha * |T - n|                                                  | L1, 2503.04697           |
| lcpo-max      | c * clip(alpha * (T - n) + delta, 0, 1)                              | L1, 2503.04697           |
| lcpo-norepeat | lcpo - rho * 1[the response repeats a span of its tokens]            | ours, beside L1          |
| lcpo-noafter  | lcpo-norepeat - alpha * a, a the tokens after the answer (exact)      | ours, beside L1          |
| correctness   | c                                                                    | plain GRPO               |
| dapo          | (2c - 1) + soft overlong punishment over the last L_c tokens         | DAPO, 2503.14476 eq. 13  |
| laser         | R0 + a * c * 1[n <= L_T], R0 = +1 / -0.5 / -1 (no \\boxed)            | LASER, 2505.15612        |
| thinkprune    | c * 1[n <= cap]                                                      | ThinkPrune, 2504.01296   |
| cosine        | v(c) cosine-interpolated over n / L_cos                              | Yeo et al., 2502.03373   |
| kimi          | c + w * lambda (correct), w * min(0, lambda) (wrong), lambda by group | Kimi k1.5, 2501.12599    |
| efficient     | c * (1 - alpha * sigmoid(z)), z over the group's correct lengths     | Arora & Zanette, 2502.04463 |
| shorterbetter | a * c - b * |n - SOL|, SOL the group's shortest correct length       | ShorterBetter, 2504.21370 |
| grpo-lead     | exp(-alpha * z) (correct), -1 (wrong), 0 (no answer)                 | GRPO-LEAD, 2504.09696    |
| alp           | c - beta * max(p_solved, 1/G) * n / L                                | ALP, 2506.05256          |
| hapo          | c + w * f(n / h), h the problem's shortest correct length so far     | HAPO, 2505.11225         |

Each function's docstring has its equation, its source and what we changed for our scale (the authors' constants
were set for 4K-32K-token responses; ours are 100s of tokens): a constant in tokens is a fraction of L, a per-token
coefficient is the authors' times their limit over ours.

Adding a reward is one function here, under `@reward("name")` (`needs_target=True` if it reads T). Its keyword
parameters are its constants: each becomes the flag `--param-name` of grpo.py (config.py derives them), with the
parameter's default and, as --help, the line `param_name: what it is` of the docstring. A flag is one constant for
every reward that names it: the first reward to name it gives its default and help line, a later one leaves the
default out (so lcpo, lcpo-exact and lcpo-max share --alpha-exact). A constant annotated `Tokens` is a length in
tokens, 0..L, where 0 means derived from L. A reward that keeps a state across steps (HAPO's history) names its
class, `@reward("name", state=Cls)`, and takes the object as its second argument: the class has `state_dict()` /
`load_state_dict(d)` (the checkpoint keeps it, `--resume` restores it) and `after_step(groups, gather)`, which the
loop calls once per step with the step's groups, after the rewards are computed; `gather(obj)` returns every
rank's `obj`.

Grading (whether a response is correct) is grading.py's; this module reads its verdicts and starts no process.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import inspect
import math
import re
from dataclasses import dataclass
from typing import Callable, NewType


@dataclass(frozen=True)
class Group:
    """One prompt's G responses: everything any reward of the family reads."""

    correct: list[bool]  # graded correct (c_i)
    lengths: list[int]  # n_i: generated tokens, EOS included; a cut response counts as the limit
    repeated: list[bool]  # repeats a span of its tokens (`repeats`): degenerate padding
    after: list[int]  # tokens after the answer is first stated (grading.after_answer); 0 for a wrong response
    boxed: list[bool]  # wrote a \\boxed{} answer (LASER and GRPO-LEAD score a missing answer apart)
    target: int | None  # T of "Think for T tokens." (None when the prompt has no target)
    mode: str  # the prompt's sentence: "exact" | "max" | "none"
    limit: int  # L: the response limit, --max-new-tokens
    key: str  # the problem's id: HAPO keeps a history per problem


Terms = tuple[list[float], list[float]]  # (correctness term, length term) per response; r_i = their sum
Tokens = NewType("Tokens", int)  # a constant that is a length in tokens: 0..L, 0 = derived from L


# ------------------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Constant:
    """A reward constant: the flag --name (dashes for underscores), its default and its --help line."""

    name: str
    default: float | int | bool | str
    kind: type  # what the flag parses its value as
    help: str
    tokens: bool  # a length in tokens: 0..L, 0 = derived from L (config.validate checks it)


@dataclass(frozen=True)
class Reward:
    """A --reward: its function, whether it reads the prompt's target, its constants and the class of its state."""

    name: str
    fn: Callable[..., Terms]
    needs_target: bool
    constants: tuple[str, ...]  # names in CONSTANTS: the keyword arguments of fn
    state: type | None  # the class of its state across steps (None: it has none)

    def new_state(self):
        """A fresh state for a run (None for a reward without one)."""
        return self.state() if self.state is not None else None


REWARDS: dict[str, Reward] = {}  # by --reward name, in the order they are defined
CONSTANTS: dict[str, Constant] = {}  # every reward's constants, by name (one flag each)
_KINDS = {"float": float, "int": int, "bool": bool, "str": str, "Tokens": int}


def reward(name: str, *, needs_target: bool = False, state: type | None = None):
    """Register the decorated function as --reward `name` (module docstring: its constants and its state)."""

    def register(fn: Callable[..., Terms]) -> Callable[..., Terms]:
        if name in REWARDS:
            raise ValueError(f"reward {name!r} is defined twice")
        params = list(inspect.signature(fn).parameters.values())[1 if state is None else 2 :]
        for p in params:
            if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                raise TypeError(f"reward {name!r}: its constants are named parameters, not *{p.name}")
            if p.default is p.empty and p.name not in CONSTANTS:
                raise TypeError(f"reward {name!r}: constant {p.name} needs a default (no reward before it has one)")
            if p.default is not p.empty and p.name in CONSTANTS:
                raise TypeError(
                    f"reward {name!r}: constant {p.name} has its default in an earlier reward "
                    f"({CONSTANTS[p.name].default}): leave it out here, so the flag has one default"
                )
            if p.name not in CONSTANTS:
                CONSTANTS[p.name] = Constant(
                    p.name,
                    p.default,
                    _KINDS.get(str(p.annotation), type(p.default)),
                    _doc_line(fn, p.name, name),
                    tokens=p.annotation in (Tokens, "Tokens"),
                )
        # The shared constants' defaults, so that the function can be called with fewer arguments as well.
        fn.__defaults__ = tuple(CONSTANTS[p.name].default for p in params if p.kind == p.POSITIONAL_OR_KEYWORD) or None
        fn.__kwdefaults__ = {p.name: CONSTANTS[p.name].default for p in params if p.kind == p.KEYWORD_ONLY} or None
        REWARDS[name] = Reward(name, fn, needs_target, tuple(p.name for p in params), state)
        return fn

    return register


def _doc_line(fn, constant: str, name: str) -> str:
    """The line `constant: text` of fn's docstring (with the more indented lines under it): the flag's --help."""
    m = re.search(rf"^( *){constant}: (.+(?:\n\1 +\S.*)*)", inspect.getdoc(fn) or "", re.M)
    if m is None:
        raise TypeError(f"reward {name!r}: its docstring needs a line `{constant}: what it is` (the flag's --help)")
    return " ".join(m[2].split())


def score_group(name: str, g: Group, constants: dict, state=None) -> Terms:
    """The reward `name` (a key of REWARDS) of one group, with its constants (keyword arguments of its function)
    and its state across steps (for a reward that has one): (correctness term, length term) per response."""
    if name not in REWARDS:
        raise ValueError(f"--reward must be one of {', '.join(REWARDS)}, got {name!r}")
    r = REWARDS[name]
    if r.needs_target and g.target is None:
        raise ValueError(
            f"--reward {name} needs a target length in the prompt, and this one has none "
            "(--target none): use --target exact|max|mixed, or a reward without a target"
        )
    if r.state is None:
        return r.fn(g, **constants)
    if not isinstance(state, r.state):
        raise ValueError(f"--reward {name} keeps a state across steps: pass its {r.state.__name__} (new_state())")
    return r.fn(g, state, **constants)


# -------------------------------------------------------------------------------------------------- rewards
def _split(g: Group, rewards: list[float], base: list[float]) -> Terms:
    return base, [r - b for r, b in zip(rewards, base)]


def _c(g: Group) -> list[float]:
    return [1.0 if c else 0.0 for c in g.correct]


@reward("lcpo", needs_target=True)
def lcpo(g: Group, alpha_exact: float = 0.0003, alpha_max: float = 0.001, delta_max: float = 0.5) -> Terms:
    """L1's reward (arXiv 2503.04697) for the prompt's own sentence: LCPO-Exact on "Think for T tokens.", LCPO-Max
    on "Think for maximum T tokens." (--target mixed trains on both, the L1-Max recipe).

    alpha_exact: reward lost per token off the target (the paper's value; the original code used 1/3000)
    alpha_max: reward per token under (or over) the budget (the paper's text says 0.0003; the default is what the
        original code effectively used)
    delta_max: the reward of a correct answer exactly at the budget
    """
    return lcpo_max(g, alpha_max, delta_max) if g.mode == "max" else lcpo_exact(g, alpha_exact)


@reward("lcpo-exact", needs_target=True)
def lcpo_exact(g: Group, alpha_exact: float) -> Terms:
    """LCPO-Exact (L1): r = c - alpha_exact * |T - n|, unclipped (can go below -1). Base c."""
    rewards = [c - alpha_exact * abs(g.target - n) for c, n in zip(_c(g), g.lengths)]
    return _split(g, rewards, _c(g))


@reward("lcpo-max", needs_target=True)
def lcpo_max(g: Group, alpha_max: float, delta_max: float) -> Terms:
    """LCPO-Max (L1): r = c * clip(alpha_max * (T - n) + delta_max, 0, 1). Base c (the length term is <= 0). With
    the defaults: 1.0 when 500+ tokens under the budget, 0.5 at it, 0 when 500+ over."""
    rewards = [c * min(1.0, max(0.0, alpha_max * (g.target - n) + delta_max)) for c, n in zip(_c(g), g.lengths)]
    return _split(g, rewards, _c(g))


@reward("lcpo-norepeat", needs_target=True)
def lcpo_norepeat(
    g: Group, alpha_exact: float, alpha_max: float, delta_max: float, repeat_penalty: float = 1.0
) -> Terms:
    """LCPO (either sentence, as `lcpo`) less a penalty on degenerate repetition: r = r_LCPO - rho * 1[repeats(y)],
    in the length term. Not in L1: on a task whose answer is short, a small model meets a long target by writing one
    line over and over (results/HISTORY.md), which LCPO pays in full. With rho = 1, a correct answer padded to the
    target scores no more than a wrong one, so repetition pays only when an honest response would miss the target
    by more than 1 / alpha tokens.

    repeat_penalty: reward lost by a response that repeats a span of its tokens (rewards.repeats)
    """
    base, length = lcpo(g, alpha_exact, alpha_max, delta_max)
    return base, [x - repeat_penalty * r for x, r in zip(length, g.repeated)]


@reward("lcpo-noafter", needs_target=True)
def lcpo_noafter(g: Group, alpha_exact: float, alpha_max: float, delta_max: float, repeat_penalty: float) -> Terms:
    """lcpo-norepeat, and on "Think for T tokens." the tokens after the answer cost as much as tokens off the
    target: r = c - alpha * |T - n| - alpha * a - rho * 1[repeats(y)], a the tokens after the answer is first
    stated (0 for a wrong response). Not in L1: a model with nothing left to compute meets a long target by writing
    on after its answer (results/HISTORY.md). Here, for a response under the target, every token after the answer
    gains alpha for nearing T and loses alpha again, so only tokens before the answer (the solution) bring the
    length closer; over the target, they cost 2 alpha each. Max prompts are lcpo-norepeat's (there, shorter already
    pays)."""
    base, length = lcpo_norepeat(g, alpha_exact, alpha_max, delta_max, repeat_penalty)
    if g.mode == "max":
        return base, length
    return base, [x - alpha_exact * a for x, a in zip(length, g.after)]


@reward("correctness")
def correctness(g: Group) -> Terms:
    """Plain GRPO, no length term: r = c."""
    return _c(g), [0.0] * len(g.correct)


@reward("dapo")
def dapo(g: Group, dapo_cache: Tokens = 0) -> Terms:
    """DAPO's soft overlong punishment (arXiv 2503.14476 eq. 13; verl DAPORewardManager):

        r = R(c) + R_len,  R(c) = +1 if correct else -1
        R_len = 0                                  if n <= L - L_c
              = ((L - L_c) - n) / L_c              if L - L_c < n <= L
              = -1                                 if n > L

    L_max is the response limit L (DAPO: 20480, of which L_c = 4096 is the punishment buffer).

    dapo_cache: the soft punishment's buffer L_c before the limit L; 0 = L // 5 (DAPO's ratio)
    """
    cache = dapo_cache or max(1, g.limit // 5)
    start = g.limit - cache
    length = [0.0 if n <= start else max(-1.0, (start - n) / cache) for n in g.lengths]
    return [2.0 * c - 1.0 for c in _c(g)], length


@reward("laser")
def laser(g: Group, laser_budget: Tokens = 0, laser_bonus: float = 0.5) -> Terms:
    """LASER, the step length reward (arXiv 2505.15612; hkust-nlp/Laser length_penalty.py, "larse"):

        r = R0 + a * 1[correct] * 1[n <= L_T],  R0 = +1 correct, -0.5 wrong, -1 without a \\boxed{} answer

    LASER's R0 is also -1 when the <think> tags are missing; our models are not reasoning models, so only the
    box counts here.

    laser_budget: the length L_T under which a correct answer earns the bonus; 0 = L // 4 (LASER: 2048 / 4096 /
        8192 of 16384; 4096 is the middle one)
    laser_bonus: the bonus a
    """
    budget = laser_budget or max(1, g.limit // 4)
    base = [1.0 if c else (-0.5 if b else -1.0) for c, b in zip(g.correct, g.boxed)]
    return base, [laser_bonus if c and n <= budget else 0.0 for c, n in zip(g.correct, g.lengths)]


@reward("thinkprune")
def thinkprune(g: Group, thinkprune_cap: Tokens = 0) -> Terms:
    """ThinkPrune (arXiv 2504.01296): the correctness reward under a length cap, r = c * 1[n <= cap].

    ThinkPrune caps the generation itself (max_response_length = cap) and lowers the cap in rounds (4000, then
    3000, then 2000); a cut response then scores 0 because it has no answer. Here the cap is on the reward, so a
    correct answer over it scores 0 the same way.

    thinkprune_cap: a correct answer over the cap scores 0; 0 = 3 * L // 4 (the second round's 3000 of 4000)
    """
    cap = thinkprune_cap or max(1, 3 * g.limit // 4)
    return _c(g), [-c if n > cap else 0.0 for c, n in zip(_c(g), g.lengths)]


@reward("cosine")
def cosine(g: Group, cosine_len: Tokens = 0) -> Terms:
    """The cosine length reward (Yeo et al., arXiv 2502.03373; open-r1 get_cosine_scaled_reward):

        r = v_lo + (v_hi - v_lo) * (1 + cos(pi * min(n, L_cos) / L_cos)) / 2

    correct: (v_lo, v_hi) = (0.5, 1.0): 1.0 for the shortest, 0.5 at L_cos. Wrong: open-r1 swaps its
    (min, max) = (-1.0, -0.5), so the shortest wrong answer gets -1.0 and a wrong answer at L_cos -0.5 (a wrong
    answer should think longer). Counted in tokens, as Yeo et al. (open-r1 counts characters); n is capped at
    L_cos (open-r1's cosine would turn up again past it). Base: r at n = 0.

    cosine_len: the length L_cos where the cosine reaches its end; 0 = L
    """
    max_len = cosine_len or g.limit
    base, rewards = [], []
    for c, n in zip(g.correct, g.lengths):
        lo, hi = (0.5, 1.0) if c else (-0.5, -1.0)
        base.append(hi)
        rewards.append(lo + (hi - lo) * (1 + math.cos(math.pi * min(n, max_len) / max_len)) / 2)
    return _split(g, rewards, base)


@reward("kimi")
def kimi(g: Group, kimi_weight: float = 0.5) -> Terms:
    """Kimi k1.5's length penalty (arXiv 2501.12599 section 2.3.3), over the group's lengths:

        lambda_i = 0.5 - (n_i - min_j n_j) / (max_j n_j - min_j n_j)      (0 when all lengths are equal)
        r_i = c_i + w * lambda_i if correct, else w * min(0, lambda_i)

    kimi_weight: the weight w of the group length penalty (not published: Kimi warms up without the penalty
        first; open-r1's len_reward uses 1.0, LASER's re-implementation 0.4)
    """
    lo, hi = min(g.lengths), max(g.lengths)
    lam = [0.0 if hi == lo else 0.5 - (n - lo) / (hi - lo) for n in g.lengths]
    return _c(g), [kimi_weight * (x if c else min(0.0, x)) for c, x in zip(g.correct, lam)]


def _mean_std(xs: list[float], ddof: int) -> tuple[float, float]:
    mean = sum(xs) / len(xs)
    var = sum((x - mean) ** 2 for x in xs) / (len(xs) - ddof) if len(xs) > ddof else 0.0
    return mean, math.sqrt(var)


@reward("efficient")
def efficient(g: Group, efficient_alpha: float = 0.1) -> Terms:
    """Efficient reasoning (Arora & Zanette, arXiv 2502.04463; efficient-reasoning reward_server/math_server.py):

        r_i = c_i * (1 - alpha * sigmoid((n_i - mean_c) / (std_c + 1e-7)))

    mean_c, std_c (population std) over the group's correct responses that stopped by themselves; a cut
    response scores 0 and is left out of them.

    efficient_alpha: alpha (their scripts' value)
    """
    ok = [c and n < g.limit for c, n in zip(g.correct, g.lengths)]
    mean, std = _mean_std([n for n, o in zip(g.lengths, ok) if o], ddof=0) if any(ok) else (0.0, 0.0)
    rewards = [
        1.0 - efficient_alpha / (1.0 + math.exp(-(n - mean) / (std + 1e-7))) if o else 0.0
        for n, o in zip(g.lengths, ok)
    ]
    return _split(g, rewards, _c(g))


@reward("shorterbetter")
def shorterbetter(g: Group, shorterbetter_a: float = 2.0, shorterbetter_b: float = 0.0) -> Terms:
    """ShorterBetter (arXiv 2504.21370; ShorterBetter naive.py sb_compute_score):

        r_i = a * c_i - b * |n_i - SOL|,  SOL = the group's shortest correct length, else its mean length

    shorterbetter_a: the reward a of a correct answer
    shorterbetter_b: cost b per token off the shortest correct length; 0 = 6 / L (their 0.001 at a 6000-token
        limit)
    """
    b = shorterbetter_b or 6.0 / g.limit
    right = [n for n, c in zip(g.lengths, g.correct) if c]
    sol = min(right) if right else sum(g.lengths) / len(g.lengths)
    return [shorterbetter_a * c for c in _c(g)], [-b * abs(n - sol) for n in g.lengths]


@reward("grpo-lead")
def grpo_lead(g: Group, lead_alpha: float = 0.05) -> Terms:
    """GRPO-LEAD's length-dependent accuracy reward (arXiv 2504.09696; GRPO-LEAD main_ppo.py get_reweight_rewards):

        r_i = exp(-alpha * z_i) if correct, z_i = (n_i - mean_c) / (std_c + 1e-6) over the correct responses
              -1 if wrong,  0 if there is no answer (no \\boxed{})

    std_c is the sample std, 1 when at most one response is correct. GRPO-LEAD skips the length term when the
    group's three shortest responses average under 4000 tokens; at our lengths that would always skip it, so it
    is left out.

    lead_alpha: alpha
    """
    right = [n for n, c in zip(g.lengths, g.correct) if c]
    mean, std = _mean_std(right, ddof=1) if right else (0.0, 1.0)
    std = std if len(right) > 1 else 1.0
    base = [1.0 if c else (-1.0 if b else 0.0) for c, b in zip(g.correct, g.boxed)]
    rewards = [
        math.exp(-lead_alpha * (n - mean) / (std + 1e-6)) if c else r0 for c, n, r0 in zip(g.correct, g.lengths, base)
    ]
    return _split(g, rewards, base)


@reward("alp")
def alp(g: Group, alp_beta: float = 0.5) -> Terms:
    """Adaptive length penalty (ALP, arXiv 2506.05256): the easier the prompt, the more a token costs.

        r_i = c_i - beta * max(p_solved, 1 / G) * n_i / L,  p_solved = the fraction of the group correct

    The lengths are normalized by the limit L.

    alp_beta: beta (not confirmed from the paper here)
    """
    solved = max(sum(g.correct) / len(g.correct), 1.0 / len(g.correct))
    return _c(g), [-alp_beta * solved * n / g.limit for n in g.lengths]


class HapoHistory:
    """HAPO's state kept across steps: per problem, the shortest correct response length seen so far (h)."""

    def __init__(self) -> None:
        self.h: dict[str, int] = {}

    def shortest_correct(self, groups: list[Group]) -> dict[str, int]:
        """{problem: shortest correct length} of these groups (what update() takes)."""
        out: dict[str, int] = {}
        for g in groups:
            right = [n for n, c in zip(g.lengths, g.correct) if c]
            if right:
                out[g.key] = min(out.get(g.key, right[0]), *right)
        return out

    def update(self, shortest: dict[str, int]) -> None:
        for key, n in shortest.items():
            self.h[key] = min(self.h.get(key, n), n)

    def after_step(self, groups: list[Group], gather: Callable[[object], list] = lambda x: [x]) -> None:
        """Take the step's shortest correct lengths, every rank's (`gather`), after the step's rewards."""
        for shortest in gather(self.shortest_correct(groups)):
            self.update(shortest)

    def state_dict(self) -> dict:
        return {"h": dict(self.h)}

    def load_state_dict(self, state: dict) -> None:
        self.h = {k: int(v) for k, v in state["h"].items()}


@reward("hapo", state=HapoHistory)
def hapo(g: Group, history: HapoHistory, hapo_weight: float = 1.0) -> Terms:
    """HAPO, history-aware length reward (arXiv 2505.11225; HAPO utils.py compute_len_reward):

        f_i = cos(pi/2 * n_i / h) if n_i < 2h, else -1;   f_i = 0 while h is unset
        r_i = c_i + w * (max(-0.7, f_i) if correct else min(0, f_i))

    h = the shortest correct length seen so far for this problem (`HapoHistory`), updated after the step's
    rewards.

    hapo_weight: the weight w of the history term
    """
    h = history.h.get(g.key)
    f = [0.0 if h is None else (math.cos(math.pi / 2 * n / h) if n < 2 * h else -1.0) for n in g.lengths]
    return _c(g), [hapo_weight * (max(-0.7, x) if c else min(0.0, x)) for c, x in zip(g.correct, f)]


# ---------------------------------------------------------------------------------------------- repetition
def repeats(token_ids: list[int], span: int = 8, times: int = 3) -> bool:
    """Degenerate repetition: some span of `span` tokens occurs `times` times or more in the response (counted
    with overlaps, so a run of one repeated token counts too). On a small model a length term is easily met by
    writing one sentence over and over, which neither accuracy nor the length deviation shows."""
    seen: dict[tuple[int, ...], int] = {}
    for i in range(len(token_ids) - span + 1):
        key = tuple(token_ids[i : i + span])
        seen[key] = seen.get(key, 0) + 1
        if seen[key] >= times:
            return True
    return False
