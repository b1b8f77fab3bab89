"""The Hugging Face folder behind a checkpoint path: a folder as it is, a Qwen2 `.gguf` file converted
once into the model cache.

Every place that takes a checkpoint path from a user passes it through `hf_folder` before hf.py
and tokenizer.py read it (ChatModel.from_hf, app/build.py's model.path, JaxPolicy.from_hf), so
`model.path`, a role's `checkpoint`, `launch/serve.py --checkpoint` and an `hf:` evaluation policy
all take either form. A GGUF file is converted by
gguf_checkpoint.py (numpy only, no torch) into `<cache>/gguf/<file stem>-<sha256 prefix>`: keyed
by content, so an edited or replaced file is converted again and two names for one file share a
folder. The folder is written beside its final place and renamed into it with `source.json`
last, so an interrupted conversion leaves no half folder that looks finished, and processes that
convert at once (one per host) all end with the same folder.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from rlpa_jax.model.gguf_checkpoint import convert_gguf
from rlpa_jax.model.hf import CheckpointError

log = logging.getLogger(__name__)

CACHE_ENV = "RLPA_MODEL_CACHE"
SOURCE_FILE = "source.json"  # written last into a converted folder: what it was made from


def cache_root() -> Path:
    """$RLPA_MODEL_CACHE, else ~/.cache/rlpa-jax/models."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "rlpa-jax" / "models"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def converted_from(model_dir: Path) -> str | None:
    """The sha256 of the GGUF a folder was converted from, or None when it is no finished conversion."""
    try:
        return json.loads((model_dir / SOURCE_FILE).read_text()).get("gguf_sha256")
    except (OSError, ValueError, AttributeError):
        return None


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix.lower() == ".gguf"


def hf_folder(path: str | Path) -> Path:
    """`path` itself (`~` expanded) unless it names a `.gguf` file; then the folder converted from it."""
    path = Path(path).expanduser()
    if not is_gguf(path):
        return path
    try:
        stat = path.stat()
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read the GGUF file ({error.strerror or error})") from None
    if not path.is_file():
        raise CheckpointError(f"{path}: a .gguf checkpoint must be a file")
    return _converted(path.resolve(), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _converted(path: Path, size: int, mtime_ns: int) -> Path:
    """(size and mtime key the memo: loading a config, weights and tokenizer hashes the file once.)"""
    digest = sha256_of(path)
    folder = cache_root() / "gguf" / f"{path.stem}-{digest[:16]}"
    if converted_from(folder) != digest:
        log.info("converting %s (%s bytes) into %s", path, f"{size:,}", folder)
        convert_into(path, folder, {"gguf_sha256": digest, "gguf_size": size, "converted_from": str(path)})
    return folder


def convert_into(gguf_file: Path, output: Path, source: dict) -> None:
    """Convert `gguf_file` into `output` (absent or empty), finishing with `source` as source.json."""
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=output.name + ".partial-", dir=output.parent))
    partial.chmod(0o755)  # mkdtemp makes it private; the finished folder is an ordinary one
    try:
        convert_gguf(gguf_file, partial)
        (partial / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")
        if output.exists() and not any(output.iterdir()):
            output.rmdir()
        try:
            os.replace(partial, output)
        except OSError:
            # Another process finished the same conversion first: its folder is as good as ours.
            if converted_from(output) != source["gguf_sha256"]:
                raise
    finally:
        shutil.rmtree(partial, ignore_errors=True)
