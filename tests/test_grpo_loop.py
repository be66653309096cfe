"""The training loop for real, on CPU: distributed equality, weight sync, checkpoints, resume, SIGTERM, errors.

A tiny random Llama with SmolLM2's tokenizer keeps these fast; one test runs the embedded model itself.
"""

import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, _env, _metrics, refusal, torchrun, train_here

ROOT = Path(__file__).resolve().parents[1]


def _torchrun(nproc: int, args: list[str], timeout=300):
    cmd = [*torchrun(nproc), str(ROOT / "grpo.py"), *args]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------
def _episodes():
    from grpo import Episode

    g = torch.Generator().manual_seed(3)
    episodes = []
    for i in range(8):
        prompt = torch.randint(5, 200, (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        resp = torch.randint(5, 200, (int(torch.randint(2, 12, (1,), generator=g)),), generator=g).tolist()
        episodes.append(Episode(prompt, resp, 0.0, float(torch.randn(1, generator=g)), None))
    return episodes


def _update_worker(dist_info, model_dir, out_file):
    import model as M
    from grpo import parse_args, update_policy

    flags = "--lr 1e-2 --minibatches 2 --tokens-per-microbatch 24 --kl-coef 0.1 --entropy-coef 0.01 --tis-cap 0"
    cfg = parse_args(flags.split())
    policy = M.shard_model(M.load_model(model_dir), mixed_precision=False)
    ref = M.shard_model(M.load_model(model_dir), mixed_precision=False)
    ref.requires_grad_(False)
    # Plain SGD: the weights are then linear in the gradients. AdamW's g / (|g| + eps) turns float noise in a
    # near-zero gradient (summation order differs across ranks) into differences of lr / 10 (seen: 6e-5).
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)
    # Perturb the reference so the KL term is not zero at the start.
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.9)
    episodes = _episodes()[dist_info.rank :: dist_info.world_size]
    stats = update_policy(policy, ref, opt, episodes, cfg, dist_info, packed=False)
    full = {k: v.clone() for k, v in M.iter_full_state_dict(policy)}
    if dist_info.rank == 0:
        torch.save({"weights": full, "grad_norm": stats["grad_norm"]}, out_file)


def test_two_processes_match_one_process(tiny_model_dir, tmp_path, spawn_gloo):
    """An update on 8 fixed episodes: 2 ranks x 4 episodes == 1 rank x 8 episodes (same mini-batches), with
    uneven micro-batch counts across ranks (token budget 24), KL to a reference, entropy, 2 optimizer steps."""
    one, two = tmp_path / "one.pt", tmp_path / "two.pt"
    spawn_gloo(_update_worker, 1, tiny_model_dir, str(one))
    spawn_gloo(_update_worker, 2, tiny_model_dir, str(two))
    a, b = torch.load(one), torch.load(two)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    start = _weights_of(tiny_model_dir)
    moved = 0
    for name, w in a["weights"].items():
        assert torch.allclose(w, b["weights"][name], atol=2e-6, rtol=1e-4), name
        moved += not torch.equal(w, start[name])
    assert moved == len(a["weights"])  # every tensor was updated


def test_pi_old_is_frozen_only_for_the_later_minibatches(tiny_model_dir, monkeypatch):
    """--minibatches 2: pi_old's frozen pass covers only the second half (the first half trains before any step,
    so its pi_old is the current policy), and the result equals the textbook loop that freezes the whole batch."""
    import model as M
    from grpo import parse_args, policy_loss, update_policy

    dist_info = M.init_distributed()
    cfg = parse_args(["--minibatches", "2", "--kl-coef", "0", "--entropy-coef", "0", "--tis-cap", "0"])
    episodes = _episodes()

    def fresh():
        torch.manual_seed(0)
        net = M.shard_model(M.load_model(tiny_model_dir), mixed_precision=False)
        return net, torch.optim.SGD(net.parameters(), lr=1.0)  # linear in the gradients (see _update_worker)

    def lp(net, batch):
        return M.response_logprobs(
            net,
            [e.prompt_ids + e.response_ids for e in batch],
            [len(e.prompt_ids) for e in batch],
            temperature=0.6,
            packed=False,
        )[0]

    # The textbook loop: pi_old of the whole batch frozen before the first optimizer step.
    policy, opt = fresh()
    with torch.no_grad():
        old = lp(policy, episodes).split([len(e.response_ids) for e in episodes])
    for k in range(2):
        mb, mb_old = episodes[4 * k : 4 * k + 4], torch.cat(old[4 * k : 4 * k + 4])
        lens = torch.tensor([len(e.response_ids) for e in mb])
        opt.zero_grad()
        adv = torch.repeat_interleave(torch.tensor([e.advantage for e in mb]), lens)
        loss, _ = policy_loss(
            lp(policy, mb),
            mb_old,
            adv,
            torch.repeat_interleave(torch.arange(4), lens),
            num_seqs=4,
            num_tokens=int(lens.sum()),
            kl_coef=0.0,
            entropy_coef=0.0,
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grpo.grad_clip)
        opt.step()
    want = {k: v.clone() for k, v in M.iter_full_state_dict(policy)}

    calls, real = [], M.response_logprobs  # (grad enabled, sequences) of every forward update_policy makes

    def counting(net, seqs, *a, **kw):
        calls.append((torch.is_grad_enabled(), len(seqs)))
        return real(net, seqs, *a, **kw)

    monkeypatch.setattr(M, "response_logprobs", counting)
    policy, opt = fresh()
    update_policy(policy, None, opt, episodes, cfg, dist_info, packed=False)
    assert sum(n for grad, n in calls if not grad) == 4 and sum(n for grad, n in calls if grad) == 8
    for name, w in M.iter_full_state_dict(policy):
        assert torch.allclose(w, want[name], atol=1e-6, rtol=1e-5), name


def _weights_of(model_dir):
    import model as M

    out = M.read_safetensors(model_dir)
    out.setdefault("lm_head.weight", out["model.embed_tokens.weight"])  # tied
    return out


def test_weight_sync_engine_uses_new_weights(tiny_model_dir):
    """After an update and a push, the engine's log-probs of a generation equal the trained policy's."""
    import model as M
    import rollout
    from grpo import Episode, parse_args, update_policy

    dist_info = M.init_distributed()
    cfg = parse_args(["--lr", "5e-2", "--minibatches", "1", "--kl-coef", "0", "--entropy-coef", "0"])
    policy = M.shard_model(M.load_model(tiny_model_dir), mixed_precision=False)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.grpo.lr)
    engine = rollout.HFEngine(tiny_model_dir, device="cpu")
    sampling = rollout.SamplingConfig(temperature=0.6, max_new_tokens=10, seed=1)
    prompt = [[11, 12, 13, 14]]

    def engine_vs_policy():
        c = engine.generate(prompt, 1, sampling)[0][0]
        with torch.no_grad():
            lp, _ = M.response_logprobs(policy, [prompt[0] + c.token_ids], [4], temperature=0.6, packed=False)
        return torch.tensor(c.logprobs), lp, c.token_ids

    before_engine, before_policy, ids = engine_vs_policy()
    assert torch.allclose(before_engine, before_policy, atol=1e-4)
    update_policy(
        policy,
        None,
        opt,
        [Episode(prompt[0], ids, 1.0, 1.0, None), Episode(prompt[0], ids[:3], 0.0, -1.0, None)],
        cfg,
        dist_info,
        packed=False,
    )
    stale_engine = torch.tensor(engine.generate(prompt, 1, sampling)[0][0].logprobs)
    engine.load_weights(M.iter_full_state_dict(policy))
    after_engine, after_policy, _ = engine_vs_policy()
    assert torch.allclose(after_engine, after_policy, atol=1e-4)  # the engine now samples from the new policy
    assert not torch.allclose(stale_engine, after_policy[: len(stale_engine)], atol=1e-3)  # and it did change


def test_sigterm_saves_and_exits(tiny_model_dir, tmp_path):
    """SIGTERM to torchrun (a scheduler's preemption): it passes the signal to both ranks, which finish the step, save
    it and exit, within its --shutdown-timeout (30 s by default, then SIGKILL: a CPU step can take minutes)."""
    out = tmp_path / "run"
    flags = ["--model", tiny_model_dir, *"--steps 500 --save-every 1000".split(), "--out", str(out)]
    launcher = torchrun(2)  # [python, -m, torch.distributed.run, its flags...]
    cmd = [*launcher[:3], "--shutdown-timeout", "120", *launcher[3:], str(ROOT / "grpo.py"), *TINY, *flags]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not ((out / "metrics.jsonl").exists() and _metrics(out)):
        time.sleep(0.5)
        assert p.poll() is None, p.communicate()[1][-3000:]
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=240)
    assert "SIGTERM: saved step" in stdout, stderr[-3000:]  # torchrun itself then exits with the signal's error
    ckpts = sorted((out / "checkpoints").glob("step_*"))
    last = _metrics(out)[-1]["step"]
    assert [c.name for c in ckpts] == [f"step_{last:06d}"] and last < 500
    state = json.loads((ckpts[0] / "state.json").read_text())
    assert state["step"] == last and state["world_size"] == 2


def test_real_run_on_embedded_model_writes_loadable_checkpoint(embedded_model_dir, tmp_path):
    """The README's main job, shrunk to one step: real generations from SmolLM2, a real update, a checkpoint."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "smol"
    flags = "--preset smollm2-cpu --steps 1 --prompts-per-step 2 --group-size 2 --max-new-tokens 24".split()
    cmd = [sys.executable, str(ROOT / "grpo.py"), *flags, "--out", str(out)]
    r = subprocess.run(cmd, cwd=ROOT, env=_env(OMP_NUM_THREADS="2"), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (m,) = _metrics(out)
    assert m["step"] == 1 and 1 <= m["response_len"] <= 24 and m["kl"] >= 0
    keys = "reward accuracy rel_len_dev clip_frac entropy grad_norm time_generate time_train time_sync time_score"
    for key in keys.split():
        assert key in m
    ckpt = out / "checkpoints" / "step_000001" / "model"
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    base = AutoModelForCausalLM.from_pretrained(embedded_model_dir)
    diff = sum((a - b).abs().sum().item() for a, b in zip(loaded.parameters(), base.parameters()))
    assert diff > 0  # trained weights, not a copy of the start
    assert json.loads((out / "config.json").read_text())["model"]["model"] == "smollm2"


def test_resume_errors_are_clear(tiny_model_dir, tmp_path, capsys):
    from config import parse_args

    base = [*TINY, "--model", tiny_model_dir, "--steps", "2", "--resume"]
    assert "no complete checkpoint under" in refusal([*base, "--out", str(tmp_path / "empty")])

    bad = tmp_path / "bad" / "checkpoints" / "step_000001"
    (bad / "model").mkdir(parents=True)
    (bad / "model" / "model.safetensors").write_bytes(b"not a safetensors file")
    (bad / "state.json").write_text(json.dumps({"step": 1}))
    msg = refusal([*base, "--out", str(tmp_path / "bad")])
    assert "cannot resume from checkpoint" in msg and "step_000001" in msg
    assert "lacks stream, world_size, config, files" in msg

    with pytest.raises(SystemExit) as e:
        parse_args([*base[:-1], "--target", "sometimes"])
    assert e.value.code == 2 and "--target" in capsys.readouterr().err

    # a new run (no --resume) into the directory of an earlier one is refused, naming it
    msg = refusal([*base[:-1], "--out", str(tmp_path / "bad")])
    assert "already holds checkpoints of an earlier run (newest: step_000001)" in msg


def test_failed_save_is_a_clear_error(tiny_model_dir, tmp_path):
    """A checkpoint that cannot be written (here `checkpoints` is a file; in the field, a full disk, which torch
    reports as "unexpected pos 704 vs 598") stops the run with the path and the free space named."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoints").write_text("not a directory")
    with pytest.raises(RuntimeError) as e:
        train_here([*TINY, "--model", tiny_model_dir, "--steps", "1", "--out", str(out)])
    assert f"saving checkpoint {out / 'checkpoints' / 'step_000001'} failed" in str(e.value)
    assert "GiB free" in str(e.value)
    assert [m["step"] for m in _metrics(out)] == [1]  # the step's metrics were written before the save


def test_every_reward_trains_a_step_on_real_generations(embedded_model_dir, tiny_model_dir):
    """One step per --reward on SmolLM2's own generations: generate, grade, score the groups, advantages, and an
    optimizer step on them. The tiny model takes the steps (SmolLM2's tokenizer, so the same token ids): 13 updates
    of the 135M model took 30 s more, and SmolLM2's own update is test_real_run_on_embedded_model_...'s."""
    import data as D
    import model as M
    import rewards as R
    import rollout
    from grpo import Episode, compute_rewards, group_advantages, parse_args, update_policy

    torch.set_num_threads(2)
    dist_info = M.init_distributed()
    tok = M.load_tokenizer(embedded_model_dir)
    bf16 = M.use_bf16(torch.device("cpu"), "auto")  # as grpo.py --dtype auto decides on this CPU
    policy = M.shard_model(M.load_model(tiny_model_dir), mixed_precision=bf16)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-4)
    engine = rollout.HFEngine(embedded_model_dir, batch_size=8)
    common = (
        "--target exact --max-new-tokens 16 --prompts-per-step 1 --group-size 4 --minibatches 1 --kl-coef 0 "
        "--last-number-fallback --tokens-per-microbatch 4096"
    ).split()
    stream = D.PromptStream(D.load_problems("arith", split="test", limit=8), target_lo=8, target_hi=32, seed=1)
    samples = stream.next_batch(1, tok)
    prompts = [tok(s.prompt, add_special_tokens=False)["input_ids"] for s in samples]
    completions = engine.generate(prompts, 4, rollout.SamplingConfig(temperature=0.6, max_new_tokens=16, seed=2))
    history, before = R.HapoHistory(), {k: v.clone() for k, v in M.iter_full_state_dict(policy)}
    history.update({s.problem.id: 12 for s in samples})  # so HAPO's length term is on
    for name in R.REWARDS:
        cfg = parse_args([*common, "--reward", name])
        scores = compute_rewards(samples, completions, cfg, history)
        assert scores.reward.shape == (1, 4) and torch.isfinite(scores.reward).all(), name
        assert torch.equal(
            scores.length, torch.tensor([[len(c.token_ids) for c in g] for g in completions], dtype=torch.float32)
        )
        adv = group_advantages(scores.reward)
        episodes = [
            Episode(p, c.token_ids, scores.reward[i, j].item(), adv[i, j].item(), c.logprobs)
            for i, (p, group) in enumerate(zip(prompts, completions))
            for j, c in enumerate(group)
        ]
        stats = update_policy(policy, None, optimizer, episodes, cfg, dist_info, packed=False)
        assert math.isfinite(stats["grad_norm"]) and stats["tokens"] == scores.length.sum(), name
    after = dict(M.iter_full_state_dict(policy))
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_keeps_the_reward_state(tiny_model_dir, tmp_path):
    """HAPO's per-problem history goes into the checkpoint and comes back exactly, with the data stream."""
    import checkpoint as C
    import data as D
    import model as M
    import rewards as R
    from grpo import parse_args

    dist_info = M.init_distributed()
    cfg = parse_args([*TINY, "--model", tiny_model_dir, "--reward", "hapo", "--out", str(tmp_path)])
    policy = M.shard_model(M.load_model(tiny_model_dir), mixed_precision=False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    stream = D.PromptStream(D.load_problems("arith", limit=20), seed=5)
    stream.next_batch(6)
    history = R.HapoHistory()
    history.update({"arith:1:train:0:3": 17, "arith:1:train:0:9": 4})
    path = C.save(3, policy, M.load_tokenizer(tiny_model_dir), optimizer, stream, history, cfg, dist_info)
    stream2, history2 = D.PromptStream(D.load_problems("arith", limit=20), seed=5), R.HapoHistory()
    state = C.load(path, policy, optimizer, stream2, history2, dist_info)
    assert state["step"] == 3 and history2.h == history.h
    assert [s.prompt for s in stream2.next_batch(4)] == [s.prompt for s in stream.next_batch(4)]


def test_vllm_kv_cache_too_small_names_the_flags(tiny_vllm_model_dir, tmp_path, monkeypatch):
    """A KV cache that cannot hold one prompt + --max-new-tokens sequence stops the run at start-up, naming the
    flags. The check comes before vLLM is imported, so it runs here (conftest.refusal)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # the CPU engine's settings set it; restored after
    flags = "--steps 1 --engine vllm --max-new-tokens 200 --vllm-kv-cache-gib 0.00001".split()
    msg = refusal([*TINY, *flags, "--model", tiny_vllm_model_dir, "--out", str(tmp_path / "run")])
    assert "cannot hold one sequence of max_model_len = 456 tokens" in msg, msg
    assert "--max-new-tokens" in msg and "--vllm-kv-cache-gib" in msg
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "extra",
    [
        (
            "--target mixed --kl-coef 0 --loss-agg seq-mean-token-mean --drop-equal-groups --eps-high 0.28 "
            "--no-std-normalize --tis-cap 0 --targets-per-problem 2 --dtype float32"
        ).split(),
        (
            "--target none --reward correctness --loss-agg constant --entropy-coef 0 --minibatches 1 --packed on "
            "--dtype bfloat16"
        ).split(),
    ],
)
def test_variant_flags_run_a_step(tiny_model_dir, tmp_path, extra):
    """The options the field uses (L1-Max mixed prompts, each problem at two targets, no reference model, Dr. GRPO,
    clip-higher, dropping equal groups, plain GRPO, packed rows on CPU, either compute dtype on CPU) run the real
    loop and log a step."""
    out = tmp_path / "run"
    train_here([*TINY, "--model", tiny_model_dir, "--steps", "1", "--out", str(out), *extra])
    (m,) = _metrics(out)
    assert m["step"] == 1 and (m["kl"] == 0 if "--kl-coef" in extra else True)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["data"]["target"] == extra[1]
    if "--dtype" in extra:
        assert cfg["model"]["dtype"] == extra[extra.index("--dtype") + 1]
