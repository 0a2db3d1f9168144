"""The package's layers: a module imports only from its own layer and the
ones below it (alexnet_jax/__init__.py lists them), and none is over 400
lines."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'alexnet_jax'
# Bottom to top. A name is a subpackage or a top-level module.
LAYERS = ('runtime', 'model', 'config', 'data', 'train', 'tools',
          'benchmark', 'main')


def _layer(module: str) -> str:
  """'alexnet_jax.data.stream' -> 'data'; 'alexnet_jax.config' -> 'config'."""
  return module.split('.')[1]


def _imports(path: pathlib.Path) -> set[str]:
  """The alexnet_jax modules a file imports, at any depth in it."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module.startswith('alexnet_jax')):
      found.update(node.module + '.' + alias.name if node.module ==
                   'alexnet_jax' else node.module for alias in node.names)
    elif isinstance(node, ast.Import):
      found.update(a.name for a in node.names
                   if a.name.startswith('alexnet_jax.'))
  return found


def _modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    relative = path.relative_to(PACKAGE.parent).with_suffix('')
    yield path, '.'.join(relative.parts)


def test_every_module_is_in_a_layer():
  for _, module in _modules():
    if module != 'alexnet_jax.__init__':
      assert _layer(module) in LAYERS, module


def test_imports_only_go_down():
  upward = []
  for path, module in _modules():
    if module == 'alexnet_jax.__init__':
      continue
    own = LAYERS.index(_layer(module))
    for imported in _imports(path):
      if LAYERS.index(_layer(imported)) > own:
        upward.append(f'{module} imports {imported}')
  assert not upward


def test_no_module_is_over_400_lines():
  long = {module: len(path.read_text().splitlines())
          for path, module in _modules()
          if len(path.read_text().splitlines()) > 400}
  assert not long
