"""Installed import names live under the project: `gptoss_jax.kernels` and `gptoss_jax.convert` (the repository
keeps the top-level folders `pallas_kernels/` and `convert/`, linked into the package), so installing gptoss-jax
never puts a generic top-level `convert` module into site-packages."""

import os
import pathlib
import subprocess
import sys


def _run(code: str, cwd, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300, env=env)


def test_no_generic_top_level_modules(tmp_path):
    # outside the repository and without PYTHONPATH (which may name the repository root): only what the install
    # provides
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for name in ("convert", "pallas_kernels"):
        r = _run(f"import {name}", tmp_path, env)
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout, r.stderr)


def test_package_names_import_and_agree(tmp_path):
    r = _run("import gptoss_jax, gptoss_jax.kernels as k, gptoss_jax.convert.cli as c\n"
             "from gptoss_jax.layers import dense_matmul\n"
             "assert dense_matmul is k.dense_matmul\n"
             "print(issubclass(c.__class__, object))", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]


# Every runtime module: the package walked (kernels and convert are linked into it), the testing package left out.
RUNTIME_IMPORTS = """
import importlib, pkgutil, sys
names = []

def walk(package):  # pkgutil.walk_packages would import gptoss_jax.testing itself to look inside it
    module = importlib.import_module(package)
    names.append(package)
    for info in pkgutil.iter_modules(module.__path__, package + "."):
        if info.name == "gptoss_jax.testing":
            continue
        if info.ispkg:
            walk(info.name)
        else:
            importlib.import_module(info.name)
            names.append(info.name)

walk("gptoss_jax")
for name in ("gptoss_jax.kernels", "gptoss_jax.convert", "gptoss_jax.convert.cli", "gptoss_jax.cli",
             "gptoss_jax.hf_names", "gptoss_jax.hf_loader", "gptoss_jax.convert.sources"):
    assert name in sys.modules, name
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "compressed_tensors")
                or m == "gptoss_jax.testing" or m.startswith("gptoss_jax.testing."))
print(len(names), "modules")
print("LEAKED", leaked)
"""


def test_runtime_never_imports_test_fixtures(tmp_path):
    """Importing every runtime module (gptoss_jax.*, its kernels and convert, the CLIs) pulls in neither torch /
    transformers / compressed-tensors nor the test fixtures of gptoss_jax.testing."""
    root = pathlib.Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-c", RUNTIME_IMPORTS], cwd=tmp_path, capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    count = int(r.stdout.split()[0])
    assert count >= 30, r.stdout  # the walk really found the package (kernels and convert included)
    assert "LEAKED []" in r.stdout, r.stdout
