"""The package's layering: imports point downward only (no module imports one that imports it back,
even lazily inside a function), and the kernel backends sit below the ops they serve."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fastmoe_kernels"
# What the kernel backends may import from the package: the registry and the helpers below the ops.
BELOW_THE_OPS = {"fastmoe_kernels.backends", "fastmoe_kernels._alloc", "fastmoe_kernels._shapes",
                 "fastmoe_kernels._checks", "fastmoe_kernels.activations", "fastmoe_kernels.config",
                 "fastmoe_kernels.fp8",  # the fp8 recipe's constants and specification (imports torch only)
                 "fastmoe_kernels.tuning",  # the per-device tuning tables (imports torch only)
                 "fastmoe_kernels._variants",  # the A/B's environment flags (imports os only)
                 "fastmoe_kernels._C"}  # the compiled extension


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / pathlib.Path(*name.split(".")) / "__init__.py").is_file()


def _module_exists(name: str) -> bool:
    base = PACKAGE.parent / pathlib.Path(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def imports_of(path: pathlib.Path) -> set:
    """Package modules ``path`` imports, at module level or inside functions."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastmoe_kernels")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("fastmoe_kernels"):
                continue
            # `from pkg import mod` imports the submodule when there is one, else a name of pkg.
            subs = [f"{target}.{a.name}" for a in node.names if _module_exists(f"{target}.{a.name}")]
            found |= set(subs) if subs and len(subs) == len(node.names) else {target} | set(subs)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
            # importlib.import_module("fastmoe_kernels.x") is an import too.
            arg = node.args[0] if node.args else None
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and arg.value.startswith("fastmoe_kernels"):
                found.add(arg.value)
    found.discard(this)
    return found


def import_graph() -> dict:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    # Importing a submodule runs its parent packages' __init__ first; those edges are implied, so a
    # cycle through a package's own __init__ (which re-exports its submodules) is not a layering one.
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("backend_package", ["triton_backend", "csrc_backend"])
def test_kernel_backends_import_only_what_lies_below_the_ops(backend_package):
    graph = import_graph()
    prefix = f"fastmoe_kernels.{backend_package}"
    for module, targets in graph.items():
        if module.startswith(prefix):
            outside = {t for t in targets if not t.startswith(prefix)} - BELOW_THE_OPS
            assert not outside, f"{module} imports {sorted(outside)}"


def test_the_registry_imports_nothing_of_the_package():
    assert import_graph()["fastmoe_kernels.backends"] == set()


def test_the_graph_sees_lazy_imports():
    # The check above would miss a cycle hidden in a function body if imports_of skipped them.
    src = PACKAGE / "integrations" / "transformers.py"
    assert "fastmoe_kernels.layer" in imports_of(src)


def _test_tree_top_level_names(root: pathlib.Path) -> set:
    """The names pytest's rootdir-relative imports make importable from ``root`` (it sits on sys.path
    because it has no __init__.py): its modules and its packages."""
    return ({p.stem for p in root.glob("*.py")}
            | {p.parent.name for p in root.glob("*/__init__.py")})


@pytest.mark.parametrize("tree", ["tests", "benchmarks"])
def test_no_test_module_shadows_an_installed_or_standard_module(tree):
    # tests/kernels/ once shadowed Hugging Face's `kernels` distribution, which transformers >= 5.2x
    # imports at `transformers.integrations.moe`: CI's collection of test_transformers.py failed.
    import importlib.metadata
    import sys
    installed = set(importlib.metadata.packages_distributions()) | set(sys.stdlib_module_names)
    ours = _test_tree_top_level_names(PACKAGE.parent / tree) - {"conftest", "__init__"}
    clashes = sorted(ours & installed)
    assert not clashes, f"{tree}/ defines top-level modules named like installed ones: {clashes}"
