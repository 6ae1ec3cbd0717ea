"""Key layout of the online feature store, shared by the writer and the reader.

    {prefix}:{schema_version}:current                  -> id of the live load
    {prefix}:{schema_version}:{load_id}:u:{user_id}    -> packed user record
    {prefix}:{schema_version}:{load_id}:i:{item_id}    -> packed item record

The schema version in every key means a model with another schema never decodes these records;
the load id lets a new load be written beside the live one and go live with one SET of the
pointer key.
"""

from __future__ import annotations

DEFAULT_PREFIX = "rk"
ENTITY_CODES = {"user": "u", "item": "i"}


def pointer_key(prefix: str, schema_version: str) -> str:
    """The key holding the live load id for one schema version."""
    return f"{prefix}:{schema_version}:current"


def record_key_prefix(prefix: str, schema_version: str, load_id: str, entity: str) -> str:
    """Everything before the entity id in a record key."""
    return f"{prefix}:{schema_version}:{load_id}:{ENTITY_CODES[entity]}:"


def load_pattern(prefix: str, schema_version: str, load_id: str) -> str:
    """SCAN pattern matching every record of one load."""
    return f"{prefix}:{schema_version}:{load_id}:*"
