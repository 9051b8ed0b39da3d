"""`gptoss-jax serve`: the real server on 127.0.0.1 (uvicorn in a thread) talked to with the official openai client and
httpx; references are the same prompts run alone through generate / chat, and full-forward logits for logprobs."""

import concurrent.futures
import json
import socket
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

import gptoss_jax  # noqa: E402
from gptoss_jax import harmony  # noqa: E402
from gptoss_jax.config import GptOssConfig  # noqa: E402
from gptoss_jax.generate import SamplingParams  # noqa: E402
from gptoss_jax.hf_loader import save_hf_checkpoint  # noqa: E402
from gptoss_jax.model import GptOss, params_of  # noqa: E402
from gptoss_jax.serve.cli import build  # noqa: E402
from gptoss_jax.serve.engine import Delta, Engine, Finished, QueueFull, Request, ShuttingDown  # noqa: E402
from gptoss_jax.serve.openai_api import HarmonyToOpenAI, create_app  # noqa: E402
from gptoss_jax.testing import build_tiny_tokenizer  # noqa: E402

MAX_SEQ_LEN = 512
NAME = "tiny-gpt-oss"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    tok = build_tiny_tokenizer(1024)
    config = GptOssConfig.from_preset("tiny").replace(vocab_size=tok.vocab_size, num_hidden_layers=2, layer_types=())
    path = tmp_path_factory.mktemp("serve_ckpt")
    save_hf_checkpoint(params_of(GptOss(config, dtype=jnp.float32, rngs=nnx.Rngs(5))), config, path)
    tok.save(path)
    return gptoss_jax.load(path, dtype="float32", max_seq_len=MAX_SEQ_LEN)


class Server:
    """uvicorn on 127.0.0.1 at a free port, in a thread; stopped by close() (the app's lifespan stops the engine)."""

    def __init__(self, app):
        import uvicorn
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{self.port}"

    def client(self, **kw):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, timeout=300, **kw)

    def close(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def server(model):
    engine, app = build(model, max_batch=4, chunk_size=4, prefill_chunk=64, model_name=NAME, request_timeout=120)
    s = Server(app)
    s.engine = engine
    yield s
    s.close()
    assert not engine._thread.is_alive(), "the scheduler thread outlived the server"


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat_reference(model, harmony_messages, max_new_tokens, **kw):
    """The same conversation run alone through InferenceModel.chat (greedy), converted like the server does."""
    res = model.chat(harmony_messages, reasoning=kw.pop("reasoning", "medium"), max_new_tokens=max_new_tokens,
                     temperature=0.0, **kw)
    conv = HarmonyToOpenAI(model.tokenizer)
    conv.update(res.tokens, final=True)
    return res, conv.message()


# ---------------------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    r = httpx.get(server.url + "/health")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    text = httpx.get(server.url + "/metrics").text
    for name in ("gptoss_requests_total", "gptoss_queue_length", "gptoss_batch_occupancy",
                 "gptoss_time_to_first_token_seconds_bucket", "gptoss_generation_tokens_total"):
        assert name in text, name


def test_chat_plain_equals_chat_alone(model, client):
    resp = client.chat.completions.create(model=NAME, messages=[{"role": "system", "content": "Be brief."},
                                                                {"role": "user", "content": "What is 2 + 2?"}],
                                          temperature=0, max_tokens=24, reasoning_effort="low")
    res, want = chat_reference(model, [harmony.Message.user("What is 2 + 2?")], 24, reasoning="low",
                               instructions="Be brief.")
    msg = resp.choices[0].message
    assert msg.content == want["content"]
    assert getattr(msg, "reasoning_content", None) == want.get("reasoning_content")
    assert resp.usage.completion_tokens == len(res.tokens)
    assert resp.usage.prompt_tokens == len(res.prompt_tokens)
    assert resp.choices[0].finish_reason == ("length" if res.finish_reason == "length" else "stop")


def test_chat_streaming_matches_non_streaming(model, client):
    kw = dict(model=NAME, messages=[{"role": "user", "content": "Hello, world! How are you today?"}], temperature=0,
              max_tokens=40)
    whole = client.chat.completions.create(**kw)
    content, reasoning, finish, usage, n = "", "", None, None, 0
    for chunk in client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        n += 1
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            content += c.delta.content or ""
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            finish = c.finish_reason or finish
    assert n > 3
    assert content == (whole.choices[0].message.content or "")
    assert reasoning == (getattr(whole.choices[0].message, "reasoning_content", None) or "")
    assert finish == whole.choices[0].finish_reason
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_chat_can_omit_reasoning(model):
    conv = HarmonyToOpenAI(model.tokenizer, include_reasoning=False)
    ids = model.tokenizer.encode("<|channel|>analysis<|message|>secret thoughts<|end|><|start|>assistant"
                                 "<|channel|>final<|message|>The answer is 4.<|return|>")
    deltas = [d for t in ids for d in conv.update([t])] + conv.update([], final=True)
    assert "".join(d.get("content", "") for d in deltas) == "The answer is 4."
    assert not any("reasoning_content" in d for d in deltas)
    assert conv.message() == {"role": "assistant", "content": "The answer is 4."}


def test_chat_stop_strings_cut_the_content(model):
    """Chat deltas come from token ids: a tail that may start a stop string is held back, and the text is cut where
    one begins (streamed and whole answers agree)."""
    ids = model.tokenizer.encode("<|channel|>final<|message|>The answer is 4. Done")
    conv = HarmonyToOpenAI(model.tokenizer, stop_strings=("is 4", "zz"))
    deltas = [d for t in ids for d in conv.update([t])] + conv.update([], final=True)
    assert "".join(d.get("content", "") for d in deltas) == "The answer "
    assert conv.message()["content"] == "The answer "


# ---------------------------------------------------------------------------------------------------------- tools
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL_COMPLETION = ("<|channel|>analysis<|message|>Need the weather.<|end|><|start|>assistant<|channel|>commentary "
                   "to=functions.get_weather <|constrain|>json<|message|>{\"city\": \"Paris\"}<|call|>")


def test_harmony_tool_call_to_openai_deltas(model):
    """A harmony tool call, fed token by token, becomes one OpenAI tool_call (name, id once, arguments in pieces)."""
    ids = model.tokenizer.encode(CALL_COMPLETION)
    conv = HarmonyToOpenAI(model.tokenizer)
    deltas = [d for t in ids for d in conv.update([t])] + conv.update([], final=True)
    calls = [tc for d in deltas for tc in d.get("tool_calls", [])]
    assert calls[0]["function"]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert all("name" not in tc.get("function", {}) and "id" not in tc for tc in calls[1:])
    assert "".join(tc["function"]["arguments"] for tc in calls) == '{"city": "Paris"}'
    assert "".join(d.get("reasoning_content", "") for d in deltas) == "Need the weather."
    msg = conv.message()
    assert msg["content"] is None and msg["reasoning_content"] == "Need the weather."
    assert msg["tool_calls"] == [{"id": calls[0]["id"], "type": "function",
                                  "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]


class ScriptedEngine:
    """Stands in for the scheduler: answers every request with fixed token ids (what a trained model would emit),
    so the HTTP layer's tool-call path is tested end to end with the openai client. Or raises `fail` on submit."""

    max_batch, queue_length, active_slots, stopping = 1, 0, 0, False

    def __init__(self, model, completion: str, fail: Exception | None = None):
        from gptoss_jax.serve.engine import Metrics
        self.ids, self.fail, self.model, self.metrics = model.tokenizer.encode(completion), fail, model, Metrics()
        self.prompts = []

    def submit(self, req: Request):
        if self.fail is not None:
            raise self.fail
        self.prompts.append(req.prompt)

        def run():
            for t in self.ids:
                req.emit(Delta([t], "", None))
            req.emit(Finished("stop_token", list(self.ids), "", len(req.prompt), 0.0))
        threading.Thread(target=run, daemon=True).start()

    def shutdown(self):
        pass


def test_tool_call_round_trip(model, client):
    """Tool call out (scripted completion through the HTTP layer, plain and streamed), then the round trip's second
    half: the assistant's tool_calls and the tool message go back in and the answer equals chat alone on the harmony
    conversation with the call and its result."""
    scripted = Server(create_app(model, ScriptedEngine(model, CALL_COMPLETION), model_name=NAME))
    try:
        c = scripted.client()
        user = {"role": "user", "content": "What is the weather like in Paris?"}
        resp = c.chat.completions.create(model=NAME, messages=[user], tools=TOOLS)
        choice = resp.choices[0]
        assert choice.finish_reason == "tool_calls"
        [call] = choice.message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
        args, finish = "", None
        for chunk in c.chat.completions.create(model=NAME, messages=[user], tools=TOOLS, stream=True):
            for ch in chunk.choices:
                for tc in ch.delta.tool_calls or []:
                    args += tc.function.arguments or ""
                finish = ch.finish_reason or finish
        assert json.loads(args) == {"city": "Paris"} and finish == "tool_calls"
    finally:
        scripted.close()

    messages = [user, {"role": "assistant", "content": None, "reasoning_content": "Need the weather.",
                       "tool_calls": [call.model_dump()]},
                {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 20, "sky": "sunny"}'}]
    resp = client.chat.completions.create(model=NAME, messages=messages, tools=TOOLS, temperature=0, max_tokens=16)
    conversation = [harmony.Message.user(user["content"]),
                    harmony.Message("assistant", "Need the weather.", channel="analysis"),
                    harmony.Message.tool_call("functions.get_weather", call.function.arguments),
                    harmony.Message.tool_result("functions.get_weather", '{"temperature": 20, "sky": "sunny"}')]
    res, want = chat_reference(model, conversation, 16, tools=[t["function"] for t in TOOLS])
    assert resp.usage.prompt_tokens == len(res.prompt_tokens)
    assert resp.choices[0].message.content == want["content"]
    assert resp.usage.completion_tokens == len(res.tokens)


def test_tools_are_rendered_into_the_prompt(model):
    engine = ScriptedEngine(model, "<|channel|>final<|message|>ok<|return|>")
    s = Server(create_app(model, engine, model_name=NAME))
    try:
        s.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hi"}], tools=TOOLS,
                                           reasoning_effort="high")
    finally:
        s.close()
    want = harmony.render_conversation_ids(model.tokenizer, [harmony.Message.user("hi")], reasoning="high",
                                           tools=[t["function"] for t in TOOLS])
    assert engine.prompts == [want]
    assert "namespace functions" in model.tokenizer.decode(want)


# ---------------------------------------------------------------------------------------------------------- completions
@pytest.mark.slow  # ~40 s on a loaded 2-core machine (the full-forward reference compiles)
def test_completions_equal_generate_and_logprobs_match_logits(model, client):
    rng = np.random.default_rng(0)
    prompt = rng.integers(9, model.tokenizer.vocab_size, size=21).tolist()
    resp = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12, logprobs=3)
    ref = model.generate(prompt, temperature=0.0, max_new_tokens=12)
    ch = resp.choices[0]
    assert ch.text == ref.text and resp.usage.completion_tokens == len(ref.tokens)
    # logprobs: log_softmax of the full-forward logits at each generated position (float64 reference)
    logits = np.asarray(model.logits(prompt + ref.tokens), np.float64)
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = [logp[len(prompt) - 1 + i, t] for i, t in enumerate(ref.tokens)]
    np.testing.assert_allclose(ch.logprobs.token_logprobs, want, atol=1e-4)
    for i, top in enumerate(ch.logprobs.top_logprobs):
        assert len(top) == 3
        best = np.sort(logp[len(prompt) - 1 + i])[::-1][:3]
        np.testing.assert_allclose(sorted(top.values(), reverse=True), best, atol=1e-4)


def test_completions_text_stream_and_stop(model, client):
    prompt = "The quick brown fox"
    whole = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20)
    assert whole.choices[0].text == model.generate(prompt, temperature=0.0, max_new_tokens=20).text
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=NAME, prompt=prompt, temperature=0, max_tokens=20, stream=True) if c.choices)
    assert streamed == whole.choices[0].text
    text = whole.choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    if stop.strip():
        cut = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=20, stop=[stop])
        assert cut.choices[0].text == text[:text.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_responses_minimal(model, client):
    resp = client.responses.create(model=NAME, input="What is 2 + 2?", max_output_tokens=16, temperature=0,
                                   reasoning={"effort": "low"})
    res, want = chat_reference(model, [harmony.Message.user("What is 2 + 2?")], 16, reasoning="low")
    assert resp.usage.output_tokens == len(res.tokens)
    texts = [c.text for o in resp.output if o.type == "message" for c in o.content]
    assert "".join(texts) == (want["content"] or "")


# ---------------------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("body,status,param", [
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "robot", "content": "hi"}]}, 400, "messages[0].role"),
    ({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]}, 400, "messages[0].tool_call_id"),
    ({"messages": [{"role": "user", "content": "hi"}], "reasoning_effort": "max"}, 400, "reasoning_effort"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-5"}, 404, "model"),
    ({"messages": [{"role": "user", "content": "hi " * 800}]}, 413, None),
    # sampling fields: checked by SamplingParams.checked, the error names the OpenAI field
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "temperature": True}, 400, "temperature"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
    ({"messages": [{"role": "user", "content": "hi"}], "top_k": -2}, 400, "top_k"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": -1}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "seed": 1.5}, 400, "seed"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}, 400, "max_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 2.5}, 400, "max_completion_tokens"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": [""]}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": {"a": 1}}, 400, "stop"),
    ({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
])
def test_bad_chat_requests(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and "Traceback" not in r.text
    assert param is None or err["message"].startswith(param), err["message"]


def test_engine_checks_sampling_params_in_one_place(model):
    """Engine.submit validates a Request's SamplingParams with SamplingParams.checked (no second rule set): an
    invalid field is an InvalidParams naming it, before anything is queued; a valid one is normalised."""
    from gptoss_jax.serve.engine import InvalidParams
    engine = Engine(model, max_batch=1)  # not started: nothing runs
    for bad, field in ((dict(temperature=-1.0), "temperature"), (dict(top_p=0.0), "top_p"),
                       (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop_strings=("",)), "stop_strings"),
                       (dict(stop_token_ids=(10**9,)), "stop_token_ids"), (dict(seed=2**64), "seed")):
        with pytest.raises(InvalidParams) as e:
            engine.submit(Request([1, 2], lambda ev: None, params=SamplingParams(**bad)))
        assert e.value.field == field and field in str(e.value)
    assert engine.queue_length == 0
    req = Request([1, 2], lambda ev: None, params=SamplingParams(top_k=10**9, stop_strings="x"))
    engine.submit(req)
    assert req.params.top_k == model.config.vocab_size and req.params.stop_strings == ("x",)


def test_bad_requests_other(server, client):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.get(server.url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=NAME, prompt=[999_999], max_tokens=4)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=NAME, prompt="hi", max_tokens=4, echo=True)


@pytest.mark.parametrize("fail,status", [(QueueFull("full"), 429), (ShuttingDown("bye"), 503),
                                         (RuntimeError("boom /secret/path"), 500)])
def test_engine_refusals_become_status_codes(model, fail, status):
    s = Server(create_app(model, ScriptedEngine(model, "x", fail=fail), model_name=NAME))
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    finally:
        s.close()
    assert r.status_code == status
    if status == 500:  # a request id, never the exception text or a trace
        assert r.headers["x-request-id"] in r.json()["error"]["message"]
        assert "boom" not in r.text and "Traceback" not in r.text


# ---------------------------------------------------------------------------------------------------------- scheduler
def _collect(engine, prompt, *, logprobs=None, deadline=None, **sampling):
    events, done = [], threading.Event()

    def emit(ev):
        events.append(ev)
        if isinstance(ev, Finished):
            done.set()

    req = Request(prompt, emit, params=SamplingParams(**sampling), logprobs=logprobs, deadline=deadline)
    engine.submit(req)
    return req, events, done


@pytest.mark.slow  # ~40 s on a loaded 2-core machine (five generate references)
def test_scheduler_batch_company_does_not_change_greedy_tokens(model, server):
    """Greedy requests admitted together into the server's scheduler (one prefill call, one decode batch, slots
    reused): each equals its prompt run alone through generate."""
    engine = server.engine
    rng = np.random.default_rng(3)
    jobs = []
    for j in range(5):  # 5 requests, 4 slots: the fifth is admitted into a slot freed mid-stream
        prompt = rng.integers(9, model.tokenizer.vocab_size, size=int(rng.integers(4, 15))).tolist()
        jobs.append((prompt, *_collect(engine, prompt=prompt, max_new_tokens=8, temperature=0.0)))
    for prompt, req, events, done in jobs:
        assert done.wait(300)
        streamed = [t for e in events if isinstance(e, Delta) for t in e.tokens]
        assert events[-1].tokens == streamed == model.generate(prompt, max_new_tokens=8, temperature=0.0).tokens


@pytest.mark.slow
def test_scheduler_mixed_batch_equals_generate_alone(model):
    """Greedy and seeded-sampling rows of different lengths share the batch (more requests than slots, prompts
    longer than the prefill chunk): each equals its prompt run alone through generate, token for token."""
    engine = Engine(model, max_batch=4, chunk_size=4, prefill_chunk=32).start()
    rng = np.random.default_rng(1)
    jobs = []
    try:
        for j in range(7):
            prompt = rng.integers(9, model.tokenizer.vocab_size, size=int(rng.integers(3, 60))).tolist()
            kw = dict(temperature=0.0) if j % 2 == 0 else dict(temperature=0.9, top_p=0.9, seed=j)
            jobs.append((prompt, kw, *_collect(engine, prompt=prompt, max_new_tokens=10 + j, **kw)))
        for prompt, kw, req, events, done in jobs:
            assert done.wait(300)
            fin = events[-1]
            streamed = [t for e in events if isinstance(e, Delta) for t in e.tokens]
            ref = model.generate(prompt, max_new_tokens=req.params.max_new_tokens, **kw)
            assert fin.tokens == streamed == ref.tokens
    finally:
        engine.shutdown()


def test_scheduler_with_the_gpus_fixed_trip_count_loop_equals_generate_alone(model, monkeypatch):
    """The decode loop GPUs run (exactly chunk_size steps per call, no early exit: generate.decode_exits_early):
    rows that finish mid-chunk, greedy and seeded sampling, each equal to its prompt run alone through generate's
    early-exit loop."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(9, model.tokenizer.vocab_size, size=n).tolist() for n in (5, 11, 8)]
    kws = [dict(temperature=0.0, max_new_tokens=3), dict(temperature=0.9, top_p=0.9, seed=2, max_new_tokens=9),
           dict(temperature=0.0, max_new_tokens=6)]
    refs = [model.generate(p, **kw).tokens for p, kw in zip(prompts, kws)]
    monkeypatch.setattr(model.generator, "early_exit", False)
    engine = Engine(model, max_batch=4, chunk_size=4).start()
    try:
        jobs = [_collect(engine, prompt=p, **kw) for p, kw in zip(prompts, kws)]
        for ref, (_, events, done) in zip(refs, jobs):
            assert done.wait(300)
            streamed = [t for e in events if isinstance(e, Delta) for t in e.tokens]
            assert events[-1].tokens == streamed == ref
    finally:
        engine.shutdown()


def test_scheduler_cancel_timeout_queue_shutdown(model):
    engine = Engine(model, max_batch=1, max_queue=1, chunk_size=2).start()
    try:
        a, ev_a, done_a = _collect(engine, prompt=[5, 6, 7], max_new_tokens=200, temperature=0.0)
        while not any(isinstance(e, Delta) for e in ev_a):  # a holds the only slot
            time.sleep(0.01)
        b, ev_b, done_b = _collect(engine, prompt=[5, 6], max_new_tokens=4, temperature=0.0,
                                   deadline=time.monotonic() - 1)  # already expired: ends while queued
        with pytest.raises(QueueFull):  # b waits; max_queue=1
            engine.submit(Request([1], lambda e: None))
        a.cancel()
        assert done_a.wait(60) and ev_a[-1].reason == "cancelled" and len(ev_a[-1].tokens) < 200
        assert done_b.wait(60) and ev_b[-1].reason == "timeout" and ev_b[-1].tokens == []
        c, ev_c, done_c = _collect(engine, prompt=[9, 9], max_new_tokens=3, temperature=0.0)
        assert done_c.wait(120) and ev_c[-1].reason in ("length", "stop_token")
    finally:
        engine.shutdown()
    with pytest.raises(ShuttingDown):
        engine.submit(Request([1], lambda e: None))


@pytest.mark.slow
def test_concurrent_streaming_clients_equal_generate_alone(model, server):
    """64 concurrent streaming clients on 4 slots (queueing, admissions between decode chunks): each streamed text
    equals its prompt run alone through generate, with the same token count; the server stays up. Prints p50/p99
    TTFT and the aggregate rate (CPU, tiny model: a smoke number, not a benchmark)."""
    rng = np.random.default_rng(7)
    words = "the quick brown fox jumps over lazy dog hello world model token time little".split()
    clients = 64
    prompts = [" ".join(rng.choice(words, size=int(rng.integers(2, 12)))) for _ in range(clients)]
    client = server.client()

    def one(i):
        text, usage, t0, ttft = "", None, time.perf_counter(), None
        for c in client.completions.create(model=NAME, prompt=prompts[i], temperature=0, max_tokens=24,
                                           stream=True, stream_options={"include_usage": True}):
            if c.usage is not None:
                usage = c.usage
            if c.choices and ttft is None:  # the first token's chunk (its text may be held back: partial UTF-8)
                ttft = time.perf_counter() - t0
            text += "".join(ch.text for ch in c.choices)
        return text, usage, ttft

    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, range(clients)))
    wall = time.perf_counter() - t0
    for p, (text, usage, _) in zip(prompts, results):
        ref = model.generate(p, temperature=0.0, max_new_tokens=24)
        assert text == ref.text and usage.completion_tokens == len(ref.tokens)
    assert httpx.get(server.url + "/health").status_code == 200
    ttft = np.array([r[2] for r in results if r[2] is not None])
    print(f"\n{clients} clients: TTFT p50 {np.percentile(ttft, 50):.3f}s p99 {np.percentile(ttft, 99):.3f}s, "
          f"{sum(r[1].completion_tokens for r in results) / wall:.1f} tokens/s aggregate")


def test_request_timeout_is_504(model):
    """A request past its deadline: 504 JSON (plain), an error event then [DONE] (stream); the server stays up."""
    engine, app = build(model, max_batch=4, chunk_size=4, model_name=NAME, request_timeout=1e-6)
    s = Server(app)
    try:
        r = httpx.post(s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        with httpx.stream("POST", s.url + "/v1/completions", json={"prompt": "hi", "max_tokens": 4,
                                                                     "stream": True}) as r:
            lines = [line for line in r.iter_lines() if line]
        assert json.loads(lines[0][len("data: "):])["error"]["type"] == "timeout" and lines[-1] == "data: [DONE]"
        assert httpx.get(s.url + "/health").status_code == 200
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------------------- command
def test_serve_command_starts_answers_and_stops(model):
    """`gptoss-jax serve CKPT` in a subprocess: /health and /v1/models answer; SIGTERM ends it cleanly."""
    import os
    import signal
    import subprocess
    import sys
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "gptoss_jax.cli", "serve", model.source, "--port", str(port),
                             "--dtype", "float32", "--max-seq-len", "128", "--max-batch", "2", "--model-name", "m",
                             "--log-level", "warning"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.2)
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").json()["data"][0]["id"] == "m"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode in (0, 143), err[-2000:]
    assert "Traceback" not in err


def test_serve_command_bad_checkpoint_is_one_line(tmp_path):
    from gptoss_jax import cli
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        code = cli.main(["serve", str(tmp_path / "missing")])
    assert code == 2 and "missing" in buf.getvalue() and "Traceback" not in buf.getvalue()


def test_client_disconnect_cancels_the_request(server, client):
    """A streaming client that goes away mid-answer: its request is cancelled and its slot freed."""
    m = server.engine.metrics
    before = m.requests_finished["cancelled"]
    stream = client.completions.create(model=NAME, prompt="Once upon a time", temperature=0, max_tokens=400,
                                       stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while m.requests_finished["cancelled"] == before:
        assert time.monotonic() < deadline, "the request was not cancelled"
        time.sleep(0.05)
    while server.engine.active_slots:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.05)


def test_warmup_compiles_what_greedy_traffic_needs(model):
    """After warmup, greedy traffic neither traces nor compiles anything (an argument placed differently from
    warmup's — say an uncommitted first cache — would compile again without tracing)."""
    import copy

    from gptoss_jax.generate import TRACE_COUNTS
    engine = Engine(model, max_batch=4, chunk_size=4)
    # weights committed to a device, as a checkpoint loaded for a GPU (or onto a mesh) has them: then the calls'
    # outputs are committed too, and the first cache must be placed the same way
    engine.gen = copy.copy(engine.gen)
    engine.gen.state_leaves = jax.device_put(engine.gen.state_leaves, jax.devices()[0])
    engine.warmup(prompt_len=12)
    # the first call's cache and carry are placed like the calls' outputs (committed to the weights' device), else
    # the first call after warmup compiles again for them (seen with random int4 weights in bench_serve.py)
    for leaf in jax.tree.leaves((engine._new_cache(), engine._initial_carry())):
        assert leaf.committed and leaf.sharding == jax.tree.leaves(engine.gen.state_leaves)[0].sharding
    graph = model.generator.graph
    before = (TRACE_COUNTS[("serve_prefill", graph)], TRACE_COUNTS[("serve_decode", graph)])
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration"
        and threading.current_thread().name == "gptoss-serve-scheduler" else None)
    engine.start()
    try:
        for group in ((7,), (5, 9)):  # a lone request (the 1-row prefill: the first call on the fresh cache), two
            jobs = [_collect(engine, prompt=list(range(10, 10 + n)), max_new_tokens=6, temperature=0.0)
                    for n in group]
            for _, events, done in jobs:
                assert done.wait(120) and len(events[-1].tokens) >= 1
    finally:
        engine.shutdown()
    assert (TRACE_COUNTS[("serve_prefill", graph)], TRACE_COUNTS[("serve_decode", graph)]) == before
    assert compiles == []  # XLA compilations on the scheduler thread


def test_light_load_decodes_only_the_live_rows(model, monkeypatch):
    """With few busy slots the decode step runs on the live rows gathered into a small bucket (not all max_batch
    rows); warmup compiled every bucket (no compile under traffic) and each answer equals generate alone."""
    from gptoss_jax.generate import TRACE_COUNTS
    from gptoss_jax.serve import engine as engine_mod
    widths = []
    real = engine_mod._decode
    monkeypatch.setattr(engine_mod, "_decode",
                        lambda *a, **k: widths.append(len(a[6]) if k["compact"] else len(a[5])) or real(*a, **k))
    engine = Engine(model, max_batch=6, chunk_size=4)  # not a power of two: buckets 1, 2, 4, then all 6 rows
    engine.warmup(prompt_len=12)
    graph = model.generator.graph
    before = TRACE_COUNTS[("serve_decode", graph)]
    widths.clear()
    engine.start()
    try:
        prompts = [list(range(10, 10 + n)) for n in (5, 9, 7)]
        jobs = [_collect(engine, prompt=p, max_new_tokens=6, temperature=0.0) for p in prompts]
        for p, (_, events, done) in zip(prompts, jobs):
            assert done.wait(120)
            assert events[-1].tokens == model.generate(p, max_new_tokens=6, temperature=0.0).tokens
    finally:
        engine.shutdown()
    assert widths and max(widths) <= 4, widths  # ≤ 3 live rows: bucket 4 at most, never the 6-row step
    assert TRACE_COUNTS[("serve_decode", graph)] == before


# ---------------------------------------------------------------------------------------------------------- overlap
def test_overlap_reads_a_chunk_while_the_next_one_runs(model):
    """With overlap the host reads decode chunk k's tokens after chunk k + 1 was dispatched (the device has work
    while the host delivers); without it nothing is in flight when the host reads. Greedy answers are the same in
    both modes and equal each prompt run alone through generate."""
    prompts = [list(range(20, 20 + n)) for n in (6, 11, 3)]
    want = [model.generate(p, max_new_tokens=12, temperature=0.0).tokens for p in prompts]
    for overlap in (True, False):
        engine = Engine(model, max_batch=4, chunk_size=4, prefill_chunk=64, overlap=overlap)
        in_flight = []
        real = engine._process
        engine._process = lambda call: in_flight.append((call.kind, len(engine._pending))) or real(call)
        engine.start()
        try:
            jobs = [_collect(engine, prompt=p, max_new_tokens=12, temperature=0.0) for p in prompts]
            for w, (_, events, done) in zip(want, jobs):
                assert done.wait(120)
                assert events[-1].tokens == [t for e in events if isinstance(e, Delta) for t in e.tokens] == w
        finally:
            engine.shutdown()
        decode_reads = [n for kind, n in in_flight if kind == "decode"]
        assert decode_reads, in_flight
        if overlap:
            assert max(decode_reads) >= 1, in_flight
            assert engine.metrics.starved < engine.metrics.dispatches
        else:
            assert max(n for _, n in in_flight) == 0, in_flight


def test_tokens_past_a_stop_string_in_the_overlapped_chunk_are_dropped(model):
    """A stop string found in chunk k ends the row although chunk k + 1 already ran for it: nothing of chunk k + 1
    is streamed (streamed tokens and text equal generate with the same stop string), and the request that takes the
    slot next is unaffected (equals generate alone)."""
    prompt = [31, 7, 200, 45, 9, 300]
    full = model.generate(prompt, max_new_tokens=40, temperature=0.0)
    dec = model._decode_lenient
    stop = None
    for k in range(3, 12):  # a stop string that starts at token k's text and occurs nowhere before
        at = len(dec(full.tokens[:k]))
        cand = full.text[at:at + 3]
        if len(cand) == 3 and "\ufffd" not in cand and full.text.find(cand) == at:
            stop = cand
            break
    assert stop is not None, full.text
    ref = model.generate(prompt, max_new_tokens=40, temperature=0.0, stop_strings=[stop])
    assert ref.finish_reason == "stop_string" and len(full.tokens) > len(ref.tokens) + 8  # it would have gone on
    others = [list(range(40, 40 + n)) for n in (5, 8, 4, 7)]
    engine = Engine(model, max_batch=4, chunk_size=4, prefill_chunk=64).start()
    try:
        a, ev_a, done_a = _collect(engine, prompt=prompt, max_new_tokens=40, temperature=0.0, stop_strings=(stop,))
        jobs = [_collect(engine, prompt=p, max_new_tokens=10, temperature=0.0) for p in others]  # the 4th waits
        assert done_a.wait(120)
        fin = ev_a[-1]
        deltas = [e for e in ev_a if isinstance(e, Delta)]
        assert fin.reason == "stop_string" and fin.tokens == ref.tokens
        assert [t for e in deltas for t in e.tokens] == ref.tokens
        assert "".join(e.text for e in deltas) == fin.text == ref.text
        for p, (_, events, done) in zip(others, jobs):
            assert done.wait(120)
            assert events[-1].tokens == model.generate(p, max_new_tokens=10, temperature=0.0).tokens
    finally:
        engine.shutdown()


def test_metrics_expose_scheduler_timing(server, client):
    """/metrics carries the scheduler's timing counters, and they move with the work: a 12-token completion adds
    ≥ 11 model decode steps (the first token comes from the prefill), host and wait seconds, and dispatches."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape():
        out = {}
        for fam in text_string_to_metric_families(httpx.get(server.url + "/metrics").text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    before = scrape()
    client.completions.create(model=NAME, prompt=[40, 41, 42], max_tokens=12, temperature=0,
                              extra_body={"ignore_eos": True})
    after = scrape()

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after[key] - before.get(key, 0.0)

    assert delta("gptoss_decode_steps_total") >= 11
    assert delta("gptoss_decode_calls_total") >= 3  # chunk_size 4
    assert delta("gptoss_prefill_calls_total") >= 1
    assert delta("gptoss_scheduler_dispatches_total") >= 4
    assert delta("gptoss_scheduler_seconds_total", state="host") > 0
    assert delta("gptoss_scheduler_seconds_total", state="wait") > 0
    assert 0 <= delta("gptoss_scheduler_seconds_total", state="device_idle")


# ---------------------------------------------------------------------------------------------------------- mesh
@pytest.mark.multidevice
@pytest.mark.slow  # 15–80 s: a fresh process compiles the sharded steps
def test_serve_on_a_virtual_mesh_equals_generate_alone():
    """The scheduler on a (data 2, expert 2, tensor 2) mesh of 8 virtual CPU devices (tests/serve_mesh_worker.py,
    in its own process): 3 slots are padded to 4 (the data axis); greedy and seeded requests, prompts longer than
    the prefill chunk, more requests than slots — each served answer equals the prompt run alone through generate
    on the same model; after warmup the scheduler compiles only for new shapes or sampling modes (as many XLA
    compilations as traces: every call's outputs are laid out as warmup saw them)."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
           "PYTHONPATH": str(root) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "tests.serve_mesh_worker", "2,2,2"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    assert out["mesh"] == {"data": 2, "expert": 2, "tensor": 2} and out["max_batch"] == 4
    assert len(out["results"]) == 5
    for r in out["results"]:
        assert r["served"] == r["streamed"] == r["alone"] and r["reason"] == "length", r
    assert out["scheduler_compiles_after_warmup"] == out["scheduler_traces_after_warmup"], out


def test_newcomers_prefill_within_the_budget_while_rows_decode(model, monkeypatch):
    """With a prefill budget, while a row decodes, newcomers' prompts go in calls of at most that many tokens
    (rows × chunk length) with decode chunks in between, so the decoding row is never held up by a large prefill;
    every answer still equals generate alone."""
    from gptoss_jax.serve import engine as engine_mod
    calls = []
    real_prefill, real_decode = engine_mod._prefill_step, engine_mod._decode
    monkeypatch.setattr(engine_mod, "_prefill_step",
                        lambda *a, **k: calls.append(("prefill", a[6].shape)) or real_prefill(*a, **k))
    monkeypatch.setattr(engine_mod, "_decode", lambda *a, **k: calls.append(("decode", None)) or real_decode(*a, **k))
    engine = Engine(model, max_batch=4, chunk_size=2, prefill_chunk=8, prefill_budget=8).start()
    first = list(range(60, 65))
    others = [list(range(70 + 9 * j, 70 + 9 * j + n)) for j, n in enumerate((8, 7, 19))]  # the last: 3 chunks
    try:
        a = _collect(engine, prompt=first, max_new_tokens=40, temperature=0.0)
        while not any(isinstance(e, Delta) for e in a[1]):  # a is decoding
            time.sleep(0.01)
        jobs = [_collect(engine, prompt=p, max_new_tokens=6, temperature=0.0) for p in others]
        for p, (_, events, done) in zip([first] + others, [a] + jobs):
            assert done.wait(120)
            n = 40 if p is first else 6
            assert events[-1].tokens == model.generate(p, max_new_tokens=n, temperature=0.0).tokens
    finally:
        engine.shutdown()
    prefills = [i for i, (kind, _) in enumerate(calls) if kind == "prefill"]
    later = [i for i in prefills if i > calls.index(("decode", None))]  # while a decodes
    assert len(later) >= 5, calls  # 3 newcomers, the 19-token prompt in 3 chunks of ≤ 8
    for i in later:
        rows, width = calls[i][1]
        assert rows * width <= 8, calls
    for i, j in zip(later, later[1:]):  # one prefill call per iteration: a decode chunk between any two
        assert any(kind == "decode" for kind, _ in calls[i + 1:j]), calls
