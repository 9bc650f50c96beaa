"""The project's own promises: README's commands are what CI runs, environment.yml matches pyproject."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [b.strip() for b in blocks[:2]]


def test_readme_has_the_two_setup_commands_and_ci_runs_the_second() -> None:
    demo, tests = readme_commands()
    assert demo.endswith("mav demo") and "pip install" in demo
    assert tests.endswith("pytest") and "'.[test]'" in tests
    ci = (ROOT / ".ci" / "run").read_text()
    assert tests in ci.splitlines(), "the README's test command must be run verbatim by .ci/run"
    assert "set -euo pipefail" in ci


def _name(req: str) -> str:
    return re.split(r"[<>=!\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_environment_yml_matches_pyproject() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    by_name = {_name(p): p for p in pip if not p.startswith("-e")}
    for req in deps:
        name = _name(req)
        assert name in by_name, f"environment.yml lacks {name}"
        if name not in ("torch", "torchvision"):  # pinned to this machine's builds there
            assert by_name[name].replace("_", "-").lower() == req.replace("_", "-").lower(), (req, by_name[name])
    assert "python=3.11" in env["dependencies"]


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules ``path`` imports (at module level or inside functions)."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [f"{node.module}.{a.name}" for a in node.names] + [node.module] \
            if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        found |= {n for n in names if n in modules}
    return found


def test_no_import_circle_among_the_package_modules() -> None:
    modules = {}
    for package in ("lightning_mav", "datamodules"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            modules[name] = path
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    assert graph["lightning_mav.commands"] and graph["lightning_mav.demo"]  # the walk sees imports at all

    def circle_from(start: str, path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt == start:
                return [*path, start]
            if nxt not in path and (found := circle_from(start, [*path, nxt])):
                return found
        return None

    for name in sorted(graph):
        circle = circle_from(name, [name])
        assert circle is None, " -> ".join(circle)


def test_readme_networks_table_is_the_registry() -> None:
    from lightning_mav.networks import NETWORKS

    section = (ROOT / "README.md").read_text().split("## The networks and their stages", 1)[1].split("\n\n## ")[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert len(rows) == len(NETWORKS)
    for network, row in zip(NETWORKS, rows):  # in the registry's (training) order
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0].startswith(f"`{network.paper}`"), (network.key, row)
        assert cells[2] == f"`{network.module.removeprefix('lightning_mav.')}`", (network.key, row)
        assert cells[3] == f"`experiments/{network.run}.yaml`" and cells[4] == network.trained_on, (network.key, row)
