"""Policies under evaluation: one batched turn for many conversations at once.

A Policy answers the next turn of every conversation it is given. Two kinds exist:

- JaxPolicy: our own parameters and a jitted Generator (greedy by default), built from an orbax run
  checkpoint (a PPO run's runs/<name>/checkpoints or launch/sft.py's runs/<name>/sft) or from a
  local Hugging Face directory; on a mesh (launch/eval.py), its sampler calls are global programs
  over every device, and with several processes each process answers only its own conversations
  (eval/shares.py) in its own rows of each call;
- ChatPolicy: any OpenAI-compatible chat model through LLMClient.

RLPA-format policies (two_part=True) write <profile>/<response> turns; only the <response> part is
what the simulated user and the response judge see. A turn that could not be had at all (an API
failure) carries `error`, and the protocol leaves it unscored rather than scoring it 0.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jax

from rlpa_jax.dialogue.chat import (
    Message,
    assistant_message,
    load_prompt,
    parse_turn,
    prompt_token_ids,
    render_messages,
)
from rlpa_jax.dialogue.llm.client import LLMClient
from rlpa_jax.dialogue.llm.requests import LLMCallError
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.dialogue.text import visible_reply_text
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model import hf
from rlpa_jax.model.checkpoint_folder import hf_folder
from rlpa_jax.model.qwen2 import Params, Qwen2Config
from rlpa_jax.model.tokenizer import load_tokenizer, stop_token_ids
from rlpa_jax.runtime import parallel
from rlpa_jax.runtime.checkpoint import Checkpointer, checkpoint_directory, model_config_from_meta, restore_actor_params

log = logging.getLogger(__name__)

DEFAULT_PROMPT_BUCKETS = (128, 256, 512, 1024, 2048, 4096)  # our model's prompts: system prompt and a dialogue
DEFAULT_PROMPT_NAME = "policy_system"


@dataclass(frozen=True)
class PolicyTurn:
    text: str  # the raw model output
    response: str  # what the user and the judge see
    profile: list[ProfileItem] | None  # parsed <profile> block, None if absent/malformed
    error: str | None = None  # why no output could be had; such a turn is unscored, never 0


@runtime_checkable
class Policy(Protocol):
    name: str

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        """One turn for each conversation, batched. Histories start with the user's "Hello";
        assistant messages hold only the visible response (content) and optionally profile_text."""
        ...


def turn_from_text(text: str, two_part: bool) -> PolicyTurn:
    """A PolicyTurn from raw model output.

    two_part=True (RLPA-format policies): a well-formed turn gives its <response> and parsed
    <profile>; a malformed one shows the raw text with the profile block and tags removed, and
    has profile None. two_part=False (plain chat models): the stripped text, profile None.
    """
    if not two_part:
        return PolicyTurn(text=text, response=text.strip(), profile=None)
    parsed = parse_turn(text)
    if parsed.well_formed and parsed.response is not None:
        return PolicyTurn(text=text, response=parsed.response, profile=parsed.profile)
    return PolicyTurn(text=text, response=visible_reply_text(text), profile=None)


def failed_turn(error: str) -> PolicyTurn:
    """The turn of a conversation whose policy call failed for good (left unscored)."""
    return PolicyTurn(text="", response="", profile=None, error=error)


def history_message(turn: PolicyTurn) -> Message:
    """The assistant message a turn adds to its conversation (its profile kept when it has one)."""
    if turn.profile is not None:
        return assistant_message(turn.profile, turn.response)
    return Message(role="assistant", content=turn.response)


# ---------------------------------------------------------------------------------------------
# Our model


class JaxPolicy:
    """Our model through a generation engine: all conversations in one call (or one per
    `max_batch_size`), greedy by default.

    With prefix_cache (the engine's), each call keeps its prompts' KV cache and the next call
    prefills only what its prompts add to them (generation/prefix_cache.py; the same tokens as a
    full prefill): a dialogue's turn t+1 continues its turn t. The kept cache is valid for the
    engine's parameters and stays on the device while the policy lives.

    On a mesh the engine samples the parameters in the rollout's sampling layout and splits every
    call's rows over the mesh's data x fsdp devices. With several processes the caller hands each
    process only its own conversations (`share`) and every process makes the same calls in the
    same order (they are collectives: an empty share still calls); generation/placement.py.
    """

    def __init__(
        self,
        engine: GenerationEngine,
        tokenizer: Any,
        system_prompt: str,
        name: str,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        two_part: bool = True,
        *,
        max_prompt_tokens: int = 4096,
        max_batch_size: int | None = None,
        seed: int = 0,
    ) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"JaxPolicy: max_batch_size must be >= 1 or None, got {max_batch_size}")
        self.engine, self.tokenizer, self.system_prompt, self.name = engine, tokenizer, system_prompt, name
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
        self.two_part, self.max_prompt_tokens, self.max_batch_size, self.seed = two_part, max_prompt_tokens, max_batch_size, seed
        self._calls = itertools.count()
        self._cache_key = object()  # this policy's prefix-cache chains in the (shared) engine

    @classmethod
    def from_params(cls, params: Params, model_config: Qwen2Config, tokenizer: Any, system_prompt: str, name: str,
                    *args: Any, mesh: Any = None, layout: str = "replicated",
                    prompt_buckets: Sequence[int] = DEFAULT_PROMPT_BUCKETS, generator_kind: str = "jax",
                    prefix_cache: bool = False, **kw: Any) -> "JaxPolicy":
        """A policy over `params` (placed on `mesh` when given) with an engine of its own."""
        engine = GenerationEngine(model_config, stop_token_ids(tokenizer), tokenizer.pad_token_id, mesh=mesh,
                                  layout=layout, prompt_buckets=prompt_buckets, generator=generator_kind,
                                  prefix_cache=prefix_cache)
        engine.sync(params)
        return cls(engine, tokenizer, system_prompt, name, *args, **kw)

    def with_system_prompt(self, system_prompt: str, name: str | None = None) -> "JaxPolicy":
        """The same model (shared engine: parameters and compiled programs) under another system prompt."""
        return JaxPolicy(self.engine, self.tokenizer, system_prompt, name or self.name, self.sampling.max_new_tokens,
                         self.sampling.temperature, self.two_part, max_prompt_tokens=self.max_prompt_tokens,
                         max_batch_size=self.max_batch_size, seed=self.seed)

    def share(self, count: int) -> list[int]:
        """The conversations of `count` this process answers: all of them in one process, else
        those whose rows land on its devices (generation/placement.py)."""
        return self.engine.share(count, self.max_batch_size)

    def prompt_tokens(self, history: Sequence[Message], system_prompt: str | None = None) -> list[int]:
        system_prompt = self.system_prompt if system_prompt is None else system_prompt
        return prompt_token_ids(self.tokenizer, system_prompt, history, self.max_prompt_tokens)

    def generate_texts(self, histories: Sequence[Sequence[Message]],
                       system_prompts: Sequence[str] | None = None) -> list[str]:
        """Raw output text for every history (under its own system prompt when given): one
        engine call (synchronous)."""
        prompts_text = system_prompts if system_prompts is not None else [self.system_prompt] * len(histories)
        if len(prompts_text) != len(histories):
            raise ValueError(f"JaxPolicy: {len(histories)} histories but {len(prompts_text)} system prompts")
        prompts = [self.prompt_tokens(history, prompt) for history, prompt in zip(histories, prompts_text)]
        # Greedy decoding ignores the key; sampled decoding gets a fresh, reproducible one per call.
        key = jax.random.fold_in(jax.random.key(self.seed), next(self._calls))
        generated = self.engine.generate(prompts, self.sampling, key, cache_key=self._cache_key,
                                         max_batch_size=self.max_batch_size)
        return [self.tokenizer.decode(samples[0].tokens, skip_special_tokens=True) for samples in generated.completions]

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        # The device work runs in a thread so judges and users of other work keep going meanwhile.
        texts = await asyncio.to_thread(self.generate_texts, histories)
        return [turn_from_text(text, self.two_part) for text in texts]

    async def respond_with_system_prompts(self, histories: Sequence[Sequence[Message]],
                                          system_prompts: Sequence[str]) -> list[PolicyTurn]:
        """respond() with conversation i under system_prompts[i], still one sampler call."""
        texts = await asyncio.to_thread(self.generate_texts, histories, system_prompts)
        return [turn_from_text(text, self.two_part) for text in texts]

    @classmethod
    def from_checkpoint(
        cls,
        path: str | Path,
        step: int | None = None,
        *,
        system_prompt: str | None = None,
        prompt_name: str | None = None,
        name: str | None = None,
        tokenizer_dir: str | Path | None = None,
        shardings: Any = None,
        fallback_prompt_name: str = DEFAULT_PROMPT_NAME,
        **kw: Any,
    ) -> "JaxPolicy":
        """The policy of an orbax checkpoint: a PPO run's state["actor"] (its params) or SFT's
        {"actor": params}; model config and tokenizer directory come from the checkpoint's meta.

        The system prompt is `system_prompt` (text), else configs/prompts/<prompt_name>.txt, else
        the prompt named in the meta (launch/sft.py records it), else fallback_prompt_name.
        Only the actor's parameters are read: with a `mesh` (and no `shardings`), straight into the
        trainer's parameter shardings on it (every process reads its own shards).
        """
        directory = checkpoint_directory(path)
        if kw.get("mesh") is not None and shardings is None:
            checkpointer = Checkpointer(directory, max_to_keep=None)
            try:
                meta = checkpointer.restore_meta(step)
            finally:
                checkpointer.close()
            shardings = parallel.param_shardings(model_config_from_meta(meta, str(directory)), kw["mesh"])
        params, meta, found_step = restore_actor_params(directory, step, shardings)
        model_config = model_config_from_meta(meta, str(directory))
        tokenizer_dir = tokenizer_dir or meta.get("tokenizer_dir")
        if not tokenizer_dir:
            raise ValueError(f"{directory}: checkpoint meta has no 'tokenizer_dir'; pass tokenizer_dir=<directory>")
        prompt = system_prompt if system_prompt is not None else load_prompt(
            prompt_name or meta.get("system_prompt") or fallback_prompt_name)
        policy_name = name or f"{directory.parent.name}/{directory.name}@{found_step}"
        return cls.from_params(params, model_config, load_tokenizer(tokenizer_dir), prompt, policy_name, **kw)

    @classmethod
    def from_hf(
        cls,
        directory: str | Path,
        *,
        system_prompt: str | None = None,
        prompt_name: str | None = None,
        name: str | None = None,
        tokenizer_dir: str | Path | None = None,
        shardings: Any = None,
        **kw: Any,
    ) -> "JaxPolicy":
        """A local Hugging Face Qwen2 directory (config.json, *.safetensors, tokenizer files) or a
        Qwen2 `.gguf` file; with a `mesh` (and no `shardings`), read straight into the trainer's
        parameter shardings on it."""
        name = name or Path(directory).name
        directory = hf_folder(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(
                f"{directory}: not a Hugging Face model directory (expected config.json and *.safetensors)")
        if kw.get("mesh") is not None and shardings is None:
            shardings = parallel.param_shardings(hf.load_config(directory), kw["mesh"])
        params, model_config = hf.load_params(directory, shardings=shardings)
        prompt = system_prompt if system_prompt is not None else load_prompt(prompt_name or DEFAULT_PROMPT_NAME)
        tokenizer = load_tokenizer(tokenizer_dir or directory)
        return cls.from_params(params, model_config, tokenizer, prompt, name, **kw)


# ---------------------------------------------------------------------------------------------
# OpenAI-compatible chat models


class ChatPolicy:
    """Any OpenAI-compatible chat model; one request per conversation, sent concurrently."""

    def __init__(
        self,
        client: LLMClient,
        system_prompt: str,
        name: str,
        two_part: bool = False,
        *,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.client = client
        self.system_prompt = system_prompt
        self.name = name
        self.two_part = two_part
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.failures = 0

    def with_system_prompt(self, system_prompt: str, name: str | None = None) -> "ChatPolicy":
        """The same model and client under another system prompt."""
        return ChatPolicy(self.client, system_prompt, name or self.name, self.two_part,
                          temperature=self.temperature, max_tokens=self.max_tokens)

    def messages(self, history: Sequence[Message], system_prompt: str | None = None) -> list[dict[str, str]]:
        return render_messages(self.system_prompt if system_prompt is None else system_prompt, history)

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        return await self.respond_with_system_prompts(histories, [self.system_prompt] * len(histories))

    async def respond_with_system_prompts(self, histories: Sequence[Sequence[Message]],
                                          system_prompts: Sequence[str]) -> list[PolicyTurn]:
        """respond() with conversation i under system_prompts[i] (all requests concurrent)."""
        if len(system_prompts) != len(histories):
            raise ValueError(f"ChatPolicy: {len(histories)} histories but {len(system_prompts)} system prompts")
        options = {}
        if self.temperature is not None:
            options["temperature"] = self.temperature
        if self.max_tokens is not None:
            options["max_tokens"] = self.max_tokens
        batch = [self.messages(history, prompt) for history, prompt in zip(histories, system_prompts)]
        outputs = await self.client.complete_many(batch, **options)
        turns = []
        for output in outputs:
            if isinstance(output, (LLMCallError, BaseException)):
                self.failures += 1
                turns.append(failed_turn(str(output)))
            else:
                turns.append(turn_from_text(output, self.two_part))
        return turns


__all__ = [
    "ChatPolicy",
    "JaxPolicy",
    "Policy",
    "PolicyTurn",
    "failed_turn",
    "history_message",
    "turn_from_text",
]
