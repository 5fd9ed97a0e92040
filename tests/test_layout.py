"""The shape of the repository: model/ is self-contained (it imports nothing from trainer/, the entry scripts or
anything else of the project outside itself, so the export can ship it as it is); no two project modules import
each other, directly or round a longer cycle (every import counted, also those inside functions); every
script's --help shows every flag with its default."""
import ast
import contextlib
import io
import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

ROOT_PATH = Path(ROOT)
PACKAGES = ("model", "trainer", "tests", "scripts")
ENTRY_SCRIPTS = sorted(p.name for p in ROOT_PATH.glob("*.py"))


def project_files():
    files = [ROOT_PATH / name for name in ENTRY_SCRIPTS]
    for package in PACKAGES:
        files += sorted((ROOT_PATH / package).glob("*.py"))
    return files


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT_PATH).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in project_files()}
# Scripts in scripts/ import each other by bare name (they put scripts/ on sys.path).
BARE_SCRIPTS = {p.stem: module_name(p) for p in (ROOT_PATH / "scripts").glob("*.py")}


def imports_of(path: Path):
    """(line, imported module name, written as relative) of every import statement in the file, at any depth,
    names made absolute. `from package import name` counts as an import of package.name where that is a
    module."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)] if package else []
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            found.append((node.lineno, mod, node.level > 0))
            found += [(node.lineno, f"{mod}.{a.name}", node.level > 0) for a in node.names
                      if f"{mod}.{a.name}" in MODULES]
    return found


def project_module(name: str):
    """The project module an import names, or None for the standard library and third-party packages."""
    top = name.split(".")[0]
    if top in BARE_SCRIPTS:
        return BARE_SCRIPTS[top]
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def test_the_files_are_found():
    assert {"model.model", "model.engine", "model.tokenizer", "trainer.train", "trainer.data", "3-eval_chat",
            "tests.test_layout"} <= set(MODULES)
    # and the reader finds imports inside functions too
    assert (ROOT_PATH / "trainer/data_check.py").is_file()


def test_model_imports_nothing_of_the_project_outside_model():
    bad = []
    for name, path in MODULES.items():
        if not name.startswith("model."):
            continue
        for line, imported, relative in imports_of(path):
            target = project_module(imported)
            if target is not None and not target.startswith("model"):
                bad.append(f"{path.relative_to(ROOT_PATH)}:{line} imports {imported}")
            if target is not None and not relative:  # absolute: the exported copy has no package named model
                bad.append(f"{path.relative_to(ROOT_PATH)}:{line} imports {imported} (use a relative import)")
    assert not bad, "\n".join(bad)


def find_cycle(graph):
    """One import cycle as a list of modules, or None (depth-first search)."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None
    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def import_graph():
    graph = {}
    for name, path in MODULES.items():
        targets = {project_module(m) for _, m, _ in imports_of(path)}
        # a package's __init__ runs before its modules: importing model.x also imports model
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert graph["trainer.data"] >= {"trainer.records", "model.tokenizer"}  # edges are seen
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"b"}}) is None


SCRIPTS = ENTRY_SCRIPTS + [f"scripts/{p.name}" for p in sorted((ROOT_PATH / "scripts").glob("*.py"))]


def option_blocks(help_text: str):
    """{'--flag': its help text} from argparse's --help output."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = [o.split(" ")[0] for o in stripped.split("  ")[0].split(", ")][-1]
            blocks[current] = stripped
        elif current and line.startswith("   ") and stripped:
            blocks[current] += " " + stripped
        else:
            current = None
    return blocks


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_default(script, monkeypatch):
    path = ROOT_PATH / script
    monkeypatch.setattr(sys, "argv", [str(path), "--help"])
    monkeypatch.chdir(ROOT_PATH)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(path), run_name="__main__")
    assert exit_.value.code in (0, None)
    blocks = option_blocks(out.getvalue())
    flags = [f for f in blocks if f not in ("-h", "--help")]
    assert flags, f"{script} --help listed no flags:\n{out.getvalue()}"
    missing = [f"{f}: {blocks[f]}" for f in flags if "(default" not in blocks[f]]
    assert not missing, f"{script} --help gives no default for:\n" + "\n".join(missing)
