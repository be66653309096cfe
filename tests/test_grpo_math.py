"""The GRPO math of grpo.py against hand-computed values and a direct, loop-by-loop re-computation."""

import math

import pytest
import torch

from grpo import equal_reward_groups, group_advantages, parse_args, pearson_from_sums, policy_loss


def test_group_advantages_known_group():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [1.0, 0.7, -0.3, 0.6]])
    adv = group_advantages(rewards)
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = 0.5773503
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a], abs=1e-6)
    assert adv[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # equal rewards: no signal, no NaN
    # group 2 by hand: mean 0.5, deviations .5 .2 -.8 .1, unbiased var (.25+.04+.64+.01)/3 = 0.31333
    s = math.sqrt(0.94 / 3) + 1e-6
    assert adv[2].tolist() == pytest.approx([0.5 / s, 0.2 / s, -0.8 / s, 0.1 / s], abs=1e-6)
    # Dr. GRPO: centering only
    assert group_advantages(rewards, std_normalize=False)[0].tolist() == pytest.approx([0.5, -0.5, -0.5, 0.5])
    assert equal_reward_groups(rewards).tolist() == [False, True, False]


def test_policy_loss_hand_values_and_clipping():
    # Three one-token responses: ratio e^.1 (A=+1, inside the clip), e^.5 (A=+1, clipped at 1.2),
    # e^-.5 (A=-1, clipped at 0.8).
    old = torch.zeros(3)
    logp = torch.tensor([0.1, 0.5, -0.5], requires_grad=True)
    adv = torch.tensor([1.0, 1.0, -1.0])
    loss, m = policy_loss(logp, old, adv, torch.arange(3), num_seqs=3, num_tokens=3, kl_coef=0, entropy_coef=0)
    expected = (-math.exp(0.1) - 1.2 + 0.8) / 3
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    loss.backward()
    # d/dlogp of -rho*A/3 = -rho*A/3 where unclipped; 0 where the clipped side is active
    assert logp.grad.tolist() == pytest.approx([-math.exp(0.1) / 3, 0.0, 0.0], abs=1e-6)
    assert m["clip_frac"].item() == 2
    assert m["ratio_max"].item() == pytest.approx(math.exp(0.5))
    assert m["ratio_min"].item() == pytest.approx(math.exp(-0.5))


def test_asymmetric_clip_higher():
    logp = torch.tensor([0.22], requires_grad=True)  # ratio 1.246: clipped at 1.2, not at 1.28
    for eps_high, clipped in ((0.2, True), (0.28, False)):
        loss, _ = policy_loss(
            logp,
            torch.zeros(1),
            torch.ones(1),
            torch.zeros(1, dtype=torch.long),
            num_seqs=1,
            num_tokens=1,
            eps_high=eps_high,
            kl_coef=0,
            entropy_coef=0,
        )
        assert loss.item() == pytest.approx(-(1 + eps_high) if clipped else -math.exp(0.22), abs=1e-6)


def test_k3_kl_value_and_nonnegative():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-0.9, -2.0])
    loss, m = policy_loss(
        logp,
        logp,
        torch.zeros(2),
        torch.tensor([0, 1]),
        num_seqs=2,
        num_tokens=2,
        ref_logp=ref,
        kl_coef=1.0,
        entropy_coef=0,
    )
    kl0 = math.exp(0.1) - 0.1 - 1  # 0.0051709
    assert m["kl"].item() == pytest.approx(kl0, abs=1e-7)
    assert loss.item() == pytest.approx(kl0 / 2, abs=1e-7)


def _direct_loss(logp, old, adv, seqs, ref, ent, eps_lo, eps_hi, beta, c_ent, agg, const):
    """The same loss written token by token with Python loops, for comparison."""
    per_seq = {}
    for t in range(len(logp)):
        rho = torch.exp(logp[t] - old[t])
        pg = -torch.minimum(rho * adv[t], torch.clamp(rho, 1 - eps_lo, 1 + eps_hi) * adv[t])
        d = ref[t] - logp[t]
        per_seq.setdefault(int(seqs[t]), []).append(pg + beta * (torch.exp(d) - d - 1) - c_ent * ent[t])
    all_tokens = [x for v in per_seq.values() for x in v]
    if agg == "token-mean":
        return sum(all_tokens) / len(all_tokens)
    if agg == "seq-mean-token-mean":
        return sum(sum(v) / len(v) for v in per_seq.values()) / len(per_seq)
    return sum(all_tokens) / (const * len(per_seq))


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "constant"])
def test_policy_loss_and_gradient_match_direct_computation(agg):
    g = torch.Generator().manual_seed(0)
    lens = [1, 3, 5]
    n = sum(lens)
    seqs = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    base = torch.randn(n, generator=g) * 0.3 - 1
    old = base + torch.randn(n, generator=g) * 0.2
    ref = base + torch.randn(n, generator=g) * 0.2
    ent = torch.rand(n, generator=g) * 2
    adv = torch.tensor([1.5, -0.5, -1.0])[seqs]
    kw = dict(eps_lo=0.2, eps_hi=0.28, beta=0.05, c_ent=0.01, agg=agg, const=8.0)

    a = base.clone().requires_grad_(True)
    loss, _ = policy_loss(
        a,
        old,
        adv,
        seqs,
        num_seqs=3,
        num_tokens=n,
        ref_logp=ref,
        entropy=ent,
        eps_low=0.2,
        eps_high=0.28,
        kl_coef=0.05,
        entropy_coef=0.01,
        agg=agg,
        constant=8.0,
    )
    loss.backward()
    b = base.clone().requires_grad_(True)
    direct = _direct_loss(b, old, adv, seqs, ref, ent, **kw)
    direct.backward()
    assert loss.item() == pytest.approx(direct.item(), abs=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_microbatch_split_sums_to_minibatch_loss():
    """Summing per-micro-batch losses (global normalizers) equals the loss of the whole mini-batch."""
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor([2, 4, 3, 1])
    seqs = torch.repeat_interleave(torch.arange(4), lens)
    logp, old = torch.randn(10, generator=g), torch.randn(10, generator=g)
    adv = torch.randn(4, generator=g)[seqs]
    for agg in ("token-mean", "seq-mean-token-mean", "constant"):
        whole, _ = policy_loss(
            logp, old, adv, seqs, num_seqs=4, num_tokens=10, kl_coef=0, entropy_coef=0, agg=agg, constant=5.0
        )
        first, _ = policy_loss(
            logp[:6],
            old[:6],
            adv[:6],
            seqs[:6],
            num_seqs=4,
            num_tokens=10,
            kl_coef=0,
            entropy_coef=0,
            agg=agg,
            constant=5.0,
        )
        second, _ = policy_loss(
            logp[6:],
            old[6:],
            adv[6:],
            seqs[6:] - 2,
            num_seqs=4,
            num_tokens=10,
            kl_coef=0,
            entropy_coef=0,
            agg=agg,
            constant=5.0,
        )
        assert (first + second).item() == pytest.approx(whole.item(), abs=1e-6)


def test_ratio_one_zero_advantage_gives_zero_gradient():
    logp = torch.tensor([-1.0, -0.3, -2.0], requires_grad=True)
    loss, m = policy_loss(
        logp,
        logp.detach(),
        torch.zeros(3),
        torch.tensor([0, 0, 1]),
        num_seqs=2,
        num_tokens=3,
        kl_coef=0,
        entropy_coef=0,
    )
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logp.grad) == 0
    assert m["clip_frac"].item() == 0


def test_truncated_importance_sampling_weight():
    logp = torch.tensor([-1.0], requires_grad=True)
    rollout = torch.tensor([-2.0])  # engine thought the token less likely: weight e^1 = 2.718, capped at 2
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        num_seqs=1,
        num_tokens=1,
        rollout_logp=rollout,
        tis_cap=2.0,
        kl_coef=0,
        entropy_coef=0,
    )
    assert loss.item() == pytest.approx(-2.0)
    loss, _ = policy_loss(
        logp,
        logp.detach(),
        torch.ones(1),
        torch.zeros(1, dtype=torch.long),
        num_seqs=1,
        num_tokens=1,
        rollout_logp=rollout,
        tis_cap=0.0,
        kl_coef=0,
        entropy_coef=0,
    )
    assert loss.item() == pytest.approx(-1.0)


def test_cli_presets_and_bad_flags(capsys):
    cfg = parse_args(["--preset", "smollm2-cpu", "--target", "max", "--steps", "3"])
    assert (cfg.model.model, cfg.data.data, cfg.data.target, cfg.run.steps) == ("smollm2", "arith", "max", 3)
    paper = parse_args([])
    assert (paper.grpo.prompts_per_step, paper.grpo.group_size, paper.grpo.lr, paper.data.max_new_tokens) == (
        128,
        16,
        1e-6,
        4096,
    )
    assert (paper.grpo.eps_low, paper.grpo.kl_coef, paper.grpo.entropy_coef, paper.data.temperature) == (
        0.2,
        0.001,
        0.001,
        0.6,
    )
    for argv, needle in (
        (["--target", "long"], "--target"),
        (["--target-min", "500", "--target-max", "100"], "--target-min"),
        (["--group-size", "1"], "--group-size"),
        (["--prompts-per-step", "10", "--minibatches", "3"], "--minibatches"),
        (["--preset", "nope"], "--preset"),
        (["--lr", "abc"], "--lr"),
        (["--dtype", "fp16"], "--dtype"),
        (["--prompts-per-step", "9", "--minibatches", "1", "--targets-per-problem", "2"], "--targets-per-problem"),
        (["--target-min", "10", "--target-max", "12", "--targets-per-problem", "4"], "--targets-per-problem"),
        (["--reward", "shortest"], "--reward must be one of lcpo|"),
        (
            ["--reward", "lcpo-max", "--target", "none"],
            "--reward lcpo-max scores the length against the prompt's target, and --target none writes no target",
        ),
        (["--target", "none"], "--reward lcpo scores"),  # plain GRPO is --reward correctness
        (["--dapo-cache", "5000"], "--dapo-cache is a length in tokens: 0 (derived from --max-new-tokens) up to"),
        (["--laser-budget", "-1"], "--laser-budget is a length in tokens"),
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert needle in capsys.readouterr().err
    for name in (
        "correctness",
        "dapo",
        "laser",
        "thinkprune",
        "cosine",
        "kimi",
        "efficient",
        "shorterbetter",
        "grpo-lead",
        "alp",
        "hapo",
    ):  # rewards without a target run with prompts without one
        assert parse_args(["--reward", name, "--target", "none"]).reward.reward == name
    cfg = parse_args(["--reward", "laser", "--laser-budget", "64", "--laser-bonus", "0.25"])
    assert cfg.reward.constants() == {"laser_budget": 64, "laser_bonus": 0.25}
    # every reward constant is a flag with its function's default (rewards.py), and the presets set them
    assert parse_args([]).reward.constants() == {"alpha_exact": 0.0003, "alpha_max": 0.001, "delta_max": 0.5}
    logu = parse_args(["--preset", "smollm2-lcpo-cpu-logu"]).reward
    assert (logu.alpha_exact, logu.alpha_max, logu.delta_max, logu.last_number_fallback) == (0.004, 0.004, 0.5, True)


def test_help_says_what_each_flag_takes(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert '--target TARGET the prompt\'s sentence: exact ("Think for N tokens.") | max' in out
    assert "mixed (each prompt exact or max, 50/50: the L1-Max recipe) | none (no target) (default: exact)" in out
    assert "| grpo-lead | alp | hapo (default: lcpo)" in out and "--engine ENGINE rollout engine: auto" in out
    # a reward constant's help: the rewards that read it and its docstring line in rewards.py
    assert (
        "--alpha-exact ALPHA_EXACT lcpo, lcpo-exact, lcpo-norepeat, lcpo-noafter: reward lost per token off the target"
        in out
    )
    assert "--repeat-penalty REPEAT_PENALTY lcpo-norepeat, lcpo-noafter: reward lost by a response that repeats" in out
    assert "--laser-budget LASER_BUDGET laser: the length L_T under which a correct answer earns the bonus" in out


def test_pearson_from_sums_matches_numpy():
    import numpy as np

    x, y = np.array([32.0, 32, 64, 64, 128, 128]), np.array([40.0, 70, 66, 90, 100, 171])
    sums = (len(x), x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum())
    assert pearson_from_sums(*sums) == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-12)
    assert pearson_from_sums(3, 30.0, 6.0, 300.0, 14.0, 60.0) is None  # x constant (10, 10, 10)
    assert pearson_from_sums(1, 5.0, 7.0, 25.0, 49.0, 35.0) is None


def test_tokens_after_the_answer_reach_the_reward_and_the_metrics():
    """A correct response's tokens after its answer (its share of characters after the first "= 4") go into the
    group (`after`), --reward lcpo-noafter charges them, and the step's `after_answer` is their share of a correct
    response; a wrong response has none."""
    import data as D
    import model as M
    import rewards as R
    from grpo import compute_rewards, step_metrics
    from rollout import Completion

    argv = ["--target", "exact", "--group-size", "2", "--max-new-tokens", "32", "--reward", "lcpo-noafter"]
    cfg = parse_args([*argv, "--alpha-exact", "0.01"])
    samples = [D.Sample(D.Problem("How much is 2 + 2?", "4", "t", "t:0"), 30, "exact", "p")]
    # 32 characters, 16 of them after "= \\boxed{4": 10 of the 20 tokens
    right = Completion(list(range(20)), "2 + 2 = \\boxed{4}. Thanks, bye!!", "stop")
    completions = [[right, Completion([5] * 4, "= \\boxed{5}", "stop")]]
    scores = compute_rewards(samples, completions, cfg, R.HapoHistory())
    assert len(right.text) == 32 and scores.groups[0].after == [10, 0] and scores.after.tolist() == [[10.0, 0.0]]
    assert scores.reward[0].tolist() == pytest.approx([1 - 0.01 * 10 - 0.01 * 10, -0.01 * 26])
    stats = dict(tokens=24, clip_frac=0.0, kl=0.0, entropy=0.0, tis_mismatch=0.0, ratio_min=1, ratio_max=1, grad_norm=0)
    m = step_metrics(1, samples, completions, scores, stats, M.init_distributed(), times=dict(step=1.0))
    assert m["after_answer"] == pytest.approx(10 / 20) and m["accuracy"] == 0.5


def test_step_metrics_count_items_a_grading_bound_hit():
    """A response the grader must not spend time on (a power tower) is graded wrong, and the step's metrics say
    how many items a bound hit (grade_bounded), next to the named means."""
    import data as D
    import model as M
    import rewards as R
    from grpo import compute_rewards, step_metrics
    from rollout import Completion

    cfg = parse_args(["--target", "exact", "--group-size", "2", "--max-new-tokens", "8"])
    problem = D.Problem("How much is 2 + 2?", "4", "t", "t:0")
    samples = [D.Sample(problem, 6, "exact", "p")]
    completions = [
        [Completion([1, 2, 3], "so \\boxed{4}", "stop"), Completion([1] * 8, "\\boxed{10^{10^{10^{10}}}}", "length")]
    ]
    scores = compute_rewards(samples, completions, cfg, R.HapoHistory())
    assert scores.correct.tolist() == [[1.0, 0.0]] and scores.grading.too_costly == 1
    assert scores.reward[0].tolist() == pytest.approx([1 - 0.0003 * 3, -0.0003 * 2])
    stats = dict(
        tokens=11, clip_frac=0.0, kl=0.0, entropy=0.0, tis_mismatch=0.0, ratio_min=1.0, ratio_max=1.0, grad_norm=0.5
    )
    m = step_metrics(1, samples, completions, scores, stats, M.init_distributed(), times=dict(step=1.0))
    assert m["grade_bounded"] == 1 and m["accuracy"] == 0.5 and m["truncated"] == 0.5 and m["repeats"] == 0.0
    assert m["response_len"] == 5.5 and m["abs_len_dev"] == 2.5 and m["length_term"] == pytest.approx(-0.00075)
