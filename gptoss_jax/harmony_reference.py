"""The official ``openai-harmony`` library, offline: the reference that :mod:`gptoss_jax.harmony` is checked against.

``openai-harmony`` renders and parses the harmony format with the ``o200k_harmony`` encoding, whose base vocabulary
``o200k_base.tiktoken`` it downloads on first use — unless ``TIKTOKEN_ENCODINGS_BASE`` names a folder holding that
file. No network here (nor in CI), so :func:`o200k_vocab_dir` provides the folder: either the one the caller's
``TIKTOKEN_ENCODINGS_BASE`` already names, or a cache folder into which it unpacks the copy shipped (gzipped) by the
MIT-licensed ``bpe-openai`` package, checking the official SHA-256 before the file is used.

    from gptoss_jax.harmony_reference import load_encoding
    enc = load_encoding()                       # openai_harmony.HarmonyEncoding for gpt-oss, loaded offline
    enc.render_conversation_for_completion(conversation, openai_harmony.Role.ASSISTANT)

Both packages are optional (the ``test`` extra installs them); :class:`HarmonyReferenceError` says what is missing.

For gpt-oss's real o200k_harmony tokenizer (:func:`applies`), :func:`gptoss_jax.harmony.render_conversation_ids` and
:func:`gptoss_jax.harmony.parse_completion` go through the official library (:func:`render_ids`, :func:`parse_ids`)
wherever it expresses the request — a prompt without options it lacks, a well-formed completion; our own renderer
and lenient parser handle the rest and every other tokenizer, and are cross-checked against it token for token in
``tests/test_harmony.py``. ``GPTOSS_JAX_HARMONY_REFERENCE=0`` turns the official path off.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tempfile
from pathlib import Path

O200K_FILE = "o200k_base.tiktoken"
# SHA-256 of the official o200k_base.tiktoken (the value tiktoken and openai-harmony pin)
O200K_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
ENV = "TIKTOKEN_ENCODINGS_BASE"


class HarmonyReferenceError(RuntimeError):
    """openai-harmony or its vocabulary is not available (the message says which and how to provide it)."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$GPTOSS_JAX_CACHE`` or ``$XDG_CACHE_HOME/gptoss-jax`` (default ``~/.cache/gptoss-jax``), ``/tiktoken``."""
    base = os.environ.get("GPTOSS_JAX_CACHE")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptoss-jax"
    return Path(base) / "tiktoken"


def o200k_vocab_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """A folder holding a verified ``o200k_base.tiktoken``.

    ``$TIKTOKEN_ENCODINGS_BASE`` wins when it holds the file (it must match the official SHA-256). Otherwise the
    file is unpacked from the ``bpe-openai`` package into `cache_dir` (default :func:`default_cache_dir`) once:
    written to a temporary file, hashed, and renamed into place only if the hash is the official one; a cached
    file with another hash is replaced. Raises :class:`HarmonyReferenceError` if there is no source or a hash
    differs.
    """
    env = os.environ.get(ENV)
    if env and (Path(env) / O200K_FILE).is_file():
        got = _sha256(Path(env) / O200K_FILE)
        if got != O200K_SHA256:
            raise HarmonyReferenceError(f"{Path(env) / O200K_FILE} (from ${ENV}): SHA-256 {got}, expected the "
                                        f"official {O200K_SHA256}")
        return Path(env)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / O200K_FILE
    if target.is_file() and _sha256(target) == O200K_SHA256:
        return cache
    try:
        import importlib.resources
        source = importlib.resources.files("bpe_openai").joinpath(f"data/{O200K_FILE}.gz")
    except ModuleNotFoundError:
        raise HarmonyReferenceError(f"no {O200K_FILE}: install bpe-openai (pip install bpe-openai) or set ${ENV} to "
                                    f"a folder holding it") from None
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{O200K_FILE}.", dir=cache)
    try:
        h = hashlib.sha256()
        with source.open("rb") as raw, gzip.open(raw) as unpacked, os.fdopen(fd, "wb") as out:
            for block in iter(lambda: unpacked.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        if h.hexdigest() != O200K_SHA256:
            raise HarmonyReferenceError(f"bpe-openai's {O200K_FILE}.gz unpacks to SHA-256 {h.hexdigest()}, not the "
                                        f"official {O200K_SHA256}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return cache


def load_encoding(cache_dir: str | os.PathLike | None = None):
    """``openai_harmony``'s gpt-oss encoding (``HARMONY_GPT_OSS``), loaded without network access."""
    try:
        import openai_harmony
    except ModuleNotFoundError:
        raise HarmonyReferenceError("openai-harmony is not installed (pip install openai-harmony)") from None
    folder = o200k_vocab_dir(cache_dir)
    # openai-harmony reads the variable when it loads the vocabulary; point it at the verified folder
    os.environ[ENV] = str(folder)
    try:
        return openai_harmony.load_harmony_encoding(openai_harmony.HarmonyEncodingName.HARMONY_GPT_OSS)
    except Exception as e:  # openai-harmony raises its own HarmonyError / RuntimeError
        raise HarmonyReferenceError(f"openai-harmony could not load its vocabulary from {folder}: {e}") from None


# ------------------------------------------------------------------------------------------------------------------
# Rendering through the official library for the real o200k_harmony tokenizer.
_ENCODING = None
_ENCODING_FAILED = False
_IS_O200K: dict[int, tuple[object, bool]] = {}  # id → (the tokenizer, kept alive so the id stays its own; answer)
_PROBE = "Hello, world! Ünïcödé 日本語 <|start|> 12345"


def enabled() -> bool:
    """Rendering through openai-harmony is on unless ``GPTOSS_JAX_HARMONY_REFERENCE=0``."""
    return os.environ.get("GPTOSS_JAX_HARMONY_REFERENCE", "1") != "0"


def cached_encoding():
    """The encoding, loaded once; None when openai-harmony or the vocabulary is not available (never raises)."""
    global _ENCODING, _ENCODING_FAILED
    if _ENCODING is None and not _ENCODING_FAILED:
        try:
            _ENCODING = load_encoding()
        except Exception:  # noqa: BLE001 — optional: our own renderer is used instead
            _ENCODING_FAILED = True
    return _ENCODING


def is_o200k_harmony(tokenizer, enc) -> bool:
    """Whether `tokenizer` is gpt-oss's o200k_harmony: the documented special ids and the official encoding's ids
    on a probe text (checked once per tokenizer object)."""
    key = id(tokenizer)
    if key not in _IS_O200K:
        from gptoss_jax import harmony
        try:
            same = all(tokenizer.token_to_id(t) == i for t, i in harmony.SPECIAL_TOKENS.items())
            same = same and list(tokenizer.encode(_PROBE, allow_special=False)) == list(
                enc.encode(_PROBE, allowed_special=set(), disallowed_special=()))
        except Exception:  # noqa: BLE001 — anything unexpected: not the o200k tokenizer
            same = False
        _IS_O200K[key] = (tokenizer, same)
    return _IS_O200K[key][1]


def applies(tokenizer) -> bool:
    """Whether the official library handles `tokenizer`: enabled, available offline, and the tokenizer is
    o200k_harmony (the cheap special-id test runs first, so other tokenizers never load the vocabulary)."""
    if not enabled():
        return False
    from gptoss_jax import harmony
    try:
        if any(tokenizer.token_to_id(t) != i for t, i in harmony.SPECIAL_TOKENS.items()):
            return False
    except Exception:  # noqa: BLE001
        return False
    enc = cached_encoding()
    return enc is not None and is_o200k_harmony(tokenizer, enc)


def render_ids(tokenizer, messages, *, reasoning="medium", current_date=None, instructions=None, tools=None,
               **other) -> list[int] | None:
    """The harmony prompt ids rendered by openai-harmony (``render_conversation_for_completion``), or None when
    the official renderer does not apply: not the o200k_harmony tokenizer, library or vocabulary unavailable, or
    options it does not express (own system/developer messages, non-default identity / knowledge cutoff,
    training renders, an analysis-dropping policy that differs from openai-harmony's on this conversation)."""
    if not applies(tokenizer):
        return None
    from gptoss_jax import harmony
    enc = cached_encoding()
    defaults = dict(knowledge_cutoff=harmony.DEFAULT_KNOWLEDGE_CUTOFF, model_identity=harmony.DEFAULT_MODEL_IDENTITY,
                    include_system=True, add_generation_prompt=None, drop_analysis=True, for_training=False)
    if set(other) - set(defaults):
        return None
    opts = {**defaults, **other}
    if any(opts[k] != defaults[k] for k in ("knowledge_cutoff", "model_identity", "include_system", "for_training")):
        return None
    if opts["add_generation_prompt"] not in (None, True):
        return None
    msgs = [harmony._as_message(m) for m in messages]
    if any(m.role in ("system", "developer") for m in msgs):
        return None
    if harmony._drop_mask(msgs, opts["drop_analysis"]) != harmony._drop_mask(msgs, "openai_harmony"):
        return None
    if reasoning is None or (tools and any("function" in t and not isinstance(t["function"], dict) for t in tools)):
        return None
    import datetime as dt

    import openai_harmony as oh
    system = oh.SystemContent.new().with_reasoning_effort(oh.ReasoningEffort(str(reasoning).lower().capitalize()))
    if current_date is not None:
        if current_date == "today":
            current_date = dt.datetime.now(dt.timezone.utc).date()
        if isinstance(current_date, (dt.date, dt.datetime)):
            current_date = current_date.strftime("%Y-%m-%d")
        system = system.with_conversation_start_date(current_date)
    convo = [oh.Message.from_role_and_content(oh.Role.SYSTEM, system)]
    if instructions or tools:
        dev = oh.DeveloperContent.new()
        if instructions:
            dev = dev.with_instructions(instructions)
        if tools:
            specs = [t.get("function", t) for t in tools]
            dev = dev.with_function_tools([oh.ToolDescription.new(t["name"], t.get("description", ""),
                                                                  parameters=t.get("parameters")) for t in specs])
        convo.append(oh.Message.from_role_and_content(oh.Role.DEVELOPER, dev))
    convo += [to_harmony_message(oh, m) for m in msgs]
    return list(enc.render_conversation_for_completion(oh.Conversation.from_messages(convo), oh.Role.ASSISTANT))


def parse_ids(tokenizer, ids) -> list | None:
    """An assistant completion (token ids) parsed by openai-harmony (``parse_messages_from_completion_tokens``) into
    :class:`~gptoss_jax.harmony.Message`s, or None when it does not apply (not the o200k_harmony tokenizer, library
    unavailable) or the official parser refuses the completion — the caller's lenient parser then keeps the
    malformed output as text instead of losing it."""
    if not applies(tokenizer):
        return None
    from gptoss_jax import harmony
    enc = cached_encoding()
    import openai_harmony as oh
    try:
        parsed = enc.parse_messages_from_completion_tokens([int(i) for i in ids], oh.Role.ASSISTANT)
        out = []
        for m in parsed:
            text = "".join(getattr(c, "text", "") for c in m.content)
            role = m.author.role.value
            out.append(harmony.Message(role, text, channel=m.channel, recipient=m.recipient,
                                       content_type=m.content_type,
                                       name=m.author.name if role == "tool" else None))
        return out
    except Exception:  # noqa: BLE001 — malformed or cut output: the lenient parser handles it
        return None


def to_harmony_message(oh, m):
    """Our harmony.Message as an openai_harmony.Message (`oh`: the imported openai_harmony module)."""
    if m.role == "tool":
        om = oh.Message.from_author_and_content(oh.Author.new(oh.Role.TOOL, m.name), m.content)
    else:
        om = oh.Message.from_role_and_content(oh.Role(m.role), m.content)
    if m.channel:
        om = om.with_channel(m.channel)
    if m.recipient:
        om = om.with_recipient(m.recipient)
    if m.content_type:
        om = om.with_content_type(m.content_type)
    return om
