"""`kernels` is also the import name of Hugging Face's `kernels` package, which transformers 5 requires
and imports (`transformers.integrations.hub_kernels`) whenever it is installed. Ours is a namespace
package (no `__init__.py`), so that a regular `kernels` package elsewhere on the path wins the top-level
name while our modules still resolve: with an `__init__.py`, running from the repository root put ours
first and every transformers model import failed ("cannot import name 'CUDAProperties' from 'kernels'")."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OURS = ("dispatch", "sampling", "tree_attention", "verify")


def run_from_root(code: str, **env) -> subprocess.CompletedProcess:
    """`python -c code` from the repository root, as `python -m pytest` and the README run: '' first on sys.path."""
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=120)


def test_our_kernel_modules_resolve_to_this_repository():
    r = run_from_root("import importlib\n"
                      f"for m in {OURS!r}: print(importlib.import_module('kernels.' + m).__file__)")
    assert r.returncode == 0, r.stderr
    assert [Path(f).resolve() for f in r.stdout.split()] == [ROOT / "kernels" / f"{m}.py" for m in OURS]


def test_a_regular_kernels_package_on_the_path_keeps_its_name(tmp_path):
    """A stand-in for Hugging Face's package, after the repository root on sys.path: it must win `kernels`."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("FOREIGN = True\n")
    r = run_from_root("import kernels; print(kernels.FOREIGN)", PYTHONPATH=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "True"


def test_transformers_hub_kernels_import_beside_ours():
    try:
        importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Hugging Face's kernels package is not installed")
    r = run_from_root("import transformers.integrations.hub_kernels, kernels.tree_attention; "
                      "from transformers import LlamaConfig; print(LlamaConfig().model_type)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "llama"
