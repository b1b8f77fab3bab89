"""notebooks/quickstart.ipynb: run end to end in a real Jupyter kernel, and committed current.

The run: notebooks/execute.py's `execute` (nbclient, a kernel of this interpreter that imports
rlpa_jax from this checkout) with a parameters cell of a seconds-long size after the notebook's own
(papermill's convention), in a working directory outside the checkout with every output inside it,
and a last cell that prints what the conversation cell computed. Its outputs are checked against
the files the run wrote and against the judges recomputed here.

The committed notebook: its outputs are those of a whole run (`python notebooks/execute.py`) of
the code it holds: the hash that script stored of the code cells matches them, every cell ran once
in order, nothing failed, and the figures and the conversation are there.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import re
from pathlib import Path

import nbformat
import numpy as np
import pytest

from rlpa_jax.app import build
from rlpa_jax.dialogue.matching import count_item_matches
from rlpa_jax.dialogue.profile import ProfileItem, profile_f1
from rlpa_jax.eval.result import EvalResult

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "quickstart.ipynb"
RERUN = "python notebooks/execute.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load_execute_module():
    spec = importlib.util.spec_from_file_location("notebook_execute", REPO / "notebooks" / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = load_execute_module()

# A model that trains in seconds: the policy is barely formed, but every cell still has to work.
QUICK_TRAINING = [
    "model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.vocab_size=512",
    "rollout.conversations=2", "rollout.max_rounds=2", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=32",
    "rollout.prompt_buckets=[128,256]", "rollout.max_prompt_tokens=256", "ppo.train_batch_size=8",
    "ppo.micro_batch_size=4", "ppo.iterations=1", "sft.steps=4", "sft.batch_size=4", "sft.num_dialogues=4",
    "data.num_personas=16", "rollout.eval_conversations=2", "logging.tensorboard=false",
]
QUICK_USERS, QUICK_TURNS = 2, 3
# Printed by a cell the test appends: what the conversation cell computed, as JSON.
PROBE = '''
import json as probe_json
print("PROBE " + probe_json.dumps({"conversation": [
    {**{key: record[key] for key in ("turn", "user_message", "matched", "f1", "judgment")},
     "inferred": None if record["inferred"] is None else [[item.slot, item.value] for item in record["inferred"]],
     "revealed": [[item.slot, item.value] for item in record["revealed"]]}
    for record in conversation], "persona": persona.persona_id, "repo": str(REPO),
    "rlpa_jax": str(Path(sys.modules["rlpa_jax"].__file__).resolve().parent)}))
'''


def code_cells(notebook) -> dict[str, nbformat.NotebookNode]:
    return {cell.id: cell for cell in notebook.cells if cell.cell_type == "code"}


def stdout_of(cell) -> str:
    return "".join(output.text for output in cell.outputs if output.output_type == "stream" and output.name == "stdout")


def pngs_of(cell) -> list[bytes]:
    return [base64.b64decode(output.data["image/png"]) for output in cell.outputs if "image/png" in output.get("data", {})]


def turn_sections(output: str) -> dict[int, str]:
    """The printed text of each turn's table, keyed by turn number."""
    parts = re.split(r"^=== turn (\d+) =+$", output, flags=re.MULTILINE)
    return {int(number): text for number, text in zip(parts[1::2], parts[2::2])}


def printed_al(output: str) -> list[float]:
    row = re.search(r"^AL\(k\) +(.*)$", output, re.MULTILINE)
    assert row, output
    return [math.nan if value == "n/a" else float(value) for value in row.group(1).split()]


def probe_of(notebook) -> dict:
    (line,) = [line for line in stdout_of(code_cells(notebook)["test-probe"]).splitlines() if line.startswith("PROBE ")]
    return json.loads(line[len("PROBE "):])


def parameters(notebook) -> dict:
    """The values of the notebook's parameters cell (plain assignments)."""
    namespace: dict = {}
    exec(code_cells(notebook)["parameters"].source, namespace)
    return namespace


def check_conversation_text(output: str, turns: int) -> dict[int, str]:
    sections = turn_sections(output)
    assert sorted(sections) == list(range(1, turns + 1)), output
    for number, section in sections.items():
        assert re.search(r"^user   > \S", section, re.MULTILINE), number
        assert re.search(r"^response judgment: [01] ", section, re.MULTILINE), number
        assert re.search(r"^profile F1: \d\.\d\d ", section, re.MULTILINE), number
        assert "| true (hidden) " in section, number
    return sections


# ------------------------------------------------------------------------------ the committed notebook


def test_the_committed_notebook_holds_the_outputs_of_its_own_code():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    stored = notebook.metadata.get(execute.METADATA_KEY, {}).get("code_sha256")
    assert stored == execute.code_hash(notebook), (
        f"{NOTEBOOK.relative_to(REPO)}: its code cells changed since their outputs were made (or it was never "
        f"executed); run `{RERUN}` and commit the notebook")
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in cells.values()] == list(range(1, len(cells) + 1)), (
        f"cells did not run once each, in order, in one kernel; run `{RERUN}`")
    for cell_id, cell in cells.items():
        kinds = {output.output_type for output in cell.outputs}
        assert "error" not in kinds, cell_id
        for output in cell.outputs:
            assert output.output_type != "stream" or output.name == "stdout", (cell_id, output.text)
            assert output.output_type != "stream" or "\r" not in output.text, (cell_id, "progress-bar noise")
        definitions_only = cell_id in ("parameters", "conversation-helpers")
        assert bool(cell.outputs) != definitions_only, cell_id
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            assert "outputs" not in cell and not cell.get("attachments"), cell.id

    # What a reader should see: the training run, the turns of the conversation, the AL curve.
    size = parameters(notebook)
    train, metrics = stdout_of(cells["train"]), stdout_of(cells["metrics"])
    assert re.search(r"^trained in \d+ s; run directory runs/quickstart: checkpoints, config.yaml, hf, ", train,
                     re.MULTILINE), train
    assert re.search(r"^ +after PPO +\d\.\d{3} ", metrics, re.MULTILINE), metrics
    check_conversation_text(stdout_of(cells["conversation"]), size["NUM_TURNS"])
    al = printed_al(stdout_of(cells["protocol"]))
    assert len(al) == size["NUM_TURNS"] and all(0 <= value <= 100 for value in al), al
    for cell_id in ("metrics", "protocol"):
        (png,) = pngs_of(cells[cell_id])
        assert png.startswith(PNG_MAGIC) and len(png) > 10_000, cell_id


# ------------------------------------------------------------------------------ a run in a kernel


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """The notebook executed at the quick size; (executed notebook, its run directory)."""
    workdir = tmp_path_factory.mktemp("kernel")  # the kernel's working directory, outside the checkout
    output = workdir / "runs"
    injected = (f"OUTPUT_DIR = {str(output)!r}\nTRAINING = {QUICK_TRAINING!r}\n"
                f"NUM_USERS = {QUICK_USERS}\nNUM_TURNS = {QUICK_TURNS}")
    notebook = execute.with_parameters(nbformat.read(NOTEBOOK, as_version=4), injected)
    notebook.cells.append(nbformat.v4.new_code_cell(PROBE, id="test-probe"))
    with pytest.MonkeyPatch.context() as patch:
        # The kernel sees the one CPU device a user has (not conftest's 8 fake ones) and shares the
        # suite's compilation cache (cli.use_compilation_cache leaves a cache the environment names).
        patch.delenv("XLA_FLAGS", raising=False)
        patch.setenv("JAX_COMPILATION_CACHE_DIR", str(REPO / ".jax_cache"))
        patch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
        execute.execute(notebook, workdir, timeout=900)
    return notebook, output / "quickstart"


def test_the_notebook_trains_from_python_in_a_kernel(quick_run):
    notebook, run_dir = quick_run
    cells = code_cells(notebook)
    assert [cell.execution_count for cell in notebook.cells if cell.cell_type == "code"] == list(
        range(1, len(cells) + 1))
    ids = [cell.id for cell in notebook.cells]
    assert ids.index("injected-parameters") == ids.index("parameters") + 1
    # PYTHONPATH from the kernel spec: this checkout's rlpa_jax, though the working directory is elsewhere.
    assert f"rlpa_jax from this checkout; runs go to {run_dir.parent}" in stdout_of(cells["setup"])
    probed = probe_of(notebook)
    assert (probed["repo"], probed["rlpa_jax"]) == (str(REPO), str(REPO / "rlpa_jax"))

    # The quick size reached the trainer, which ran SFT and one PPO iteration and checkpointed it.
    train = stdout_of(cells["train"])
    assert "SFT: 4 steps of 4 examples; PPO: 1 iterations of 2 conversations x 2 samples x 2 rounds" in train
    assert f"run directory {run_dir}: checkpoints, config.yaml, hf, metrics.jsonl, rewards.png, tokenizer" in train
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [record["phase"] for record in records] == ["sft"] * 4 + ["eval_start", "ppo", "eval_end"]
    assert sorted(path.name for path in (run_dir / "checkpoints").iterdir() if path.name.isdigit()) == ["0", "1"]
    metrics = stdout_of(cells["metrics"])
    assert f"SFT loss: {records[0]['loss']:.2f} at step 1" in metrics
    assert re.search(rf"^ +0 +{records[5]['reward']:6.3f} +{records[5]['profile_f1']:10.3f} ", metrics, re.MULTILINE)
    after = records[6]
    assert re.search(rf"after PPO +{after['reward']:6.3f} +{after['profile_f1']:10.3f}", metrics), metrics
    assert pngs_of(cells["metrics"]) == [(run_dir / "rewards.png").read_bytes()]


def test_the_notebook_shows_a_conversation_with_the_trained_policy(quick_run):
    notebook, run_dir = quick_run
    cells = code_cells(notebook)
    config = build.load_config(REPO / "configs" / "tiny.yaml", QUICK_TRAINING)
    persona = build.build_personas(config, "eval")[0]
    policy = stdout_of(cells["policy"])
    assert "policy quickstart/checkpoints@1: 2 layers, hidden size 64, vocabulary 512" in policy
    assert f"user {persona.persona_id}: {persona.profile_text}" in policy

    output = stdout_of(cells["conversation"])
    sections = check_conversation_text(output, QUICK_TURNS)
    probed = probe_of(notebook)
    assert probed["persona"] == persona.persona_id
    records = probed["conversation"]
    assert [record["turn"] for record in records] == list(range(1, QUICK_TURNS + 1))
    assert records[0]["user_message"] == "Hello" and records[0]["revealed"] == []
    true_items = persona.items
    for earlier, later in zip(records, records[1:]):
        assert {tuple(item) for item in earlier["revealed"]} <= {tuple(item) for item in later["revealed"]}
    for record in records:
        section = sections[record["turn"]]
        inferred = [ProfileItem(*item) for item in record["inferred"] or []]
        revealed = [ProfileItem(*item) for item in record["revealed"]]
        assert set(revealed) <= set(true_items)
        matched = count_item_matches(inferred, true_items)
        assert record["matched"] == matched
        assert record["f1"] == pytest.approx(profile_f1(matched, len(inferred), len(true_items)))
        assert f"profile F1: {record['f1']:.2f}" in section
        assert f"response judgment: {record['judgment']} " in section
        assert f"user   > {record['user_message']}" in section
        for item in true_items:
            assert f"{item.slot}: {item.value}"[:31] in section, (record["turn"], item)


def test_the_notebook_plots_the_al_curve_of_the_protocol(quick_run):
    notebook, run_dir = quick_run
    cell = code_cells(notebook)["protocol"]
    output = stdout_of(cell)
    result = EvalResult.load(run_dir / "quickstart_vanilla.json")
    assert result.judgments.shape == (QUICK_USERS, QUICK_TURNS)
    assert set(np.unique(result.judgments)) <= {0.0, 1.0}
    per_turn = 100.0 * result.judgments.mean(axis=0)
    assert printed_al(output) == pytest.approx(np.round(per_turn, 1).tolist())
    assert all(math.isfinite(value) for value in result.al.per_turn)
    shown = result.al.metrics
    assert f"AVG {np.mean(per_turn):.2f}   N-IR {shown['N-IR']:.3f}   N-R\u00b2 {shown['N-R2']:.3f}" in output
    assert f"result: {run_dir / 'quickstart_vanilla.json'}" in output
    png = run_dir / "quickstart_al.png"
    assert f"figure: {png}" in output
    assert pngs_of(cell) == [png.read_bytes()] and png.read_bytes().startswith(PNG_MAGIC)
