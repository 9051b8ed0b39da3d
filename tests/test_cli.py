"""The gptoss-jax command end to end (subprocesses) on a tiny checkpoint, plus bad-input exits.

The checkpoint is the scripted "bigram" chat model of test_api (it answers every harmony prompt with a final
"Hello!"), saved as a Hugging Face folder with the tiny tokenizer. Subprocesses share a persistent JAX compilation
cache in the session's tmp folder, so only the first of them pays for compiling a shape.
"""

import json
import math
import os
import subprocess
import sys

import pytest

from gptoss_jax import cli, harmony
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import params_of, save_hf_checkpoint
from gptoss_jax.tokenizer import build_tiny_tokenizer, load_tokenizer

from test_api import FINAL_ANSWER, harmony_chain, scripted_module


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_ckpt")
    tok = build_tiny_tokenizer(1024, path=path)
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2,
                                                      layer_types=())
    ids = harmony.special_token_ids(tok)
    prompt = harmony.render_conversation_ids(tok, [harmony.Message.user("hi")])
    completion = ([ids["<|channel|>"]] + tok.encode("final", allow_special=False) + [ids["<|message|>"]]
                  + tok.encode(FINAL_ANSWER, allow_special=False) + [ids["<|return|>"]])
    module = scripted_module(config, tok, harmony_chain(tok, prompt, completion))
    save_hf_checkpoint(params_of(module), config, path)
    return path


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    e = dict(os.environ)
    e.update(JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return e


def run(env, *args, stdin=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "gptoss_jax.cli", *map(str, args)], input=stdin, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------- commands
def test_info(ckpt, env):
    p = run(env, "info", ckpt, "--json", "--dtype", "float32")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["format"] == "huggingface" and info["config"]["num_hidden_layers"] == 2
    assert info["quantization"] is None and info["parameters"] > 0 and info["bytes"] > 0 and info["devices"]
    assert "loaded" in p.stderr


def test_info_text(ckpt, capsys):
    assert cli.main(["info", str(ckpt)]) == 0
    out = capsys.readouterr().out
    for field in ("architecture:", "parameters:", "quantization:  none", "devices:", "tokenizer:"):
        assert field in out


def test_info_reports_assumed_rope_keys(ckpt, tmp_path, capsys):
    """Case yarn-partial-rope-dict: `gptoss-jax info` says which rope keys config.json left out and what was used
    (transformers' defaults); a complete config reports nothing."""
    import shutil
    folder = tmp_path / "partial"
    shutil.copytree(ckpt, folder)
    d = json.loads((folder / "config.json").read_text())
    rope = d.pop("rope_parameters")
    d["rope_theta"] = rope.pop("rope_theta")
    rope.pop("truncate")
    d["rope_scaling"] = rope
    (folder / "config.json").write_text(json.dumps(d))
    assert cli.main(["info", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["assumed"]) == 1 and info["assumed"][0].startswith("truncate=True (not in rope_scaling")
    assert cli.main(["info", str(folder)]) == 0
    assert "assumed:       truncate=True" in capsys.readouterr().out
    assert cli.main(["info", str(ckpt), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["assumed"] == []


def test_generate_stream_and_batch_json(ckpt, env, tmp_path, capsys):
    tok = load_tokenizer(ckpt)
    # --stream in-process (same code path as the console script, cheaper than another subprocess)
    assert cli.main(["generate", str(ckpt), "Hello, world!", "--temperature", "0", "--max-new-tokens", "12",
                     "--no-stop-ids", "--stream", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    assert "time to first token" in captured.err and "tokens/s" in captured.err
    streamed = captured.out.rstrip("\n")

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello, world!\n\nThe quick brown fox\n")
    p = run(env, "generate", ckpt, "--file", prompts, "--temperature", "0", "--max-new-tokens", "12",
            "--no-stop-ids", "--json", "--dtype", "float32")
    assert p.returncode == 0, p.stderr
    rows = [json.loads(line) for line in p.stdout.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hello, world!", "The quick brown fox"]  # blank lines skipped
    for r in rows:
        assert len(r["tokens"]) == 12 and r["finish_reason"] == "length"
        assert r["text"] == tok.decode(r["tokens"])
    assert rows[0]["text"] == streamed  # batched greedy = streamed greedy for the same prompt


def test_generate_harmony_prompt_stops_on_return(ckpt, env):
    p = run(env, "generate", ckpt, "What is 2 + 2?", "--harmony", "--temperature", "0", "--json")
    assert p.returncode == 0, p.stderr
    row = json.loads(p.stdout)
    assert row["finish_reason"] == "stop_token"
    assert harmony.final_text(harmony.parse_completion(row["tokens"], load_tokenizer(ckpt))) == FINAL_ANSWER


def test_chat_repl(ckpt, env):
    session = "What is 2 + 2?\n/reasoning low\n\nAnd 3 + 3?\n/bogus\n/exit\nnever read\n"
    p = run(env, "chat", ckpt, "--temperature", "0", "--max-new-tokens", "40", "--show-reasoning", stdin=session)
    assert p.returncode == 0, p.stderr
    assert p.stdout.splitlines() == [FINAL_ANSWER, FINAL_ANSWER]
    assert "reasoning: low" in p.stderr and "unknown command" in p.stderr
    assert p.stderr.count("finish: stop_token") == 2 and "time to first token" in p.stderr


def test_score(ckpt, env, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("The quick brown fox jumps over the lazy dog.\nHello, world!\n\nx\n")
    out = tmp_path / "scores.json"
    p = run(env, "score", ckpt, lines, "--output", out, "--token-logprobs")
    assert p.returncode == 0, p.stderr
    data = json.loads(out.read_text())
    scored = [e for e in data["lines"] if "total_logprob" in e]
    assert len(data["lines"]) == 4 and len(scored) == 2
    assert [e["line"] for e in data["lines"] if "skipped" in e] == [3, 4]
    for e in scored:
        assert e["num_scored"] == e["num_tokens"] - 1 == len(e["token_logprobs"])
        assert e["total_logprob"] < 0 and math.isclose(e["total_logprob"], sum(e["token_logprobs"]), rel_tol=1e-5)
        assert math.isclose(e["perplexity"], math.exp(-e["mean_logprob"]), rel_tol=1e-6)
    assert math.isclose(data["total_logprob"], sum(e["total_logprob"] for e in scored), rel_tol=1e-9)
    assert "tokens/s" in p.stderr


@pytest.mark.slow
def test_demo(tmp_path, capsys):
    assert cli.main(["demo", "--max-new-tokens", "6", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and "tokens/s" in out and "time to first token" in out
    assert (tmp_path / "demo" / "tokenizer.json").exists() and (tmp_path / "demo" / "config.json").exists()


# ---------------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs_exit_2_in_a_subprocess(ckpt, env, tmp_path):
    p = run(env, "generate", ckpt, "hi", "--temperature", "-1")
    assert p.returncode == 2 and "temperature must be >= 0" in p.stderr
    p = run(env, "generate", tmp_path / "missing", "hi")
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run(env, "generate")
    assert p.returncode == 2 and "usage" in p.stderr


@pytest.mark.parametrize("argv, match", [
    (["generate", "{ckpt}", "hi", "--top-p", "0"], "top_p"),
    (["generate", "{ckpt}", "hi", "--top-p", "1.5"], "top_p"),
    (["generate", "{ckpt}", "hi", "--top-k", "-3"], "top_k"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "0"], "max_new_tokens"),
    (["generate", "{ckpt}"], "give a prompt or --file"),
    (["generate", "{ckpt}", "hi", "--file", "{empty}"], "give a prompt or --file"),
    (["generate", "{ckpt}", "--file", "{empty}"], "no prompts"),
    (["generate", "{ckpt}", "--file", "{two}", "--stream"], "--stream"),
    (["generate", "{ckpt}", "--file", "{tmp}/none.txt"], "no such file"),
    (["generate", "{ckpt}", "hello " * 40, "--max-seq-len", "32"], "longer than the context"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "100", "--max-seq-len", "32"], "exceeds the context"),
    (["generate", "{ckpt}", "hi", "--stop-id", "100000"], "stop_token_ids"),
    (["generate", "{ckpt}", "hi", "--dtype", "int7"], "dtype"),
    (["generate", "{ckpt}", "hi", "--mesh", "1,x,1"], "mesh"),
    (["score", "{ckpt}", "{empty}"], "nothing to score"),
    (["score", "{ckpt}", "{two}", "--batch-size", "0"], "batch-size"),
    (["info", "{tmp}"], "neither a gptoss-convert checkpoint nor a Hugging Face"),
])
def test_bad_inputs_exit_2(argv, match, ckpt, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    fill = dict(ckpt=ckpt, empty=tmp_path / "empty.txt", two=tmp_path / "two.txt", tmp=tmp_path)
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and match in err, err


@pytest.mark.multidevice
def test_generate_on_a_mesh_matches_one_device(ckpt, env, tmp_path, capsys):
    """--mesh data,expert,tensor on 4 virtual CPU devices: parameters sharded, MoE under shard_map, a batch of 1
    padded to the data axis — same greedy tokens as one device."""
    args = ["generate", str(ckpt), "The quick brown fox", "--temperature", "0", "--max-new-tokens", "10",
            "--no-stop-ids", "--json", "--dtype", "float32"]
    assert cli.main(args) == 0
    want = json.loads(capsys.readouterr().out)
    multi = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    p = run(multi, *args, "--mesh", "2,2,1")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["tokens"] == want["tokens"]
    p = run(multi, "info", ckpt, "--json", "--mesh", "2,2,1")
    assert json.loads(p.stdout)["mesh"] == {"data": 2, "expert": 2, "tensor": 1}
    assert len(json.loads(p.stdout)["devices"]) == 4


def test_chat_printer_streams_final_and_optionally_analysis():
    """The REPL's streaming display: text only grows chunk by chunk; analysis shows with --show-reasoning."""
    import io

    from gptoss_jax.generate import GenerationChunk
    tok = build_tiny_tokenizer(1024)
    text = ("<|channel|>analysis<|message|>Simple arithmetic.<|end|><|start|>assistant<|channel|>final"
            "<|message|>The answer is 4<|return|>")
    ids = tok.encode(text)

    class Model:
        tokenizer = tok

    for show, want in ((True, "[analysis] Simple arithmetic.\nThe answer is 4"), (False, "The answer is 4")):
        out = io.StringIO()
        printer = cli._ChatPrinter(Model, show, out)
        for i in range(0, len(ids), 3):
            printer(GenerationChunk([ids[i:i + 3]], None, [False], i))
        assert out.getvalue() == want
