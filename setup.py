"""cir: code-integrated reasoning RL trainer. One package set: cir, cir_kernels, cir_sandbox.

    pip install torch==2.13.0 -e ".[test]"     # CPU
    pip install -e ".[gpu]"                     # on a CUDA node (adds flash-attn)
"""
from setuptools import find_packages, setup

setup(
    name="cir",
    version="0.1.0",
    description="Fast, hackable RL for code-integrated reasoning (arXiv 2505.24480)",
    python_requires=">=3.10",
    packages=find_packages(include=["cir", "cir.*", "cir_kernels", "cir_kernels.*", "cir_sandbox", "cir_sandbox.*"]),
    install_requires=[
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "numpy",
        "jinja2>=3.1",
        "pyyaml",
        "tqdm",
        "gguf>=0.10",
        "pyseccomp>=0.1.2; platform_system == 'Linux'",
        "math-verify>=0.7",
        "pyarrow",
        "matplotlib",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "test": ["pytest>=8", "transformers>=4.45", "accelerate>=1.0", "sympy", "scipy", "ruff>=0.15,<0.18"],
    },
    package_data={"cir": ["data/*.jsonl"]},
)
