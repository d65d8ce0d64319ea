"""Tabulate every synthetic recall run in experiments/results/ as Markdown.

python experiments/summarize_synthetic.py > docs/results/synthetic_recall.md
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
IGNORED = {"steps", "eval_every", "eval_documents"}  # how long and how often measured, not what


def changes(settings: dict, reference: dict, prefix: str = "") -> str:
    """The settings of a run that differ from the reference run's (nested ones as a.b=value)."""
    diff = []
    for key in sorted(settings):
        value, base = settings[key], reference.get(key)
        if key in IGNORED or value == base:
            continue
        if isinstance(value, dict) and isinstance(base, dict):
            diff.append(changes(value, base, f"{prefix}{key}."))
        else:
            diff.append(f"{prefix}{key}={value}")
    return ", ".join(diff) or "reference"


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"


def main() -> None:
    reference = json.loads((RESULTS / "synthetic_recall.json").read_text())
    print("# Synthetic recall runs\n")
    print("Made by `python experiments/summarize_synthetic.py` from the JSON files in `experiments/results/`")
    print("(each written by `experiments/synthetic_recall.py`; its log lies beside it). Accuracy at the last")
    print(f"evaluation, on held-out documents; chance is {reference['chance_accuracy']:.2%}. The milestones are the")
    print(
        "training steps (seconds) at which answers reachable only through the memory first passed twice chance, 50% "
        "and 90%.\n"
    )
    print(
        "| run | differs from the reference by | model | steps | s | in segment | in XL | only in memory | 2x chance "
        "/ 50% / 90% |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for path in sorted(RESULTS.glob("synthetic_recall*.json")):
        result = json.loads(path.read_text())
        for name, run in result["runs"].items():
            final = run["final"]
            milestones = run.get("milestones_memory_only") or {}
            reached = (
                " / ".join(
                    f"{m['step']} ({m['train_seconds']:.0f})" if m else "never"
                    for m in (milestones.get(k) for k in ("above_chance", "50%", "90%"))
                )
                if run["memory"]
                else "-"
            )
            print(
                f"| {path.stem} | {changes(result['settings'], reference['settings'])} | {name} | {run['steps']} | "
                f"{run['train_seconds']:.0f} | {percent(final['acc_segment'])} | {percent(final['acc_xl'])} | "
                f"{percent(final['acc_memory'])} | {reached} |"
            )


if __name__ == "__main__":
    main()
