"""Where a streamed feature load spends its CPU (issue 20), stage by stage, on a world's files.

    python -m bench.loader_stages --model-dir /tmp/bw/bigmodels/mmoe/1 --data /tmp/bw/production

  read     the Parquet steps (`iter_batches`, 50 000 rows, the loader's columns and dictionaries)
  encode   `encode_table` of each step (vocabulary lookups, lists, records)
  pack     the RESP bytes of the MSET commands (5 000 records each, `pack_records`)
  redis    the packed commands written on one raw socket to a private redis-server (a reader
           thread takes the replies), nothing else running in the client: the server's own
           ceiling in records/s and its CPU per record
CPU seconds of this process (`time.process_time`, Parquet's reader threads included) and of the
redis-server (/proc). One JSON line per entity, then one for the server.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import redis

from bench.bigworld import process_cpu_s
from ranker.manifest import load_manifest, load_schema
from service.featurestore.bulk import pack_records
from service.featurestore.writer import (
    DEFAULT_READ_ROWS,
    DEFAULT_STREAM_ROWS,
    dictionary_columns,
    encode_table,
)


def main(argv: list[str] | None = None) -> int:
    from launch.local_redis import RedisServer

    p = argparse.ArgumentParser(prog="python -m bench.loader_stages", description=__doc__)
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True, help="dir with users/items.parquet")
    a = p.parse_args(argv)
    schema = load_schema(a.model_dir, load_manifest(a.model_dir))
    commands: list[bytes] = []
    records = 0
    for entity in ("user", "item"):
        group, path = schema.group(entity), a.data / f"{entity}s.parquet"
        assert group is not None and group.key is not None
        pf = pq.ParquetFile(path, read_dictionary=dictionary_columns(path, group))
        columns = [group.key, *[n for n in group.feature_names if n in pf.schema_arrow.names]]
        t0 = time.process_time()
        steps = list(pf.iter_batches(batch_size=DEFAULT_READ_ROWS, columns=columns))
        t_read = time.process_time() - t0
        t0 = time.process_time()
        encoded = [encode_table(group, pa.Table.from_batches([b]), 0.0) for b in steps]
        t_encode = time.process_time() - t0
        size = group.record_dtype().itemsize
        t0 = time.process_time()
        for enc in encoded:
            blob = enc.records.tobytes()
            for lo in range(0, len(enc), DEFAULT_STREAM_ROWS):
                hi = min(len(enc), lo + DEFAULT_STREAM_ROWS)
                commands.append(pack_records(f"rk:stages:{entity}:", enc.id_array[lo:hi],
                                             blob[lo * size : hi * size], size, None,
                                             ("rk:stages:progress", hi))[0])
        t_pack = time.process_time() - t0
        n = sum(len(e) for e in encoded)
        records += n
        print(json.dumps({"entity": entity, "records": n, "record_bytes": size,
                          "cpu_s": {"read": round(t_read, 3), "encode": round(t_encode, 3),
                                    "pack": round(t_pack, 3)},
                          "us_per_record": round((t_read + t_encode + t_pack) / n * 1e6, 2),
                          "loadavg_1m": os.getloadavg()[0]}), flush=True)
    with RedisServer() as rs:
        assert rs.pid is not None
        client = redis.Redis.from_url(rs.url)
        kw = client.connection_pool.connection_kwargs
        sock = socket.create_connection((kw["host"], kw["port"]))
        got = bytearray()
        need = 5 * len(commands)  # "+OK\r\n" per MSET

        def replies() -> None:
            while len(got) < need:
                chunk = sock.recv(1 << 16)
                if not chunk:
                    return
                got.extend(chunk)

        before = process_cpu_s(rs.pid)
        t0 = time.perf_counter()
        reader = threading.Thread(target=replies)
        reader.start()
        for command in commands:
            sock.sendall(command)
        reader.join()
        wall = time.perf_counter() - t0
        after = process_cpu_s(rs.pid)
        sock.close()
        server_cpu = (after - before) if after is not None and before is not None else None
        print(json.dumps({"redis": {"records": records, "commands": len(commands),
                                    "replies_ok": bytes(got).count(b"+OK"),
                                    "wall_s": round(wall, 3),
                                    "records_per_s": round(records / wall),
                                    "server_cpu_s": server_cpu,
                                    "server_us_per_record": round(server_cpu / records * 1e6, 2)
                                    if server_cpu else None,
                                    "keys": client.dbsize()},
                          "loadavg_1m": os.getloadavg()[0]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
