"""Reading tritonserver's Prometheus ``/metrics`` page (per-replica request counts, exported names)."""
from __future__ import annotations

import re
import time
import urllib.request
from typing import Callable, Dict, FrozenSet, Optional, Set, Tuple, TypeVar

#: a sample line: ``name{label="value",...} 12`` (labels optional; value may be NaN)
_SAMPLE = re.compile(r"^(?P<name>[A-Za-z_:][A-Za-z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)")
_LABEL = re.compile(r'(?P<key>[A-Za-z_][A-Za-z0-9_]*)="(?P<value>(?:[^"\\]|\\.)*)"')

Labels = FrozenSet[Tuple[str, str]]
Reading = TypeVar("Reading")


def scrape(url: str, timeout_s: float = 5.0) -> str:
    """The text of a ``/metrics`` page."""
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return response.read().decode()


def parse(text: str) -> Dict[Tuple[str, Labels], float]:
    """Every sample of a Prometheus text page, keyed by (name, labels)."""
    samples: Dict[Tuple[str, Labels], float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match is None or line.startswith("#"):
            continue
        labels = frozenset((m["key"], m["value"]) for m in _LABEL.finditer(match["labels"] or ""))
        samples[(match["name"], labels)] = float(match["value"])
    return samples


def families(text: str) -> Set[str]:
    """Metric names a page exports: sample names plus the families its ``# TYPE`` lines declare
    (a histogram ``x`` exports ``x_bucket``, ``x_sum`` and ``x_count``)."""
    names = {name for name, _ in parse(text)}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            parts = line.split()
            if len(parts) >= 4:
                names.add(parts[2])
                if parts[3] in ("histogram", "summary"):
                    names.update({f"{parts[2]}_sum", f"{parts[2]}_count"})
                if parts[3] == "histogram":
                    names.add(f"{parts[2]}_bucket")
    return names


def total(text: str, name: str, model: Optional[str] = None) -> float:
    """Sum of a counter over its label sets, or over one model's."""
    return sum(value for (sample, labels), value in parse(text).items()
               if sample == name and (model is None or ("model", model) in labels))


def settled(read: Callable[[], Reading], enough: Callable[[Reading], bool], timeout_s: float = 10.0,
            interval_s: float = 0.2) -> Reading:
    """``read()`` once ``enough`` holds for it and two readings ``interval_s`` apart agree (or at ``timeout_s``).

    tritonserver counts a request when the model instance releases it, which can come after the client
    (or the ensemble) has its answer; with two instances per model a count often lands a moment late.
    """
    deadline = time.monotonic() + timeout_s
    reading = read()
    while time.monotonic() < deadline:
        time.sleep(interval_s)
        latest = read()
        if latest == reading and enough(latest):
            break
        reading = latest
    return reading
