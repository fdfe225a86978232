"""Request counts and latency histograms, rendered in the Prometheus text format for /metrics."""

from __future__ import annotations

from llmos_cli.core.serve.engine import Engine


class Histogram:
    BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

    def __init__(self) -> None:
        self.counts = [0] * len(self.BUCKETS)
        self.total, self.n = 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.n += 1
        for i, b in enumerate(self.BUCKETS):
            if value <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        rows = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.BUCKETS, self.counts, strict=True)]
        return [
            f"# TYPE {name} histogram",
            *rows,
            f'{name}_bucket{{le="+Inf"}} {self.n}',
            f"{name}_sum {self.total:.6f}",
            f"{name}_count {self.n}",
        ]


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.latency = Histogram()
        self.ttft = Histogram()

    def record(self, path: str, status: int, seconds: float) -> None:
        self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
        if path.startswith("/v1/") and status < 400:
            self.latency.observe(seconds)

    def render(self, engine: Engine | None) -> str:
        lines = ["# TYPE llmos_requests_total counter"]
        lines += [
            f'llmos_requests_total{{path="{p}",status="{s}"}} {n}'
            for (p, s), n in sorted(self.requests.items())
        ]
        if engine is not None:
            st = engine.stats
            lines += [
                "# TYPE llmos_prompt_tokens_total counter",
                f"llmos_prompt_tokens_total {st.prompt_tokens}",
                "# TYPE llmos_generated_tokens_total counter",
                f"llmos_generated_tokens_total {st.generated_tokens}",
                "# TYPE llmos_queue_depth gauge",
                f"llmos_queue_depth {engine.queue_depth}",
                "# TYPE llmos_running_requests gauge",
                f"llmos_running_requests {engine.running}",
                "# TYPE llmos_cancelled_requests_total counter",
                f"llmos_cancelled_requests_total {st.requests_cancelled}",
                "# TYPE llmos_failed_requests_total counter",
                f"llmos_failed_requests_total {st.requests_failed}",
                "# TYPE llmos_engine_restarts_total counter",
                f"llmos_engine_restarts_total {st.restarts}",
                *self.ttft.lines("llmos_time_to_first_token_seconds"),
            ]
        lines += self.latency.lines("llmos_request_latency_seconds")
        return "\n".join(lines) + "\n"
