"""What a failed read of a checkpoint step says about it: damage (the step is broken: set it aside
and fall back to an older one) or trouble (an I/O error, a permission, memory, anything unknown:
the step may be good, so stop and move nothing), told from the exception chain orbax and
tensorstore raise; how the outcomes of several processes combine; and a one-line description of
a failure. runtime/checkpoint.py's resume acts on them.
"""

from __future__ import annotations

import errno
import json
import os
import re
from pathlib import Path
from typing import Sequence

MAX_REASON_CHARS = 300  # tensorstore errors carry the whole store spec; the first line says what failed


def describe_failure(error: BaseException) -> str:
    """One line: the exception's type and first line, and its root cause's (what tensorstore says)."""
    def first_line(e: BaseException) -> str:
        text = (str(e).strip().splitlines() or [""])[0]
        text = text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS] + "..."
        return f"{type(e).__name__}: {text}" if text else type(e).__name__

    root = exception_chain(error)[-1]
    return first_line(error) if root is error else f"{first_line(error)}; caused by {first_line(root)}"


# ---------------------------------------------------------------------------------------------
# Damage or trouble: what a failed read of a step says about it
#
# What orbax-checkpoint 0.12.8 and tensorstore 0.1.86 raise when a step's read fails, made for real
# on a saved step (tests/test_checkpoint.py, test_checkpoint_read_failures.py and test_trainer.py
# make the kinds marked *; the exception chain, outermost first, "TS" = tensorstore's ValueError
# whose text starts with an absl status code):
#
#   damage
#   * array data file cut short     Exception("Encountered error while reading array index ...")
#                                   from TS "OUT_OF_RANGE: Error reading "<array>/0.0" in OCDBT database
#                                   ...: Requested byte range [a, b) is not valid for value of size n"
#   * array data file deleted       (or replaced by a directory, or its d/ directory deleted)
#                                   Exception(...) from TS "FAILED_PRECONDITION: ... Truncated
#                                   Zstd-compressed stream; at byte 0"
#     array data file overwritten   TS "FAILED_PRECONDITION: ... ZSTD_decompressStream() failed"
#   * OCDBT manifest deleted        TS "NOT_FOUND: ... Metadata at "<array>/.zarray" ... does not exist"
#     manifest cut short            TS "DATA_LOSS: ... Error decoding manifest: Length in header ..."
#     b-tree node file cut short,   TS "OUT_OF_RANGE: ...", "NOT_FOUND: ...", "DATA_LOSS: ... Error
#     deleted or zeroed             decoding b-tree node ..."
#   * state/_METADATA deleted       FileNotFoundError("Metadata file (named _METADATA) does not exist
#                                   at ...") (errno None; only read when no shapes are given)
#   * meta/metadata deleted         FileNotFoundError("File .../meta/metadata not found.")
#   * a JSON file torn or garbled   json.JSONDecodeError (meta, a document, state/_METADATA,
#                                   state/array_metadatas/process_0); UnicodeDecodeError for bytes
#                                   that are no UTF-8
#     an item directory deleted     KeyError('Item "meta" was not found in the checkpoint. ...')
#   * a shape unlike the target's   ValueError("Requested shape: ... is not compatible with the stored
#                                   shape: ...")
#   * a tree unlike the target's    ValueError("User-provided restore item and on-disk value metadata
#                                   tree structures do not match: ...")
#
#   trouble (the files may be good)
#   * a file that may not be read   TS "PERMISSION_DENIED: ... Permission denied [os_error_code='13']"
#                                   (arrays); PermissionError errno 13 (JSON files, the step directory)
#   * a directory that may not be   FileNotFoundError("Metadata file (named _METADATA) does not exist"),
#   * listed                        or for a tree of NamedTuples ValueError("pytree structure error:
#                                   different types at key path ..."): orbax's exists() answers False.
#                                   `first_access_error` finds the file or directory at fault.
#     a symbolic link loop          TS "UNKNOWN: ... Too many levels of symbolic links [os_error_code='40']"
#
# Damage orbax does not notice (the step reads whole): a deleted ocdbt.process_0/manifest.ocdbt,
# _sharding, array_metadatas/, _CHECKPOINT_METADATA or commit_success.txt; a dtype unlike the
# target's is converted. Older tensorstore releases wrote an OS error as "[OS error 13: ...]".

READ, DAMAGED, TROUBLE = "read", "damaged", "trouble"
OUTCOME_ORDER = (READ, DAMAGED, TROUBLE)  # over processes, the last one present decides
STATUS_CODES = frozenset({
    "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
    "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE",
    "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"})
# What tensorstore says of data it read and found missing, short or undecodable (without an OS error).
DAMAGE_STATUS_CODES = frozenset({"NOT_FOUND", "OUT_OF_RANGE", "DATA_LOSS", "FAILED_PRECONDITION"})
STATUS_PREFIX = re.compile(r"([A-Z_]+): ")
TENSORSTORE_OS_ERROR = re.compile(r"\[os_error_code='(\d+)'\]|\[OS error (\d+)\b")
# orbax's words for a step whose arrays or tree differ from the restore target, and a missing item.
TARGET_MISMATCH = ("is not compatible with the stored shape", "tree structures do not match")
MISSING_ITEM = "was not found in the checkpoint"


def exception_chain(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from or while handling, outermost first, each once."""
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        chain.append(error)
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return chain


def os_error_number(error: BaseException) -> int | None:
    """The errno an exception carries: an OSError's own, or the one in tensorstore's text."""
    if isinstance(error, OSError):
        return error.errno
    match = TENSORSTORE_OS_ERROR.search(str(error))
    return int(match.group(1) or match.group(2)) if match else None


def tensorstore_status(error: BaseException) -> str | None:
    """The absl status code a tensorstore error opens with ("OUT_OF_RANGE", ...), else None."""
    match = STATUS_PREFIX.match(str(error))
    return match.group(1) if match and match.group(1) in STATUS_CODES else None


def shows_trouble(error: BaseException) -> bool:
    """An error of the machine, not of the step's files: Ctrl-C, memory, an OS error other than a
    missing file, a tensorstore status other than the damage ones."""
    if not isinstance(error, Exception) or isinstance(error, MemoryError):
        return True
    number = os_error_number(error)
    if number is not None and number != errno.ENOENT:
        return True
    status = tensorstore_status(error)
    return status is not None and status not in DAMAGE_STATUS_CODES


def shows_damage(error: BaseException) -> bool:
    """A file of the step missing, cut short or undecodable, or arrays unlike the target's."""
    if isinstance(error, (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError)):
        return True
    if os_error_number(error) == errno.ENOENT or tensorstore_status(error) in DAMAGE_STATUS_CODES:
        return True
    text = str(error)
    return ((isinstance(error, ValueError) and any(words in text for words in TARGET_MISMATCH))
            or (isinstance(error, KeyError) and MISSING_ITEM in text))


def classify_read_failure(error: BaseException) -> str:
    """DAMAGED when the exception chain of a failed read shows damage to the step (see the table
    above) and nothing in it shows trouble; TROUBLE otherwise, the unknown included: a step is
    moved aside only for damage seen."""
    chain = exception_chain(error)
    if any(shows_trouble(link) for link in chain):
        return TROUBLE
    return DAMAGED if any(shows_damage(link) for link in chain) else TROUBLE


def combine_outcomes(outcomes: Sequence[Sequence[str]]) -> tuple[str, str]:
    """Every process's [outcome, reason] of reading one step, in process order, as one: TROUBLE
    if any process had it, else DAMAGED if any had it, else READ. The reason is the first such
    process's (prefixed with its index when there are several processes)."""
    worst = max((kind for kind, _ in outcomes), key=OUTCOME_ORDER.index)
    if worst == READ:
        return READ, ""
    reasons = [(index, reason) for index, (kind, reason) in enumerate(outcomes) if kind == worst]
    if len(outcomes) == 1:
        return worst, reasons[0][1]
    index, reason = reasons[0]
    more = f" (and {len(reasons) - 1} more process{'es' if len(reasons) > 2 else ''})" if len(reasons) > 1 else ""
    return worst, f"process {index}: {reason}{more}"


def first_access_error(directory: Path) -> OSError | None:
    """The first OSError other than a missing file met listing every directory and opening every
    file under `directory`; None when all open."""
    def stop(error: OSError) -> None:
        raise error

    try:
        for root, _, files in os.walk(directory, onerror=stop):
            for name in files:
                try:
                    os.close(os.open(os.path.join(root, name), os.O_RDONLY))
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return None
    except OSError as error:
        return error
    return None
