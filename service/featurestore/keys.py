"""Key layout of the online feature store, shared by the writer and the reader.

    {prefix}:{{schema_version}}:current:u              -> id of the live load of the users
    {prefix}:{{schema_version}}:current:i              -> id of the live load of the items
    {prefix}:{schema_version}:{load_id}:u:{user_id}    -> packed user record
    {prefix}:{schema_version}:{load_id}:i:{item_id}    -> packed item record
    {prefix}:seen:{user_id}                            -> set of item ids the user has seen

The schema version in every key means a model with another schema never decodes these records;
the load id lets a new load be written beside the live one and go live with one write of the
pointers. There is one pointer per entity, so a load of the items alone moves only the items'
pointer and never makes the users unreachable. The pointers' schema version is a hash tag
(`{...}`), so both pointers of a schema sit in one cluster slot: a load of both entities flips
them with one atomic MSET, on a cluster too.

On a Redis Cluster the item records (and both pointers) are also written once per master, under
a hash tag whose slot that master owns (the *replica tag* of the master, `replica_tags`):

    {prefix}:{{tag}}:{schema_version}:current:u          -> copy of the users' pointer
    {prefix}:{{tag}}:{schema_version}:current:i          -> copy of the items' pointer
    {prefix}:{{tag}}:{schema_version}:{load_id}:i:{item_id}  -> copy of the packed item record

so a request reads its user (sharded as above) and all its items from ONE node, the node owning
the user's key: one packed MGET + GET on one connection, as on a single node.
"""

from __future__ import annotations

from binascii import crc_hqx
from collections.abc import Callable, Collection

DEFAULT_PREFIX = "rk"
ENTITY_CODES = {"user": "u", "item": "i"}


def pointer_key(prefix: str, schema_version: str, entity: str) -> str:
    """The key holding the live load id of one entity for one schema version."""
    return f"{prefix}:{{{schema_version}}}:current:{ENTITY_CODES[entity]}"


def record_key_prefix(prefix: str, schema_version: str, load_id: str, entity: str) -> str:
    """Everything before the entity id in a record key."""
    return f"{prefix}:{schema_version}:{load_id}:{ENTITY_CODES[entity]}:"


def load_pattern(prefix: str, schema_version: str, load_id: str, entity: str) -> str:
    """SCAN pattern matching every record of one entity in one load."""
    return record_key_prefix(prefix, schema_version, load_id, entity) + "*"


def seen_key(prefix: str, user_id: str) -> str:
    """The set of item ids a user has seen (written by the client's app; read by the re-rank
    filter in the same round trip as the features). Not versioned: ids outlive schemas."""
    return f"{prefix}:seen:{user_id}"


# Replicated item records on a cluster (docs/featurestore.md, "Redis Cluster").
CLUSTER_SLOTS = 16384
REPLICA_TAG_SEARCH = 1_000_000  # far more than needed: each master owns ~1/masters of the slots


def key_slot(key: bytes) -> int:
    """The cluster slot of a key (CRC16 of its hash tag if it has one), as Redis computes it."""
    start = key.find(b"{")
    if start > -1:
        end = key.find(b"}", start + 1)
        if end > start + 1:
            key = key[start + 1 : end]
    return crc_hqx(key, 0) % CLUSTER_SLOTS


def replica_tags(owner_of_slot: Callable[[int], str | None],
                 masters: Collection[str]) -> dict[str, str]:
    """master name -> its replica tag: the first `r0, r1, ...` whose slot that master owns.

    The one place the tag of a master is decided: the writer (at load) and the reader (from its
    slot map, again after every topology refresh) both call this, so with the same slot map they
    agree. A master whose tag the writer did not use (the slots moved since the load) simply has
    no copy; the reader notices (its pointer copy is missing) and falls back.
    """
    want, out = set(masters), dict[str, str]()
    for n in range(REPLICA_TAG_SEARCH):
        if len(out) == len(want):
            break
        tag = f"r{n}"
        owner = owner_of_slot(crc_hqx(tag.encode(), 0) % CLUSTER_SLOTS)
        if owner in want and owner not in out:
            out[owner] = tag
    return out


def replica_pointer_key(prefix: str, schema_version: str, tag: str, entity: str) -> str:
    """The copy, in the slot of `tag`, of one entity's pointer."""
    return f"{prefix}:{{{tag}}}:{schema_version}:current:{ENTITY_CODES[entity]}"


def replica_record_prefix(prefix: str, schema_version: str, load_id: str, tag: str) -> str:
    """Everything before the item id in the key of an item record's copy in the slot of `tag`."""
    return f"{prefix}:{{{tag}}}:{schema_version}:{load_id}:i:"


def replica_load_pattern(prefix: str, schema_version: str, load_id: str) -> str:
    """SCAN pattern matching every copy (any tag) of one load's item records."""
    return f"{prefix}:{{r*}}:{schema_version}:{load_id}:i:*"
