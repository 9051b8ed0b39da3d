"""Installed import names live under the project: `gptoss_jax.kernels` and `gptoss_jax.convert` (the repository
keeps the top-level folders `pallas_kernels/` and `convert/`, linked into the package), so installing gptoss-jax
never puts a generic top-level `convert` module into site-packages."""

import subprocess
import sys


def _run(code: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_no_generic_top_level_modules(tmp_path):
    for name in ("convert", "pallas_kernels"):
        r = _run(f"import {name}", tmp_path)  # outside the repository: only what the install provides
        assert r.returncode != 0 and "ModuleNotFoundError" in r.stderr, (name, r.stdout, r.stderr)


def test_package_names_import_and_agree(tmp_path):
    r = _run("import gptoss_jax, gptoss_jax.kernels as k, gptoss_jax.convert.cli as c\n"
             "from gptoss_jax.layers import dense_matmul\n"
             "assert dense_matmul is k.dense_matmul\n"
             "print(issubclass(c.__class__, object))", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
