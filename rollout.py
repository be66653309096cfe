"""Rollout engines: n sampled completions per prompt, plus the weight push from the trainer.

Two engines behind one small interface (`Engine`):
  * HFEngine   -- transformers `generate`, batched and left-padded; CPU or any GPU; its own copy of the weights.
  * VLLMEngine -- vLLM (pinned 0.32.0; the lent GPU machine has 0.26.0, both handled) colocated in the training
                  process with `distributed_executor_backend="external_launcher"`, sleep mode and a weight push
                  through `collective_rpc` (reference.md section 5).
The trainer pushes `(hf_state_dict_name, full_tensor)` pairs into either engine with `load_weights`, so both sync
paths take the same input.

Seeding: a call draws its randomness from (sampling.seed, engine seed, k), k counting back-to-back calls with the
same sampling.seed. A caller that sets a fresh sampling.seed per step (grpo.py) is reproducible across resume; a
caller that reuses one seed still gets fresh samples on each call.
"""
from __future__ import annotations

import gc
import importlib.util
import os
import socket
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import torch

Weights = Iterable[tuple[str, torch.Tensor]]


@dataclass
class SamplingConfig:
    temperature: float = 0.6  # 0 -> greedy
    top_p: float = 1.0
    max_new_tokens: int = 4096
    seed: int = 0


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

    def __init__(self, model_dir: str, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 batch_size: int = 16, seed: int = 0):
        from transformers import AutoModelForCausalLM, AutoTokenizer

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
                raise KeyError(f"HFEngine.load_weights: unknown weight {name!r}: not a state-dict name of "
                               f"{self.model_dir} ({type(self.model).__name__}, e.g. {next(iter(self._targets))!r})")
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"HFEngine.load_weights: {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model's is {tuple(dst.shape)}")
            dst.data.copy_(tensor.detach())  # casts dtype, moves device
            loaded += 1
        return loaded

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingConfig) -> list[list[Completion]]:
        seqs = [list(p) for p in prompt_ids for _ in range(n)]  # P * n sequences, prompt-major
        seed = self._call_seed(sampling.seed)
        devices = [torch.cuda.current_device() if self.device.index is None else self.device.index] \
            if self.device.type == "cuda" else []
        out: list[Completion] = []
        with torch.random.fork_rng(devices=devices):  # leaves the caller's RNG streams untouched
            torch.manual_seed(seed)
            for i in range(0, len(seqs), self.batch_size):
                out += self._generate_batch(seqs[i:i + self.batch_size], sampling)
        return [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]

    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig) -> list[Completion]:
        B, L = len(batch), max(len(p) for p in batch)
        input_ids = torch.full((B, L), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((B, L), dtype=torch.long)
        for b, p in enumerate(batch):  # left padding
            input_ids[b, L - len(p):] = torch.tensor(p, dtype=torch.long)
            attention_mask[b, L - len(p):] = 1
        greedy = sampling.temperature <= 0
        kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=sampling.temperature,
                                                             top_p=sampling.top_p, top_k=0)
        res = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                                  max_new_tokens=sampling.max_new_tokens, eos_token_id=self.eos_ids,
                                  pad_token_id=self.pad_id, output_logits=True, return_dict_in_generate=True,
                                  **kwargs)
        new = res.sequences[:, L:]  # [B, T], T <= max_new_tokens; pad after each row's EOS
        temp = 1.0 if greedy else sampling.temperature
        logp = torch.stack([torch.log_softmax(step.float() / temp, dim=-1).gather(1, new[:, t:t + 1]).squeeze(1)
                            for t, step in enumerate(res.logits)], dim=1)  # [B, T]
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
        AutoWeightsLoader._check_skipped_aliases), which a bucketed push cannot promise.
      * rotary inv_freq / cos / sin caches (vLLM ignores them: utils.py REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER).
    """
    for name, tensor in weights:
        if tie_word_embeddings and name == "lm_head.weight":
            continue
        if any(s in name for s in ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")):
            continue
        yield name, tensor


def weight_buckets(weights: Weights, bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group pairs into lists of at most `bucket_bytes` (a bigger tensor goes alone) to bound the extra memory."""
    bucket, size = [], 0
    for name, t in weights:
        nbytes = t.numel() * t.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += nbytes
    if bucket:
        yield bucket


class WeightSyncExtension:
    """Mixed into vLLM's GPU Worker through `LLM(worker_extension_cls="rollout.WeightSyncExtension")`.

    vLLM resolves the qualified name with importlib and appends this class to the Worker's bases
    (0.32.0 and 0.26.0: vllm/v1/worker/worker_base.py WorkerWrapperBase.init_worker); method names must not clash
    with Worker attributes (it asserts), hence the `lcpo_` prefix. `llm.collective_rpc("lcpo_load_weights", ...)`
    reaches it (vllm/entrypoints/llm.py LLM.collective_rpc -> vllm/v1/executor/uniproc_executor.py
    UniProcExecutor.collective_rpc -> run_method); with external_launcher it runs in-process (the executor is
    ExecutorWithExternalLauncher and V1 multiprocessing is forced off: vllm/config/parallel.py
    ParallelConfig.__post_init__), so the tensors pass by reference.
    """

    def lcpo_load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> int:
        # Worker.get_model() -> model_runner.get_model(), unwrapping CUDA-graph wrappers
        # (vllm/v1/worker/gpu_worker.py Worker.get_model; gpu_model_runner.py and gpu/model_runner.py get_model).
        self.get_model().load_weights(weights=weights)
        return len(weights)


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise ImportError("VLLMEngine needs vllm (pip install vllm==0.32.0; see requirements-gpu.txt), "
                          "or use --engine hf") from e
    return vllm


def _default_single_process_env() -> None:
    """What external_launcher reads, for a run outside torchrun: rank 0 of 1 on this host, and a free port (not a
    fixed one, so two single-process jobs can share a machine). Variables already set are kept."""
    for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1").items():
        os.environ.setdefault(k, v)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(sock.getsockname()[1])


class VLLMEngine(Engine):
    """vLLM colocated with the trainer (one engine per rank, external_launcher), sleep mode, weight push.

    Per training step (reference.md section 5): generate -> sleep() (level 2: weights and KV cache dropped)
    -> train -> wake_up(["weights"]) -> load_weights(...) -> wake_up(["kv_cache"]) (also resets the prefix cache).
    Outside torchrun, RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR default to a single process, MASTER_PORT to a free port.
    With sleep mode, only ONE engine per process: a second LLM fails "CuMem allocator can only be used for one
    instance per process" even after close() (seen on 0.26.0; the same assert is in 0.32.0 gpu_worker.py
    Worker._maybe_get_memory_pool_context). To serve another model of the same architecture, load_weights it.
    """

    def __init__(self, model_dir: str, *, gpu_memory_utilization: float = 0.4, max_model_len: int | None = None,
                 seed: int = 0, enable_sleep_mode: bool = True, dtype: str = "bfloat16",
                 bucket_bytes: int = 512 << 20, **llm_kwargs):
        vllm = _import_vllm()
        from transformers import AutoConfig

        _default_single_process_env()
        self.seed, self.bucket_bytes, self.enable_sleep_mode = seed, bucket_bytes, enable_sleep_mode
        self.tie_word_embeddings = bool(getattr(AutoConfig.from_pretrained(model_dir), "tie_word_embeddings", False))
        # LLM(...) keyword arguments: vllm/entrypoints/llm.py LLM.__init__ and vllm/engine/arg_utils.py EngineArgs
        # (worker_extension_cls, logprobs_mode, enable_prefix_caching, enable_sleep_mode pass through **kwargs).
        self.llm = vllm.LLM(
            model=model_dir, tensor_parallel_size=1, distributed_executor_backend="external_launcher",
            gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
            max_model_len=max_model_len, seed=seed, dtype=dtype, enable_prefix_caching=True,
            logprobs_mode="processed_logprobs",  # sampled-token logprobs after temperature (and top_p)
            worker_extension_cls=f"{__name__}.{WeightSyncExtension.__name__}", **llm_kwargs)
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
        params = [SamplingParams(n=1 if greedy else n, temperature=max(sampling.temperature, 0.0),
                                 top_p=sampling.top_p, max_tokens=sampling.max_new_tokens, seed=int(s),
                                 logprobs=0)  # 0: the sampled token's logprob only (sampling_params.py `logprobs`)
                  for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompt_ids], params,
                                    use_tqdm=False)
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
                group = [Completion(list(c.token_ids), c.text, c.finish_reason, c.logprobs and list(c.logprobs))
                         for c in group for _ in range(n)]
            result.append(group)
        return result

    def load_weights(self, weights: Weights) -> int:
        """Push in buckets of <= bucket_bytes through the worker extension; resets the prefix cache after."""
        if "weights" in self._asleep:
            raise RuntimeError("VLLMEngine.load_weights while the weights are asleep: call wake_up(['weights']) first")
        loaded = 0
        for bucket in weight_buckets(to_vllm_weights(weights, tie_word_embeddings=self.tie_word_embeddings),
                                     self.bucket_bytes):
            loaded += sum(self.llm.collective_rpc("lcpo_load_weights", args=(bucket,)))
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
        """Drop the engine. Sleeping first releases its weights and KV cache through vLLM's own allocator even
        if something still references the LLM object. vLLM's model-parallel groups stay initialized (a later
        VLLMEngine in this process reuses them: vllm/distributed/parallel_state.py ensure_model_parallel_initialized).
        """
        if self.llm is not None and self.enable_sleep_mode:
            self.sleep()
        self.llm = None
        gc.collect()
        torch.cuda.empty_cache()


def make_engine(kind: str, model_dir: str, device: str | torch.device = "cpu", *, seed: int = 0,
                dtype: torch.dtype | None = None, batch_size: int = 16, **vllm_kwargs) -> Engine:
    """kind "hf" | "vllm" | "auto" (vllm when importable and device is CUDA, else hf). vLLM-only keyword
    arguments (max_model_len, gpu_memory_utilization, ...) are ignored by the hf engine."""
    device = torch.device(device)
    if kind == "auto":
        kind = "vllm" if device.type == "cuda" and importlib.util.find_spec("vllm") is not None else "hf"
    if kind == "hf":
        return HFEngine(model_dir, device=device, dtype=dtype, batch_size=batch_size, seed=seed)
    if kind == "vllm":
        if device.type != "cuda":
            raise ValueError(f"--engine vllm needs a CUDA device, got {device}")
        return VLLMEngine(model_dir, seed=seed, **vllm_kwargs)
    raise ValueError(f"unknown engine {kind!r}: expected hf, vllm or auto")
