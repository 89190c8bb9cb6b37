"""The installs are reproducible: both README commands take the exact versions in
scripts/constraints.txt, every dependency is pinned there, and the floors of the runtime dependencies in
pyproject.toml are those pins, so the suite (installed with them) runs at the floors it declares."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "scripts" / "constraints.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins() -> dict[str, str]:
    pins = {}
    for raw in CONSTRAINTS.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[_norm(name)] = version
    return pins


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def test_every_dependency_is_pinned_within_its_range():
    pins = _pins()
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]
    for name in ("embedded", "gptq", "serve", "dev"):  # what the README commands install
        reqs += [Requirement(r) for r in project["optional-dependencies"][name] if not r.startswith("zlocal")]
    for req in reqs:
        name = _norm(req.name)
        assert name in pins, f"{req.name} is not pinned in scripts/constraints.txt"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req} excludes the pin {pins[name]}"


def test_runtime_floors_are_the_tested_versions():
    pins = _pins()
    for text in _project()["dependencies"]:
        req = Requirement(text)
        floors = [s.version for s in req.specifier if s.operator == ">="]
        pin = pins[_norm(req.name)]
        assert floors == [pin], f"{text}: the floor must be the tested {pin}"


def test_the_suite_runs_on_the_pinned_versions():
    # the README's test command installs with the constraints; this is what makes the floors tested
    pins = _pins()
    for text in _project()["dependencies"]:
        name = Requirement(text).name
        installed = metadata.version(name)
        pin = pins[_norm(name)]
        assert installed.split("+")[0] == pin, f"{name} {installed} is installed, pinned {pin}"


def test_both_readme_commands_install_with_the_constraints():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines() if line.startswith("pip install")]
    assert len(commands) >= 2, "the README's set-up commands moved"
    for command in commands[:2]:
        for step in command.split("&&"):
            if step.strip().startswith("pip install"):
                assert "-c scripts/constraints.txt" in step, step
