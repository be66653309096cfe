"""Checkpoints: what a training run leaves on disk, and how `--resume` continues it after a stop or a crash.

    --out/config.json            the configuration of the latest start
    --out/metrics.jsonl          one line per step
    --out/checkpoints/step_NNNNNN/
        model/                   Hugging Face save_pretrained layout (safetensors): loadable by transformers and
                                 vLLM; under LoRA the merged model, at the run's last save only (lora.py merge)
        adapter/                 LoRA only: the adapter in peft's layout (adapter_config.json,
                                 adapter_model.safetensors)
        optim/                   the sharded AdamW state (torch.distributed.checkpoint)
        rng_rank*.pt             each rank's RNG states
        state.json               step, data-stream position, the reward's state across steps (if it has one), world
                                 size, the LoRA base model's identity, config, and the size of every file above;
                                 written last

What survives a kill (SIGKILL included, at any moment): a checkpoint is written into `step_N.tmp/` and renamed to
`step_N/` only once its state.json is in place, so a killed save leaves a `.tmp` directory (or a directory without
state.json) that `--resume` skips, saying why, and the previous checkpoint intact. A complete checkpoint whose
files do not match the sizes in its state.json (a truncated shard) or cannot be read is an error naming the file:
never a silent start from scratch. metrics.jsonl is cut back to the checkpoint's step on resume (a line half
written when the run was killed included), so steps are neither repeated nor missing.

`LCPO_FAULT=<point>:<step>` (tests only) kills the whole run with SIGKILL at a named point of a step
(`fault_point`): the crash tests resume from what that leaves and compare with an uninterrupted run.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import json
import logging
import os
import random
import shutil
import signal
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import lora as L
import model as M

log = logging.getLogger("checkpoint")
STATE = "state.json"

# What may change between a checkpoint and its --resume: how the run executes (engine, dtype, micro-batching,
# memory, checkpoint cadence, how many steps). Each change is logged as a warning. A change to any other field
# (the model, data, prompts, reward, sampling, optimization, seed) would not continue the same run: refused.
FREE_ON_RESUME = {
    "steps",
    "out",
    "save_every",
    "keep_checkpoints",
    "resume",
    "branch_from",
    "preset",
    "engine",
    "dtype",
    "packed",
    "tokens_per_microbatch",
    "activation_checkpointing",
    "vllm_gpu_memory_utilization",
    "vllm_kv_cache_gib",
    "hf_batch_size",
    "grade_deadline",
}


def fault_point(name: str, step: int) -> None:
    """Tests only: with LCPO_FAULT=<name>:<step>, kill the whole run here with SIGKILL, as a node failure would: under
    torchrun its agent (this process's parent) and every rank (the agent's children, each in a session of its own);
    else this process."""
    if os.environ.get("LCPO_FAULT") != f"{name}:{step}":
        return
    me, victims = os.getpid(), []
    if "TORCHELASTIC_RUN_ID" in os.environ:  # under torchrun: the agent first, then the other ranks
        # (the agent first: killed after a rank, it could see that rank die and exit 1 before its own SIGKILL came)
        agent = os.getppid()
        victims = [agent] + [pid for pid in _children(agent) if pid != me]
    for pid in [*victims, me]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _children(pid: int) -> list[int]:
    """The processes whose parent is pid (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "(comm)": state, ppid, ...
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


# ------------------------------------------------------------------------------------------------- finding
def checkpoint_dirs(out: Path) -> list[Path]:
    """Complete checkpoints (a `step_N` directory with its state.json), oldest first."""
    root = Path(out) / "checkpoints"
    found = [p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp") and (p / STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def incomplete_dirs(out: Path) -> list[tuple[Path, str]]:
    """What a killed save leaves behind, each with why --resume skips it."""
    root = Path(out) / "checkpoints"
    skipped = []
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if p.name.endswith(".tmp"):
            skipped.append((p, "a save that did not finish (.tmp)"))
        elif p.is_dir() and not (p / STATE).is_file():
            skipped.append((p, f"no {STATE}: the save did not finish"))
    return skipped


def verify(path: Path) -> dict:
    """The checkpoint's state, after checking that every file it lists is there with the size it was written
    with. A mismatch is an error that names the file."""
    try:
        state = json.loads((path / STATE).read_text())
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot resume from checkpoint {path}: {path / STATE} cannot be read: {e}") from e
    lacking = [k for k in ("step", "stream", "world_size", "config", "files") if k not in state]
    if lacking:
        raise RuntimeError(f"cannot resume from checkpoint {path}: its {STATE} lacks {', '.join(lacking)}")
    for rel, size in state["files"].items():
        f = path / rel
        if not f.is_file():
            raise RuntimeError(f"cannot resume from checkpoint {path}: {f} is missing (listed in its {STATE})")
        if f.stat().st_size != size:
            raise RuntimeError(
                f"cannot resume from checkpoint {path}: {f} has {f.stat().st_size} bytes, "
                f"{size} when it was written (truncated or overwritten)"
            )
    return state


# -------------------------------------------------------------------------------------------------- saving
def save(step: int, policy, tokenizer, optimizer, stream, reward_state, cfg, dist_info, base=None, last=False) -> Path:
    """Write to step_N.tmp, then rename: a kill mid-save leaves the previous checkpoint intact. Then delete all but
    the newest --keep-checkpoints (a 1.5B policy's checkpoint, fp32 weights and Adam moments, is about 18 GB).
    A LoRA policy (lora.py) saves its adapter, and its merged model only at the run's `last` save; `base` is its base
    model's identity (lora.base_identity), on rank 0."""
    final = Path(cfg.run.out) / "checkpoints" / f"step_{step:06d}"
    try:
        _write(final, step, policy, tokenizer, optimizer, stream, reward_state, cfg, dist_info, base, last)
    except Exception as e:  # a full disk shows up deep in torch.save as "unexpected pos 704 vs 598"
        free = shutil.disk_usage(final.parent).free / 2**30 if final.parent.exists() else float("nan")
        raise RuntimeError(
            f"saving checkpoint {final} failed ({free:.1f} GiB free there; earlier checkpoints are "
            f"intact, continue with --resume): {type(e).__name__}: {e}"
        ) from e
    if dist_info.rank == 0 and cfg.run.keep_checkpoints > 0:
        for old in checkpoint_dirs(Path(cfg.run.out))[: -cfg.run.keep_checkpoints]:
            shutil.rmtree(old)
    _barrier(dist_info)
    return final


def _write(final: Path, step, policy, tokenizer, optimizer, stream, reward_state, cfg, dist_info, base, last) -> None:
    tmp = final.with_name(final.name + ".tmp")
    if dist_info.rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(dist_info)
    lora = bool(L.lora_modules(policy))
    if lora:
        L.save_adapter(policy, tmp / "adapter", base and base["path"], rank=dist_info.rank)
    if not lora or last:
        M.save_hf_checkpoint(policy, tokenizer, tmp / "model", rank=dist_info.rank, weights=L.full_weights(policy))
    fault_point("save", step)  # (crash tests: the model is written, the optimizer not yet)
    dcp.save({"optim": get_optimizer_state_dict(policy, optimizer)}, checkpoint_id=str(tmp / "optim"))
    torch.save({"torch": torch.get_rng_state(), "python": random.getstate()}, tmp / f"rng_rank{dist_info.rank}.pt")
    _barrier(dist_info)
    if dist_info.rank == 0:
        files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
        state = {
            "step": step,
            "stream": stream.state_dict(),
            "reward_state": reward_state.state_dict() if reward_state is not None else None,
            "world_size": dist_info.world_size,
            "base_model": base,  # LoRA: the base the adapter is trained on (path, sha256, dtype); else None
            "config": asdict(cfg),
            "files": files,
        }
        _atomic_write(tmp / STATE, json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)


def _atomic_write(path: Path, text: str) -> None:
    """Write a sibling file, then rename it over `path`: a reader never sees half of it."""
    part = path.with_name(path.name + ".part")
    part.write_text(text)
    os.replace(part, path)


# ------------------------------------------------------------------------------------------------- resuming
def newest(out: Path) -> Path:
    """The newest complete checkpoint of --out, logging every incomplete one it skips and why."""
    for path, why in incomplete_dirs(out):
        log.warning("--resume: skipping %s: %s", path, why)
    found = checkpoint_dirs(out)
    if not found:
        raise SystemExit(f"--resume: no complete checkpoint under {Path(out) / 'checkpoints'}")
    return found[-1]


def check_config(saved: dict, cfg, world_size: int, saved_world_size: int, branch: bool = False) -> list[str]:
    """The resume rule: a change to a field outside FREE_ON_RESUME is refused (SystemExit naming the flags); a
    change inside it, and a different world size, is returned as a warning to log. A new run that starts from the
    checkpoint (--branch-from) may change anything: every change is returned."""
    refused, changed = [], []
    for group, fields in asdict(cfg).items():
        for name, value in fields.items():
            before = saved.get(group, {}).get(name, value)
            if before != value and name not in ("resume", "preset"):
                (changed if name in FREE_ON_RESUME or branch else refused).append(
                    f"--{name.replace('_', '-')} {before!r} -> {value!r}"
                )
    if refused:
        raise SystemExit(
            "--resume: the checkpoint was trained with other settings that define the run, so "
            f"continuing it with these would not be the same run: {'; '.join(refused)}. Resume with "
            "the checkpoint's values (its state.json has them), or start a new run in another --out"
        )
    if world_size != saved_world_size:
        changed.append(
            f"world size {saved_world_size} -> {world_size} (the optimizer state is resharded; each "
            "rank's sampling seeds and RNG streams differ, so the run continues, but not exactly as it "
            "would have)"
        )
    return changed


def check_base(state: dict, path: Path, base: dict | None) -> None:
    """A LoRA run resumes only on the base model its adapter was trained on: `base` (lora.base_identity of this
    run's base; None on ranks other than 0, which skip the check) against what the checkpoint's state.json recorded.
    SystemExit naming both when the weights differ."""
    if base is None:
        return
    saved = state.get("base_model") or {}
    if saved.get("sha256") != base["sha256"]:
        raise SystemExit(
            f"--resume: checkpoint {path} trained its LoRA adapter on the base model in {saved.get('path')} "
            f"(sha256 {saved.get('sha256')}); this run's base, {base['path']}, has other weights "
            f"(sha256 {base['sha256']}). An adapter only continues on its own base"
        )


def load(path: Path, policy, optimizer, stream, reward_state, dist_info) -> dict:
    """Load a verified checkpoint into the sharded policy and optimizer, the data stream and the reward's state (None
    for a reward without one); returns its state.json. Any failure names the checkpoint (and the file, where it is
    one). A LoRA policy loads its adapter alone (its base is checked by `check_base`)."""
    state = verify(path)
    lora = bool(L.lora_modules(policy))
    try:
        if lora:
            full = L.read_adapter(path / "adapter")[1]
            if set(full) != set(L.adapter_names(policy)):  # strict=False below would skip a missing one
                raise RuntimeError(f"{path / 'adapter'} does not hold this run's adapters (--lora-targets?)")
            set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True, strict=False))
        else:
            full = M.read_safetensors(path / "model")
            set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True))
        optim_sd = get_optimizer_state_dict(policy, optimizer)
        dcp.load({"optim": optim_sd}, checkpoint_id=str(path / "optim"))
        set_optimizer_state_dict(policy, optimizer, optim_sd)
        stream.load_state_dict(state["stream"])
        if reward_state is not None:
            reward_state.load_state_dict(state["reward_state"])
        rng_file = path / f"rng_rank{dist_info.rank}.pt"
        if rng_file.exists():  # absent for a rank the run did not have before (a larger world size)
            rng = torch.load(rng_file, weights_only=False)
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
    except Exception as e:  # re-raised with the checkpoint named: never swallowed
        raise RuntimeError(f"cannot resume from checkpoint {path}: {type(e).__name__}: {e}") from e
    return state


def trim_metrics(out: Path, step: int) -> int:
    """Keep the metrics.jsonl lines of steps <= step (and drop a line a kill left half written); atomic. Returns
    how many lines were dropped."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            ok = json.loads(line)["step"] <= step
        except (ValueError, KeyError, TypeError):
            ok = False  # half written, or not a metrics line
        kept += [line] if ok else []
        dropped += not ok and bool(line.strip())
    _atomic_write(path, "".join(ln + "\n" for ln in kept))
    return dropped


def _barrier(dist_info) -> None:
    if dist_info.world_size > 1:
        dist.barrier()
