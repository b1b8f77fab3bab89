"""notebooks/quickstart.ipynb end to end, without a Jupyter kernel.

Its code cells run in order in one namespace (as a kernel would run them), on a policy from a very
short SFT run made by jobs.sft (what launch/sft.py runs), with every output path inside tmp_path. The
notebook must also be clean for version control: no stored outputs or execution counts.
"""

import json
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from rlpa_jax.app import jobs
from rlpa_jax.config.loading import load_config
from rlpa_jax.dialogue.matching import count_item_matches
from rlpa_jax.dialogue.personas import synthetic_personas
from rlpa_jax.dialogue.profile import profile_f1
from rlpa_jax.eval.result import EvalResult

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
# A model that trains in seconds: the policy is barely formed, but every cell still has to work.
QUICK_SFT = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.max_rounds=2", "rollout.max_new_tokens=32", "rollout.prompt_buckets=[128,256]",
    "rollout.max_prompt_tokens=256", "sft.steps=4", "sft.batch_size=4", "sft.num_dialogues=4",
    "data.num_personas=16", "mesh.devices=1", "logging.progress_bar=false",
]


def load_notebook() -> dict:
    return json.loads(NOTEBOOK.read_text(encoding="utf-8"))


def cell_text(cell: dict) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def run_code_cells(notebook: dict) -> dict:
    """Execute the code cells in order in one namespace; a failure's traceback names the cell."""
    namespace: dict = {"__name__": "__main__"}
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            exec(compile(cell_text(cell), f"{NOTEBOOK.name} cell {index}", "exec"), namespace)
    return namespace


def turn_sections(output: str) -> dict[int, str]:
    """The printed text of each turn's table, keyed by turn number."""
    parts = re.split(r"^=== turn (\d+) =+$", output, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


@pytest.fixture(scope="module")
def quick_checkpoint(tmp_path_factory) -> Path:
    config = load_config(None, [*QUICK_SFT, f"output_dir={tmp_path_factory.mktemp('sft')}", "name=notebook"])
    jobs.sft(config)
    return config.run_dir / "sft"


def test_notebook_is_clean_for_version_control():
    notebook = load_notebook()
    assert notebook["nbformat"] == 4
    kinds = [cell["cell_type"] for cell in notebook["cells"]]
    assert kinds[0] == "markdown" and kinds.count("markdown") >= 4 and kinds.count("code") >= 4
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"cell {index} has stored outputs"
            assert cell["execution_count"] is None, f"cell {index} has an execution count"
        else:
            assert "outputs" not in cell and not cell.get("attachments"), f"cell {index} carries output data"
    assert "widgets" not in notebook["metadata"]
    ids = [cell["id"] for cell in notebook["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique (nbformat 4.5)"


def test_notebook_runs_a_conversation_and_the_protocol(quick_checkpoint, tmp_path, monkeypatch, capsys):
    output_dir = tmp_path / "out"
    monkeypatch.setenv("RLPA_QUICKSTART_CHECKPOINT", str(quick_checkpoint))
    monkeypatch.setenv("RLPA_QUICKSTART_OUTPUT", str(output_dir))
    monkeypatch.chdir(tmp_path)
    matplotlib.use("Agg")

    namespace = run_code_cells(load_notebook())
    output = capsys.readouterr().out

    assert namespace["REPO"] == REPO
    assert namespace["CHECKPOINT"] == quick_checkpoint
    assert f"policy checkpoint from RLPA_QUICKSTART_CHECKPOINT: {quick_checkpoint}" in output

    # The conversation: a held-out persona, one printed table per turn showing its true profile.
    turns, persona = namespace["NUM_TURNS"], namespace["persona"]
    assert persona == synthetic_personas(namespace["NUM_USERS"], seed=10_000)[0]
    sections = turn_sections(output)
    assert sorted(sections) == list(range(1, turns + 1))
    clip = namespace["clip"]
    for number, section in sections.items():
        assert re.search(r"^response judgment: [01] ", section, re.MULTILINE), number
        assert re.search(r"^profile F1: \d\.\d\d ", section, re.MULTILINE), number
        for item in persona.items:
            assert clip(f"{item.slot}: {item.value}") in section, (number, item)

    records = namespace["conversation"]
    assert [record["turn"] for record in records] == list(range(1, turns + 1))
    assert records[0]["user_message"] == "Hello" and records[0]["revealed"] == []
    for earlier, later in zip(records, records[1:]):
        assert set(earlier["revealed"]) <= set(later["revealed"]) <= set(persona.items)
    for record in records:
        inferred = record["inferred"] or []
        matched = count_item_matches(inferred, persona.items)
        assert record["matched"] == matched
        assert record["f1"] == pytest.approx(profile_f1(matched, len(inferred), len(persona.items)))
        assert record["judgment"] in (0, 1)
        assert f"profile F1: {record['f1']:.2f}" in sections[record["turn"]]

    # The protocol: every user judged at every turn, the printed summary, the figure and the JSON.
    result = namespace["result"]
    assert result.judgments.shape == (namespace["NUM_USERS"], turns)
    assert set(np.unique(result.judgments)) <= {0.0, 1.0}
    average = float(np.mean(100.0 * result.judgments.mean(axis=0)))
    shown = result.al.metrics
    assert f"AVG {average:.2f}   N-IR {shown['N-IR']:.3f}   N-R\u00b2 {shown['N-R2']:.3f}" in output
    png = output_dir / "quickstart_al.png"
    assert namespace["al_png"] == png
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"figure: {png}" in output
    assert EvalResult.load(output_dir / "quickstart_vanilla.json").al.metrics["AVG"] == pytest.approx(average)
