"""A grouped bar chart of the per-task scores, as PNG bytes for the card."""

from __future__ import annotations

import io

from mergekit_mllm.hub.results import EvalSet

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores_bar_chart(evalset: EvalSet, *, base_label: str, title: str) -> bytes:
    # The object API (no pyplot) renders PNG with Agg and touches no global backend state.
    from matplotlib.figure import Figure

    columns = evalset.columns(base_label)
    tasks = evalset.task_names()
    figure = Figure(figsize=(max(5.0, 1.2 * len(tasks) + 2.0), 3.6), dpi=100)
    axes = figure.add_subplot()
    width = 0.8 / max(len(columns), 1)
    for i, (label, results) in enumerate(columns):
        positions = [t + (i - (len(columns) - 1) / 2) * width for t in range(len(tasks))]
        scores = [results.tasks[task].score if task in results.tasks else 0.0 for task in tasks]
        axes.bar(positions, scores, width=width, label=label)
    axes.set_xticks(range(len(tasks)), tasks, rotation=20, ha="right")
    axes.set_ylim(0, 100)
    axes.set_ylabel("score (0–100)")
    axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.tight_layout()
    buffer = io.BytesIO()
    # no timestamp/software metadata: the same scores give the same bytes
    figure.savefig(buffer, format="png", metadata={"Software": None})
    return buffer.getvalue()
