"""CI runs exactly what the README tells a newcomer to run."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    marker = next(i for i, line in enumerate(readme) if line.startswith("# 2. install, then lint"))
    command = readme[marker + 1].strip()
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert ci[-1] == command
    assert "pytest benchmarks" in command  # the benchmark smoke run is its own invocation
    assert "ruff check ." in command  # lint is part of CI (config: [tool.ruff] in pyproject.toml)


def test_lint_configuration_covers_the_tree():
    """The ruff settings CI lints with: line length, pyflakes, pycodestyle and import order."""
    text = (ROOT / "pyproject.toml").read_text()
    assert "[tool.ruff]" in text and "line-length = 120" in text
    assert 'select = ["E", "F", "W", "I"]' in text
