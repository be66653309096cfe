"""L1 / LCPO: GRPO with a length-controlled reward, in one readable training loop.

    torchrun --nproc_per_node 8 grpo.py --target exact          # the paper's recipe (L1-Exact), 8 GPUs
    torchrun --nproc_per_node 2 grpo.py --preset smollm2-cpu    # the embedded model on 2 CPU cores (make train)

One step, top to bottom (`train`):
  1. sample prompts, each with a fresh target length n_gold ("Think for n_gold tokens.")        data.PromptStream
  2. generate G responses per prompt, each rank its own share of the prompts                   rollout.Engine
  3. grade them and score each group with the length reward (LCPO by default)                  `compute_rewards`
  4. group-relative advantages A_i = (r_i - mean(r)) / (std(r) + eps)                          `group_advantages`
  5. clipped-surrogate updates on mini-batches, with k3 KL to a frozen reference               `policy_loss`
  6. push the new weights into the rollout engine, log the step, checkpoint.                   `step_metrics`

The flags and presets are in config.py (`python grpo.py --help`), checkpoints and resume in checkpoint.py.
Imports: the standard library, torch and the project's modules at the top; optional packages (vllm, math-verify,
matplotlib, datasets) are imported where they are used, so a missing one is a clear error there.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import json
import logging
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import transformers
from tqdm import tqdm

import checkpoint as C
import data as D
import grading
import lora as L
import model as M
import rewards as R
import rollout
from checkpoint import fault_point
from config import Config, parse_args

log = logging.getLogger("grpo")


# ----------------------------------------------------------------------------------------------------
# The GRPO math.
# ----------------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Group-relative advantages, one per response (the same for each of its tokens).

        A_i = (r_i - mean_j r_j) / (std_j r_j + eps)      (GRPO; std_normalize=False drops the division: Dr. GRPO)

    rewards: [num_prompts, group_size] -> advantages [num_prompts, group_size]. The std is the unbiased one
    (torch.std, as verl computes it).
    """
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centered
    return centered / (rewards.std(dim=1, keepdim=True) + eps)


def equal_reward_groups(rewards: torch.Tensor) -> torch.Tensor:
    """[P, G] -> [P] bool: groups whose rewards are all equal (zero advantage, no gradient)."""
    return (rewards == rewards[:, :1]).all(dim=1)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    seq_ids: torch.Tensor,
    *,
    num_seqs: int,
    num_tokens: int,
    ref_logp: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_coef: float = 0.001,
    entropy_coef: float = 0.001,
    agg: str = "token-mean",
    constant: float = 1.0,
    tis_cap: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token clipped-surrogate loss of GRPO with a k3 KL penalty and an entropy bonus.

    All inputs are flat over the response tokens of a micro-batch: [N]. seq_ids[t] is the index of token t's
    response within the micro-batch (responses are whole). For token t of response i, with
    rho_t = pi_theta(y_t|.) / pi_old(y_t|.) = exp(logp - old_logp):

        l_t = -min(rho_t * A_i, clip(rho_t, 1 - eps_low, 1 + eps_high) * A_i) * w_tis_t
              + kl_coef * KL_t - entropy_coef * H_t
        KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                   (k3, low variance, >= 0)
        w_tis_t = min(exp(old_logp_t - rollout_logp_t), tis_cap)           (truncated IS; 1 when off)

    Aggregation over a mini-batch of `num_seqs` responses with `num_tokens` tokens in all (global counts, so
    summing the returned loss over micro-batches gives the mini-batch loss):
        token-mean:          sum_t l_t / num_tokens                          (the paper, verl default)
        seq-mean-token-mean: sum_i (sum_{t in i} l_t / |y_i|) / num_seqs
        constant:            sum_t l_t / (constant * num_seqs)               (Dr. GRPO, constant = max length)
    """
    ratio = torch.exp(logp - old_logp)
    pg_unclipped = ratio * advantages
    pg_clipped = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * advantages
    pg = -torch.minimum(pg_unclipped, pg_clipped)
    if rollout_logp is not None and tis_cap > 0:
        pg = pg * torch.clamp(torch.exp(old_logp - rollout_logp), max=tis_cap).detach()
    per_token = pg
    kl = None
    if ref_logp is not None and kl_coef != 0:
        log_r = ref_logp - logp
        kl = torch.exp(log_r) - log_r - 1
        per_token = per_token + kl_coef * kl
    if entropy is not None and entropy_coef != 0:
        per_token = per_token - entropy_coef * entropy

    if agg == "token-mean":
        weights = torch.full_like(per_token, 1.0 / num_tokens)
    elif agg == "seq-mean-token-mean":
        seq_len = torch.bincount(seq_ids).to(per_token.dtype)  # [num responses in micro-batch]
        weights = 1.0 / (seq_len[seq_ids] * num_seqs)
    elif agg == "constant":
        weights = torch.full_like(per_token, 1.0 / (constant * num_seqs))
    else:
        raise ValueError(f"unknown loss aggregation {agg!r}")
    loss = (per_token * weights).sum()

    with torch.no_grad():  # metrics, summed over tokens: divide by the token count to report means
        clipped = (pg_clipped < pg_unclipped).float()  # where the clip is the active side of the min
        metrics = {
            "clip_frac": clipped.sum(),
            "ratio_min": ratio.min(),
            "ratio_max": ratio.max(),
            "kl": kl.sum() if kl is not None else torch.zeros(()),
            "entropy": entropy.sum() if entropy is not None else torch.zeros(()),
            "pg_loss": pg.sum(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------------------------------
# Scoring: grade every response (grading.py), then the length reward of each group (rewards.py).
# ----------------------------------------------------------------------------------------------------
@dataclass
class Episode:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    advantage: float
    rollout_logp: list[float] | None  # the engine's log-probs of the sampled tokens, when it has them


@dataclass
class StepRewards:
    """One rank's step, per response: each tensor is [num_prompts, group_size]."""

    reward: torch.Tensor  # r = correctness term + length term
    length_term: torch.Tensor  # the reward's length term alone
    correct: torch.Tensor  # 1 if graded correct
    length: torch.Tensor  # n_y: generated tokens, EOS included (a response cut at the limit counts as the limit)
    repeats: torch.Tensor  # 1 if it repeats a span of tokens (rewards.repeats)
    after: torch.Tensor  # tokens after the answer is first stated; 0 for a wrong response
    groups: list[R.Group]
    grading: grading.GradeStats


def compute_rewards(samples: list[D.Sample], completions, cfg: Config, reward_state=None) -> StepRewards:
    """Grade every response (bounded: --grade-deadline for the rank's batch), then score each prompt's group with
    --reward, which may read the group's lengths and correctness, and its state across steps if it has one."""
    flat = [(s, c) for s, group in zip(samples, completions) for c in group]
    correct, stats = grading.grade_batch(
        [c.text for _, c in flat],
        [s.problem.answer for s, _ in flat],
        [s.problem.multiple_choice for s, _ in flat],
        last_number_fallback=cfg.reward.last_number_fallback,
        deadline=cfg.reward.grade_deadline,
    )
    G, constants = cfg.grpo.group_size, cfg.reward.constants()
    groups, base, length = [], [], []
    for i, (s, group) in enumerate(zip(samples, completions)):
        ok = correct[i * G : (i + 1) * G]
        g = R.Group(
            correct=ok,
            lengths=[len(c.token_ids) for c in group],
            repeated=[R.repeats(c.token_ids) for c in group],
            after=[tokens_after_answer(c, s.problem.answer) if c_ok else 0 for c, c_ok in zip(group, ok)],
            boxed=[grading.extract_answer(c.text) is not None for c in group],
            target=s.target,
            mode=s.mode,
            limit=cfg.data.max_new_tokens,
            key=s.problem.id,
        )
        b, ln = R.score_group(cfg.reward.reward, g, constants, reward_state)
        groups.append(g)
        base.append(b)
        length.append(ln)
    shape = (len(samples), G)

    def tensor(rows):
        return torch.tensor(rows, dtype=torch.float32).view(shape)

    base, length = tensor(base), tensor(length)
    return StepRewards(
        reward=base + length,
        length_term=length,
        correct=tensor(correct),
        length=tensor([g.lengths for g in groups]),
        repeats=tensor([g.repeated for g in groups]),
        after=tensor([g.after for g in groups]),
        groups=groups,
        grading=stats,
    )


def tokens_after_answer(completion, gold: str) -> int:
    """The tokens of a response after its answer is first stated (grading.after_answer's share of its characters,
    in tokens: close enough for a reward, and it needs no tokenizer); 0 where the answer is not found."""
    fraction = grading.after_answer(completion.text, gold)
    return 0 if fraction is None else round(fraction * len(completion.token_ids))


# ----------------------------------------------------------------------------------------------------
# The update.
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LossSettings:
    """policy_loss's keyword settings, from the flags: one object for the update's loop."""

    eps_low: float
    eps_high: float
    kl_coef: float
    entropy_coef: float
    agg: str  # --loss-agg
    constant: float  # --loss-constant, 0 = --max-new-tokens
    tis_cap: float

    @classmethod
    def of(cls, cfg: Config) -> LossSettings:
        g = cfg.grpo
        constant = g.loss_constant or cfg.data.max_new_tokens
        return cls(g.eps_low, g.eps_high, g.kl_coef, g.entropy_coef, g.loss_agg, constant, g.tis_cap)


class Forwards:
    """Forward passes over one rank's episodes, which it names by their index in `episodes`."""

    def __init__(self, episodes: list[Episode], cfg: Config, dist_info, packed: bool) -> None:
        self.episodes, self.cfg, self.dist_info, self.packed = episodes, cfg, dist_info, packed

    def micro_batches(self, indices) -> list[list[int]]:
        """The episodes `indices` split into micro-batches that fit --tokens-per-microbatch, then empty ones up to
        the largest count of any rank: every forward of a sharded model is a collective, so all ranks run as many."""
        lengths = [len(self.episodes[i].prompt_ids) + len(self.episodes[i].response_ids) for i in indices]
        groups = M.make_microbatches(lengths, self.cfg.model.tokens_per_microbatch, padded=not self.packed)
        count = torch.tensor([len(groups)], device=self.dist_info.device)  # NCCL's collectives need it there
        if self.dist_info.world_size > 1:
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return [[indices[j] for j in group] for group in groups] + [[] for _ in range(int(count) - len(groups))]

    def logprobs(self, net, mb: list[int], grad: bool, entropy: bool = False):
        """log-probs (and entropies) of the micro-batch's response tokens under `net`, flat [N]; an empty
        micro-batch runs a dummy one-token sequence (it only joins the collectives)."""
        seqs = [self.episodes[i] for i in mb] or [Episode([0], [0], 0.0, 0.0, None)]
        with torch.set_grad_enabled(grad):
            return M.response_logprobs(
                net,
                [e.prompt_ids + e.response_ids for e in seqs],
                [len(e.prompt_ids) for e in seqs],
                temperature=self.cfg.data.temperature,
                packed=self.packed,
                with_entropy=entropy,
            )

    def frozen(self, net, indices) -> list[torch.Tensor | None]:
        """log-probs under a frozen `net` (no gradient), one tensor per episode, aligned with `episodes`: None for
        an episode not in `indices`."""
        out: list[torch.Tensor | None] = [None] * len(self.episodes)
        for mb in self.micro_batches(indices):
            lp, _ = self.logprobs(net, mb, grad=False)
            if mb:  # an empty micro-batch only joins the collectives
                for i, t in zip(mb, lp.split([len(self.episodes[i].response_ids) for i in mb])):
                    out[i] = t
        return out


def frozen_logprobs(fwd: Forwards, policy, ref_policy, cfg: Config, per_mb: int) -> tuple[list, list]:
    """The log-probs the update holds fixed, aligned with the episodes: pi_old's and the reference's, each a
    tensor per episode or None where the update needs none.

    pi_old is the policy before this batch's first optimizer step: a frozen pass for every episode trained after
    that step (past the first mini-batch of `per_mb` episodes, and all of them with more than one epoch). The
    reference (`ref_policy`, None without a KL term) for every episode. The passes run in this order on every rank
    (their forwards are collectives)."""
    g, n = cfg.grpo, len(fwd.episodes)
    old, ref = [None] * n, [None] * n
    if g.minibatches * g.epochs > 1:  # the same on every rank
        old = fwd.frozen(policy, range(per_mb if g.epochs == 1 else 0, n))
    if ref_policy is not None:
        with L.adapters_off(ref_policy):  # LoRA: the reference is the policy's own frozen base (lora.py)
            ref = fwd.frozen(ref_policy, range(n))
    return old, ref


def update_policy(
    policy, ref_policy, optimizer, episodes: list[Episode], cfg: Config, dist_info, packed: bool, step: int = 0
) -> dict:
    """Clipped-surrogate updates on this rank's episodes, `minibatches` optimizer steps per epoch.

    Every forward of a sharded model is a collective, so all ranks run the same number of micro-batches:
    a rank with fewer pads with an empty one (a forward on a dummy token whose loss is multiplied by 0).
    Returns metrics summed over this rank's tokens.
    """
    g, device = cfg.grpo, dist_info.device
    stats = {k: 0.0 for k in ("clip_frac", "kl", "entropy", "pg_loss", "tokens", "grad_norm", "tis_mismatch")}
    stats.update(ratio_min=float("inf"), ratio_max=0.0)
    fwd, loss_cfg = Forwards(episodes, cfg, dist_info, packed), asdict(LossSettings.of(cfg))
    per_mb = math.ceil(len(episodes) / g.minibatches)  # episodes per mini-batch
    old, ref = frozen_logprobs(fwd, policy, ref_policy, cfg, per_mb)
    for _ in range(g.epochs):
        for k in range(g.minibatches):
            mbatch = range(k * per_mb, min((k + 1) * per_mb, len(episodes)))
            # Global counts of this mini-batch (all ranks), so every rank's loss has the same normalizer.
            counts = torch.tensor(
                [len(mbatch), sum(len(episodes[i].response_ids) for i in mbatch)], dtype=torch.float64, device=device
            )
            if dist_info.world_size > 1:
                dist.all_reduce(counts)
            totals = dict(num_seqs=int(counts[0]), num_tokens=int(counts[1]))  # policy_loss's normalizers
            if totals["num_tokens"] == 0:  # every group dropped on every rank: nothing to learn from
                continue
            optimizer.zero_grad(set_to_none=True)
            for mb in fwd.micro_batches(mbatch):
                logp, ent = fwd.logprobs(policy, mb, grad=True, entropy=g.entropy_coef != 0)  # [N]
                if not mb:  # padding micro-batch: join the collectives, contribute nothing
                    (logp.sum() * 0).backward()
                    continue
                eps = [episodes[i] for i in mb]
                lens = torch.tensor([len(e.response_ids) for e in eps])
                seq_ids = torch.repeat_interleave(torch.arange(len(eps)), lens).to(logp.device)
                adv = torch.repeat_interleave(torch.tensor([e.advantage for e in eps]), lens).to(logp.device)
                # pi_old: before the batch's first optimizer step it is the policy itself, so logp.detach() is it
                # exactly; after that step, the frozen pass's (frozen_logprobs).
                old_lp = logp.detach() if old[mb[0]] is None else torch.cat([old[i] for i in mb])
                ref_lp = torch.cat([ref[i] for i in mb]) if ref_policy is not None else None
                roll = None
                if all(e.rollout_logp is not None for e in eps):
                    roll = torch.tensor([x for e in eps for x in e.rollout_logp], device=logp.device)
                    stats["tis_mismatch"] += (old_lp - roll).abs().sum().item()
                loss, m = policy_loss(
                    logp, old_lp, adv, seq_ids, ref_logp=ref_lp, entropy=ent, rollout_logp=roll, **totals, **loss_cfg
                )
                loss.backward()  # summed over ranks by FSDP (model.shard_model): the loss is a global mean
                for key in ("clip_frac", "kl", "entropy", "pg_loss"):
                    stats[key] += m[key].item()
                stats["ratio_min"] = min(stats["ratio_min"], m["ratio_min"].item())
                stats["ratio_max"] = max(stats["ratio_max"], m["ratio_max"].item())
                stats["tokens"] += int(lens.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), g.grad_clip)
            stats["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
            fault_point("update", step)  # (crash tests: one optimizer step of this batch done)
    return stats


# ----------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------
def train(cfg: Config) -> None:
    out = Path(cfg.run.out)
    earlier = C.checkpoint_dirs(out)
    # A new run must not write into an earlier one: its metrics would be appended to theirs, and pruning or a later
    # --resume would take the earlier run's checkpoints for its own.
    if not cfg.run.resume and earlier:
        raise SystemExit(
            f"--out {out} already holds checkpoints of an earlier run (newest: {earlier[-1].name}); "
            "pass --resume to continue it, or start the new run in another --out (or delete that "
            "directory)"
        )
    resume_from = C.newest(out) if cfg.run.resume else None
    branch = resume_from is None and bool(cfg.run.branch_from)  # start from another run's checkpoint
    if branch:
        resume_from = Path(cfg.run.branch_from)
    dist_info = M.init_distributed()
    torch.manual_seed(cfg.run.seed + dist_info.rank)
    random.seed(cfg.run.seed + dist_info.rank)
    is_main = dist_info.rank == 0
    log.info(
        "rank %d: device %s, cores %s, %d torch threads",
        dist_info.rank,
        dist_info.device,
        sorted(os.sched_getaffinity(0)),
        torch.get_num_threads(),
    )

    # Data, checked before anything is written: bad input stops here, and --out keeps what it had.
    model_dir = M.resolve_model_on_every_rank(cfg.model.model, dist_info.local_rank)  # each node into its own cache
    tokenizer = M.load_tokenizer(model_dir)
    problems = D.load_problems(
        cfg.data.data,
        question_field=cfg.data.question_field,
        answer_field=cfg.data.answer_field,
        split="train",
        seed=cfg.run.seed,
        skip_bad=cfg.data.skip_bad,
    )
    problems = _drop_prompts_over_limit(problems, tokenizer, cfg)
    # Every rank runs the same seeded stream and takes its own slice of each global batch.
    stream = D.PromptStream(
        problems,
        mode=cfg.data.target,
        target_lo=cfg.data.target_min,
        target_hi=cfg.data.target_max,
        target_dist=cfg.data.target_dist,
        seed=cfg.run.seed,
        targets_per_problem=cfg.data.targets_per_problem,
    )
    bf16 = M.use_bf16(dist_info.device, cfg.model.dtype)  # bf16 compute over fp32 master weights (model.use_bf16)
    lora = cfg.model.lora_rank > 0  # a frozen base (stored in bf16 where the compute is) plus fp32 adapters: lora.py
    base_dtype = torch.bfloat16 if lora and bf16 else torch.float32
    base = None  # LoRA: the base's identity, recorded in checkpoints and checked on resume
    if lora and is_main:
        base = dict(L.base_identity(model_dir), dtype=str(base_dtype).removeprefix("torch."))
    if resume_from is not None:
        saved = C.verify(resume_from)
        for change in C.check_config(saved["config"], cfg, dist_info.world_size, saved["world_size"], branch):
            log.warning("%s %s: %s", "--branch-from" if branch else "--resume from", resume_from, change)
        C.check_base(saved, resume_from, base)

    # Model, reference and optimizer. Every rank holds a shard; the engine holds its own full copy.
    policy = M.load_model(model_dir, device=dist_info.device, dtype=base_dtype)
    if lora:
        L.apply_lora(policy, cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.lora_targets, seed=cfg.run.seed)
    policy = M.shard_model(policy, mixed_precision=bf16, activation_checkpointing=cfg.model.activation_checkpointing)
    ref_policy = None
    if cfg.grpo.kl_coef != 0:  # the frozen reference exists only when the KL term is used
        if lora:  # the policy with its adapters off (frozen_logprobs): no second copy
            ref_policy = policy
        else:
            ref_policy = M.shard_model(M.load_model(model_dir, device=dist_info.device), mixed_precision=bf16)
            ref_policy.requires_grad_(False)
    # Padding-free packing pays off with a varlen kernel; with SDPA a packed row needs a dense mask.
    packed = cfg.model.packed == "on" or (cfg.model.packed == "auto" and M.prefers_packing(policy))
    trained = L.trainable_parameters(policy)  # the adapters under LoRA, else every parameter
    optimizer = torch.optim.AdamW(trained, lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
    engine = rollout.make_engine(
        cfg.model.engine,
        model_dir,
        device=dist_info.device,
        seed=cfg.run.seed + dist_info.rank,
        dtype=torch.bfloat16 if bf16 else torch.float32,
        hf_batch_size=cfg.model.hf_batch_size,
        max_model_len=cfg.data.max_prompt_tokens + cfg.data.max_new_tokens,
        max_num_seqs=math.ceil(cfg.grpo.prompts_per_step / dist_info.world_size) * cfg.grpo.group_size,
        vllm_gpu_memory_utilization=cfg.model.vllm_gpu_memory_utilization,
        vllm_kv_cache_bytes=int(cfg.model.vllm_kv_cache_gib * 2**30) or None,
    )
    reward_state = R.REWARDS[cfg.reward.reward].new_state()  # its state across steps; None for most rewards

    start = 0
    if resume_from is not None:
        # A branch with another reward starts that reward's state afresh.
        same_reward = saved["config"]["reward"]["reward"] == cfg.reward.reward
        start = int(
            C.load(resume_from, policy, optimizer, stream, reward_state if same_reward else None, dist_info)["step"]
        )
        log.warning("%s %s at step %d", "branched from" if branch else "resumed from", resume_from, start)
        engine.load_weights(L.full_weights(policy))
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        if resume_from is not None and (dropped := C.trim_metrics(out, start)):
            log.warning("--resume: dropped %d metrics line(s) of steps after %d", dropped, start)
        print(json.dumps(asdict(cfg), indent=1), flush=True)

    stop = {"flag": False}  # SIGTERM: finish the step, save, exit
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    sampling = rollout.SamplingConfig(
        temperature=cfg.data.temperature, top_p=cfg.data.top_p, max_new_tokens=cfg.data.max_new_tokens
    )
    pbar = _progress(start, cfg.run.steps, is_main)
    for step in range(start + 1, cfg.run.steps + 1):
        t0 = time.perf_counter()
        # 1. Sample prompts with targets (the whole batch on every rank: same stream), keep this rank's share.
        batch = stream.next_batch(cfg.grpo.prompts_per_step, tokenizer)
        samples = batch[dist_info.rank :: dist_info.world_size]
        prompt_ids = [_prompt_ids(tokenizer, s.prompt, cfg.data.max_prompt_tokens) for s in samples]

        # 2. Generate G responses per prompt.
        sampling.seed = cfg.run.seed * 1_000_003 + step * 1009 + dist_info.rank
        completions = engine.generate(prompt_ids, cfg.grpo.group_size, sampling)  # [P_rank][G]
        engine.sleep()
        fault_point("generate", step)  # (crash tests: kill with the step's responses generated)
        t1 = time.perf_counter()

        # 3. Grade and score; 4. group-relative advantages.
        scores = compute_rewards(samples, completions, cfg, reward_state)
        rewards = scores.reward  # [P_rank, G]
        adv = group_advantages(rewards, cfg.grpo.std_normalize)
        keep = ~equal_reward_groups(rewards) if cfg.grpo.drop_equal_groups else torch.ones(len(samples), dtype=bool)
        episodes = [
            Episode(pids, c.token_ids, rewards[i, j].item(), adv[i, j].item(), c.logprobs)
            for i, (pids, group) in enumerate(zip(prompt_ids, completions))
            if keep[i]
            for j, c in enumerate(group)
        ]
        t2 = time.perf_counter()

        # 5. Update the policy.
        stats = update_policy(policy, ref_policy, optimizer, episodes, cfg, dist_info, packed, step)
        if dist_info.device.type == "cuda":  # hand the trainer's cached activations back before the engine's KV cache
            torch.cuda.empty_cache()
        else:  # the CPU twin, only when memory runs short: the next update reuses the heap
            M.release_cpu_heap()
        t3 = time.perf_counter()

        # 6. Push the new weights into the engine (a collective: every rank, same order).
        engine.wake_up(["weights"])
        engine.load_weights(L.full_weights(policy))  # under LoRA the merged W + (alpha / r) B A
        engine.wake_up(["kv_cache"])
        if reward_state is not None:  # it takes the step's groups, every rank's
            reward_state.after_step(scores.groups, gather=lambda obj: _gather_objects(obj, dist_info))
        t4 = time.perf_counter()

        # Log, then checkpoint.
        metrics = step_metrics(
            step,
            samples,
            completions,
            scores,
            stats,
            dist_info,
            times=dict(generate=t1 - t0, score=t2 - t1, train=t3 - t2, sync=t4 - t3, step=t4 - t0),
        )
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            pbar.update(1)
            pbar.write(_summary(metrics))
        fault_point("metrics", step)  # (crash tests: the step is logged, its checkpoint not written)

        flag = torch.tensor([float(stop["flag"])], device=dist_info.device)
        if dist_info.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if step % cfg.run.save_every == 0 or step == cfg.run.steps or flag.item():
            last = step == cfg.run.steps or bool(flag.item())  # a LoRA run writes its merged model here
            path = C.save(step, policy, tokenizer, optimizer, stream, reward_state, cfg, dist_info, base, last)
            if is_main:
                pbar.write(f"saved {path}")
        if flag.item():
            if is_main:
                pbar.write(f"SIGTERM: saved step {step}; continue with --resume")
            break
    pbar.close()
    engine.close()
    if dist.is_initialized():
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------
# Metrics: named sums over this rank, one all-reduce, then means.
# ----------------------------------------------------------------------------------------------------
def step_metrics(step: int, samples, completions, scores: StepRewards, stats: dict, dist_info, times: dict) -> dict:
    """The step's metrics line. Every mean is a sum over all ranks divided by a count over all ranks, so the line
    is the same for any world size; adding a metric is a line in `sums` and a line in the returned dict."""
    lengths = scores.length
    targets = torch.tensor([s.target or 0 for s in samples], dtype=torch.float32)[:, None].expand_as(lengths)
    off = (lengths - targets).abs()  # tokens off the target
    sums = reduce_named(
        {
            "responses": lengths.numel(),
            "groups": len(samples),
            "tokens": stats["tokens"],
            "reward": scores.reward.sum(),
            "length_term": scores.length_term.sum(),
            "correct": scores.correct.sum(),
            "length": lengths.sum(),
            "abs_dev": off.sum(),
            "rel_dev": (off / targets.clamp(min=1)).sum(),
            "over": (lengths > targets).sum(),
            "repeats": scores.repeats.sum(),
            "after": (scores.after / lengths.clamp(min=1)).sum(),  # a wrong response's is 0
            "truncated": sum(c.finish_reason == "length" for group in completions for c in group),
            "equal_groups": equal_reward_groups(scores.reward).sum(),
            "clip_frac": stats["clip_frac"],
            "kl": stats["kl"],
            "entropy": stats["entropy"],
            "tis_mismatch": stats["tis_mismatch"],
            "graded_symbolic": scores.grading.symbolic,
            "grade_bounded": scores.grading.bounded,  # graded wrong because a time bound hit them
            # Pearson r(target, length) from sums, over the step's responses
            "t": targets.sum(),
            "tt": (targets**2).sum(),
            "ll": (lengths**2).sum(),
            "tl": (targets * lengths).sum(),
        },
        dist_info,
    )
    most = reduce_named(
        {
            "ratio_max": stats["ratio_max"],
            "neg_ratio_min": -stats["ratio_min"],
            "grade_seconds": scores.grading.seconds,
            "memory": M.peak_memory_gib(dist_info.device),
        },
        dist_info,
        op=dist.ReduceOp.MAX,
    )
    n, tok = sums["responses"], max(sums["tokens"], 1.0)
    return dict(
        step=step,
        reward=sums["reward"] / n,
        length_term=sums["length_term"] / n,
        accuracy=sums["correct"] / n,
        response_len=sums["length"] / n,
        abs_len_dev=sums["abs_dev"] / n,
        rel_len_dev=sums["rel_dev"] / n,
        len_target_corr=pearson_from_sums(n, sums["t"], sums["length"], sums["tt"], sums["ll"], sums["tl"]),
        over_target=sums["over"] / n,
        truncated=sums["truncated"] / n,
        repeats=sums["repeats"] / n,
        after_answer=sums["after"] / max(sums["correct"], 1.0),  # share of a correct response after its answer
        equal_groups=sums["equal_groups"] / sums["groups"],
        clip_frac=sums["clip_frac"] / tok,
        kl=sums["kl"] / tok,
        entropy=sums["entropy"] / tok,
        tis_mismatch=sums["tis_mismatch"] / tok,
        ratio_min=-most["neg_ratio_min"],
        ratio_max=most["ratio_max"],
        grad_norm=stats["grad_norm"],
        graded_symbolic=sums["graded_symbolic"] / n,
        grade_bounded=int(sums["grade_bounded"]),
        time_grade_max=most["grade_seconds"],
        memory_peak_gib=most["memory"],  # the largest rank's peak so far (model.peak_memory_gib)
        **{f"time_{k}": v for k, v in times.items()},
    )


def reduce_named(values: dict, dist_info, op=dist.ReduceOp.SUM) -> dict[str, float]:
    """All-reduce a dict of numbers (or 0-d tensors) by name: one collective for all of them."""
    packed = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=dist_info.device)
    if dist_info.world_size > 1:
        dist.all_reduce(packed, op=op)
    return dict(zip(values, packed.tolist()))


def _gather_objects(obj, dist_info) -> list:
    """Every rank's `obj` (picklable), in rank order."""
    if dist_info.world_size == 1:
        return [obj]
    parts = [None] * dist_info.world_size
    dist.all_gather_object(parts, obj)
    return parts


def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float | None:
    """Pearson r from sums (what an all_reduce can gather): None when either variable is constant."""
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    if var_x <= 1e-9 * max(1.0, n * sxx) or var_y <= 1e-9 * max(1.0, n * syy):
        return None
    return (n * sxy - sx * sy) / math.sqrt(var_x * var_y)


# ----------------------------------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------------------------------
def _prompt_ids(tokenizer, prompt: str, limit: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > limit:
        raise ValueError(f"a prompt has {len(ids)} tokens, over --max-prompt-tokens {limit}: {prompt[:80]!r}...")
    return ids


def _drop_prompts_over_limit(problems, tokenizer, cfg: Config):
    """The problems whose prompt, with the longest target sentence, fits in --max-prompt-tokens; logs how many were
    dropped, and raises if none is left."""
    mode = "max" if cfg.data.target in ("max", "mixed") else cfg.data.target  # "maximum" is the longest sentence
    target = cfg.data.target_max if mode != "none" else None
    kept = [
        p
        for p in problems
        if len(tokenizer(D.format_prompt(tokenizer, p, target, mode), add_special_tokens=False)["input_ids"])
        <= cfg.data.max_prompt_tokens
    ]
    if len(kept) < len(problems):
        log.warning(
            "dropped %d of %d problems whose prompt is over --max-prompt-tokens %d",
            len(problems) - len(kept),
            len(problems),
            cfg.data.max_prompt_tokens,
        )
    if not kept:
        raise ValueError(f"--data {cfg.data.data}: no problem fits in --max-prompt-tokens {cfg.data.max_prompt_tokens}")
    return kept


def _summary(m: dict) -> str:
    return (
        f"step {m['step']:>4} | reward {m['reward']:+.3f} acc {m['accuracy']:.2f} | len {m['response_len']:6.1f} "
        f"rel_dev {m['rel_len_dev']:.2f} rep {m['repeats']:.2f} after {m['after_answer']:.2f} | kl {m['kl']:.4f} "
        f"clip {m['clip_frac']:.3f} ent {m['entropy']:.2f} gnorm {m['grad_norm']:.3f} | gen {m['time_generate']:.1f}s "
        f"score {m['time_score']:.1f}s train {m['time_train']:.1f}s sync {m['time_sync']:.1f}s"
    )


def _progress(start: int, total: int, enabled: bool):
    return tqdm(total=total, initial=start, desc="grpo", disable=not enabled, dynamic_ncols=True, file=sys.stdout)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    transformers.utils.logging.disable_progress_bar()  # per-file loading bars would drown the step lines
    train(parse_args(description=__doc__))
    M.exit_finished()  # the run is saved and closed: skip interpreter finalization (seconds, with vLLM)
