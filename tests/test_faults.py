"""Faults on purpose: the whole 2-process run killed with SIGKILL at named moments, then --resume; what a killed run
leaves on disk (a .tmp directory, a checkpoint without state.json, a truncated shard); and resumes with other
settings. The kill points are deterministic (checkpoint.fault_point, LCPO_FAULT=<point>:<step>), so no test passes
by luck; a tiny random Llama with SmolLM2's tokenizer keeps each run to seconds."""

import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import torch

import checkpoint as C
import model as M
from conftest import TINY, _env, _metrics, _weights, refusal, torchrun, train_here

ROOT = Path(__file__).resolve().parents[1]
RUN = [*TINY, *"--steps 4 --save-every 1 --seed 3".split()]  # --keep-checkpoints 2, the default


def _run(model_dir, out, *extra, fault=None, timeout=300):
    """grpo.py under torchrun, 2 processes, in its own session (a fault kills that whole process group, torchrun
    included)."""
    env = _env(**({"LCPO_FAULT": fault} if fault else {}))
    return subprocess.run(
        [*torchrun(2), str(ROOT / "grpo.py"), *RUN, "--model", model_dir, "--out", str(out), *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=True,
    )


@pytest.fixture(scope="module")
def straight(tiny_model_dir, tmp_path_factory):
    """The uninterrupted run every crashed-and-resumed run must equal: 2 processes, each generating its own prompts
    with its own engine and taking the weight push every step. --keep-checkpoints 2 leaves the newest two saves."""
    out = tmp_path_factory.mktemp("straight") / "run"
    r = _run(tiny_model_dir, out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_000003", "step_000004"]
    trained, start = _weights(out / "checkpoints" / "step_000004"), M.read_safetensors(tiny_model_dir)
    assert not torch.equal(trained["model.embed_tokens.weight"], start["model.embed_tokens.weight"])
    return out


def _assert_same_run(a: Path, b: Path):
    ma, mb = _metrics(a), _metrics(b)
    assert [m["step"] for m in mb] == [1, 2, 3, 4]  # no step repeated, none missing
    for x, y in zip(ma, mb):
        for k in ("reward", "accuracy", "response_len", "rel_len_dev", "kl", "clip_frac", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
        assert x["len_target_corr"] == (y["len_target_corr"] and pytest.approx(y["len_target_corr"]))
    wa, wb = _weights(a / "checkpoints" / "step_000004"), _weights(b / "checkpoints" / "step_000004")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    state = json.loads((b / "checkpoints" / "step_000004" / "state.json").read_text())
    assert state["step"] == 4 and state["world_size"] == 2


def test_sigkill_anywhere_then_resume_equals_the_straight_run(straight, tiny_model_dir, tmp_path):
    """One run killed four times, each resume killed again at the next point, then resumed to the end: the same
    weights and metrics as the uninterrupted run, no step repeated or missing."""
    out = tmp_path / "run"
    chain = [  # (kill point, the checkpoint the next resume must start from, what the kill left half written)
        ("generate:2", "step_000001", None),  # the step's responses generated, nothing trained
        ("update:3", "step_000002", None),  # one optimizer step of the batch taken
        ("save:3", "step_000002", "step_000003.tmp"),  # mid-checkpoint: the model written, the optimizer not
        ("metrics:4", "step_000003", None),  # the step's metrics line written, its checkpoint not
    ]
    for i, (fault, resumed_from, skipped) in enumerate(chain):
        r = _run(tiny_model_dir, out, *(["--resume"] if i else []), fault=fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])  # torchrun itself killed
        if i:
            assert f"resumed from {out / 'checkpoints' / chain[i - 1][1]}" in r.stderr, fault
        if i and chain[i - 1][2]:
            left = out / "checkpoints" / chain[i - 1][2]
            assert f"skipping {left}: a save that did not finish (.tmp)" in r.stderr
        if skipped:
            assert (out / "checkpoints" / skipped).is_dir()
            assert not (out / "checkpoints" / skipped / "state.json").exists()
    with open(out / "metrics.jsonl", "a") as f:  # and a line half written when the last kill came
        f.write('{"step": 5, "rew')
    r = _run(tiny_model_dir, out, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000003'} at step 3" in r.stderr
    assert "dropped 2 metrics line(s) of steps after 3" in r.stderr  # step 4's line and the half-written one
    _assert_same_run(straight, out)


def test_what_a_killed_run_leaves_behind(straight, tiny_model_dir, tmp_path, caplog):
    """Incomplete checkpoints are skipped, each named with why; a complete-looking one that cannot be read is an
    error naming the file, never a start from scratch; and the run directory is left as it was."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    ckpts = out / "checkpoints"
    (ckpts / "step_000005.tmp").mkdir()
    shutil.copytree(ckpts / "step_000004", ckpts / "step_000006")
    (ckpts / "step_000006" / "state.json").unlink()
    train_here([*RUN, "--model", tiny_model_dir, "--out", str(out), "--resume"])  # --steps 4: nothing left to train
    assert f"skipping {ckpts / 'step_000005.tmp'}: a save that did not finish (.tmp)" in caplog.text
    assert f"skipping {ckpts / 'step_000006'}: no state.json: the save did not finish" in caplog.text
    assert f"resumed from {ckpts / 'step_000004'} at step 4" in caplog.text

    before = {p: p.read_bytes() for p in (out / "config.json", out / "metrics.jsonl")}
    model = ckpts / "step_000004" / "model" / "model.safetensors"
    size = model.stat().st_size
    with open(model, "r+b") as f:
        f.truncate(size - 100)
    assert (  # refused before anything loads: in this process (conftest.refusal)
        f"cannot resume from checkpoint {ckpts / 'step_000004'}: {model} has {size - 100} bytes, {size} when it "
        "was written (truncated or overwritten)"
        in refusal([*RUN, "--model", tiny_model_dir, "--out", str(out), "--resume"])
    )
    shutil.copy(straight / "checkpoints" / "step_000004" / "model" / "model.safetensors", model)
    assert {p: p.read_bytes() for p in before} == before  # the failed resume touched nothing
    # the other damage, through the check grpo.py --resume runs before it loads anything (checkpoint.verify)
    shard = next((ckpts / "step_000004" / "optim").glob("*.distcp"))
    shard.write_bytes(b"")
    with pytest.raises(RuntimeError, match=f"{re.escape(str(shard))} has 0 bytes"):
        C.verify(ckpts / "step_000004")
    (ckpts / "step_000004" / "state.json").write_text('{"step": 4, "stream"')
    with pytest.raises(RuntimeError, match=re.escape(f"{ckpts / 'step_000004' / 'state.json'} cannot be read")):
        C.verify(ckpts / "step_000004")

    # bad data on resume: an error naming the file and line, and nothing written either
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Q", "answer": "1"}\n{oops\n')
    msg = refusal([*RUN, "--model", tiny_model_dir, "--out", str(out), "--resume", "--data", str(bad)])
    assert f"{bad}: line 2: invalid JSON" in msg
    assert {p: p.read_bytes() for p in before} == before


def test_resume_with_other_settings(straight, tiny_model_dir, tmp_path, caplog):
    """The README's rule: settings that define the run (model, data, reward, optimization, seed) are refused on
    resume, naming the flags; how the run executes (engine, micro-batching, steps, world size) may change, with a
    warning saying what changed."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    other = tmp_path / "other_model"
    shutil.copytree(tiny_model_dir, other)
    msg = refusal(
        [*RUN, "--model", tiny_model_dir, "--out", str(out), "--resume", "--model", str(other), "--lr", "0.5"]
    )
    assert "--resume: the checkpoint was trained with other settings that define the run" in msg
    assert f"--model {tiny_model_dir!r} -> {str(other)!r}" in msg and "--lr 0.001 -> 0.5" in msg
    train_here(
        [*RUN, "--model", tiny_model_dir, "--out", str(out), *"--resume --tokens-per-microbatch 64 --steps 5".split()]
    )
    assert "--tokens-per-microbatch 96 -> 64" in caplog.text and "--steps 4 -> 5" in caplog.text
    assert "world size 2 -> 1 (the optimizer state is resharded" in caplog.text
    assert [m["step"] for m in _metrics(out)] == [1, 2, 3, 4, 5]
    assert json.loads((out / "checkpoints" / "step_000005" / "state.json").read_text())["world_size"] == 1


def test_branch_from_a_checkpoint_of_another_run(straight, tiny_model_dir, tmp_path):
    """--branch-from: a new run starts from another run's checkpoint (weights, optimizer, data stream, RNG, step)
    with other flags, each change logged. Here the reward is renamed to one that scores the same (lcpo-norepeat
    with no penalty), so the branch's step 4 must be the straight run's step 4 exactly."""
    out = tmp_path / "branch"
    ckpt = straight / "checkpoints" / "step_000003"
    r = _run(tiny_model_dir, out, "--branch-from", str(ckpt), *"--reward lcpo-norepeat --repeat-penalty 0".split())
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"--branch-from {ckpt}: --reward 'lcpo' -> 'lcpo-norepeat'" in r.stderr
    assert f"branched from {ckpt} at step 3" in r.stderr
    (m,), s = _metrics(out), _metrics(straight)[3]
    assert m["step"] == 4
    for k in ("reward", "accuracy", "response_len", "rel_len_dev", "kl", "clip_frac", "grad_norm"):
        assert m[k] == pytest.approx(s[k], rel=1e-5, abs=1e-7), k
    wa, wb = _weights(straight / "checkpoints" / "step_000004"), _weights(out / "checkpoints" / "step_000004")
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    assert json.loads((out / "config.json").read_text())["reward"]["reward"] == "lcpo-norepeat"


def test_lora_run_killed_and_resumed_equals_the_straight_run(tiny_model_dir, tmp_path):
    """The same for a LoRA run (--lora-rank 4; its KL reference is its own base, adapters off): killed mid-save (the
    adapter written, the optimizer not) and mid-update, then resumed, it ends with the adapters, metrics and merged
    model of the straight LoRA run. Only the last save holds the merged model; `lora.py merge` writes the same one
    from any save. A resume on a base whose weights differ from the recorded ones is refused, naming both."""
    import lora as L

    flags = ("--lora-rank", "4", "--lora-alpha", "16")
    straight, out = tmp_path / "straight", tmp_path / "run"
    r = _run(tiny_model_dir, straight, *flags)
    assert r.returncode == 0, r.stderr[-3000:]
    for i, fault in enumerate(("save:3", "update:4")):
        r = _run(tiny_model_dir, out, *flags, *(["--resume"] if i else []), fault=fault)
        assert r.returncode == -signal.SIGKILL, (fault, r.returncode, r.stderr[-2000:])
    r = _run(tiny_model_dir, out, *flags, "--resume")
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / 'step_000003'} at step 3" in r.stderr
    _assert_same_run(straight, out)  # the metrics and the merged model of the last save
    assert _metrics(straight)[-1]["kl"] > 0
    a, b = (M.read_safetensors(run / "checkpoints" / "step_000004" / "adapter") for run in (straight, out))
    assert len(a) == 28 and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    ckpts = straight / "checkpoints"
    assert not (ckpts / "step_000003" / "model").exists()  # adapters only, until the last save
    with pytest.raises(FileNotFoundError, match=f"python lora.py merge {ckpts / 'step_000003'}"):
        M.resolve_model(str(ckpts / "step_000003" / "model"))  # what evaluate.py --model says of it
    merged = _weights(ckpts / "step_000004")
    base = M.read_safetensors(tiny_model_dir)
    assert not torch.equal(merged["model.layers.0.mlp.up_proj.weight"], base["model.layers.0.mlp.up_proj.weight"])
    L.merge(ckpts / "step_000004", tmp_path / "merged")
    again = M.read_safetensors(tmp_path / "merged")
    assert again.keys() == merged.keys() and all(torch.equal(again[k], merged[k]) for k in merged)

    state = json.loads((ckpts / "step_000004" / "state.json").read_text())
    state["base_model"]["sha256"] = "0" * 64  # as if the base had been trained on other weights than these
    (ckpts / "step_000004" / "state.json").write_text(json.dumps(state))
    msg = refusal([*RUN, *flags, "--model", tiny_model_dir, "--out", str(straight), "--resume"])
    assert f"--resume: checkpoint {ckpts / 'step_000004'} trained its LoRA adapter on the base model in" in msg
    assert f"this run's base, {tiny_model_dir}, has other weights" in msg
