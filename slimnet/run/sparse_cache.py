"""Train the sparse phase once per recipe and share it: a keyed, locked checkpoint cache.

Jobs of a threshold sweep differ only after the prune epoch, so the first job to need a recipe trains
its sparse phase and publishes the checkpoint taken at the end of epoch ``prune.epoch - 1``; every other
job resumes from it. The key hashes everything that determines the pre-prune training (data, model,
optimizer, sparsity, seed, prune epoch, trainer settings, slimnet's own source); ``fcntl.flock`` makes
jobs running in parallel wait for the one training a key instead of training it again, and the
checkpoint is copied in by rename, so nobody ever reads half of one.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from slimnet.engine.atomic import atomic_write

log = logging.getLogger(__name__)

# Settings that change what is logged or when training stops, not the sparse phase itself.
_TRAINER_IGNORED = {"max_epochs", "log_every_n_steps", "enable_model_summary", "limit_test_batches",
                    "num_sanity_val_steps", "enable_progress_bar"}


def code_version() -> str:
    """A hash of slimnet's Python source: a code change never reuses a stale sparse phase."""
    digest = hashlib.sha256()
    for path in sorted(Path(__file__).resolve().parents[1].rglob("*.py")):  # all of slimnet/
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def sparse_key(cfg: DictConfig) -> str:
    """The hash naming a sparse phase: equal keys train bit-identical sparse phases on the same machine."""
    recipe = {name: OmegaConf.to_container(cfg[name], resolve=True) for name in ("task", "data", "model", "optim")}
    recipe["data"].pop("num_workers", None)
    recipe["sparsity"] = {k: v for k, v in OmegaConf.to_container(cfg.sparsity, resolve=True).items()
                          if k != "finetune_lam"}  # what happens after the prune epoch is not the sparse phase
    recipe["trainer"] = {k: v for k, v in OmegaConf.to_container(cfg.trainer, resolve=True).items()
                         if k not in _TRAINER_IGNORED}
    recipe.update(seed=cfg.seed, prune_epoch=cfg.prune.epoch, code=code_version(),
                  scope=cfg.prune.get("scope"),  # which γ the sparse phase penalises (detection)
                  channels_last=bool(cfg.get("channels_last", False)))  # other summation order
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:20]


class SparseCache:
    """One entry: ``<root>/<key>/sparse.ckpt`` plus ``meta.json`` saying which run trained it."""

    def __init__(self, root: str | Path, key: str):
        self.dir = Path(root) / key
        self.key = key
        self.checkpoint = self.dir / "sparse.ckpt"
        self._lock = None

    def lookup_or_lock(self) -> Path | None:
        """The cached checkpoint if there is one; else take the key's lock (this job trains it).

        Blocks while another job holds the lock, i.e. is training this very sparse phase.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        lock = open(self.dir / ".lock", "w")
        fcntl.flock(lock, fcntl.LOCK_EX)
        if self.checkpoint.is_file():
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
            return self.checkpoint
        self._lock = lock
        return None

    def publish(self, checkpoint: Path, run_dir: Path) -> None:
        """Copy a finished sparse-phase checkpoint in (atomically), then let waiting jobs have it."""
        with open(checkpoint, "rb") as src:
            atomic_write(self.checkpoint, lambda f: shutil.copyfileobj(src, f))
        meta = {"trained_by": str(run_dir), "key": self.key}
        atomic_write(self.dir / "meta.json", lambda f: f.write(json.dumps(meta, indent=2)), binary=False)
        log.info("sparse phase %s published to %s", self.key, self.checkpoint)
        self.release()

    def release(self) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()
            self._lock = None

    def trained_by(self) -> str | None:
        meta = self.dir / "meta.json"
        return json.loads(meta.read_text()).get("trained_by") if meta.is_file() else None
