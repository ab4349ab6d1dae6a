"""Our own Prometheus metrics, exported on tritonserver's ``/metrics`` through the Python backend.

Triton counts requests and their times, not what they produce: a 60 s clip and a 1 s clip are one
request each. Capacity for a vocoder is audio seconds per second, so every model whose output is a
waveform counts the seconds it returned (``vocos_audio_seconds_total{model, instance}``); the Grafana
dashboard in ``deploy/k8s`` sums its rate. Ensembles are not counted twice: their audio is counted
once, by the step that makes it.
"""
from __future__ import annotations

import logging
from typing import Any, Optional

from ..contract import SAMPLE_RATE

log = logging.getLogger("vocos_triton.serving")

AUDIO_SECONDS = "vocos_audio_seconds_total"


class AudioSeconds:
    """A counter of the audio seconds one model instance returned (a no-op where the backend has no
    custom metrics)."""

    def __init__(self, pb: Any, model: str, instance: str) -> None:
        self.model = model
        # The family must outlive its metric: the backend refuses to touch a metric whose family was
        # garbage-collected ("the corresponding 'MetricFamily' has been deleted"), so both are kept.
        self.family: Optional[Any] = None
        self.metric: Optional[Any] = None
        family_type = getattr(pb, "MetricFamily", None)
        if family_type is None:
            return
        try:
            self.family = family_type(name=AUDIO_SECONDS, description="Seconds of 24 kHz audio returned",
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
            self.metric.increment(samples / SAMPLE_RATE)
        except Exception:
            log.warning("%s: %s stops counting", self.model, AUDIO_SECONDS, exc_info=True)
            self.metric = None
