"""LLM roles on a local Hugging Face Qwen2 checkpoint, sampled in process by the generation engine.

    model = shared_model("~/models/qwen2.5-0.5b-instruct")   # loaded once per folder, per process
    [future] = model.batcher.submit([LocalRequest(messages, SamplingParams(max_new_tokens=64, temperature=0.0))])
    future.result().choices[0].text

Three parts, each for one job:

- `shared_model(folder)`: the process-wide registry of loaded models keyed by the folder's resolved
  path, so frozen copies of one checkpoint (the simulated user, both judges, the evaluation's
  judge) hold one set of weights and feed one batcher.
- `MicroBatcher`: one worker thread in front of a model's engine. Requests that arrive while a
  generation call runs, or within `window_s` of the oldest waiting one, go into the next call: one
  call per sampling setting (temperature, max_tokens, ...), at most `max_batch_size` rows each,
  padded to a power of two (copies of its last prompt, answers dropped) so that a server seeing
  every batch size compiles a handful of programs, not one per size.
  Threads (launch/serve.py's request handlers) and event loops (LocalTransport) submit alike.
- `LocalTransport`: the LLM client's asyncio side. Every request made in one event-loop turn (a
  role's `complete_many`: a whole turn's requests) is handed to the batcher together, so they are
  one generation call however the worker thread is scheduled.

Sampling: temperature 0 is greedy; otherwise a call's key is derived from its prompts and settings
(a hash folded into `seed`), so the same batch samples the same answers in every run, however the
calls of other roles interleave with it.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import jax

from rlpa_jax.generation.engine import ChatModel
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model import hf
from rlpa_jax.model.checkpoint_folder import hf_folder, is_gguf

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 0.005  # how long the oldest waiting request waits for company when the engine is idle
RECENT_CALLS = 1000  # batch sizes kept for /v1/stats


class RejectedRequest(ValueError):
    """A request this model cannot answer (too long for its context, messages its chat template
    refuses); only that request fails."""


@dataclasses.dataclass(frozen=True)
class LocalRequest:
    """One chat request: OpenAI-style messages, how to sample, and strings that end the reply
    (applied to the decoded text: generation itself stops at the model's stop tokens)."""

    messages: Sequence[Mapping[str, Any]]
    sampling: SamplingParams
    stop: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class LocalChoice:
    text: str
    finish_reason: str  # "stop": a stop token or stop string ended it; "length": max_new_tokens did


@dataclasses.dataclass(frozen=True)
class LocalReply:
    """A request's `sampling.num_samples` choices and its real token counts."""

    choices: list[LocalChoice]
    prompt_tokens: int
    completion_tokens: int

    @property
    def text(self) -> str:
        return self.choices[0].text


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """`text` up to the first of the `stop` strings, and whether one was found."""
    found = [i for i in (text.find(s) for s in stop if s) if i >= 0]
    return (text[:min(found)], True) if found else (text, False)


def padded_rows(count: int, limit: int | None) -> int:
    """The rows of a call of `count` requests: the next power of two, but never past `limit`."""
    rows = 1 << (count - 1).bit_length()
    return max(count, min(rows, limit)) if limit is not None else rows


def call_key(seed: int, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> jax.Array:
    """A sampled call's key: a hash of its prompts and settings folded into `seed` (the same
    batch draws the same samples whatever ran before it)."""
    digest = hashlib.sha256(repr((sampling, [list(p) for p in prompts])).encode()).digest()
    return jax.random.fold_in(jax.random.key(seed), int.from_bytes(digest[:4], "little") >> 1)


@dataclasses.dataclass
class _Waiting:
    request: LocalRequest
    future: concurrent.futures.Future
    max_batch_size: int | None
    arrived: float


class MicroBatcher:
    """Batches concurrent chat requests into shared generation calls on one worker thread."""

    def __init__(self, chat: ChatModel, *, window_s: float = DEFAULT_WINDOW_S, max_batch_size: int | None = None,
                 seed: int = 0, log_level: int = logging.DEBUG):
        if window_s < 0 or (max_batch_size is not None and max_batch_size < 1):
            raise ValueError(f"MicroBatcher: window_s={window_s} must be >= 0 and max_batch_size={max_batch_size} "
                             ">= 1 (or None)")
        self.chat, self.window_s, self.max_batch_size, self.seed = chat, window_s, max_batch_size, seed
        self.log_level = log_level
        self.max_positions = chat.engine.model_config.max_position_embeddings
        self.calls = 0
        self.requests = 0
        self.recent_batch_sizes: collections.deque[int] = collections.deque(maxlen=RECENT_CALLS)
        self._waiting: list[_Waiting] = []
        self._condition = threading.Condition()
        self._worker: threading.Thread | None = None

    def submit(self, requests: Sequence[LocalRequest], max_batch_size: int | None = None
               ) -> list[concurrent.futures.Future]:
        """A future per request (its LocalReply, or the error that request met), in order; all of
        `requests` wait together, so they share the next call (up to the batch size)."""
        now = time.monotonic()
        futures = [concurrent.futures.Future() for _ in requests]
        with self._condition:
            if self._worker is None:
                self._worker = threading.Thread(target=self._serve_forever, name="local-llm-batcher", daemon=True)
                self._worker.start()
            self._waiting += [_Waiting(r, f, max_batch_size, now) for r, f in zip(requests, futures)]
            self._condition.notify()
        return futures

    def stats(self) -> dict[str, float | int | list[int]]:
        """Calls made, requests served and the mean batch size (what the batching achieved)."""
        return {"calls": self.calls, "requests": self.requests,
                "mean_batch_size": self.requests / self.calls if self.calls else 0.0,
                "recent_batch_sizes": list(self.recent_batch_sizes)}

    # ------------------------------------------------------------------------------ the worker

    def _serve_forever(self) -> None:
        while True:
            with self._condition:
                while not self._waiting:
                    self._condition.wait()
                # The engine is idle: give the oldest request's company `window_s` to arrive.
                while (left := self._waiting[0].arrived + self.window_s - time.monotonic()) > 0:
                    self._condition.wait(left)
                waiting, self._waiting = self._waiting, []
            for call, limit in self._calls_of(self._prepared(waiting)):
                self._generate(call, limit)

    def _prepared(self, waiting: list[_Waiting]) -> list[tuple[_Waiting, list[int]]]:
        """Each request with its prompt ids; one that cannot be sampled fails alone."""
        prepared = []
        for item in waiting:
            if not item.future.set_running_or_notify_cancel():
                continue
            try:
                prepared.append((item, self._prompt_ids(item.request)))
            except RejectedRequest as error:
                item.future.set_exception(error)
        return prepared

    def _prompt_ids(self, request: LocalRequest) -> list[int]:
        try:
            ids = self.chat.prompt_ids(request.messages)
        except Exception as error:  # jinja's errors, a message the template cannot render
            raise RejectedRequest(f"the chat template refuses these messages: {error}") from None
        if len(ids) + request.sampling.max_new_tokens > self.max_positions:
            raise RejectedRequest(f"the prompt's {len(ids)} tokens plus max_tokens={request.sampling.max_new_tokens} "
                                  f"exceed the model's context of {self.max_positions} tokens")
        return ids

    def _calls_of(self, prepared: list[tuple[_Waiting, list[int]]]
                  ) -> list[tuple[list[tuple[_Waiting, list[int]]], int | None]]:
        """Requests grouped by sampling settings (arrival order kept), cut into calls of at most
        the batch size (the smaller of the batcher's and the request's)."""
        groups: dict[tuple, list] = {}
        for item, ids in prepared:
            limits = [size for size in (self.max_batch_size, item.max_batch_size) if size is not None]
            groups.setdefault((item.request.sampling, min(limits, default=None)), []).append((item, ids))
        calls = []
        for (_, size), members in groups.items():
            step = size or len(members)
            calls += [(members[start:start + step], size) for start in range(0, len(members), step)]
        return calls

    def _generate(self, call: list[tuple[_Waiting, list[int]]], limit: int | None) -> None:
        sampling = call[0][0].request.sampling
        prompts = [ids for _, ids in call]
        padded = prompts + [prompts[-1]] * (padded_rows(len(prompts), limit) - len(prompts))
        started = time.perf_counter()
        try:
            key = call_key(self.seed, prompts, sampling)
            out = self.chat.engine.generate(padded, sampling, key)
            replies = [self._reply(item.request, ids, samples) for (item, ids), samples in zip(call, out.completions)]
        except Exception as error:  # the engine failed this call: its requests fail, the worker goes on
            logger.exception("local generation call of %d request(s) failed", len(call))
            for item, _ in call:
                item.future.set_exception(error)
            return
        self.calls += 1
        self.requests += len(call)
        self.recent_batch_sizes.append(len(call))
        logger.log(self.log_level, "generation call %d: batch of %d request(s) (%d rows), %d prompt + %d generated "
                   "tokens, %.3fs", self.calls, len(call), len(padded), sum(r.prompt_tokens for r in replies),
                   sum(r.completion_tokens for r in replies), time.perf_counter() - started)
        for (item, _), reply in zip(call, replies):
            item.future.set_result(reply)

    def _reply(self, request: LocalRequest, prompt_ids: list[int], samples) -> LocalReply:
        stop_ids = set(self.chat.engine.stop_ids)
        choices = []
        for completion in samples:
            text, cut = cut_at_stop(self.chat.tokenizer.decode(completion.tokens, skip_special_tokens=True),
                                    request.stop)
            stopped = cut or (len(completion.tokens) > 0 and int(completion.tokens[-1]) in stop_ids)
            choices.append(LocalChoice(text, "stop" if stopped else "length"))
        return LocalReply(choices, len(prompt_ids), sum(len(c.tokens) for c in samples))


# ---------------------------------------------------------------------------------------------
# One loaded model per folder


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """A loaded checkpoint: its chat model (engine + tokenizer), its batcher and its name."""

    chat: ChatModel
    batcher: MicroBatcher
    name: str
    path: Path


_MODELS: dict[Path, LocalModel] = {}
_MODELS_LOCK = threading.Lock()


def load_model(folder: str | Path, key: str = "checkpoint", **batcher_options) -> LocalModel:
    """`folder` (or a `.gguf` file) loaded on its own (not shared); a folder that is no Qwen2 model
    is a CheckpointError naming `key` (the config key or flag that gave it) and what is wrong."""
    try:
        path = hf_folder(folder).resolve()
        if not path.is_dir():
            raise hf.CheckpointError(f"{path}: not a directory")
        hf.load_config(path)  # architecture first: a clear error before reading any weights
        chat = ChatModel.from_hf(path)
    except (hf.CheckpointError, OSError, ValueError) as error:
        raise hf.CheckpointError(f"{key}={str(folder)!r} is not a usable Hugging Face Qwen2 folder or GGUF file: {error}") from None
    logger.info("loaded %s for the local LLM backend (%d layers, vocabulary %d)", path,
                chat.engine.model_config.num_layers, chat.engine.model_config.vocab_size)
    name = Path(folder).stem if is_gguf(folder) else path.name
    return LocalModel(chat, MicroBatcher(chat, **batcher_options), name, path)


def loaded_model(folder: str | Path) -> LocalModel | None:
    """The registry's model of `folder` when a role has loaded it, else None (nothing is read)."""
    with _MODELS_LOCK:
        return _MODELS.get(Path(folder).expanduser().resolve())


def shared_model(folder: str | Path, key: str = "checkpoint") -> LocalModel:
    """The process's one LocalModel of `folder` (by resolved path), loaded on first use."""
    path = Path(folder).expanduser().resolve()
    with _MODELS_LOCK:
        if path not in _MODELS:
            _MODELS[path] = load_model(folder, key)
        return _MODELS[path]


# ---------------------------------------------------------------------------------------------
# The client's asyncio side


class LocalTransport:
    """Sends an LLM client's requests to a LocalModel's batcher: all those made in one event-loop
    turn together (at most `max_batch_size` per generation call)."""

    def __init__(self, model: LocalModel, max_batch_size: int | None = None):
        self.model, self.max_batch_size = model, max_batch_size
        self._buffer: list[tuple[LocalRequest, asyncio.Future]] = []
        self._buffer_loop: asyncio.AbstractEventLoop | None = None

    async def complete(self, request: LocalRequest) -> LocalReply:
        loop = asyncio.get_running_loop()
        if self._buffer_loop is not loop:  # a loop that closed mid-turn left nothing worth sending
            self._buffer, self._buffer_loop = [], loop
        future = loop.create_future()
        self._buffer.append((request, future))
        if len(self._buffer) == 1:
            # Runs after every task already ready in this turn has added its request.
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        buffer, self._buffer = self._buffer, []
        sent = self.model.batcher.submit([request for request, _ in buffer], self.max_batch_size)
        for (_, waiter), done in zip(buffer, sent):
            done.add_done_callback(lambda done, waiter=waiter: _hand_back(loop, waiter, done))


def _hand_back(loop: asyncio.AbstractEventLoop, waiter: asyncio.Future, done: concurrent.futures.Future) -> None:
    """On the worker thread: pass `done`'s outcome to `waiter` on its own loop (if it still runs)."""
    try:
        loop.call_soon_threadsafe(_settle, waiter, done)
    except RuntimeError:  # the loop closed: nobody waits for this answer any more
        pass


def _settle(waiter: asyncio.Future, done: concurrent.futures.Future) -> None:
    if waiter.done():
        return
    if done.exception() is not None:
        waiter.set_exception(done.exception())
    else:
        waiter.set_result(done.result())
