"""LoRA policy updates (Hu et al., 2021, arXiv 2106.09685): the policy is a frozen base plus low-rank adapters.

    h = W x + (alpha / r) B A x        W [out, in] frozen; A [r, in] and B [out, r] trained; B = 0 at the start

What `--lora-rank R` (R > 0) changes in a run, and why:
- AdamW holds A and B only: no gradient and no moments for W, and the frozen layers skip their weight-gradient
  matmuls. A 7B policy's fp32 weights, gradients and two moments (about 112 GB) shrink to its weights.
- The KL term's reference policy is the same model with the adapters switched off (`adapters_off`): no second copy.
- The rollout engine gets W + (alpha / r) B A (`full_weights`), computed out of place in fp32, one layer at a time:
  the stored W is never modified, so there is no merge-and-unmerge drift (TRL's in-place merge drifts in bf16).
- A checkpoint holds the adapter in peft's layout (`save_adapter`: adapter_config.json and
  adapter_model.safetensors, which `peft.PeftModel.from_pretrained` and vLLM's LoRA loader read), the base model's
  identity (`base_identity`, which --resume checks), and, at the run's last save, the merged model in
  save_pretrained layout for evaluate.py and vLLM. `python lora.py merge CHECKPOINT` writes it for any other save.
- Where the run computes in bf16 (GPUs, CPUs with bf16 instructions), the frozen base is stored in bf16: its master
  copy would only ever be rounded to bf16 for the forward, and FSDP2 requires one dtype among the *trainable*
  parameters of a unit only, so the fp32 adapters share each block's unit with it.

The initialization is peft's (A Kaiming-uniform, B zero), drawn from a generator of its own seeded by --seed, so
every rank (and a run on any number of ranks) starts from the same adapters.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import argparse
import contextlib
import hashlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

import model as M

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
PEFT_PREFIX = "base_model.model."  # peft's key prefix: PeftModel -> LoraModel -> the causal LM
ALL_LINEAR = "all-linear"  # --lora-targets: every nn.Linear of the decoder blocks (peft's name for it)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha / r) B A. Submodule names follow peft's (base_layer, lora_A, lora_B), so the
    adapter's state-dict keys are peft's once its adapter-name level is dropped."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, generator: torch.Generator) -> None:
        super().__init__()
        self.base_layer = base
        # fp32, drawn below on the CPU (the generator's device); skip_init leaves torch's global RNG untouched
        self.lora_A = nn.utils.skip_init(nn.Linear, base.in_features, rank, bias=False)
        self.lora_B = nn.utils.skip_init(nn.Linear, rank, base.out_features, bias=False)
        self.scaling = alpha / rank
        self.enabled = True
        with torch.no_grad():  # peft's init_lora_weights=True
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(base.weight.device)
        self.lora_B.to(base.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base_layer(x)  # [..., out]
        if not self.enabled:
            return out
        return out + self.lora_B(self.lora_A(x)) * self.scaling  # [..., in] -> [..., r] -> [..., out]


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str = ALL_LINEAR, seed: int = 0) -> list[str]:
    """Wrap the target linear layers of every decoder block in `LoRALinear`, in place, and freeze all but the
    adapters; before `model.shard_model`. Returns the wrapped modules' names (HF names).

    targets: "all-linear", or comma-separated leaf names ("q_proj,v_proj"); a name that matches no linear layer of
    the decoder blocks is an error that lists the ones there are."""
    if rank < 1 or alpha <= 0:
        raise ValueError(f"--lora-rank must be >= 1 and --lora-alpha > 0 for LoRA, got {rank} and {alpha}")
    layers = model.get_decoder().layers
    linear = {n.rsplit(".", 1)[-1] for n, m in layers.named_modules() if isinstance(m, nn.Linear)}
    wanted = linear if targets == ALL_LINEAR else {t.strip() for t in targets.split(",") if t.strip()}
    if not wanted or wanted - linear:
        raise ValueError(
            f"--lora-targets {targets!r}: {sorted(wanted - linear) or 'no name'} is not a linear layer of the "
            f"decoder blocks; they have {','.join(sorted(linear))} (or use {ALL_LINEAR})"
        )
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    prefix = next(n for n, m in model.named_modules() if m is layers)
    wrapped = []
    for name, module in list(layers.named_modules()):  # a fixed order: the same adapters on every rank
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in wanted:
            parent_name, _, leaf = name.rpartition(".")
            setattr(layers.get_submodule(parent_name), leaf, LoRALinear(module, rank, alpha, generator))
            wrapped.append(f"{prefix}.{name}")
    model.lora_settings = dict(rank=rank, alpha=alpha, targets=sorted(wanted))
    return wrapped


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """{HF name: module} of the model's LoRA layers; empty for a model without LoRA."""
    return {M.hf_name(n): m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


@contextlib.contextmanager
def adapters_off(model: nn.Module):
    """Within this block the model computes with its base weights alone (the KL term's reference policy). A model
    without LoRA is left as it is."""
    modules = lora_modules(model).values()
    for m in modules:
        m.enabled = False
    try:
        yield model
    finally:
        for m in modules:
            m.enabled = True


def full_weights(model: nn.Module, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) of every weight a plain model of this architecture has: `model.iter_full_state_dict`,
    with each LoRA layer's W, A, B yielded as the one merged W + (alpha / r) B A (fp32 arithmetic, out of place; in
    `dtype`, else the base weight's). A collective on a sharded model, like iter_full_state_dict."""
    scaling = {name: m.scaling for name, m in lora_modules(model).items()}
    held: dict[str, torch.Tensor] = {}
    for name, tensor in M.iter_full_state_dict(model):
        owner, _, part = name.rsplit(".", 1)[0].rpartition(".")  # "...q_proj.lora_A.weight" -> "...q_proj", "lora_A"
        if owner not in scaling or part not in ("base_layer", "lora_A", "lora_B"):
            yield name, tensor if dtype is None else tensor.to(dtype)
        elif name.endswith(".base_layer.bias"):
            yield f"{owner}.bias", tensor if dtype is None else tensor.to(dtype)
        else:  # base_layer.weight, lora_A.weight, lora_B.weight arrive in this order (module registration order)
            held[part] = tensor
            if len(held) == 3:
                w, a, b = held.pop("base_layer"), held.pop("lora_A"), held.pop("lora_B")
                merged = w.float() + scaling[owner] * (b.float() @ a.float())  # [out, r] @ [r, in]
                yield f"{owner}.weight", merged.to(dtype or w.dtype)
    if held:
        raise RuntimeError(f"full_weights: a LoRA layer's tensors came incomplete: {sorted(held)}")


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """What the optimizer holds: the adapters under LoRA, every parameter otherwise."""
    return [p for p in model.parameters() if p.requires_grad]


# ------------------------------------------------------------------------------------------- on disk
def base_identity(model_dir: str) -> dict:
    """The base model a LoRA run trains on: its directory (or hub id) and the sha256 of its weight files (names and
    bytes, in name order). --resume checks it, since an adapter means nothing on another base."""
    digest = hashlib.sha256()
    local = Path(model_dir)
    if not local.is_dir():  # a hub id: its files in the hub cache, fetched as from_pretrained would
        from huggingface_hub import snapshot_download

        local = Path(snapshot_download(model_dir, allow_patterns=["*.safetensors", "*.json"]))
    files = sorted(local.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return {"path": str(model_dir), "sha256": digest.hexdigest()}


def adapter_names(model: nn.Module) -> list[str]:
    """The state-dict names of the adapter matrices (peft's keys without PEFT_PREFIX), in module order."""
    return [f"{n}.{part}.weight" for n in lora_modules(model) for part in ("lora_A", "lora_B")]


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """{peft key: full fp32 tensor} of every adapter matrix; a collective on a sharded model (each matrix gathered in
    turn, the same order on every rank; the base is not gathered)."""
    out = {}
    for name, module in lora_modules(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(module, part).weight
            w = w.full_tensor() if isinstance(w, DTensor) else w
            out[f"{PEFT_PREFIX}{name}.{part}.weight"] = w.detach().float().cpu()
    return out


def save_adapter(model: nn.Module, path, base_model: str, *, rank: int = 0) -> None:
    """The adapter in peft's layout at `path` (all ranks call it; rank 0 writes, atomically)."""
    state = adapter_state(model)
    if rank != 0:
        return
    s = model.lora_settings
    config = {  # what peft.LoraConfig and vLLM's PEFTHelper read
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": s["rank"],
        "lora_alpha": s["alpha"],
        "target_modules": s["targets"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "modules_to_save": None,
        "inference_mode": True,
    }
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=1))
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_adapter(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config.json, {model key: tensor}) of a saved adapter, the keys as the LoRA model's state dict names
    them (peft's prefix dropped)."""
    path = Path(path)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        tensors = M.read_safetensors(path)
    except (OSError, ValueError) as e:
        raise RuntimeError(f"cannot read the LoRA adapter in {path}: {e}") from e
    return config, {k.removeprefix(PEFT_PREFIX): v for k, v in tensors.items()}


def merge(checkpoint, out=None) -> Path:
    """Write the merged model of a LoRA run's checkpoint (its base, from state.json, plus its adapter) in
    save_pretrained layout: `out`, by default CHECKPOINT/model. One process, no GPU needed."""
    checkpoint = Path(checkpoint)
    state = json.loads((checkpoint / "state.json").read_text())
    base = state.get("base_model")
    if base is None:
        raise SystemExit(f"{checkpoint} is not a LoRA checkpoint (its state.json has no base_model)")
    if base_identity(base["path"])["sha256"] != base["sha256"]:
        raise SystemExit(f"the base model in {base['path']} is not the one {checkpoint} was trained on (sha256)")
    config, tensors = read_adapter(checkpoint / "adapter")
    policy = M.load_model(base["path"], dtype=getattr(torch, base["dtype"]))  # as the run stored it
    apply_lora(policy, config["r"], config["lora_alpha"], ",".join(config["target_modules"]))
    if set(tensors) != set(adapter_names(policy)):  # as checkpoint.load checks it: strict=False skips a missing one
        raise SystemExit(f"{checkpoint / 'adapter'} does not hold the adapters its adapter_config.json names")
    policy.load_state_dict(tensors, strict=False)
    out = Path(out or checkpoint / "model")
    M.save_hf_checkpoint(policy, M.load_tokenizer(base["path"]), out, weights=full_weights(policy))
    return out


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="LoRA checkpoints: write the merged model of a checkpoint")
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="the merged model of RUN/checkpoints/step_N, into step_N/model (or --out)")
    m.add_argument("checkpoint")
    m.add_argument("--out", default=None)
    args = p.parse_args()
    print(merge(args.checkpoint, args.out))
