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
"""

from __future__ import annotations

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
