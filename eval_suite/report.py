"""Compare results files: a Markdown table and a grouped bar chart (PNG) per task."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from eval_suite.results import load_results


def _task_order(tables: Sequence[dict]) -> List[str]:
    from eval_suite.tasks import GROUPS

    seen: List[str] = []
    for data in tables:
        for name in data["tasks"]:
            if name not in seen:
                seen.append(name)
    canonical = GROUPS["synth"] + GROUPS["paper"]
    return sorted(seen, key=lambda n: (canonical.index(n) if n in canonical else len(canonical), seen.index(n)))


def _labels(paths: Sequence[Path], tables: Sequence[dict]) -> List[str]:
    names = [data["model"]["name"] for data in tables]
    labels = []
    for path, name in zip(paths, names):
        labels.append(name if names.count(name) == 1 else f"{name} ({path.stem})")
    return labels


def build_table(paths: Sequence[Path], tables: Sequence[dict]) -> Tuple[List[str], List[str], Dict[str, Dict[str, float]]]:
    tasks = _task_order(tables)
    labels = _labels(paths, tables)
    scores = {label: {t: data["tasks"][t]["score"] for t in data["tasks"]} for label, data in zip(labels, tables)}
    return labels, tasks, scores


def markdown(paths: Sequence[Path], tables: Sequence[dict]) -> str:
    labels, tasks, scores = build_table(paths, tables)
    metrics = {}
    for data in tables:
        for name, entry in data["tasks"].items():
            metrics.setdefault(name, entry["metric"])
    header = ["model"] + [f"{t}<br>({metrics[t]})" for t in tasks] + ["average"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        row = scores[label]
        cells = [f"{row[t]:.2f}" if t in row else "–" for t in tasks]
        complete = all(t in row for t in tasks)
        average = sum(row[t] for t in tasks if t in row) / max(1, sum(t in row for t in tasks))
        cells.append(f"{average:.2f}" + ("" if complete else "*"))
        lines.append("| " + " | ".join([label] + cells) + " |")
    notes = ["", "Scores are 0–100. * = average over the tasks this model has.", "", "Sources:", ""]
    for label, path, data in zip(labels, paths, tables):
        model = data["model"]
        notes.append(f"- **{label}**: `{path}` — {model['path']} ({model['adapter']}, {model['dtype']}, "
                     f"{model['attn_implementation']}, {model['device']}; eval_suite {data['suite_version']})")
    return "\n".join(lines + notes) + "\n"


def plot(paths: Sequence[Path], tables: Sequence[dict], out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, tasks, scores = build_table(paths, tables)
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(tasks) + 2), 4.5))
    for i, label in enumerate(labels):
        xs = [t + (i - (len(labels) - 1) / 2) * width for t in range(len(tasks))]
        ys = [scores[label].get(task, 0.0) for task in tasks]
        ax.bar(xs, ys, width=width, label=label)
    ax.set_xticks(range(len(tasks)))
    ax.set_xticklabels(tasks, rotation=30, ha="right")
    ax.set_ylabel("score (0–100)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize="small", ncol=min(4, len(labels)))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)


def write_report(result_files: Sequence[str], out_dir) -> Dict[str, Path]:
    paths = [Path(p) for p in result_files]
    tables = [load_results(p) for p in paths]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md_path, png_path = out / "report.md", out / "report.png"
    text = "# eval_suite report\n\n![scores per task](report.png)\n\n" + markdown(paths, tables)
    md_path.write_text(text)
    plot(paths, tables, png_path)
    return {"markdown": md_path, "plot": png_path}
