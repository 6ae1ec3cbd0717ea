"""`ranker simulate`: simulated users with known true preferences call /rank and /feedback.

Loopback only: a base URL whose host does not resolve only to 127.0.0.0/8 or ::1 is refused
(exit 2), so that the load generator can never be pointed at someone else's server.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from training.synthetic import TASKS


def loopback_error(base_url: str) -> str | None:
    """Why `base_url` is refused, or None if its host resolves to loopback addresses only."""
    try:
        parts = urlsplit(base_url)
        port = parts.port
    except ValueError as e:
        return f"--base-url {base_url!r} is not a URL: {e}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"--base-url {base_url!r} must be http(s)://host[:port]"
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, port or 80, type=socket.SOCK_STREAM)
    except OSError as e:
        return f"--base-url host {host!r} does not resolve ({e}); simulate runs on loopback only"
    addrs = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    bad = sorted(str(a) for a in addrs if not _is_loopback(a))
    if bad or not addrs:
        return (f"--base-url host {host!r} resolves to {', '.join(bad) or 'nothing'}: simulate "
                f"only runs against loopback (127.0.0.0/8, ::1)")
    return None


def _is_loopback(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return a.is_loopback


def _weights(text: str) -> dict[str, float]:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON: {e}") from None
    if not isinstance(raw, dict) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in raw.values()):
        raise argparse.ArgumentTypeError('expected an object of numbers, e.g. {"click": 1}')
    return {str(k): float(v) for k, v in raw.items()}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ranker simulate",
        description="Simulated users drawn from the synthetic world call POST /rank, examine the "
        "top K with a position effect, draw click/like/share from their true probabilities and "
        "send them to POST /feedback; prints measured and expected rates (served, oracle, "
        "random). Loopback only; bounded in requests and seconds.",
    )
    p.add_argument("--base-url", required=True, help="the server, e.g. http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, required=True, help="stop after this many requests")
    p.add_argument("--max-seconds", type=float, default=60.0,
                   help="stop after this many seconds (default %(default)s)")
    p.add_argument("--users", type=int, help="simulate this many users (default: all)")
    p.add_argument("--top-k", type=int, default=10, help="positions users look at (%(default)s)")
    p.add_argument("--candidates", type=int, default=100, help="candidates per request "
                   "(%(default)s)")
    p.add_argument("--eta", type=float, default=1.0,
                   help="position effect: P(examine p) = (1+p)^-eta (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", type=Path, default=Path("data/synthetic"),
                   help="the world written by `ranker data` (default %(default)s)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent users (%(default)s)")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds per HTTP call")
    p.add_argument("--weights", type=_weights,
                   help='per-task weights sent with each request, JSON: {"click": 1, "like": 4}')
    p.add_argument("--api-key", help="sent as X-API-Key to /rank and /feedback")
    p.add_argument("--json", type=Path, help="also write the summary to this file")
    return p


def _check(a: argparse.Namespace) -> str | None:
    for name, value, low in (("--requests", a.requests, 1), ("--top-k", a.top_k, 1),
                             ("--candidates", a.candidates, 1),
                             ("--concurrency", a.concurrency, 1)):
        if value < low:
            return f"{name} must be >= {low}, got {value}"
    if a.users is not None and a.users < 1:
        return f"--users must be >= 1, got {a.users}"
    if not a.max_seconds > 0 or not a.timeout > 0:
        return "--max-seconds and --timeout must be > 0"
    if a.eta < 0:
        return f"--eta must be >= 0, got {a.eta}"
    return None


def _num(x: float | None) -> str:
    return f"{x:8.5f}" if x is not None else f"{'-':>8}"


def format_summary(s: dict[str, Any]) -> str:
    """The summary as a few readable lines."""
    run, pm, fb = s["run"], s["position_model"], s["feedback"]
    lines = [
        f"simulate {run['base_url']}: {s['requests']} requests in {run['elapsed_s']:.1f}s "
        f"(stopped by {run['stopped_by']}), /rank status {s['rank_status']}, "
        f"models {s['model_versions']}",
        f"position model: {pm['form']}, eta={pm['eta']}, top_k={pm['top_k']}",
        f"impressions {s['impressions']}, examined {s['examined']}, events {s['events']}",
        f"feedback: {fb['batches']} batches, status {fb['status']}, "
        f"{fb['accepted_events']} events accepted"
        + ("" if fb["supported"] else " (feedback not supported by this server: 404)"),
        "per impression:      " + "  ".join(f"{t:>8}" for t in (*TASKS, "weighted")),
        "  measured           " + "  ".join(_num(s["rates"][t]) for t in TASKS),
    ]
    for r in ("served", "oracle", "random"):
        er = s["expected_rates"][r]
        lines.append(f"  expected {r:<9} " + "  ".join(_num(er[t]) for t in (*TASKS, "weighted")))
    if s["problems"]:
        lines.append(f"problems: {s['problems_total']}, e.g. {s['problems'][:3]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Entry point of `ranker simulate`."""
    a = parser().parse_args(argv)
    error = _check(a) or loopback_error(a.base_url)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    from sim.core import PositionModel
    from sim.run import SimConfig, simulate, summary
    from training.synthetic import World

    try:
        world = World.load(a.data_dir)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.candidates > world.n_items:
        print(f"error: --candidates {a.candidates} > the world's {world.n_items} items",
              file=sys.stderr)
        return 2
    cfg = SimConfig(requests=a.requests, candidates=a.candidates, users=a.users, seed=a.seed,
                    concurrency=a.concurrency, max_seconds=a.max_seconds, timeout_s=a.timeout,
                    weights=a.weights, api_key=a.api_key)
    position = PositionModel(top_k=a.top_k, eta=a.eta)
    base_url = a.base_url.rstrip("/")
    result = asyncio.run(simulate(world, base_url, cfg, position))
    out = summary(result, cfg, position, base_url)
    print(format_summary(out))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
