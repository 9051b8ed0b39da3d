"""The gptoss-jax command end to end (subprocesses) on a tiny checkpoint, plus bad-input exits.

The checkpoint is the scripted "bigram" chat model of test_api (it answers every harmony prompt with a final
"Hello!"), saved as a Hugging Face folder with the tiny tokenizer. Subprocesses share a persistent JAX compilation
cache in the session's tmp folder, so only the first of them pays for compiling a shape.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from gptoss_jax import cli, harmony
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import save_hf_checkpoint
from gptoss_jax.model import params_of
from gptoss_jax.testing import build_tiny_tokenizer
from gptoss_jax.tokenizer import load_tokenizer

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
    """The README's main job, shortened: shipped model → int4 RTN → perplexity table → streamed text → greedy check."""
    out_dir = tmp_path / "demo"
    plot = tmp_path / "groups.png" if importlib.util.find_spec("matplotlib") else None
    assert cli.main(["demo", "--max-new-tokens", "6", "--eval-tokens", "300", "--awq", "off", "--out",
                     str(out_dir), *(["--plot", str(plot)] if plot else [])]) == 0
    out = capsys.readouterr().out
    assert "PASS" in out and "FAIL" not in out and "tokens/s" in out and "time to first token" in out
    import re
    rows = dict(re.findall(r"^\s+(bf16 \(shipped\)|int4 RTN g64)\s+([\d.]+)\s", out, flags=re.M))
    assert set(rows) == {"bf16 (shipped)", "int4 RTN g64"}, out
    bf16, rtn = float(rows["bf16 (shipped)"]), float(rows["int4 RTN g64"])
    assert 1 < bf16 < 200 and 1 < rtn < 1.5 * bf16, out  # trained: far below the vocabulary size; int4 close
    assert (out_dir / "int4-rtn-g64" / "config.json").exists()  # --out keeps the converted checkpoint
    assert "seeded sampling: temperature 0.5, top-p 0.9, seed 0" in out
    if plot:  # step 6: perplexity vs group size 32/64/128 as a PNG (its IHDR: 640 x 420 pixels)
        assert re.search(r"^\s+g32\s+RTN [\d.]+ .*\n\s+g64\s+RTN " + re.escape(rows["int4 RTN g64"]), out, re.M), out
        data = plot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:24] == b"IHDR" + (640).to_bytes(4, "big") + \
            (420).to_bytes(4, "big")


# ---------------------------------------------------------------------------------------------------------- bad input
def test_demo_awq_on_without_awq_converter_is_one_line(capsys):
    from gptoss_jax import demo
    if demo.awq_available():
        pytest.skip("gptoss-convert has --awq: `demo --awq on` runs it (covered by test_demo's AWQ row when on)")
    assert cli.main(["demo", "--awq", "on"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["gptoss-jax demo: error: --awq on: this gptoss-convert has no --awq option yet (use --awq auto "
                   "or off)"]


def test_bad_inputs_exit_2_in_a_subprocess(ckpt, env, tmp_path):
    p = run(env, "generate", ckpt, "hi", "--temperature", "-1")
    assert p.returncode == 2 and "argument --temperature: must be in [0.0, inf], got -1" in p.stderr
    p = run(env, "generate", tmp_path / "missing", "hi")
    assert p.returncode == 2 and "no such file" in p.stderr
    p = run(env, "generate")
    assert p.returncode == 2 and "usage" in p.stderr


def test_bench_a_checkpoint(ckpt, tmp_path, capsys):
    """`gptoss-jax bench CKPT`: loads through gptoss_jax.load and measures through generate; JSON and table."""
    out = tmp_path / "bench.json"
    assert cli.main(["bench", str(ckpt), "--prompt-len", "8", "--gen-len", "4", "--repeats", "2", "--copy-mib", "4",
                     "--dtype", "float32", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["complete"] and r["model"]["format"] == "huggingface" and r["model"]["weights"] == "float32"
    [run] = r["runs"]
    assert (run["batch"], run["prompt_len"], run["gen_len"], run["repeats"], run["decode_steps"]) == (1, 8, 4, 2, 3)
    assert run["tpot_ms"] > 0 and run["roofline"]["pct_of_roofline"] > 0 and "profile" not in run
    assert "| float32 | 1 | 8 | 4 |" in capsys.readouterr().out


@pytest.mark.parametrize("argv, match", [
    (["generate", "{ckpt}", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "{ckpt}", "hi", "--top-p", "1.5"], "--top-p"),
    (["generate", "{ckpt}", "hi", "--top-k", "-3"], "--top-k"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
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
    multi = dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    # both subprocesses start first and run while this process computes the one-device reference
    gen, info = (subprocess.Popen([sys.executable, "-m", "gptoss_jax.cli", *map(str, a)], env=multi, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for a in ([*args, "--mesh", "2,2,1"], ["info", ckpt, "--json", "--mesh", "2,2,1"]))
    try:
        assert cli.main(args) == 0
        want = json.loads(capsys.readouterr().out)
        out, err = gen.communicate(timeout=300)
        assert gen.returncode == 0, err
        got = json.loads(out)
        assert got["tokens"] == want["tokens"]
        out, err = info.communicate(timeout=300)
        assert info.returncode == 0, err
        assert json.loads(out)["mesh"] == {"data": 2, "expert": 2, "tensor": 1}
        assert len(json.loads(out)["devices"]) == 4
    finally:
        for p in (gen, info):
            if p.poll() is None:
                p.kill()
                p.communicate()


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


# ---------------------------------------------------------------------------------------------------------- reliability
# No traceback for any user error: every option is checked where it is parsed, text must be UTF-8, output paths are
# checked before any work. Exit codes: 2 bad input, 1 environment (OS error, out of memory), 70 internal error (bug),
# 130 interrupted. Holds the case rel-cli-tracebacks.
@pytest.mark.parametrize("argv, option", [
    (["generate", "{ckpt}", "hi", "--seed", "100000000000000000000000"], "--seed"),
    (["generate", "{ckpt}", "hi", "--seed", str(2**64)], "--seed"),
    (["generate", "{ckpt}", "hi", "--seed", "-1"], "--seed"),
    (["generate", "{ckpt}", "hi", "--seed", "1.5"], "--seed"),
    (["generate", "{ckpt}", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "{ckpt}", "hi", "--temperature", "inf"], "--temperature"),
    (["generate", "{ckpt}", "hi", "--temperature", "1e39"], "--temperature"),
    (["generate", "{ckpt}", "hi", "--temperature", "-0.5"], "--temperature"),
    (["generate", "{ckpt}", "hi", "--top-p", "nan"], "--top-p"),
    (["generate", "{ckpt}", "hi", "--top-p", "0"], "--top-p"),
    (["generate", "{ckpt}", "hi", "--top-k", "2.0"], "--top-k"),
    (["generate", "{ckpt}", "hi", "--max-new-tokens", "1e3"], "--max-new-tokens"),
    (["generate", "{ckpt}", "hi", "--chunk-size", "0"], "--chunk-size"),
    (["generate", "{ckpt}", "hi", "--max-seq-len", "-4"], "--max-seq-len"),
    (["generate", "{ckpt}", "hi", "--stop-id", "-1"], "--stop-id"),
    (["score", "{ckpt}", "f.txt", "--batch-size", "0"], "--batch-size"),
    (["chat", "{ckpt}", "--seed", "x"], "--seed"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["bench", "{ckpt}", "--gen-len", "0"], "--gen-len"),
    (["bench", "{ckpt}", "--batch", "0"], "--batch"),
    (["demo", "--eval-tokens", "1"], "--eval-tokens"),
    (["demo", "--awq", "maybe"], "--awq"),
    (["demo", "--temperature", "-0.5"], "--temperature"),
    (["demo", "--top-p", "0"], "--top-p"),
    (["demo", "--seed", "-1"], "--seed"),
    (["eval", "groups", "{ckpt}", "f.txt", "--group-sizes", "0,64"], "--group-sizes"),
    (["eval", "perplexity", "{ckpt}", "f.txt", "--stride", "0"], "--stride"),
    (["eval", "perplexity", "{ckpt}", "f.txt", "--max-length", "x"], "--max-length"),
])
def test_every_numeric_option_is_checked_when_parsed(argv, option, ckpt, capsys):
    assert cli.main([a.format(ckpt=ckpt) for a in argv]) == 2
    err = capsys.readouterr().err
    assert f"argument {option}" in err and "Traceback" not in err, err


@pytest.mark.parametrize("argv, match", [
    (["generate", "{ckpt}", "bad \udcff\udcfe bytes"], "the prompt is not valid UTF-8 (bytes b'\\xff\\xfe'"),
    (["generate", "{ckpt}", "hi", "--stop", "\udcff"], "--stop #1 is not valid UTF-8"),
    (["generate", "{ckpt}", ""], "the prompt is empty"),
    (["generate", "{ckpt}", "hi", "--stream", "--json"], "--stream and --json cannot be combined"),
    (["generate", "{ckpt}", "--file", "{latin1}"], "not UTF-8 text (bytes b'\\xe9' on line 2)"),
    (["generate", "{ckpt}", "--file", "{tmp}"], "is a folder"),
    (["score", "{ckpt}", "{latin1}"], "not UTF-8 text"),
    (["score", "{ckpt}", "{tmp}"], "is a folder"),
    (["score", "{ckpt}", "{two}", "--output", "{tmp}"], "is a folder; name a file"),
    (["score", "{ckpt}", "{two}", "--output", "{tmp}/no/such/dir/out.json"], "does not exist"),
    (["score", "{ckpt}", "{two}", "--output", "{two}"], "exists; pass --force"),
    (["chat", "{ckpt}", "--instructions", "\udc80"], "--instructions is not valid UTF-8"),
    (["chat", "{ckpt}", "--date", "June 5th"], "--date must be YYYY-MM-DD"),
    (["chat", "{ckpt}", "--max-new-tokens", "64", "--max-seq-len", "64"], "leaves no room for the conversation"),
    (["chat", "{ckpt}", "--tokenizer", "{plain}"], "cannot use the harmony chat format"),
    (["generate", "{ckpt}", "hi", "--harmony", "--tokenizer", "{plain}"], "cannot use the harmony chat format"),
    (["info", "{qc}"], "quantization_config must be an object"),
    (["demo", "--prompt", "  "], "--prompt is empty"),
    (["bench", "--preset", "tiny"], "--preset tiny has no weights: add --random-weights"),
    (["bench", "{ckpt}", "--prompt-len", "100", "--max-seq-len", "64"], "exceeds --max-seq-len 64"),
    (["bench", "{ckpt}", "--json", "{two}"], "exists; pass --force"),
    (["eval", "perplexity", "{ckpt}", "{latin1}"], "not UTF-8 text"),
    (["eval", "perplexity", "{ckpt}", "{two}", "--json", "{two}"], "exists; pass --force"),
    (["eval", "groups", "{tmp}", "{two}"], "not a Hugging Face folder"),
    (["eval", "groups", "{ckpt}", "{latin1}", "--no-awq"], "not UTF-8 text"),
])
def test_user_errors_are_one_line_exit_2(argv, match, ckpt, tmp_path, capsys, monkeypatch):
    import shutil

    import tokenizers
    from tokenizers import models
    (tmp_path / "latin1.txt").write_bytes("ok\ncaf\u00e9\n".encode("latin-1"))
    (tmp_path / "two.txt").write_text("one\ntwo\n")
    plain = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    plain.save(str(tmp_path / "plain.json"))
    qc = tmp_path / "qc"
    if "{qc}" in argv:
        shutil.copytree(ckpt, qc)
        cfg = json.loads((qc / "config.json").read_text())
        cfg["quantization_config"] = "awq"
        (qc / "config.json").write_text(json.dumps(cfg))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("hi\n"))  # chat must fail before reading
    fill = dict(ckpt=ckpt, latin1=tmp_path / "latin1.txt", two=tmp_path / "two.txt", tmp=tmp_path,
                plain=tmp_path / "plain.json", qc=qc)
    before = (tmp_path / "two.txt").read_text()
    assert cli.main([a.format(**fill) for a in argv]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if not line.startswith("[gptoss-jax]")]
    assert len(lines) == 1 and lines[0].startswith(f"gptoss-jax {argv[0]}: error: ") and match in lines[0], err
    assert "time to first token" not in err  # nothing was generated
    assert (tmp_path / "two.txt").read_text() == before  # an existing --output is never touched


def test_non_utf8_argv_bytes_and_version_in_a_subprocess(ckpt, env):
    p = subprocess.run([sys.executable, "-m", "gptoss_jax.cli", "generate", str(ckpt), b"bad \xff\xfe bytes"],
                       env=env, capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 2 and "Traceback" not in err and "not valid UTF-8 (bytes b'\\xff\\xfe'" in err, err
    p = run(env, "--version")
    import gptoss_jax
    assert p.returncode == 0 and p.stdout.strip() == f"gptoss-jax {gptoss_jax.__version__}"


def test_score_output_force_replaces_atomically(ckpt, tmp_path, capsys):
    (tmp_path / "two.txt").write_text("one two three\nfour five six\n")
    out = tmp_path / "out.json"
    out.write_text("old")
    assert cli.main(["score", str(ckpt), str(tmp_path / "two.txt"), "--output", str(out), "--force"]) == 0
    assert len(json.loads(out.read_text())["lines"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json", "two.txt"]  # no temporary file left


def test_internal_and_environment_errors_are_not_usage_errors(ckpt, capsys, monkeypatch):
    import numpy as np

    def boom_type(args):
        raise TypeError("unexpected")

    def boom_numpy(args):
        np.zeros(-1)  # a ValueError raised inside a library: a bug of ours, not the user's

    def boom_os(args):
        raise PermissionError(13, "Permission denied", "/x/y")

    def boom_ours(args):
        from gptoss_jax.validation import check_int
        check_int(-1, "something", minimum=0)

    for fn, code, words in ((boom_type, 70, "internal error"), (boom_numpy, 70, "internal error"),
                            (boom_os, 1, "error: /x/y: Permission denied"), (boom_ours, 2, "error: something")):
        monkeypatch.setitem(cli.COMMANDS, "info", fn)
        assert cli.main(["info", str(ckpt)]) == code
        err = capsys.readouterr().err
        assert words in err, err
        assert ("Traceback" in err) == (code == 70)  # a bug's traceback is shown to be reported; nothing else


class _Stdin:
    """A terminal's stdin: isatty, lines from .buffer."""

    def __init__(self, text, tty):
        import io
        self.buffer, self._tty = io.BytesIO(text.encode()), tty

    def isatty(self):
        return self._tty

    def readline(self):
        return self.buffer.readline().decode()


@pytest.mark.parametrize("tty", [True, False])
def test_ctrl_c_during_a_chat_reply(ckpt, capsys, monkeypatch, tty):
    """At a terminal, Ctrl-C stops the reply and returns to the prompt (the turn is not kept); with piped input the
    session ends with status 130. Either way no traceback."""
    real_turn, calls = cli._chat_turn, []

    def turn(model, history, printer, kw, **chat_kw):
        calls.append([m.content for m in history])
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_turn(model, history, printer, kw, **chat_kw)

    monkeypatch.setattr(cli, "_chat_turn", turn)
    monkeypatch.setattr("sys.stdin", _Stdin("first\nWhat is 2 + 2?\n", tty))
    code = cli.main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "40"])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "reply interrupted" in err
    if tty:
        assert code == 0 and calls == [["first"], ["What is 2 + 2?"]]  # the interrupted turn left no history
        assert FINAL_ANSWER in out
    else:
        assert code == 130 and len(calls) == 1 and "interrupted" in err.splitlines()[-1]


def test_chat_skips_a_non_utf8_line(ckpt, capsys, monkeypatch):
    stdin = _Stdin("", False)
    stdin.buffer = __import__("io").BytesIO(b"caf\xe9\nWhat is 2 + 2?\n")
    monkeypatch.setattr("sys.stdin", stdin)
    assert cli.main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert "not UTF-8" in err and out.splitlines() == [FINAL_ANSWER]


def test_chat_turn_error_keeps_the_session_at_a_terminal(ckpt, capsys, monkeypatch):
    """A turn that cannot run (e.g. the history outgrew --max-seq-len) is reported in one line and dropped; the
    session goes on."""
    from gptoss_jax.generate import GenerationError
    real_turn, calls = cli._chat_turn, []

    def turn(model, history, printer, kw, **chat_kw):
        calls.append(len(history))
        if len(calls) == 1:
            raise GenerationError("prompt length 9999 + max_new_tokens 40 exceeds the context")
        return real_turn(model, history, printer, kw, **chat_kw)

    monkeypatch.setattr(cli, "_chat_turn", turn)
    monkeypatch.setattr("sys.stdin", _Stdin("long\nWhat is 2 + 2?\n", True))
    assert cli.main(["chat", str(ckpt), "--temperature", "0", "--max-new-tokens", "40"]) == 0
    out, err = capsys.readouterr()
    assert calls == [1, 1] and "exceeds the context" in err and FINAL_ANSWER in out and "Traceback" not in err
