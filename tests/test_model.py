"""model.py: chunked log-probs vs the naive full softmax, packing vs padding, FSDP2 (world 1 and 2, gloo),
full state dict, HF checkpoints, micro-batches, and the embedded SmolLM2 model."""

import copy
import platform
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

import model as M

SEQS = [[1, 5, 7, 9, 11, 3, 4], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22], [3, 3, 3], [7, 8, 9, 10, 11]]
PROMPT_LENS = [2, 5, 1, 4]  # different prompt lengths; sequence 3 has a single response token
N_RESPONSE = sum(len(s) - p for s, p in zip(SEQS, PROMPT_LENS))


def tiny_model(kind: str = "llama", seed: int = 0, attn: str = "sdpa"):
    """A random 2-layer model: llama ties lm_head to the embeddings (like SmolLM2), qwen2 does not."""
    common = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=256,
    )
    if kind == "llama":
        config = LlamaConfig(tie_word_embeddings=True, **common)
    else:
        config = Qwen2Config(tie_word_embeddings=False, **common)
    if attn == M.TORCH_VARLEN:
        M.register_varlen_attention()
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32)


def naive_logprobs(model, sequences, prompt_lens, temperature=1.0):
    """One sequence at a time through the ordinary forward, full float32 log_softmax over [L, V]."""
    logps, ents = [], []
    for seq, p in zip(sequences, prompt_lens):
        logits = model(torch.tensor([seq])).logits[0].float() / temperature  # [L, V]
        logp_all = torch.log_softmax(logits[:-1], dim=-1)  # position t predicts token t + 1
        logps.append(logp_all.gather(-1, torch.tensor(seq[1:]).unsqueeze(-1)).squeeze(-1)[p - 1 :])
        ents.append(-(logp_all.exp() * logp_all).sum(-1)[p - 1 :])
    return torch.cat(logps), torch.cat(ents)


def grads(model) -> dict:
    from torch.distributed.tensor import DTensor

    out = {}
    for name, param in model.named_parameters():
        g = param.grad
        out[M.hf_name(name)] = g.full_tensor() if isinstance(g, DTensor) else g
    return out


@pytest.fixture
def world1():
    """A single-process gloo group (what init_distributed does without torchrun), torn down afterwards."""
    info = M.init_distributed()
    yield info
    dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("chunk_size", [1, 3, 7, 2048])
def test_chunked_matches_naive(kind, chunk_size):
    model = tiny_model(kind)
    ref_lp, ref_ent = naive_logprobs(model, SEQS, PROMPT_LENS, temperature=0.7)
    for packed in (True, False):
        lp, ent = M.response_logprobs(
            model, SEQS, PROMPT_LENS, temperature=0.7, packed=packed, with_entropy=True, chunk_size=chunk_size
        )
        assert lp.shape == ent.shape == (N_RESPONSE,) and lp.dtype == torch.float32
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
    lp, ent = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True, chunk_size=chunk_size)
    assert ent is None
    torch.testing.assert_close(lp, naive_logprobs(model, SEQS, PROMPT_LENS)[0], atol=1e-5, rtol=1e-5)


def test_packed_position_ids_are_detected_by_transformers():
    """The evidence behind packed=True on sdpa: masking_utils splits the row at position-id restarts,
    and without that split (a plain all-ones mask) later sequences would see earlier ones."""
    from transformers.masking_utils import find_packed_sequence_indices

    _, _, position_ids, _, _, _, _ = M._build_inputs(SEQS, PROMPT_LENS, packed=True)
    seq_ids = find_packed_sequence_indices(position_ids)
    expected = torch.cat([torch.full((len(s),), i) for i, s in enumerate(SEQS)])
    assert torch.equal(seq_ids[0], expected)
    model = tiny_model()
    input_ids, _, position_ids, _, _, gather_index, targets = M._build_inputs(SEQS, PROMPT_LENS, packed=True)
    with torch.no_grad():
        leaky = (
            model(input_ids=input_ids, position_ids=position_ids, attention_mask=torch.ones_like(input_ids))
            .logits[0]
            .log_softmax(-1)
        )
        leaky = leaky[gather_index].gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        lp, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True)
    first = len(SEQS[0]) - PROMPT_LENS[0]
    torch.testing.assert_close(leaky[:first], lp[:first])  # the first sequence sees nothing else anyway
    assert not torch.allclose(leaky[first:], lp[first:], atol=1e-3)


@pytest.mark.parametrize("attn", ["sdpa", M.TORCH_VARLEN])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_packed_and_padded_give_same_logprobs_and_gradients(kind, attn):
    """Packed rows through `attn` (sdpa: block-diagonal mask; torch_varlen: cu_seqlens, here with the
    per-segment CPU kernel) against the padded sdpa batch."""
    torch.manual_seed(1)
    weights, ent_weights = torch.randn(N_RESPONSE), torch.randn(N_RESPONSE)
    results = []
    for packed in (True, False):
        model = tiny_model(kind, attn=attn if packed else "sdpa")
        lp, ent = M.response_logprobs(
            model, SEQS, PROMPT_LENS, temperature=0.6, packed=packed, with_entropy=True, chunk_size=4
        )
        ((lp * weights).sum() + (ent * ent_weights).sum()).backward()
        results.append((lp.detach(), ent.detach(), grads(model)))
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ent_a, ent_b, atol=1e-5, rtol=1e-5)
    assert g_a.keys() == g_b.keys()
    for name in g_a:
        torch.testing.assert_close(g_a[name], g_b[name], atol=1e-5, rtol=1e-4, msg=name)


def test_padded_batch_runs_causal_sdpa_without_a_mask(monkeypatch):
    """Right-padded rows need no padding mask (no real token comes after a pad), so the padded layout hands SDPA
    no mask and is_causal: the kernel's cheaper path. The log-probs equal those of the same batch with
    transformers' own padding mask."""
    import transformers.integrations.sdpa_attention as S

    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(
        S.torch.nn.functional,
        "scaled_dot_product_attention",
        lambda *a, **k: calls.append((k.get("attn_mask"), k.get("is_causal"))) or real(*a, **k),
    )
    model = tiny_model("qwen2")
    lp, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, temperature=0.6, packed=False)
    assert len(calls) == 2 and all(mask is None and causal for mask, causal in calls)  # 2 layers
    input_ids, _, _, _, _, gather_index, targets = M._build_inputs(SEQS, PROMPT_LENS, packed=False)
    mask = torch.zeros_like(input_ids)
    for i, s in enumerate(SEQS):
        mask[i, : len(s)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=mask).logits.flatten(0, 1)[gather_index] / 0.6
    assert calls[-1][0] is not None  # that forward did carry a mask
    expected = logits.log_softmax(-1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(lp, expected, atol=1e-5, rtol=1e-5)


def test_gradients_flow_and_no_grad_path_matches():
    model = tiny_model()
    lp, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True, chunk_size=2)
    lp.sum().backward()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.grad.abs().sum() > 0
    assert model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with torch.no_grad():
        lp_ng, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True, chunk_size=2)
    assert not lp_ng.requires_grad
    torch.testing.assert_close(lp_ng, lp.detach())


def test_prefers_packing_only_with_a_varlen_kernel():
    model = tiny_model()
    assert not M.prefers_packing(model)
    assert M.prefers_packing(tiny_model(attn=M.TORCH_VARLEN))
    model.config._attn_implementation = "flash_attention_2"
    assert M.prefers_packing(model)


def test_torch_varlen_gets_sequence_boundaries_once_and_handles_batches(monkeypatch):
    """response_logprobs hands the kernel the packed row's cu_seqlens (no [T, T] mask anywhere); a right-padded
    batch runs as causal sdpa and matches sdpa with its padding mask; left padding and a KV cache raise."""
    seen = []
    real = M._segment_attention
    monkeypatch.setattr(M, "_segment_attention", lambda q, k, v, cu, scale: seen.append(cu) or real(q, k, v, cu, scale))
    model = tiny_model("qwen2", attn=M.TORCH_VARLEN)
    lp, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True)
    bounds = [0] + list(torch.tensor([len(s) for s in SEQS]).cumsum(0))
    assert len(seen) == 2 and all(cu.dtype == torch.int32 and cu.tolist() == bounds for cu in seen)  # 2 layers
    torch.testing.assert_close(lp, naive_logprobs(tiny_model("qwen2"), SEQS, PROMPT_LENS)[0], atol=1e-5, rtol=1e-5)
    padded, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, packed=False)
    torch.testing.assert_close(padded, lp, atol=1e-5, rtol=1e-5)
    # without cu_seqlens (a plain forward with restarting position_ids) the boundaries come from the positions
    input_ids, _, position_ids, _, _, gather_index, targets = M._build_inputs(SEQS, PROMPT_LENS, packed=True)
    with torch.no_grad():
        logits = model(input_ids=input_ids, position_ids=position_ids).logits[0].log_softmax(-1)
    torch.testing.assert_close(logits[gather_index].gather(-1, targets[:, None])[:, 0], lp, atol=1e-5, rtol=1e-5)
    assert seen[-1].tolist() == bounds
    left = torch.tensor([[0, 0, 5, 6], [1, 2, 3, 4]])
    with pytest.raises(ValueError, match="not left padding"):
        model(input_ids=left, attention_mask=(left > 0).long())
    with pytest.raises(ValueError, match="without a KV cache"):
        model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2, do_sample=False)


def test_torch_varlen_call_for_each_torch_api(monkeypatch):
    """The arguments _torch_varlen passes to varlen_attn, with stand-ins of its signatures (the real kernel is
    CUDA only): torch 2.13 (scale, window_size=(-1, 0), enable_gqa), torch 2.11 (scale and window_size, no
    enable_gqa: a TypeError there) and torch 2.10 (is_causal only)."""
    import torch.nn.attention.varlen as V

    calls = []

    def new_api(
        q,
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        *,
        return_aux=None,
        scale=None,
        window_size=(-1, -1),
        enable_gqa=False,
        seqused_k=None,
        block_table=None,
        num_splits=None,
    ):
        calls.append(("new", window_size, enable_gqa, scale))
        return M._segment_attention(q, k, v, cu_q, scale)

    def mid_api(q, k, v, cu_q, cu_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
        calls.append(("mid", window_size, k.shape[1], scale))
        return M._segment_attention(q, k, v, cu_q, scale)

    def old_api(q, k, v, cu_q, cu_k, max_q, max_k, is_causal=False, return_aux=None):
        calls.append(("old", is_causal, k.shape[1]))
        return M._segment_attention(q, k, v, cu_q, None)

    torch.manual_seed(0)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    ref = M._segment_attention(q, k, v, cu, 8**-0.5)
    for fake in (new_api, mid_api, old_api):
        monkeypatch.setattr(V, "varlen_attn", fake)
        torch.testing.assert_close(M._torch_varlen(q, k, v, cu, 7, 8**-0.5), ref)
    # 2.11 and 2.10: the 2 kv heads repeated to the 4 query heads
    assert calls == [("new", (-1, 0), True, 8**-0.5), ("mid", (-1, 0), 4, 8**-0.5), ("old", True, 4)]
    with pytest.raises(ValueError, match="no scale argument"):
        M._torch_varlen(q, k, v, cu, 7, 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen flash kernel needs a CUDA GPU")
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_torch_varlen_kernel_matches_reference_on_gpu(heads):
    """The CUDA branch (torch.nn.attention.varlen.varlen_attn) against per-segment causal sdpa, bf16, with GQA,
    forward and backward."""
    hq, hkv = heads
    torch.manual_seed(0)
    lengths = [7, 130, 1, 64, 300]
    cu = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    T = sum(lengths)
    q = torch.randn(1, hq, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, hkv, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, hkv, T, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out, _ = M.varlen_attention_forward(None, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=300)
    ref = M._segment_attention(*(t[0].transpose(0, 1) for t in (q, k, v)), cu, 0.125).unsqueeze(0)
    torch.testing.assert_close(out, ref, atol=2e-2, rtol=2e-2)
    g = torch.randn_like(out)
    grads_out = torch.autograd.grad(out, (q, k, v), g)
    grads_ref = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in zip(grads_out, grads_ref):
        torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch's varlen flash kernel needs a CUDA GPU")
def test_packed_torch_varlen_matches_padded_sdpa_on_gpu():
    """The trainer's GPU default (packed rows, torch_varlen) against padded SDPA, whole model in bf16."""
    results = []
    for packed in (True, False):
        model = tiny_model("qwen2", attn=M.TORCH_VARLEN if packed else "sdpa").to("cuda", torch.bfloat16)
        lp, _ = M.response_logprobs(model, SEQS, PROMPT_LENS, temperature=0.6, packed=packed)
        lp.float().sum().backward()
        results.append((lp.detach().float(), grads(model)))
    (lp_a, g_a), (lp_b, g_b) = results
    torch.testing.assert_close(lp_a, lp_b, atol=3e-2, rtol=3e-2)
    for name in g_a:
        torch.testing.assert_close(g_a[name].float(), g_b[name].float(), atol=5e-2, rtol=5e-2, msg=name)


def test_bad_inputs_raise():
    model = tiny_model()
    with pytest.raises(ValueError, match="sequence 1: prompt_len 9"):
        M.response_logprobs(model, [[1, 2], [1, 2, 3]], [1, 9], packed=True)
    with pytest.raises(ValueError, match="temperature"):
        M.response_logprobs(model, SEQS, PROMPT_LENS, packed=True, temperature=0.0)


def check_sharded(model_kind, activation_checkpointing, tmp_path=None, rank=0):
    """Shard a copy of a tiny model; logprobs, gradients and the full state dict must match the copy."""
    reference = tiny_model(model_kind)
    sharded = M.shard_model(copy.deepcopy(reference), activation_checkpointing=activation_checkpointing)
    for packed in (True, False):
        lp, ent = M.response_logprobs(
            sharded, SEQS, PROMPT_LENS, packed=packed, with_entropy=True, chunk_size=3, temperature=0.8
        )
        ref_lp, ref_ent = M.response_logprobs(
            reference, SEQS, PROMPT_LENS, packed=packed, with_entropy=True, chunk_size=3, temperature=0.8
        )
        torch.testing.assert_close(lp, ref_lp, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent, ref_ent, atol=1e-5, rtol=1e-5)
        (lp.sum() + ent.sum()).backward()
        (ref_lp.sum() + ref_ent.sum()).backward()
    # Every rank used the same data, and shard_model sums gradients over ranks (the loss is normalized globally):
    # the sharded gradient is world_size times one rank's.
    g_sharded, g_ref = grads(sharded), grads(reference)
    world = torch.distributed.get_world_size()
    assert g_sharded.keys() == g_ref.keys()
    for name in g_ref:
        torch.testing.assert_close(g_sharded[name], world * g_ref[name], atol=1e-5, rtol=1e-4, msg=name)
    with torch.no_grad():  # the old/ref log-prob path on a sharded model
        lp_ng, _ = M.response_logprobs(sharded, SEQS, PROMPT_LENS, packed=True)
        torch.testing.assert_close(lp_ng, M.response_logprobs(reference, SEQS, PROMPT_LENS, packed=True)[0])
    full = list(M.iter_full_state_dict(sharded))
    expected = reference.state_dict()
    assert sorted(n for n, _ in full) == sorted(expected)
    for name, tensor in full:
        assert torch.equal(tensor, expected[name]), name
    if tmp_path is not None:
        M.save_hf_checkpoint(sharded, None, tmp_path / "ckpt", rank=rank)


def test_sharded_world1(world1):
    assert (world1.rank, world1.world_size) == (0, 1)
    check_sharded("qwen2", activation_checkpointing=False)
    check_sharded("llama", activation_checkpointing=True)


def test_sharded_mixed_precision_bf16_runs(world1):
    reference = tiny_model()
    sharded = M.shard_model(copy.deepcopy(reference), mixed_precision=True)
    lp, _ = M.response_logprobs(sharded, SEQS, PROMPT_LENS, packed=True)
    lp.sum().backward()
    assert lp.dtype == torch.float32
    torch.testing.assert_close(
        lp, M.response_logprobs(reference, SEQS, PROMPT_LENS, packed=True)[0], atol=0.05, rtol=0.05
    )
    assert all(t.dtype == torch.float32 for _, t in M.iter_full_state_dict(sharded))  # fp32 master
    assert all(t.dtype == torch.bfloat16 for _, t in M.iter_full_state_dict(sharded, torch.bfloat16))


def test_use_bf16_picks_the_compute_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # (a device object needs no GPU)
    assert M.use_bf16(cpu, "bfloat16") and not M.use_bf16(cuda, "float32")
    assert M.use_bf16(cuda) and M.use_bf16(cuda, "auto")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert M.cpu_has_native_bf16() == native and M.use_bf16(cpu) == native  # bf16 on a CPU only with bf16 instructions
    with pytest.raises(ValueError, match=re.escape("--dtype must be auto|bfloat16|float32, got 'fp16'")):
        M.use_bf16(cpu, "fp16")


def _worker(info, tmp_path):
    assert info.world_size == 2
    check_sharded("llama", activation_checkpointing=True, tmp_path=tmp_path, rank=info.rank)


_RELEASE_SCRIPT = """
import os, torch, model
def rss(): return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
blocks = [torch.ones(25_000) for _ in range(4000)]  # 400 MB in 100 KB blocks: glibc heap, not mmap
keep = torch.ones(25_000)  # a live block above the freed ones: glibc cannot give them back by trimming the top
del blocks
before = rss(); kept = model.release_cpu_heap(min_available=0.0); middle = rss()
trimmed = model.release_cpu_heap(min_available=1.0); after = rss()
print(kept, trimmed, before, middle, after)
"""


@pytest.mark.skipif(
    not (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"),
    reason="malloc_trim is glibc's; elsewhere release_cpu_heap is a no-op",
)
def test_release_cpu_heap_gives_freed_memory_back_when_memory_runs_short():
    # In a fresh process, so the allocator's state is known: freed tensors stay resident until the trim.
    out = subprocess.run(
        [sys.executable, "-c", _RELEASE_SCRIPT], capture_output=True, text=True, check=True, cwd=Path(M.__file__).parent
    ).stdout
    kept, trimmed, before, middle, after = out.split()
    before, middle, after = float(before), float(middle), float(after)
    assert kept == "False" and before - middle < 50, (before, middle)  # memory to spare: the heap stays, for reuse
    assert trimmed == "True" and middle - after > 300, (middle, after)  # MiB


def test_sharded_world2_gloo(tmp_path, spawn_gloo):
    spawn_gloo(_worker, 2, tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    expected = tiny_model("llama").state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_hf_checkpoint_roundtrip(tmp_path, kind):
    model = tiny_model(kind)
    M.save_hf_checkpoint(model, None, tmp_path / "ckpt", rank=0)
    M.save_hf_checkpoint(model, None, tmp_path / "ckpt", rank=0)  # overwriting an existing one works
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt")
    assert loaded.config.tie_word_embeddings == (kind == "llama")
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name


def test_make_microbatches_padded_budget_counts_padding():
    lengths = [100, 900, 300, 280, 50, 60, 1200, 30]
    groups = M.make_microbatches(lengths, 1000, padded=True)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:  # rows x longest within budget, unless one sequence alone is longer
        assert len(g) * max(lengths[i] for i in g) <= 1000 or len(g) == 1
    assert groups == [[6], [1], [0, 2, 3], [4, 5, 7]]  # by length: 1200 | 900 | 300 280 100 | 60 50 30
    assert M.make_microbatches([], 10, padded=True) == []


def test_make_microbatches():
    rng = random.Random(0)
    lengths = [rng.randint(1, 300) for _ in range(57)] + [900]
    groups = M.make_microbatches(lengths, 512)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for g in groups:
        assert sum(lengths[i] for i in g) <= 512 or len(g) == 1
        assert g == sorted(g)
    assert [57] in groups  # the oversize sequence alone
    assert groups == M.make_microbatches(lengths, 512)
    assert M.make_microbatches([], 10) == []
    assert M.make_microbatches([5, 5, 5], 10) == [[0, 1], [2]]
    with pytest.raises(ValueError):
        M.make_microbatches([1], 0)


def test_resolve_model_paths(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        M.resolve_model(str(missing))
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.resolve_model(str(tmp_path))
    assert M.resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids pass through


def test_model_flops_per_token():
    config = tiny_model().config
    n = 2 * (64 * 64 + 2 * 64 * 2 * 16 + 64 * 64 + 3 * 64 * 128) + 64 * 128
    assert M.model_flops_per_token(config, seq_len=100) == 6 * n + 12 * 2 * 64 * 100


def test_embedded_model_roundtrip(embedded_model_dir, tmp_path):
    """The converted GGUF loads as a tied Llama with its ChatML template; a bf16 save loads back."""
    tokenizer = M.load_tokenizer(embedded_model_dir)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2+2?"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    model = M.load_model(embedded_model_dir)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert getattr(model.config, "quantization_config", None) is None
    ids = tokenizer(prompt + "The answer to this classic math problem is 4.<|im_end|>")["input_ids"]
    n_prompt = len(tokenizer(prompt)["input_ids"])
    with torch.no_grad():
        lp, _ = M.response_logprobs(model, [ids], [n_prompt], packed=True)
        torch.testing.assert_close(lp, naive_logprobs(model, [ids], [n_prompt])[0], atol=1e-4, rtol=1e-4)
    assert lp.mean() > -1.2  # its own greedy answer: a garbled conversion would score near log(1/V)
    M.save_hf_checkpoint(model, tokenizer, tmp_path / "ckpt", rank=0, dtype=torch.bfloat16)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.bfloat16)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor.to(torch.bfloat16)), name
    reloaded_tok = AutoTokenizer.from_pretrained(tmp_path / "ckpt")
    assert reloaded_tok.chat_template == tokenizer.chat_template
    assert reloaded_tok.eos_token == tokenizer.eos_token
