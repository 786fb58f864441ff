"""The import rules of rmd's modules, read from the source (ast, function-local imports included). The house has
three parts: the library (the top-level modules), its command line (rmd.py), and the folders demo/ and tools/
(modules named demo.sim, tools.bench, ...):

- no cycles between the repository's own modules;
- nothing imports rmd.py (it is the top: the command line);
- no library module imports demo/ or tools/ (only rmd.py calls into the demo; nothing outside tools/ imports tools/);
- loss.py imports only torch and the standard library; report.py only the standard library (distill.py uses it);
- the teacher side (formats, cli, protocol, teacher, asker, distill, demo.sim, demo.sim_server, tools.fault_server,
  tools.bench_teacher) imports no torch, transitively;
- only distributed.py touches torch.distributed (or DDP from torch.nn.parallel);
- model.py (the piece people copy) imports no repository module but formats (and loss);
- teacher.py, once split into protocol/teacher/distill, imports no repository module.

Every module named here must exist (a rename must update the rules). check() is tried on
small made-up graphs too, so that a broken rule is known to fail."""
import ast
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEACHER_SIDE = ("formats", "cli", "protocol", "teacher", "asker", "distill", "demo.sim", "demo.sim_server",
                "tools.fault_server", "tools.bench_teacher")
FOLDERS = ("demo", "tools")  # not library: the demo, and the benchmarks and test doubles
DISTRIBUTED = ("torch.distributed", "torch.nn.parallel")  # process groups, FSDP, DDP


def imports_of(source):
    """Every module a source file imports (dotted names, at any depth: function-local imports count), plus
    'torch.distributed' when the code reaches it as an attribute (torch.distributed.all_reduce)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # from torch import distributed
        elif isinstance(node, ast.Attribute) and node.attr == "distributed" and \
                isinstance(node.value, ast.Name) and node.value.id == "torch":
            found.add("torch.distributed")
    return found


def repo_graph(root=ROOT):
    """{module name: set of dotted imports} for every .py file at the top of the repository and in demo/ and
    tools/ (named demo.sim, tools.bench; a folder's __init__.py is the module demo, tools)."""
    graph = {}
    for folder in ("",) + FOLDERS:
        if not os.path.isdir(os.path.join(root, folder)):
            continue
        for name in sorted(os.listdir(os.path.join(root, folder))):
            if name.endswith(".py"):
                module = ".".join(filter(None, (folder, name[:-3]))).removesuffix(".__init__")
                with open(os.path.join(root, folder, name), encoding="utf-8") as f:
                    graph[module] = imports_of(f.read())
    return graph


def own(graph, module):
    """The repository modules `module` imports (`from demo import sim` imports demo and demo.sim)."""
    return {name for name in graph if any(n == name or n.startswith(name + ".") for n in graph[module])} - {module}


def is_library(module):
    return module != "rmd" and module.split(".")[0] not in FOLDERS


def cycle(graph):
    """One import cycle among the repository's modules as a list [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for other in sorted(own(graph, module)):
            if state.get(other) == "open":
                return stack[stack.index(other):] + [other]
            if other not in state:
                found = visit(other)
                if found:
                    return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def reachable(graph, module):
    """module and every repository module it imports, transitively."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(own(graph, current))
    return seen


def check(graph):
    """Every broken rule, one line each (empty when the graph keeps them all)."""
    problems = []
    found = cycle(graph)
    if found:
        problems.append("import cycle: " + " -> ".join(found))
    problems += [f"{m} imports rmd (rmd.py is the top: nothing imports it)" for m in graph if "rmd" in own(graph, m)]
    for m in sorted(graph):
        allowed = {"demo"} if m == "rmd" else set() if is_library(m) else set(FOLDERS)
        problems += [f"{m} imports {o} (the library never imports demo/ or tools/; only rmd.py calls into the demo)"
                     for o in sorted(own(graph, m)) if o.split(".")[0] in set(FOLDERS) - allowed]
    if "loss" in graph:
        stdlib = set(sys.stdlib_module_names)
        extra = {n for n in graph["loss"] if n.split(".")[0] not in stdlib | {"torch", "__future__"}}
        problems += [f"loss imports {n} (only torch and the standard library)" for n in sorted(extra)]
    if "report" in graph:
        extra = {n for n in graph["report"] if n.split(".")[0] not in set(sys.stdlib_module_names) | {"__future__"}}
        problems += [f"report imports {n} (only the standard library)" for n in sorted(extra)]
    for side in (m for m in TEACHER_SIDE if m in graph):
        for m in sorted(reachable(graph, side)):
            torch_imports = sorted(n for n in graph[m] if n.split(".")[0] == "torch")
            if torch_imports:
                problems.append(f"{side} (teacher side) reaches torch: {m} imports {torch_imports[0]}")
    for m in graph:
        touched = sorted(n for n in graph[m] if n.startswith(DISTRIBUTED))
        if touched and m != "distributed":
            problems.append(f"{m} imports {touched[0]} (only distributed.py may)")
    if "model" in graph:
        problems += [f"model imports {o} (model.py may import only formats and loss)"
                     for o in sorted(own(graph, "model") - {"formats", "loss"})]
    if "teacher" in graph and "protocol" in graph:  # after the split: teacher.py is the HTTP client and cache
        problems += [f"teacher imports {o} (teacher.py imports no repository module)"
                     for o in sorted(own(graph, "teacher"))]
    return problems


def test_the_repository_keeps_the_import_rules():
    graph = repo_graph()
    assert {"rmd", "model", "batches", "distributed", "train", "evaluation", "serve", "loss", "demo.tiny_lm",
            "demo.ablation", "demo.builtin", "tools.bench", "tools.bench_gpu"} | set(TEACHER_SIDE) <= set(graph)
    assert check(graph) == []


def test_the_top_level_holds_the_library_and_rmd_only():
    """The demo and the tools have folders of their own; none of their modules is left at the top."""
    graph = repo_graph()
    moved = {m.split(".", 1)[1] for m in graph if m.split(".")[0] in FOLDERS and "." in m}
    assert moved and not moved & set(graph), moved & set(graph)


def test_a_library_module_that_imports_the_demo_is_found(tmp_path):
    """The folder walk sees demo/ and tools/, so a made-up library file that imports the demo breaks the rule."""
    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "__init__.py").write_text('"""demo"""\n')
    (tmp_path / "demo" / "tiny_lm.py").write_text("import model\n")
    (tmp_path / "model.py").write_text("import torch\n")
    (tmp_path / "train.py").write_text("import model\n\ndef f():\n    from demo import tiny_lm\n")
    (tmp_path / "rmd.py").write_text("from demo import tiny_lm\nimport train\n")
    problems = check(repo_graph(str(tmp_path)))
    assert problems == ["train imports demo (the library never imports demo/ or tools/; only rmd.py calls into the "
                        "demo)", "train imports demo.tiny_lm (the library never imports demo/ or tools/; only rmd.py "
                        "calls into the demo)"], problems


def test_the_split_modules_exist_and_evaluate_is_gone():
    """evaluate.py shadowed Hugging Face's `evaluate` package; the reward model, data, distributed set-up,
    training loop, evaluation and server have a file each."""
    graph = repo_graph()
    assert "evaluate" not in graph
    assert "torch.distributed" in graph["distributed"]


@pytest.mark.parametrize("graph, broken", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, "import cycle: a -> b -> c -> a"),
    ({"rmd": {"train"}, "train": set(), "demo.tiny_lm": {"rmd"}}, "demo.tiny_lm imports rmd"),
    ({"train": {"demo.tiny_lm"}, "demo.tiny_lm": set()}, "train imports demo.tiny_lm (the library never"),
    ({"evaluation": {"tools"}, "tools": set()}, "evaluation imports tools (the library never"),
    ({"rmd": {"tools.bench"}, "tools.bench": set()}, "rmd imports tools.bench"),
    ({"model": {"formats"}, "formats": set(), "demo.sim": {"formats", "torch"}}, "demo.sim (teacher side) reaches"),
    ({"loss": {"torch", "math", "numpy"}}, "loss imports numpy"),
    ({"report": {"html", "torch.utils.tensorboard"}}, "report imports torch.utils.tensorboard"),
    ({"demo.sim": {"teacher"}, "teacher": {"formats"}, "formats": {"torch.nn"}}, "demo.sim (teacher side) reaches"),
    ({"train": {"torch", "torch.distributed"}}, "train imports torch.distributed"),
    ({"train": {"torch.nn.parallel.DistributedDataParallel"}}, "train imports torch.nn.parallel"),
    ({"model": {"formats", "batches"}, "formats": set(), "batches": set()}, "model imports batches"),
    ({"teacher": {"formats"}, "protocol": set(), "formats": set()}, "teacher imports formats"),
])
def test_each_rule_fails_when_broken(graph, broken):
    problems = check(graph)
    assert any(p.startswith(broken) for p in problems), problems


def test_function_local_imports_and_attribute_access_count():
    source = "import torch\n\ndef f():\n    from torch import distributed\n    import teacher\n    " \
             "torch.distributed.all_reduce(x)\n"
    found = imports_of(source)
    assert {"torch", "torch.distributed", "teacher"} <= found
    assert "torch.distributed" in imports_of("import torch\ntorch.distributed.barrier()\n")


@pytest.mark.slow
@pytest.mark.parametrize("module", ["demo.ablation", "demo.sim_server", "demo.tiny_lm", "tools.bench",
                                    "tools.bench_gpu", "tools.bench_teacher"])
def test_demo_and_tools_run_as_modules_and_say_so_when_run_as_files(module):
    """`python -m demo.ablation` is the way; `python demo/ablation.py` (where `import formats` would fail) says it."""
    import subprocess
    path = os.path.join(ROOT, *module.split(".")) + ".py"
    out = subprocess.run([sys.executable, path, "--help"], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and out.stderr.strip() == \
        f"error: run it from the repository root as a module: python -m {module}", out.stderr


# The library's only exits: --help (asking for help is asking the command line) and the helper that entry points run
# inside. Everything else raises (UsageError, DataError, ValueError ...) with its one line.
EXITS_ALLOWED = {("cli", "parse_overrides"), ("cli", "one_line_errors")}


def exits_in(source):
    """The functions (by name; '<module>' at the top) that mention SystemExit outside `if __name__ == "__main__":`."""
    found = []

    def visit(node, where):
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            return  # the module run as a script: an entry point
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            where = node.name
        if isinstance(node, ast.Name) and node.id == "SystemExit":
            found.append(where)
        for child in ast.iter_child_nodes(node):
            visit(child, where)
    visit(ast.parse(source), "<module>")
    return found


def test_the_library_raises_and_only_entry_points_exit():
    """No library module ends the process: a notebook that calls load_backbone("x") gets an exception it can
    catch, not an exit. rmd.py (the command line) and the demo's and tools' commands are the entry points."""
    exits = {}
    for module in (m for m in repo_graph() if is_library(m)):
        with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
            exits[module] = {(module, where) for where in exits_in(f.read())} - EXITS_ALLOWED
    assert not any(exits.values()), {m: sorted(w for _, w in e) for m, e in exits.items() if e}
    assert exits_in("def f():\n    raise SystemExit('error: x')\n") == ["f"]
    assert exits_in("if __name__ == '__main__':\n    raise SystemExit(main())\n") == []


def loss_kind_literals(source, kinds):
    """(line, literal) of every string constant in `source` that is a loss kind (docstrings excluded)."""
    tree = ast.parse(source)
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and node.value in kinds and id(node) not in docstrings]


def test_what_each_loss_kind_needs_is_read_from_loss_py():
    """train, batches and formats compare no loss-kind names: what a kind needs (margins, ties) is declared next to
    the losses (loss.NEEDS_MARGINS, loss.LEARNS_TIES), so a new kind is added in one place."""
    import loss
    assert set(loss.NEEDS_MARGINS) | set(loss.LEARNS_TIES) <= set(loss.PAIRWISE_KINDS)
    for module in ("train", "batches", "formats"):
        with open(os.path.join(ROOT, module + ".py"), encoding="utf-8") as f:
            assert loss_kind_literals(f.read(), loss.PAIRWISE_KINDS) == [], module
    assert loss_kind_literals('def f(cfg):\n    return cfg.loss != "bt"\n', loss.PAIRWISE_KINDS) == [(2, "bt")]


def top_level_names(graph=None):
    """{name: [modules]} of every top-level function and class of the repository's modules."""
    names = {}
    for module in graph or repo_graph():
        path = os.path.join(ROOT, *module.split(".")) + (os.sep + "__init__.py" if module in FOLDERS else ".py")
        with open(path, encoding="utf-8") as f:
            for node in ast.parse(f.read()).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    names.setdefault(node.name, []).append(module)
    return names


# The same function under the same name, kept twice on purpose: teacher.py is copied alone, so it cannot import it.
SAME_THING_TWICE = {"canonical": ["formats", "teacher"]}


def test_one_meaning_per_name():
    """A name the library defines means one thing: no two library modules define it (a reader who finds `Run` or
    `collate` knows which one is meant), and the names that once meant two things are defined once in the house."""
    names = top_level_names()
    twice = {name: modules for name, modules in names.items()
             if len([m for m in modules if is_library(m)]) > 1 and SAME_THING_TWICE.get(name) != modules}
    assert not twice, twice
    for name in ("Run", "collate", "cache_key", "table", "best_of_n", "finish", "fmt"):
        assert len(names.get(name, [])) <= 1, (name, names[name])
