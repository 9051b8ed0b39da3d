"""OpenAI-compatible endpoints over :class:`gptoss_jax.serve.engine.Engine` (FastAPI).

Endpoints (request/response shapes follow OpenAI's API reference and the ``openai`` Python client's models):
``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions``, ``POST /v1/responses`` (non-streaming,
minimal), ``GET /health``, ``GET /metrics`` (Prometheus text format).

Chat messages become harmony messages (:mod:`gptoss_jax.harmony`): ``system``/``developer`` messages become the
developer instructions, ``tools`` the ``functions`` namespace of the developer message, an assistant's
``tool_calls`` commentary messages addressed ``to=functions.NAME``, a ``tool`` message the tool's output
(``functions.NAME to=assistant``), ``reasoning_effort`` the system message's ``Reasoning:`` level. The completion is
parsed back: ``analysis`` → ``reasoning_content`` (left out with ``"include_reasoning": false``), messages to
``functions.*`` → ``tool_calls``, everything else → ``content``.

Errors are OpenAI-style JSON ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad argument (``param``
names it), 404 for an unknown model or path, 413 for a prompt over the context, 429 when the queue is full, 503 while
shutting down, 504 on a request timeout, 500 with the request id for internal errors (the trace goes to the log only).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import secrets
import time
import uuid
from typing import Any, AsyncIterator

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptoss_jax import harmony
from gptoss_jax.generate import GenerationError, SamplingParams, _holdback
from gptoss_jax.serve.engine import (MAX_TOP_LOGPROBS, Delta, EngineError, Finished, InvalidParams, PromptTooLong,
                                     QueueFull, Request, ShuttingDown)

log = logging.getLogger("gptoss_jax.serve")

MAX_STOP_STRINGS = 4  # as OpenAI


class APIError(Exception):
    """An error answered as OpenAI-style JSON."""

    def __init__(self, status: int, message: str, *, param: str | None = None, type: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
                             429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}.get(status,
                                                                                                     "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------------------------------
# argument checking: every failure names the field
def _check(body: dict, name: str, kinds, default=None, *, minimum=None, maximum=None, choices=None):
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in kinds:
        raise APIError(400, f"{name} must be {_kind_names(kinds)}, got {json.dumps(v)}", param=name)
    if not isinstance(v, kinds):
        raise APIError(400, f"{name} must be {_kind_names(kinds)}, got {type(v).__name__} {json.dumps(v)[:60]}",
                       param=name)
    if isinstance(v, float) and not math.isfinite(v):
        raise APIError(400, f"{name} must be finite", param=name)
    if minimum is not None and v < minimum or maximum is not None and v > maximum:
        raise APIError(400, f"{name} must be in [{minimum}, {maximum}], got {v}", param=name)
    if choices is not None and v not in choices:
        raise APIError(400, f"{name} must be one of {list(choices)}, got {json.dumps(v)}", param=name)
    return v


def _kind_names(kinds) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "an array",
             dict: "an object"}
    kinds = kinds if isinstance(kinds, tuple) else (kinds,)
    if float in kinds:
        kinds = tuple(k for k in kinds if k is not int)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _sampling(body: dict, vocab_size: int, *, max_tokens_names=("max_tokens",)) -> tuple[SamplingParams, str | None]:
    """The OpenAI sampling fields mapped onto a :class:`SamplingParams` and checked by ``SamplingParams.checked``
    (the one place sampling arguments are validated; its errors become 400s naming the OpenAI field: ``max_tokens``
    for ``max_new_tokens``, ``stop`` for ``stop_strings``). OpenAI's own limits come on top: temperature ≤ 2, at
    most 4 stop strings, n = 1, no penalties, no logit_bias; ``top_k`` (vLLM's extension) -1 means off; no ``seed``
    draws a random one.

    Returns the params and the name of the max-tokens field the body gave, or None when it gave none (then
    ``max_new_tokens`` is a placeholder that :func:`create_app`'s ``start`` replaces by the rest of the context)."""
    max_field = None
    for name in max_tokens_names:
        if body.get(name) is not None:
            max_field = name
    names = {"max_new_tokens": max_field or max_tokens_names[0], "stop_strings": "stop"}

    def get(name, default):
        v = body.get(name)
        return default if v is None else v

    top_k = get("top_k", 0)
    if type(top_k) is int and top_k == -1:
        top_k = 0
    seed = body.get("seed")
    params = SamplingParams(max_new_tokens=body[max_field] if max_field else 1, temperature=get("temperature", 1.0),
                            top_k=top_k, top_p=get("top_p", 1.0), seed=secrets.randbits(63) if seed is None else seed,
                            stop_strings=get("stop", ()))
    try:
        params = params.checked(vocab_size)
    except GenerationError as e:
        raise _param_error(str(e), e.field, names) from None
    if params.temperature > 2:
        raise APIError(400, f"temperature must be in [0, 2], got {params.temperature}", param="temperature")
    if len(params.stop_strings) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(params.stop_strings)}",
                       param="stop")
    n = _check(body, "n", int, 1)
    if n != 1:
        raise APIError(400, f"n must be 1 (this server returns one choice per request), got {n}", param="n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _check(body, name, (int, float), 0, minimum=-2, maximum=2) != 0:
            raise APIError(400, f"{name} is not supported (only 0)", param=name)
    if body.get("logit_bias"):
        raise APIError(400, "logit_bias is not supported", param="logit_bias")
    return params, max_field


def _param_error(message: str, field: str | None, names: dict) -> APIError:
    """A SamplingParams error (``field``: its field) as a 400 naming the API's field instead."""
    api = names.get(field, field)
    if field and api != field and message.startswith(field):
        message = api + message[len(field):]
    return APIError(400, message, param=api)


def _content_text(content, where: str) -> str:
    """A message's content: a string, null, or an array of text parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in ("text", "input_text", "output_text") \
                    or not isinstance(part.get("text"), str):
                raise APIError(400, f"{where}[{j}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) are "
                                    f"supported", param=f"{where}[{j}]")
            out.append(part["text"])
        return "".join(out)
    raise APIError(400, f"{where} must be a string or an array of text parts", param=where)


def _tools(body: dict, *, responses_format: bool = False) -> list[dict] | None:
    tools = body.get("tools")
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise APIError(400, "tools must be an array", param="tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            raise APIError(400, f"tools[{i}]: only function tools ({{\"type\": \"function\", ...}}) are supported",
                           param=f"tools[{i}]")
        fn = t if responses_format else t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise APIError(400, f"tools[{i}] needs a function name", param=f"tools[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise APIError(400, f"tools[{i}].parameters must be a JSON schema object", param=f"tools[{i}]")
        out.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
    choice = body.get("tool_choice", "auto")
    if choice == "none":
        return None
    if choice != "auto":
        raise APIError(400, "tool_choice must be \"auto\" or \"none\" (forcing a tool is not supported)",
                       param="tool_choice")
    return out


def _reasoning(body: dict, *, responses_format: bool = False) -> str:
    if responses_format:
        r = _check(body, "reasoning", dict, {})
        effort = r.get("effort") or "medium"
        name = "reasoning.effort"
    else:
        effort = _check(body, "reasoning_effort", str, "medium")
        name = "reasoning_effort"
    if effort == "minimal":
        effort = "low"
    if effort not in harmony.REASONING_LEVELS:
        raise APIError(400, f"{name} must be one of {list(harmony.REASONING_LEVELS)}, got {json.dumps(effort)}",
                       param=name)
    return effort


def chat_messages_to_harmony(messages) -> tuple[list[harmony.Message], str | None]:
    """OpenAI chat messages → (harmony messages, developer instructions). See the module doc for the mapping.
    Raises APIError(400) naming ``messages[i]...`` for anything it cannot express."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty array", param="messages")
    instructions: list[str] = []
    out: list[harmony.Message] = []
    names: dict[str, str] = {}  # tool_call_id → function name
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise APIError(400, f"{where} must be an object", param=where)
        role = m.get("role")
        content = _content_text(m.get("content"), f"{where}.content")
        if role in ("system", "developer"):
            instructions.append(content)
        elif role == "user":
            out.append(harmony.Message("user", content))
        elif role == "assistant":
            reasoning = m.get("reasoning_content", m.get("reasoning"))
            if reasoning:
                out.append(harmony.Message("assistant", _content_text(reasoning, f"{where}.reasoning_content"),
                                           channel="analysis"))
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise APIError(400, f"{where}.tool_calls must be an array", param=f"{where}.tool_calls")
            if content:  # with tool calls: a preamble on the commentary channel (harmony), else the answer
                out.append(harmony.Message("assistant", content, channel="commentary" if calls else "final"))
            for j, tc in enumerate(calls):
                fn = tc.get("function") if isinstance(tc, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"] \
                        or any(c.isspace() for c in fn["name"]):
                    raise APIError(400, f"{where}.tool_calls[{j}].function.name must be a name without spaces",
                                   param=f"{where}.tool_calls[{j}]")
                args = fn.get("arguments", "")
                if not isinstance(args, str):
                    args = json.dumps(args)
                names[str(tc.get("id"))] = fn["name"]
                out.append(harmony.Message.tool_call(f"functions.{fn['name']}", args))
        elif role == "tool":
            name = m.get("name") or names.get(str(m.get("tool_call_id")))
            if not isinstance(name, str) or not name:
                raise APIError(400, f"{where}.tool_call_id does not match a tool call of an earlier assistant "
                                    f"message (and no name is given)", param=f"{where}.tool_call_id")
            out.append(harmony.Message.tool_result(f"functions.{name}", content))
        else:
            raise APIError(400, f"{where}.role must be system, developer, user, assistant or tool, got "
                                f"{json.dumps(role)}", param=f"{where}.role")
    if not out:
        raise APIError(400, "messages holds no user, assistant or tool message", param="messages")
    return out, ("\n\n".join(s for s in instructions if s) or None)


def _classify(m: harmony.Message) -> str:
    if m.role == "assistant" and m.recipient and m.recipient.startswith("functions."):
        return "tool"
    if m.role == "assistant" and m.channel == "analysis":
        return "reasoning"
    return "content"


class HarmonyToOpenAI:
    """Turns a growing harmony completion (token ids) into OpenAI chat deltas: reasoning_content, content and
    tool_calls. The completion is re-parsed on each update (parse_completion with complete=False) and only what was
    not sent yet goes out; a trailing U+FFFD (an incomplete UTF-8 sequence) is held back until it resolves, and so is
    a tail that may be the start of a stop string (a message's text is cut where a stop string begins, as the
    engine ended generation there)."""

    def __init__(self, tokenizer, include_reasoning: bool = True, stop_strings=()):
        self.tok, self.include_reasoning, self.stops = tokenizer, include_reasoning, tuple(stop_strings)
        self.ids: list[int] = []
        self.sent: dict[int, int] = {}
        self.tool_index: dict[int, tuple[int, str]] = {}  # message index → (tool_calls index, call id)

    def update(self, new_ids, *, final: bool = False) -> list[dict]:
        import warnings
        self.ids.extend(new_ids)
        with warnings.catch_warnings():  # malformed output is kept as text; the warning is for interactive use
            warnings.simplefilter("ignore", harmony.HarmonyParseWarning)
            msgs = harmony.parse_completion(self.ids, self.tok, complete=final)
        deltas = []
        for idx, m in enumerate(msgs):
            kind = _classify(m)
            text = self._cut(m.content)
            if not final and idx == len(msgs) - 1:
                text = text[:len(text) - _holdback(text, self.stops)]
            sent = self.sent.get(idx, 0)
            new = text[sent:]
            self.sent[idx] = max(sent, len(text))
            if kind == "tool":
                if idx not in self.tool_index:
                    self.tool_index[idx] = (len(self.tool_index), "call_" + uuid.uuid4().hex[:24])
                    k, cid = self.tool_index[idx]
                    deltas.append({"tool_calls": [{"index": k, "id": cid, "type": "function", "function": {
                        "name": m.recipient[len("functions."):], "arguments": new}}]})
                elif new:
                    deltas.append({"tool_calls": [{"index": self.tool_index[idx][0], "function": {"arguments": new}}]})
            elif kind == "reasoning":
                if new and self.include_reasoning:
                    deltas.append({"reasoning_content": new})
            elif new:
                deltas.append({"content": new})
        return deltas

    def _cut(self, text: str) -> str:
        hits = [i for s in self.stops if (i := text.find(s)) >= 0]
        return text[:min(hits)] if hits else text

    def message(self) -> dict:
        """The whole assistant message (call after the final update)."""
        content, reasoning, calls = [], [], []
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", harmony.HarmonyParseWarning)
            msgs = harmony.parse_completion(self.ids, self.tok, complete=True)
        for idx, m in enumerate(msgs):
            kind, text = _classify(m), self._cut(m.content)
            if kind == "tool":
                cid = self.tool_index.get(idx, (0, "call_" + uuid.uuid4().hex[:24]))[1]
                calls.append({"id": cid, "type": "function",
                              "function": {"name": m.recipient[len("functions."):], "arguments": text}})
            elif kind == "reasoning":
                reasoning.append(text)
            else:
                content.append(text)
        out: dict[str, Any] = {"role": "assistant", "content": "".join(content) if content or not calls else None}
        if reasoning and self.include_reasoning:
            out["reasoning_content"] = "\n".join(reasoning)
        if calls:
            out["tool_calls"] = calls
        return out


# ------------------------------------------------------------------------------------------------------------------
def create_app(model, engine, *, model_name: str = "gpt-oss", request_timeout: float | None = 600.0):
    """The FastAPI application. `engine` must be started (and is shut down with the app's lifespan)."""
    import contextlib

    tok = model.tokenizer
    stop_chat = harmony.stop_token_ids(tok)
    call_id = harmony.special_token_ids(tok)[harmony.CALL]
    metrics = _Metrics(engine)
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown)

    app = FastAPI(title="gptoss-jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    def rid(request: HTTPRequest) -> str:
        if not hasattr(request.state, "rid"):
            request.state.rid = "req_" + uuid.uuid4().hex
        return request.state.rid

    def error_response(request, e: APIError) -> JSONResponse:
        metrics.http[(request.url.path, e.status)] += 1
        return JSONResponse(e.body(), status_code=e.status, headers={"x-request-id": rid(request)})

    @app.exception_handler(APIError)
    async def _api_error(request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        msg = "not found" if e.status_code == 404 else str(e.detail)
        return error_response(request, APIError(e.status_code, f"{request.method} {request.url.path}: {msg}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        first = (e.errors() or [{}])[0]
        where = ".".join(str(x) for x in first.get("loc", ()) if x not in ("body", "query"))
        return error_response(request, APIError(400, f"{where or 'request'}: {first.get('msg', 'invalid')}",
                                                param=where or None))

    @app.exception_handler(Exception)
    async def _internal(request, e):
        r = rid(request)
        log.exception("internal error in request %s", r)
        return error_response(request, APIError(500, f"internal server error (request id {r})", code=r))

    async def json_body(request) -> dict:
        try:
            body = json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise APIError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        m = body.get("model")
        if m is not None and m != model_name:
            raise APIError(404, f"model {json.dumps(m)} does not exist; this server serves {json.dumps(model_name)}",
                           param="model", code="model_not_found")
        return body

    def start(request: HTTPRequest, prompt: list[int], params: SamplingParams, max_field: str | None,
              stop_token_ids, *, logprobs: int | None = None, text: bool = True) -> tuple[Request, asyncio.Queue]:
        """Submits to the engine (max_new_tokens: the rest of the context when no max-tokens field was given);
        returns the Request and the queue its events arrive on."""
        if len(prompt) >= model.max_seq_len:
            raise APIError(413, f"the prompt has {len(prompt)} tokens; the context holds {model.max_seq_len} "
                                f"(prompt + max_tokens must fit)", code="context_length_exceeded")
        if max_field is None:
            params = dataclasses.replace(params, max_new_tokens=model.max_seq_len - len(prompt))
        elif len(prompt) + params.max_new_tokens > model.max_seq_len:
            raise APIError(400, f"{max_field} {params.max_new_tokens} + the prompt's {len(prompt)} tokens exceed the "
                                f"context of {model.max_seq_len} tokens", param=max_field,
                           code="context_length_exceeded")
        params = dataclasses.replace(params, stop_token_ids=tuple(stop_token_ids))
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            loop.call_soon_threadsafe(q.put_nowait, ev)

        deadline = None if request_timeout is None else time.monotonic() + request_timeout
        req = Request(prompt, emit, params=params, logprobs=logprobs, deadline=deadline, request_id=rid(request),
                      text=text)
        try:
            engine.submit(req)
        except InvalidParams as e:
            raise _param_error(str(e), e.field, {"max_new_tokens": max_field or "max_tokens",
                                                 "stop_strings": "stop"}) from None
        except PromptTooLong as e:
            raise APIError(413, str(e), code="context_length_exceeded") from None
        except (QueueFull, ShuttingDown) as e:
            raise APIError(e.status, str(e)) from None
        except EngineError as e:
            raise APIError(400, str(e)) from None
        metrics.requests += 1
        return req, q

    async def events(request: HTTPRequest, req: Request, q: asyncio.Queue) -> AsyncIterator[object]:
        """The request's events; cancels it when the client disconnects or the consumer stops early."""
        try:
            while True:
                try:
                    ev = await asyncio.wait_for(q.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        req.cancel()
                        return
                    continue
                yield ev
                if isinstance(ev, Finished):
                    return
        finally:
            req.cancel()  # no-op once finished; frees the slot if the client went away

    def finished_error(fin: Finished) -> APIError | None:
        if fin.reason == "timeout":
            return APIError(504, fin.error or "the request timed out")
        if fin.reason == "shutdown":
            return APIError(503, fin.error or "the server is shutting down")
        if fin.reason == "error":
            return APIError(500, fin.error or "internal error")
        return None

    def usage(fin: Finished) -> dict:
        return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": len(fin.tokens),
                "total_tokens": fin.prompt_tokens + len(fin.tokens)}

    def token_str(i: int) -> str:
        return model._decode_lenient([i])

    def chat_logprobs(lps, ids, top_n: int) -> list[dict]:
        out = []
        for t, (lp, top) in zip(ids, lps):
            s = token_str(t)
            out.append({"token": s, "logprob": lp, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": token_str(a), "logprob": b, "bytes": list(token_str(a).encode())}
                                         for a, b in top[:top_n]]})
        return out

    def sse(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    # -------------------------------------------------------------------------------------------------- routes
    @app.get("/health")
    async def health():
        if engine.stopping:
            raise APIError(503, "the server is shutting down")
        return {"status": "ok", "queue": engine.queue_length, "active": engine.active_slots}

    @app.get("/metrics")
    async def metrics_route():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "gptoss-jax", "max_model_len": model.max_seq_len}]}

    @app.get("/v1/models/{name}")
    async def model_info(name: str):
        if name != model_name:
            raise APIError(404, f"model {json.dumps(name)} does not exist", param="model", code="model_not_found")
        return {"id": model_name, "object": "model", "created": created, "owned_by": "gptoss-jax"}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HTTPRequest):
        body = await json_body(request)
        stream = _check(body, "stream", bool, False)
        include_usage = stream and bool((_check(body, "stream_options", dict, {}) or {}).get("include_usage"))
        want_lp = _check(body, "logprobs", bool, False)
        top_n = _check(body, "top_logprobs", int, 0, minimum=0, maximum=MAX_TOP_LOGPROBS)
        if top_n and not want_lp:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        params, max_field = _sampling(body, model.config.vocab_size,
                                      max_tokens_names=("max_tokens", "max_completion_tokens"))
        include_reasoning = _check(body, "include_reasoning", bool, True)
        rf = _check(body, "response_format", dict)
        if rf is not None and rf.get("type") != "text":
            raise APIError(400, "response_format: only {\"type\": \"text\"} is supported", param="response_format")
        messages, instructions = chat_messages_to_harmony(body.get("messages"))
        tools = _tools(body)
        reasoning = _reasoning(body)
        try:
            prompt = harmony.render_conversation_ids(tok, messages, reasoning=reasoning, instructions=instructions,
                                                     tools=tools)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        req, q = start(request, prompt, params, max_field, stop_chat, logprobs=top_n if want_lp else None,
                       text=False)
        conv = HarmonyToOpenAI(tok, include_reasoning, params.stop_strings)
        cid, now = "chatcmpl-" + uuid.uuid4().hex, int(time.time())

        def finish_reason(fin: Finished, has_calls: bool) -> str:
            if fin.reason == "length":
                return "length"
            return "tool_calls" if has_calls and fin.tokens and fin.tokens[-1] == call_id else "stop"

        if not stream:
            lps = []
            async for ev in events(request, req, q):
                if isinstance(ev, Delta):
                    conv.ids.extend(ev.tokens)
                    if ev.logprobs:
                        lps.extend(zip(ev.tokens, ev.logprobs))
                elif isinstance(ev, Finished):
                    err = finished_error(ev)
                    if err:
                        raise err
                    conv.update([], final=True)
                    msg = conv.message()
                    reason = finish_reason(ev, "tool_calls" in msg)
                    return JSONResponse({
                        "id": cid, "object": "chat.completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "message": msg, "finish_reason": reason,
                                     "logprobs": {"content": chat_logprobs([x for _, x in lps], [t for t, _ in lps],
                                                                           top_n)} if want_lp else None}],
                        "usage": usage(ev)}, headers={"x-request-id": rid(request)})
            return Response(status_code=499)  # the client went away

        async def gen():
            def chunk(delta, finish=None, logprobs=None):
                return sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_name,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}]})

            yield chunk({"role": "assistant", "content": ""})
            async for ev in events(request, req, q):
                if isinstance(ev, Delta):
                    lp = {"content": chat_logprobs(ev.logprobs, ev.tokens, top_n)} if want_lp and ev.logprobs \
                        else None
                    ds = conv.update(ev.tokens)
                    for j, d in enumerate(ds):
                        yield chunk(d, logprobs=lp if j == 0 else None)
                    if lp and not ds:
                        yield chunk({}, logprobs=lp)
                elif isinstance(ev, Finished):
                    err = finished_error(ev)
                    if err:
                        yield sse(err.body())
                    else:
                        for d in conv.update([], final=True):
                            yield chunk(d)
                        yield chunk({}, finish_reason(ev, bool(conv.tool_index)))
                        if include_usage:
                            yield sse({"id": cid, "object": "chat.completion.chunk", "created": now,
                                       "model": model_name, "choices": [], "usage": usage(ev)})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-request-id": rid(request),
                                                                                 "cache-control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: HTTPRequest):
        body = await json_body(request)
        stream = _check(body, "stream", bool, False)
        include_usage = stream and bool((_check(body, "stream_options", dict, {}) or {}).get("include_usage"))
        top_n = _check(body, "logprobs", int, None, minimum=0, maximum=MAX_TOP_LOGPROBS)
        if _check(body, "echo", bool, False):
            raise APIError(400, "echo is not supported", param="echo")
        if _check(body, "best_of", int, 1) != 1:
            raise APIError(400, "best_of must be 1", param="best_of")
        if body.get("suffix"):
            raise APIError(400, "suffix is not supported", param="suffix")
        if "max_tokens" not in body:
            body = {**body, "max_tokens": 16}  # OpenAI's default for completions
        params, max_field = _sampling(body, model.config.vocab_size)
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if not p:
                raise APIError(400, "prompt is empty", param="prompt")
            prompt = tok.encode(p, allow_special=False)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if min(p) < 0 or max(p) >= model.config.vocab_size:
                raise APIError(400, f"prompt token ids must lie in [0, {model.config.vocab_size})", param="prompt")
            prompt = list(p)
        else:
            raise APIError(400, "prompt must be a non-empty string or array of token ids (one prompt per request)",
                           param="prompt")
        ignore_eos = _check(body, "ignore_eos", bool, False)  # vLLM's extension (benchmarks: exact lengths)
        req, q = start(request, prompt, params, max_field, () if ignore_eos else model.default_stop_token_ids,
                       logprobs=top_n)
        cid, now = "cmpl-" + uuid.uuid4().hex, int(time.time())

        def legacy_logprobs(items, offset0: int) -> dict:
            toks, lps, tops, offs, off = [], [], [], [], offset0
            for t, (lp, top) in items:
                s = token_str(t)
                toks.append(s)
                lps.append(lp)
                tops.append({token_str(a): b for a, b in top[:top_n]})
                offs.append(off)
                off += len(s)
            return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

        def reason(fin: Finished) -> str:
            return "length" if fin.reason == "length" else "stop"

        if not stream:
            items = []
            async for ev in events(request, req, q):
                if isinstance(ev, Delta) and ev.logprobs:
                    items.extend(zip(ev.tokens, ev.logprobs))
                elif isinstance(ev, Finished):
                    err = finished_error(ev)
                    if err:
                        raise err
                    return JSONResponse({
                        "id": cid, "object": "text_completion", "created": now, "model": model_name,
                        "choices": [{"index": 0, "text": ev.text, "finish_reason": reason(ev),
                                     "logprobs": legacy_logprobs(items, 0) if top_n is not None else None}],
                        "usage": usage(ev)}, headers={"x-request-id": rid(request)})
            return Response(status_code=499)

        async def gen():
            offset = 0
            async for ev in events(request, req, q):
                if isinstance(ev, Delta):
                    lp = legacy_logprobs(list(zip(ev.tokens, ev.logprobs)), offset) if top_n is not None and \
                        ev.logprobs else None
                    offset += len(ev.text)
                    yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                               "choices": [{"index": 0, "text": ev.text, "finish_reason": None, "logprobs": lp}]})
                elif isinstance(ev, Finished):
                    err = finished_error(ev)
                    if err:
                        yield sse(err.body())
                    else:
                        yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                                   "choices": [{"index": 0, "text": "", "finish_reason": reason(ev),
                                                "logprobs": None}]})
                        if include_usage:
                            yield sse({"id": cid, "object": "text_completion", "created": now, "model": model_name,
                                       "choices": [], "usage": usage(ev)})
                    yield "data: [DONE]\n\n"

        return StreamingResponse(gen(), media_type="text/event-stream", headers={"x-request-id": rid(request),
                                                                                 "cache-control": "no-cache"})

    @app.post("/v1/responses")
    async def responses(request: HTTPRequest):
        body = await json_body(request)
        if _check(body, "stream", bool, False):
            raise APIError(400, "stream is not supported on /v1/responses (use /v1/chat/completions)", param="stream")
        if body.get("previous_response_id"):
            raise APIError(400, "previous_response_id is not supported (the server stores no responses)",
                           param="previous_response_id")
        params, max_field = _sampling({k: v for k, v in body.items() if k not in ("stop", "max_tokens")},
                                      model.config.vocab_size, max_tokens_names=("max_output_tokens",))
        messages, instructions = responses_input_to_harmony(body.get("input"))
        extra = _check(body, "instructions", str)
        instructions = "\n\n".join(s for s in (extra, instructions) if s) or None
        tools = _tools(body, responses_format=True)
        reasoning = _reasoning(body, responses_format=True)
        try:
            prompt = harmony.render_conversation_ids(tok, messages, reasoning=reasoning, instructions=instructions,
                                                     tools=tools)
        except (ValueError, TypeError) as e:
            raise APIError(400, f"input: {e}", param="input") from None
        req, q = start(request, prompt, params, max_field, stop_chat, text=False)
        conv = HarmonyToOpenAI(tok, True, params.stop_strings)
        async for ev in events(request, req, q):
            if isinstance(ev, Delta):
                conv.ids.extend(ev.tokens)
            elif isinstance(ev, Finished):
                err = finished_error(ev)
                if err:
                    raise err
                return JSONResponse(responses_output(conv, ev, model_name, body),
                                    headers={"x-request-id": rid(request)})
        return Response(status_code=499)

    return app


def responses_input_to_harmony(inp) -> tuple[list[harmony.Message], str | None]:
    """Responses API ``input`` (a string, or message / function_call / function_call_output items) → harmony."""
    if isinstance(inp, str):
        if not inp:
            raise APIError(400, "input is empty", param="input")
        return [harmony.Message("user", inp)], None
    if not isinstance(inp, list) or not inp:
        raise APIError(400, "input must be a string or a non-empty array of items", param="input")
    chat = []
    for i, item in enumerate(inp):
        if not isinstance(item, dict):
            raise APIError(400, f"input[{i}] must be an object", param=f"input[{i}]")
        kind = item.get("type", "message")
        if kind == "message":
            chat.append({"role": item.get("role"), "content": item.get("content")})
        elif kind == "function_call":
            chat.append({"role": "assistant", "content": None, "tool_calls": [
                {"id": item.get("call_id"), "type": "function",
                 "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}]})
        elif kind == "function_call_output":
            out = item.get("output")
            chat.append({"role": "tool", "tool_call_id": item.get("call_id"),
                         "content": out if isinstance(out, str) else json.dumps(out)})
        elif kind == "reasoning":
            continue  # earlier reasoning is not re-sent to the model (harmony drops completed analysis)
        else:
            raise APIError(400, f"input[{i}].type {json.dumps(kind)} is not supported", param=f"input[{i}].type")
    try:
        return chat_messages_to_harmony(chat)
    except APIError as e:
        e.param = (e.param or "").replace("messages", "input")
        e.message = e.message.replace("messages", "input")
        raise


def responses_output(conv: HarmonyToOpenAI, fin: Finished, model_name: str, body: dict) -> dict:
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", harmony.HarmonyParseWarning)
        msgs = harmony.parse_completion(conv.ids, conv.tok, complete=True)
    output = []
    for m in msgs:
        kind = _classify(m)
        if kind == "reasoning":
            output.append({"type": "reasoning", "id": "rs_" + uuid.uuid4().hex, "summary": [],
                           "content": [{"type": "reasoning_text", "text": m.content}]})
        elif kind == "tool":
            output.append({"type": "function_call", "id": "fc_" + uuid.uuid4().hex,
                           "call_id": "call_" + uuid.uuid4().hex[:24], "name": m.recipient[len("functions."):],
                           "arguments": m.content, "status": "completed"})
        else:
            output.append({"type": "message", "id": "msg_" + uuid.uuid4().hex, "role": "assistant",
                           "status": "completed",
                           "content": [{"type": "output_text", "text": m.content, "annotations": []}]})
    incomplete = fin.reason == "length"
    return {"id": "resp_" + uuid.uuid4().hex, "object": "response", "created_at": int(time.time()),
            "status": "incomplete" if incomplete else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if incomplete else None,
            "model": model_name, "output": output, "error": None, "parallel_tool_calls": False, "tool_choice": "auto",
            "tools": body.get("tools") or [], "temperature": body.get("temperature", 1.0),
            "top_p": body.get("top_p", 1.0), "instructions": body.get("instructions"),
            "usage": {"input_tokens": fin.prompt_tokens, "output_tokens": len(fin.tokens),
                      "total_tokens": fin.prompt_tokens + len(fin.tokens),
                      "input_tokens_details": {"cached_tokens": 0}, "output_tokens_details": {"reasoning_tokens": 0}}}


class _Metrics:
    """Prometheus exposition (prometheus_client's text format) of the engine's counters, the HTTP status counts and
    a time-to-first-token histogram."""

    def __init__(self, engine):
        import collections

        from prometheus_client import CollectorRegistry, Histogram
        self.engine = engine
        self.requests = 0
        self.http: collections.Counter = collections.Counter()
        self.registry = CollectorRegistry()
        self.ttft = Histogram("gptoss_time_to_first_token_seconds", "Arrival to first generated token",
                              buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60), registry=self.registry)
        self.registry.register(self)

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        m = self.engine.metrics
        while m.ttft:  # drained here (one consumer) into the histogram
            self.ttft.observe(m.ttft.pop(0))
        c = CounterMetricFamily("gptoss_requests", "Requests accepted by the scheduler")
        c.add_metric([], self.requests)
        yield c
        c = CounterMetricFamily("gptoss_requests_finished", "Requests ended, by reason", labels=["reason"])
        for k, v in sorted(m.requests_finished.items()):
            c.add_metric([k], v)
        yield c
        c = CounterMetricFamily("gptoss_http_errors", "Error responses, by path and status", labels=["path", "status"])
        for (path, status), v in sorted(self.http.items()):
            c.add_metric([path, str(status)], v)
        yield c
        c = CounterMetricFamily("gptoss_prompt_tokens", "Prompt tokens prefilled")
        c.add_metric([], m.prompt_tokens)
        yield c
        c = CounterMetricFamily("gptoss_generation_tokens", "Tokens generated")
        c.add_metric([], m.generation_tokens)
        yield c
        g = GaugeMetricFamily("gptoss_queue_length", "Requests waiting for a slot")
        g.add_metric([], self.engine.queue_length)
        yield g
        g = GaugeMetricFamily("gptoss_batch_occupancy", "Occupied decode slots / max_batch (now)")
        g.add_metric([], self.engine.active_slots / self.engine.max_batch)
        yield g
        g = GaugeMetricFamily("gptoss_batch_occupancy_mean", "Mean decoding fraction of the slots over decode calls")
        g.add_metric([], m.occupancy_sum / m.decode_calls if m.decode_calls else 0.0)
        yield g
        for name, value, doc in (
                ("gptoss_decode_calls", m.decode_calls, "Decode calls (chunks of up to --chunk-size steps)"),
                ("gptoss_decode_steps", m.decode_steps, "Model decode steps run (each over the whole decode batch)"),
                ("gptoss_prefill_calls", m.prefill_calls, "Prefill calls"),
                ("gptoss_scheduler_dispatches", m.dispatches, "Compiled calls dispatched"),
                ("gptoss_scheduler_device_starved", m.starved,
                 "Dispatches that found the device done with every earlier call (it waited for the host)")):
            c = CounterMetricFamily(name, doc)
            c.add_metric([], value)
            yield c
        c = CounterMetricFamily(
            "gptoss_scheduler_seconds", "Scheduler thread time by state: host (working: admissions, dispatch, "
            "delivering tokens, detokenizing), wait (blocked on device results), idle (no work); device_idle: an "
            "upper bound of the time the device waited for the host while there was work", labels=["state"])
        for state, v in (("host", m.host_s), ("wait", m.wait_s), ("idle", m.idle_s), ("device_idle", m.device_idle_s)):
            c.add_metric([state], v)
        yield c
        g = GaugeMetricFamily("gptoss_max_batch", "Decode slots")
        g.add_metric([], self.engine.max_batch)
        yield g

    def render(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)
