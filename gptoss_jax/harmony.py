"""The gpt-oss *harmony* chat format: rendering conversations and parsing completions.

Format (OpenAI's harmony docs, cross-checked against the ``openai-harmony`` renderer):

* a message is ``<|start|>{header}<|message|>{content}<|end|>``; the header is the role (or, for
  a tool's output, the tool's name), then `` to={recipient}`` when there is one, then
  ``<|channel|>{channel}`` when there is one, then `` {content_type}`` (e.g. `` <|constrain|>json``);
* the system message carries the model identity, ``Knowledge cutoff:``, ``Current date:``,
  ``Reasoning: low|medium|high`` and the valid-channels line;
* a developer message carries ``# Instructions\\n\\n{instructions}`` and optional function tools;
* an assistant message that calls a tool (has a recipient) ends with ``<|call|>``; every other
  message in a prompt ends with ``<|end|>`` (a completion's closing ``<|return|>`` becomes
  ``<|end|>`` when the reply goes into history);
* a prompt ends with ``<|start|>assistant``; the model then writes the rest of the header
  (``<|channel|>analysis<|message|>...``) and stops on ``<|return|>`` (done) or ``<|call|>``
  (tool call). ``<|end|>`` only separates messages inside one completion.
* chain-of-thought (``analysis``) from a turn that ended in a ``final`` answer is dropped from
  later prompts; analysis of an ongoing tool-calling turn is kept.

Token ids are taken from the tokenizer wherever one is given (the tiny test tokenizers have small
special ids); :data:`SPECIAL_TOKENS` holds the documented o200k_harmony ids as defaults.
"""

from __future__ import annotations

from gptoss_jax.errors import GptOssError

import dataclasses
import datetime as _dt
import json
import re
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "CHANNELS",
    "DEFAULT_KNOWLEDGE_CUTOFF",
    "DEFAULT_MODEL_IDENTITY",
    "HarmonyParseError",
    "HarmonyParseWarning",
    "Message",
    "REASONING_LEVELS",
    "SPECIAL_TOKENS",
    "STOP_TOKENS",
    "STOP_TOKEN_IDS",
    "developer_content",
    "final_text",
    "parse_completion",
    "render_conversation",
    "render_conversation_ids",
    "render_segments",
    "special_token_ids",
    "stop_token_ids",
    "system_content",
    "tool_calls",
    "tools_section",
]

# Documented o200k_harmony ids (the real gpt-oss tokenizer). Use special_token_ids(tokenizer) for
# any other tokenizer.
SPECIAL_TOKENS: dict[str, int] = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}

START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = (
    "<|start|>",
    "<|end|>",
    "<|message|>",
    "<|channel|>",
    "<|constrain|>",
    "<|return|>",
    "<|call|>",
)
# Tokens that end generation: <|return|> (final answer done) and <|call|> (tool call). <|end|>
# closes a message but generation continues with the next <|start|>.
STOP_TOKENS: tuple[str, ...] = (RETURN, CALL)
STOP_TOKEN_IDS: tuple[int, ...] = tuple(SPECIAL_TOKENS[t] for t in STOP_TOKENS)
# Tokens that close one message (inside a completion and in history).
MESSAGE_END_TOKENS: tuple[str, ...] = (END, RETURN, CALL)
# The structural tokens the parser understands.
_FORMAT_TOKENS: tuple[str, ...] = (START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL)

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
DEFAULT_KNOWLEDGE_CUTOFF = "2024-06"
REASONING_LEVELS: tuple[str, ...] = ("low", "medium", "high")
CHANNELS: tuple[str, ...] = ("analysis", "commentary", "final")
_ROLES = ("system", "developer", "user", "assistant", "tool")


class HarmonyParseError(GptOssError, ValueError):
    """A completion does not follow the harmony format (strict parsing only)."""


class HarmonyParseWarning(UserWarning):
    """Non-strict parsing met model output outside the harmony format; that output is kept as a plain-text
    message (``channel=None``), never dropped."""


@dataclasses.dataclass(frozen=True)
class Message:
    """One harmony message.

    ``role`` is one of system / developer / user / assistant / tool. A tool's output uses
    ``role="tool"`` and ``name`` = the tool (e.g. ``"functions.get_weather"``), which is what the
    header shows. ``recipient`` is the target of a tool call (``"functions.get_weather"``) or, on a
    tool's output, ``"assistant"``. ``content_type`` is the header's trailing type, e.g.
    ``"<|constrain|>json"`` as the model writes it.

    For a developer message, ``content`` is the instructions text; the renderer adds the
    ``# Instructions`` heading and the parser removes it.
    """

    role: str
    content: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    name: str | None = None

    def __post_init__(self):
        if self.role not in _ROLES:
            raise ValueError(f"unknown role {self.role!r}; expected one of {_ROLES}")
        if not isinstance(self.content, str):
            raise TypeError(f"message content must be str, got {type(self.content).__name__}")
        if self.role == "tool" and not self.name:
            raise ValueError("a tool message needs name= (the tool, e.g. 'functions.get_weather')")
        if self.role != "tool" and self.name is not None:
            raise ValueError("name= is only used for tool messages")
        for field in ("channel", "recipient", "content_type"):
            v = getattr(self, field)
            if v is not None and (not isinstance(v, str) or not v or any(c.isspace() for c in v)):
                raise ValueError(f"invalid {field} {v!r}: a non-empty string without whitespace")

    # -- convenience constructors
    @classmethod
    def user(cls, content: str) -> "Message":
        return cls("user", content)

    @classmethod
    def developer(cls, instructions: str) -> "Message":
        return cls("developer", instructions)

    @classmethod
    def assistant(cls, content: str, channel: str = "final", **kw) -> "Message":
        return cls("assistant", content, channel=channel, **kw)

    @classmethod
    def tool_call(cls, name: str, arguments: str | Mapping, channel: str = "commentary") -> "Message":
        """An assistant call of tool ``name`` with JSON ``arguments``."""
        if not isinstance(arguments, str):
            arguments = json.dumps(arguments)
        return cls("assistant", arguments, channel=channel, recipient=name, content_type=f"{CONSTRAIN}json")

    @classmethod
    def tool_result(cls, name: str, content: str, channel: str = "commentary") -> "Message":
        """Output of tool ``name``, addressed back to the assistant (the documented form)."""
        return cls("tool", content, channel=channel, recipient="assistant", name=name)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Message":
        """From ``{"role", "content", "channel"?, "recipient"?, "content_type"?, "name"?}``."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown message keys {sorted(unknown)}")
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _as_message(m: Message | Mapping[str, Any]) -> Message:
    if isinstance(m, Message):
        return m
    if isinstance(m, Mapping):
        return Message.from_dict(m)
    raise TypeError(f"expected Message or dict, got {type(m).__name__}")


# ---------------------------------------------------------------------------- system / developer
def system_content(
    *,
    reasoning: str | None = "medium",
    current_date: str | _dt.date | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    channels: Sequence[str] | None = CHANNELS,
    function_tools: bool = False,
) -> str:
    """The text of the harmony system message.

    ``current_date`` may be a ``datetime.date``, an ISO string, ``"today"`` (UTC) or None (the
    line is left out, as the reference renderer does). ``function_tools`` adds the line that
    routes function calls to the commentary channel.
    """
    sections: list[str] = []
    top: list[str] = []
    if model_identity:
        top.append(model_identity)
    if knowledge_cutoff:
        top.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date is not None:
        if current_date == "today":
            current_date = _dt.datetime.now(_dt.timezone.utc).date()
        if isinstance(current_date, (_dt.date, _dt.datetime)):
            current_date = current_date.strftime("%Y-%m-%d")
        top.append(f"Current date: {current_date}")
    if top:
        sections.append("\n".join(top))
    if reasoning is not None:
        level = str(reasoning).lower()
        if level not in REASONING_LEVELS:
            raise ValueError(f"reasoning must be one of {REASONING_LEVELS}, got {reasoning!r}")
        sections.append(f"Reasoning: {level}")
    if channels:
        line = f"# Valid channels: {', '.join(channels)}. Channel must be included for every message."
        if function_tools:
            line += "\nCalls to these tools must go to the commentary channel: 'functions'."
        sections.append(line)
    return "\n\n".join(sections)


def developer_content(instructions: str | None = None, tools: Sequence[Mapping] | None = None) -> str:
    """The text of a developer message: ``# Instructions`` and/or a ``# Tools`` section."""
    sections: list[str] = []
    if instructions:
        sections += ["# Instructions", instructions]
    if tools:
        sections.append(tools_section(tools))
    return "\n\n".join(sections)


def _normalize_tool(tool: Mapping) -> tuple[str, str, Mapping | None]:
    # Accept {"name", "description", "parameters"} or the OpenAI {"type": "function", "function": {...}}.
    if "function" in tool and isinstance(tool["function"], Mapping):
        tool = tool["function"]
    if "name" not in tool:
        raise ValueError(f"tool definition without a name: {dict(tool)!r}")
    return str(tool["name"]), str(tool.get("description", "")), tool.get("parameters")


def tools_section(tools: Sequence[Mapping], namespace: str = "functions") -> str:
    """Render function tools as harmony's TypeScript-like ``# Tools`` section."""
    lines = ["# Tools", "", f"## {namespace}", "", f"namespace {namespace} {{", ""]
    for tool in tools:
        name, description, params = _normalize_tool(tool)
        for line in description.splitlines():
            lines.append(f"// {line}")
        if params:
            lines.append(f"type {name} = (_: {_schema_to_ts(params, '')}) => any;")
        else:
            lines.append(f"type {name} = () => any;")
        lines.append("")
    lines.append(f"}} // namespace {namespace}")
    return "\n".join(lines)


def _default_comment(schema: Mapping) -> str | None:
    if "default" not in schema:
        return None
    d = schema["default"]
    if isinstance(d, str):
        return f"default: {d}" if schema.get("enum") else f'default: "{d}"'
    return f"default: {json.dumps(d, separators=(',', ':'), ensure_ascii=False)}"


def _one_of_to_ts(variants: list, indent: str, prop_desc: str | None = None, desc_above: bool = False) -> str:
    parts = []
    for i, variant in enumerate(variants):
        t = _schema_to_ts(variant, indent + "   ")
        if variant.get("nullable") and "null" not in t:
            t += " | null"
        comments = []
        desc = variant.get("description")
        if isinstance(desc, str) and not (i == 0 and desc_above) and desc != prop_desc:
            comments.append(desc)
        dc = _default_comment(variant)
        if dc:
            comments.append(dc)
        parts.append(f"\n{indent} | {t}" + (f" // {' '.join(comments)}" if comments else ""))
    return "".join(parts)


def _schema_to_ts(schema: Mapping, indent: str) -> str:
    """JSON schema -> TypeScript-like type, in the style harmony's renderer uses."""
    if "oneOf" in schema and isinstance(schema["oneOf"], list):
        return _one_of_to_ts(schema["oneOf"], indent)
    ty = schema.get("type")
    if isinstance(ty, list):
        return " | ".join("number" if t == "integer" else str(t) for t in ty)
    if ty == "object":
        out = ""
        if isinstance(schema.get("description"), str) and indent:
            out += f"{indent}// {schema['description']}\n"
        out += "{\n"
        required = set(schema.get("required", ()))
        for key, val in (schema.get("properties") or {}).items():
            if isinstance(val.get("title"), str):
                out += f"{indent}// {val['title']}\n{indent}//\n"
            if isinstance(val.get("description"), str) and "oneOf" not in val:
                out += f"{indent}// {val['description']}\n"
            examples = val.get("examples")
            if isinstance(examples, list) and examples:
                out += f"{indent}// Examples:\n"
                for ex in examples:
                    if isinstance(ex, str):
                        out += f'{indent}// - "{ex}"\n'
            opt = "" if key in required else "?"
            if isinstance(val.get("oneOf"), list):
                variants = val["oneOf"]
                prop_desc = val.get("description") if isinstance(val.get("description"), str) else None
                first_desc = variants[0].get("description") if variants else None
                desc_above = prop_desc is not None and prop_desc != first_desc
                if desc_above:
                    out += f"{indent}// {prop_desc}\n"
                dc = _default_comment(val)
                if dc:
                    out += f"{indent}// {dc}\n"
                out += f"{indent}{key}{opt}:{_one_of_to_ts(variants, indent, prop_desc, desc_above)}\n{indent},\n"
                continue
            t = _schema_to_ts(val, indent + "    ")
            if val.get("nullable") and "null" not in t:
                t += " | null"
            line = f"{indent}{key}{opt}: {t},"
            dc = _default_comment(val)
            if dc:
                line += f" // {dc}"
            out += line + "\n"
        return out + f"{indent}}}"
    if ty == "string":
        enum = [e for e in schema.get("enum", []) if isinstance(e, str)]
        return " | ".join(f'"{e}"' for e in enum) if enum else "string"
    if ty in ("number", "integer"):
        return "number"
    if ty == "boolean":
        return "boolean"
    if ty == "array":
        items = schema.get("items")
        return f"{_schema_to_ts(items, indent)}[]" if items else "Array<any>"
    return "any"


# ---------------------------------------------------------------------------- rendering
_DropPolicy = bool | str


def _drop_mask(messages: Sequence[Message], policy: _DropPolicy) -> list[bool]:
    """Which messages to leave out of the prompt (analysis that a final answer followed)."""
    if policy is True:
        policy = "completed"
    if policy in (False, None, "none"):
        return [False] * len(messages)
    is_analysis = [m.role == "assistant" and m.channel == "analysis" for m in messages]
    if policy == "completed":
        # Drop chain-of-thought that precedes the last final answer: that turn is complete.
        finals = [i for i, m in enumerate(messages) if m.role == "assistant" and m.channel == "final"]
        last_final = finals[-1] if finals else -1
        return [a and i < last_final for i, a in enumerate(is_analysis)]
    if policy == "openai_harmony":
        # Exactly openai-harmony 0.0.8's auto_drop_analysis: only when the last assistant message is
        # final, drop analysis before the *first* final message.
        assistants = [m for m in messages if m.role == "assistant"]
        if not assistants or assistants[-1].channel != "final":
            return [False] * len(messages)
        first_final = next(i for i, m in enumerate(messages) if m.channel == "final")
        return [a and i < first_final for i, a in enumerate(is_analysis)]
    raise ValueError(f"drop_analysis must be True, False, 'completed', 'openai_harmony' or 'none', got {policy!r}")


def _message_segments(m: Message, *, last_token: str | None = None) -> list[tuple[str, bool]]:
    """(text, is_special) pieces of one message, tokenized piecewise like the reference renderer."""
    segs: list[tuple[str, bool]] = [(START, True), (m.name if m.role == "tool" else m.role, False)]
    if m.recipient is not None and m.recipient != "all":
        segs.append((f" to={m.recipient}", False))
    if m.channel is not None:
        segs += [(CHANNEL, True), (m.channel, False)]
    if m.content_type is not None:
        if m.content_type.startswith(CONSTRAIN):
            segs += [(" ", False), (CONSTRAIN, True)]
            rest = m.content_type[len(CONSTRAIN):]
            if rest:
                segs.append((rest, False))
        else:
            segs.append((f" {m.content_type}", False))
    segs.append((MESSAGE, True))
    if m.content:
        segs.append((m.content, False))
    if last_token is None:
        last_token = CALL if (m.role == "assistant" and m.recipient is not None) else END
    segs.append((last_token, True))
    return segs


def render_segments(
    messages: Iterable[Message | Mapping[str, Any]],
    *,
    reasoning: str | None = "medium",
    current_date: str | _dt.date | None = None,
    knowledge_cutoff: str | None = DEFAULT_KNOWLEDGE_CUTOFF,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    instructions: str | None = None,
    tools: Sequence[Mapping] | None = None,
    include_system: bool = True,
    add_generation_prompt: bool | None = None,
    drop_analysis: _DropPolicy = True,
    for_training: bool = False,
) -> list[tuple[str, bool]]:
    """The conversation as ``(text, is_special)`` pieces; see :func:`render_conversation`."""
    msgs = [_as_message(m) for m in messages]
    if add_generation_prompt is None:
        add_generation_prompt = not for_training
    if for_training and add_generation_prompt:
        raise ValueError("for_training renders a finished conversation: add_generation_prompt must be False")

    # Developer content: the caller's developer message (instructions text) plus any tools.
    dev_idx = next((i for i, m in enumerate(msgs) if m.role == "developer"), None)
    out_msgs: list[Message] = []
    contents: dict[int, str] = {}  # index in out_msgs -> rendered content, when it differs
    if include_system and not (msgs and msgs[0].role == "system"):
        out_msgs.append(
            Message(
                "system",
                system_content(
                    reasoning=reasoning,
                    current_date=current_date,
                    knowledge_cutoff=knowledge_cutoff,
                    model_identity=model_identity,
                    function_tools=bool(tools),
                ),
            )
        )
    elif msgs and msgs[0].role == "system":
        out_msgs.append(msgs[0])  # the caller's own system message, rendered as given
    if (instructions or tools) and dev_idx is None:
        out_msgs.append(Message("developer", instructions or ""))
        contents[len(out_msgs) - 1] = developer_content(instructions, tools)
    elif instructions:
        raise ValueError("instructions= given but the conversation already has a developer message")

    mask = _drop_mask(msgs, drop_analysis)
    for i, m in enumerate(msgs):
        if mask[i] or (i == 0 and m.role == "system"):
            continue
        if m.role == "developer":
            text = m.content
            if not text.startswith("# "):
                text = developer_content(text, tools if i == dev_idx else None)
            elif i == dev_idx and tools:
                text = text + "\n\n" + tools_section(tools)
            contents[len(out_msgs)] = text
        out_msgs.append(m)

    segs: list[tuple[str, bool]] = []
    for j, m in enumerate(out_msgs):
        if j in contents:
            m = dataclasses.replace(m, content=contents[j])
        last = None
        if for_training and j == len(out_msgs) - 1 and m.role == "assistant" and m.channel == "final":
            last = RETURN
        segs += _message_segments(m, last_token=last)
    if add_generation_prompt:
        segs += [(START, True), ("assistant", False)]
    return segs


def render_conversation(messages: Iterable[Message | Mapping[str, Any]], **kwargs) -> str:
    """Render a conversation as harmony text.

    Args:
      messages: :class:`Message` objects or dicts. A leading ``system`` message is rendered as
        given; otherwise (with ``include_system``) the harmony system message is built from
        ``reasoning`` / ``current_date`` / ``knowledge_cutoff`` / ``model_identity``.
      reasoning: ``"low" | "medium" | "high"``.
      current_date: ``"YYYY-MM-DD"``, a ``datetime.date``, ``"today"`` or None (line left out).
      instructions: developer instructions (adds a developer message after the system message).
      tools: function tool definitions (``{"name", "description", "parameters"}``) for the
        developer message's ``# Tools`` section; also adds the commentary-channel line to the
        system message.
      add_generation_prompt: end with ``<|start|>assistant`` so the model answers (default: True
        unless ``for_training``).
      drop_analysis: ``True``/``"completed"`` drops analysis (chain-of-thought) messages that a
        later ``final`` answer completed; ``"openai_harmony"`` reproduces openai-harmony 0.0.8's
        rule exactly; ``False``/``"none"`` keeps everything.
      for_training: end a trailing final answer with ``<|return|>`` instead of ``<|end|>``.
    """
    return "".join(text for text, _ in render_segments(messages, **kwargs))


def special_token_ids(tokenizer=None) -> dict[str, int]:
    """Harmony special token name -> id for ``tokenizer`` (default: documented o200k ids)."""
    if tokenizer is None:
        return dict(SPECIAL_TOKENS)
    out: dict[str, int] = {}
    for name in SPECIAL_TOKENS:
        idx = tokenizer.token_to_id(name)
        if idx is not None:
            out[name] = int(idx)
    missing = [n for n in _FORMAT_TOKENS if n not in out]
    if missing:
        raise ValueError(f"tokenizer lacks harmony special tokens {missing}")
    return out


def stop_token_ids(tokenizer=None) -> tuple[int, ...]:
    """Ids that end generation (``<|return|>``, ``<|call|>``) for ``tokenizer``."""
    ids = special_token_ids(tokenizer)
    return tuple(ids[t] for t in STOP_TOKENS)


def _wrap_tokenizer(tokenizer):
    # Accept a raw tokenizers.Tokenizer as well as gptoss_jax.tokenizer.Tokenizer (or anything with
    # token_to_id / encode(text, allow_special=...) / decode(ids, skip_special=...)).
    import tokenizers

    from gptoss_jax.tokenizer import Tokenizer

    return Tokenizer(tokenizer) if isinstance(tokenizer, tokenizers.Tokenizer) else tokenizer


def render_conversation_ids(tokenizer, messages: Iterable[Message | Mapping[str, Any]], **kwargs) -> list[int]:
    """Render a conversation straight to token ids (same arguments as :func:`render_conversation`).

    Structural tokens get the tokenizer's special ids; text pieces (role, channel, content ...) are
    encoded separately with special-token recognition off, as the reference renderer does, so
    message content can never inject format tokens.

    For gpt-oss's real o200k_harmony tokenizer, when ``openai-harmony`` and its vocabulary are available
    offline (:mod:`gptoss_jax.harmony_reference`), the official renderer produces the ids wherever it
    expresses the options given (else, and for every other tokenizer, this renderer does;
    ``GPTOSS_JAX_HARMONY_REFERENCE=0`` turns the official one off).
    """
    tokenizer = _wrap_tokenizer(tokenizer)
    ids_of = special_token_ids(tokenizer)
    messages = list(messages)
    try:  # gpt-oss's real o200k_harmony tokenizer: the official renderer (openai-harmony), where it applies
        from gptoss_jax import harmony_reference
        ref = harmony_reference.render_ids(tokenizer, messages, **kwargs)
    except Exception:  # noqa: BLE001 — the reference is optional; ours is cross-checked against it in the tests
        ref = None
    if ref is not None:
        return ref
    out: list[int] = []
    for text, special in render_segments(messages, **kwargs):
        out += [ids_of[text]] if special else list(tokenizer.encode(text, allow_special=False))
    return out


# ---------------------------------------------------------------------------- parsing
_TOKEN_RE = re.compile("(" + "|".join(re.escape(t) for t in _FORMAT_TOKENS) + ")")


def _text_to_stream(text: str) -> list[tuple[str, bool]]:
    return [(p, p in _FORMAT_TOKENS) for p in _TOKEN_RE.split(text) if p]


def _ids_to_stream(ids: Sequence[int], tokenizer) -> list[tuple[str, bool]]:
    if tokenizer is None:
        raise ValueError("parse_completion needs tokenizer= to decode token ids")
    tokenizer = _wrap_tokenizer(tokenizer)
    by_id = {v: k for k, v in special_token_ids(tokenizer).items() if k in _FORMAT_TOKENS}
    stream: list[tuple[str, bool]] = []
    run: list[int] = []

    def flush():
        if run:
            stream.append((tokenizer.decode(run, skip_special=False), False))
            run.clear()

    # Models pad their vocabulary past the tokenizer's: ids it cannot decode become U+FFFD.
    n_vocab = getattr(tokenizer, "vocab_size", None)
    for i in ids:
        i = int(i)
        if i in by_id:
            flush()
            stream.append((by_id[i], True))
        elif i < 0 or (n_vocab is not None and i >= n_vocab):
            flush()
            stream.append(("\ufffd", False))
        else:
            run.append(i)
    flush()
    return stream


def _parse_header(header: str, role: str | None, strict: bool = True) -> dict[str, Any]:
    """Header text (with literal <|channel|> / <|constrain|> markers) -> message fields.

    Non-strict parsing tolerates an empty channel and stray header words (they are ignored).
    """
    raw = header
    channel = None
    idx = header.find(CHANNEL)
    if idx >= 0:
        after = header[idx + len(CHANNEL):]
        channel = re.match(r"[^\s<]*", after).group(0)
        if not channel:
            if strict:
                raise HarmonyParseError(f"channel marker without a channel in header {raw!r}")
            channel = None
        header = header[:idx] + after[len(channel or ""):]
    header = header.strip()
    if CONSTRAIN in header:
        header = header.replace(CONSTRAIN, " " + CONSTRAIN).strip()
    parts = header.split()
    name = None
    if role is None:
        if not parts:
            raise HarmonyParseError("message header has no role")
        first = parts.pop(0)
        if first in _ROLES and first != "tool":
            role = first
        else:
            role, name = "tool", first  # a tool's output: the header starts with the tool's name
    elif parts and parts[0] == role:
        parts.pop(0)
    recipient = content_type = None
    if parts:
        n = len(parts)
        last = parts.pop()
        if last.startswith("to="):
            recipient = last[3:]
        elif n == 1 and not last.startswith(CONSTRAIN):
            recipient = last
        else:
            content_type = last
            if parts:
                r = parts.pop()
                recipient = r[3:] if r.startswith("to=") else r
    if parts:
        if strict:
            raise HarmonyParseError(f"unexpected text in message header {raw!r}: {' '.join(parts)!r}")
        warnings.warn(f"harmony: ignored unexpected words {' '.join(parts)!r} in the message header {raw!r}",
                      HarmonyParseWarning, stacklevel=3)
    return dict(role=role, channel=channel, recipient=recipient, content_type=content_type, name=name)


def parse_completion(
    completion: str | Sequence[int],
    tokenizer=None,
    *,
    role: str | None = "assistant",
    strict: bool = False,
    complete: bool = True,
) -> list[Message]:
    """Parse generated text or token ids into messages.

    ``completion`` is what the model produced after a prompt ending in ``<|start|>assistant``
    (so the first header's role is ``role``), e.g.
    ``<|channel|>analysis<|message|>...<|end|><|start|>assistant<|channel|>final<|message|>...<|return|>``.
    Pass ``role=None`` to parse a full rendered conversation (each message starts with
    ``<|start|>``). Token ids need ``tokenizer`` (ids are looked up through it).

    A message cut off by the token budget (no closing token) is still returned. Output outside the
    format — stray text between messages, a header that cannot be parsed, a format token where it
    cannot be, a completion that ends inside a header — raises :class:`HarmonyParseError` with
    ``strict``; otherwise it is never dropped: it comes back as its raw text in an assistant message
    with ``channel=None`` (what a chat shows as the answer), with a :class:`HarmonyParseWarning`.
    ``complete=False`` says the completion may still grow (streaming): a trailing unfinished header
    is then left out silently. A header that starts with something other than a role is a tool's
    output (``role="tool"``, ``name`` = that word). A developer message's ``# Instructions``
    heading is removed (the inverse of rendering).
    """
    if isinstance(completion, str):
        stream = _text_to_stream(completion)
    else:
        if hasattr(completion, "tolist"):
            completion = completion.tolist()
        if complete and not strict and role == "assistant" and tokenizer is not None:
            # gpt-oss's real o200k_harmony tokenizer: the official parser — for well-formed completions only
            # (ours, strict, accepts them), so malformed output still comes back as text instead of being dropped
            try:
                from gptoss_jax import harmony_reference
                wrapped = _wrap_tokenizer(tokenizer)
                ref = None
                if harmony_reference.applies(wrapped):
                    parse_completion(completion, tokenizer, role=role, strict=True)
                    ref = harmony_reference.parse_ids(wrapped, completion)
            except Exception:  # noqa: BLE001 — malformed, or the optional reference is unavailable
                ref = None
            if ref is not None:
                return ref
        stream = _ids_to_stream(completion, tokenizer)

    messages: list[Message] = []
    state = "header" if role is not None else "start"
    next_role = role
    header: list[str] = []
    raw: list[str] = []  # the current message's pieces as produced, for surfacing it if malformed
    stray: list[str] = []  # output outside any message
    fields: dict[str, Any] = {}
    content: list[str] = []

    def fail(msg: str):
        if strict:
            raise HarmonyParseError(msg)

    def surface(pieces: list[str], why: str):
        text = "".join(pieces)
        if text.strip():
            warnings.warn(f"harmony: {why}; kept as plain text: {text[:80]!r}", HarmonyParseWarning, stacklevel=3)
            messages.append(Message("assistant", text))

    def flush_stray():
        if stray:
            surface(stray, "model output outside a message")
            stray.clear()

    def finish():
        text = "".join(content)
        if fields["role"] == "developer" and text.startswith("# Instructions\n\n"):
            text = text[len("# Instructions\n\n"):]
        messages.append(Message(content=text, **fields))

    for piece, special in stream:
        if state == "start":
            if special and piece == START:
                flush_stray()
                state, header, raw = "header", [], [piece]
            elif special and piece in STOP_TOKENS and not stray:
                continue  # a closing token where a message could start: nothing to do
            elif not special and not piece.strip() and not stray:
                continue  # whitespace between messages (e.g. newlines in hand-written examples)
            else:
                fail(f"expected {START}, got {piece!r}")
                stray.append(piece)
        elif state == "header":
            raw.append(piece)
            if special and piece == MESSAGE:
                try:
                    fields = _parse_header("".join(header), next_role, strict)
                    state = "content"
                except HarmonyParseError:
                    if strict:
                        raise
                    state = "skip"  # unusable header: the message is kept as raw text
                next_role = None
                content = []
            elif special and piece in (CHANNEL, CONSTRAIN) or not special:
                header.append(piece)
            else:
                fail(f"unexpected {piece} inside a message header {''.join(header)!r}")
                if piece == START:
                    surface(raw[:-1], "a message header was interrupted by <|start|>")
                    state, next_role, header, raw = "header", None, [], [piece]
                else:
                    surface(raw, f"a message header was interrupted by {piece}")
                    state, next_role, header, raw = "start", None, [], []
        elif state == "skip":
            raw.append(piece)
            if special and piece in MESSAGE_END_TOKENS:
                surface(raw, "a message header could not be parsed")
                state = "start"
            elif special and piece == START:
                surface(raw[:-1], "a message header could not be parsed")
                state, header, raw = "header", [], [piece]
        else:  # content
            if special and piece in MESSAGE_END_TOKENS:
                finish()
                state = "start"
            elif special and piece == START:
                fail(f"{START} inside message content (missing {END}?)")
                finish()
                state, header, raw = "header", [], [piece]
            else:
                content.append(piece)
    if state == "content":
        finish()  # truncated by the token budget
    elif state == "skip" and complete:
        surface(raw, "a message header could not be parsed")
    elif state == "header" and header:
        fail(f"completion ended inside a message header {''.join(header)!r}")
        # a bare "<|start|>assistant" (a generation prompt, or the budget ending right after it) holds no output
        if complete and "".join(header).strip() not in _ROLES:
            surface(raw, "the completion ended inside a message header")
    if complete:
        flush_stray()
    return messages


def final_text(messages: Sequence[Message]) -> str | None:
    """Content of the last assistant ``final`` message, or None."""
    for m in reversed(messages):
        if m.role == "assistant" and m.channel == "final":
            return m.content
    return None


def tool_calls(messages: Sequence[Message]) -> list[Message]:
    """Assistant messages addressed to a tool (``recipient`` set)."""
    return [m for m in messages if m.role == "assistant" and m.recipient is not None]
