"""Print pip's package sources as `uv pip` options, one per line (uv reads no pip configuration).

The lock and the lowest-versions run are resolved by uv, the installs by pip (or uv given these
options), and both must see the same packages: pip's configuration (pip.conf files and PIP_*
variables, as `pip config list` reports them) may add extra indexes, find-links directories
(where a machine keeps e.g. the CPU torch wheel) and global constraint files. This prints the
equivalent --index-url / --extra-index-url / --find-links / --constraint options, plus
`--index-strategy unsafe-best-match`, which is pip's own behaviour (the best version across every
index; uv's default stops at the first index that has the package).

    uv pip compile $(python requirements/pip_sources.py) ...
"""

from __future__ import annotations

import subprocess
import sys

# pip's option name -> uv's; the values are whitespace-separated lists except the index URL.
OPTIONS = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
    "constraint": "--constraint",
}
# Later sections override earlier ones, as in pip: [global], then [install], then PIP_* variables.
PRECEDENCE = ("global", "install", ":env:")


def pip_config() -> dict[str, str]:
    """The effective value of each pip option named in OPTIONS."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
        check=True,
    ).stdout
    found: dict[tuple[str, str], str] = {}
    for line in listed.splitlines():
        key, sep, value = line.partition("=")
        section, _, name = key.rpartition(".")
        if sep and section in PRECEDENCE and name in OPTIONS:
            found[(section, name)] = value.strip().strip("'\"")
    out: dict[str, str] = {}
    for section in PRECEDENCE:
        for (sec, name), value in found.items():
            if sec == section:
                out[name] = value
    return out


def uv_options(config: dict[str, str]) -> list[str]:
    args = ["--index-strategy", "unsafe-best-match"]
    for name, flag in OPTIONS.items():
        value = config.get(name, "")
        values = [value] if name == "index-url" and value else value.split()
        for v in values:
            args += [flag, v]
    return args


def main() -> None:
    print("\n".join(uv_options(pip_config())))


if __name__ == "__main__":
    main()
