"""A step load for ``loadtest/locustfile.py``: hold 1, 4, 16 and 32 users in turn.

    locust -f loadtest/locustfile.py,loadtest/steps.py --headless --host 127.0.0.1:8001 \\
        --csv runs/loadtest/steps --csv-full-history --html runs/loadtest/steps.html
    python loadtest/plot.py runs/loadtest/steps_stats_history.csv docs/loadtest.png

The plot shows throughput and latency against concurrency, one point per step.
"""

from __future__ import annotations

import os

from locust import LoadTestShape

STEPS = tuple(int(n) for n in os.environ.get("BRAINTUMOR_STEP_USERS", "1,4,16,32").split(","))
STEP_SECONDS = float(os.environ.get("BRAINTUMOR_STEP_SECONDS", "10"))


class StepLoad(LoadTestShape):
    """Each step holds its user count for ``BRAINTUMOR_STEP_SECONDS`` (default 10 s)."""

    def tick(self) -> tuple[int, float] | None:
        step = int(self.get_run_time() // STEP_SECONDS)
        if step >= len(STEPS):
            return None
        return STEPS[step], 100.0
