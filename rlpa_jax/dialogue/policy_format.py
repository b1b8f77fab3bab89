"""What an exported policy carries besides its weights: the training system prompt and turn format.

runtime/hf_export.py writes the weights, config.json and the tokenizer's files; `add_policy_format`
then makes the folder prompt the policy the way training did, for anyone who loads it:

- The chat template (chat_template.jinja, and the same text as tokenizer_config.json's
  "chat_template") is the tokenizer's own template behind a short prelude that rewrites `messages`
  the way render_messages builds a training prompt:
    1. a conversation that does not open with a system message gets the training system prompt as
       its system message (training always sends one; Qwen's template would otherwise put
       "You are Qwen, ..." there, a prompt the policy was never trained on);
    2. every assistant message but the latest shows only its <response> text (training keeps only
       the latest profile, so prompts do not grow with stale ones), so a caller can append each
       turn as the policy wrote it.
  `tokenizer.apply_chat_template(conversation, add_generation_prompt=True)` then gives the ids
  training would have given (tests/test_policy_export.py checks this), when the latest assistant
  message is the turn in its canonical form (chat.format_turn of its parse, which is what a policy
  trained on that form writes) and earlier ones are turns parse_turn accepts. (Training also drops
  the oldest exchanges of a prompt past rollout.max_prompt_tokens; the template keeps them.)
  A prelude rather than an edit of the template's text: it does not depend on the wording of the
  tokenizer's template, and anything past `messages` (tools, generation prompt) stays the template's.
  Both files: transformers 5 reads chat_template.jinja first (its save_pretrained writes only that
  file), while tools that read only tokenizer_config.json (older transformers, converters) still
  get the same template. The prelude sits between two marker comments so a folder exported from a
  policy trained on an exported folder gets one prelude, not two.
- rlpa_format.json: the same facts for users outside transformers' chat templates (an inference
  server that builds its own prompts, another language): the system prompt and its
  configs/prompts name, the four tags and the turn layout, the profile line form and slots, the
  regular expression a well-formed turn matches, how earlier turns are shown, and the Python
  parser (chat.parse_turn).
"""

from __future__ import annotations

import json
from pathlib import Path

from rlpa_jax.dialogue.chat import TURN_PATTERN, format_turn
from rlpa_jax.dialogue.profile import LIST_SLOTS, SLOTS, ProfileItem
from rlpa_jax.runtime import multihost

FORMAT_FILE = "rlpa_format.json"
TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
FORMAT_VERSION = 1

_PRELUDE_START = "{#- rlpa-jax policy format: the training system prompt and history (rlpa_jax/dialogue/policy_format.py) -#}\n"
_PRELUDE_END = "{#- end of the rlpa-jax prelude; the tokenizer's own template follows -#}\n"

# Jinja over `messages`: the training system prompt when none is given, and every assistant message
# but the latest reduced to its reply when it is one well-formed-looking turn (each tag once, a
# non-empty reply), as render_messages shows them. __SYSTEM__ is the prompt as a string literal.
_PRELUDE_BODY = """{%- set rlpa = namespace(messages=[], latest=-1) %}
{%- for message in messages %}
    {%- if message.role == 'assistant' %}{%- set rlpa.latest = loop.index0 %}{%- endif %}
{%- endfor %}
{%- if messages | length == 0 or messages[0].role != 'system' %}
    {%- set rlpa.messages = [{'role': 'system', 'content': __SYSTEM__}] %}
{%- endif %}
{%- for message in messages %}
    {%- set text = message.content if message.content is string else '' %}
    {%- set one_turn = message.role == 'assistant' and loop.index0 != rlpa.latest
        and text.count('<profile>') == 1 and text.count('</profile>') == 1
        and text.count('<response>') == 1 and text.count('</response>') == 1 %}
    {%- set reply = text.split('<response>')[1].split('</response>')[0].strip() if one_turn else '' %}
    {%- if reply %}
        {%- set rlpa.messages = rlpa.messages + [{'role': 'assistant', 'content': reply}] %}
    {%- else %}
        {%- set rlpa.messages = rlpa.messages + [message] %}
    {%- endif %}
{%- endfor %}
{%- set messages = rlpa.messages %}
"""


def _jinja_string(text: str) -> str:
    """`text` as a Jinja string literal: JSON's escapes (quotes, backslashes, newlines) are Jinja's
    too; non-ASCII characters stay as they are (Jinja would read a JSON surrogate pair as two
    broken characters)."""
    return json.dumps(text, ensure_ascii=False)


def without_prelude(template: str) -> str:
    """A template with any earlier rlpa-jax prelude removed (the tokenizer's own template)."""
    if template.startswith(_PRELUDE_START) and _PRELUDE_END in template:
        return template.split(_PRELUDE_END, 1)[1]
    return template


def policy_chat_template(template: str, system_prompt: str) -> str:
    """The tokenizer's chat `template` behind the prelude that gives it the training system prompt
    and history (module docstring)."""
    prelude = _PRELUDE_BODY.replace("__SYSTEM__", _jinja_string(system_prompt))
    return _PRELUDE_START + prelude + _PRELUDE_END + without_prelude(template)


def format_record(system_prompt: str, prompt_name: str | None) -> dict:
    """rlpa_format.json's content: how to prompt the policy and how to read its turns."""
    example = format_turn([ProfileItem("Occupation", "nurse"), ProfileItem("Interests", "hiking")],
                          "Which trail did you hike last?")
    return {
        "format_version": FORMAT_VERSION,
        "system_prompt": system_prompt,
        "system_prompt_name": prompt_name,  # configs/prompts/<name>.txt in rlpa-jax
        "chat_template": "the tokenizer's chat template adds system_prompt when a conversation has no system "
                         "message, and shows earlier assistant turns by their <response> text only",
        "turn": {
            "layout": "<profile>\n{profile lines}\n</profile>\n\n<response>\n{reply}\n</response>",
            "example": example,
            "profile_tags": ["<profile>", "</profile>"],
            "response_tags": ["<response>", "</response>"],
            "profile_line": "- Slot: value",
            "slots": list(SLOTS),
            "list_slots": sorted(LIST_SLOTS),  # "- Interests: hiking, yoga" is two items
            "well_formed_regex": TURN_PATTERN,  # Python re, DOTALL; each tag exactly once, a non-empty reply
        },
        "history": "earlier assistant turns: the reply only; the latest: the whole turn",
        "parser": "rlpa_jax.dialogue.chat.parse_turn",
    }


def _template_of(folder: Path, tokenizer_config: dict) -> str:
    if (folder / TEMPLATE_FILE).exists():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # several named templates: the one called "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    if not isinstance(template, str):
        raise ValueError(f"{folder / TOKENIZER_CONFIG}: no chat template (neither {TEMPLATE_FILE} nor a "
                         f"'chat_template' string); the policy's tokenizer needs one to be prompted")
    return template


def add_policy_format(folder: str | Path, system_prompt: str, prompt_name: str | None = None) -> Path:
    """Give an exported folder the training system prompt and turn format (module docstring):
    rlpa_format.json always, and the chat template when the folder has the tokenizer's files.
    With several processes every one may call this; process 0 alone writes."""
    folder = Path(folder)
    if not multihost.is_main_process():
        return folder
    record = format_record(system_prompt, prompt_name)
    (folder / FORMAT_FILE).write_text(json.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    config_path = folder / TOKENIZER_CONFIG
    if not config_path.exists():
        return folder
    tokenizer_config = json.loads(config_path.read_text(encoding="utf-8"))
    template = policy_chat_template(_template_of(folder, tokenizer_config), system_prompt)
    (folder / TEMPLATE_FILE).write_text(template, encoding="utf-8")
    tokenizer_config["chat_template"] = template
    config_path.write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return folder
