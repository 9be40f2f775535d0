"""Training curves: a PNG from a synthetic metrics.jsonl (with and without eval.jsonl), errors that name
the file and line of a malformed record, repeated steps of a resumed run."""
import json

import pytest

from cir.plot import main, plot_run, read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_metrics(run_dir, num_steps: int = 25, extra_lines: tuple[str, ...] = ()) -> None:
    lines = []
    for step in range(1, num_steps + 1):
        lines.append(json.dumps({
            "step": step, "reward/mean": -1 + step / num_steps, "accuracy": step / (2 * num_steps),
            "tools/calls_per_response": 0.1 * step, "tools/success_rate": 0.5, "tools/responses_using_tool": 0.3,
            "tools/budget": 2 if step < 10 else 3, "response/length_mean": 100 + step,
            "train/clip_frac": 0.01, "train/entropy": 0.7, "train/grad_norm": 0.4, "train/lr": 1e-6,
            "time/generate": 3.0, "time/sandbox_wait": 0.5, "time/reward": 0.1, "time/train": 1.0,
        }))
    (run_dir / "metrics.jsonl").write_text("\n".join(lines + list(extra_lines)) + "\n")


def test_plot_writes_a_png(tmp_path):
    write_metrics(tmp_path)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"step": 10, "held": {"avg@4": 0.25, "pass@4": 0.5}}) + "\n")
    path = plot_run(tmp_path)
    assert path == tmp_path / "curves.png"
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_plot_with_few_metrics_and_custom_out(tmp_path, capsys):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward/mean": 0.0}) + "\n")
    out = tmp_path / "sub" / "c.png"
    main([str(tmp_path), "--out", str(out)])
    assert out.read_bytes()[:8] == PNG_MAGIC
    assert str(out) in capsys.readouterr().out


@pytest.mark.parametrize("bad, match", [
    ("{not json", "invalid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"reward/mean": 0.5}', "non-numeric \"step\""),
])
def test_malformed_line_names_file_and_line(tmp_path, bad, match):
    write_metrics(tmp_path, num_steps=3, extra_lines=(bad,))
    with pytest.raises(ValueError, match=match) as info:
        plot_run(tmp_path)
    assert str(info.value).endswith(f"({tmp_path / 'metrics.jsonl'}:4)")


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        plot_run(tmp_path)


def test_repeated_steps_keep_the_last_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"step": 1, "a": 1}, {"step": 2, "a": 2}, {"step": 2, "a": 3}]))
    assert [r["a"] for r in read_jsonl(path)] == [1, 3]


def test_skipped_update_is_a_gap_and_nonnegative_axes_start_at_zero():
    import math

    import matplotlib.pyplot as plt

    from cir.plot import draw_run

    records = [{"step": s, "train/grad_norm": 0.0 if s == 2 else 0.5, "train/skipped": float(s == 2),
                "train/clip_frac": 0.0, "train/entropy": 0.7, "reward/mean": -0.5} for s in range(1, 5)]
    fig = draw_run(records, [], "t")
    try:
        axes = {ax.get_title(): ax for ax in fig.axes if ax.get_title()}
        (grad,) = [line for line in axes["optimizer"].get_lines() if line.get_label() == "grad norm"]
        ys = list(grad.get_ydata())
        assert math.isnan(ys[1]) and ys[0] == ys[2] == ys[3] == 0.5  # step 2: a gap, not a 0
        assert axes["policy"].get_ylim() == (0.0, 1.0)  # clip fraction always 0: no negative axis
        assert axes["optimizer"].get_ylim()[0] == 0.0
        assert axes["reward and accuracy"].get_ylim()[0] < 0  # negative values keep their range
    finally:
        plt.close(fig)
