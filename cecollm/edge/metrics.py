"""The edge server's Prometheus metrics (GET /metrics), named as vLLM names its own: a `cecollm_`
prefix, `_seconds` for durations, `_total` for counters.

Each server has its own registry, so several servers in one process (tests) never share counts.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# vLLM's buckets for the same quantities
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    """Every metric of one edge server."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("cecollm_requests", "HTTP requests answered, by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.ttft = Histogram("cecollm_time_to_first_token_seconds", "From a request's arrival (queueing "
                              "included) to its first generated token.", buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("cecollm_inter_token_latency_seconds", "Between two generated tokens of one "
                             "request.", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("cecollm_e2e_request_latency_seconds", "From a request's arrival to its last token.",
                             buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("cecollm_request_queue_time_seconds", "Time a request waited for the device.",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("cecollm_prompt_tokens", "Prompt tokens of served requests.", registry=r)
        self.tokens = Counter("cecollm_generation_tokens", "Generated tokens by where they were decided: an exit "
                              "on the edge, the cloud, or the last exit when the cloud did not answer "
                              "(fallback).", ["decided_by"], registry=r)
        self.fallbacks = Counter("cecollm_fallbacks", "Times the edge did without the cloud: a cloud request "
                                 "timed out (timeout), or a generation went on on the edge alone (edge_alone).",
                                 ["kind"], registry=r)
        self.drafts = Counter("cecollm_drafts", "Exact mode: tokens the edge drafted.", registry=r)
        self.rollbacks = Counter("cecollm_rollbacks", "Exact mode: wrong drafts rolled back.", registry=r)
        self.sent_bytes = Counter("cecollm_sent_bytes", "Bytes sent up to the cloud, over the network or "
                                  "through shared memory.", ["via"], registry=r)
        self.received_bytes = Counter("cecollm_received_bytes", "Bytes of the cloud's replies.", registry=r)
        self.compute = Counter("cecollm_compute_seconds", "Compute time on the edge and (as the workers report "
                               "it) in the cloud.", ["where"], registry=r)
        self.comm = Counter("cecollm_communication_seconds", "Time waiting on the cloud minus its compute.",
                            registry=r)
        self.waiting = Gauge("cecollm_num_requests_waiting", "Requests queued for the device.", registry=r)
        self.running = Gauge("cecollm_num_requests_running", "Requests generating now (0 or 1).", registry=r)
        self.rejected = Counter("cecollm_rejected_requests", "Requests refused because the queue was full.",
                                registry=r)
        for metric, labels in ((self.tokens, ("edge", "cloud", "fallback")), (self.fallbacks, ("timeout", "edge_alone")),
                               (self.sent_bytes, ("network", "shm")), (self.compute, ("edge", "cloud"))):
            for label in labels:  # every series is there from the start, at 0
                metric.labels(label)

    def record_generation(self, stats) -> None:
        """Add one generation's EdgeStats."""
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.tokens.labels("edge").inc(stats.edge_tokens)
        self.tokens.labels("cloud").inc(stats.cloud_tokens)
        self.tokens.labels("fallback").inc(stats.fallback_tokens)
        self.fallbacks.labels("timeout").inc(stats.timeouts)
        self.fallbacks.labels("edge_alone").inc(1 if stats.standalone_reason else 0)
        self.drafts.inc(stats.drafts)
        self.rollbacks.inc(stats.rollbacks)
        self.sent_bytes.labels("network").inc(stats.bytes_up)
        self.sent_bytes.labels("shm").inc(stats.shm_bytes)
        self.received_bytes.inc(stats.bytes_down)
        self.compute.labels("edge").inc(stats.edge_seconds)
        self.compute.labels("cloud").inc(stats.cloud_seconds)
        self.comm.inc(max(0.0, stats.comm_seconds))

    def text(self) -> bytes:
        return generate_latest(self.registry)
