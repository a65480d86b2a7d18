"""Command line: ``python -m slimnet.train [overrides]`` (Hydra).

    python -m slimnet.train                                  # default run, Fashion-MNIST, offline
    python -m slimnet.train +prune.thresh=0.2                # absolute |γ| threshold
    python -m slimnet.train -m +prune.thresh=0.05,0.1,0.2    # a sweep
    python -m slimnet.train resume=outputs/2026-11-22/10-00-00   # resume that run where it stopped
    tensorboard --logdir outputs
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from slimnet.pipeline import USER_ERRORS, resumed_config, train

log = logging.getLogger("slimnet")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = HydraConfig.get().runtime.output_dir
    try:
        if cfg.get("resume"):
            cfg, run_dir = resumed_config(cfg.resume)
        results = train(cfg, run_dir)
    except USER_ERRORS as err:  # our own one-line messages: no traceback to wade through
        log.error("%s: %s", type(err).__name__, err)
        sys.exit(1)
    return results["test_acc"]  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
