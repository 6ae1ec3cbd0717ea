"""POST /feedback's work: check the events against the settings and the serving model's tasks,
count them by task and the version that served them, hand them to the log writer."""

from __future__ import annotations

import time
from collections import Counter

from ranker.servedlog import FeedbackEvent
from service import metrics
from service.errors import Detail, InvalidRequest, ModelUnavailable
from service.pipeline import Serving
from service.schemas import FeedbackAccepted, FeedbackRequest
from service.servedlog.writer import ServedLog
from service.settings import Settings
from service.validation import check_count

TS_MIN = 946_684_800.0  # 2000-01-01T00:00:00Z: earlier is a unit mistake, not an event
# 2100-01-01T00:00:00Z: a fixed bound, so the OpenAPI schema states exactly what is accepted
# (a moving "now + skew" cannot be stated); an event stamped after its impression's attribution
# window is counted as late by the join, not trained on
TS_MAX = 4_102_444_800.0
MAX_DETAIL = 20  # errors named per answer (as for /rank's validation errors)


def check_feedback(req: FeedbackRequest, settings: Settings, tasks: list[str],
                   now: float) -> list[FeedbackEvent]:
    """The events of a valid batch; InvalidRequest naming each bad field and its limit."""
    check_count("events", len(req.events), settings.feedback_max_events, "event",
                "; send them in smaller batches (feedback_max_events)")
    allowed = frozenset(tasks)
    detail: Detail = []
    for i, ev in enumerate(req.events):
        if ev.event not in allowed:
            detail.append({"field": f"events[{i}].event",
                           "message": f"unknown event {ev.event!r}; one of "
                                      f"{', '.join(tasks)} (the serving model's tasks)"})
        if not TS_MIN <= ev.ts <= TS_MAX:
            detail.append({"field": f"events[{i}].ts",
                           "message": f"must be unix seconds from {TS_MIN:.0f} (2000-01-01) "
                                      f"to {TS_MAX:.0f} (2100-01-01)"})
        if len(detail) >= MAX_DETAIL:
            break
    if detail:
        raise InvalidRequest(detail[:MAX_DETAIL])
    return [FeedbackEvent(ev.request_id, ev.item_id, ev.event, ev.ts) for ev in req.events]


def count_feedback(events: list[FeedbackEvent], log: ServedLog) -> None:
    """ranker_feedback_events_total by task and the served version (or "unknown")."""
    counts = Counter((ev.event, log.version_of(ev.request_id)) for ev in events)
    for (task, version), k in counts.items():
        metrics.FEEDBACK_EVENTS.labels(task, version).inc(k)
    by_arm = Counter((ev.event, got) for ev in events
                     if (got := log.arm_of(ev.request_id)) is not None)
    for (task, (exp, arm)), k in by_arm.items():
        metrics.ARM_FEEDBACK_EVENTS.labels(task, exp, arm).inc(k)


def take_feedback(req: FeedbackRequest, settings: Settings, serving: Serving | None,
                  log: ServedLog | None) -> FeedbackAccepted:
    """Validate, count and offer a batch of events to the feedback stream (best effort)."""
    if serving is None or log is None:
        raise ModelUnavailable("no model loaded yet; its tasks decide which events are valid",
                               headers={"Retry-After": str(settings.retry_after_s)})
    events = check_feedback(req, settings, serving.model.tasks, time.time())
    count_feedback(events, log)
    kept = log.feedback(events)
    return FeedbackAccepted(accepted=len(events), dropped=0 if kept else len(events))
