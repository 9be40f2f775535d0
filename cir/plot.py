"""Training curves of a run, drawn to one PNG from its metrics.jsonl (and eval.jsonl when present).

    python -m cir.plot runs/cir                    # -> runs/cir/curves.png
    python -m cir.plot runs/cir --out curves.png

Six panels: reward and accuracy (with held-out evaluation points), tool use, response length,
clip fraction and entropy, grad norm and learning rate, and where the seconds of a step went.
A metric the run did not log leaves its panel with a "not logged" note; a step whose update was
skipped (no learning signal) leaves a gap in the grad norm, not a 0; an axis whose values are all
>= 0 starts at 0 (an always-0 clip fraction gets 0..1, not a band around 0). A step logged twice
(a resumed run re-logs the steps after its checkpoint) keeps its last record. A line that is not
a JSON object with a numeric "step" is a UserError (a ValueError) naming the file and the line;
the command prints it as one `error:` line (--debug: with its traceback).
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

from cir.data.problems import iter_jsonl
from cir.errors import ArgumentParser, MissingPathError, UserError, location, run_main

SMOOTH_MIN_POINTS = 20  # fewer points: the raw curve alone; more: a moving average drawn over it
SCHEDULES = ("tools/budget", "train/lr")  # set, not measured: drawn as they are, never smoothed
GAP_WHEN_SKIPPED = ("train/grad_norm",)  # logged as 0 at a skipped update, where nothing was measured


def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics-style JSONL file (one object with a numeric "step" per line),
    sorted by step, the last record of a repeated step kept."""
    by_step: dict[float, dict] = {}
    for line_no, record in iter_jsonl(path):
        if not isinstance(record, dict):
            raise UserError(f"expected a JSON object, got {type(record).__name__}", where=location(path, line_no))
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, (int, float)):
            raise UserError(f"missing or non-numeric \"step\" (got {step!r})", where=location(path, line_no))
        by_step[step] = record
    return [by_step[s] for s in sorted(by_step)]


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one numeric metric over the records that have it; NaN (a gap in the curve)
    where the step's update was skipped and the metric measures the update."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            steps.append(r["step"])
            values.append(math.nan if key in GAP_WHEN_SKIPPED and r.get("train/skipped") else float(v))
    return steps, values


def _floor_at_zero(ax) -> None:
    """An axis whose curves are all >= 0 starts at 0 (and spans 0..1 when they are all 0)."""
    values = [float(y) for line in ax.get_lines() for y in line.get_ydata() if not math.isnan(float(y))]
    if values and min(values) >= 0:
        top = max(values)
        ax.set_ylim(0, ax.get_ylim()[1] if top > 0 else 1)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` points (NaNs skipped)."""
    out = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1): i + 1] if not math.isnan(v)]
        out.append(sum(chunk) / len(chunk) if chunk else math.nan)
    return out


def _draw(ax, records: list[dict], key: str, label: str, color: str, style: str = "-") -> bool:
    steps, values = series(records, key)
    if not steps:
        return False
    if key in SCHEDULES:
        ax.plot(steps, values, style, color=color, label=label, linewidth=1.4, drawstyle="steps-post")
    elif len(steps) >= SMOOTH_MIN_POINTS:
        ax.plot(steps, values, style, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(steps, moving_average(values, max(len(steps) // 20, 5)), style, color=color, label=label,
                linewidth=1.6)
    else:
        ax.plot(steps, values, style, color=color, label=label, linewidth=1.4, marker="o", markersize=3)
    return True


def _panel(ax, records: list[dict], title: str, curves: list[tuple[str, str]], ylabel: str = "",
           twin: list[tuple[str, str]] | None = None, twin_label: str = "") -> None:
    """Curves on the left axis, optional others on a right axis (for metrics of another scale)."""
    colors = iter(["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:gray"])
    drawn = [_draw(ax, records, key, label, next(colors)) for key, label in curves]
    handles, labels = ax.get_legend_handles_labels()
    if twin:
        ax2 = ax.twinx()
        drawn += [_draw(ax2, records, key, label, next(colors), "--") for key, label in twin]
        _floor_at_zero(ax2)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
        ax2.set_ylabel(twin_label)
        ax2.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
    _floor_at_zero(ax)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if not any(drawn):
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
    if handles:
        ax.legend(handles, labels, fontsize=8, loc="best")


def _eval_points(ax, evals: list[dict]) -> None:
    """Held-out accuracy (each eval set's avg@n) as dotted markers on the reward panel."""
    names = sorted({k for r in evals for k, v in r.items() if isinstance(v, dict)})
    styles = itertools.cycle(zip("s^Dvp*", ["tab:red", "tab:cyan", "tab:olive", "tab:pink", "black", "tab:brown"],
                                 strict=True))
    for name, (marker, color) in zip(names, itertools.islice(styles, len(names)), strict=True):
        steps, values, metric = [], [], "avg@n"
        for r in evals:
            m = r.get(name)
            key = next((k for k in m if k.startswith("avg@")), None) if isinstance(m, dict) else None
            if key is not None and isinstance(m[key], (int, float)):
                steps.append(r["step"])
                values.append(float(m[key]))
                metric = key
        if steps:
            ax.plot(steps, values, marker=marker, linestyle=":", color=color, label=f"eval {name} {metric}")


def _time_split(ax, records: list[dict]) -> None:
    """Seconds per step, stacked: model decoding, waiting on the sandbox, reward, training."""
    steps = [r["step"] for r in records]

    def get(r: dict, key: str) -> float:
        v = r.get(key)
        return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else 0.0

    parts = {
        "generate": [max(get(r, "time/generate") - get(r, "time/sandbox_wait"), 0.0) for r in records],
        "sandbox wait": [get(r, "time/sandbox_wait") for r in records],
        "reward": [get(r, "time/reward") for r in records],
        "train": [get(r, "time/train") for r in records],
    }
    parts = {k: v for k, v in parts.items() if any(v)}
    ax.set_title("time per step")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds")
    ax.grid(alpha=0.3)
    if not parts:
        ax.text(0.5, 0.5, "not logged", transform=ax.transAxes, ha="center", va="center", color="gray")
        return
    ax.stackplot(steps, *parts.values(), labels=list(parts), alpha=0.8)
    ax.legend(fontsize=8, loc="upper left")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's curves; returns the PNG path (default RUN_DIR/curves.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics_path = run_dir / "metrics.jsonl"
    if not metrics_path.is_file():
        hint = None if run_dir.is_dir() else "give the run directory, not a file" if run_dir.exists() \
            else "no such directory"
        raise MissingPathError(f"no metrics.jsonl in {run_dir}", hint=hint)
    records = read_jsonl(metrics_path)
    if not records:
        raise UserError("no metrics records", where=str(metrics_path))
    eval_path = run_dir / "eval.jsonl"
    evals = read_jsonl(eval_path) if eval_path.is_file() else []
    fig = draw_run(records, evals, f"{run_dir.resolve().name}: {len(records)} steps (last {records[-1]['step']})")
    out = Path(out) if out is not None else run_dir / "curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def draw_run(records: list[dict], evals: list[dict], title: str):
    """The six panels as a matplotlib Figure (the caller saves and closes it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ax = axes[0, 0]
    _panel(ax, records, "reward and accuracy", [("reward/mean", "reward mean"), ("accuracy", "accuracy")])
    _eval_points(ax, evals)
    if evals:
        ax.legend(fontsize=8, loc="best")
    _panel(axes[0, 1], records, "tool use",
           [("tools/calls_per_response", "calls / response"), ("tools/budget", "budget")], "calls",
           twin=[("tools/success_rate", "success rate"), ("tools/responses_using_tool", "responses using tool")],
           twin_label="fraction")
    _panel(axes[0, 2], records, "response length", [("response/length_mean", "mean tokens")], "tokens")
    _panel(axes[1, 0], records, "policy", [("train/clip_frac", "clip fraction")], "fraction",
           twin=[("train/entropy", "entropy")], twin_label="nats / token")
    _panel(axes[1, 1], records, "optimizer", [("train/grad_norm", "grad norm")], "norm",
           twin=[("train/lr", "learning rate")], twin_label="lr")
    _time_split(axes[1, 2], records)
    for ax in axes.flat:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python -m cir.plot", description="Draw a run's training curves to a PNG.")
    parser.add_argument("run_dir", help="run output directory holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG path (default: RUN_DIR/curves.png)")
    args = parser.parse_args(argv)
    print(plot_run(args.run_dir, args.out))


if __name__ == "__main__":
    run_main(main)
