"""Command line: ``python -m slimnet.train [overrides]`` (Hydra).

    python -m slimnet.train                                  # default run, Fashion-MNIST, offline
    python -m slimnet.train +prune.thresh=0.2                # absolute |γ| threshold
    python -m slimnet.train -m +prune.thresh=0.05,0.1,0.2    # a sweep
    tensorboard --logdir outputs
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from slimnet.pipeline import train


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    results = train(cfg, HydraConfig.get().runtime.output_dir)
    return results["test_acc"]  # what a Hydra sweeper would optimise


if __name__ == "__main__":
    main()
