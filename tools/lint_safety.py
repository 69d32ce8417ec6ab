"""Static safety checks that ruff has no rule for; `make lint` runs them after ruff.

    python tools/lint_safety.py        # exit 1 and a list of places when a check fails

- static-torch-load: no torch.load without weights_only=True, no ComfyUI load_torch_file without
  safe_load=True, no pickle/dill/joblib loads, no np.load(allow_pickle=True), in any Python file.
  (ruff's banned-api rule already keeps torch.load to blip_core/loading.py; this checks that call.)
- static-user-paths: in nodes/, every input that names a file (a combo listed by nodes/paths.py,
  or a string named like a file, path, prefix, folder or dir) is, in execute, validate_inputs and
  fingerprint_inputs, passed straight to a nodes/paths.py function (or to a helper of the same
  module that does so), or only compared, returned or shown in a message: never joined to a
  folder or opened directly.
- static-comfy-internals: in nodes/, only compat.py touches ComfyUI's internal attributes
  (ruff's banned-api rule already keeps ComfyUI's imports there).
- static-float-inputs: every FLOAT input of a node, and every INT input its validate_inputs receives, is
  passed to number_error there (ComfyUI's own min/max check lets NaN through, and it skips inputs that
  validate_inputs receives).

The ids are the rows of docs/reliability.md these checks cover.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {"node_modules", "__pycache__"}  # and every hidden folder: .git, the venvs, .cache
CHECKS = ("static-torch-load", "static-user-paths", "static-comfy-internals", "static-float-inputs")

RESOLVER_MODULE = "paths"  # nodes/paths.py: every user-named file goes through it
NODE_METHODS = ("execute", "validate_inputs", "fingerprint_inputs")
PATH_WORDS = ("file", "path", "prefix", "folder", "dir")
COMPAT_MODULE = "compat.py"
# Attributes of ComfyUI's objects whose names or shapes ComfyUI may change between versions.
COMFY_INTERNALS = {
    "cond_stage_model",
    "clip_l",
    "diffusion_model",
    "model_config",
    "unet_config",
    "first_stage_model",
    "control_model",
    "cond_hint_original",
    "compression_ratio",
    "folder_names_and_paths",
    "optimized_attention",
    "KSamplerX0Inpaint",
    "model_sampling",
    "inner_model",
    "patches_replace",
    "model_options",
    "embedding_size",
}


def python_files(root: Path = ROOT) -> list[Path]:
    def kept(path: Path) -> bool:
        parts = path.relative_to(root).parts[:-1]
        return not SKIP_DIRS & set(parts) and not any(part.startswith(".") for part in parts)

    return sorted(p for p in root.rglob("*.py") if kept(p))


def unsafe_loads(source: str) -> list[str]:
    """Calls that could unpickle code: torch.load without weights_only=True, ComfyUI's load_torch_file without
    safe_load=True, pickle's loaders, numpy loads with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module in ("torch", "pickle", "dill", "joblib"):
            for alias in node.names:
                if alias.name in ("load", "loads", "Unpickler"):
                    found.append(f"line {node.lineno}: from {node.module} import {alias.name}")
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        keywords = {k.arg: k.value for k in node.keywords}
        true = {key for key, value in keywords.items() if isinstance(value, ast.Constant) and value.value is True}
        if name.endswith("torch.load") and "weights_only" not in true:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name.endswith("load_torch_file") and "safe_load" not in true:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name in ("pickle.load", "pickle.loads", "pickle.Unpickler", "dill.load", "joblib.load"):
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
        elif name.endswith(("np.load", "numpy.load")) and "allow_pickle" in true:
            found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def path_inputs(cls: ast.ClassDef) -> set[str]:
    """A node's inputs that name files: combos whose options come from nodes/paths.py, and strings
    named like a file or folder."""
    names = set()
    for call in ast.walk(cls):
        if not (
            isinstance(call, ast.Call)
            and isinstance(call.func, ast.Attribute)
            and call.func.attr == "Input"
            and call.args
            and isinstance(call.args[0], ast.Constant)
        ):
            continue
        kind, name = ast.unparse(call.func.value), call.args[0].value
        options = next((k.value for k in call.keywords if k.arg == "options"), None)
        if kind == "io.Combo" and options is not None and ast.unparse(options).startswith(f"{RESOLVER_MODULE}."):
            names.add(name)
        elif kind == "io.String" and any(word in name for word in PATH_WORDS):
            names.add(name)
    return names


def unresolved_uses(source: str) -> tuple[list[str], list[str]]:
    """(uses, problems) of file-naming inputs in node methods. Each use must pass the name straight to
    a nodes/paths.py function, or to a function of the same module that does (checked the same way),
    or only compare, return or show it in a message: never join it to a folder or open it."""
    tree = ast.parse(source)
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    helpers = {f.name: f for f in tree.body if isinstance(f, ast.FunctionDef)}
    uses, problems = [], []

    def check(function: ast.FunctionDef, param: str, where: str, seen: frozenset) -> None:
        for name in ast.walk(function):
            if not (isinstance(name, ast.Name) and name.id == param and isinstance(name.ctx, ast.Load)):
                continue
            here = f"{where}:{name.lineno} {param}"
            parent = parents[name]
            keyword = parent.arg if isinstance(parent, ast.keyword) else None
            if keyword is not None:
                parent = parents[parent]
            callee = ast.unparse(parent.func) if isinstance(parent, ast.Call) else None
            if callee is not None and callee.startswith(f"{RESOLVER_MODULE}."):
                uses.append(f"{here} -> {callee}")
            elif callee in helpers and callee not in seen:
                helper = helpers[callee]
                arg = keyword or helper.args.args[parent.args.index(name)].arg
                uses.append(f"{here} -> {callee}()")
                check(helper, arg, f"{where} -> {callee}", seen | {callee})
            elif isinstance(parent, (ast.Return, ast.FormattedValue, ast.Compare)):
                uses.append(f"{here} -> {type(parent).__name__.lower()}")
            else:
                problems.append(f"{here}: {ast.unparse(parent)}")

    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        inputs = path_inputs(cls)
        for method in (n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name in NODE_METHODS):
            for param in inputs & {a.arg for a in method.args.args}:
                check(method, param, f"{cls.name}.{method.name}", frozenset())
    return uses, problems


def comfy_internals(source: str) -> list[str]:
    """Uses of ComfyUI-internal attribute names (COMFY_INTERNALS) in `source`."""
    return [
        f"line {node.lineno}: .{node.attr}"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Attribute) and node.attr in COMFY_INTERNALS
    ]


def number_input(call: ast.AST) -> tuple[str, str] | None:
    """(name, "Float" or "Int") of an `io.Float.Input("name", ...)` or `io.Int.Input(...)` call, else None."""
    if (
        isinstance(call, ast.Call)
        and ast.unparse(call.func) in ("io.Float.Input", "io.Int.Input")
        and call.args
        and isinstance(call.args[0], ast.Constant)
    ):
        return call.args[0].value, ast.unparse(call.func).split(".")[1]
    return None


def number_helpers(sources: list[str]) -> dict[str, tuple[str, str]]:
    """Module functions of the node files that return a number input: function name -> (input name, kind)."""
    helpers = {}
    for source in sources:
        for function in (n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef)):
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and (found := number_input(node.value)):
                    helpers[function.name] = found
    return helpers


def unchecked_numbers(source: str, helpers: dict[str, tuple[str, str]]) -> list[str]:
    """Number inputs of the nodes in `source` that their validate_inputs must pass to number_error and does not:
    every FLOAT input, and the INT inputs validate_inputs receives."""
    problems = []
    for cls in (n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ClassDef)):
        inputs = {}
        for node in ast.walk(cls):
            found = number_input(node)
            if found is None and isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                found = helpers.get(node.func.id)
            if found is not None:
                inputs[found[0]] = found[1]
        validate = next((n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "validate_inputs"), None)
        received = {a.arg for a in validate.args.args} if validate else set()
        checked = set()
        for node in ast.walk(validate) if validate else ():
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "number_error":
                checked |= {k.arg for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id == k.arg}
        problems += [
            f"{cls.name}: {kind.upper()} input {name!r} is not checked by number_error in validate_inputs"
            for name, kind in sorted(inputs.items())
            if name not in checked and (kind == "Float" or name in received)
        ]
    return problems


def lint(root: Path = ROOT) -> dict[str, list[str]]:
    """Problems by check id (empty lists when all is well)."""
    problems = {check: [] for check in CHECKS}
    for path in python_files(root):
        for found in unsafe_loads(path.read_text()):
            problems["static-torch-load"].append(f"{path.relative_to(root)}: {found}")
    node_files = {path: path.read_text() for path in sorted((root / "nodes").glob("*.py"))}
    helpers = number_helpers(list(node_files.values()))
    for path, source in node_files.items():
        problems["static-float-inputs"] += [f"{path.name}: {p}" for p in unchecked_numbers(source, helpers)]
        problems["static-user-paths"] += [f"{path.name}: {p}" for p in unresolved_uses(source)[1]]
        if path.name != COMPAT_MODULE:
            problems["static-comfy-internals"] += [f"{path.name}: {p}" for p in comfy_internals(source)]
    return problems


def main() -> int:
    failed = False
    for check, found in lint().items():
        for problem in found:
            print(f"{check}: {problem}")
        failed |= bool(found)
    if not failed:
        print(f"lint_safety: {', '.join(CHECKS)}: no problems")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
