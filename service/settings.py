"""Service configuration: one pydantic-settings class, read from `RANKER_*` environment vars."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_PRESETS: dict[str, dict[str, float]] = {
    "engagement": {"click": 1.0, "like": 4.0, "share": 8.0},
    "click": {"click": 1.0, "like": 0.0, "share": 0.0},
    "like": {"click": 0.0, "like": 1.0, "share": 0.0},
    "share": {"click": 0.0, "like": 0.0, "share": 1.0},
}


class Settings(BaseSettings):
    """Everything the service can be told; see docs/api.md for the table."""

    model_config = SettingsConfigDict(env_prefix="RANKER_", extra="ignore", protected_namespaces=())

    # model repository
    model_repo: Path = Path("models")
    model_name: str = "mmoe"
    model_watch_interval_s: float = Field(default=0.0, ge=0)  # 0 = no background watcher
    # serve exactly this version (a rollback that sticks); the pin file PINNED in the model's
    # directory (POST /admin/pin) overrides it; unset = the newest version that passes
    model_version: int | None = Field(default=None, ge=0, lt=2**31)
    # how often each worker reads the pin file when the watcher is off (0 = never): a pin made
    # through one worker reaches the others within this
    model_pin_poll_s: float = Field(default=1.0, ge=0)
    warmup_batch_sizes: list[int] = [1, 100, 500, 1000]
    ort_intra_op_threads: int = Field(default=1, ge=0)
    ort_inter_op_threads: int = Field(default=1, ge=0)
    inference_workers: int = Field(default=2, ge=1)  # threads of the dedicated inference executor
    # a batch the model runs in at most this long (by its warm-up timing) runs inline on the event
    # loop: the executor's thread hop costs more than it protects; 0 = always on the executor
    inline_inference_max_ms: float = Field(default=1.0, ge=0)

    # feature store
    redis_url: str | None = None
    redis_cluster: bool = False
    redis_password: str | None = None
    redis_prefix: str = "rk"
    redis_max_connections: int = Field(default=32, ge=1)
    redis_connect_timeout_s: float = Field(default=0.05, gt=0)
    redis_socket_timeout_s: float = Field(default=0.1, gt=0)
    feature_max_age_s: float | None = None
    redis_failure_mode: Literal["fail", "degrade"] = "fail"
    retry_after_s: int = Field(default=1, ge=0)

    # request limits
    max_candidates: int = Field(default=1000, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    # deadline for the feature fetch and inference together
    request_timeout_s: float = Field(default=0.5, gt=0)
    # part of the deadline kept for inference: the fetch gets the rest, so a degraded ranking
    # still has time to run after a feature store timeout
    inference_budget_s: float = Field(default=0.1, gt=0)
    # 0 = unlimited; beyond it requests get a 503 (overload)
    max_inflight: int = Field(default=64, ge=0)  # per worker; 0 = unlimited

    # scoring
    default_weights: dict[str, float] = {"click": 1.0, "like": 1.0, "share": 1.0}
    weight_min: float = 0.0
    weight_max: float = 100.0
    presets: dict[str, dict[str, float]] = Field(default_factory=lambda: dict(DEFAULT_PRESETS))
    scoring: Literal["weighted_sum", "weighted_product"] = "weighted_sum"
    # candidates per request observed in ranker_task_score (bounded: one histogram observation per
    # task per candidate on the hot path; 8 per request still gives thousands of samples a second)
    score_sample_size: int = Field(default=8, ge=0)

    # re-rank stage (service/rerank.py, docs/api.md "Re-ranking")
    rerank_rules_file: Path | None = None  # TOML presets; None = no rules unless a request says
    rerank_rules_poll_s: float = Field(default=1.0, ge=0)  # mtime check at most this often
    rerank_boost_min: float = Field(default=0.1, gt=0)
    rerank_boost_max: float = Field(default=10.0, gt=0)
    rerank_max_pinned_share: float = Field(default=0.2, ge=0, le=1)
    rerank_max_window: int = Field(default=100, ge=2)
    rerank_diversity_depth: int = Field(default=50, ge=2)  # positions diversity holds over
    rerank_max_exclude: int = Field(default=1000, ge=0)

    # admin and server
    admin_api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # reliability and access guards (service/middleware, docs/reliability.md)
    api_keys: list[SecretStr] = []  # RANKER_API_KEYS='["k1","k2"]'; none = /rank is open
    metrics_port: int | None = Field(default=None, ge=1, le=65535)  # /metrics, /admin only there
    graceful_shutdown_s: int = Field(default=10, ge=1)  # SIGTERM: in-flight requests get this
    request_hard_timeout_s: float | None = Field(default=None, gt=0)  # None = 2×request_timeout_s

    # browser clients (service/cors.py, docs/playground.md)
    cors_origins: list[str] = []  # RANKER_CORS_ORIGINS='["https://app.example.com"]'; none = off
    cors_allow_credentials: bool = False  # never with "*": refused at startup
    playground_enabled: bool = False  # the /playground page; the local main job turns it on

    # served log and feedback (service/servedlog, docs/closing-the-loop.md)
    # share of /rank responses written to the served log, by a hash of the request id (the same
    # decision on every worker); 0 = off (`ranker run` turns it on)
    log_sample_rate: float = Field(default=0.0, ge=0, le=1)
    # share of /rank requests that explore (service/ranking.py:explore_order): their top K is
    # drawn uniformly from the candidates, and the served log records each item's propensity,
    # so that the next model can be trained on more than the current one's favourites
    # (docs/closing-the-loop.md, "Exploration"); 0 = off. Not with re-rank rules.
    explore_rate: float = Field(default=0.0, ge=0, le=1)
    log_queue_size: int = Field(default=1000, ge=1)  # entries waiting for the writer; then dropped
    log_batch_size: int = Field(default=64, ge=1)  # stream entries per Redis pipeline
    log_stream_maxlen: int = Field(default=100_000, ge=1)  # XADD MAXLEN ~ per stream
    log_write_timeout_s: float = Field(default=1.0, gt=0)  # one batch's Redis round trip
    feedback_max_events: int = Field(default=1000, ge=1)  # events per POST /feedback
    # request id -> model version of recently served requests (online rates by version)
    feedback_recent_requests: int = Field(default=100_000, ge=1)

    # experiments (service/experiments.py, docs/experiments.md): arms, canary, shadow
    experiments_file: Path | None = None  # TOML; None = no experiment (the default response)
    experiments_poll_s: float = Field(default=1.0, ge=0)  # mtime check at most this often
    canary_window_s: float = Field(default=60.0, gt=0)  # a canary arm's outcomes judged over this
    canary_min_requests: int = Field(default=20, ge=1)  # fewer outcomes in the window: no verdict
    shadow_queue_size: int = Field(default=64, ge=1)  # jobs waiting for the shadow; then dropped

    @model_validator(mode="after")
    def _check_bounds(self) -> Settings:
        if not 0 <= self.weight_min <= self.weight_max:
            raise ValueError("need 0 <= weight_min <= weight_max")
        if not self.rerank_boost_min <= 1.0 <= self.rerank_boost_max:
            raise ValueError("need rerank_boost_min <= 1 <= rerank_boost_max")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read from the environment once."""
    return Settings()
