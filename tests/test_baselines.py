"""Prompting baselines: what each wrapper shows its base policy and what it hands back.

A recording fake policy (deterministic replies derived from what it was asked) checks prompts,
histories and call counts; TF-IDF is checked against numbers worked out by hand; ChatPolicy over
the real HTTP test server checks Self-Critic and CoT end to end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from openai_server import OpenAIServer

from rlpa_jax.dialogue.chat import Message, load_prompt
from rlpa_jax.dialogue.llm.client import LLMClient, LLMConfig
from rlpa_jax.eval.baselines import (
    BASELINES,
    RAG,
    FewShotCoT,
    Reminder,
    SelfCritic,
    exchanges_of,
    make_baseline,
    reply_after_marker,
    retrieve,
)
from rlpa_jax.eval.policies import ChatPolicy, PolicyTurn, failed_turn, turn_from_text
from rlpa_jax.eval.retrieval import cosine_scores, tfidf_vectors, top_k_indices, word_tokens

BASE_PROMPT = "You are a friendly assistant."
KEY_ENV = "RLPA_TEST_BASELINES_KEY"


@dataclasses.dataclass(frozen=True)
class Call:
    system_prompts: tuple[str, ...]
    histories: tuple[tuple[Message, ...], ...]


def last_user_text(history: Sequence[Message]) -> str:
    return history[-1].content


def as_turn(output: str | PolicyTurn) -> PolicyTurn:
    return output if isinstance(output, PolicyTurn) else turn_from_text(output, two_part=False)


@dataclasses.dataclass
class RecordingPolicy:
    """A plain-chat fake: answers reply(system_prompt, history) and records every batched call.

    reply returns the raw text, or a whole PolicyTurn (e.g. a failed one).
    """

    reply: Callable[[str, Sequence[Message]], str | PolicyTurn]
    system_prompt: str = BASE_PROMPT
    name: str = "fake"
    calls: list[Call] = dataclasses.field(default_factory=list)

    def with_system_prompt(self, system_prompt: str) -> "RecordingPolicy":
        return dataclasses.replace(self, system_prompt=system_prompt)  # shares `calls`

    async def respond(self, histories: Sequence[Sequence[Message]]) -> list[PolicyTurn]:
        self.calls.append(Call((self.system_prompt,) * len(histories), tuple(tuple(h) for h in histories)))
        return [as_turn(self.reply(self.system_prompt, history)) for history in histories]


@dataclasses.dataclass
class BatchedRecordingPolicy(RecordingPolicy):
    """The same fake, also offering the optional per-conversation-prompt batch hook."""

    async def respond_with_system_prompts(self, histories: Sequence[Sequence[Message]],
                                          system_prompts: Sequence[str]) -> list[PolicyTurn]:
        self.calls.append(Call(tuple(system_prompts), tuple(tuple(h) for h in histories)))
        return [as_turn(self.reply(prompt, history)) for prompt, history in zip(system_prompts, histories)]


def echo_last_user(_system_prompt: str, history: Sequence[Message]) -> str:
    return f"ECHO<{last_user_text(history)}>"


def conversation(*texts: str) -> list[Message]:
    """Alternating user/assistant messages starting with the user."""
    return [Message(role="user" if i % 2 == 0 else "assistant", content=text) for i, text in enumerate(texts)]


def respond(policy, histories) -> list[PolicyTurn]:
    return asyncio.run(policy.respond(histories))


# --- Reminder --------------------------------------------------------------------------


def test_reminder_adds_the_reminder_to_the_system_prompt_on_every_turn() -> None:
    base = RecordingPolicy(echo_last_user)
    policy = Reminder(base)
    reminder = load_prompt("baseline_reminder")
    first = respond(policy, [conversation("Hello"), conversation("Hi")])
    second = respond(policy, [conversation("Hello", "Hey!", "I teach piano.")])
    assert [turn.response for turn in first + second] == ["ECHO<Hello>", "ECHO<Hi>", "ECHO<I teach piano.>"]
    assert len(base.calls) == 2
    for call in base.calls:
        for prompt in call.system_prompts:
            assert prompt.startswith(BASE_PROMPT) and prompt.endswith(reminder)
    assert "preferences" in reminder and base.system_prompt == BASE_PROMPT
    assert policy.name == "reminder/fake"


# --- Self-Critic -----------------------------------------------------------------------


def drafting_or_revising(critic_prompt: str) -> Callable[[str, Sequence[Message]], str]:
    """Drafts "DRAFT<last user text>"; under the critic prompt revises the draft it was shown."""

    def reply(system_prompt: str, history: Sequence[Message]) -> str:
        if system_prompt != critic_prompt:
            return f"DRAFT<{last_user_text(history)}>"
        draft = re.search(r"DRAFT<([^>]*)>", history[-1].content)
        assert draft is not None, "the critique request must contain the draft"
        return f"Critique: too generic.\nRevised reply: REVISED<{draft.group(1)}>"

    return reply


def test_self_critic_makes_two_batched_calls_per_turn_and_returns_the_revision() -> None:
    critic_prompt = load_prompt("baseline_self_critic")
    base = RecordingPolicy(drafting_or_revising(critic_prompt))
    policy = SelfCritic(base)
    histories = [conversation("Hello", "Hi! How are you?", "Tired, I run a bakery."), conversation("Hello")]
    turns = respond(policy, histories)

    assert [turn.response for turn in turns] == ["REVISED<Tired, I run a bakery.>", "REVISED<Hello>"]
    assert len(base.calls) == 2  # one draft batch, one revision batch
    draft_call, revision_call = base.calls
    assert draft_call.system_prompts == (BASE_PROMPT, BASE_PROMPT)
    assert [list(h) for h in draft_call.histories] == histories
    assert revision_call.system_prompts == (critic_prompt, critic_prompt)
    request = revision_call.histories[0]
    assert len(request) == 1 and request[0].role == "user"
    assert "User: Hello\nAssistant: Hi! How are you?\nUser: Tired, I run a bakery." in request[0].content
    assert "DRAFT<Tired, I run a bakery.>" in request[0].content
    assert "DRAFT<Tired" in turns[0].text and "Critique: too generic." in turns[0].text
    assert policy.name == "self_critic/fake"


def test_self_critic_keeps_the_draft_when_the_revision_is_empty() -> None:
    critic_prompt = load_prompt("baseline_self_critic")
    base = RecordingPolicy(lambda prompt, h: "Revised reply:   " if prompt == critic_prompt else "the draft")
    assert [turn.response for turn in respond(SelfCritic(base), [conversation("Hello")])] == ["the draft"]


def test_self_critic_leaves_failed_calls_failed() -> None:
    critic_prompt = load_prompt("baseline_self_critic")

    def reply(prompt: str, history: Sequence[Message]) -> str | PolicyTurn:
        if prompt != critic_prompt:
            return failed_turn("HTTP 500") if last_user_text(history) == "fail draft" else "draft"
        return failed_turn("timeout") if "keep" not in history[-1].content else "Revised reply: better"

    base = RecordingPolicy(reply)
    turns = respond(SelfCritic(base), [conversation("fail draft"), conversation("fail revision"), conversation("keep")])
    assert [(turn.response, turn.error) for turn in turns] == [
        ("", "HTTP 500"), ("", "self-critic revision failed: timeout"), ("better", None),
    ]
    assert [len(call.histories) for call in base.calls] == [3, 2]  # the failed draft is not revised


# --- Few-shot CoT ----------------------------------------------------------------------


def test_cot_prompt_has_worked_examples_and_the_reasoning_is_stripped() -> None:
    base = RecordingPolicy(lambda _p, h: f"Thoughts: SECRET about {last_user_text(h)}.\nReply: Nice!\nWhich trail?")
    policy = FewShotCoT(base)
    turns = respond(policy, [conversation("I went hiking today.")])
    assert turns[0].response == "Nice!\nWhich trail?"
    assert "SECRET" in turns[0].text and "SECRET" not in turns[0].response
    (prompt,) = base.calls[0].system_prompts
    assert prompt.startswith(BASE_PROMPT) and prompt.endswith(load_prompt("baseline_cot"))
    assert prompt.count("Thoughts:") >= 4 and prompt.count("Reply:") >= 4  # instructions + 3 examples
    assert policy.name == "cot(fewshot)/fake"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Thoughts: a\nReply: b", "b"),
        ("  thoughts: a\n  REPLY:   b\nc  ", "b\nc"),
        ("Thoughts: a\nReply: b\nUser: more\nReply: d", "b\nUser: more\nReply: d"),
        ("Thoughts: about them\n\nJust the reply.", "Just the reply."),
        ("Thoughts: only reasoning, no reply", ""),
        ("A plain reply that mentions Reply: inline", "A plain reply that mentions Reply: inline"),
    ],
)
def test_reply_after_marker(text: str, expected: str) -> None:
    assert reply_after_marker(text, "Reply:", "Thoughts:") == expected


# --- RAG -------------------------------------------------------------------------------


def test_word_tokens_lowercase_and_drop_stopwords() -> None:
    assert word_tokens("I adopted a Beagle, and it's named Biscuit!") == ["adopted", "beagle", "named", "biscuit"]


def test_tfidf_cosine_matches_a_hand_computed_example() -> None:
    documents = ["Dog park dog", "cat park"]
    document_vectors, query_vector, vocabulary = tfidf_vectors(documents, "the dog and a zebra")
    assert vocabulary == ["cat", "dog", "park"]
    # N = 2; df(cat) = df(dog) = 1, df(park) = 2; idf = ln((1 + N) / (1 + df)) + 1
    rare, common = math.log(3 / 2) + 1, math.log(3 / 3) + 1
    dog_park = np.array([0.0, 2 * rare, 1 * common])
    cat_park = np.array([1 * rare, 0.0, 1 * common])
    np.testing.assert_allclose(document_vectors[0], dog_park / math.sqrt((2 * rare) ** 2 + common**2))
    np.testing.assert_allclose(document_vectors[1], cat_park / math.sqrt(rare**2 + common**2))
    np.testing.assert_allclose(query_vector, [0.0, 1.0, 0.0])  # "zebra" is out of vocabulary
    np.testing.assert_allclose(
        cosine_scores(documents, "dog zebra"), [2 * rare / math.sqrt(4 * rare**2 + common**2), 0.0]
    )
    park_query = np.array([0.0, 0.0, 1.0])
    np.testing.assert_allclose(cosine_scores(documents, "park"), document_vectors @ park_query)
    assert cosine_scores(documents, "park")[1] > cosine_scores(documents, "park")[0]  # shorter doc, less dilution


def test_top_k_keeps_positive_scores_best_first_ties_to_the_earlier() -> None:
    assert top_k_indices(np.array([0.2, 0.0, 0.5, 0.2, 0.9, 0.1]), 3) == [4, 2, 0]
    assert top_k_indices(np.array([0.0, 0.3, 0.0]), 5) == [1]
    assert top_k_indices(np.zeros(4), 5) == []


PUPPY_CHAT = conversation(
    "Hello",
    "Hi! How are you today?",
    "Great, I just adopted a beagle puppy named Biscuit.",
    "Congratulations! Beagles are so curious.",
    "Work at the bakery was busy though.",
    "Early mornings must be tough.",
    "I'm planning a trip to Lisbon next month.",
    "Lisbon is lovely in spring.",
    "Any tips for cheap hotels there?",
    "Look around Alfama for small guesthouses.",
    "What should I feed my beagle puppy?",
)


def test_rag_retrieves_the_relevant_older_exchange_and_truncates_the_history() -> None:
    base = RecordingPolicy(echo_last_user)
    policy = RAG(base)
    prompt, recent, retrieved = policy.prepare(PUPPY_CHAT)
    assert [exchange.number for exchange in retrieved] == [2]
    assert recent == PUPPY_CHAT[6:]  # the last two exchanges and the new message
    assert "Biscuit" in prompt and "bakery" not in prompt and prompt.startswith(BASE_PROMPT)
    assert load_prompt("baseline_rag").splitlines()[0] in prompt

    turns = respond(policy, [PUPPY_CHAT])
    assert turns[0].response == "ECHO<What should I feed my beagle puppy?>"
    (call,) = base.calls
    assert call.system_prompts == (prompt,) and list(call.histories[0]) == PUPPY_CHAT[6:]
    assert policy.name == "rag(top5)/fake"


def test_rag_retrieves_at_most_top_k_in_conversation_order() -> None:
    notes = [" ".join(["garden tomato"] * (i + 1)) for i in range(8)]
    chat = conversation(*[text for note in notes for text in (note, "ok")], "tomato garden?")
    older = exchanges_of(chat)[:-2]
    retrieved = retrieve(older, "tomato garden?", 5)
    assert len(retrieved) == 5 and [e.number for e in retrieved] == sorted(e.number for e in retrieved)
    _, _, prepared = RAG(RecordingPolicy(echo_last_user), top_k=3).prepare(chat)
    assert len(prepared) == 3


def test_rag_on_a_short_conversation_keeps_everything_and_adds_no_context() -> None:
    base = RecordingPolicy(echo_last_user)
    chat = conversation("Hello", "Hi!", "I like tea.")
    prompt, recent, retrieved = RAG(base).prepare(chat)
    assert (prompt, recent, retrieved) == (BASE_PROMPT, chat, [])


def test_rag_batches_per_conversation_prompts_through_the_optional_hook() -> None:
    base = BatchedRecordingPolicy(echo_last_user)
    chats = [PUPPY_CHAT, conversation("Hello")]
    turns = respond(RAG(base), chats)
    assert [turn.response for turn in turns] == ["ECHO<What should I feed my beagle puppy?>", "ECHO<Hello>"]
    (call,) = base.calls  # one batch even though the two prompts differ
    assert "Biscuit" in call.system_prompts[0] and call.system_prompts[1] == BASE_PROMPT


def test_rag_without_the_batch_hook_groups_conversations_by_prompt() -> None:
    base = RecordingPolicy(echo_last_user)
    chats = [PUPPY_CHAT, conversation("Hello"), conversation("Hi")]
    turns = respond(RAG(base), chats)
    assert [turn.response for turn in turns] == ["ECHO<What should I feed my beagle puppy?>", "ECHO<Hello>", "ECHO<Hi>"]
    assert sorted(len(call.histories) for call in base.calls) == [1, 2]


def test_rag_rejects_a_history_that_does_not_end_with_the_user() -> None:
    with pytest.raises(ValueError, match=r"histories\[0\] ends with assistant"):
        respond(RAG(RecordingPolicy(echo_last_user)), [conversation("Hello", "Hi!")])


# --- make_baseline ---------------------------------------------------------------------


def test_make_baseline_builds_each_kind_and_rejects_unknown_ones() -> None:
    base = RecordingPolicy(echo_last_user)
    assert make_baseline("base", base) is base
    built = {kind: make_baseline(kind, base) for kind in BASELINES if kind != "base"}
    assert {kind: type(policy) for kind, policy in built.items()} == {
        "reminder": Reminder, "self_critic": SelfCritic, "cot": FewShotCoT, "rag": RAG,
    }
    assert make_baseline("rag", base, top_k=3).name == "rag(top3)/fake"
    with pytest.raises(ValueError, match="unknown baseline kind 'fewshot'") as caught:
        make_baseline("fewshot", base)
    assert all(kind in str(caught.value) for kind in BASELINES)
    with pytest.raises(ValueError, match="takes no options"):
        make_baseline("base", base, top_k=3)


def test_wrappers_name_the_missing_hook() -> None:
    class NoHook:
        name = "bare"

        async def respond(self, histories):
            return []

    with pytest.raises(TypeError, match="lacks system_prompt, with_system_prompt"):
        make_baseline("reminder", NoHook())


# --- end to end through ChatPolicy and a real HTTP server ------------------------------


def scripted_chat_model(request: dict) -> str:
    """Critiques when given the critic prompt, reasons-then-replies under the CoT prompt, else drafts."""
    system, last = request["messages"][0]["content"], request["messages"][-1]["content"]
    if system == load_prompt("baseline_self_critic"):
        draft = re.search(r"draft #(\d+)", last)
        return f"Critique: it ignores the user.\nRevised reply: revision #{draft.group(1) if draft else '?'}"
    if "Thoughts:" in system:
        return f"Thoughts: they said {last!r}.\nReply: visible #{len(request['messages'])}"
    return f"draft #{len(request['messages'])}"


def test_self_critic_and_cot_end_to_end_with_chat_policy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, "sk-test")
    histories = [conversation("Hello"), conversation("Hello", "Hi there!", "I paint murals.")]

    async def run(server: OpenAIServer) -> tuple[list[PolicyTurn], list[PolicyTurn]]:
        # timeout_s: a hang guard
        client = LLMClient(LLMConfig(base_url=server.base_url, model="m", api_key_env=KEY_ENV, timeout_s=60.0))
        base = ChatPolicy(client, system_prompt=BASE_PROMPT, name="chat-m")
        try:
            critic = await make_baseline("self_critic", base).respond(histories)
            cot = await make_baseline("cot", base).respond(histories)
        finally:
            await client.aclose()
        return critic, cot

    with OpenAIServer(scripted_chat_model) as server:
        critic_turns, cot_turns = asyncio.run(run(server))
    # messages = system + history, so the drafts are #2 and #4
    assert [turn.response for turn in critic_turns] == ["revision #2", "revision #4"]
    assert [turn.response for turn in cot_turns] == ["visible #2", "visible #4"]
    assert all(turn.profile is None for turn in critic_turns + cot_turns)
    systems = [request["messages"][0]["content"] for request in server.requests]
    assert systems[:2] == [BASE_PROMPT, BASE_PROMPT]  # drafts first, then two revisions
    assert systems[2:4] == [load_prompt("baseline_self_critic")] * 2
    assert len(server.requests) == 6
