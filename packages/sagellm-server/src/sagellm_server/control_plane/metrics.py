"""The control plane's ``/metrics``: its own counters plus every engine's metrics, each sample
labelled ``engine="<id>"``, merged per metric family (one HELP/TYPE per family, as Prometheus
requires)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from sagellm_server.control_plane.registry import EngineHealth, EngineRecord


class _EngineCollector(Collector):
    def __init__(self, records: Callable[[], Iterable[EngineRecord]]) -> None:
        self._records = records

    def collect(self) -> Iterator[Metric]:
        recs = list(self._records())
        g = GaugeMetricFamily("sagellm:router_engines", "Registered engines, by health.", labels=["health"])
        for h in EngineHealth:
            g.add_metric([h.value], sum(1 for r in recs if r.health is h))
        yield g
        f = GaugeMetricFamily("sagellm:router_in_flight", "Requests the router has in flight, by engine.",
                              labels=["engine"])
        for r in recs:
            f.add_metric([r.id], r.num_in_flight)
        yield f


class RouterMetrics:
    def __init__(self, records: Callable[[], Iterable[EngineRecord]]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._routed = Counter("sagellm:router_requests", "Requests sent to an engine (each attempt), "
                               "by engine, model and placement (affinity, spill, least_loaded).",
                               ["engine", "model_name", "placement"], registry=r)
        self.retries = Counter("sagellm:router_retries", "Requests tried again on another engine, by "
                               "the first attempt's failure.", ["reason"], registry=r)
        self.failures = Counter("sagellm:router_failures", "Requests the router could not serve, "
                                "and streams broken mid-way, by reason.", ["reason"], registry=r)
        r.register(_EngineCollector(records))

    def routed(self, engine: str, model: str, placement: str) -> None:
        self._routed.labels(engine, model, placement).inc()

    def render(self, engines: dict[str, str]) -> bytes:
        """This router's metrics and ``engines`` (id -> the text of its /metrics) as one page."""
        return generate_latest(self.registry) + merge_engine_metrics(engines)


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_engine_metrics(engines: dict[str, str]) -> bytes:
    """Engines' Prometheus text, every sample labelled with its engine, one family per name.
    An engine whose text does not parse is left out (its id is in ``sagellm:router_engines``)."""
    merged: dict[str, Metric] = {}
    for eid, text in sorted(engines.items()):
        try:
            families = list(text_string_to_metric_families(text))
        except (ValueError, TypeError, IndexError):
            continue
        for fam in families:
            out = merged.get(fam.name)
            if out is None:
                out = merged[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            elif out.type != fam.type:
                continue
            for s in fam.samples:
                out.samples.append(s._replace(labels={**s.labels, "engine": eid}))
    if not merged:
        return b""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(list(merged.values())))
    return generate_latest(registry)
