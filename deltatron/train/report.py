"""`deltatron-report RUN_DIR`: the key training panels as PNG files, from the run's metrics.jsonl.

For users without a wandb account (or before `wandb sync`): loss, throughput, the expert-load
heatmap, MLA's max QK logit and the AttnRes depth weights, drawn with matplotlib (the "obs" extra)
into RUN_DIR/report/ (or --out). A panel whose metrics the run did not log (QK logits without
MuonClip, depth weights without AttnRes) is skipped with a line saying why.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Panel:
    """One figure: what it plots, taken from the records. series: label -> (steps, values);
    matrix: a heatmap (rows x columns) with its row and column labels."""

    name: str
    title: str
    series: dict[str, tuple[list[float], list[float]]] = field(default_factory=dict)
    matrix: Optional[list[list[float]]] = None
    rows: list[str] = field(default_factory=list)
    cols: list[str] = field(default_factory=list)
    skipped: Optional[str] = None  # why there is nothing to draw


def read_metrics(run_dir: str) -> list[dict]:
    """The run's records, in order; a clear error when RUN_DIR is not a run directory."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"{run_dir} is not a directory: pass a training run directory (train.run_dir)")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl: pass the run directory a training run wrote (its train.run_dir, "
            "holding config.yaml and metrics.jsonl), not a checkpoint or wandb directory"
        )
    records = []
    with open(path) as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):  # the last line of a run killed mid-write may be cut
                break
            raise ValueError(f"{path}:{n} is not a JSON record: is this a deltatron metrics file?") from None
    if not records:
        raise ValueError(f"{path} holds no records yet: the run has not reached its first log step")
    return records


def _series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def _matching(records: list[dict], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    keys = {k for r in records for k in r if rx.fullmatch(k)}
    return sorted(keys, key=lambda k: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", k)])


def build_panels(records: list[dict]) -> list[Panel]:
    """The report's panels from the records (pure: no drawing)."""
    panels = []

    loss = Panel("loss", "Loss")
    for key in ["train/loss", "train/val_loss", *_matching(records, r"data/loss/.+")]:
        steps, values = _series(records, key)
        if steps:
            loss.series[key] = (steps, values)
    if not loss.series:
        loss.skipped = "no train/loss records"
    panels.append(loss)

    perf = Panel("throughput", "Throughput (tokens/s) and step time split (s)")
    for key in ["perf/tokens_per_sec", "perf/forward_backward_s", "perf/optimizer_s", "perf/data_wait_s"]:
        steps, values = _series(records, key)
        if steps:
            perf.series[key] = (steps, values)
    if not perf.series:
        perf.skipped = "no perf/ records"
    panels.append(perf)

    # expert load at the last log step that has it: rows MoE layers, columns experts
    experts = Panel("expert_load", "Expert load at the last log step (1.0 = balanced)")
    last = next((r for r in reversed(records) if any(k.endswith("/load") and k.startswith("moe/") for k in r)), None)
    if last is None:
        experts.skipped = "no moe/layer{N}/load records (a model without MoE layers?)"
    else:
        keys = _matching([last], r"moe/layer\d+/load")
        experts.matrix = [list(last[k]) for k in keys]
        experts.rows = [k.split("/")[1] for k in keys]
        experts.cols = [str(j) for j in range(len(experts.matrix[0]))]
        experts.title += f" (step {last['step']})"
    panels.append(experts)

    qk = Panel("qk_max_logit", "MLA max QK logit per layer")
    for key in _matching(records, r"optim/qk_max_logit/layer\d+"):
        qk.series[key.split("/")[-1]] = _series(records, key)
    if not qk.series:
        qk.skipped = "no optim/qk_max_logit records (they come with optim=muonclip and QK-clip on)"
    panels.append(qk)

    depth = Panel("attnres", "AttnRes depth weights at the last log step")
    last = next((r for r in reversed(records) if any(k.startswith("attnres/weight/") for k in r)), None)
    if last is not None:
        keys = _matching([last], r"attnres/weight/sub[^/]+/src\d+")
        subs = list(dict.fromkeys(k.split("/")[2] for k in keys))
        srcs = sorted({int(k.rsplit("src", 1)[1]) for k in keys})
        depth.matrix = [[last.get(f"attnres/weight/{s}/src{j}", float("nan")) for j in srcs] for s in subs]
        depth.rows, depth.cols = subs, [f"src{j}" for j in srcs]
        depth.title += f" (step {last['step']})"
    else:
        # standard residual: the sub-layer output RMS over training is the depth signal we have
        depth.title = "Sub-layer output RMS (standard residual: no depth weights)"
        for key in _matching(records, r"residual/output_rms/sub\d+"):
            depth.series[key.split("/")[-1]] = _series(records, key)
        if not depth.series:
            depth.skipped = "no attnres/ or residual/ records"
    panels.append(depth)
    return panels


def draw(panel: Panel, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    if panel.matrix is not None:
        image = ax.imshow(panel.matrix, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_yticks(range(len(panel.rows)), panel.rows)
        step = max(1, len(panel.cols) // 16)
        ax.set_xticks(range(0, len(panel.cols), step), panel.cols[::step])
        fig.colorbar(image, ax=ax)
    else:
        twin = None
        for i, (label, (steps, values)) in enumerate(panel.series.items()):
            target = ax
            if panel.name == "throughput" and label.endswith("_s"):  # seconds on their own axis
                twin = twin or ax.twinx()
                target = twin
            # one color cycle over both axes, so every series keeps its own color
            target.plot(steps, values, label=label, color=f"C{i % 10}", marker="." if len(steps) < 30 else None)
        ax.set_xlabel("step")
        handles = ax.get_legend_handles_labels()
        if twin is not None:
            handles = [a + b for a, b in zip(handles, twin.get_legend_handles_labels())]
        ax.legend(*handles, fontsize=7, loc="best")
    ax.set_title(panel.title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_report(run_dir: str, out_dir: Optional[str] = None) -> dict[str, Panel]:
    """Draw every panel with data into out_dir (default RUN_DIR/report); returns name -> Panel
    for the drawn ones (their files are out_dir/<name>.png)."""
    records = read_metrics(run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("deltatron-report needs matplotlib: pip install -e '.[obs]'") from None
    out_dir = out_dir or os.path.join(run_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    drawn = {}
    for panel in build_panels(records):
        if panel.skipped:
            print(f"deltatron-report: {panel.name}: skipped ({panel.skipped})")
            continue
        path = os.path.join(out_dir, f"{panel.name}.png")
        draw(panel, path)
        print(f"deltatron-report: {panel.name}: {path}")
        drawn[panel.name] = panel
    return drawn


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="deltatron-report", description="Render a run's key training panels to PNG from its metrics.jsonl."
    )
    parser.add_argument("run_dir", help="the training run directory (holds metrics.jsonl)")
    parser.add_argument("--out", default=None, help="output directory (default RUN_DIR/report)")
    args = parser.parse_args(argv)
    try:
        write_report(args.run_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as exc:
        sys.exit(f"deltatron-report: {exc}")


if __name__ == "__main__":
    main()
