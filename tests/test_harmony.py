"""Tests for gptoss_jax.harmony (the gpt-oss harmony chat format).

Three kinds of checks:
* fixtures copied from OpenAI's harmony format documentation (docs/format.md of openai/harmony,
  also published as the cookbook article "OpenAI Harmony Response Format");
* fixtures produced by the reference renderer ``openai-harmony`` 0.0.8 (hard-coded here, so they
  run everywhere);
* a live cross-check against ``openai-harmony`` on random conversations, offline: its o200k vocabulary is
  unpacked from the ``bpe-openai`` package into a cache folder and SHA-256-checked
  (gptoss_jax.harmony_reference); both packages are in the ``test`` extra, so this runs in CI.
"""

import random
import string
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gptoss_jax import harmony as H
from gptoss_jax.harmony import HarmonyParseError, Message, parse_completion, render_conversation
from gptoss_jax.testing import build_tiny_tokenizer

# ----------------------------------------------------------------------------- documented examples
DOC_SYSTEM_WITH_FUNCTIONS = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n"
    "Current date: 2025-06-28\n"
    "\n"
    "Reasoning: high\n"
    "\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.\n"
    "Calls to these tools must go to the commentary channel: 'functions'.<|end|>"
)

DOC_TOOLS = [
    {"name": "get_location", "description": "Gets the location of the user."},
    {
        "name": "get_current_weather",
        "description": "Gets the current weather in the provided location.",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
                "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
            },
            "required": ["location"],
        },
    },
    {
        "type": "function",  # the OpenAI-style wrapper is accepted too
        "function": {
            "name": "get_multiple_weathers",
            "description": "Gets the current weather in the provided list of locations.",
            "parameters": {
                "type": "object",
                "properties": {
                    "locations": {
                        "type": "array",
                        "items": {"type": "string"},
                        "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]',
                    },
                    "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                },
                "required": ["locations"],
            },
        },
    },
]

DOC_DEVELOPER_WITH_TOOLS = (
    "<|start|>developer<|message|># Instructions\n"
    "\n"
    "Use a friendly tone.\n"
    "\n"
    "# Tools\n"
    "\n"
    "## functions\n"
    "\n"
    "namespace functions {\n"
    "\n"
    "// Gets the location of the user.\n"
    "type get_location = () => any;\n"
    "\n"
    "// Gets the current weather in the provided location.\n"
    "type get_current_weather = (_: {\n"
    "// The city and state, e.g. San Francisco, CA\n"
    "location: string,\n"
    'format?: "celsius" | "fahrenheit", // default: celsius\n'
    "}) => any;\n"
    "\n"
    "// Gets the current weather in the provided list of locations.\n"
    "type get_multiple_weathers = (_: {\n"
    '// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]\n'
    "locations: string[],\n"
    'format?: "celsius" | "fahrenheit", // default: celsius\n'
    "}) => any;\n"
    "\n"
    "} // namespace functions<|end|>"
)

DOC_FUNCTION_PROMPT = (
    DOC_SYSTEM_WITH_FUNCTIONS
    + DOC_DEVELOPER_WITH_TOOLS
    + "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant"
)

DOC_BASIC_OUTPUT = (
    '<|channel|>analysis<|message|>User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.<|end|>'
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>"
)

DOC_TOOL_CALL_OUTPUT = (
    "<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
    '{"location":"San Francisco"}<|call|>'
)

DOC_TOOL_RESULT = (
    "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
    '{"sunny": true, "temperature": 20}<|end|>'
)

DOC_PREAMBLE_OUTPUT = (
    "<|channel|>analysis<|message|>{long chain of thought}<|end|>"
    "<|start|>assistant<|channel|>commentary<|message|>**Action plan**:\n"
    "1. Generate an HTML file\n"
    "2. Generate a JavaScript for the Node.js server\n"
    "3. Start the server\n"
    "---\n"
    "Will start executing the plan step by step<|end|>"
    "<|start|>assistant<|channel|>commentary to=functions.generate_file<|constrain|>json<|message|>"
    '{"template": "basic_html", "path": "index.html"}<|call|>'
)

# The docs' "input for the next sampling" after the 2 + 2 answer, with the history's trailing
# <|return|> normalised to <|end|> as the docs' implementation note requires.
DOC_NEXT_TURN = (
    "<|start|>user<|message|>What is 2 + 2?<|end|>"
    "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|end|>"
    "<|start|>user<|message|>What about 9 / 2?<|end|>"
    "<|start|>assistant"
)

# ----------------------------------------------------------------------------- reference renders
# openai-harmony 0.0.8, render_conversation_for_completion(..., Role.ASSISTANT), decoded.
REF_DEFAULT_SYSTEM_NO_DATE = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>user<|message|>hi<|end|><|start|>assistant"
)
REF_DEVELOPER = (
    "<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
    "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: medium\n\n"
    "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>"
    "<|start|>developer<|message|># Instructions\n\nAlways respond in riddles<|end|>"
    "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
)
# A tool call in history: the reference renderer puts the recipient before the channel.
REF_TOOL_ROUND_TRIP = (
    "<|start|>user<|message|>weather?<|end|>"
    "<|start|>assistant<|channel|>analysis<|message|>Need tool<|end|>"
    "<|start|>assistant to=functions.get_weather<|channel|>commentary <|constrain|>json<|message|>"
    '{"location":"SF"}<|call|>'
    '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>'
    "<|start|>assistant"
)
REF_TRAINING = (
    "<|start|>user<|message|>q1<|end|><|start|>assistant<|channel|>final<|message|>f1<|return|>"
)


def _no_system(messages, **kw):
    return render_conversation(messages, include_system=False, **kw)


# ----------------------------------------------------------------------------- rendering
def test_special_tokens_and_stop_ids():
    assert H.SPECIAL_TOKENS == {
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
    assert set(H.STOP_TOKEN_IDS) == {200002, 200012}
    assert H.stop_token_ids() == H.STOP_TOKEN_IDS


def test_doc_basic_prompt():
    assert _no_system([Message.user("What is 2 + 2?")]) == (
        "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    )


def test_doc_system_message_and_function_prompt():
    text = render_conversation(
        [Message.user("What is the weather like in SF?")],
        reasoning="high",
        current_date="2025-06-28",
        instructions="Use a friendly tone.",
        tools=DOC_TOOLS,
    )
    assert text == DOC_FUNCTION_PROMPT
    assert text.startswith(DOC_SYSTEM_WITH_FUNCTIONS)


def test_doc_developer_message():
    text = _no_system([Message.developer("{instructions}")], add_generation_prompt=False)
    assert text == "<|start|>developer<|message|># Instructions\n\n{instructions}<|end|>"
    # a developer message in the list takes the tools too
    text = _no_system([Message.developer("Use a friendly tone.")], add_generation_prompt=False, tools=DOC_TOOLS)
    assert text == DOC_DEVELOPER_WITH_TOOLS


def test_doc_tool_result_message():
    msg = Message.tool_result("functions.get_weather", '{"sunny": true, "temperature": 20}')
    assert _no_system([msg], add_generation_prompt=False) == DOC_TOOL_RESULT


def test_doc_next_turn_drops_analysis_and_uses_end():
    completion = parse_completion(DOC_BASIC_OUTPUT)
    history = [Message.user("What is 2 + 2?"), *completion, Message.user("What about 9 / 2?")]
    assert _no_system(history) == DOC_NEXT_TURN
    # keeping the chain of thought is possible on request
    kept = _no_system(history, drop_analysis=False)
    assert '<|channel|>analysis<|message|>User asks: "What is 2 + 2?"' in kept
    assert "<|return|>" not in kept


def test_reference_renders():
    assert render_conversation([Message.user("hi")]) == REF_DEFAULT_SYSTEM_NO_DATE
    assert (
        render_conversation(
            [Message.developer("Always respond in riddles"), Message.user("What is 2 + 2?")],
            current_date="2025-06-28",
        )
        == REF_DEVELOPER
    )
    assert (
        render_conversation(
            [Message.user("What is 2 + 2?")], current_date="2025-06-28", instructions="Always respond in riddles"
        )
        == REF_DEVELOPER
    )
    msgs = [
        Message.user("weather?"),
        Message.assistant("Need tool", channel="analysis"),
        Message.tool_call("functions.get_weather", '{"location":"SF"}'),
        Message.tool_result("functions.get_weather", '{"sunny": true}'),
    ]
    assert _no_system(msgs) == REF_TOOL_ROUND_TRIP  # ongoing tool turn: analysis is kept
    training = _no_system(
        [Message.user("q1"), Message.assistant("a1", channel="analysis"), Message.assistant("f1")], for_training=True
    )
    assert training == REF_TRAINING


def test_system_options():
    import datetime

    text = render_conversation([Message.user("x")], reasoning="LOW", current_date=datetime.date(2025, 1, 2))
    assert "Current date: 2025-01-02\n\nReasoning: low\n\n# Valid channels" in text
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    assert f"Current date: {today}" in render_conversation([], current_date="today")
    custom = render_conversation([], model_identity="You are Tiny.", knowledge_cutoff=None, reasoning=None)
    assert custom.startswith("<|start|>system<|message|>You are Tiny.\n\n# Valid channels:")
    # a leading system message is used as given
    own = render_conversation([Message("system", "custom system"), Message.user("u")])
    assert own.startswith("<|start|>system<|message|>custom system<|end|><|start|>user")
    assert own.count("<|start|>system") == 1
    with pytest.raises(ValueError, match="reasoning"):
        render_conversation([], reasoning="extreme")


def test_drop_analysis_policies():
    U, A = Message.user, Message.assistant
    conv = [
        U("q1"),
        A("a1", channel="analysis"),
        A("f1"),
        U("q2"),
        A("a2", channel="analysis"),
        A("f2"),
        U("q3"),
        A("a3", channel="analysis"),
        Message.tool_call("functions.f", "{}"),
        Message.tool_result("functions.f", "ok"),
    ]
    completed = _no_system(conv)
    assert "a1" not in completed and "a2" not in completed  # finished turns lose their CoT
    assert "a3" in completed  # the ongoing tool-calling turn keeps it
    assert _no_system(conv, drop_analysis="completed") == completed
    keep = _no_system(conv, drop_analysis=False)
    assert all(s in keep for s in ("a1", "a2", "a3"))
    assert _no_system(conv, drop_analysis="none") == keep
    # openai-harmony 0.0.8's rule: only when the last assistant message is final, and only analysis
    # before the *first* final message
    ref = _no_system(conv[:6] + [U("q3")], drop_analysis="openai_harmony")
    assert "a1" not in ref and "a2" in ref
    assert _no_system(conv, drop_analysis="openai_harmony") == keep
    with pytest.raises(ValueError, match="drop_analysis"):
        _no_system(conv, drop_analysis="sometimes")


def test_dict_messages_and_validation():
    text = _no_system([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "channel": "final"}])
    assert text == (
        "<|start|>user<|message|>hi<|end|><|start|>assistant<|channel|>final<|message|>yo<|end|><|start|>assistant"
    )
    with pytest.raises(ValueError, match="unknown role"):
        Message("robot", "x")
    with pytest.raises(ValueError, match="tool message needs name"):
        Message("tool", "x")
    with pytest.raises(ValueError, match="only used for tool"):
        Message("user", "x", name="bob")
    with pytest.raises(ValueError, match="invalid channel"):
        Message("assistant", "x", channel="fin al")
    with pytest.raises(ValueError, match="unknown message keys"):
        Message.from_dict({"role": "user", "content": "x", "thinking": "y"})
    with pytest.raises(TypeError):
        Message("user", None)
    with pytest.raises(ValueError, match="add_generation_prompt"):
        render_conversation([], for_training=True, add_generation_prompt=True)
    with pytest.raises(ValueError, match="already has a developer"):
        render_conversation([Message.developer("a")], instructions="b")
    assert Message.tool_call("functions.f", {"a": 1}).content == '{"a": 1}'
    assert Message.from_dict(Message.tool_result("functions.f", "ok").to_dict()) == Message.tool_result(
        "functions.f", "ok"
    )


# ----------------------------------------------------------------------------- parsing
def test_parse_doc_basic_output():
    msgs = parse_completion(DOC_BASIC_OUTPUT)
    assert msgs == [
        Message("assistant", 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.', channel="analysis"),
        Message("assistant", "2 + 2 = 4.", channel="final"),
    ]
    assert H.final_text(msgs) == "2 + 2 = 4."
    assert H.tool_calls(msgs) == []


def test_parse_doc_tool_call_and_preamble():
    msgs = parse_completion(DOC_TOOL_CALL_OUTPUT)
    assert msgs == [
        Message("assistant", "Need to use function get_weather.", channel="analysis"),
        Message(
            "assistant",
            '{"location":"San Francisco"}',
            channel="commentary",
            recipient="functions.get_weather",
            content_type="<|constrain|>json",
        ),
    ]
    assert H.tool_calls(msgs) == msgs[1:]
    assert H.final_text(msgs) is None
    msgs = parse_completion(DOC_PREAMBLE_OUTPUT)
    assert [m.channel for m in msgs] == ["analysis", "commentary", "commentary"]
    assert msgs[1].recipient is None and msgs[1].content.startswith("**Action plan**:\n1. Generate")
    assert msgs[2].recipient == "functions.generate_file"
    assert msgs[2].content_type == "<|constrain|>json"
    assert msgs[2].content == '{"template": "basic_html", "path": "index.html"}'


def test_parse_tool_result_and_docs_history_layout():
    (msg,) = parse_completion(DOC_TOOL_RESULT, role=None)
    assert msg == Message.tool_result("functions.get_weather", '{"sunny": true, "temperature": 20}')
    # The docs' history shows the recipient after the channel; the reference renderer puts it
    # before. Both parse to the same messages.
    docs_layout = (
        "<|start|>user<|message|>weather?<|end|>"
        "<|start|>assistant<|channel|>analysis<|message|>Need tool<|end|>"
        "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
        '{"location":"SF"}<|call|>'
        '<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{"sunny": true}<|end|>'
    )
    a = parse_completion(docs_layout, role=None)
    b = parse_completion(REF_TOOL_ROUND_TRIP, role=None)
    assert a == b and len(a) == 4


def test_parse_full_rendered_prompt():
    msgs = parse_completion(DOC_FUNCTION_PROMPT, role=None)
    assert [m.role for m in msgs] == ["system", "developer", "user"]
    assert msgs[1].content.startswith("Use a friendly tone.\n\n# Tools")
    assert msgs[2] == Message.user("What is the weather like in SF?")


def test_parse_truncated_and_malformed():
    # cut off by the token budget: the partial message is kept
    assert parse_completion("<|channel|>final<|message|>The answ") == [Message.assistant("The answ")]
    # cut off inside a header: kept as plain text with a warning (never dropped), or an error when strict; while
    # streaming (complete=False) the unfinished header is simply not shown yet
    cut = "<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fi"
    with pytest.warns(H.HarmonyParseWarning, match="ended inside a message header"):
        assert parse_completion(cut) == [Message.assistant("x", channel="analysis"),
                                         Message("assistant", "<|start|>assistant<|channel|>fi")]
    assert parse_completion(cut, complete=False) == [Message.assistant("x", channel="analysis")]
    with pytest.raises(HarmonyParseError, match="header"):
        parse_completion("<|channel|>analysis<|message|>x<|end|><|start|>assistant<|channel|>fi", strict=True)
    # stray text between messages
    with pytest.raises(HarmonyParseError, match="expected"):
        parse_completion("<|channel|>final<|message|>x<|end|>junk", strict=True)
    with pytest.warns(H.HarmonyParseWarning, match="outside a message"):
        assert parse_completion("<|channel|>final<|message|>x<|end|>junk") == [Message.assistant("x"),
                                                                               Message("assistant", "junk")]
    # empty channel / extra header words
    with pytest.raises(HarmonyParseError):
        parse_completion("<|channel|><|message|>x<|end|>", strict=True)
    with pytest.raises(HarmonyParseError, match="unexpected text"):
        parse_completion("<|channel|>final a b c<|message|>x<|end|>", strict=True)
    assert parse_completion("<|channel|><|message|>x<|end|>") == [Message("assistant", "x")]
    with pytest.warns(H.HarmonyParseWarning, match="ignored unexpected words"):
        assert [m.content for m in parse_completion("<|channel|>final a b c<|message|>x<|end|>")] == ["x"]
    # an unusable header (no role) and a header cut by a format token: the raw output comes back as text
    with pytest.warns(H.HarmonyParseWarning, match="could not be parsed"):
        assert parse_completion("<|start|><|message|>hidden<|end|>", role=None) == [
            Message("assistant", "<|start|><|message|>hidden<|end|>")]
    with pytest.warns(H.HarmonyParseWarning, match="interrupted by <|end|>"):
        assert parse_completion("<|channel|>fin<|end|>") == [Message("assistant", "<|channel|>fin<|end|>")]
    # newlines between messages, as in hand-written examples, are ignored
    assert parse_completion(DOC_BASIC_OUTPUT.replace("<|end|><|start|>", "<|end|>\n<|start|>")) == parse_completion(
        DOC_BASIC_OUTPUT
    )
    assert parse_completion("") == []
    # token ids without a tokenizer
    with pytest.raises(ValueError, match="tokenizer"):
        parse_completion([1, 2, 3])


# ----------------------------------------------------------------------------- random round trips
_CHANNELS = ["analysis", "commentary", "final"]


def _random_text(rng, allow_format_tokens=False):
    alphabet = string.ascii_letters + string.digits + string.punctuation + " \n\t" + "é日🙂"
    parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))]
    if allow_format_tokens and rng.random() < 0.3:
        parts.insert(rng.randint(0, 1), rng.choice(["<|end|>", "<|start|>", "<|message|>", "<|return|>"]))
    return "".join(parts)


def _random_conversation(rng, allow_format_tokens=False):
    msgs = []
    if rng.random() < 0.5:
        msgs.append(Message.developer("d" + _random_text(rng, allow_format_tokens)))
    for _ in range(rng.randint(1, 6)):
        kind = rng.choice(["user", "assistant", "assistant", "call", "result"])
        txt = _random_text(rng, allow_format_tokens)
        if kind == "user":
            msgs.append(Message.user(txt))
        elif kind == "assistant":
            msgs.append(Message.assistant(txt, channel=rng.choice(_CHANNELS)))
        elif kind == "call":
            ct = rng.choice([None, "<|constrain|>json", "json"])
            channel = rng.choice(["commentary", "analysis"])
            msgs.append(Message("assistant", txt, channel=channel, recipient="functions.f_1", content_type=ct))
        else:
            msgs.append(Message.tool_result(rng.choice(["functions.f_1", "browser.search", "python"]), txt))
    return msgs


def test_round_trip_text_random():
    rng = random.Random()
    for _ in range(200):
        msgs = _random_conversation(rng)
        text = render_conversation(msgs, include_system=False, add_generation_prompt=False, drop_analysis=False)
        assert parse_completion(text, role=None, strict=True) == msgs, text
        # with the generated system message in front
        full = render_conversation(msgs, add_generation_prompt=False, drop_analysis=False)
        parsed = parse_completion(full, role=None, strict=True)
        assert parsed[0].role == "system" and parsed[1:] == msgs


@pytest.fixture(scope="module")
def tiny_tok():
    return build_tiny_tokenizer(1024)


def test_round_trip_ids_tiny_tokenizer(tiny_tok):
    rng = random.Random()
    ids_of = H.special_token_ids(tiny_tok)
    assert all(i < 1024 for i in ids_of.values())
    assert H.stop_token_ids(tiny_tok) == (ids_of["<|return|>"], ids_of["<|call|>"])
    for _ in range(100):
        # content may even contain format-token strings: as ids they stay plain text
        msgs = _random_conversation(rng, allow_format_tokens=True)
        kw = dict(include_system=False, add_generation_prompt=False, drop_analysis=False)
        ids = H.render_conversation_ids(tiny_tok, msgs, **kw)
        assert all(0 <= i < tiny_tok.vocab_size for i in ids)
        n_special = sum(i in ids_of.values() for i in ids)
        n_expected = sum(3 + (m.channel is not None) + (m.content_type or "").startswith("<|constrain|>") for m in msgs)
        assert n_special == n_expected  # only the structure produces special ids
        assert tiny_tok.decode(ids) == render_conversation(msgs, **kw)
        assert parse_completion(ids, tiny_tok, role=None, strict=True) == msgs


def test_render_ids_prompt_and_parse_completion_ids(tiny_tok):
    ids = H.render_conversation_ids(tiny_tok, [Message.user("What is 2 + 2?")], current_date="2025-06-28")
    start = tiny_tok.special_token_id("<|start|>")
    last_start = len(ids) - 1 - ids[::-1].index(start)
    assert tiny_tok.decode(ids[last_start + 1 :]) == "assistant"
    assert tiny_tok.decode(ids) == render_conversation([Message.user("What is 2 + 2?")], current_date="2025-06-28")
    completion_ids = tiny_tok.encode(DOC_TOOL_CALL_OUTPUT)
    assert completion_ids[-1] in H.stop_token_ids(tiny_tok)
    assert parse_completion(completion_ids, tiny_tok) == parse_completion(DOC_TOOL_CALL_OUTPUT)
    import numpy as np

    assert parse_completion(np.asarray(completion_ids), tiny_tok) == parse_completion(DOC_TOOL_CALL_OUTPUT)


def test_parse_random_ids_never_raises(tiny_tok):
    """A random-weight model emits arbitrary ids: non-strict parsing must always cope."""
    rng = random.Random()
    specials = list(H.special_token_ids(tiny_tok).values())
    for _ in range(300):
        ids = [
            rng.choice(specials) if rng.random() < 0.3 else rng.randrange(tiny_tok.vocab_size + 8)
            for _ in range(rng.randint(0, 40))
        ]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", H.HarmonyParseWarning)
            msgs = parse_completion(ids, tiny_tok)
        assert all(isinstance(m, Message) for m in msgs)
    # ids past the tokenizer (padded model vocabulary) decode as U+FFFD
    ids = tiny_tok.encode("<|channel|>final<|message|>ab") + [tiny_tok.vocab_size + 3]
    assert parse_completion(ids, tiny_tok) == [Message.assistant("ab\ufffd")]


def test_raw_tokenizers_object_is_accepted(tiny_tok):
    raw = tiny_tok.backend
    msgs = [Message.user("a <|end|> b"), Message.assistant("c")]
    kw = dict(include_system=False, add_generation_prompt=False)
    ids = H.render_conversation_ids(raw, msgs, **kw)
    assert ids == H.render_conversation_ids(tiny_tok, msgs, **kw)
    assert parse_completion(ids, raw, role=None) == msgs


def test_own_system_message_with_instructions_keeps_order():
    text = render_conversation([Message("system", "S"), Message.user("u")], instructions="I")
    assert text == (
        "<|start|>system<|message|>S<|end|><|start|>developer<|message|># Instructions\n\nI<|end|>"
        "<|start|>user<|message|>u<|end|><|start|>assistant"
    )


def test_special_token_ids_requires_harmony_tokens():
    import tokenizers
    from tokenizers import models

    bare = tokenizers.Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    with pytest.raises(ValueError, match="lacks harmony special tokens"):
        H.special_token_ids(bare)


# ----------------------------------------------------------------------------- real o200k_harmony tokenizer
# The docs' StreamableParser example: the token ids of DOC_BASIC_OUTPUT in o200k_harmony.
DOC_BASIC_OUTPUT_IDS = [
    200005, 35644, 200008, 1844, 31064, 25, 392, 4827, 382, 220, 17, 659, 220, 17, 16842, 12295, 81645, 13,
    51441, 6052, 13, 200007, 200006, 173781, 200005, 17196, 200008, 17, 659, 220, 17, 314, 220, 19, 13, 200002,
]


@pytest.fixture(scope="module")
def real_tok(request):
    """GPTOSS_TOKENIZER_JSON's tokenizer.json if set, else the official o200k_harmony encoding (openai-harmony)
    seen through the tokenizer interface."""
    import os

    path = os.environ.get("GPTOSS_TOKENIZER_JSON")
    if not path:
        _, enc = request.getfixturevalue("oh")
        return _OHTokenizer(enc)
    from gptoss_jax.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_real_tokenizer_documented_ids(real_tok, monkeypatch):
    monkeypatch.setenv("GPTOSS_JAX_HARMONY_REFERENCE", "0")
    assert H.special_token_ids(real_tok) == H.SPECIAL_TOKENS
    assert real_tok.encode(DOC_BASIC_OUTPUT) == DOC_BASIC_OUTPUT_IDS
    assert real_tok.decode(DOC_BASIC_OUTPUT_IDS) == DOC_BASIC_OUTPUT
    assert parse_completion(DOC_BASIC_OUTPUT_IDS, real_tok) == parse_completion(DOC_BASIC_OUTPUT)
    ids = H.render_conversation_ids(real_tok, [Message.user("What is 2 + 2?")], include_system=False)
    assert real_tok.decode(ids) == "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant"
    assert ids[-2:] == [200006, 173781]  # "<|start|>" "assistant"


# ----------------------------------------------------------------------------- live cross-check
@pytest.fixture(scope="module")
def oh(tmp_path_factory):
    openai_harmony = pytest.importorskip("openai_harmony")  # in the test extra: present in CI
    pytest.importorskip("bpe_openai")
    from gptoss_jax.harmony_reference import load_encoding

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("TIKTOKEN_ENCODINGS_BASE", raising=False)
        enc = load_encoding(tmp_path_factory.mktemp("tiktoken"))
    return openai_harmony, enc


def test_reference_vocab_is_unpacked_verified_and_repaired(tmp_path, monkeypatch):
    pytest.importorskip("bpe_openai")
    from gptoss_jax import harmony_reference as R

    monkeypatch.delenv(R.ENV, raising=False)
    folder = R.o200k_vocab_dir(tmp_path)
    assert folder == tmp_path and R._sha256(tmp_path / R.O200K_FILE) == R.O200K_SHA256
    assert R.O200K_SHA256.startswith("446a9538") and R.O200K_SHA256.endswith("1a2d")
    assert [p.name for p in tmp_path.iterdir()] == [R.O200K_FILE]  # no temporary file left
    (tmp_path / R.O200K_FILE).write_bytes(b"tampered")  # a bad cached copy is replaced, not used
    assert R._sha256(R.o200k_vocab_dir(tmp_path) / R.O200K_FILE) == R.O200K_SHA256
    bad = tmp_path / "env"
    bad.mkdir()
    (bad / R.O200K_FILE).write_bytes(b"not the vocabulary")
    monkeypatch.setenv(R.ENV, str(bad))  # a folder the user named must hold the official file
    with pytest.raises(R.HarmonyReferenceError, match="SHA-256"):
        R.o200k_vocab_dir(tmp_path)


def _to_oh(openai_harmony, m: Message):
    from gptoss_jax.harmony_reference import to_harmony_message
    return to_harmony_message(openai_harmony, m)


class _OHTokenizer:
    """The reference encoding seen through the tokenizer interface harmony.py uses."""

    def __init__(self, enc):
        self.enc = enc

    def token_to_id(self, t):
        ids = self.enc.encode(t, allowed_special="all")
        return ids[0] if len(ids) == 1 else None

    def encode(self, text, allow_special=True):
        return self.enc.encode(text, allowed_special="all" if allow_special else set(), disallowed_special=())

    def decode(self, ids, skip_special=False):
        return self.enc.decode_utf8(ids)


def test_cross_check_openai_harmony(oh, monkeypatch):
    openai_harmony, enc = oh
    monkeypatch.setenv("GPTOSS_JAX_HARMONY_REFERENCE", "0")  # our renderer, not the official one, is under test
    rng = random.Random()
    tok = _OHTokenizer(enc)
    assert {k: tok.token_to_id(k) for k in H.SPECIAL_TOKENS} == H.SPECIAL_TOKENS
    assert set(enc.stop_tokens_for_assistant_actions()) == set(H.STOP_TOKEN_IDS)
    for _ in range(60):
        msgs = [m for m in _random_conversation(rng) if m.role != "developer"]
        reasoning = rng.choice(H.REASONING_LEVELS)
        date = rng.choice([None, "2025-06-28"])
        effort = openai_harmony.ReasoningEffort(reasoning.capitalize())
        sys_content = openai_harmony.SystemContent.new().with_reasoning_effort(effort)
        if date:
            sys_content = sys_content.with_conversation_start_date(date)
        convo = openai_harmony.Conversation.from_messages(
            [openai_harmony.Message.from_role_and_content(openai_harmony.Role.SYSTEM, sys_content)]
            + [_to_oh(openai_harmony, m) for m in msgs]
        )
        ref_ids = enc.render_conversation_for_completion(convo, openai_harmony.Role.ASSISTANT)
        kw = dict(reasoning=reasoning, current_date=date, drop_analysis="openai_harmony")
        assert H.render_conversation_ids(tok, msgs, **kw) == ref_ids
        assert render_conversation(msgs, **kw) == enc.decode_utf8(ref_ids)
        # parse: the reference parser and ours agree on an assistant completion
        completion = [m for m in msgs if m.role == "assistant"]
        if completion:
            kw = dict(include_system=False, add_generation_prompt=False, drop_analysis=False)
            text = render_conversation(completion, **kw)[len("<|start|>assistant"):]
            ref_ids = enc.encode(text, allowed_special="all")
            ref = enc.parse_messages_from_completion_tokens(ref_ids, openai_harmony.Role.ASSISTANT)
            ours = parse_completion(text)
            assert [(m.author.role.value, m.channel, m.recipient, m.content_type, m.content[0].text) for m in ref] == [
                (m.role, m.channel, m.recipient, m.content_type, m.content) for m in ours
            ]


def test_cross_check_tools_and_developer(oh, monkeypatch):
    openai_harmony, enc = oh
    monkeypatch.setenv("GPTOSS_JAX_HARMONY_REFERENCE", "0")
    specs = [t.get("function", t) for t in DOC_TOOLS + [_EXTRA_TOOL]]
    descriptions = [
        openai_harmony.ToolDescription.new(t["name"], t["description"], parameters=t.get("parameters")) for t in specs
    ]
    dev = (
        openai_harmony.DeveloperContent.new()
        .with_instructions("Use a friendly tone.")
        .with_function_tools(descriptions)
    )
    sys_content = openai_harmony.SystemContent.new().with_conversation_start_date("2025-06-28")
    convo = openai_harmony.Conversation.from_messages(
        [
            openai_harmony.Message.from_role_and_content(openai_harmony.Role.SYSTEM, sys_content),
            openai_harmony.Message.from_role_and_content(openai_harmony.Role.DEVELOPER, dev),
            openai_harmony.Message.from_role_and_content(openai_harmony.Role.USER, "hi"),
        ]
    )
    ref = enc.decode_utf8(enc.render_conversation_for_completion(convo, openai_harmony.Role.ASSISTANT))
    ours = render_conversation(
        [Message.user("hi")],
        current_date="2025-06-28",
        instructions="Use a friendly tone.",
        tools=DOC_TOOLS + [_EXTRA_TOOL],
    )
    assert ours == ref


# Exercises the less common schema features of the tools renderer.
_EXTRA_TOOL = {
    "name": "misc",
    "description": "Line one.\nLine two.",
    "parameters": {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "default": 3},
            "flag": {"type": "boolean", "nullable": True},
            "mode": {"type": "string", "default": "fast"},
            "nested": {"type": "object", "description": "A nested obj", "properties": {"a": {"type": "number"}}},
            "choice": {
                "description": "pick",
                "oneOf": [{"type": "string", "description": "pick"}, {"type": "number", "default": 1}],
            },
            "other": {
                "description": "either",
                "oneOf": [{"type": "string"}, {"type": "null", "description": "nothing"}],
            },
            "multi": {"type": ["string", "integer"]},
            "t": {"title": "Title", "type": "string", "examples": ["x", "y"]},
            "obj": {"type": "object", "properties": {"x": {"type": "array"}}, "default": {"x": ["é"]}},
        },
    },
}


def test_tools_section_extra_schema_features():
    text = H.tools_section([_EXTRA_TOOL])
    assert "// Line one.\n// Line two.\ntype misc = (_: {\n" in text
    assert "n?: number, // default: 3\n" in text
    assert "flag?: boolean | null,\n" in text
    assert 'mode?: string, // default: "fast"\n' in text
    assert "choice?:\n | string\n | number // default: 1\n,\n" in text
    assert "// either\nother?:\n | string\n | any // nothing\n,\n" in text
    assert "multi?: string | number,\n" in text
    assert '// Title\n//\n// Examples:\n// - "x"\n// - "y"\nt?: string,\n' in text
    assert text.endswith("} // namespace functions")


# ----------------------------------------------------------------------------- nothing dropped
_junk = st.text(alphabet=string.ascii_letters + string.digits + " .,!é日", min_size=1, max_size=12).filter(
    lambda t: t.strip())


@settings(max_examples=200, deadline=None)
@given(junk=_junk, where=st.sampled_from(["between", "after", "broken_header", "header_cut_by_end", "tail_header",
                                          "no_role_header"]))
def test_malformed_output_is_surfaced_never_dropped(junk, where):
    """Model output in any malformed place comes back (as text) with a HarmonyParseWarning; strict mode raises."""
    good = "<|channel|>analysis<|message|>think<|end|>"
    completion = {
        "between": f"{good}{junk}<|start|>assistant<|channel|>final<|message|>ok<|return|>",
        "after": f"{good}{junk}",
        "broken_header": f"{good}<|start|>assistant<|channel|>final {junk}<|start|>assistant<|channel|>final"
                         f"<|message|>ok<|return|>",
        "header_cut_by_end": f"{good}<|start|>assistant<|channel|>{junk}<|end|>",
        "tail_header": f"{good}<|start|>assistant<|channel|>final {junk}",
        "no_role_header": f"<|start|>{junk}<|message|>x<|end|>",
    }[where]
    role = None if where == "no_role_header" else "assistant"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        msgs = parse_completion(completion, role=role)
    shown = " ".join(str(v) for m in msgs for v in m.to_dict().values())
    assert junk.strip() in shown or junk.split()[-1] in shown, (completion, msgs)
    if where != "no_role_header":  # a header starting with an unknown word is a tool's output: well formed
        assert any(issubclass(w.category, H.HarmonyParseWarning) for w in caught)
        with pytest.raises(HarmonyParseError):
            parse_completion(completion, role=role, strict=True)


def test_o200k_tokenizer_renders_through_openai_harmony(oh, monkeypatch, tiny_tok):
    """For the real o200k_harmony tokenizer the official renderer produces the prompt ids (where it expresses the
    options); ours stays for other tokenizers and options, and both give the same ids."""
    from gptoss_jax import harmony_reference as R

    _, enc = oh
    monkeypatch.setattr(R, "_ENCODING", enc)
    calls = []
    real_render = enc.render_conversation_for_completion

    class Spy:
        def __getattr__(self, name):
            return getattr(enc, name)

        def render_conversation_for_completion(self, *a):
            calls.append(1)
            return real_render(*a)

    monkeypatch.setattr(R, "_ENCODING", Spy())
    tok = _OHTokenizer(enc)
    rng = random.Random()
    for _ in range(20):
        msgs = [m for m in _random_conversation(rng) if m.role != "developer"]
        kw = dict(reasoning=rng.choice(H.REASONING_LEVELS), current_date=rng.choice([None, "2025-06-28"]),
                  instructions=rng.choice([None, "Be brief."]), tools=rng.choice([None, DOC_TOOLS]))
        n = len(calls)
        official = H.render_conversation_ids(tok, msgs, **kw)
        used = len(calls) > n
        # used exactly when our drop policy and openai-harmony's agree on this conversation
        assert used == (H._drop_mask(msgs, True) == H._drop_mask(msgs, "openai_harmony"))
        monkeypatch.setenv("GPTOSS_JAX_HARMONY_REFERENCE", "0")
        assert H.render_conversation_ids(tok, msgs, **kw) == official
        monkeypatch.delenv("GPTOSS_JAX_HARMONY_REFERENCE")
    assert calls
    n = len(calls)
    H.render_conversation_ids(tiny_tok, [Message.user("hi")])  # not o200k: ours
    H.render_conversation_ids(tok, [Message.user("hi")], model_identity="You are X.")  # not expressible: ours
    assert len(calls) == n


def test_o200k_completion_ids_parse_through_openai_harmony(oh, monkeypatch):
    """Well-formed completions of the real tokenizer are parsed by the official parser, with the same result as
    ours; malformed ones fall back to ours, which keeps the output as text."""
    from gptoss_jax import harmony_reference as R

    _, enc = oh
    monkeypatch.setattr(R, "_ENCODING", enc)
    tok = _OHTokenizer(enc)
    used = []
    real = R.parse_ids
    monkeypatch.setattr(R, "parse_ids", lambda *a: used.append(r := real(*a)) or r)
    rng = random.Random()
    for _ in range(30):
        completion = [m for m in _random_conversation(rng) if m.role == "assistant"]
        if not completion:
            continue
        kw = dict(include_system=False, add_generation_prompt=False, drop_analysis=False)
        text = render_conversation(completion, **kw)[len("<|start|>assistant"):]
        ids = enc.encode(text, allowed_special="all")
        official = parse_completion(ids, tok)
        assert used[-1] is not None and official == used[-1]
        monkeypatch.setenv("GPTOSS_JAX_HARMONY_REFERENCE", "0")
        assert parse_completion(ids, tok) == official == parse_completion(text)
        monkeypatch.delenv("GPTOSS_JAX_HARMONY_REFERENCE")
    junk = enc.encode("<|channel|>final<|message|>ok<|end|>stray words", allowed_special="all")
    with pytest.warns(H.HarmonyParseWarning):
        msgs = parse_completion(junk, tok)
    assert "stray words" in "".join(m.content for m in msgs)
