"""Command line: ``python -m slimnet.train [overrides]`` (Hydra).

    python -m slimnet.train experiment=quick                 # about two minutes: sparse, cut, fine-tune
    python -m slimnet.train                                  # default run, Fashion-MNIST, offline
    python -m slimnet.train +prune.thresh=0.2                # absolute |γ| threshold
    python -m slimnet.train -m +prune.thresh=0.05,0.1,0.2    # a sweep: sweep.csv + acc_vs_flops.png
    python -m slimnet.train resume=outputs/2026-11-22/10-00-00   # resume that run where it stopped
    tensorboard --logdir outputs

A user error (a config key, an unknown config such as ``model=resnet99``, missing data, a model that
cannot be traced) prints one line and exits with status 1; ``debug=true`` shows its traceback.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from slimnet.errors import USER_ERROR_TYPES
from slimnet.run.config import ConfigError, check_group_choices
from slimnet.run.console import quiet_third_party
from slimnet.run.interrupt import ResumeHint, resume_hint
from slimnet.run.pipeline import record_failure, resumed_config, train

log = logging.getLogger("slimnet")
_NOTHING_WRITTEN = {".hydra", "train.log", ".write-test"}  # what Hydra and the preflight leave before training


def _file_handlers_in(folder: Path) -> list[logging.FileHandler]:
    return [h for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and Path(h.baseFilename).parent == folder]


def _log_into(run_dir: Path, fresh_dir: Path) -> None:
    """A resumed run logs on into its own ``train.log``; the empty folder Hydra made for it goes."""
    for handler in _file_handlers_in(fresh_dir):
        moved = logging.FileHandler(run_dir / "train.log", mode="a")
        moved.setFormatter(handler.formatter)
        logging.getLogger().addHandler(moved)
        logging.getLogger().removeHandler(handler)
        handler.close()
    _remove_if_unused(fresh_dir)


def _remove_if_unused(folder: Path) -> None:
    """Drop a run folder that holds nothing but Hydra's own files (a run that failed before training)."""
    if folder.is_dir() and {p.name for p in folder.iterdir()} <= _NOTHING_WRITTEN:
        for handler in _file_handlers_in(folder):
            logging.getLogger().removeHandler(handler)
            handler.close()
        shutil.rmtree(folder, ignore_errors=True)
        if folder.parent.is_dir() and not any(folder.parent.iterdir()):  # the day's folder, if it was the only run
            folder.parent.rmdir()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    quiet_third_party()
    hydra_cfg = HydraConfig.get()
    fresh_dir = run_dir = Path(hydra_cfg.runtime.output_dir)
    debug = bool(cfg.get("debug"))
    try:
        if cfg.get("resume"):
            cfg, run_dir = resumed_config(cfg.resume)
            _log_into(run_dir, fresh_dir)
        results = train(cfg, run_dir, extra_callbacks=[ResumeHint(run_dir)])
        return results.get(results.get("metric"))  # the task's test metric: what a Hydra sweeper optimises
    except KeyboardInterrupt:  # outside the fit (Lightning handles it inside, with ResumeHint)
        log.warning("%s", resume_hint(run_dir))
        sys.exit(130)
    except Exception as err:
        if hydra_cfg.mode == RunMode.MULTIRUN:
            # One failing job must not sink the sweep: record it, let the others run.
            if isinstance(err, USER_ERROR_TYPES) and not debug:
                log.error("job failed (recorded in its results.json; the sweep goes on): %s", err)
            else:
                log.exception("job failed; recorded in results.json, the sweep goes on")
            record_failure(run_dir, err)
            return None
        if isinstance(err, USER_ERROR_TYPES) and not debug:  # our one-line messages: no traceback to wade through
            log.error("%s", err)
            _remove_if_unused(fresh_dir)
            sys.exit(1)
        raise


# Options that point Hydra at other config files: the check below knows only slimnet's conf/.
_OTHER_CONFIGS = ("-cp", "-cn", "-cd", "--config-path", "--config-name", "--config-dir", "-sc", "--shell-completion")


def _check_command_line(argv: list[str]) -> None:
    """An unknown option of a config group (``model=resnet99``) says so in one line, before Hydra composes."""
    if any(a.split("=")[0] in _OTHER_CONFIGS for a in argv) or any("hydra.searchpath" in a for a in argv):
        return
    try:
        check_group_choices([a for a in argv if not a.startswith("-") and "=" in a])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    _check_command_line(sys.argv[1:])
    main()
