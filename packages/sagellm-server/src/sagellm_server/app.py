"""The FastAPI application: OpenAI-compatible routes over one shared engine (an :class:`EngineClient`)."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import sagellm
from sagellm.chat_template import ChatTemplateError, apply_chat_template, resolve_chat_template
from sagellm.outputs import RequestOutput
from sagellm.prompt_validation import PromptError, validate_prompt
from sagellm.sampling_params import SamplingParams
from sagellm.structured import StructuredOutputParams
from sagellm.structured.compiler import compiler_for
from sagellm_server import __version__, request_params
from sagellm_server.async_engine import (
    EngineClient,
    EngineError,
    QueueFullError,
    RequestHandle,
    ServerShuttingDownError,
)
from sagellm_server.body_timeout import BodyTimeoutError, timed_receive
from sagellm_server.choices import ChatChoice, CompletionChoice, by_index
from sagellm_server.http_limits import DEFAULT_BODY_TIMEOUT_S
from sagellm_server.metrics import CONTENT_TYPE, ServerMetrics
from sagellm_server.offload import TokenizerPool
from sagellm_server.openai_protocol import (
    ApiError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_json_object,
    validation_error,
)
from sagellm_server.request_params import structured_output
from sagellm_server.supervisor import EngineSupervisor
from sagellm_server.token_table import TokenTable
from sagellm_server.tool_parsers import PARSERS, detect_style

logger = logging.getLogger("sagellm.server")

M = TypeVar("M", bound=BaseModel)

#: Routes reachable without the API key (load balancers probe it).
PUBLIC_PATHS = frozenset({"/health"})


@dataclass
class ServerConfig:
    served_model_name: str
    max_model_len: int
    vocab_size: int
    #: The engine's end-of-sequence ids (grammars are checked against them); empty: the
    #: tokenizer's own.
    eos_token_ids: list[int] = field(default_factory=list)
    api_key: str | None = None
    max_request_body_bytes: int = 4 << 20
    #: Seconds between throughput log lines; 0 disables them.
    log_interval: float = 10.0
    backend: str = ""
    device_name: str = ""
    registry: Any = None
    extra_model_names: list[str] = field(default_factory=list)
    #: Seconds each read of a request body may take (then 408).
    body_timeout: float = DEFAULT_BODY_TIMEOUT_S
    #: Whether clients may send their own ``chat_template`` (rendered in the hardened sandbox).
    allow_request_chat_template: bool = True
    #: Drop unknown top-level request fields instead of refusing them (clients that send extras).
    lenient_request_fields: bool = False
    #: How tool calls are read from the output: "auto" (from the chat template) or a style name.
    tool_call_parser: str = "auto"


# -- middleware ---------------------------------------------------------------------------


def _error_bytes(err: ApiError) -> bytes:
    return json.dumps(err.body()).encode()


async def _send_error(send: Send, err: ApiError, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = _error_bytes(err)
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    """API key check (constant time), request-body size limit and body read timeout, before any
    routing."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int,
                 body_timeout: float = DEFAULT_BODY_TIMEOUT_S,
                 public_prefixes: tuple[str, ...] = ()) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body = max_body_bytes
        self.body_timeout = body_timeout
        #: Paths below these need no API key (the control plane's registration routes, which
        #: check a secret of their own).
        self.public_prefixes = public_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        receive = timed_receive(receive, self.body_timeout)
        headers = dict(scope["headers"])
        if (self.expected is not None and scope["path"] not in PUBLIC_PATHS
                and not (self.public_prefixes and scope["path"].startswith(self.public_prefixes))):
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                what = "missing" if not given else "invalid"
                await _send_error(send, ApiError(
                    401, f"{what} API key: send 'Authorization: Bearer <key>'",
                    type="authentication_error", code="invalid_api_key"),
                    [(b"www-authenticate", b"Bearer")])
                return
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                await _send_error(send, ApiError(400, "invalid Content-Length header"))
                return
            if too_big:
                await _send_error(send, _too_large(self.max_body))
                return
            await self.app(scope, receive, send)
            return
        if scope["method"] in ("GET", "HEAD"):
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked upload): read the body here, within the limit, and replay it.
        chunks: list[bytes] = []
        size = 0
        while True:
            try:
                msg = await receive()
            except BodyTimeoutError as exc:
                await _send_error(send, exc, [(b"connection", b"close")])
                return
            if msg["type"] == "http.disconnect":
                logger.info("a client hung up while sending a request body (%s %s)",
                            scope["method"], scope["path"])
                return
            chunk = msg.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await _send_error(send, _too_large(self.max_body))
                return
            chunks.append(chunk)
            if not msg.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _too_large(limit: int) -> ApiError:
    return ApiError(413, f"the request body exceeds the limit of {limit} bytes",
                    code="request_too_large")


# -- streaming chunks ---------------------------------------------------------------------


_INDEX_OPEN = '{"index":'


class _ChunkFormatter:
    """Builds SSE events from a prefix serialized once per request (this runs per token)."""

    def __init__(self, chat: bool, request_id: str, created: int, model: str, include_usage: bool,
                 return_token_ids: bool) -> None:
        obj = "chat.completion.chunk" if chat else "text_completion"
        self.chat = chat
        self.head = (f'data: {{"id":{json.dumps(request_id)},"object":"{obj}","created":{created},'
                     f'"model":{json.dumps(model)},"choices":[{{"index":')
        self.tail = ',"usage":null}\n\n' if include_usage else '}\n\n'
        self.return_token_ids = return_token_ids
        self.created = created
        self.request_id = request_id
        self.model = model
        self.object = obj

    def chunk(self, index: int, text: str, token_ids: list[int] | None, finish_reason: str | None,
              role: bool = False) -> str:
        fr = "null" if finish_reason is None else f'"{finish_reason}"'
        ids = f',"token_ids":{json.dumps(token_ids)}' if self.return_token_ids and token_ids is not None else ""
        if self.chat:
            delta = '{"role":"assistant","content":""}' if role else f'{{"content":{json.dumps(text)}}}'
            body = f'{index},"delta":{delta},"logprobs":null,"finish_reason":{fr}{ids}}}]'
        else:
            body = f'{index},"text":{json.dumps(text)},"logprobs":null,"finish_reason":{fr}{ids}}}]'
        return self.head + body + self.tail

    def event(self, choice: dict[str, Any]) -> str:
        """A chunk of one choice built as a dict (logprobs, tool calls, echo: the slower path)."""
        return f"{self.head[:-len(_INDEX_OPEN)]}{json.dumps(choice)}]{self.tail}"

    def usage(self, prompt_tokens: int, completion_tokens: int) -> str:
        obj = {"id": self.request_id, "object": self.object, "created": self.created,
               "model": self.model, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)}
        return f"data: {json.dumps(obj)}\n\n"


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def _merge(streams: list[AsyncIterator[list[RequestOutput]]]
                 ) -> AsyncIterator[tuple[int, list[RequestOutput]]]:
    """Interleave several requests' output batches, tagged with their prompt index."""
    if len(streams) == 1:
        async for batch in streams[0]:
            yield 0, batch
        return
    q: asyncio.Queue[tuple[int, list[RequestOutput] | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, s: AsyncIterator[list[RequestOutput]]) -> None:
        try:
            async for batch in s:
                q.put_nowait((i, batch))
        except Exception as exc:
            q.put_nowait((i, exc))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        # Let the cancelled pumps run their streams' clean-up (which aborts the requests).
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)


T = TypeVar("T")


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``; cancel it (aborting its requests) if the client goes away first."""
    job = asyncio.ensure_future(work)

    async def watch() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():
            job.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await job
        watcher.cancel()
    try:
        return job.result()
    except asyncio.CancelledError:  # a cancelled gather() holds CancelledError without being cancelled()
        logger.info("a client hung up waiting for %s; its request was aborted", request.url.path)
        raise ApiError(499, "the client closed the connection", code="client_closed") from None
    except EngineError as exc:
        raise engine_api_error(exc) from None
    except ValueError as exc:  # the engine refused the request
        raise ApiError(400, str(exc), code="invalid_value") from None


def engine_api_error(exc: EngineError, admitting: bool = False) -> ApiError:
    """The API error for a request the engine could not serve: 503 (retry later or elsewhere) when
    the server is shutting down or the engine is down at admission; 500 when it failed mid-way."""
    if admitting or isinstance(exc, ServerShuttingDownError):
        return ApiError(503, str(exc), type="service_unavailable_error", code=exc.code)
    return ApiError(500, str(exc), type="server_error", code=exc.code)


# -- the application ----------------------------------------------------------------------


class _Server:
    """Route logic; one instance per app."""

    def __init__(self, engine: EngineClient, config: ServerConfig, tokenizer: Any,
                 metrics: ServerMetrics) -> None:
        self.engine = engine
        self.config = config
        # Tokenizer copies of their own in worker threads: HF fast tokenizers must not be used
        # from two threads at once, and an in-process engine thread detokenizes with the original.
        self.tokenizer = tokenizer
        self.tokenizers = TokenizerPool(tokenizer)
        self.metrics = metrics
        self.model_names = {config.served_model_name, *config.extra_model_names}
        self._table: TokenTable | None = None
        self.started = int(time.time())

    # -- parsing and validation ------------------------------------------------------------

    async def parse(self, request: Request, model: type[M]) -> M:
        try:
            raw = await request.body()
        except ClientDisconnect:  # routine on a busy server: one line, no traceback
            logger.info("a client hung up while sending a request body (%s)", request.url.path)
            raise ApiError(499, "the client closed the connection", code="client_closed") from None
        obj = parse_json_object(raw)
        if self.config.lenient_request_fields:
            unknown = obj.keys() - model.model_fields.keys()
            if unknown:
                logger.debug("ignoring unknown request fields %s", sorted(unknown)[:20])
                obj = {k: v for k, v in obj.items() if k not in unknown}
        try:
            req = model.model_validate(obj)
        except ValidationError as exc:
            raise validation_error(exc) from None
        name = getattr(req, "model", None)
        if name is not None and name not in self.model_names:
            if len(name) > 200:
                name = name[:200] + "..."  # do not echo a megabyte back
            raise ApiError(404, f"the model '{name}' does not exist; this server serves "
                           f"'{self.config.served_model_name}'", param="model", code="model_not_found")
        req.check_supported()  # type: ignore[attr-defined]
        return req

    async def tokenize(self, text: str | list[str]) -> Any:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer: send token ids", param="prompt")
        return await self.tokenizers.run(lambda tok: tok(text, add_special_tokens=True).input_ids)

    async def render_chat(self, req: ChatCompletionRequest) -> tuple[list[int], str]:
        """The prompt's token ids and the template used: the chat template renders, and its text
        tokenizes, in a worker thread; the template under the sandbox's time and size limits."""
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so it has no chat template")
        if req.chat_template is not None and not self.config.allow_request_chat_template:
            raise ApiError(400, "this server does not accept a chat_template in requests "
                           "(--no-request-chat-template)", param="chat_template",
                           code="unsupported_value")
        messages = [m.as_template_dict() for m in req.messages]
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.uses_tools and req.tools else None

        def work(tok: Any) -> tuple[list[int], str]:
            template = resolve_chat_template(tok, req.chat_template, tools)
            text = apply_chat_template(tok, messages, chat_template=template, tools=tools,
                                       add_generation_prompt=req.add_generation_prompt)
            return list(tok(text, add_special_tokens=False).input_ids), template

        try:
            return await self.tokenizers.run(work)
        except ChatTemplateError as exc:
            param = "chat_template" if req.chat_template is not None else "messages"
            raise ApiError(400, str(exc), param=param, code="invalid_chat_template") from None

    def tool_style(self, template: str) -> str:
        """The tool-call parser for this request's template (``--tool-call-parser`` or detected)."""
        style = self.config.tool_call_parser
        if style == "auto":
            detected = detect_style(template)
            if detected is None:
                raise ApiError(400, "the chat template shows no tool-call format this server can "
                               "parse; start the server with --tool-call-parser "
                               f"{{{','.join(PARSERS)}}}", param="tools", code="unsupported_value")
            style = detected
        return style

    async def check_structured(self, structured: StructuredOutputParams | None, param: str) -> None:
        """Compile the grammar in a worker thread before admission: a bad one is a 400 here, not a
        failure inside the engine's step."""
        if structured is None:
            return
        try:
            await self.tokenizers.run(lambda tok: self._compiler(tok).validate(structured))
        except ValueError as exc:
            raise ApiError(400, f"invalid {param}: {exc}", param=param, code="invalid_value") from None

    def _compiler(self, tok: Any) -> Any:
        """The grammar compiler for a tokenizer copy (builds the grammar engine's view of the
        tokenizer on first use: up to about half a second for a large vocabulary)."""
        eos = self.config.eos_token_ids or (
            [tok.eos_token_id] if getattr(tok, "eos_token_id", None) is not None else None)
        return compiler_for(tok, self.config.vocab_size, eos)

    async def warm_grammar(self) -> None:
        """Build the grammar engine's view of the tokenizer before the server takes requests
        (in a worker thread; the copies of the other threads share it), so the first
        structured-output requests do not wait for it. A tokenizer the grammar engine cannot
        use is only logged (such requests get their 400 when they come), and so is any other failure
here: the server starts all the same."""
        if self.tokenizer is None:
            return
        try:
            await self.tokenizers.run(self._compiler)
        except ValueError as exc:
            logger.info("structured output is not available for this model: %s", exc)
        except Exception:  # noqa: BLE001 - a warm-up; the requests report their own failures
            logger.warning("building the grammar engine's view of the tokenizer failed; "
                           "structured-output requests will try again", exc_info=True)

    async def table(self) -> TokenTable:
        """The token table for logprobs, built on first use in a worker thread."""
        if self._table is None:
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer, so logprobs cannot name tokens",
                               param="logprobs")
            vocab = self.config.vocab_size
            self._table = await self.tokenizers.run(lambda tok: TokenTable(tok, vocab))
        return self._table

    def check_prompt(self, ids: list[int], param: str) -> None:
        try:
            validate_prompt(ids, vocab_size=self.config.vocab_size,
                            max_model_len=self.config.max_model_len)
        except PromptError as exc:
            raise ApiError(400, str(exc), param=param, code=exc.code) from None

    def max_tokens(self, req: CompletionRequest | ChatCompletionRequest, prompt_len: int,
                   requested: int | None, default: int | None) -> int:
        limit = self.config.max_model_len
        if requested is not None:
            max_tokens = requested
        else:  # OpenAI's defaults: 16 for completions, the rest of the context for chat
            max_tokens = limit - prompt_len if default is None else min(default, limit - prompt_len)
        if prompt_len + max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens, but "
                           f"{prompt_len + max_tokens} were requested ({prompt_len} in the prompt + "
                           f"{max_tokens} max_tokens); reduce the prompt or max_tokens",
                           param="max_tokens", code="context_length_exceeded")
        if req.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})",
                           param="min_tokens", code="invalid_value")
        return max_tokens

    def admit(self, base_id: str, prompts: list[list[int]], params: list[SamplingParams],
              stream: bool, cache_salt: str | None) -> list[RequestHandle]:
        try:
            self.engine.check_capacity(len(prompts))
        except QueueFullError as exc:
            raise ApiError(503, str(exc), type="service_unavailable_error", code="queue_full") from None
        except EngineError as exc:  # the engine is down, or the server is shutting down
            raise engine_api_error(exc, admitting=True) from None
        if len(prompts) == 1:
            return [self.engine.add(base_id, prompts[0], params[0], stream, cache_salt)]
        return [self.engine.add(f"{base_id}-{i}", p, sp, stream, cache_salt)
                for i, (p, sp) in enumerate(zip(prompts, params, strict=True))]

    # -- generation ------------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        req = await self.parse(request, CompletionRequest)
        p = req.prompt
        texts: list[str] | None = None
        if isinstance(p, str):
            texts = [p]
            prompts = [list(await self.tokenize(p))]
        elif isinstance(p[0], str):
            texts = list(p)  # type: ignore[arg-type]
            prompts = [list(x) for x in await self.tokenize(p)]  # type: ignore[arg-type]
        elif isinstance(p[0], int):
            prompts = [list(p)]  # type: ignore[arg-type]
        else:
            prompts = [list(x) for x in p]  # type: ignore[union-attr]
        for ids in prompts:
            self.check_prompt(ids, "prompt")
        if req.echo and texts is None:
            texts = await self.detokenize_all(prompts)
        structured, param = structured_output(req, None)
        await self.check_structured(structured, param)
        # max_tokens=0 (echo only): the engine samples one token, which is not returned.
        echo_only = req.max_tokens == 0
        requested = 1 if echo_only else req.max_tokens
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        params = [request_params.sampling_params(
            req, max_tokens=self.max_tokens(req, len(ids), requested, 16),
            vocab_size=self.config.vocab_size, logprobs=req.logprobs,
            prompt_logprobs=prompt_logprobs, structured=structured) for ids in prompts]
        table = await self.table() if req.logprobs is not None else None
        rid = f"cmpl-{uuid.uuid4().hex}"
        handles = self.admit(rid, prompts, params, req.stream, req.cache_salt)
        choices = [CompletionChoice(i * req.n + j, prompts[i], texts[i] if req.echo and texts else None,
                                     table, echo_only, req.return_token_ids)
                   for i in range(len(prompts)) for j in range(req.n)]
        if req.stream:
            fmt = _ChunkFormatter(False, rid, int(time.time()), self.config.served_model_name,
                                  req.include_usage, req.return_token_ids)
            return _sse(self._stream(fmt, handles, prompts, req, choices))
        results = await _unless_disconnected(request, asyncio.gather(*(self.engine.results(h) for h in handles)))
        body_choices = []
        for i, (handle, outs) in enumerate(zip(handles, results, strict=True)):
            for out in outs:
                c = choices[i * req.n + out.index]
                body_choices.append(c.final(out, handle.logprobs.get(out.index, []), handle.prompt_logprobs))
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": self.config.served_model_name, "choices": body_choices,
                             "usage": _usage(sum(map(len, prompts)),
                                             sum(c.num_generated for c in choices))})

    async def chat(self, request: Request) -> Response:
        req = await self.parse(request, ChatCompletionRequest)
        ids, template = await self.render_chat(req)
        self.check_prompt(ids, "messages")
        style = self.tool_style(template) if req.uses_tools else None
        structured, param = structured_output(req, style, self.tokenizer)
        await self.check_structured(structured, param)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        params = request_params.sampling_params(
            req, max_tokens=self.max_tokens(req, len(ids), req.requested_max_tokens, None),
            vocab_size=self.config.vocab_size, logprobs=logprobs, prompt_logprobs=None,
            structured=structured)
        table = await self.table() if logprobs is not None else None
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handles = self.admit(rid, [ids], [params], req.stream, req.cache_salt)
        single = req.parallel_tool_calls is False
        choices = [ChatChoice(j, style, single, table, req.return_token_ids) for j in range(req.n)]
        if req.stream:
            fmt = _ChunkFormatter(True, rid, int(time.time()), self.config.served_model_name,
                                  req.include_usage, req.return_token_ids)
            return _sse(self._stream(fmt, handles, [ids], req, choices))
        outs = await _unless_disconnected(request, self.engine.results(handles[0]))
        body_choices = [choices[o.index].final(o, handles[0].logprobs.get(o.index, [])) for o in outs]
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                             "model": self.config.served_model_name, "choices": body_choices,
                             "usage": _usage(len(ids), sum(c.num_generated for c in choices))})

    async def _stream(self, fmt: _ChunkFormatter, handles: list[RequestHandle], prompts: list[list[int]],
                      req: CompletionRequest | ChatCompletionRequest,
                      choices: Sequence[CompletionChoice | ChatChoice]) -> AsyncIterator[str]:
        streams = [self.engine.stream(h) for h in handles]
        merged = _merge(streams)
        n = req.n
        # The plain case (no logprobs, tools or echo) keeps the pre-serialized fast path.
        plain = all(c.plain for c in choices)
        try:
            if fmt.chat:
                for c in choices:
                    yield fmt.chunk(c.index, "", None, None, role=True)
            async for i, batch in merged:
                if plain and n == 1:
                    out = batch[0] if len(batch) == 1 else None
                    text = out.new_text if out else "".join(o.new_text for o in batch)
                    ids = out.new_token_ids if out else [t for o in batch for t in o.new_token_ids]
                    choices[i].num_generated += len(ids)
                    yield fmt.chunk(i, text, ids, batch[-1].finish_reason)
                    continue
                for index, outs in by_index(batch).items():
                    piece = choices[i * n + index].piece(outs)
                    if piece is not None:
                        yield fmt.event(piece)
            if req.include_usage:
                yield fmt.usage(sum(map(len, prompts)), sum(c.num_generated for c in choices))
        except (EngineError, ValueError) as exc:
            err = (engine_api_error(exc) if isinstance(exc, EngineError)
                   else ApiError(400, str(exc), type="invalid_request_error"))
            yield f"data: {json.dumps(err.body())}\n\n"
        except (asyncio.CancelledError, GeneratorExit):  # the client went away mid-stream
            logger.info("a client hung up during a stream (%s); its request was aborted", fmt.request_id)
            raise
        finally:
            # Closing the streams aborts whatever has not finished (client gone, error).
            for gen in (merged, *streams):
                with contextlib.suppress(RuntimeError):
                    await gen.aclose()  # type: ignore[attr-defined]
        yield "data: [DONE]\n\n"

    async def detokenize_all(self, prompts: list[list[int]]) -> list[str]:
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer, so echo cannot give the prompt's text",
                           param="echo")
        return await self.tokenizers.run(lambda tok: [tok.decode(p) for p in prompts])

    # -- tokenizer routes ------------------------------------------------------------------

    async def tokenize_route(self, request: Request) -> dict[str, Any]:
        req = await self.parse(request, TokenizeRequest)
        if req.messages is not None:
            chat = ChatCompletionRequest(messages=req.messages, tools=req.tools,
                                         add_generation_prompt=req.add_generation_prompt is not False,
                                         chat_template=req.chat_template)
            chat.check_supported()
            ids, _ = await self.render_chat(chat)
        else:
            assert req.prompt is not None
            if self.tokenizer is None:
                raise ApiError(400, "this model has no tokenizer", param="prompt")
            text, special = req.prompt, req.add_special_tokens is not False
            ids = await self.tokenizers.run(lambda tok: list(tok(text, add_special_tokens=special).input_ids))
        return {"count": len(ids), "max_model_len": self.config.max_model_len, "tokens": ids}

    async def detokenize_route(self, request: Request) -> dict[str, Any]:
        req = await self.parse(request, DetokenizeRequest)
        if self.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer", param="tokens")
        bad = next((t for t in req.tokens if not 0 <= t < self.config.vocab_size), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary (0..{self.config.vocab_size - 1})",
                           param="tokens", code="invalid_value")
        tokens = req.tokens
        return {"prompt": await self.tokenizers.run(lambda tok: tok.decode(tokens))}
    # -- information -----------------------------------------------------------------------

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": self.started, "owned_by": "sagellm",
             "root": self.config.served_model_name, "max_model_len": self.config.max_model_len}
            for name in [self.config.served_model_name, *self.config.extra_model_names]]}

    def backends(self) -> dict[str, Any]:
        reg = self.config.registry
        if reg is None:
            return {"backends": [], "failures": [], "serving": {"name": self.config.backend}}
        choice = reg.auto_choice()
        return {
            "backends": [b.as_dict() for b in sorted(reg.backends.values(), key=lambda b: b.name)],
            "failures": [{"entry_point": f.entry_point, "distribution": f.distribution,
                          "error": f.error} for f in reg.failures],
            "clashes": {n: [b.distribution for b in bs] for n, bs in reg.clashes.items()},
            "auto": choice.name if choice else None,
            "serving": {"name": self.config.backend, "device": self.config.device_name},
        }


def _sse(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _log_stats(engine: EngineClient, interval: float) -> None:
    """One line per interval with throughput and load, while there is anything to report."""
    prev, prev_time = engine.snapshot, time.monotonic()
    while True:
        await asyncio.sleep(interval)
        s, now = engine.snapshot, time.monotonic()
        if not s.alive:  # the supervisor logs deaths and restarts; a dead engine has no load
            prev, prev_time = s, now
            continue
        dt = max(now - prev_time, 1e-9)
        prompt_tps = (s.num_prompt_tokens - prev.num_prompt_tokens) / dt
        gen_tps = (s.num_generation_tokens - prev.num_generation_tokens) / dt
        if prompt_tps or gen_tps or s.num_running or s.num_waiting:
            logger.info("prompt throughput %.1f tokens/s, generation throughput %.1f tokens/s, "
                        "running %d, waiting %d, KV usage %.1f%%", prompt_tps, gen_tps,
                        s.num_running, s.num_waiting, 100 * s.kv_usage)
        prev, prev_time = s, now


def create_app(engine: EngineClient, config: ServerConfig, tokenizer: Any,
               metrics: ServerMetrics | None = None,
               supervisor: EngineSupervisor | None = None) -> FastAPI:
    """The ASGI app; it starts ``engine``'s loop (and ``supervisor``, which restarts it or asks the
    server to exit when it dies) on start-up and stops both on shutdown."""
    metrics = metrics or engine.metrics or ServerMetrics(config.served_model_name)
    server = _Server(engine, config, tokenizer, metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start(asyncio.get_running_loop())
        if supervisor is not None:
            supervisor.start()
        await server.warm_grammar()
        logger_task = (asyncio.ensure_future(_log_stats(engine, config.log_interval))
                       if config.log_interval > 0 else None)
        try:
            yield
        finally:
            if logger_task is not None:
                logger_task.cancel()
            if supervisor is not None:
                await supervisor.stop()
            engine.shutdown()

    app = FastAPI(title="sageLLM", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if exc.status != 499:
            metrics.reject(exc.status)
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        if exc.status == 408:  # the rest of a timed-out body may still be coming: do not read it
            headers = {"Connection": "close"}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        err = ApiError(500, f"internal server error: {type(exc).__name__}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health(request: Request) -> Response:
        # Public: says up or down, never why (the cause is in the log).
        if engine.draining:
            err = ApiError(503, "the server is shutting down", type="service_unavailable_error",
                           code="shutting_down")
        elif not engine.is_alive:
            err = ApiError(503, "the engine is not running", type="service_unavailable_error",
                           code="engine_dead")
        else:
            err = None
        if request.method == "HEAD":
            return Response(status_code=200 if err is None else 503)
        if err is None:
            return JSONResponse({"status": "ok"})
        return JSONResponse(err.body(), status_code=503, headers={"Retry-After": "1"})

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": __version__, "sagellm_core": sagellm.__version__}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return server.models()

    @app.get("/v1/backends")
    async def backends() -> dict[str, Any]:
        return server.backends()

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await server.completions(request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await server.chat(request)

    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> dict[str, Any]:
        return await server.tokenize_route(request)

    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> dict[str, Any]:
        return await server.detokenize_route(request)

    app.add_middleware(GuardMiddleware, api_key=config.api_key,  # type: ignore[arg-type]
                       max_body_bytes=config.max_request_body_bytes, body_timeout=config.body_timeout)
    return app

