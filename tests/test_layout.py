"""The package's import rules: imports run one way between layers, and no module imports another
module's private names. Read from the source (ast), so function-level imports count too."""
from __future__ import annotations

import ast
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "genesis_jax"

# Lowest first: a module may import from its own layer and the layers below it.
LAYERS = (
    ("genesis_jax.errors", "genesis_jax.config"),
    ("genesis_jax.models", "genesis_jax.weights", "genesis_jax.data", "genesis_jax.corruptions"),
    ("genesis_jax.eval",),
    ("genesis_jax.train",),
    ("genesis_jax.predict", "genesis_jax.predict2d", "genesis_jax.experiments", "genesis_jax.run"),
    ("genesis_jax.main",),
)


def layer_of(module: str) -> int | None:
  for i, prefixes in enumerate(LAYERS):
    if any(module == p or module.startswith(p + ".") for p in prefixes):
      return i
  return None


def module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(REPO).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: pathlib.Path) -> list[tuple[int, str, list[str]]]:
  """(line, imported module, imported names) for every genesis_jax import in the file."""
  out = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("genesis_jax"):
      names = [a.name for a in node.names]
      # `from genesis_jax.x import y` may name a submodule y: resolve to the deeper module.
      for n in names:
        sub = f"{node.module}.{n}"
        is_module = (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() or (
            PACKAGE.parent / sub.replace(".", "/")).is_dir()
        out.append((node.lineno, sub if is_module else node.module, [] if is_module else [n]))
    elif isinstance(node, ast.Import):
      out += [(node.lineno, a.name, []) for a in node.names if a.name.startswith("genesis_jax")]
  return out


def package_files() -> list[pathlib.Path]:
  return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_has_a_layer():
  missing = [module_name(p) for p in package_files()
             if layer_of(module_name(p)) is None and module_name(p) != "genesis_jax"]
  assert not missing, f"modules outside the declared layers: {missing}"


def test_imports_run_one_way():
  bad = []
  for path in package_files():
    me = module_name(path)
    mine = layer_of(me)
    if mine is None:
      continue
    for line, target, _ in imports(path):
      theirs = layer_of(target)
      if theirs is not None and theirs > mine:
        bad.append(f"{path.relative_to(REPO)}:{line} ({me}, layer {mine}) imports {target} "
                   f"(layer {theirs})")
  assert not bad, "imports against the layering:\n" + "\n".join(bad)


@pytest.mark.parametrize("root", ["genesis_jax", "tests", "bench"])
def test_no_private_names_across_modules(root):
  bad = []
  for path in sorted((REPO / root).rglob("*.py")):
    if "__pycache__" in path.parts:
      continue
    me = module_name(path) if root == "genesis_jax" else None
    for line, target, names in imports(path):
      private = [n for n in names if n.startswith("_") and not n.startswith("__")]
      if target.rsplit(".", 1)[-1].startswith("_") and target.rsplit(".", 1)[-1] != "__main__":
        private.append(target)
      if private and target != me:
        bad.append(f"{path.relative_to(REPO)}:{line} imports {private} from {target}")
    # module.attribute access of a private name, e.g. `layers._conv_native`
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
          and not node.attr.startswith("__") and isinstance(node.value, ast.Name)):
        imported = {t.rsplit(".", 1)[-1] for _, t, n in imports(path) if not n}
        aliases = _aliases(path)
        if node.value.id in imported or node.value.id in aliases:
          bad.append(f"{path.relative_to(REPO)}:{node.lineno} uses {node.value.id}.{node.attr}")
  assert not bad, "private names used across modules:\n" + "\n".join(bad)


def _aliases(path: pathlib.Path) -> set[str]:
  """Local names bound to genesis_jax modules by `import ... as x` / `from ... import m as x`."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
      mod = getattr(node, "module", None) or ""
      for a in node.names:
        full = a.name if isinstance(node, ast.Import) else f"{mod}.{a.name}"
        if full.startswith("genesis_jax") and (
            (PACKAGE.parent / (full.replace(".", "/") + ".py")).exists()
            or (PACKAGE.parent / full.replace(".", "/")).is_dir()):
          out.add(a.asname or a.name.rsplit(".", 1)[-1])
  return out


def test_modules_stay_small():
  big = [f"{p.relative_to(REPO)}: {n} lines" for p in package_files()
         if (n := len(p.read_text().splitlines())) > 520]
  assert not big, "modules over ~500 lines:\n" + "\n".join(big)


def test_no_import_cycles():
  """No two modules import each other, directly or through others (lazy imports included)."""
  modules = {module_name(p): p for p in package_files()}
  graph = {m: {t for _, t, _ in imports(p) if t in modules and t != m} for m, p in modules.items()}
  cycles, state = [], {}

  def visit(m, stack):
    state[m] = "open"
    for t in sorted(graph[m]):
      if state.get(t) == "open":
        cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
      elif t not in state:
        visit(t, stack + [t])
    state[m] = "done"

  for m in sorted(modules):
    if m not in state:
      visit(m, [m])
  assert not cycles, "import cycles:\n" + "\n".join(cycles)
