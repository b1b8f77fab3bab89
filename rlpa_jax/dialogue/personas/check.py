"""Check a downloaded copy of the ALOE persona pool before a run reads it, and say what is wrong.

    python -m rlpa_jax.dialogue.personas.check data/aloe      # the directory data.aloe_dir names

Every file is read the way a run reads it (base.load_aloe: one JSON string per line, an empty
entry or a line that is not a JSON string named as file:line), and both splits are paired the way a
run pairs them (base.pair_for_training, base.pair_for_evaluation), so a copy this accepts loads in
training and evaluation. Unlike a run, which stops at the first problem, it reports every file's.
Counts that differ from ALOE's published release are a note, not an error: a pool of your own
personas in the same format is fine. Exit status 0 when a run can use the directory, 1 when not.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rlpa_jax.dialogue.personas.base import ALOE_FILES, load_aloe, pair_for_evaluation, pair_for_training

# ALOE's datasets/ folder as published (github.com/ShujinWu-0814/ALOE): entries per file. Line 6 of
# profile.jsonl holds two entries, so its 330 lines give 331 profiles.
PUBLISHED_COUNTS = {"profile.jsonl": 331, "personality.jsonl": 71, "profile_eval.jsonl": 20,
                    "personality_eval.jsonl": 7}


@dataclass
class AloeCheck:
    """What check_aloe_dir found: entries per readable file, the problems that stop a run, notes."""

    directory: Path
    counts: dict[str, int] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        return not self.problems


def check_aloe_dir(directory: str | Path) -> AloeCheck:
    """Every file of both splits of the ALOE pool in `directory`, loaded and paired as a run does."""
    directory = Path(directory)
    check = AloeCheck(directory)
    if not directory.is_dir():
        check.problems.append(f"{directory}: no such directory")
        return check
    for split, names in ALOE_FILES.items():
        pools = [_load(check, split, name) for name in names]
        if all(pool is not None for pool in pools):
            _pair(check, split, *pools)
    missing = [name for names in ALOE_FILES.values() for name in names if not (directory / name).is_file()]
    if missing and all((directory / "datasets" / name).is_file() for name in missing):
        check.notes.append(f"the files are in {directory / 'datasets'} (ALOE's repository keeps them there): "
                           f"check that directory, or set data.aloe_dir={directory / 'datasets'}")
    differing = {name: count for name, count in check.counts.items() if count != PUBLISHED_COUNTS[name]}
    if differing:
        check.notes.append("not ALOE's published counts: " + ", ".join(
            f"{name} has {count} (published: {PUBLISHED_COUNTS[name]})" for name, count in differing.items()))
    return check


def _load(check: AloeCheck, split: str, name: str) -> list[str] | None:
    path = check.directory / name
    if not path.is_file():
        check.problems.append(f"{path}: missing (the {split} split needs {' and '.join(ALOE_FILES[split])})")
        return None
    try:
        texts = load_aloe(path)
    except (ValueError, UnicodeDecodeError, OSError) as error:
        check.problems.append(f"{path}: {error}" if str(path) not in str(error) else str(error))
        return None
    check.counts[name] = len(texts)
    if not texts:
        check.problems.append(f"{path}: no entries (the {split} split needs at least one)")
    return texts


def _pair(check: AloeCheck, split: str, profiles: list[str], personalities: list[str]) -> None:
    if not profiles or not personalities:
        return  # already reported as a file without entries
    try:
        if split == "train":
            pair_for_training(profiles, personalities, 1, seed=0)
        else:
            pair_for_evaluation(profiles, personalities)
    except ValueError as error:
        names = " and ".join(ALOE_FILES[split])
        check.problems.append(f"{check.directory}: the {split} split ({names}) cannot be paired: {error}")


def report_lines(check: AloeCheck) -> list[str]:
    lines = [f"{check.directory}: ALOE persona pool"]
    for split, names in ALOE_FILES.items():
        for name in names:
            if name in check.counts:
                lines.append(f"  {split:<5} {name:<23} {check.counts[name]} entries")
    lines += [f"problem: {problem}" for problem in check.problems]
    lines += [f"note: {note}" for note in check.notes]
    if check.usable:
        lines.append("ok: both splits load and pair as a run reads them (data.source=aloe data.aloe_dir="
                     f"{check.directory})")
    else:
        lines.append(f"not usable: {len(check.problems)} problem(s) above; a run with data.aloe_dir={check.directory} "
                     "would stop at the first")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rlpa_jax.dialogue.personas.check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, help="the directory holding the ALOE files (data.aloe_dir)")
    check = check_aloe_dir(parser.parse_args(argv).directory)
    print("\n".join(report_lines(check)))
    return 0 if check.usable else 1


if __name__ == "__main__":
    sys.exit(main())
