"""The modules' layout: no import cycles among the top-level modules."""
import ast
import os

from conftest import ROOT


def imports_of(module):
    with open(os.path.join(ROOT, module + '.py')) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name.split('.')[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split('.')[0])
    return names


def test_the_top_level_modules_import_each_other_without_a_cycle():
    modules = {f[:-3] for f in os.listdir(ROOT) if f.endswith('.py')}
    graph = {m: (imports_of(m) & modules) - {m} for m in modules}
    done, active = set(), []

    def visit(module):
        assert module not in active, 'import cycle: ' + ' -> '.join(active + [module])
        if module in done:
            return
        active.append(module)
        for dep in sorted(graph[module]):
            visit(dep)
        active.pop()
        done.add(module)

    for module in sorted(modules):
        visit(module)
    assert {'runs', 'flags'} <= graph['summarize'] and 'training' not in graph['summarize']
    assert 'training' not in graph['grid'] and 'runs' in graph['training']
