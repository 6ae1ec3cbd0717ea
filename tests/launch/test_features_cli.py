"""`ranker features load` on a real exported model's manifest and a real redis-server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import redis

from launch.features import load_main
from ranker.manifest import load_manifest
from service.featurestore.keys import pointer_key
from tests.service.featurestore.tables import items_table, users_table


@pytest.fixture
def tables(tmp_path: Path) -> tuple[Path, Path]:
    users, items = tmp_path / "users.parquet", tmp_path / "items.parquet"
    pq.write_table(users_table(), users)
    pq.write_table(items_table(), items)
    return users, items


def test_load_through_the_ranker_entry_point(
    tiny_model_dir: Path, tables: tuple[Path, Path], redis_url: str
) -> None:
    users, items = tables
    argv = ["features", "load", "--model-dir", str(tiny_model_dir)]
    argv += ["--users", str(users), "--items", str(items), "--redis-url", redis_url]
    out = subprocess.run(
        [sys.executable, "-m", "launch.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert "loaded 10 users and 30 items" in out.stdout
    assert "100%" in out.stderr and "40.0/40.0" in out.stderr  # the progress bar finished
    report = json.loads(out.stdout.strip().splitlines()[-1])
    version = load_manifest(tiny_model_dir).schema_version
    assert report["schema_version"] == version
    client = redis.Redis.from_url(redis_url)
    for entity in ("user", "item"):
        assert client.get(pointer_key("rk", version, entity)) == report["load_id"].encode()
    assert client.dbsize() == 42
    client.close()


def test_load_newest_of_repo_is_idempotent(
    tiny_model_dir: Path,
    tables: tuple[Path, Path],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    users, items = tables
    repo, name = tiny_model_dir.parent.parent, tiny_model_dir.parent.name
    argv = ["--repo", str(repo), "--name", name, "--users", str(users), "--items", str(items)]
    argv += ["--redis-url", redis_url, "--no-progress", "--ttl", "600"]
    assert load_main(argv) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert load_main(argv) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["load_id"] == second["load_id"]
    assert second["previous_load_ids"] == {"user": first["load_id"], "item": first["load_id"]}
    assert (second["users"], second["items"], second["ttl_s"]) == (10, 30, 600)


def test_missing_redis_url_says_so(
    tiny_model_dir: Path, tables: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--model-dir", str(tiny_model_dir), "--users", str(tables[0])]
    assert load_main(argv) == 2
    assert "--redis-url is required" in capsys.readouterr().err
