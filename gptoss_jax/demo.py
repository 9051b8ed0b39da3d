"""``gptoss-jax demo``: the project in one command, on the tiny gpt-oss that ships in the package.

    shipped model (HF folder, bf16) ─ gptoss-convert ─→ int4 RTN (─→ int4 AWQ, when the converter has --awq)
        → perplexity table on held-out text (bf16 / int4 …)
        → streamed generation from the int4 model
        → greedy decoding checked token for token against transformers (fp32; our own full forward without torch)
        (→ with --plot FILE.png: perplexity vs int4 group size 32/64/128, RTN and AWQ curves and the bf16 line)

The shipped model (``gptoss_jax/tiny_model/``) is made by :mod:`gptoss_jax.train_tiny`; its card (README.md there)
gives the corpus (Python's ``pydoc_data`` help topics, PSF licence), the training run and the held-out split, whose
text ships as ``heldout.txt``. Converted checkpoints go into ``--out`` (a new folder, written through a temporary
sibling) or a temporary folder removed at the end.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

SHIPPED_MODEL = "tiny_model"
HELDOUT_FILE = "heldout.txt"


def shipped_model_dir() -> Path:
    """The packaged tiny model's folder (config.json, model.safetensors, tokenizer.json, heldout.txt, README.md).

    Raises FileNotFoundError naming the folder when the package was installed without its data."""
    path = Path(str(resources.files("gptoss_jax") / SHIPPED_MODEL))
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"{path}: the shipped tiny model is missing (package data not installed?); "
                                f"rebuild it with `python -m gptoss_jax.train_tiny`")
    return path


def awq_available() -> bool:
    """Whether ``gptoss-convert`` has the ``--awq`` option (JAX-native AWQ calibration, built separately).

    HOOK (issue #14, AWQ): once it exists the demo adds an "int4 AWQ" row, converting with
    ``gptoss-convert SRC DST --awq --calib FILE --group-size G`` where FILE is text of the training split."""
    from gptoss_jax.convert import cli as convert_cli
    parser = getattr(convert_cli, "_convert_parser", None)  # the converter's argparse parser (SRC DST form)
    return parser is not None and any("--awq" in a.option_strings for a in parser()._actions)


def _calibration_text(path: Path) -> Path:
    """Calibration text for AWQ: the training split of the corpus (never the held-out text the table scores)."""
    from gptoss_jax.train_tiny import corpus_split
    train, _, _ = corpus_split()
    path.write_text("\n\n".join(train[:20]) + "\n", encoding="utf-8")
    return path


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def run_demo(*, out: Path | None, prompt: str, max_new_tokens: int, group_size: int, eval_tokens: int,
             awq: str = "auto", plot: Path | None = None, temperature: float = 0.5, top_p: float = 0.9,
             seed: int = 0) -> int:
    """The demo (module docstring); returns the exit status (0, or 1 if the greedy check fails).

    plot: also write perplexity vs group size (PLOT_GROUP_SIZES) as a PNG there (needs matplotlib).
    temperature, top_p, seed: the streamed sample's seeded sampling (the greedy check is always greedy)."""
    import numpy as np

    import gptoss_jax
    from gptoss_jax import fsutil
    from gptoss_jax.convert.converter import convert
    from gptoss_jax.evaluation import perplexity

    t_start = time.perf_counter()
    src = shipped_model_dir()
    tmp_ctx = None
    if out is None:
        tmp_ctx = tempfile.TemporaryDirectory(prefix="gptoss-jax-demo-")
        work = Path(tmp_ctx.name)
    else:
        work = fsutil.make_temp_dir(out)
    try:
        config = json.loads((src / "config.json").read_text())
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        _say(f"1. the shipped model: {src}")
        _say(f"   gpt-oss, {config['num_hidden_layers']} layers, hidden {config['hidden_size']}, "
             f"{config['num_local_experts']} experts top-{config['num_experts_per_tok']}, vocab {config['vocab_size']}, "
             f"sliding window {config['sliding_window']} on alternate layers, YaRN RoPE, sinks; bf16, "
             f"{size / 1e6:.1f} MB; trained on Python's help topics (python -m gptoss_jax.train_tiny)")

        rows = [("bf16 (shipped)", src, "bfloat16")]
        _say(f"2. converting to int4 with gptoss-convert (group size {group_size})")
        t0 = time.perf_counter()
        rtn = convert(src, work / f"int4-rtn-g{group_size}", fmt="hf", group_size=group_size, hash_files=False)
        _say(f"   int4 RTN (round to nearest, asymmetric) → {rtn.name} in {time.perf_counter() - t0:.1f}s")
        rows.append((f"int4 RTN g{group_size}", rtn, None))
        use_awq = awq == "on" or (awq == "auto" and awq_available())
        if use_awq:
            from gptoss_jax.convert import cli as convert_cli
            t0 = time.perf_counter()
            dst = work / f"int4-awq-g{group_size}"
            calib = _calibration_text(work / "calibration.txt")
            rc = convert_cli.main([str(src), str(dst), "--awq", "--calib", str(calib), "--group-size",
                                   str(group_size), "--quiet", "--no-hash"])
            if rc != 0:
                raise RuntimeError(f"gptoss-convert --awq failed with exit status {rc}")
            _say(f"   int4 AWQ (activation-aware scales, calibrated on training text) → {dst.name} in "
                 f"{time.perf_counter() - t0:.1f}s")
            rows.append((f"int4 AWQ g{group_size}", dst, None))
        else:
            _say("   int4 AWQ: skipped (" + ("--awq off" if awq == "off" else "this gptoss-convert has no --awq option yet")
                 + ")")

        held = (src / HELDOUT_FILE).read_text(encoding="utf-8")
        _say(f"3. perplexity on held-out help topics ({HELDOUT_FILE}, first {eval_tokens} tokens; windows of 256, "
             f"stride 128; lower is better)")
        table, models = [], {}
        for name, path, dtype in rows:
            t0 = time.perf_counter()
            model = gptoss_jax.load(path, dtype=dtype, max_seq_len=256)
            ids = model.encode(held)[:eval_tokens]
            r = perplexity(model, ids, max_length=256, stride=128)
            table.append((name, r, model.info()["bytes"], time.perf_counter() - t0))
            models[name] = model
        base = table[0][1].perplexity
        _say(f"   {'model':<18} {'perplexity':>10} {'vs bf16':>8} {'weights':>9} {'seconds':>8}")
        for name, r, nbytes, secs in table:
            _say(f"   {name:<18} {r.perplexity:>10.2f} {100 * (r.perplexity / base - 1):>+7.1f}% "
                 f"{nbytes / 1e6:>7.2f}MB {secs:>8.1f}")
        unigram = _unigram_perplexity(models[rows[0][0]], held, eval_tokens)
        _say(f"   (a unigram model of the training text: {unigram:.0f}; vocabulary size: {config['vocab_size']})")

        int4_name = rows[-1][0]
        int4 = models[int4_name]
        _say(f"4. streaming from the {int4_name} model (seeded sampling: temperature {temperature}, top-p {top_p}, "
             f"seed {seed})")
        sys.stdout.write(f"   {prompt}")
        sys.stdout.flush()
        result, stats = int4.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                      seed=seed,
                                      on_chunk=lambda c: (sys.stdout.write(c.text[0].replace("\n", "\n   ")),
                                                          sys.stdout.flush()),
                                      return_stats=True)
        rate = f"{stats.decode_tokens_per_s:.1f} tokens/s" if stats.decode_s > 0 else "tokens/s n/a (compiling)"
        _say(f"\n   time to first token {stats.time_to_first_token_s * 1e3:.0f} ms (includes compiling), {rate}")

        ok = _greedy_check(src, prompt, max_new_tokens, np)
        if plot is not None:
            _plot_step(src, held, work, plot, table, rows, group_size, eval_tokens,
                       work / "calibration.txt" if use_awq else None)
        if out is not None:
            (work / fsutil.OWNER_FILE).unlink(missing_ok=True)
            if out.is_dir():
                out.rmdir()  # empty (checked by the caller); fails rather than deletes if something appeared
            os.replace(work, out)
            _say(f"   converted checkpoints kept in {out}")
        _say(f"{'PASS' if ok else 'FAIL'} — demo finished in {time.perf_counter() - t_start:.1f}s")
        return 0 if ok else 1
    except BaseException:
        if out is not None:
            fsutil.remove_tree(work)
        raise
    finally:
        if tmp_ctx is not None:
            tmp_ctx.cleanup()


PLOT_GROUP_SIZES = (32, 64, 128)


def _plot_step(src: Path, held: str, work: Path, plot: Path, table, rows, group_size: int, eval_tokens: int,
               calib: Path | None) -> None:
    """Step 6 (--plot): the perplexity table at every group size of PLOT_GROUP_SIZES (the rows measured above are
    reused), written as a PNG curve by :func:`gptoss_jax.evaluation.plot_group_sweep`."""
    from gptoss_jax.evaluation import SweepRow, group_size_sweep, plot_group_sweep
    t0 = time.perf_counter()
    _say(f"6. perplexity vs int4 group size ({', '.join(map(str, PLOT_GROUP_SIZES))}; RTN"
         f"{' and AWQ' if calib is not None else ''}) → {plot}")
    known = {}
    for (name, _, _), (_, r, nbytes, secs) in zip(rows, table):
        method = "bf16" if name.startswith("bf16") else ("awq" if "AWQ" in name else "rtn")
        key = (method, None if method == "bf16" else group_size)
        known[key] = SweepRow(method, key[1], r.perplexity, r.nll_mean, r.num_scored, nbytes, round(secs, 2))
    (work / "groups").mkdir()
    sweep = group_size_sweep(src, held, work / "groups", group_sizes=PLOT_GROUP_SIZES, awq_calib=calib,
                             max_length=256, stride=128, eval_tokens=eval_tokens, known=known)
    base = sweep[0].perplexity
    for g in PLOT_GROUP_SIZES:
        cells = [f"{r.method.upper()} {r.perplexity:.2f} ({100 * (r.perplexity / base - 1):+.1f}%)"
                 for r in sweep if r.group_size == g]
        _say(f"   g{g:<4} " + "   ".join(cells))
    plot_group_sweep(sweep, plot, title="tiny gpt-oss: held-out perplexity vs int4 group size")
    _say(f"   wrote {plot} in {time.perf_counter() - t0:.1f}s")


def _unigram_perplexity(model, held: str, eval_tokens: int) -> float:
    """Perplexity of the held-out tokens under add-one-smoothed unigram counts of the training split (a floor any
    language model must beat), or of the held-out text itself when the corpus is not importable."""
    import math

    import numpy as np
    try:
        from gptoss_jax.train_tiny import corpus_split
        train_text = "\n\n".join(corpus_split()[0])
    except ImportError:
        train_text = held
    counts = np.bincount(model.encode(train_text), minlength=model.config.vocab_size).astype(np.float64) + 1.0
    ids = np.asarray(model.encode(held)[:eval_tokens])
    return math.exp(-np.mean(np.log(counts / counts.sum())[ids[1:]]))


def _greedy_check(src: Path, prompt: str, max_new_tokens: int, np) -> bool:
    """Greedy decoding of the shipped model (fp32, batch of two prompts of different lengths) against the argmax of
    transformers' GptOssForCausalLM logits (fp32) step by step; our own full forward when torch is not installed."""
    import gptoss_jax
    model = gptoss_jax.load(src, dtype="float32", max_seq_len=256)
    prompts = [prompt, prompt.split()[0]]
    _say(f"5. greedy generation (fp32), batch of 2 prompts of {len(model.encode(prompts[0]))} and "
         f"{len(model.encode(prompts[1]))} tokens, checked against the argmax of full-forward logits step by step")
    results = model.generate(prompts, max_new_tokens=max_new_tokens, temperature=0.0, stop_token_ids=())
    _say(f"   {prompts[0]!r} → {results[0].text!r}")
    reference = "gptoss-jax full forward"
    hf_model = None
    try:
        import torch
        from transformers import GptOssForCausalLM
        try:
            from transformers.utils import logging as hf_logging
            hf_logging.disable_progress_bar()
        except ImportError:
            pass
        hf_model = GptOssForCausalLM.from_pretrained(str(src), dtype=torch.float32).eval()
        reference = "transformers GptOssForCausalLM (float32)"
    except Exception as e:  # noqa: BLE001 — transformers is optional
        _say(f"   transformers not usable ({type(e).__name__}); using our own full forward instead")
    ok = True
    for n, r in enumerate(results):
        seq = np.array(r.prompt_tokens + r.tokens)
        if hf_model is not None:
            import torch
            with torch.no_grad():
                logits = hf_model(torch.as_tensor(seq[None])).logits[0].float().numpy()
        else:
            logits = np.asarray(model.logits(seq.tolist()))
        p = len(r.prompt_tokens)
        steps = logits[p - 1:len(seq) - 1]
        chosen = steps[np.arange(len(r.tokens)), r.tokens]
        exact = int(np.sum(np.argmax(steps, -1) == np.array(r.tokens)))
        row_ok = bool(np.all(chosen >= steps.max(-1) - 1e-4))  # within 1e-4 of the max: a float tie, not an error
        ok &= row_ok
        _say(f"   prompt {n}: {exact}/{len(r.tokens)} tokens are the exact argmax of {reference} "
             f"→ {'PASS' if row_ok else 'FAIL'}")
    return ok
