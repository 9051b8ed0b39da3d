"""Every ```python example in README.md and docs/API.md runs as written, against a tiny random checkpoint.

The blocks of one file run in order in one namespace (as a reader would type them); the checkpoint paths the docs
use ("path/to/checkpoint", "gpt-oss-120b-int4/") are the only substitution. A subprocess with 8 virtual CPU devices,
so the ``mesh="1,4,2"`` example runs too.
"""

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/API.md"]
PLACEHOLDERS = ("path/to/checkpoint", "gpt-oss-120b-int4/")


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def test_the_docs_have_python_examples():
    assert all(python_blocks(ROOT / doc) for doc in DOCS)
    assert "model.logits(ids)" in "".join(python_blocks(ROOT / "docs/API.md"))


RUNNER = textwrap.dedent("""
    import sys, warnings
    from pathlib import Path
    warnings.simplefilter("ignore")  # random weights: harmony parse warnings are expected
    import jax.numpy as jnp
    from flax import nnx
    from gptoss_jax.config import GptOssConfig
    from gptoss_jax.hf_loader import save_hf_checkpoint
    from gptoss_jax.model import GptOss, params_of
    from gptoss_jax.testing import build_tiny_tokenizer
    ckpt = Path(sys.argv[1]) / "ckpt"  # the tiny preset cut to one layer: the examples' cost is compiling
    tok = build_tiny_tokenizer(1024, path=ckpt)
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=1,
                                                      layer_types=())
    save_hf_checkpoint(params_of(GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(0))), config, ckpt)
    for doc, blocks in DOCS.items():
        namespace = {}
        for n, block in enumerate(blocks):
            for placeholder in PLACEHOLDERS:
                block = block.replace(placeholder, str(ckpt))
            try:
                exec(compile(block, f"{doc} python block {n + 1}", "exec"), namespace)
            except Exception as e:
                print(f"FAILED {doc} block {n + 1}: {type(e).__name__}: {e}")
                raise
        print(f"ran {len(blocks)} blocks of {doc}")
""")


@pytest.mark.slow
def test_doc_examples_run(tmp_path):
    blocks = {doc: python_blocks(ROOT / doc) for doc in DOCS}
    script = f"DOCS = {blocks!r}\nPLACEHOLDERS = {PLACEHOLDERS!r}\n" + RUNNER
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    p = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True,
                       timeout=900, cwd=tmp_path)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for doc in DOCS:
        assert f"ran {len(blocks[doc])} blocks of {doc}" in p.stdout
