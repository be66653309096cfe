"""LoRA (lora.py): the adapted model starts as its base, the reference is the base with the adapters off, the engine
gets the exact merge, the saved adapter loads with peft and with vLLM's loader, and the update trains only the
adapters, the same on one and two processes. Kill-and-resume of a LoRA run is in test_faults.py; the engine's
log-probs after a LoRA push in test_rollout.py (the vLLM engine test)."""

import pytest
import torch

import lora as L
import model as M
from conftest import HAS_VLLM


def _perturb_adapters(model, seed=0, std=0.05):
    """B = 0 at the start makes every LoRA model its base; random B (the same on every rank) makes it differ."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def test_lora_starts_as_its_base_and_merges_exactly(tiny_model_dir):
    base, policy = M.load_model(tiny_model_dir), M.load_model(tiny_model_dir)
    names = L.apply_lora(policy, 4, 8.0, seed=1)
    assert len(names) == 2 * 7 and "model.layers.1.mlp.down_proj" in names  # all-linear: attention and MLP
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable == set(L.adapter_names(policy)) and len(trainable) == 28  # the base is frozen
    x = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        assert torch.equal(policy(x).logits, base(x).logits)  # B = 0: exactly the base
        _perturb_adapters(policy)
        adapted = policy(x).logits
        assert (adapted - base(x).logits).abs().max() > 1e-2
        with L.adapters_off(policy):  # the reference policy: the base, exactly
            assert torch.equal(policy(x).logits, base(x).logits)
        assert torch.equal(policy(x).logits, adapted)  # and the adapters are back on after the block
        stored = {n: p.clone() for n, p in policy.named_parameters()}
        merged = dict(L.full_weights(policy))
        assert merged.keys() == base.state_dict().keys()  # a plain model's names: what vLLM and save_pretrained take
        assert all(torch.equal(p, stored[n]) for n, p in policy.named_parameters())  # out of place: W untouched
        m = policy.model.layers[0].self_attn.q_proj
        want = m.base_layer.weight + m.scaling * m.lora_B.weight @ m.lora_A.weight
        assert torch.allclose(merged["model.layers.0.self_attn.q_proj.weight"], want, atol=1e-6)
        base.load_state_dict(merged)
        assert torch.allclose(base(x).logits, adapted, atol=1e-4)


def test_adapter_loads_with_peft_and_vllms_loader(tiny_model_dir, tmp_path):
    """The saved adapter in peft's layout: PeftModel.from_pretrained computes the same logits as our model, and
    vLLM's LoRA loader (the one an engine with enable_lora uses) reads every adapted layer."""
    peft = pytest.importorskip("peft", reason="peft is not installed (requirements.txt)")
    policy = M.load_model(tiny_model_dir)
    L.apply_lora(policy, 4, 8.0, "q_proj,v_proj,down_proj", seed=2)
    _perturb_adapters(policy)
    L.save_adapter(policy, tmp_path / "adapter", tiny_model_dir)
    loaded = peft.PeftModel.from_pretrained(M.load_model(tiny_model_dir), tmp_path / "adapter")
    x = torch.randint(5, 500, (2, 9))
    with torch.no_grad():
        assert torch.allclose(loaded(x).logits, policy(x).logits, atol=1e-6)
    config, tensors = L.read_adapter(tmp_path / "adapter")
    assert (
        config["r"] == 4
        and config["lora_alpha"] == 8.0
        and config["target_modules"] == ["down_proj", "q_proj", "v_proj"]
    )
    assert set(tensors) == set(L.adapter_names(policy)) and len(tensors) == 2 * 2 * 3
    if not HAS_VLLM:
        return
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.peft_helper import PEFTHelper

    helper = PEFTHelper.from_local_dir(str(tmp_path / "adapter"), None)
    found = LoRAModel.from_local_checkpoint(
        str(tmp_path / "adapter"), {"q_proj", "v_proj", "down_proj"}, helper, device="cpu", dtype=torch.float32
    )
    assert len(found.loras) == 6 and helper.vllm_lora_scaling_factor == 2.0


def test_lora_flags_and_targets_are_checked(tiny_model_dir):
    from grpo import parse_args

    policy = M.load_model(tiny_model_dir)
    with pytest.raises(ValueError, match=r"--lora-targets 'q_proj,qkv'.*\['qkv'\].*down_proj,gate_proj,k_proj"):
        L.apply_lora(policy, 4, 8.0, "q_proj,qkv")
    assert L.apply_lora(policy, 2, 4.0, "o_proj") == [
        "model.layers.0.self_attn.o_proj",
        "model.layers.1.self_attn.o_proj",
    ]
    with pytest.raises(SystemExit):
        parse_args(["--lora-rank", "-1"])
    assert parse_args(["--lora-rank", "8"]).model.lora_alpha == 32.0


def _lora_update_worker(dist_info, model_dir, out_file):
    from test_grpo_loop import _episodes

    from grpo import parse_args, update_policy

    flags = "--lr 1e-2 --minibatches 2 --tokens-per-microbatch 24 --kl-coef 0.1 --entropy-coef 0.01 --tis-cap 0"
    cfg = parse_args([*flags.split(), "--lora-rank", "4"])
    policy = M.load_model(model_dir)
    L.apply_lora(policy, 4, 32.0, seed=0)
    _perturb_adapters(policy)  # B != 0, so A has a gradient and the KL term to the base is not zero
    base = {n: t.clone() for n, t in M.iter_full_state_dict(policy) if "lora_" not in n}
    policy = M.shard_model(policy, mixed_precision=False)
    opt = torch.optim.SGD(L.trainable_parameters(policy), lr=1.0)  # linear in the gradients (see test_grpo_loop)
    episodes = _episodes()[dist_info.rank :: dist_info.world_size]
    stats = update_policy(policy, policy, opt, episodes, cfg, dist_info, packed=False)
    after = {n: t.clone() for n, t in M.iter_full_state_dict(policy)}
    if dist_info.rank == 0:
        assert all(torch.equal(after[n], t) for n, t in base.items())  # the base never moves
        torch.save({"adapters": {n: t for n, t in after.items() if "lora_" in n}, "stats": stats}, out_file)


def test_lora_update_trains_only_the_adapters_the_same_on_two_processes(tiny_model_dir, tmp_path, spawn_gloo):
    """update_policy with the policy as its own reference (adapters off): one process and two give the same adapters,
    and the KL to the base is not zero."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    spawn_gloo(_lora_update_worker, 1, tiny_model_dir, str(one))
    spawn_gloo(_lora_update_worker, 2, tiny_model_dir, str(two))
    a, b = torch.load(one), torch.load(two)
    assert len(a["adapters"]) == 28 and a["stats"]["kl"] > 0
    start = M.load_model(tiny_model_dir)
    L.apply_lora(start, 4, 32.0, seed=0)
    _perturb_adapters(start)
    assert not torch.equal(a["adapters"]["model.layers.0.self_attn.q_proj.lora_A.weight"],
                           start.model.layers[0].self_attn.q_proj.lora_A.weight)  # fmt: skip
    # The same update up to float32 rounding, which the 2-process reduction orders differently and the two SGD
    # steps of lr 1 carry on: worst seen 9e-5 of an adapter's update norm (AMD EPYC; 1e-5 elementwise passed on an
    # Intel Xeon), 350x less in float64. A rank's episodes or gradients lost would be off by tens of percent.
    initial = dict(start.named_parameters())
    for k in a["adapters"]:
        err, moved = (a["adapters"][k] - b["adapters"][k]).norm(), (a["adapters"][k] - initial[k]).norm()
        assert moved > 0 and err <= 1e-3 * moved, (k, float(err), float(moved))
