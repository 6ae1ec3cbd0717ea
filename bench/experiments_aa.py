"""A/A on simulated users through a real server: is the report's false-positive rate honest?

    python -m bench.experiments_aa --runs 20 --requests 600 --out bench/results/experiments_aa.json

One real uvicorn serves the default model trained (short run) on a small synthetic world with
1000 users, its features in a real redis-server, and an experiments file of one A/A experiment
(two arms, no override: the same model). For each run the file is rewritten with a new
experiment name and salt (reloaded without restart), `ranker simulate` runs `--requests`
seeded requests, and after the last run the served log is exported once and reported: one
experiment per run, each judged on every task at alpha 0.05: p-values by permutation of the
users between the arms, Holm-adjusted over the three tasks (the report's `significant`).
The issue asks at most 3 runs significant of 20; the expectation is at most 1 (20 x 0.05: Holm
bounds the chance that a run is significant on any task by 0.05).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.procs import uvicorn_cmd

AA = ('[[experiment]]\nname = "aa-{i}"\nsalt = "aa-bench-{i}"\n'
      '[[experiment.arm]]\nname = "control"\nshare = 0.5\n'
      '[[experiment.arm]]\nname = "treatment"\nshare = 0.5\n')


def experiment_in_force(base_url: str) -> str | None:
    with urllib.request.urlopen(f"{base_url}/model", timeout=5) as r:
        exps = json.loads(r.read())["experiments"]["experiments"]
    return exps[0]["name"] if exps else None


def run(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import redis

    from analysis.report import experiment_report
    from launch import procs
    from launch.local_redis import RedisServer
    from launch.logs import export_main
    from ranker.manifest import load_manifest, load_schema
    from ranker.servedlog import feedback_stream, served_stream
    from service.featurestore.writer import load_tables
    from training.pipeline import ensure_default_model
    from training.synthetic import SyntheticConfig, write_dataset

    world = tmp / "world"
    write_dataset(SyntheticConfig.small(n_users=args.users), world)
    vdir = ensure_default_model(tmp / "models", world, small=True)
    exp = tmp / "experiments.toml"
    exp.write_text(AA.format(i=0))
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, socket_timeout=5)
        load_tables(client, load_schema(vdir, load_manifest(vdir)),
                    pq.read_table(world / "users.parquet"), pq.read_table(world / "items.parquet"))
        port = procs.free_port()
        env = {"RANKER_MODEL_REPO": str(tmp / "models"), "RANKER_MODEL_NAME": "mmoe",
               "RANKER_REDIS_URL": server.url, "RANKER_WARMUP_BATCH_SIZES": "[1, 64]",
               "RANKER_REQUEST_TIMEOUT_S": "5.0", "RANKER_EXPERIMENTS_FILE": str(exp),
               # a loaded 2-core box: no Redis-timeout 503s (this measures statistics)
               "RANKER_REDIS_SOCKET_TIMEOUT_S": "1.0", "RANKER_REDIS_CONNECT_TIMEOUT_S": "1.0",
               "RANKER_EXPERIMENTS_POLL_S": "0.2", "RANKER_LOG_SAMPLE_RATE": "1"}
        proc = procs.spawn(uvicorn_cmd("service.app:create_app", port, factory=True), env=env,
                           log=tmp / "server.log", new_group=True)
        base = f"http://127.0.0.1:{port}"
        served = events = 0
        t0 = time.monotonic()
        try:
            procs.wait_http(f"{base}/readyz", proc, 120)
            for i in range(args.runs):
                if i:
                    exp.write_text(AA.format(i=i))
                    name = f"aa-{i}"
                    procs.wait_until(lambda: experiment_in_force(base) == name,  # noqa: B023
                                     timeout_s=30, proc=proc, what="the reload")
                out = tmp / f"sim-{i}.json"
                # `ranker simulate` as a user runs it (bench and sim are separate layers)
                subprocess.run([sys.executable, "-m", "launch.cli", "simulate", "--base-url",
                                base, "--data-dir", str(world), "--json", str(out),
                                "--requests", str(args.requests), "--concurrency", "4",
                                "--seed", str(1000 + i), "--candidates", "150", "--top-k",
                                "10", "--timeout", "10"], check=True, stdout=subprocess.DEVNULL)
                s = json.loads(out.read_text())
                assert s["rank_status"] == {"200": args.requests}, s["rank_status"]
                served += args.requests
                events += s["feedback"]["accepted_events"]
            procs.wait_until(lambda: client.xlen(served_stream("rk")) >= served
                             and client.xlen(feedback_stream("rk")) >= events,
                             timeout_s=60, what="the served log")
        finally:
            procs.stop(proc, 15.0, group=True)
        elapsed = time.monotonic() - t0
        assert export_main(["--out", str(tmp / "logs"), "--redis-url", server.url,
                            "--until-empty"]) == 0
        client.close()
    rep = experiment_report(tmp / "logs", shares={f"aa-{i}": {"control": 0.5,
                                                             "treatment": 0.5}
                                                  for i in range(args.runs)})
    rows = []
    for e in rep["experiments"]:
        t = next(a for a in e["arms"] if a["name"] == "treatment")
        rows.append({"experiment": e["name"], "users": [a["users"] for a in e["arms"]],
                     "srm_p": e["srm"]["p_value"], "srm_mismatch": e["srm"]["mismatch"],
                     "significant": [task for task in rep["tasks"]
                                     if t["tasks"][task]["lift"]["significant"]],
                     **{f"{task}_{key}": t["tasks"][task]["lift"][name]
                        for task in rep["tasks"]
                        for key, name in (("p", "p_value"), ("holm_p", "p_holm"),
                                          ("bootstrap_p", "bootstrap_p_value"),
                                          ("naive_p", "naive_p_value"))},
                     "events": {task: [a["tasks"][task]["events"] for a in e["arms"]]
                                for task in rep["tasks"]}})
    sig = {task: sum(r[f"{task}_p"] < 0.05 for r in rows) for task in rep["tasks"]}
    boot = {task: sum(r[f"{task}_bootstrap_p"] < 0.05 for r in rows) for task in rep["tasks"]}
    naive = {task: sum(r[f"{task}_naive_p"] < 0.05 for r in rows) for task in rep["tasks"]}
    return {"command": f"python -m bench.experiments_aa --runs {args.runs} --requests "
                       f"{args.requests} --users {args.users}",
            "runs": args.runs, "requests_per_run": args.requests, "users": args.users,
            "serving_seconds": round(elapsed, 1),
            "runs_significant_holm": sum(bool(r["significant"]) for r in rows),
            "significant_at_0.05": sig, "bootstrap_significant_at_0.05": boot,
            "naive_significant_at_0.05": naive,
            "srm_mismatches": sum(r["srm_mismatch"] for r in rows), "per_run": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments_aa")
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--requests", type=int, default=600)
    p.add_argument("--users", type=int, default=1000)
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="aa-bench-") as tmp:
        res = run(args, Path(tmp))
    text = json.dumps(res, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(json.dumps({k: v for k, v in res.items() if k != "per_run"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
