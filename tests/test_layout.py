"""The house has no circle: no module of the project imports one that imports it back.

Every import counts, including those inside functions (a lazy import is still a dependency a
reader has to follow). The graph is read from the source with `ast`, not by importing anything.
"""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def project_modules():
    files = {"train": ROOT / "train.py"}
    for package in ("spo_min", "kernels"):
        for path in (ROOT / package).glob("*.py"):
            files[f"{package}.{path.stem}" if path.stem != "__init__" else package] = path
    return files


def imports_of(path, known):
    """The project modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # "from spo_min import stats" imports spo_min.stats; "from spo_min.x import y" imports spo_min.x
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {name for name in names if name in known}
    return found - {"spo_min", "kernels"}  # the packages' __init__ files hold no code


def test_no_module_imports_one_that_imports_it_back():
    files = project_modules()
    graph = {name: imports_of(path, files) for name, path in files.items()}
    assert "spo_min.study" in graph["spo_min.compare3"] and "spo_min.compare" not in graph["spo_min.compare3"]

    def cycle_from(start):
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for nxt in graph[node]:
                if nxt == start:
                    return trail + [start]
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, trail + [nxt]))
        return None

    cycles = [c for c in map(cycle_from, sorted(graph)) if c]
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_training_loop_stays_one_readable_file():
    # The card: "a single-file SPO training loop". Evaluation, data and run bookkeeping live in
    # spo_min/; train.py keeps the loop, its checks and the command line.
    assert len((ROOT / "train.py").read_text().splitlines()) <= 450
