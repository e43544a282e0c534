"""latest.png: throughput by scenario and implementation (and latency p99), with matplotlib."""

from __future__ import annotations

from pathlib import Path

from .results import Outcome

COLORS = {"asyncstreams": "#2b6cb0", "baseline": "#718096", "faststream": "#dd6b20"}
THROUGHPUT = ("drain", "io", "payload", "publish", "workers", "memory", "cluster")


def draw(outcomes: list[Outcome], path: Path, *, title: str) -> Path | None:
    """Draw the chart; None when matplotlib is not installed or nothing was measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    panels: dict[str, list[Outcome]] = {}
    for outcome in outcomes:
        if (
            outcome.status == "ok"
            and outcome.runs
            and not outcome.rates
            and not outcome.extra("p99_ms")
        ):
            continue  # measured, but not a rate (the idle cluster consumer)
        panels.setdefault(outcome.step.scenario, []).append(outcome)
    names = [n for n in (*THROUGHPUT, "latency") if n in panels]
    if not names:
        return None
    heights = [max(2.0, 0.28 * len(panels[n]) + 0.9) for n in names]
    figure, axes = plt.subplots(
        len(names), 1, figsize=(11, sum(heights)), gridspec_kw={"height_ratios": heights}
    )
    axes_list = list(axes) if len(names) > 1 else [axes]
    for ax, name in zip(axes_list, names, strict=True):
        rows = panels[name]
        latency = name == "latency"
        labels, values, lows, highs, colors = [], [], [], [], []
        for o in reversed(rows):
            labels.append(f"{o.step.case} · {o.step.key}")
            colors.append(COLORS[o.step.role])
            if latency:
                value = o.extra("p99_ms") if o.status in ("ok", "behind") else None
                values.append(value or 0.0)
                lows.append(0.0)
                highs.append(0.0)
            else:
                rates = o.rates if o.status == "ok" else []
                median = o.median or 0.0
                values.append(median)
                lows.append(median - min(rates) if rates else 0.0)
                highs.append(max(rates) - median if rates else 0.0)
        positions = range(len(rows))
        measured = [value for value in values if value > 0]
        left = min(measured) / 4 if measured else 0.1
        ax.barh(positions, values, xerr=[lows, highs], color=colors, capsize=2)
        ax.set_xlim(left=left)
        ax.set_yticks(list(positions), labels, fontsize=7)
        ax.set_xscale("log")
        ax.set_title(name if not latency else "latency: p99 ms (lower is better)", fontsize=9)
        ax.set_xlabel("ms" if latency else "msgs/s (median, min-max)", fontsize=8)
        ax.tick_params(axis="x", which="both", labelsize=7)
        for y, value in zip(positions, values, strict=True):
            text = "n/a" if not value else (f"{value:.2f}" if latency else f"{value:,.0f}")
            ax.annotate(text, (value or left, y), xytext=(3, -3), textcoords="offset points",
                        fontsize=6)  # fmt: skip
    handles = [Patch(color=color) for color in COLORS.values()]
    figure.legend(handles, list(COLORS), loc="upper right", fontsize=8)
    figure.suptitle(title, fontsize=9, x=0.01, ha="left")
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    temporary = path.with_name(path.name + ".tmp")
    figure.savefig(temporary, dpi=110, format="png")
    plt.close(figure)
    temporary.replace(path)
    return path
