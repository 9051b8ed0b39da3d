"""lm-evaluation-harness model ``gptoss-jax`` (EleutherAI lm-eval 0.4.x; install with the ``eval`` extra).

    gptoss-lm-eval --model gptoss-jax --model_args path=CKPT,dtype=float32,mesh=1,4,2 --tasks ...

``model_args`` are the knobs of :func:`gptoss_jax.load` (``path`` — alias ``pretrained`` —, ``dtype``, ``mesh``,
``max_seq_len``, ``tokenizer``, ``chunk_size``, ``verify``) plus ``batch_size`` (sequences per forward, default 8),
``max_gen_toks`` (default 256) and ``prefix_token_id`` (the token an empty context is conditioned on; default
``<|startoftext|>`` when the tokenizer has it, else the first eos id). A mesh string uses ``;`` or ``x`` between
sizes inside ``--model_args`` (its commas separate arguments): ``mesh=1x4x2``.

Requests (lm-eval's ``LM`` interface, ``lm_eval/api/model.py``):

* ``loglikelihood``: (context, continuation) → (Σ log p(continuation tokens | context), every continuation token was
  the argmax). The text is tokenized as lm-eval's ``TemplateLM`` does (context + continuation encoded together and
  split after the context's tokens; trailing spaces of the context move to the continuation). Sequences longer than
  ``max_seq_len`` keep their last ``max_seq_len`` tokens (the context is cut from the left).
* ``loglikelihood_rolling``: the whole text's log-likelihood, conditioned on ``prefix_token_id``, in disjoint
  windows of ``max_seq_len − 1`` predicted tokens (lm-eval's ``get_rolling_token_windows``): every token scored once.
* ``generate_until``: greedy (temperature 0, or the task's ``temperature``), up to ``max_gen_toks``, cut before the
  first of the ``until`` strings; the checkpoint's eos ids stop generation too.

lm-eval 0.4.x does not read the ``lm_eval.models`` entry point group that pyproject declares (its registry is
filled by imports), so ``gptoss-lm-eval`` (= :func:`main`) imports this module, which registers the model, and then
runs lm-eval's own command line; from Python, ``import gptoss_jax.lm_eval_adapter`` before
``lm_eval.simple_evaluate(model="gptoss-jax", ...)``.
"""

from __future__ import annotations

from typing import Any

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("gptoss_jax.lm_eval_adapter needs lm-evaluation-harness: pip install 'gptoss-jax[eval]'") from e

MODEL_NAME = "gptoss-jax"
_LOAD_KNOBS = ("dtype", "mesh", "max_seq_len", "tokenizer", "chunk_size", "verify")


def _bool(v) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in ("1", "true", "yes")
    return bool(v)


def _mesh(v):
    """mesh from model_args: "1x4x2" / "1;4;2" → "1,4,2" (gptoss_jax.load's string form); other values as given."""
    if isinstance(v, str):
        return v.replace("x", ",").replace(";", ",")
    return v


@register_model(MODEL_NAME)
class GptOssLM(TemplateLM):
    """gptoss-jax behind lm-eval's request interface (module docstring). `model` may be an already loaded
    :class:`gptoss_jax.api.InferenceModel` (tests, notebooks) instead of `path`."""

    def __init__(self, path: str | None = None, *, pretrained: str | None = None, model=None, batch_size=8,
                 max_gen_toks: int = 256, prefix_token_id: int | None = None, **kwargs: Any):
        super().__init__()
        load_kwargs = {k: kwargs.pop(k) for k in _LOAD_KNOBS if k in kwargs}
        for ignored in ("device", "max_batch_size", "trust_remote_code"):  # passed by lm-eval's CLI; not ours
            kwargs.pop(ignored, None)
        if kwargs:
            raise ValueError(f"gptoss-jax model_args: unknown argument(s) {', '.join(sorted(kwargs))} (known: path, "
                             f"{', '.join(_LOAD_KNOBS)}, batch_size, max_gen_toks, prefix_token_id)")
        if model is None:
            path = path or pretrained
            if path is None:
                raise ValueError("gptoss-jax model_args: path=CHECKPOINT is required")
            from gptoss_jax.api import load
            if "mesh" in load_kwargs:
                load_kwargs["mesh"] = _mesh(load_kwargs["mesh"])
            for k in ("max_seq_len", "chunk_size"):
                if k in load_kwargs:
                    load_kwargs[k] = int(load_kwargs[k])
            if "verify" in load_kwargs:
                load_kwargs["verify"] = _bool(load_kwargs["verify"])
            model = load(path, **load_kwargs)
        if model.tokenizer is None:
            raise ValueError(f"gptoss-jax: {path or 'the model'} has no tokenizer.json; lm-eval passes text (give "
                             f"model_args tokenizer=PATH)")
        self.model = model
        self.batch_size = 8 if batch_size in (None, "auto") or str(batch_size).startswith("auto") else int(
            batch_size)
        if self.batch_size < 1:
            raise ValueError(f"gptoss-jax model_args: batch_size must be >= 1, got {batch_size}")
        self.max_gen_toks = int(max_gen_toks)
        tok = model.tokenizer
        self._eot = int(model.default_stop_token_ids[0]) if model.default_stop_token_ids else int(
            model.config.eos_token_ids[0])
        start = tok.token_to_id("<|startoftext|>")
        self._prefix = int(prefix_token_id) if prefix_token_id is not None else (
            int(start) if start is not None else self._eot)

    # ------------------------------------------------------------------------------------------ TemplateLM plumbing
    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def prefix_token_id(self) -> int:
        return self._prefix

    @property
    def max_length(self) -> int:
        return self.model.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.model.tokenizer, "path", None) or "gptoss-jax")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        # lm-eval text is plain text: strings that look like special tokens are encoded as text
        return self.model.encode(string, allow_special=False)

    def tok_decode(self, ids) -> str:
        return self.model.decode(ids)

    # ------------------------------------------------------------------------------------------ scoring
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) → (Σ log p(continuation), greedy), batch_size at a time; each sequence is
        cut from the left to max_seq_len tokens."""
        out = []
        limit = self.max_length
        for i in range(0, len(pairs), self.batch_size):
            ctxs, conts = [], []
            for ctx, cont in pairs[i:i + self.batch_size]:
                if not cont:
                    raise ValueError("gptoss-jax: a request has an empty continuation (nothing to score)")
                cont = cont[-(limit - 1):]  # at least one token of context stays
                ctx = ctx[-(limit - len(cont)):]
                ctxs.append(ctx)
                conts.append(cont)
            for r in self.model.score(conts, contexts=ctxs):
                out.append((r.total_logprob, bool(r.greedy)))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length - 1, context_len=1)]
            total = sum(lp for lp, _ in self._score(windows)) if windows else 0.0
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kw.pop("temperature", 0.0)) if _bool(kw.pop("do_sample", False)) else 0.0
            ids = self.tok_encode(context) or [self.prefix_token_id]
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = ids[-(self.max_length - max_new):]
            res = self.model.generate(ids, max_new_tokens=max_new, temperature=temperature,
                                      stop_strings=until or None)
            text = res.text if res.text is not None else self.tok_decode(res.tokens)
            for stop in until:  # the text ends before the first stop string (lm-eval's contract)
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out


def main() -> None:
    """``gptoss-lm-eval``: lm-eval's command line with the ``gptoss-jax`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


__all__ = ["GptOssLM", "MODEL_NAME", "main"]
