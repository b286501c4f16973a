"""Serving a model over HTTP as OpenAI's API does, to many clients at once, with a chat page.

    python serve.py --init random --preset mini --template alpaca   # then open http://127.0.0.1:8000/
    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "random", "prompt": "Every effort moves you", "max_tokens": 20}'

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (both
streamed as server-sent events with "stream": true) and the chat page at /.

How it is built. Python's standard library serves HTTP (ThreadingHTTPServer: one thread per
connection), which keeps the project's dependencies few and the whole server in this file; a thread
per client is cheap at the batch sizes a single model serves. One thread, the scheduler, owns the
model: the main thread, the one that loaded it (see Running).
Connection threads check a request, hand it to the scheduler through a bounded queue (full: 429)
and read its text back from a queue of its own.

Continuous batching. The scheduler keeps --max-batch slots and one KV cache with a row per slot.
Between decoding steps, waiting requests take free slots and their prompts are read into their rows
(those joining together in one forward pass, and a long prompt a chunk per step, so the others wait
for one chunk, not for the whole prompt); then one decoding step runs every row that is generating,
each at its own cache position; a request leaves its slot when it finishes, stops, or its client
goes away. Each row attends to its own
cache row only, at its own positions, so a request gets exactly the tokens generate.py gives it
alone, whatever shares the batch.
"""
import argparse
import hmac
import json
import os
import queue
import select
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
import torch.nn as nn

from common import ArgumentParser, SEED, UserError, positive_int, run_stage
from generate import (TextStream, check_sampling, encode_prompt, load_for_generation, next_logits, pack_for_cpu,
                      sample_next)
from load_gpt2 import add_init_args, tokenizer_for
from model import KVCache, add_device_args, device_and_dtype
from templates import FAMILY_TEMPLATES, TEMPLATES, Template, encode_template_text, stop_ids
from tokenizer_base import bos




API_KEY_ENV = "SERVE_API_KEY"  # the environment variable --api-key defaults to
MAX_BODY_BYTES = 1 << 20  # a request body above this is refused (413) before it is read
COMPLETION_DEFAULT_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions; chat's is the context
CHAT_PAGE = Path(__file__).with_name("serve_chat.html")


# ---------------------------------------------------------------------------------------------------
# A request as the scheduler sees it

class APIError(Exception):
    """An error answered as OpenAI answers it: {"error": {"message", "type", "param", "code"}} with a status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One request: its prompt and settings, its progress in the batch, and the queue its text goes to.

    events receives ("text", piece) as text becomes final, then ("end", finish_reason), or ("error",
    APIError) if it could not run. The scheduler writes every field below `events`; the connection
    thread only sets `cancelled` and reads the counts when the end has arrived."""
    ids: list[int]  # the prompt, BOS included
    max_new: int
    temperature: float
    top_k: int | None
    top_p: float | None
    generator: torch.Generator | None  # seeded: the request's own draws; None: torch's global ones
    stop_ids: set[int]  # tokens that end the answer (not part of it)
    text: TextStream  # watches for stop strings and holds back text that may begin one
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    arrived: float = field(default_factory=time.perf_counter)
    first_token: float | None = None  # when the first new token was sampled
    finished: float | None = None
    slot: int = -1
    fed: int = 0  # cache slots filled in its row: the prompt read so far, then each new token fed back
    new_tokens: int = 0
    last: int = -1  # the newest sampled token, fed to the model at the next step

    @property
    def generating(self) -> bool:
        return self.fed >= len(self.ids)


# ---------------------------------------------------------------------------------------------------
# The scheduler: one thread, the only one that touches the model

class Scheduler:
    """Runs every request through the model: continuous batching over `max_batch` slots.

    Each loop: drop cancelled requests, let waiting ones take free slots, read one chunk of each
    new prompt, then one decoding step for every slot that is generating."""

    def __init__(self, model: nn.Module, device: torch.device, max_batch: int, queue_size: int,
                 prefill_chunk: int, n_vocab: int, context: int):
        self.model, self.device, self.prefill_chunk, self.n_vocab = model, device, prefill_chunk, n_vocab
        dtype = next(p.dtype for p in model.parameters() if p.is_floating_point())
        # One row per slot, `context` tokens long; a step reads only the part in use (KVCache.part).
        self.cache = KVCache(model.config, max_batch, context, device, dtype)
        self.slots: list[Job | None] = [None] * max_batch
        self.waiting: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.closing = threading.Event()
        self.tokens_done = 0  # new tokens over the server's life, for the load line

    def submit(self, job: Job) -> None:
        """Queue a job; APIError 429 if the queue is full, 503 once the server is closing."""
        if self.closing.is_set():
            raise APIError(503, "the server is shutting down; try again later", type="server_error")
        try:
            self.waiting.put_nowait(job)
        except queue.Full:
            raise APIError(429, "the server is busy: every slot is taken and the queue is full; retry shortly",
                           type="rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"}) from None

    def running(self) -> int:
        return sum(job is not None for job in self.slots)

    def run(self, log: "Log") -> None:
        """The loop; returns once closing is set and every admitted request has finished."""
        stopping = False
        while True:
            self.drop_cancelled()
            self.admit(block=self.running() == 0)
            if self.closing.is_set() and not stopping:
                stopping = True
                log.line(f"stopping: finishing the requests in flight ({self.running()})")
            if stopping and self.running() == 0:
                self.refuse_waiting()
                return
            try:
                with torch.inference_mode():
                    self.prefill()
                    self.decode()
            except Exception as e:  # a bug or out of memory: fail these requests, keep serving
                log.line(f"error in the batch ({type(e).__name__}: {e}); its requests were ended with a 500")
                for job in filter(None, self.slots):
                    self.finish(job, error=APIError(500, "the server failed to run this request", type="server_error"))
            log.load(self)

    def drop_cancelled(self) -> None:
        for job in filter(None, self.slots):
            if job.cancelled.is_set():
                self.finish(job, "cancelled")

    def admit(self, block: bool) -> None:
        """Move waiting jobs into free slots, lowest first (so a step's rows stay few); wait a little
        for one when nothing runs, instead of spinning."""
        for slot in [i for i, job in enumerate(self.slots) if job is None]:
            if self.closing.is_set():
                return
            try:
                job = self.waiting.get(timeout=0.1) if block else self.waiting.get_nowait()
            except queue.Empty:
                return
            block = False
            if job.cancelled.is_set():
                continue
            self.cache.valid[slot].zero_()  # whatever the row held before is not this prompt's
            job.slot, self.slots[slot] = slot, job

    def refuse_waiting(self) -> None:
        while True:
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                return
            job.events.put(("error", APIError(503, "the server shut down before this request started",
                                              type="server_error")))

    def prefill(self) -> None:
        """Read the next chunk (up to prefill_chunk tokens) of every prompt still being read, all in one
        forward pass; a prompt's last chunk gives its request's first token.

        The chunks are left-padded to one length T, so each row's last token is in the last column,
        where last_only reads the logits. Padding goes to the slot just after its row's chunk, masked
        out (attention_mask) and written again before anything reads it; rows in the span that are not
        reading a prompt get padding only, at their next slot."""
        jobs = [job for job in self.slots if job is not None and not job.generating]
        if not jobs:
            return
        first, span = min(job.slot for job in jobs), max(job.slot for job in jobs) + 1
        chunks = {job.slot: job.ids[job.fed:job.fed + self.prefill_chunk] for job in jobs}
        T = max(len(chunk) for chunk in chunks.values())
        ids = torch.zeros(span - first, T, dtype=torch.long)
        real = torch.zeros(span - first, T, dtype=torch.long)
        slots = torch.zeros(span - first, T, dtype=torch.long)  # (rows, T): where each token goes in its cache row
        for row, job in enumerate(self.slots[first:span]):
            chunk = chunks.get(first + row, [])
            start = job.fed if job is not None else 0
            slots[row] = start + len(chunk)  # padding
            if chunk:
                ids[row, T - len(chunk):] = torch.tensor(chunk)
                real[row, T - len(chunk):] = 1
                slots[row, T - len(chunk):] = torch.arange(start, start + len(chunk))
        part = self.cache.part(slice(first, span), int(slots.max()) + 1)
        logits = next_logits(self.model, ids.to(self.device), None, attention_mask=real.to(self.device),
                             kv_cache=part, cache_positions=slots.to(self.device))  # (rows, V)
        for job in jobs:
            job.fed += len(chunks[job.slot])
            if job.generating:
                self.accept(job, logits[job.slot - first])

    def decode(self) -> None:
        """One step for every generating row: feed each its last token at its own next cache slot.

        The step covers rows 0..span-1 and cache slots 0..length-1, the part in use. Rows in that
        span that are not generating (free, or still reading a prompt) are fed a dummy token at a
        slot that is free or will be written again before it is read, so they change nothing."""
        rows = [job for job in self.slots if job is not None and job.generating]
        if not rows:
            return
        span = max(job.slot for job in rows) + 1
        tokens = torch.zeros(span, 1, dtype=torch.long)
        slots = torch.zeros(span, 1, dtype=torch.long)  # where each row's token goes in its cache row
        for i, job in enumerate(self.slots[:span]):
            if job is not None:
                tokens[i, 0], slots[i, 0] = max(job.last, 0), job.fed
        part = self.cache.part(slice(0, span), int(slots.max()) + 1)
        logits = next_logits(self.model, tokens.to(self.device), None, kv_cache=part,
                             cache_positions=slots.to(self.device))  # (span, V)
        for job in rows:
            job.fed += 1
            self.accept(job, logits[job.slot])

    def accept(self, job: Job, logits: torch.Tensor) -> None:
        """Sample the job's next token from its logits (V,), pass on the text it completes, and end
        the job at a stop token, a stop string, or max_new tokens."""
        token = int(sample_next(logits[None, :self.n_vocab], job.temperature, job.top_k, job.top_p, job.generator)[0])
        job.new_tokens += 1
        self.tokens_done += 1
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if token in job.stop_ids:
            return self.finish(job, "stop", job.text.flush())  # with any text held back as a possible stop string
        piece = job.text.push(token)
        if job.text.stopped:
            self.finish(job, "stop", piece)
        elif job.new_tokens == job.max_new:
            self.finish(job, "length", piece + job.text.flush())
        else:
            job.last = token
            if piece:
                job.events.put(("text", piece))

    def finish(self, job: Job, reason: str | None = None, piece: str = "", error: APIError | None = None) -> None:
        if piece:
            job.events.put(("text", piece))
        job.finished = time.perf_counter()
        job.events.put(("error", error) if error else ("end", reason))
        self.slots[job.slot] = None


# ---------------------------------------------------------------------------------------------------
# Reading a request's JSON into a Job

COMMON_FIELDS = {"model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "stop", "seed",
                 "stream", "stream_options", "n", "user"}
FIELDS = {"completions": COMMON_FIELDS | {"prompt"}, "chat": COMMON_FIELDS | {"messages"}}


def number(body: dict, name: str, kind: type, low: float, high: float, default=None):
    """body[name] checked to be a number of kind (int or float) in [low, high]; default if absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise APIError(400, f"{name} must be {'a whole number' if kind is int else 'a number'}, not {value!r}", name)
    if not low <= value <= high:
        raise APIError(400, f"{name} must be between {low} and {high}, not {value}", name)
    return kind(value)


def stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not 1 <= len(stops) <= 4 or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "stop must be a non-empty string or a list of 1 to 4 of them", "stop")
    return stops


def check_fields(body, kind: str, model_name: str) -> None:
    """Refuse what we would otherwise ignore: unknown fields by name, n other than 1, another model."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS[kind])
    if unknown:
        raise APIError(400, f"{unknown[0]} is not supported by this server", unknown[0], "unsupported_parameter")
    if body.get("n", 1) != 1:
        raise APIError(400, "n must be 1: this server returns one choice per request", "n", "unsupported_value")
    if "model" not in body:
        raise APIError(400, f"model is required; this server serves {model_name!r}", "model")
    if body["model"] != model_name:
        raise APIError(404, f"the model {body['model']!r} does not exist; this server serves {model_name!r}",
                       "model", "model_not_found")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise APIError(400, "stream must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}
                                or not isinstance(options.get("include_usage", False), bool)):
        raise APIError(400, "stream_options may only hold include_usage, true or false", "stream_options")


def message_text(message, index: int) -> tuple[str, str]:
    """(role, text) of one chat message; content is a string or a list of text parts."""
    if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
        raise APIError(400, f"messages[{index}] must have a role of system, user or assistant", "messages")
    content = message.get("content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise APIError(400, f"messages[{index}].content must be text", "messages")
    return message["role"], content


def chat_ids(tokenizer, template: Template, messages) -> list[int]:
    """A conversation as the model reads it: each user turn in the template's prompt, each earlier
    answer after it, closed as finetuning closes an answer (response_end, then the end token).

    The system messages go before the first user message, as the templates have no slot of their own
    for them. A single user message gives templates.prompt_ids' ids, which finetune_instruct trained on."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    turns = [message_text(m, i) for i, m in enumerate(messages)]
    system = "\n\n".join(text for role, text in turns if role == "system")
    turns = [(role, text) for role, text in turns if role != "system"]
    roles = [role for role, _ in turns]
    if not roles or roles != ["user", "assistant"] * (len(roles) // 2) + ["user"]:
        raise APIError(400, "after any system messages, messages must alternate user and assistant, starting and "
                            "ending with user", "messages")
    ids = bos(tokenizer)
    for i in range(0, len(turns), 2):
        user = f"{system}\n\n{turns[i][1]}" if i == 0 and system else turns[i][1]
        ids += encode_template_text(tokenizer, template.prompt(user, ""), template)
        if i + 1 < len(turns):
            ids += tokenizer.encode_ordinary(turns[i + 1][1])
            ids += encode_template_text(tokenizer, template.response_end, template) + [tokenizer.eos_id]
    return ids


def completion_prompt(tokenizer, prompt) -> list[int]:
    """/v1/completions' prompt: a string (or a list holding one), encoded as generate.py encodes --prompt,
    or a list of token ids."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in prompt):
        return prompt
    raise APIError(400, "prompt must be a string or a list of token ids (one prompt per request)", "prompt")


# ---------------------------------------------------------------------------------------------------
# The server's state, shared by every connection thread

class App:
    """The model's name, tokenizer, template, scheduler and log, and the checks that make a Job."""

    def __init__(self, name: str, tokenizer, template: Template | None, scheduler: Scheduler, api_key: str | None,
                 context: int, vocab_size: int, log: "Log"):
        self.name, self.tokenizer, self.template, self.scheduler = name, tokenizer, template, scheduler
        self.api_key, self.context, self.vocab_size, self.log = api_key, context, vocab_size, log
        self.created = int(time.time())
        self.in_flight = 0  # requests between arrival and their last byte, for a clean shutdown
        self.lock = threading.Condition()

    def make_job(self, body: dict, kind: str) -> Job:
        check_fields(body, kind, self.name)
        if kind == "chat":
            if self.template is None:
                raise APIError(400, f"the model {self.name!r} has no chat template: use /v1/completions, or serve it "
                                    f"with --template ({', '.join(TEMPLATES)})", "messages", "no_chat_template")
            ids, ends = chat_ids(self.tokenizer, self.template, body.get("messages")), self.template.stops
            stops = stop_ids(self.tokenizer, self.template)
        else:
            if "prompt" not in body:
                raise APIError(400, "prompt is required", "prompt")
            ids, ends, stops = completion_prompt(self.tokenizer, body["prompt"]), (), {self.tokenizer.eos_id}
        if max(ids) >= min(self.vocab_size, self.tokenizer.n_vocab):
            raise APIError(400, f"the prompt has a token id of {max(ids)}, beyond this model's vocabulary", "prompt")
        room = self.context - len(ids)
        if room < 1:
            raise APIError(400, f"the prompt has {len(ids)} tokens, which fills the context of "
                                f"{self.context} tokens; shorten it", "messages" if kind == "chat" else "prompt",
                           "context_length_exceeded")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        default = room if kind == "chat" else min(COMPLETION_DEFAULT_TOKENS, room)
        max_new = number(body, name, int, 1, 2**31, default)
        if max_new > room:
            raise APIError(400, f"the prompt has {len(ids)} tokens and {name} is {max_new}, more than the "
                                f"context of {self.context} tokens", name, "context_length_exceeded")
        return self.sampled_job(body, ids, max_new, stops, [*ends, *stop_strings(body)])

    def sampled_job(self, body: dict, ids: list[int], max_new: int, stops: set[int], strings: list[str]) -> Job:
        temperature = number(body, "temperature", float, 0, 2, 1.0)
        top_p = number(body, "top_p", float, 0, 1, 1.0)
        top_k = number(body, "top_k", int, 1, 2**31, None)
        seed = number(body, "seed", int, 0, 2**63 - 1, None)
        if top_p == 0:
            raise APIError(400, "top_p must be above 0", "top_p")
        check_sampling(temperature, top_k, top_p)
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.scheduler.device).manual_seed(seed)
        text = TextStream(self.tokenizer.decode, strings, prefix=ids)
        return Job(ids, max_new, temperature, top_k, None if top_p == 1 else top_p, generator, stops, text)


# ---------------------------------------------------------------------------------------------------
# The log: one line per request, and a line of the load while it serves

class Log:
    def __init__(self, stream=sys.stderr, interval: float = 2.0):
        self.stream, self.interval = stream, interval
        self.lock = threading.Lock()
        self.last_load, self.last_tokens = time.perf_counter(), 0
        self.rewrite = stream.isatty()  # on a terminal the load line rewrites itself; elsewhere it is a line

    def line(self, text: str) -> None:
        with self.lock:
            print(("\r\033[K" if self.rewrite else "") + text, file=self.stream, flush=True)

    def request(self, rid: str, status: int, job: Job | None, note: str = "") -> None:
        if job is None or job.first_token is None:
            self.line(f"{rid} {status} {note}".rstrip())
            return
        end = job.finished or time.perf_counter()
        rate = (job.new_tokens - 1) / (end - job.first_token) if job.new_tokens > 1 and end > job.first_token else 0.0
        self.line(f"{rid} {status} prompt {len(job.ids)} completion {job.new_tokens} tokens, first after "
                  f"{job.first_token - job.arrived:.3f} s, {rate:.1f} tokens/s {note}".rstrip())

    def load(self, scheduler: Scheduler) -> None:
        now = time.perf_counter()
        if now - self.last_load < self.interval or (scheduler.running() == 0 and not self.rewrite):
            return
        rate = (scheduler.tokens_done - self.last_tokens) / (now - self.last_load)
        self.last_load, self.last_tokens = now, scheduler.tokens_done
        text = (f"load: {scheduler.running()}/{len(scheduler.slots)} slots busy, {scheduler.waiting.qsize()} waiting, "
                f"{rate:.1f} tokens/s, {scheduler.tokens_done} tokens served")
        with self.lock:
            print(f"\r\033[K{text}" if self.rewrite else text, end="" if self.rewrite else "\n", file=self.stream,
                  flush=True)


# ---------------------------------------------------------------------------------------------------
# The responses, as OpenAI writes them

def usage(job: Job) -> dict:
    return {"prompt_tokens": len(job.ids), "completion_tokens": job.new_tokens,
            "total_tokens": len(job.ids) + job.new_tokens}


def choice(kind: str, text: str | None, finish_reason: str | None, stream: bool, role: bool = False) -> dict:
    """One entry of "choices": a completion's text, a chat message, or (streamed) a chat delta."""
    if kind == "completions":
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    if not stream:
        return {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                "finish_reason": finish_reason}
    delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}


def envelope(kind: str, rid: str, created: int, model: str, stream: bool) -> dict:
    objects = {("completions", False): "text_completion", ("completions", True): "text_completion",
               ("chat", False): "chat.completion", ("chat", True): "chat.completion.chunk"}
    return {"id": rid, "object": objects[kind, stream], "created": created, "model": model}


def compact(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


# ---------------------------------------------------------------------------------------------------
# HTTP: one handler per connection thread

class Handler(BaseHTTPRequestHandler):
    """Routes a request, checks it, hands it to the scheduler and writes the answer back.

    HTTP/1.1: a JSON answer carries its Content-Length, a stream is sent chunked, and the connection
    stays open for the client's next request. A client that goes away is noticed (a failed write, or
    the socket read as closed while we wait) and its request cancelled."""
    protocol_version = "HTTP/1.1"
    server_version = "llm-lifecycle-serve"
    timeout = 60  # an idle kept-alive connection is closed after this many seconds

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format, *args) -> None:
        pass  # the App's log writes one line per request instead

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (a malformed request line, headers too long) in OpenAI's shape."""
        self.close_connection = True
        self.send_json(code, APIError(code, message or "bad request").body())

    def send_json(self, status: int, body: dict, headers: dict | None = None) -> None:
        data = compact(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def fail(self, error: APIError, rid: str = "-", job: Job | None = None) -> None:
        self.send_json(error.status, error.body(), error.headers)
        self.app.log.request(rid, error.status, job, f"{self.command} {self.path}: {error.message}")

    def do_GET(self) -> None:
        self.route("GET")

    def do_POST(self) -> None:
        self.route("POST")

    def do_DELETE(self) -> None:
        self.route("DELETE")

    def do_PUT(self) -> None:
        self.route("PUT")

    def route(self, method: str) -> None:
        path = self.path.split("?", 1)[0]
        routes = {"/": self.page, "/health": self.health, "/v1/models": self.models,
                  "/v1/completions": self.completions, "/v1/chat/completions": self.chat}
        wanted = "POST" if path in ("/v1/completions", "/v1/chat/completions") else "GET"
        try:
            if path not in routes:
                raise APIError(404, f"there is no route {method} {path}", code="not_found")
            if method != wanted:
                raise APIError(405, f"{path} takes {wanted}, not {method}", code="method_not_allowed")
            if path.startswith("/v1/"):
                self.authorize()
            routes[path]()
        except APIError as e:
            self.fail(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True  # the client went away mid-answer: nothing left to tell it
        except Exception as e:  # a bug: one line in the log, a 500 to the client, and keep serving
            self.close_connection = True
            self.app.log.line(f"error answering {method} {path}: {type(e).__name__}: {e}")
            try:
                self.fail(APIError(500, "the server failed to answer this request", type="server_error"))
            except OSError:
                pass

    def authorize(self) -> None:
        sent = self.headers.get("Authorization", "").encode()
        if self.app.api_key and not hmac.compare_digest(sent, f"Bearer {self.app.api_key}".encode()):  # constant time
            raise APIError(401, "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    def page(self) -> None:
        data = CHAT_PAGE.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def health(self) -> None:
        scheduler = self.app.scheduler
        self.send_json(200, {"status": "closing" if scheduler.closing.is_set() else "ok",
                             "running": scheduler.running(), "waiting": scheduler.waiting.qsize()})

    def models(self) -> None:
        self.send_json(200, {"object": "list", "data": [{"id": self.app.name, "object": "model",
                                                         "created": self.app.created, "owned_by": "llm-lifecycle"}]})

    def read_body(self):
        """The request's JSON body; APIError 400 (not JSON, no length) or 413 (too long, left unread)."""
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            raise APIError(400, "the request needs a Content-Length header and a JSON body")
        if int(length) > MAX_BODY_BYTES:
            self.close_connection = True  # the body stays unread, so this connection cannot carry another request
            raise APIError(413, f"the request body has {int(length)} bytes; the limit is {MAX_BODY_BYTES}",
                           code="request_too_large")
        try:
            return json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise APIError(400, f"the request body is not valid JSON ({e})") from None

    def completions(self) -> None:
        self.answer("completions")

    def chat(self) -> None:
        self.answer("chat")

    def answer(self, kind: str) -> None:
        body = self.read_body()
        job = self.app.make_job(body, kind)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        with self.app.lock:
            self.app.in_flight += 1
        try:
            self.app.scheduler.submit(job)
            if body.get("stream"):
                include_usage = (body.get("stream_options") or {}).get("include_usage", False)
                status = self.stream(kind, rid, job, include_usage)
            else:
                status = self.whole(kind, rid, job)
            self.app.log.request(rid, status, job, "" if status == 200 else "client went away, cancelled")
        finally:
            job.cancelled.set()  # a no-op for a finished job; frees the slot of one whose client left
            with self.app.lock:
                self.app.in_flight -= 1
                self.app.lock.notify_all()

    def next_event(self, job: Job) -> tuple[str, object] | None:
        """The job's next event; None if the client closed its connection while we waited."""
        while True:
            try:
                return job.events.get(timeout=0.1)
            except queue.Empty:
                if self.client_gone():
                    return None

    def client_gone(self) -> bool:
        """Whether the client closed its end: the socket reads as ready with nothing to read."""
        try:
            ready, _, _ = select.select([self.connection], [], [], 0)
            return bool(ready) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def whole(self, kind: str, rid: str, job: Job) -> int:
        """Wait for the whole answer, then send it as one JSON object."""
        pieces = []
        while (event := self.next_event(job)) is not None:
            what, value = event
            if what == "text":
                pieces.append(value)
            elif what == "error":
                raise value
            else:
                body = envelope(kind, rid, int(time.time()), self.app.name, stream=False)
                body["choices"] = [choice(kind, "".join(pieces), value, stream=False)]
                body["usage"] = usage(job)
                self.send_json(200, body)
                return 200
        return 499  # nginx's number for "the client closed the request"

    def stream(self, kind: str, rid: str, job: Job, include_usage: bool) -> int:
        """Send the answer as server-sent events as it is written: `data: {json}` per piece, [DONE] last."""
        first = self.next_event(job)
        if first is None:
            return 499
        if first[0] == "error":
            raise first[1]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        head = envelope(kind, rid, int(time.time()), self.app.name, stream=True)
        extra = {"usage": None} if include_usage else {}
        try:
            if kind == "chat":
                self.send_event({**head, "choices": [choice(kind, None, None, True, role=True)], **extra})
            event = first
            while event is not None:
                what, value = event
                if what == "error":  # the batch failed mid-answer: the stream ends without a finish reason
                    self.send_event({"error": value.body()["error"]})
                    break
                finish = value if what == "end" else None
                self.send_event({**head, "choices": [choice(kind, value if what == "text" else None, finish, True)],
                                 **extra})
                if what == "end":
                    if include_usage:
                        self.send_event({**head, "choices": [], "usage": usage(job)})
                    break
                event = self.next_event(job)
            if event is None:
                return 499
            self.write_chunk(b"data: [DONE]\n\n")
            self.write_chunk(b"")
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
            return 499
        return 200

    def send_event(self, value: dict) -> None:
        self.write_chunk(b"data: " + compact(value) + b"\n\n")

    def write_chunk(self, data: bytes) -> None:
        """One piece of a chunked body (an empty one ends the body)."""
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()


class Server(ThreadingHTTPServer):
    daemon_threads = True  # an idle kept-alive connection must not hold the process open at exit
    allow_reuse_address = True
    request_queue_size = 128  # connections the kernel holds before we accept them (socketserver's 5 resets a burst)

    def __init__(self, address: tuple[str, int], app: App):
        super().__init__(address, Handler)
        self.app = app

    def handle_error(self, request, client_address) -> None:
        """An error outside a handler's own try (a connection reset while reading the request line):
        one line, no traceback."""
        self.app.log.line(f"connection from {client_address[0]} ended with {sys.exc_info()[0].__name__}")


# ---------------------------------------------------------------------------------------------------
# Starting and stopping

def template_for(extra: dict, name: str | None) -> Template | None:
    """--template if given, else the template the model was finetuned with (our checkpoints record it),
    else its family's chat format; a base model (GPT-2, a random one) has none."""
    name = name or extra.get("template") or FAMILY_TEMPLATES.get(extra.get("model_type"))
    return TEMPLATES[name] if name else None


class Running:
    """A server that is up: its URL, and close() to stop it (what Ctrl-C does).

    HTTP runs in background threads. The scheduler runs in a thread of its own (what tests start
    in-process), or with in_thread=False in the caller's own thread, through serve_here(): what
    `python serve.py` does, so the model runs in the thread that loaded it. A model loaded in one
    thread and run in another decodes markedly slower on a CPU: each thread that runs parallel
    kernels gets its own team of OpenMP threads, and two teams share the cores."""

    def __init__(self, app: App, server: Server, in_thread: bool = True):
        self.app, self.server = app, server
        host, port = server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.scheduler_thread = None
        if in_thread:
            self.scheduler_thread = threading.Thread(target=self.serve_here, name="scheduler", daemon=True)
            self.scheduler_thread.start()
        self.http_thread = threading.Thread(target=server.serve_forever, args=(0.1,), name="http", daemon=True)
        self.http_thread.start()

    def serve_here(self) -> None:
        """Run the scheduler in this thread until app.scheduler.closing is set and what is in flight is done."""
        self.app.scheduler.run(self.app.log)

    def close(self, timeout: float = 60.0) -> None:
        """Stop taking requests, let those in flight finish (their clients get the whole answer), then
        stop: queued ones that never started are answered 503."""
        if not self.app.scheduler.closing.is_set():  # after Ctrl-C it is, and main's handler may set it again
            self.app.scheduler.closing.set()  # from here a new request is answered 503
        self.server.shutdown()  # the accept loop ends; open connections keep their threads
        if self.scheduler_thread is not None:
            self.scheduler_thread.join(timeout)
        deadline = time.perf_counter() + timeout
        with self.app.lock:  # wait for the last bytes of every answer to be written
            while self.app.in_flight and time.perf_counter() < deadline:
                self.app.lock.wait(0.1)
        self.server.server_close()
        # Free the model's tensors here, in the closing thread: left to whichever connection thread
        # lets go of the server last, they could be freed while the interpreter exits, and a thread
        # that frees a tensor then is stopped in a way that aborts the process.
        self.app.scheduler.model = self.app.scheduler.cache = None


def start(args: argparse.Namespace, log: Log | None = None, in_thread: bool = True) -> Running:
    """Load the model and start serving it: in background threads, or with in_thread=False, HTTP in
    the background and the scheduler left to the caller's Running.serve_here()."""
    device, dtype = device_and_dtype(args.device, args.dtype)
    torch.manual_seed(args.seed)  # --init random builds the weights generate.py builds with this seed
    model, extra = load_for_generation(args.init, preset=args.preset, device=device, dtype=dtype,
                                       quantize=args.quantize)
    if model.config.num_classes is not None:
        raise UserError(f"{args.init} is a classifier with {model.config.num_classes} classes; it cannot generate text")
    # generate.py's own kernels on a CPU (packed float32 weights), so each request's numbers are generate.py's
    model = pack_for_cpu(model.eval())
    tokenizer = tokenizer_for(extra)
    log = log or Log()
    context = min(model.config.block_size, args.context)
    scheduler = Scheduler(model, device, args.max_batch, args.queue_size, args.prefill_chunk, tokenizer.n_vocab,
                          context)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    app = App(args.model_name or args.init, tokenizer, template_for(extra, args.template), scheduler, api_key,
              context, model.config.vocab_size, log)
    try:
        server = Server((args.host, args.port), app)
    except OSError as e:
        raise UserError(f"cannot listen on {args.host}:{args.port} ({e.strerror or e}); choose another --port") from None
    return Running(app, server, in_thread)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_init_args(p, "gpt2", what="the model to serve")
    p.add_argument("--seed", type=int, default=SEED, help="the seed --init random builds its weights with")
    add_device_args(p, dtype_help="weights and compute (bfloat16 halves the weights' memory, on a CPU too)")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: every matrix stored as int8 with one scale per output channel. Default: none")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="the port to listen on (0: any free one)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/ requests (default: ${API_KEY_ENV}, if set)")
    p.add_argument("--model-name", default=None, help="the model's id in the API (default: --init)")
    p.add_argument("--template", default=None, choices=list(TEMPLATES),
                   help="the chat template (default: the one the model was finetuned with, else its family's; "
                        "base models have none and answer completions only)")
    p.add_argument("--max-batch", type=positive_int, default=8, help="requests decoded together (slots)")
    p.add_argument("--queue-size", type=positive_int, default=32,
                   help="requests that may wait for a slot; more are refused with 429")
    p.add_argument("--context", type=positive_int, default=4096,
                   help="the most tokens a request may have, prompt and answer (at most the model's context); "
                        "each slot's KV cache is this long")
    p.add_argument("--prefill-chunk", type=positive_int, default=256,
                   help="prompt tokens read per step for a new request, so a long prompt stalls the others little")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    running = start(args, in_thread=False)
    closing = running.app.scheduler.closing

    def on_signal(signum, frame):
        # serve_here finishes what is in flight and returns. Event.set takes the Event's own lock, which
        # this thread never holds while serving (it only reads is_set), so the handler cannot deadlock.
        closing.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C stops at once

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    running.app.log.line(f"serving {running.app.name} at {running.url}/ (OpenAI API under /v1/); Ctrl-C stops")
    try:
        running.serve_here()
    except KeyboardInterrupt:  # a second Ctrl-C: stop at once, without waiting for answers to be written
        running.close(timeout=0)
        raise
    running.close()
    running.app.log.line("stopped")
    return {"url": running.url, "tokens": running.app.scheduler.tokens_done}


if __name__ == "__main__":
    run_stage(main, parse_args)
