"""The /rank item list: as JSON bytes built column by column (no Python object per candidate),
or as dicts with gate weights for `explain`.

Each ranked item is `{"id":"<id>","score":<f>,"scores":{"<task1>":<f>,...}}`: constant
separators interleaved with the id text and 1 + T float texts. The floats are formatted by
orjson one numpy column at a time (as float64: the same shortest round-trip text orjson gives a
Python float), the ids are escaped in one `orjson.dumps` call, and the pieces are interleaved
with list slice assignments and joined once: far cheaper than a dict per item for orjson
(measured in docs/benchmarks.md).

The output is byte-identical to `orjson.dumps` of the per-item dicts; tests/service/
test_encode.py checks that on random scores and on ids that need escaping.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson

_NUMPY = orjson.OPT_SERIALIZE_NUMPY


def float_texts(values: np.ndarray) -> list[bytes]:
    """The JSON text of each float (as float64), one orjson call for the whole column."""
    column = np.ascontiguousarray(values, dtype=np.float64)
    if column.size == 0:
        return []
    return orjson.dumps(column, option=_NUMPY)[1:-1].split(b",")


def id_texts(ids: Sequence[str]) -> list[bytes]:
    """Each id as JSON string content (escaped, without the quotes).

    One `orjson.dumps` of the whole list: if it is exactly as long as the ids' UTF-8 bytes plus
    quotes and commas, nothing was escaped, so no id contains a quote and splitting on `","` is
    exact. Otherwise (quotes, backslashes, control characters) each id is escaped alone.
    """
    if not ids:
        return []
    whole = orjson.dumps(list(ids))
    if len(whole) == len("".join(ids).encode()) + 3 * len(ids) + 1:
        return whole[2:-2].split(b'","')
    return [orjson.dumps(i)[1:-1] for i in ids]


def ranked_items_json(ids: Sequence[str], order: np.ndarray, final: np.ndarray,
                      scores: np.ndarray, tasks: Sequence[str]) -> bytes:
    """JSON array of the items at `order` (positions into ids/final/scores [N, T])."""
    n = len(order)
    if n == 0:
        return b"[]"
    texts = id_texts(ids)
    picked = [texts[p] for p in order.tolist()]
    columns = [float_texts(final[order])]
    columns += [float_texts(scores[order, j]) for j in range(len(tasks))]
    task_keys = [orjson.dumps(t) for t in tasks]
    separators = [b'","score":', b',"scores":{' + task_keys[0] + b":"]
    separators += [b"," + key + b":" for key in task_keys[1:]]
    width = 2 + 2 * len(columns)  # per item: opening, id, then (separator, float) per column
    parts: list[bytes] = [b""] * (width * n)
    parts[0::width] = [b'}},{"id":"'] * n
    parts[0] = b'[{"id":"'
    parts[1::width] = picked
    for k, (sep, column) in enumerate(zip(separators, columns, strict=True)):
        parts[2 + 2 * k::width] = [sep] * n
        parts[3 + 2 * k::width] = column
    return b"".join(parts) + b"}}]"


def explained_items(ids: Sequence[str], tasks: Sequence[str], scores: np.ndarray,
                    final: np.ndarray, order: np.ndarray,
                    gates: np.ndarray) -> list[dict[str, Any]]:
    """Ranked items as dicts with their gate weights [T, M] (the `explain` debugging path)."""
    sel_scores = scores[order].tolist()
    sel_final = final[order].tolist()
    sel_gates = gates[order].tolist()
    return [{"id": ids[pos], "score": sel_final[r],
             "scores": dict(zip(tasks, sel_scores[r], strict=True)), "gates": sel_gates[r]}
            for r, pos in enumerate(order.tolist())]
