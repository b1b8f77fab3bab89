"""Filling prompt templates with untrusted text and reading \\boxed{} answers.

Judges and the LLM user fill configs/prompts/*.txt templates with policy replies and profiles;
those are untrusted, so they go inside fences they cannot close and placeholders are filled in
one pass (inserted text is never scanned for placeholders again).
"""

from __future__ import annotations

import re
import unicodedata

_FENCE_RUN_RE = re.compile(r"<{3,}|>{3,}")
_PLACEHOLDER_RE = re.compile(r"\{([a-z_]+)\}")
_BOXED_RE = re.compile(r"\\boxed\s*\{([^{}]*)\}")


def fence(label: str, untrusted: str) -> str:
    """Wrap untrusted text as <<<LABEL ... LABEL>>>; runs of <<< or >>> inside are blanked
    (with a space, so neighbours cannot join into a new fence marker). The text is NFKC-normalised
    first, so look-alikes a model may read as the marker (fullwidth ＞＞＞, small ﹥﹥﹥) are caught too."""
    cleaned = _FENCE_RUN_RE.sub(" ", unicodedata.normalize("NFKC", untrusted))
    while _FENCE_RUN_RE.search(cleaned):
        cleaned = _FENCE_RUN_RE.sub(" ", cleaned)
    return f"<<<{label}\n{cleaned}\n{label}>>>"


def fill_template(template: str, name: str, **fields: str) -> str:
    """Replace {field} placeholders in one pass (inserted text is never re-scanned).

    Other braces (e.g. \\boxed{1}) are left alone; every field must appear in the template.
    """
    missing = [field for field in fields if "{" + field + "}" not in template]
    if missing:
        raise ValueError(
            f"configs/prompts/{name}.txt lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}"
        )
    return _PLACEHOLDER_RE.sub(lambda found: fields.get(found.group(1), found.group(0)), template)


def placeholders(template: str) -> set[str]:
    """The {field} names a template uses."""
    return set(_PLACEHOLDER_RE.findall(template))


def check_placeholders(template: str, name: str, allowed: set[str], required: set[str]) -> set[str]:
    """The template's placeholders, after checking it has every required one and no unknown one
    (a misspelt {field} would otherwise reach the model as literal text)."""
    used = placeholders(template)
    problems = []
    if missing := sorted(required - used):
        problems.append(f"lacks the placeholder(s) {', '.join('{' + m + '}' for m in missing)}")
    if unknown := sorted(used - allowed):
        problems.append(f"has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)} "
                        f"(known: {', '.join('{' + a + '}' for a in sorted(allowed))})")
    if problems:
        raise ValueError(f"configs/prompts/{name}.txt {'; '.join(problems)}")
    return used


def last_boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} in `text`, stripped; None if there is none."""
    found = _BOXED_RE.findall(text)
    return found[-1].strip() if found else None

