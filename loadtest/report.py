"""A run's result as a table on the terminal and as one self-contained HTML page.

The page has no script and loads nothing: its charts are inline SVG drawn here, so it can
be mailed, attached to a ticket or opened years later exactly as it was.
"""

from __future__ import annotations

import html
import math
from typing import Any

WIDTH, HEIGHT, PAD = 640, 220, 44
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")


def fmt_seconds(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value * 1000:.2f} ms" if value < 1 else f"{value:.2f} s"


def table(result: dict[str, Any]) -> str:
    """The terminal summary of one run."""
    lat = result["latency_seconds"]
    mode = f"{result['mode']}, {result['rate']:g}/s" if result["rate"] else result["mode"]
    rows = [
        ("scenario", f"{result['scenario']} ({mode})"),
        ("target", result["target"]),
        ("sessions", f"{result['sessions']} (peak live {result['sessions_peak']})"),
        ("seconds", f"{result['seconds']:.1f}"),
        ("requests", str(result["requests"])),
        ("throughput", f"{result['throughput_rps']:.1f}/s"),
        ("latency", "  ".join(f"{k} {fmt_seconds(lat[k])}" for k in ("p50", "p90", "p99", "p99.9", "max"))),
        ("errors", f"{result['errors']}  {_kinds(result['errors_by_kind'])}"),
        ("violations", f"{result['violations']}  {_kinds(result['violations_by_kind'])}"),
    ]
    rows += [(name, str(value)) for name, value in result["counters"].items()]
    if idle := result.get("extra", {}).get("idle"):
        cpu = f", target CPU {idle['cpu_percent']:.2f} % of a core" if "cpu_percent" in idle else ""
        rows.append(("idle", f"{idle['streams']} streams over {idle['seconds']:.1f} s from {idle['from']:.1f} s: "
                             f"{idle['keepalives_per_second']:g} keep-alives/s{cpu}"))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name.rjust(width)}  {value}" for name, value in rows]
    lines += [f"{'!'.rjust(width)}  {e['kind']} at {e['at']}s: {e['detail']}" for e in result["violation_examples"][:5]]
    return "\n".join(lines)


def _kinds(counts: dict[str, int]) -> str:
    return ", ".join(f"{kind} {n}" for kind, n in counts.items())


def compare_table(rows: list[dict[str, Any]]) -> str:
    """One line per target: medians over repetitions; each repetition's throughput as a ratio to the
    first target's; and, against the first target whose CPU was measured, in the same repetition, its
    throughput, p99 and CPU a request (medians of those ratios)."""
    reference = rows[0].get("reference") if rows else None
    idle = any(r.get("keepalives_per_second") is not None for r in rows)  # idle-streams with no event due
    head = ["target", "req/s", "answered/s", "p50", "p99", "CPU ms/req", "MB/session",
            *(["idle CPU", "keep-alives/s"] if idle else []), "errors", "violations",
            "vs first", f"vs {reference}: req/s p99 CPU" if reference else "vs -"]
    body = [[r["target"], f"{r['throughput_rps']:.0f}", f"{r['answered_rps']:.0f}", fmt_seconds(r["p50"]),
             fmt_seconds(r["p99"]),
             _or_dash(r["cpu_ms_per_request"], ".3f"), _or_dash(r["mb_per_session"], ".2f"),
             *([_or_dash(r.get("idle_cpu_percent"), ".2f", " %"), _or_dash(r.get("keepalives_per_second"), "g")]
               if idle else []),
             str(r["errors"]), str(r["violations"]), " ".join(f"{x:.2f}" for x in r["ratios"]),
             _against(r.get("vs_reference"))] for r in rows]
    widths = [max(len(str(c)) for c in col) for col in zip(head, *body, strict=True)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)) for line in [head, *body])


def _or_dash(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


def _against(ratios: dict[str, float | None] | None) -> str:
    if not ratios:
        return "-"
    return " ".join("-" if (x := ratios[k]) is None else f"{x:.2f}{'' if k == 'throughput' else 'x'}"
                    for k in ("throughput", "p99", "cpu"))


# --- SVG ----------------------------------------------------------------------------------------

def line_chart(title: str, series: dict[str, list[tuple[float, float]]], unit: str) -> str:
    points = [p for values in series.values() for p in values if not math.isnan(p[1])]
    if not points:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    x_max = max(1.0, max(x for x, _ in points))
    y_max = max(1e-9, max(y for _, y in points)) * 1.1

    def sx(x: float) -> float:
        return PAD + x / x_max * (WIDTH - 2 * PAD)

    def sy(y: float) -> float:
        return HEIGHT - PAD + 10 - y / y_max * (HEIGHT - PAD - 10)

    parts = [_axes(x_max, y_max, unit, "seconds into the run")]
    for i, (name, values) in enumerate(series.items()):
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in values if not math.isnan(y))
        colour = COLOURS[i % len(COLOURS)]
        parts.append(f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{WIDTH - PAD - 4}" y="{16 + 14 * i}" text-anchor="end" fill="{colour}" '
                     f'font-size="11">{html.escape(name)}</text>')
    return _figure(title, parts)


def bar_chart(title: str, bars: dict[str, float], unit: str) -> str:
    values = {k: v for k, v in bars.items() if v is not None and not math.isnan(v)}
    if not values:
        return f"<figure><figcaption>{html.escape(title)}: no data</figcaption></figure>"
    y_max = max(1e-9, max(values.values())) * 1.15
    step = (WIDTH - 2 * PAD) / len(values)
    parts = [_axes(None, y_max, unit, "")]
    for i, (label, value) in enumerate(values.items()):
        h = value / y_max * (HEIGHT - PAD - 10)
        x = PAD + i * step + step * 0.15
        parts.append(f'<rect x="{x:.1f}" y="{HEIGHT - PAD + 10 - h:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" '
                     f'fill="{COLOURS[i % len(COLOURS)]}"/>')
        parts.append(f'<text x="{x + step * 0.35:.1f}" y="{HEIGHT - PAD + 24}" text-anchor="middle" '
                     f'font-size="11">{html.escape(label)}</text>')
        parts.append(f'<text x="{x + step * 0.35:.1f}" y="{HEIGHT - PAD + 6 - h:.1f}" text-anchor="middle" '
                     f'font-size="10">{value:.3g}</text>')
    return _figure(title, parts)


def _axes(x_max: float | None, y_max: float, unit: str, x_label: str) -> str:
    base = HEIGHT - PAD + 10
    out = [f'<line x1="{PAD}" y1="{base}" x2="{WIDTH - PAD}" y2="{base}" stroke="#888"/>',
           f'<line x1="{PAD}" y1="10" x2="{PAD}" y2="{base}" stroke="#888"/>',
           f'<text x="{PAD - 4}" y="14" text-anchor="end" font-size="10">{y_max:.3g}</text>',
           f'<text x="{PAD - 4}" y="{base}" text-anchor="end" font-size="10">0</text>',
           f'<text x="12" y="{HEIGHT / 2}" font-size="10" transform="rotate(-90 12 {HEIGHT / 2})">'
           f'{html.escape(unit)}</text>']
    if x_max is not None:
        out.append(f'<text x="{WIDTH - PAD}" y="{base + 14}" text-anchor="end" font-size="10">{x_max:.0f}</text>')
        out.append(f'<text x="{WIDTH / 2}" y="{base + 28}" text-anchor="middle" font-size="10">'
                   f'{html.escape(x_label)}</text>')
    return "".join(out)


def _figure(title: str, parts: list[str]) -> str:
    return (f'<figure><figcaption>{html.escape(title)}</figcaption><svg xmlns="http://www.w3.org/2000/svg" '
            f'width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}">{"".join(parts)}</svg></figure>')


# --- pages --------------------------------------------------------------------------------------

STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
         "td,th{padding:.2em .8em;border-bottom:1px solid #ddd;text-align:left}figure{margin:1em 0}"
         "figcaption{font-weight:600}.bad{color:#b00}")


def run_charts(result: dict[str, Any]) -> list[str]:
    timeline = result["timeline"]
    at = [row["second"] + 0.5 for row in timeline]
    lat = result["latency_seconds"]
    return [
        line_chart("Latency over time", {"p50": list(zip(at, [r["p50"] for r in timeline], strict=True)),
                                         "p99": list(zip(at, [r["p99"] for r in timeline], strict=True))}, "seconds"),
        bar_chart("Latency percentiles", {k: lat[k] for k in ("p50", "p90", "p99", "p99.9", "max")}, "seconds"),
        line_chart("Throughput", {"answered/s": list(zip(at, [r["requests"] - r["errors"] for r in timeline],
                                                         strict=True))}, "per second"),
        line_chart("Errors and violations", {
            "errors/s": list(zip(at, [float(r["errors"]) for r in timeline], strict=True)),
            "violations/s": list(zip(at, [float(r["violations"]) for r in timeline], strict=True))}, "per second"),
        line_chart("Sessions active", {"sessions": list(zip(at, [float(r["sessions"]) for r in timeline],
                                                            strict=True))}, "sessions"),
    ]


def html_page(results: list[dict[str, Any]], comparison: list[dict[str, Any]] | None = None) -> str:
    """One page: the comparison (if any), then each run's table and charts."""
    body = [f"<h1>Tether load test: {html.escape(results[0]['scenario'])}</h1>"]
    if comparison:
        body.append(f"<h2>Comparison</h2><pre>{html.escape(compare_table(comparison))}</pre>")
        body.append(bar_chart("Throughput (median)", {r["target"]: r["throughput_rps"] for r in comparison}, "req/s"))
        body.append(bar_chart("p99 latency (median)", {r["target"]: r["p99"] for r in comparison}, "seconds"))
    for result in results:
        cls = ' class="bad"' if result["violations"] else ""
        body.append(f"<h2{cls}>{html.escape(result['target'])}: {result['violations']} violations, "
                    f"{result['errors']} errors</h2><pre>{html.escape(table(result))}</pre>")
        body.extend(run_charts(result))
        if result["events"]:
            rows = "".join(f"<tr><td>{e['at']}</td><td>{html.escape(str(e))}</td></tr>" for e in result["events"])
            body.append(f"<table><tr><th>at (s)</th><th>event</th></tr>{rows}</table>")
    return (f"<!doctype html><html><head><meta charset=\"utf-8\"><title>Tether load test</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
