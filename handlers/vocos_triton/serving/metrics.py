"""Our own Prometheus metrics, exported on tritonserver's ``/metrics`` through the Python backend.

Triton counts requests and their times, not what they produce: a 60 s clip and a 1 s clip are one
request each. Capacity for a vocoder is audio seconds per second, so every model whose output is a
waveform counts the seconds it returned (``vocos_audio_seconds_total{model, instance}``); the Grafana
dashboard in ``deploy/k8s`` sums its rate. Ensembles are not counted twice: their audio is counted
once, by the step that makes it.

Time to first audio of a stream: tritonserver 2.51 has no first-response metric (its
``nv_inference_first_response_histogram_ms`` and the ``histogram_latencies`` setting came in later
releases; the 2.51 library does not know either name), and its Python backend offers counters and
gauges only. :class:`LatencyHistogram` builds a Prometheus histogram from counters
(``<name>_bucket{le}``, ``<name>_sum``, ``<name>_count``), which ``histogram_quantile`` reads like
any other; a streaming model observes :data:`FIRST_AUDIO` once per sequence.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple

log = logging.getLogger("vocos_triton.serving")

AUDIO_SECONDS = "vocos_audio_seconds_total"


class AudioSeconds:
    """A counter of the audio seconds one model instance returned (a no-op where the backend has no
    custom metrics)."""

    def __init__(self, pb: Any, model: str, instance: str, sample_rate: int) -> None:
        self.model = model
        self.sample_rate = sample_rate  # the model's (variants differ): the counter is in seconds of audio
        # The family must outlive its metric: the backend refuses to touch a metric whose family was
        # garbage-collected ("the corresponding 'MetricFamily' has been deleted"), so both are kept.
        self.family: Optional[Any] = None
        self.metric: Optional[Any] = None
        family_type = getattr(pb, "MetricFamily", None)
        if family_type is None:
            return
        try:
            self.family = family_type(name=AUDIO_SECONDS, description="Seconds of audio returned",
                                      kind=family_type.COUNTER)
            self.metric = self.family.Metric(labels={"model": model, "instance": instance})
        except Exception:  # metrics off (--allow-metrics=false): serving goes on without the counter
            log.warning("%s: custom metric %s unavailable", model, AUDIO_SECONDS, exc_info=True)
            self.family = self.metric = None

    def add(self, samples: int) -> None:
        """Count ``samples`` returned; a failing counter is switched off, never the request failed."""
        if self.metric is None or samples <= 0:
            return
        try:
            self.metric.increment(samples / self.sample_rate)
        except Exception:
            log.warning("%s: %s stops counting", self.model, AUDIO_SECONDS, exc_info=True)
            self.metric = None


#: seconds from a stream's first request reaching the model to its first audio piece leaving it
FIRST_AUDIO = "vocos_stream_first_audio_seconds"
FIRST_AUDIO_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0)


class LatencyHistogram:
    """A Prometheus histogram of seconds made of counters: cumulative ``_bucket{le=...}`` counts (``+Inf``
    included), ``_sum`` and ``_count``, labelled ``model`` and ``instance`` (a no-op without custom metrics)."""

    def __init__(self, pb: Any, name: str, description: str, model: str, instance: str,
                 buckets: Sequence[float] = FIRST_AUDIO_BUCKETS) -> None:
        self.name = name
        self.model = model
        self.families: List[Any] = []  # kept alive: a metric whose family is collected stops working
        self.buckets: List[Tuple[float, Any]] = []
        self.sum: Optional[Any] = None
        self.count: Optional[Any] = None
        family_type = getattr(pb, "MetricFamily", None)
        if family_type is None:
            return
        labels: Dict[str, str] = {"model": model, "instance": instance}
        try:
            bucket_family, sum_family, count_family = (
                family_type(name=f"{name}_{part}", description=f"{description} ({part})", kind=family_type.COUNTER)
                for part in ("bucket", "sum", "count"))
            self.families = [bucket_family, sum_family, count_family]
            bounds = [*sorted(buckets), float("inf")]
            self.buckets = [(b, bucket_family.Metric(labels={**labels, "le": _le(b)})) for b in bounds]
            self.sum = sum_family.Metric(labels=labels)
            self.count = count_family.Metric(labels=labels)
        except Exception:
            log.warning("%s: custom metric %s unavailable", model, name, exc_info=True)
            self.families, self.buckets, self.sum, self.count = [], [], None, None

    def observe(self, seconds: float) -> None:
        """Count one observation; a failing metric is switched off, never the request failed."""
        if self.count is None:
            return
        try:
            for bound, metric in self.buckets:
                if seconds <= bound:
                    metric.increment(1)
            self.sum.increment(max(seconds, 0.0))
            self.count.increment(1)
        except Exception:
            log.warning("%s: %s stops counting", self.model, self.name, exc_info=True)
            self.count = None


def _le(bound: float) -> str:
    """Prometheus' spelling of a bucket bound: ``0.05``, ``1``, ``+Inf``."""
    return "+Inf" if bound == float("inf") else f"{bound:g}"
