#!/usr/bin/env python3
"""Daily usage from tsusage's output, checked against the run's completeness file, plotted to a PNG.

Run it on the output of a `tsusage run` (here the bundled sample against the simulator):

    cargo run --release -- run --simulate --config data/tsusage.toml --from 2021-08-15 --to 2021-08-17
    pip install duckdb matplotlib
    python3 examples/analyst/daily_usage.py --out out --png daily_usage.png

It reads out/usage/ (Hive-partitioned Parquet) with DuckDB, the run report out/runs/<run_id>.json
(the latest one unless --report says which) and its completeness file
out/runs/<run_id>-completeness.csv, and checks, day by day, that
  * no (ICCID, day) that the completeness file lists as not usage (no usage, rejected, failed,
    missing) has a row in the Parquet, and
  * the Parquet holds as many rows for the day as the report counts usage pairs (true of a fresh
    output directory; a partition also holds the rows of earlier runs' ICCIDs, if any).
Then it plots usage per day (GB and devices with usage, with the completeness state of each day)
and exits 1 when a check fails.
"""

import argparse
import json
import pathlib
import sys

import duckdb
import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402


def latest_report(out: pathlib.Path) -> pathlib.Path:
    reports = sorted((out / "runs").glob("*.json"))  # run ids sort by start time
    if not reports:
        sys.exit(f"no run report in {out / 'runs'}: run tsusage first")
    return reports[-1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out", help="tsusage's output.dir (default: out)")
    parser.add_argument("--report", help="a run report (default: the latest in OUT/runs/)")
    parser.add_argument("--png", default="daily_usage.png", help="the plot to write")
    args = parser.parse_args()

    out = pathlib.Path(args.out)
    report_path = pathlib.Path(args.report) if args.report else latest_report(out)
    report = json.loads(report_path.read_text())
    collect = report.get("collect")
    if not collect:
        sys.exit(f"{report_path}: not the report of a `tsusage run` (no completeness)")
    by_window = collect["by_window"]
    completeness_csv = pathlib.Path(collect["completeness_file"])
    if not completeness_csv.is_absolute() and not completeness_csv.exists():
        completeness_csv = out / "runs" / completeness_csv.name

    def literal(path: pathlib.Path) -> str:
        return "'" + str(path).replace("'", "''") + "'"

    db = duckdb.connect()
    parquet = literal(out / "usage" / "*" / "*.parquet")
    db.execute(f"CREATE VIEW usage AS SELECT * FROM read_parquet({parquet}, hive_partitioning = true)")
    csv = literal(completeness_csv)
    db.execute(
        f"CREATE VIEW completeness AS SELECT * FROM read_csv({csv}, header = true, all_varchar = true) "
        # ICCID list rows that were rejected belong to no day (they are counted as rejected_input).
        "WHERE reason NOT LIKE 'rejected input%'"
    )
    daily = db.execute(
        """SELECT CAST(usage_start AS DATE)::VARCHAR AS day, count(*) AS devices,
                  sum(data_usage_bytes) AS bytes, sum(sms_usage) AS sms
           FROM usage GROUP BY ALL ORDER BY day"""
    ).fetchall()
    rows = {day: (devices, data, sms) for day, devices, data, sms in daily}
    # Pairs the completeness file says are not usage but that have a row anyway.
    contradictions = db.execute(
        """SELECT c.window_start, c.state, count(*) FROM completeness c
           JOIN usage u ON u.iccid = c.iccid
                       AND CAST(u.usage_start AS DATE)::VARCHAR = c.window_start
           GROUP BY ALL ORDER BY 1"""
    ).fetchall()
    listed = dict(
        db.execute(
            "SELECT window_start || '/' || state, count(*) FROM completeness GROUP BY ALL"
        ).fetchall()
    )

    failures = []
    for day, state, n in contradictions:
        failures.append(f"{day}: {n} ICCIDs listed as {state} have a usage row")
    print(f"run {report['run_id']} ({report['status']}), report {report_path}")
    print(f"{'day':<12}{'usage':>8}{'rows':>8}{'no usage':>10}{'other':>8}  GB")
    for day, states in sorted(by_window.items()):
        usage = states.get("usage", 0)
        devices, data, _ = rows.get(day, (0, 0, 0))
        for state, n in states.items():
            if state != "usage" and listed.get(f"{day}/{state}", 0) != n:
                failures.append(
                    f"{day}: the report counts {n} {state}, the completeness file lists "
                    f"{listed.get(f'{day}/{state}', 0)}"
                )
        if devices != usage:
            failures.append(f"{day}: {devices} rows in the Parquet, the report counts {usage} usage")
        other = sum(n for s, n in states.items() if s not in ("usage", "no_usage"))
        print(
            f"{day:<12}{usage:>8}{devices:>8}{states.get('no_usage', 0):>10}{other:>8}"
            f"  {(data or 0) / 1e9:.3f}"
        )

    days = sorted(by_window)
    fig, (ax_bytes, ax_devices) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    gb = [(rows.get(d, (0, 0, 0))[1] or 0) / 1e9 for d in days]
    ax_bytes.bar(days, gb, color="#1565c0")
    ax_bytes.set_ylabel("data usage (GB)")
    ax_bytes.set_title(f"tsusage run {report['run_id']}: daily usage")
    usage = [by_window[d].get("usage", 0) for d in days]
    no_usage = [by_window[d].get("no_usage", 0) for d in days]
    other = [sum(n for s, n in by_window[d].items() if s not in ("usage", "no_usage")) for d in days]
    ax_devices.bar(days, usage, color="#2e7d32", label="usage")
    ax_devices.bar(days, no_usage, bottom=usage, color="#9ccc65", label="no usage")
    ax_devices.bar(
        days, other, bottom=[u + n for u, n in zip(usage, no_usage)], color="#c62828",
        label="rejected / failed / missing",
    )
    ax_devices.set_ylabel("ICCIDs")
    ax_devices.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.png, dpi=80)
    print(f"plot: {args.png}")

    for failure in failures:
        print(f"CHECK FAILED: {failure}", file=sys.stderr)
    if not failures:
        print(f"checks: {len(days)} days, the completeness file agrees with the Parquet")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
