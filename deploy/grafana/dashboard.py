"""Builds the Grafana dashboard for the served braintumor model with grafanalib.

    python deploy/grafana/dashboard.py            # writes deploy/grafana/dashboards/braintumor.json

The JSON is generated, never edited by hand; a test checks that the committed file is up to date and
that every query runs on a real Prometheus.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard, GridPos, Stat, Target, Templating, Time, TimeSeries

DATASOURCE = "Prometheus"
OUT = Path(__file__).parent / "dashboards" / "braintumor.json"
M = 'model="braintumor"'
PER_REQUEST = f"sum(rate(nv_inference_request_success{{{M}}}[1m]))"
CLIENT_BUCKETS = "sum by (le) (rate(braintumor_loadtest_request_duration_seconds_bucket[1m]))"

#: (title, unit, [(expr, legend)]) for each time-series panel, in reading order.
PANELS: list[tuple[str, str, list[tuple[str, str]]]] = [
    (
        "Request rate",
        "reqps",
        [
            (f"sum by (version) (rate(nv_inference_request_success{{{M}}}[1m]))", "success v{{version}}"),
            (f"sum by (version) (rate(nv_inference_request_failure{{{M}}}[1m]))", "failure v{{version}}"),
        ],
    ),
    (
        "Latency by stage (per request)",
        "µs",
        [
            (
                f"sum(rate(nv_inference_queue_duration_us{{{M}}}[1m])) / {PER_REQUEST}",
                "queue",
            ),
            (
                f"sum(rate(nv_inference_compute_input_duration_us{{{M}}}[1m])) / {PER_REQUEST}",
                "compute input",
            ),
            (
                f"sum(rate(nv_inference_compute_infer_duration_us{{{M}}}[1m])) / {PER_REQUEST}",
                "compute infer",
            ),
            (
                f"sum(rate(nv_inference_compute_output_duration_us{{{M}}}[1m])) / {PER_REQUEST}",
                "compute output",
            ),
            (
                f"sum(rate(nv_inference_request_duration_us{{{M}}}[1m])) / {PER_REQUEST}",
                "total (server)",
            ),
        ],
    ),
    (
        "Average batch size (inferences / executions)",
        "short",
        [
            ("braintumor:batch_size:avg_rate1m", "batch size"),
        ],
    ),
    (
        "Queue time share of request time",
        "percentunit",
        [
            ("braintumor:queue_time:share_rate1m", "queue share"),
        ],
    ),
    (
        "Errors",
        "percentunit",
        [
            ("braintumor:inference_errors:ratio_rate5m", "failed share (5m)"),
        ],
    ),
    (
        "Queue depth (pending requests)",
        "short",
        [
            (f"sum(nv_inference_pending_request_count{{{M}}})", "pending"),
        ],
    ),
    (
        "CPU and GPU utilization",
        "percentunit",
        [
            ("avg(nv_cpu_utilization)", "CPU"),
            ("avg by (gpu_uuid) (nv_gpu_utilization)", "GPU {{gpu_uuid}}"),
        ],
    ),
    (
        "Shadow candidate: disagreement with the served version (alert above 2% of tumour decisions)",
        "percentunit",
        [
            (
                "braintumor:shadow_disagreement:ratio_rate30m",
                "{{kind}}: {{candidate}} vs v{{primary}}",
            ),
            ("braintumor:shadow_unanswered:ratio_rate30m", "unanswered: {{candidate}}"),
            ("0.02 + 0 * max(braintumor:shadow_compared:increase30m)", "alert threshold"),
        ],
    ),
    (
        "Canary candidate: share of requests sent to it, and share it failed (alert above 1% failed)",
        "percentunit",
        [
            ("braintumor:canary_candidate:share_rate30m", "share sent: {{candidate}} (primary v{{primary}})"),
            ("braintumor:canary_fallback:ratio_rate30m", "failed (primary answered): {{candidate}}"),
            ("0.01 + 0 * max(braintumor:canary_asked:increase30m)", "alert threshold"),
        ],
    ),
    (
        "Client latency (load generator)",
        "s",
        [
            (
                "histogram_quantile(0.50, sum by (le) (rate(braintumor_loadtest_request_duration_seconds_bucket[1m])))",
                "p50",
            ),
            ("braintumor:client_latency_seconds:p95_rate1m", "p95"),
        ],
    ),
]


def build() -> Dashboard:
    """The dashboard: a readiness stat on top, then two time-series panels per row."""
    panels = [
        Stat(
            title="Served (Triton up and model loaded)",
            dataSource=DATASOURCE,
            targets=[
                Target(
                    expr=f'min(up{{job="triton"}}) * (count(nv_inference_request_success{{{M}}}) > bool 0)',
                    legendFormat="ready",
                    refId="A",
                )
            ],
            gridPos=GridPos(h=4, w=24, x=0, y=0),
        )
    ]
    for k, (title, unit, queries) in enumerate(PANELS):
        panels.append(
            TimeSeries(
                title=title,
                dataSource=DATASOURCE,
                unit=unit,
                targets=[
                    Target(expr=e, legendFormat=legend, refId=chr(ord("A") + i))
                    for i, (e, legend) in enumerate(queries)
                ],
                gridPos=GridPos(h=8, w=12, x=12 * (k % 2), y=4 + 8 * (k // 2)),
            )
        )
    return Dashboard(
        title="braintumor: Triton serving",
        uid="braintumor-triton",
        description="Traffic, latency by stage, batching, errors, queue and utilization of the braintumor model",
        tags=["braintumor", "triton"],
        timezone="utc",
        time=Time("now-1h", "now"),
        refresh="10s",
        templating=Templating(list=[]),
        panels=panels,
    ).auto_panel_ids()


def render() -> str:
    """The dashboard as Grafana JSON."""
    return json.dumps(build().to_json_data(), cls=DashboardEncoder, indent=2, sort_keys=True) + "\n"


def queries() -> list[str]:
    """Every PromQL expression the dashboard runs."""
    data = json.loads(render())
    return [t["expr"] for p in data["panels"] for t in p.get("targets", [])]


if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render())
    print(f"Wrote {out}")
