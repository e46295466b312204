"""Plot throughput and latency against concurrency from a Locust ``*_stats_history.csv``.

python loadtest/plot.py runs/loadtest/steps_stats_history.csv docs/loadtest.png
"""

from __future__ import annotations

import csv
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def summarise(history: Path, settle_rows: int = 2) -> list[dict[str, float]]:
    """Median requests/s and p50/p95 latency for each user count (skipping rows right after a change)."""
    rows = [r for r in csv.DictReader(history.open()) if r["Name"] == "Aggregated"]
    by_users: dict[int, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        by_users[int(row["User Count"])].append(row)
    summary = []
    for users, group in sorted(by_users.items()):
        group = group[settle_rows:] or group

        def median(key: str, g=group) -> float:
            values = sorted(float(r[key]) for r in g if r[key] not in ("", "N/A"))
            return values[len(values) // 2] if values else float("nan")

        summary.append(
            {"users": users, "requests_per_s": median("Requests/s"), "p50_ms": median("50%"), "p95_ms": median("95%")}
        )
    return [s for s in summary if s["users"] > 0]


def plot(summary: list[dict[str, float]], out: Path) -> None:
    """Two panels: requests/s and p50/p95 latency, against users."""
    users = [s["users"] for s in summary]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(users, [s["requests_per_s"] for s in summary], "o-")
    left.set(xlabel="users (requests in flight)", ylabel="requests / s", title="Throughput", xscale="log")
    right.plot(users, [s["p50_ms"] for s in summary], "o-", label="p50")
    right.plot(users, [s["p95_ms"] for s in summary], "o-", label="p95")
    right.set(xlabel="users (requests in flight)", ylabel="ms", title="Latency", xscale="log")
    right.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    """``plot.py HISTORY_CSV OUT_PNG``: prints the table and writes the figure."""
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    summary = summarise(Path(argv[0]))
    print("| users | requests/s | p50 ms | p95 ms |\n|---:|---:|---:|---:|")
    for s in summary:
        print(f"| {s['users']} | {s['requests_per_s']:.1f} | {s['p50_ms']:.0f} | {s['p95_ms']:.0f} |")
    plot(summary, Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
