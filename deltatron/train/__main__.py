"""`python -m deltatron.train [overrides...]` (also the `deltatron-train` console script)."""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig, OmegaConf

from deltatron.train.config import RunConfig, register_configs


def conf_dir() -> str:
    """The repo's conf/ directory (or $DELTATRON_CONF)."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.environ.get("DELTATRON_CONF", os.path.normpath(os.path.join(here, "..", "..", "conf")))


def to_run_config(cfg: DictConfig) -> tuple[RunConfig, dict]:
    """Typed config objects (running every schema's checks) and the plain resolved dict."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    try:
        run = OmegaConf.to_object(cfg)
    except Exception as exc:  # OmegaConf wraps our ValueError from __post_init__
        cause = exc.__cause__ or exc
        raise SystemExit(f"deltatron: invalid configuration: {cause}") from None
    return run, resolved


def main(cfg: DictConfig) -> None:
    from deltatron.train.trainer import Trainer, describe_dry_run

    run, resolved = to_run_config(cfg)
    if run.train.dry_run:
        print(describe_dry_run(run, resolved))
        return
    history = Trainer(run, resolved).fit()
    if history["preempted"]:
        from deltatron.train.preemption import PREEMPTED_EXIT_CODE

        sys.exit(PREEMPTED_EXIT_CODE)  # saved; launch scripts requeue on this code


def cli() -> None:
    register_configs()
    hydra.main(version_base=None, config_path=conf_dir(), config_name="config")(main)()


if __name__ == "__main__":
    sys.exit(cli())
