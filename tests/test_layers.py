"""Imports go one way (docs/ARCHITECTURE.md "Layout"): a package imports only from layers below it, never from a
sibling or from above, and never inside a function (a cycle dodged that way means a piece sits in
the wrong package)."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Lower layers first; packages on one layer may not import each other.
LAYERS = (
    ("config",),  # option domains, the config tree, LLM endpoint sections
    ("model",),  # Qwen2 as pure functions, HF import, tokenizers
    ("runtime",),  # mesh and sharding, several processes, checkpoints, HF export, compiled cost
    ("generation", "training"),  # the generation engine; losses, forwards, updater
    ("dialogue",),  # chat format, profiles, personas, users, judges, the LLM client
    ("rl", "offline", "eval"),
    ("app",),  # build, jobs, cli
)
LAYER_OF = {name: depth for depth, names in enumerate(LAYERS) for name in names}
# The one module that imports inside functions: each installed command restarts the process with
# the allocator's tunables before its module brings in jax (rlpa_jax/app/console.py).
RESTART_FIRST, COMMANDS = "rlpa_jax/app/console.py", "rlpa_jax.app.commands"


def unit(module: str) -> str:
    """rlpa_jax.rl.trainer -> rl; rlpa_jax.app.build -> app."""
    return module.split(".")[1]


def imported_units(tree: ast.AST) -> list[tuple[str, int, bool]]:
    """(unit, line, inside a function) for every rlpa_jax import."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("rlpa_jax"):
                names = [child.module] if child.module != "rlpa_jax" else [f"rlpa_jax.{a.name}" for a in child.names]
                found.extend((unit(name), child.lineno, in_function) for name in names)
            elif isinstance(child, ast.Import):
                found.extend((unit(a.name), child.lineno, in_function) for a in child.names
                             if a.name.startswith("rlpa_jax."))
            visit(child, nested)

    visit(tree, False)
    return found


def test_every_package_is_on_a_layer():
    units = {p.stem if p.is_file() else p.name for p in (REPO / "rlpa_jax").iterdir()
             if p.name != "__init__.py" and (p.suffix == ".py" or (p / "__init__.py").exists())}
    assert units == set(LAYER_OF)


def test_imports_go_down_the_layers_and_stay_at_module_level():
    problems = []
    for path in sorted((REPO / "rlpa_jax").rglob("*.py")):
        own = unit("rlpa_jax." + ".".join(path.relative_to(REPO / "rlpa_jax").with_suffix("").parts))
        if own == "__init__":
            continue
        for target, line, in_function in imported_units(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{line}"
            if in_function and path.relative_to(REPO).as_posix() != RESTART_FIRST:
                problems.append(f"{where}: imports rlpa_jax.{target} inside a function")
            if target != own and LAYER_OF[target] >= LAYER_OF[own]:
                problems.append(f"{where}: {own} imports {target} (layer {LAYER_OF[target]} >= {LAYER_OF[own]})")
    assert problems == []


def test_launch_scripts_import_the_package_without_editing_sys_path():
    for path in sorted((REPO / "launch").glob("*.py")):
        text = path.read_text()
        assert "sys.path" not in text, path.name
        assert all(not in_function for _, _, in_function in imported_units(ast.parse(text))), path.name


def test_the_console_commands_import_only_their_command_modules_inside_functions():
    tree = ast.parse((REPO / RESTART_FIRST).read_text())
    functions = [node for node in tree.body if isinstance(node, ast.FunctionDef)]
    deferred = [node for function in functions for node in ast.walk(function)
                if isinstance(node, (ast.Import, ast.ImportFrom))]
    assert len(deferred) == len(functions) > 0  # one each
    assert all(isinstance(node, ast.ImportFrom) and node.module == COMMANDS for node in deferred)
    # The restart comes before the import (glibc reads its tunables only when a process starts).
    assert [ast.unparse(function.body[0]) for function in functions] == ["host_allocator.ensure()"] * len(functions)
