"""Prometheus metrics of the feature store reader (registered once, in the default registry)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

FETCH_SECONDS = Histogram(
    "ranker_featurestore_fetch_seconds",
    "Feature store fetch latency: one round trip plus decoding",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25),
)
DEFAULTED = Counter(
    "ranker_featurestore_defaulted_total",
    "Entities that got default features, by entity and reason (missing, stale, corrupt)",
    ["entity", "reason"],
)
ERRORS = Counter(
    "ranker_featurestore_errors_total",
    "Fetches that failed with FeatureStoreUnavailable, by reason (timeout, connection, error)",
    ["reason"],
)
RETRIES = Counter(
    "ranker_featurestore_retries_total", "Fetch attempts retried within the request deadline"
)
TOPOLOGY_REFRESHES = Counter(
    "ranker_featurestore_topology_refreshes_total",
    "Cluster slot map refreshes asked for by the reader, by reason (moved, connection, timeout, "
    "cluster_down, no_tag; failed = a refresh that reached no node)",
    ["reason"],
)
CLUSTER_FALLBACKS = Counter(
    "ranker_featurestore_cluster_fallbacks_total",
    "Cluster requests read from the sharded layout instead of the master's item copy, by reason "
    "(copy_missing: the master's copy of a pointer is absent though the load exists; "
    "copy_stale: its copies name other loads than the global pointers; no_tag; moved; "
    "migrating: a slot being moved)",
    ["reason"],
)
