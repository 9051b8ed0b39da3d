"""The Python API: ``model = gptoss_jax.load(path)`` then ``generate`` / ``chat`` / ``score`` / ``logits``.

``load`` reads either a checkpoint written by ``gptoss-convert`` (Orbax, int4 or 16-bit; see
:mod:`gptoss_jax.checkpoint`) or an unquantized Hugging Face folder (``config.json`` + safetensors), plus the folder's
``tokenizer.json`` when there is one (offline, via the ``tokenizers`` library). Without a tokenizer the id-based
methods work and the text ones raise :class:`TokenizerMissingError`.

All compiled functions live in :class:`gptoss_jax.generate.Generator`; this module turns text into ids and back,
applies defaults (stop tokens from the checkpoint, harmony stop tokens for chat) and packages results.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gptoss_jax import checkpoint, harmony, sharding
from gptoss_jax.compilation import enable_compilation_cache
from gptoss_jax.config import GptOssConfig
from gptoss_jax.hf_loader import load_hf_model
from gptoss_jax.moe_parallel import MoEParallel
from gptoss_jax.generate import (DEFAULT_CHUNK_SIZE, GenerationChunk, GenerationError, GenerationStats,
                                 GenerationStream, Generator, SamplingParams)

DEFAULT_MAX_SEQ_LEN = 4096

_DTYPES = {"bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16, "float32": jnp.float32, "fp32": jnp.float32,
           "f32": jnp.float32, "float16": jnp.float16, "fp16": jnp.float16}


class TokenizerMissingError(GptOssError, RuntimeError):
    """A text method was called on a model loaded without a tokenizer.json."""


class LoadError(GptOssError, ValueError):
    """`load` could not recognise or read a checkpoint folder (the message names the file)."""


def parse_dtype(dtype) -> Any:
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
        return jnp.dtype(_DTYPES[dtype.lower()])
    return jnp.dtype(dtype)


# ------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class ScoreResult:
    """Log-likelihood of one sequence. `token_logprobs[i]` is log p(scored_tokens[i] | everything before it)."""
    tokens: list[int]  # the whole sequence (context + scored part)
    scored_tokens: list[int]
    token_logprobs: np.ndarray  # float32 [len(scored_tokens)]
    greedy: bool  # every scored token was the model's argmax

    @property
    def total_logprob(self) -> float:
        return float(np.sum(self.token_logprobs, dtype=np.float64))

    @property
    def num_scored(self) -> int:
        return len(self.scored_tokens)

    @property
    def mean_logprob(self) -> float:
        return self.total_logprob / self.num_scored if self.num_scored else float("nan")

    @property
    def perplexity(self) -> float:
        return math.exp(-self.mean_logprob) if self.num_scored else float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"num_tokens": len(self.tokens), "num_scored": self.num_scored, "total_logprob": self.total_logprob,
                "mean_logprob": self.mean_logprob, "perplexity": self.perplexity, "greedy": self.greedy,
                "token_logprobs": [float(x) for x in self.token_logprobs]}


@dataclasses.dataclass
class ChatResult:
    """An assistant turn: the parsed harmony messages and their text."""
    messages: list[harmony.Message]  # parsed completion (analysis / commentary / final ...)
    completion: str  # raw completion text with the harmony tokens
    tokens: list[int]
    finish_reason: str
    prompt_tokens: list[int]
    stats: GenerationStats

    @property
    def final(self) -> str | None:
        return harmony.final_text(self.messages)

    @property
    def analysis(self) -> str:
        return "\n".join(m.content for m in self.messages if m.role == "assistant" and m.channel == "analysis")

    @property
    def tool_calls(self) -> list[harmony.Message]:
        return harmony.tool_calls(self.messages)


# ------------------------------------------------------------------------------------------------------------------
class InferenceModel:
    """A model ready for inference: config, parameters, tokenizer and compiled functions.

    Build one with :func:`load`, or wrap an in-memory NNX :class:`~gptoss_jax.model.GptOss` directly
    (``InferenceModel(module, tokenizer=...)``), e.g. for tests.
    """

    def __init__(self, module, *, tokenizer=None, max_seq_len: int | None = None, mesh=None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, cache_dtype=None, default_stop_token_ids=None,
                 source: str | None = None, source_format: str | None = None, cache_constraint=None):
        self.config: GptOssConfig = module.config
        self.dtype = module.dtype
        self.quant = module.quant
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.source, self.source_format = source, source_format
        limit = self.config.max_position_embeddings
        max_seq_len = min(DEFAULT_MAX_SEQ_LEN, limit) if max_seq_len is None else int(max_seq_len)
        if not 1 <= max_seq_len <= limit:
            raise ValueError(f"max_seq_len must be in [1, {limit}] (the config's max_position_embeddings), "
                             f"got {max_seq_len}")
        if tokenizer is not None and tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the model's vocab_size is "
                             f"{self.config.vocab_size}")
        self.max_seq_len = max_seq_len
        self.default_stop_token_ids = tuple(self.config.eos_token_ids if default_stop_token_ids is None
                                            else default_stop_token_ids)
        if jax.default_backend() == "cpu":
            # XLA:CPU cannot donate buffers; the cache donation that helps on accelerators only warns here.
            warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
        # rows are split over the mesh's data axis: batches are padded to a multiple of its size
        batch_multiple = int(dict(mesh.shape).get("data", 1)) if mesh is not None else 1
        self.generator = Generator(module, max_seq_len=max_seq_len, cache_dtype=cache_dtype, chunk_size=chunk_size,
                                   cache_constraint=cache_constraint, batch_multiple=batch_multiple)

    # -------------------------------------------------------------------------------------------------- basics
    @property
    def module(self):
        """The NNX module (rebuilt from the current state)."""
        return self.generator.model()

    @property
    def params(self) -> dict:
        """The parameter tree (pure dict, the layout of gptoss_jax.params.param_specs)."""
        from gptoss_jax.model import params_of
        return params_of(self.generator.model())

    @property
    def compile_counts(self) -> dict[str, int]:
        """How many times each compiled function was traced (= compiled) so far, for this model's structure (models
        of identical structure share compilations)."""
        return self.generator.trace_counts

    def _need_tokenizer(self, what: str):
        if self.tokenizer is None:
            raise TokenizerMissingError(f"{what} needs a tokenizer, but this model has none (no tokenizer.json in "
                                        f"{self.source or 'the checkpoint'}); pass token ids or load(..., "
                                        f"tokenizer=path)")
        return self.tokenizer

    def encode(self, text: str, *, allow_special: bool = True) -> list[int]:
        return self._need_tokenizer("encode").encode(text, allow_special=allow_special)

    def decode(self, ids, *, skip_special: bool = False) -> str:
        return self._need_tokenizer("decode").decode(ids, skip_special=skip_special)

    def _decode_lenient(self, ids: Sequence[int]) -> str:
        """Decodes generated ids; ids beyond the tokenizer (models pad their vocabulary) show as <|id:N|>."""
        n = self.tokenizer.vocab_size
        ids = [int(i) for i in ids]
        if all(i < n for i in ids):
            return self.tokenizer.decode(ids)
        parts, run = [], []
        for i in ids:
            if i < n:
                run.append(i)
            else:
                if run:
                    parts.append(self.tokenizer.decode(run))
                    run = []
                parts.append(f"<|id:{i}|>")
        if run:
            parts.append(self.tokenizer.decode(run))
        return "".join(parts)

    def _to_ids(self, prompts, what: str) -> tuple[list, bool]:
        """str | list[str] | ids | list[ids] → (list of id lists or raw, single?); see validation.text_or_ids."""
        from gptoss_jax.validation import text_or_ids
        return text_or_ids(prompts, lambda text: self._need_tokenizer(what).encode(text),
                           what="context" if what == "context" else "prompt")

    # -------------------------------------------------------------------------------------------------- forward
    def logits(self, input_ids):
        """Full-forward float32 logits: [T, V] for one sequence, [B, T, V] for equal-length rows, else a list."""
        ids, single = self._to_ids(input_ids, "logits")
        out = self.generator.logits(ids)
        if single:
            return out[0]
        if len({o.shape[0] for o in out}) == 1:
            return np.stack(out)
        return out

    def score(self, inputs, *, contexts=None) -> list[ScoreResult]:
        """Per-token log-probabilities and totals of texts or id sequences.

        Without `contexts` every token after the first is scored (the first has nothing to condition on). With
        `contexts` (one per input, text or ids), each input is scored as the continuation of its context — the
        usual likelihood eval: ``score(["Paris"], contexts=["The capital of France is "])``.
        """
        seqs, single = self._to_ids(inputs, "score")
        seqs = self.generator.check_prompts(seqs)
        if contexts is None:
            full = seqs
            starts = [1] * len(seqs)
        else:
            ctx, _ = self._to_ids(contexts, "context")
            from gptoss_jax.validation import token_prompts
            ctx = token_prompts(ctx, vocab_size=self.config.vocab_size, max_seq_len=self.max_seq_len,
                                what="context") if len(ctx) else []
            if len(ctx) != len(seqs):
                raise GenerationError(f"score got {len(seqs)} inputs but {len(ctx)} contexts")
            full = [c + s for c, s in zip(ctx, seqs)]
            starts = [len(c) for c in ctx]
        for i, f in enumerate(full):
            if len(f) < 2:
                raise GenerationError(f"input {i} has {len(f)} token(s); scoring needs at least two (one to condition "
                                      f"on, one to score)")
        logps, greedy = self.generator.score(full)
        results = []
        for f, s, lp, g in zip(full, starts, logps, greedy):
            results.append(ScoreResult(tokens=f, scored_tokens=f[s:], token_logprobs=lp[s - 1:],
                                       greedy=bool(np.all(g[s - 1:]))))
        return results

    # -------------------------------------------------------------------------------------------------- generation
    def _sampling(self, *, max_new_tokens, temperature, top_k, top_p, seed, stop_token_ids, stop_strings):
        if stop_token_ids is None:
            stop_token_ids = self.default_stop_token_ids
        # checked (and normalised) by Generator.stream → SamplingParams.checked, which names the bad argument
        return SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                              seed=seed, stop_token_ids=stop_token_ids, stop_strings=stop_strings)

    def stream(self, prompts, *, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
               stop_strings: Sequence[str] | str | None = None, chunk_size: int | None = None) -> GenerationStream:
        """Like :meth:`generate`, but returns an iterator of :class:`GenerationChunk` (new tokens and text per row
        as each decode chunk finishes); afterwards ``stream.results`` / ``stream.stats`` hold the outcome."""
        ids, _ = self._to_ids(prompts, "generate")
        params = self._sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                seed=seed, stop_token_ids=stop_token_ids, stop_strings=stop_strings)
        decode = self._decode_lenient if self.tokenizer is not None else None
        return self.generator.stream(ids, params, decode=decode, chunk_size=chunk_size)

    def generate(self, prompts, *, max_new_tokens: int = 128, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int = 0, stop_token_ids: Sequence[int] | None = None,
                 stop_strings: Sequence[str] | str | None = None,
                 on_chunk: Callable[[GenerationChunk], None] | None = None, chunk_size: int | None = None,
                 return_stats: bool = False):
        """Generates continuations of one prompt (str or ids) or a batch (list of str / list of id lists).

        temperature 0 is greedy; top_k 0 / top_p 1 disable truncation; `seed` fixes the sampling stream.
        `stop_token_ids` defaults to the checkpoint's eos ids (pass ``()`` for none); `stop_strings` are checked on
        the decoded text. `on_chunk(chunk)` is called as tokens arrive (streaming). Returns one
        :class:`GenerationResult` for a single prompt, else a list (plus :class:`GenerationStats` with
        ``return_stats``).
        """
        ids, single = self._to_ids(prompts, "generate")
        stream = self.stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, stop_strings=stop_strings,
                             chunk_size=chunk_size)
        for chunk in stream:
            if on_chunk is not None:
                on_chunk(chunk)
        results = stream.results
        out = results[0] if single else results
        return (out, stream.stats) if return_stats else out

    # -------------------------------------------------------------------------------------------------- chat
    def render_chat(self, messages, **render_kwargs) -> list[int]:
        """The harmony prompt ids for a conversation (ending in ``<|start|>assistant``)."""
        tok = self._need_tokenizer("chat")
        return harmony.render_conversation_ids(tok, messages, **render_kwargs)

    def chat_stream(self, messages, *, reasoning: str = "medium", instructions: str | None = None,
                    tools=None, current_date: str | None = None, max_new_tokens: int = 512,
                    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
                    chunk_size: int | None = None) -> GenerationStream:
        """Streams an assistant turn for a conversation (list of harmony Messages or dicts); see :meth:`chat`."""
        tok = self._need_tokenizer("chat")
        from gptoss_jax.validation import check_chat_args
        messages = check_chat_args(tok, messages, reasoning=reasoning, instructions=instructions,
                                   current_date=current_date, tools=tools)
        prompt = self.render_chat(messages, reasoning=reasoning, instructions=instructions, tools=tools,
                                  current_date=current_date)
        stop_ids = harmony.stop_token_ids(tok)
        return self.stream([prompt], max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop_token_ids=stop_ids, chunk_size=chunk_size)

    def chat(self, messages, *, reasoning: str = "medium", instructions: str | None = None, tools=None,
             current_date: str | None = None, max_new_tokens: int = 512, temperature: float = 1.0, top_k: int = 0,
             top_p: float = 1.0, seed: int = 0, on_chunk: Callable[[GenerationChunk], None] | None = None,
             chunk_size: int | None = None) -> ChatResult:
        """One assistant turn in the harmony format.

        The conversation is rendered with the harmony system message (``reasoning`` low/medium/high, optional
        ``current_date``) and optional developer ``instructions`` / function ``tools``; generation stops on
        ``<|return|>`` or ``<|call|>``; the completion is parsed into analysis / commentary / final messages.
        Append ``result.messages`` to the conversation to continue it (completed analysis is dropped when
        re-rendered, as harmony prescribes).
        """
        stream = self.chat_stream(messages, reasoning=reasoning, instructions=instructions, tools=tools,
                                  current_date=current_date, max_new_tokens=max_new_tokens,
                                  temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                  chunk_size=chunk_size)
        for chunk in stream:
            if on_chunk is not None:
                on_chunk(chunk)
        return self.chat_result(stream)

    def chat_result(self, stream: GenerationStream) -> ChatResult:
        """Parses a finished :meth:`chat_stream` into a :class:`ChatResult`."""
        result = stream.results[0]
        messages = harmony.parse_completion(result.tokens, self.tokenizer)
        return ChatResult(messages=messages, completion=self._decode_lenient(result.tokens), tokens=result.tokens,
                          finish_reason=result.finish_reason, prompt_tokens=result.prompt_tokens, stats=stream.stats)

    # -------------------------------------------------------------------------------------------------- info
    def info(self) -> dict[str, Any]:
        """A JSON-able summary: config, quantization, parameters and bytes, devices, context."""
        from gptoss_jax.params import count_parameters
        leaves = jax.tree.leaves(self.generator.state)
        nbytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in leaves if hasattr(x, "shape"))
        devices = sorted({str(d) for x in leaves if isinstance(x, jax.Array) for d in x.devices()})
        c = self.config
        return {
            "source": self.source,
            "format": self.source_format,
            "config": {
                "vocab_size": c.vocab_size, "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                "num_hidden_layers": c.num_hidden_layers, "num_attention_heads": c.num_attention_heads,
                "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim,
                "num_local_experts": c.num_local_experts, "num_experts_per_tok": c.num_experts_per_tok,
                "sliding_window": c.sliding_window, "max_position_embeddings": c.max_position_embeddings,
            },
            "dtype": jnp.dtype(self.dtype).name,
            "quantization": None if self.quant is None else {"method": "int4 (W4A16)", **self.quant.to_dict()},
            "parameters": count_parameters(c),
            "bytes": nbytes,
            "max_seq_len": self.max_seq_len,
            "tokenizer": None if self.tokenizer is None else {"vocab_size": self.tokenizer.vocab_size,
                                                              "path": str(self.tokenizer.path)},
            "stop_token_ids": list(self.default_stop_token_ids),
            # what config.json left out and was filled with transformers' defaults (and, for a converted
            # checkpoint, what its conversion assumed or cast); see load()
            "assumed": list(getattr(self, "assumed", self.config.rope.assumed)),
            "backend": jax.default_backend(),
            "devices": devices,
            "mesh": None if self.mesh is None else {str(k): int(v) for k, v in dict(self.mesh.shape).items()},
        }

    def __repr__(self) -> str:
        q = "int4" if self.quant is not None else jnp.dtype(self.dtype).name
        return (f"InferenceModel({self.config.num_hidden_layers} layers, {self.config.num_local_experts} experts, "
                f"{q}, max_seq_len={self.max_seq_len}, tokenizer={'yes' if self.tokenizer else 'no'})")


# ------------------------------------------------------------------------------------------------------------------
def _has_safetensors(path: Path) -> bool:
    return any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()


def _is_converted_checkpoint(path: Path) -> bool:
    return (path / checkpoint.METADATA_FILE).exists()


def _generation_stop_ids(path: Path, config: GptOssConfig) -> tuple[int, ...]:
    """The checkpoint's eos ids: generation_config.json's eos_token_id if present, else config.json's."""
    from gptoss_jax.jsoncheck import field, read_json_object
    ids = list(config.eos_token_ids)
    gen_cfg = path / "generation_config.json"
    if gen_cfg.exists():
        eos = field(read_json_object(gen_cfg, error=LoadError), "eos_token_id", str(gen_cfg), "int_or_int_list",
                    default=None, nullable=True, minimum=0, error=LoadError)
        if eos == []:
            raise LoadError(f"{gen_cfg}: eos_token_id is an empty list (give at least one id, or null)")
        if eos is not None:
            from gptoss_jax.validation import check_int
            ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
            ids = [check_int(i, f"{gen_cfg}: eos_token_id", minimum=0, error=LoadError) for i in ids]
    return tuple(int(i) for i in ids if 0 <= int(i) < config.vocab_size)


def resolve_mesh(mesh, config: GptOssConfig | None = None):
    """A jax Mesh, None, or a "data,expert,tensor" spec (string such as "1,4,2", or a tuple) → Mesh or None."""
    if mesh is None or isinstance(mesh, jax.sharding.Mesh):
        return mesh
    sharding.maybe_initialize_distributed()
    sizes = sharding.parse_mesh_arg(mesh) if isinstance(mesh, str) else tuple(mesh)
    return sharding.make_mesh(*sizes, config=config)


def _cache_constraint(mesh):
    """Inside the prefill: pins the fresh KV cache to the sharding rules' layout (batch / KV heads)."""
    if mesh is None:
        return None

    def constrain(cache):
        return jax.lax.with_sharding_constraint(cache, sharding.cache_shardings(cache, mesh))

    return constrain


def load(path: str | os.PathLike, *, mesh=None, dtype=None, max_seq_len: int | None = None,
         tokenizer: str | os.PathLike | bool | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
         verify: bool = True) -> InferenceModel:
    """Loads a checkpoint for inference.

    path: a folder written by ``gptoss-convert`` (int4 or 16-bit), or an unquantized Hugging Face gpt-oss folder
        (config.json + *.safetensors, bf16/fp16/fp32).
    mesh: a ``jax.sharding.Mesh`` or a "data,expert,tensor" size string such as "1,4,2" (None: one device).
    dtype: compute / parameter dtype of the 16-bit tensors ("bfloat16" default, "float32").
    max_seq_len: longest prompt + generation (default min(4096, max_position_embeddings)).
    tokenizer: a tokenizer.json path, False for none, None (default) for the folder's tokenizer.json if present.
    verify: check the SHA-256 of every file of a converted checkpoint against its metadata (default; ≈1 GB/s per
        core, see docs/RELIABILITY.md). Structure, sizes and config / metadata / array agreement are always checked.

    Any path form works (relative, ``~``, symlink, trailing slash). Raises a GptOssError subclass naming the file at
    fault (LoadError, CheckpointError, ConfigError, TokenizerError) for any bad input; never loads a checkpoint whose
    recorded files differ from the metadata.
    """
    from gptoss_jax.fsutil import user_path
    from gptoss_jax.validation import check_load_args
    check_load_args(max_seq_len=max_seq_len, chunk_size=chunk_size, tokenizer=tokenizer)
    path = user_path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    enable_compilation_cache()
    if not path.is_dir():
        raise LoadError(f"{path}: expected a checkpoint folder")
    try:
        dtype = parse_dtype(dtype)
    except (TypeError, ValueError) as e:
        raise LoadError(str(e) if str(e).startswith("dtype") else f"dtype {dtype!r}: {e}") from None
    config = GptOssConfig.from_json(path / "config.json") if (path / "config.json").exists() else None
    mesh = resolve_mesh(mesh, config)

    # One straight line: config (read above) → metadata → shardings → restore into them → the model.
    sharding_of, moe_par = None, None
    if mesh is not None:
        sharding_of = sharding.sharding_rule(mesh)
        moe_par = MoEParallel.from_rules(mesh, sharding.RULES)
    if _is_converted_checkpoint(path):
        checked = checkpoint.verify_checkpoint(path, digests=verify)  # metadata and config, read once
        module = checkpoint.load_model(path, dtype=dtype, shardings=sharding_of, moe_parallel=moe_par, checked=checked)
        source_format = "gptoss-jax (int4)" if module.quant is not None else "gptoss-jax (16-bit)"
        assumed = _conversion_notes(checkpoint.read_metadata(path))
    elif config is not None and _has_safetensors(path):
        qc = json.loads((path / "config.json").read_text()).get("quantization_config")
        if qc is not None and not isinstance(qc, dict):
            raise LoadError(f"{path / 'config.json'}: quantization_config must be a JSON object, got "
                            f"{type(qc).__name__} {qc!r}")
        if qc:
            raise LoadError(f"{path / 'config.json'}: a quantized checkpoint "
                            f"(quant_method={qc.get('quant_method', '?')!r}); convert it first with "
                            f"`gptoss-convert {path} OUT` and load OUT")
        module = load_hf_model(path, dtype=dtype or jnp.bfloat16, config=config, sharding_of=sharding_of,
                               moe_parallel=moe_par)
        source_format = "huggingface"
        assumed = list(config.rope.assumed)
    else:
        raise LoadError(f"{path}: neither a gptoss-convert checkpoint nor a Hugging Face folder with config.json "
                        f"and *.safetensors")

    tok = None
    if tokenizer is not False:
        from gptoss_jax.tokenizer import load_tokenizer
        tok_path = Path(tokenizer) if tokenizer not in (None, True) else path / "tokenizer.json"
        if tok_path.exists() or tokenizer is not None:
            tok = load_tokenizer(tok_path)
    model = InferenceModel(module, tokenizer=tok, max_seq_len=max_seq_len, mesh=mesh, chunk_size=chunk_size,
                           default_stop_token_ids=_generation_stop_ids(path, module.config), source=str(path),
                           source_format=source_format, cache_constraint=_cache_constraint(mesh))
    model.assumed = assumed
    return model


def _conversion_notes(meta: dict) -> list[str]:
    """What a converted checkpoint's conversion assumed (rope defaults) or changed (--dtype cast, RTN)."""
    notes = [f"at conversion: {a}" for a in meta.get("assumed", [])]
    if meta.get("dtype_cast"):
        notes.append(f"at conversion: --dtype {meta['dtype_cast']} cast every non-int4 tensor (possibly lossy)")
    notes += [f"at conversion: requantized with RTN: {r}" for r in meta.get("requantized", [])]
    return notes
