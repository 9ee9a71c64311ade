"""`deltatron-dashboard --project P [--entity E] [--url URL]`: a wandb workspace with one section
per metric namespace (deltatron.train.metrics.METRIC_NAMESPACES), built with `wandb-workspaces`
(the "obs" extra).

The panels are data (`dashboard_spec`), turned into a workspace object by `build_workspace`
without touching the network; only `main` talks to wandb: it saves a new workspace view, or with
--url replaces the sections of an existing one (so re-running it updates that dashboard).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Optional

from deltatron.train.namespaces import METRIC_NAMESPACES


@dataclass(frozen=True)
class PanelSpec:
    """A line plot: explicit metric names (y) or a regex over metric names (metric_regex)."""

    title: str
    y: tuple[str, ...] = ()
    regex: Optional[str] = None


@dataclass
class SectionSpec:
    namespace: str
    description: str
    panels: list[PanelSpec] = field(default_factory=list)


def dashboard_spec() -> list[SectionSpec]:
    """The dashboard's sections, one per namespace, in the README's order. Per-layer metrics are
    regex panels, so one spec fits every model size."""
    layer = r"layer\d+"
    panels = {
        "train": [
            PanelSpec("loss", ("train/loss", "train/val_loss")),
            PanelSpec("learning rate", ("train/lr",)),
            PanelSpec("grad norm (global, before clipping)", ("train/grad_norm",)),
            PanelSpec("tokens seen", ("train/tokens",)),
            PanelSpec("skipped steps", ("train/skipped_steps",)),
        ],
        "perf": [
            PanelSpec("tokens/s", ("perf/tokens_per_sec",)),
            PanelSpec("TFLOP/s per GPU and MFU", ("perf/tflops_per_device", "perf/mfu")),
            PanelSpec("step time split (s)", ("perf/step_time_s", "perf/forward_backward_s", "perf/optimizer_s",
                                               "perf/data_wait_s")),
            PanelSpec("straggler: slowest rank / median", ("perf/straggler_ratio",)),
            PanelSpec("slowest rank", ("perf/slowest_rank",)),
        ],
        "moe": [
            PanelSpec("max expert load, worst layer (1 = balanced)", ("moe/max_load",)),
            PanelSpec("max expert load per layer", regex=rf"moe/{layer}/max_load"),
            PanelSpec("min expert load per layer", regex=rf"moe/{layer}/min_load"),
            PanelSpec("router expert-bias range", regex=rf"moe/{layer}/bias_range"),
            PanelSpec("tokens whose top-k changed since the last log", regex=rf"moe/{layer}/topk_changed"),
        ],
        "kda": [
            PanelSpec("mean decay exp(g)", regex=rf"kda/{layer}/decay"),
            PanelSpec("mean beta", regex=rf"kda/{layer}/beta"),
        ],
        "optim": [
            PanelSpec("grad norm per parameter group", regex=r"optim/grad_norm/.+"),
            PanelSpec("MLA max QK logit", regex=rf"optim/qk_max_logit/{layer}"),
            PanelSpec("QK-clipped heads", regex=rf"optim/qk_clipped_heads/{layer}"),
        ],
        "attnres": [
            PanelSpec("depth-attention weights", regex=r"attnres/weight/.+"),
            PanelSpec("pipeline hand-off bytes per micro-batch", ("attnres/pipeline_bytes_per_microbatch",)),
        ],
        "residual": [PanelSpec("sub-layer output RMS (PreNorm dilution)", regex=r"residual/output_rms/.+")],
        "data": [
            PanelSpec("loss per dataset", regex=r"data/loss/.+"),
            PanelSpec("loss tokens per dataset (log step)", regex=r"data/tokens/.+"),
        ],
        "system": [
            PanelSpec("peak memory (GB)", ("system/peak_memory_gb", "system/max_peak_memory_gb")),
            PanelSpec("reserved memory (GB)", ("system/reserved_memory_gb", "system/max_reserved_memory_gb")),
            PanelSpec("rank with the most memory", ("system/max_memory_rank",)),
        ],
    }
    return [SectionSpec(ns, desc, panels[ns]) for ns, (desc, _) in METRIC_NAMESPACES.items()]


def build_workspace(project: str, entity: str, name: str = "deltatron", base=None):
    """The workspace object (no network). base: an existing workspace whose sections are replaced."""
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    sections = [
        ws.Section(
            name=f"{s.namespace}/ - {s.description}",
            is_open=s.namespace in ("train", "perf", "moe"),
            panels=[
                wr.LinePlot(title=p.title, y=list(p.y), metric_regex=p.regex) for p in s.panels
            ],
        )
        for s in dashboard_spec()
    ]
    if base is not None:
        base.sections = sections
        return base
    return ws.Workspace(entity=entity, project=project, name=name, sections=sections)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        prog="deltatron-dashboard",
        description="Create (or with --url update) a wandb workspace with deltatron's panels, one section per "
        "metric namespace. Needs a wandb login (wandb login, or WANDB_API_KEY).",
    )
    parser.add_argument("--project", required=True, help="the wandb project the runs log to (logging.wandb_project)")
    parser.add_argument("--entity", default=None, help="the wandb entity (default: your default entity)")
    parser.add_argument("--name", default="deltatron", help="the workspace view's name")
    parser.add_argument("--url", default=None, help="an existing workspace URL to update instead of creating one")
    args = parser.parse_args(argv)
    try:
        import wandb_workspaces.workspaces as ws
    except ImportError:
        sys.exit("deltatron-dashboard needs wandb-workspaces: pip install -e '.[obs]'")
    import wandb

    entity = args.entity or wandb.Api().default_entity
    if not entity:
        sys.exit("deltatron-dashboard: no wandb entity: pass --entity or log in (wandb login)")
    base = ws.Workspace.from_url(args.url) if args.url else None
    workspace = build_workspace(args.project, entity, args.name, base).save()  # the network call
    print(f"deltatron-dashboard: {workspace.url}")


if __name__ == "__main__":
    main()
