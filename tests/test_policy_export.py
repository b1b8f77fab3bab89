"""An exported policy used as a Hugging Face user uses it (dialogue/policy_format.py): transformers
loads the folder, its chat template gives the prompts training gave, greedy generation matches our
engine, the bfloat16 export stays close to the float32 one, and parse_turn reads the decoded turns."""

from __future__ import annotations

import json
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from hf_reference import hf_logits, make_hf_model, save_hf_model
from safetensors.numpy import load_file
from tiny_corpus import synthetic_corpus

from rlpa_jax.dialogue.chat import Message, assistant_message, format_turn, load_prompt, parse_turn, prompt_token_ids
from rlpa_jax.dialogue.policy_format import FORMAT_FILE, add_policy_format
from rlpa_jax.dialogue.profile import ProfileItem
from rlpa_jax.generation.engine import GenerationEngine
from rlpa_jax.generation.sampler import SamplingParams
from rlpa_jax.model import hf
from rlpa_jax.model.qwen2 import forward
from rlpa_jax.model.tokenizer import load_tokenizer, stop_token_ids, train_tiny_tokenizer
from rlpa_jax.runtime import hf_export

PROMPT_NAME = "policy_system_tiny"
NURSE = [ProfileItem("Occupation", "nurse")]
HIKING_NURSE = [ProfileItem("Occupation", "nurse"), ProfileItem("Interests", "hiking"), ProfileItem("Interests", "yoga")]
# (user message, the policy's turn after it); the last user message still waits for its turn.
DIALOGUE = [("Long night shift at the hospital again.", (NURSE, "That sounds tiring. Which ward are you on?")),
            ("Pediatrics. On days off I hike or do yoga.", (HIKING_NURSE, "Nice balance! Any trail you love?")),
            ("The ridge trail above the lake, café stop included.", None)]


def training_history() -> list[Message]:
    """The dialogue as training keeps it (rl/rollout.py: a well-formed turn's parse)."""
    history = []
    for user, turn in DIALOGUE:
        history.append(Message("user", user))
        if turn:
            history.append(assistant_message(*turn))
    return history


def user_conversation() -> list[dict]:
    """The same dialogue as a transformers user sends it: each turn as the policy wrote it, no system."""
    conversation = []
    for user, turn in DIALOGUE:
        conversation.append({"role": "user", "content": user})
        if turn:
            conversation.append({"role": "assistant", "content": format_turn(*turn)})
    return conversation


def template_ids(tokenizer, conversation) -> list[int]:
    encoded = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny random Qwen2 policy (sharp logits: greedy choices with clear margins) with the tiny
    world's tokenizer, exported in float32 and bfloat16 with its training prompt and format."""
    root = tmp_path_factory.mktemp("export")
    tokenizer_dir = train_tiny_tokenizer(root / "tokenizer", synthetic_corpus(), vocab_size=512)
    model = make_hf_model(vocab_size=512, tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    params, config = hf.load_params(save_hf_model(model, root / "source"))
    folders = {}
    for dtype in ("float32", "bfloat16"):
        folder = hf_export.export_hf(params, config, root / dtype, tokenizer_dir=tokenizer_dir, dtype=dtype)
        folders[dtype] = add_policy_format(folder, load_prompt(PROMPT_NAME), PROMPT_NAME)
    return folders, params, config, load_tokenizer(tokenizer_dir)


def test_the_chat_template_gives_the_training_prompt(exported):
    folders, _, _, training_tokenizer = exported
    system = load_prompt(PROMPT_NAME)
    expected = prompt_token_ids(training_tokenizer, system, training_history())
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["float32"])
    # No system message: the training one; earlier turns shown by their reply, the latest whole.
    assert template_ids(tokenizer, user_conversation()) == expected
    shown = tokenizer.decode(expected)
    assert format_turn(*DIALOGUE[0][1]) not in shown and format_turn(*DIALOGUE[1][1]) in shown
    # A system message of the caller's own replaces it.
    assert template_ids(tokenizer, [{"role": "system", "content": "Be brief."}, *user_conversation()]) == \
        prompt_token_ids(training_tokenizer, "Be brief.", training_history())
    # The first turn: the system prompt and the user's message only.
    assert template_ids(tokenizer, user_conversation()[:1]) == \
        prompt_token_ids(training_tokenizer, system, training_history()[:1])
    # tokenizer_config.json carries the same template for readers that ignore chat_template.jinja.
    written = json.loads((folders["float32"] / "tokenizer_config.json").read_text())["chat_template"]
    assert written == (folders["float32"] / "chat_template.jinja").read_text()
    (folders["float32"] / "chat_template.jinja").rename(folders["float32"].parent / "set_aside.jinja")
    try:
        alone = transformers.AutoTokenizer.from_pretrained(folders["float32"])
        assert template_ids(alone, user_conversation()) == expected
    finally:
        (folders["float32"].parent / "set_aside.jinja").rename(folders["float32"] / "chat_template.jinja")


def test_a_second_format_keeps_one_prelude(exported, tmp_path):
    """A policy trained from an exported folder has the wrapped template already: exporting it
    again replaces the prelude (another system prompt here) instead of stacking a second one."""
    folders, _, _, training_tokenizer = exported
    again = tmp_path / "again"
    again.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json"):
        (again / name).write_bytes((folders["float32"] / name).read_bytes())
    add_policy_format(again, "Another prompt.", None)
    template = (again / "chat_template.jinja").read_text()
    assert template.count("rlpa-jax policy format") == 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(again)
    assert template_ids(tokenizer, user_conversation()) == \
        prompt_token_ids(training_tokenizer, "Another prompt.", training_history())


def test_the_format_file_says_how_to_prompt_and_parse(exported):
    folders, *_ = exported
    record = json.loads((folders["bfloat16"] / FORMAT_FILE).read_text())
    assert record["system_prompt"] == load_prompt(PROMPT_NAME) and record["system_prompt_name"] == PROMPT_NAME
    example = record["turn"]["example"]
    assert re.match(record["turn"]["well_formed_regex"], example, re.DOTALL)
    assert parse_turn(example).well_formed and record["parser"] == "rlpa_jax.dialogue.chat.parse_turn"


def test_greedy_generation_matches_our_engine(exported):
    folders, params, config, training_tokenizer = exported
    model = transformers.AutoModelForCausalLM.from_pretrained(folders["float32"], dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["float32"])
    engine = GenerationEngine(config, stop_token_ids(training_tokenizer), training_tokenizer.pad_token_id)
    engine.sync(params)
    prompts = [prompt_token_ids(training_tokenizer, load_prompt(PROMPT_NAME), training_history()[:end])
               for end in (1, 3, 5)]
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0.0), jax.random.key(0))
    for end, prompt, samples in zip((1, 3, 5), prompts, ours.completions):
        ids = template_ids(tokenizer, user_conversation()[:end])
        assert ids == prompt
        with torch.no_grad():
            theirs = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        assert theirs[0, len(ids):].tolist() == samples[0].tokens.tolist()
    assert sum(len(samples[0].tokens) for samples in ours.completions) > 3 * 4  # not a bare stop token each


def test_the_bfloat16_export_is_the_float32_one_rounded(exported):
    """bfloat16 keeps 8 significant bits: rounding moves a number by at most u = 2^-9 of itself.
    The weights are the float32 ones rounded (exactly), and the logits, sums of products of those
    weights (and, computed in bfloat16, of rounded activations), move by a small multiple of u of
    their scale: measured 0.21 % (weights only) and 0.35 % (bfloat16 compute) of their spread.
    We allow 4u ~ 0.8 % of the spread, room for two roundings per product with margin; a wrong,
    transposed or misscaled tensor moves them by the order of the spread itself."""
    folders, params, config, _ = exported
    f32_config = json.loads((folders["float32"] / "config.json").read_text())
    bf16_config = json.loads((folders["bfloat16"] / "config.json").read_text())
    assert (f32_config["dtype"], f32_config["torch_dtype"]) == ("float32", "float32")
    assert (bf16_config["dtype"], bf16_config["torch_dtype"]) == ("bfloat16", "bfloat16")
    f32_weights = load_file(str(folders["float32"] / "model.safetensors"))
    bf16_weights = load_file(str(folders["bfloat16"] / "model.safetensors"))
    assert f32_weights.keys() == bf16_weights.keys()
    for name, weight in f32_weights.items():
        assert bf16_weights[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(bf16_weights[name], weight.astype(ml_dtypes.bfloat16), err_msg=name)

    tokens = np.asarray([template_ids(transformers.AutoTokenizer.from_pretrained(folders["float32"]),
                                      user_conversation())])
    reference = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(folders["float32"],
                                                                            dtype=torch.float32).eval(), tokens)
    np.testing.assert_allclose(reference, np.asarray(forward(params, config, jnp.asarray(tokens))[0]), atol=1e-4, rtol=0)
    tolerance = 4 * 2**-9 * float(reference.max() - reference.min())
    top_two = np.sort(reference, axis=-1)[..., -2:]
    clear = top_two[..., 1] - top_two[..., 0] > 2 * tolerance  # positions whose greedy token cannot flip
    assert clear.mean() > 0.5
    default_load = transformers.AutoModelForCausalLM.from_pretrained(folders["bfloat16"]).eval()
    assert next(default_load.parameters()).dtype == torch.bfloat16  # config.json's dtype is honoured
    for model in (default_load,
                  transformers.AutoModelForCausalLM.from_pretrained(folders["bfloat16"], dtype=torch.float32).eval()):
        logits = hf_logits(model, tokens)
        assert np.abs(logits - reference).max() <= tolerance
        assert (logits.argmax(-1) == reference.argmax(-1))[clear].all()


def test_parse_turn_reads_what_generate_decodes(exported):
    """A transformers user decodes the generated ids with skip_special_tokens; the turn the policy
    writes (its tokens and the <|im_end|> that stops it) decodes to text parse_turn reads back."""
    folders, *_ = exported
    tokenizer = transformers.AutoTokenizer.from_pretrained(folders["float32"])
    turn = format_turn(HIKING_NURSE, "Nice balance! Any trail you love?")
    generated = tokenizer(turn + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert generated[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    parsed = parse_turn(tokenizer.decode(generated, skip_special_tokens=True))
    assert parsed.well_formed and parsed.profile == HIKING_NURSE
    assert parsed.response == "Nice balance! Any trail you love?"
    # Without skip_special_tokens the stop token is text after the blocks: not a turn.
    assert not parse_turn(tokenizer.decode(generated)).well_formed
