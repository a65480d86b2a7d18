"""Command line: ``python -m slimnet.train [overrides]`` (Hydra).

    python -m slimnet.train                                  # default run, Fashion-MNIST, offline
    python -m slimnet.train +prune.thresh=0.2                # absolute |γ| threshold
    python -m slimnet.train -m +prune.thresh=0.05,0.1,0.2    # a sweep: sweep.csv + acc_vs_flops.png
    python -m slimnet.train resume=outputs/2026-11-22/10-00-00   # resume that run where it stopped
    tensorboard --logdir outputs
"""

from __future__ import annotations

import logging
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from slimnet.pipeline import USER_ERRORS, record_failure, resumed_config, train

log = logging.getLogger("slimnet")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        if cfg.get("resume"):
            cfg, run_dir = resumed_config(cfg.resume)
        results = train(cfg, run_dir)
        return results.get("test_acc", results.get("test_map"))  # what a Hydra sweeper would optimise
    except Exception as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One failing job must not sink the sweep: record it, let the others run.
            log.exception("job failed; recorded in results.json, the sweep goes on")
            record_failure(run_dir, err)
            return None
        if isinstance(err, USER_ERRORS):  # our one-line messages: no traceback to wade through
            log.error("%s: %s", type(err).__name__, err)
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
