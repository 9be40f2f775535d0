"""The project's import names belong to it alone, and the installed packages work from anywhere.

transformers >= 5.25 installs Hugging Face's `kernels` distribution: a folder of ours with that name
shadowed it for any process started at the repository root, and it shadowed ours everywhere else.
These tests fail when any installed distribution provides one of our top-level names, when a folder at
the repository root would shadow one, when the wheel leaves a package or a data file out, and when the
README's example for other projects stops running outside the repository.
"""
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("cir", "cir_kernels", "cir_sandbox")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def test_no_other_distribution_provides_our_import_names():
    providers = importlib.metadata.packages_distributions()
    ours = importlib.metadata.distribution("cir").metadata["Name"]
    clashes = {name: sorted(set(providers.get(name, [])) - {ours}) for name in OUR_PACKAGES}
    assert not {k: v for k, v in clashes.items() if v}, f"other distributions install our import names: {clashes}"


def test_no_root_folder_shadows_an_installed_distribution():
    """A process started at the root (pytest, train.py, python -m cir...) has the root first on sys.path:
    a package folder there wins over any installed package of the same name."""
    providers = importlib.metadata.packages_distributions()
    packages = [p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert set(OUR_PACKAGES) <= set(packages)
    shadowing = {name: providers[name] for name in packages if name in providers and name not in OUR_PACKAGES}
    assert not shadowing, f"root folders shadow installed distributions: {shadowing}"
    modules = [p.stem for p in ROOT.glob("*.py")]
    assert not {m: providers[m] for m in modules if m in providers and m != "setup"}


def test_transformers_loads_a_model_from_the_repository_root():
    code = ("import transformers, torch; from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, "
            "Qwen2ForCausalLM\n"
            "for cls, cfg in ((LlamaForCausalLM, LlamaConfig), (Qwen2ForCausalLM, Qwen2Config)):\n"
            "    m = cls(cfg(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,"
            " num_attention_heads=2, num_key_value_heads=1))\n"
            "    assert m(torch.zeros(1, 3, dtype=torch.long)).logits.shape == (1, 3, 64)\n"
            "import cir_kernels, cir_sandbox, cir\n"
            "print(cir_kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=clean_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert Path(proc.stdout.strip()).parent == ROOT / "cir_kernels"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    match = re.search(r"<!-- example: kernels-elsewhere.*?-->\n```python\n(.*?)\n```", text, re.S)
    assert match, "README lost its example for other projects"
    return match.group(1)


def test_readme_kernels_example_runs_outside_the_repository(tmp_path):
    script = tmp_path / "example.py"
    script.write_text(readme_example())
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.match(r"loss -?\d+\.\d+ mean entropy \d+\.\d+ next tokens \[(\d+, ){3}\d+\]", proc.stdout), proc.stdout


@pytest.mark.slow
def test_the_wheel_installs_and_imports_outside_the_repository(tmp_path):
    """Not editable: build the wheel, install it into a folder of its own, import from /tmp-like cwd."""
    wheels, target, source = tmp_path / "wheels", tmp_path / "site", tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:  # a copy of the checkout: the build's own folders stay out of the repository
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("cir-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == set(OUR_PACKAGES), tops
    assert "cir/data/arith.jsonl" in names
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q",
                              "--target", str(target), str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import cir, cir_kernels, cir_sandbox, cir.data.arithmetic, torch\n"
            "from cir_kernels import sample\n"
            "from cir_sandbox import Sandbox\n"
            "for m in (cir, cir_kernels, cir_sandbox): print(m.__file__)\n"
            "tokens, _ = sample(torch.tensor([[0.0, 9.0, 1.0]]), 0.0)\n"
            "assert tokens.tolist() == [1]\n"
            "with Sandbox(workers=1, timeout=10) as box:\n"
            "    assert box.run('print(6 * 7)').stdout.strip() == '42'\n")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    proc = subprocess.run([sys.executable, "-c", code], cwd=run_dir, env=clean_env(PYTHONPATH=str(target)),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for line in proc.stdout.split():
        assert Path(line).is_relative_to(target), f"imported from {line}, not from the installed wheel"
