"""Prometheus metrics: every name the bot exports, defined once, and the `/metrics` body.

The metrics live in prometheus-client's default registry. With several worker processes, set
`PROMETHEUS_MULTIPROC_DIR` (an empty directory, wiped before the workers start) before the
process starts: prometheus-client then keeps every value in files there and `render()` merges
them with `MultiProcessCollector`. No `Info`/`Enum` metrics (they do not work in that mode);
the one gauge says how processes combine (`livesum`).

Label values are small closed sets (platform, status, outcome, state, tool name, kind): never an
id, a user or a text.
"""

from __future__ import annotations

import os

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

_FAST = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_SLOW = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)

ACKS = Counter(
    "chatops_acks", "Inbound events answered, by platform and status (ok, duplicate, refused, error)", ["platform", "status"]
)
ACK_SECONDS = Histogram("chatops_ack_seconds", "Time from receiving an event to answering it", ["platform"], buckets=_FAST)
RUNS = Counter("chatops_runs", "Agent runs finished, by outcome", ["outcome"])
APPROVALS = Counter("chatops_approvals", "Approval state changes, by the new state", ["state"])
MODEL_SECONDS = Histogram("chatops_model_seconds", "Latency of one model call (retries included)", buckets=_SLOW)
MODEL_TOKENS = Counter("chatops_model_tokens", "Tokens the model endpoint reported, by kind (prompt, completion)", ["kind"])
TOOL_SECONDS = Histogram("chatops_tool_seconds", "Duration of one tool execution", ["tool"], buckets=_SLOW)
TOOL_OUTCOMES = Counter("chatops_tool_outcomes", "Tool executions, by tool and outcome", ["tool", "outcome"])
OUTBOX_RETRIES = Counter("chatops_outbox_retries", "Deliveries to a chat platform that had to be retried", ["platform"])
QUEUE_DEPTH = Gauge("chatops_queue_depth", "Work waiting, by kind", ["kind"], multiprocess_mode="livesum")
DB_RETRIES = Counter(
    "chatops_db_retries", "Database steps attempted again after a transient fault, by fault (exception class)", ["fault"]
)
RUN_SLOTS = Gauge(
    "chatops_run_slots",
    "New runs the processes may drive at once (limit), drive now (busy) and hold back while they catch up (waiting)",
    ["state"],
    multiprocess_mode="livesum",
)
LEASE_TAKEOVERS = Counter("chatops_lease_takeovers", "Work taken over from a replica whose lease expired", ["kind"])

CONTENT_TYPE = CONTENT_TYPE_LATEST


def render() -> bytes:
    """The Prometheus text exposition of every metric (all processes' in multiprocess mode)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def ack_status(http_status: int) -> str:
    """The `status` label of `ACKS` for an HTTP-like answer code."""
    if http_status < 300:
        return "ok"
    return "refused" if http_status < 500 else "error"


def observe_ack(platform: str, http_status: int, seconds: float) -> None:
    ACKS.labels(platform, ack_status(http_status)).inc()
    ACK_SECONDS.labels(platform).observe(seconds)
