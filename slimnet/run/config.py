"""Check a composed run config before any data is read or any epoch is trained.

Every mistake detectable from the config alone is reported here, in one line that names the key and
the fix, so a typo never costs hours of sparse training first.
"""

from __future__ import annotations

import difflib
import functools
import inspect
import math
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from slimnet.engine.latency_budget import check_latency_options
from slimnet.errors import ConfigError, first_line
from slimnet.locate import TargetImportError, locate, unknown_keywords
from slimnet.models.build import DATA_ARGS
from slimnet.sparsity.step import KINDS
from slimnet.tasks.plugin import TaskPlugin

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"  # the repository's conf/, beside slimnet/
# Groups whose keys are slimnet's own: any key that none of the group's files in conf/ has is a typo.
_OWN_GROUPS = ("prune", "sparsity", "optim", "callbacks", "logger")
# Keys of train.yaml itself, nested ones included (finetune.*, latency.*).
_OWN_SECTIONS = ("finetune", "latency")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pruning_enabled(cfg: DictConfig) -> bool:
    p = cfg.prune
    return p.epoch is not None and any(p.get(k) is not None for k in ("thresh", "percent", "target_flops", "target_latency"))


@functools.cache
def _known_keys(group: str) -> frozenset[str]:
    """Every key any option of config group ``group`` (``conf/<group>/*.yaml``) sets, nested keys dotted."""
    keys: set[str] = set()
    for path in sorted((CONF_DIR / group).glob("*.yaml")):
        keys |= _flat_keys(OmegaConf.to_container(OmegaConf.load(path)))
    return frozenset(keys)


@functools.cache
def _train_yaml_keys() -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml"))


def _flat_keys(tree, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in (tree or {}).items():
        if key == "defaults":
            continue
        keys.add(prefix + str(key))
        if isinstance(value, dict):
            keys |= _flat_keys(value, f"{prefix}{key}.")
    return keys


def _typo(where: str, key: str, known) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f" (did you mean {where}.{close[0]}?)" if close else ""
    return ConfigError(f"{where}.{key} is not a setting{hint}; known keys of {where}: {', '.join(sorted(known))}")


def _check_own_keys(cfg: DictConfig) -> None:
    """Misspelt keys (``+prune.tresh=0.2``) fail here, before any data is read."""
    for group in _OWN_GROUPS:
        known = _known_keys(group)
        if not known or group not in cfg:
            continue
        for key in _flat_keys(OmegaConf.to_container(cfg[group])):
            if key not in known:
                raise _typo(group, key, known)
    train_keys = _train_yaml_keys()
    for section in _OWN_SECTIONS:
        known = set(train_keys.get(section) or {})
        for key in (cfg.get(section) or {}):
            if key not in known:
                raise _typo(section, key, known)
    top = set(train_keys) - {"defaults"} | {"data", "model", "task", "experiment", "hydra", *_OWN_GROUPS, "trainer"}
    for key in cfg:
        if key not in top:
            raise ConfigError(f"{key} is not a setting (did you mean "
                              f"{(difflib.get_close_matches(key, list(top), n=1) or ['one of ' + ', '.join(sorted(top))])[0]}?)")


def _check_call(where: str, fn, given, what: str) -> None:
    unknown = unknown_keywords(fn, given)
    if unknown:
        known = [n for n in inspect.signature(fn).parameters if n not in ("self", "args", "kwargs")]
        raise _typo(where, unknown[0], known) if known else ConfigError(
            f"{where}.{unknown[0]} is not an argument of {what}")


def _check_target(where: str, section: DictConfig, skip=()) -> None:
    try:
        fn = locate(section._target_)
    except TargetImportError as err:
        raise ConfigError(f"{where}._target_: {err}") from None
    _check_call(where, fn, [k for k in section if k not in ("_target_", *skip)], section._target_)


def check_model_and_data(cfg: DictConfig) -> None:
    """The model and data keys are the arguments of what they build (``_target_``): check them against its
    signature."""
    for where in ("data", "model"):
        section = cfg[where]
        if OmegaConf.is_missing(section, "_target_"):  # data=custom without data._target_=
            raise ConfigError(f"{where}=custom needs {where}._target_=<dotted path>, e.g. "
                              + ("data._target_=mypkg.data.MyDataModule" if where == "data"
                                 else "model._target_=mypkg.nets.TinyCNN"))
        if "_target_" not in section:
            old = next((k for k in ("arch", "name", "kind") if k in section), None)
            was = f" ({where}.{old} named it before slimnet 0.2)" if old else ""
            raise ConfigError(f"{where} has no _target_{was}; choose one with {where}=<name> (the files in "
                              f"conf/{where}/) or set {where}._target_=<dotted path of a callable>")
        _check_target(where, section, skip=DATA_ARGS if where == "model" else ())
    _check_call("trainer", pl.Trainer, list(cfg.trainer), "pytorch_lightning.Trainer")


def task_plugin(cfg: DictConfig) -> type[TaskPlugin]:
    """The run's task plug-in, ``task._target_`` (``task=classification`` or ``task=detection`` chooses one
    of conf/task/): the one place a run's task is read."""
    task = cfg.get("task")
    if not isinstance(task, DictConfig) or "_target_" not in task:
        raise ConfigError(f"task={task!r} is not a task config; choose one with task=<name> (the files in "
                          "conf/task/: classification, detection) or task._target_=<a TaskPlugin subclass>")
    try:
        cls = locate(task._target_)
    except TargetImportError as err:
        raise ConfigError(f"task._target_: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, TaskPlugin)):
        raise ConfigError(f"task._target_={task._target_} is not a slimnet.tasks.plugin.TaskPlugin subclass")
    return cls


def check_group_choices(overrides: list[str], conf_dir: str | Path = CONF_DIR) -> None:
    """``model=resnet99``: an option no config group has fails in one line listing the group's options.

    Hydra's own message for it is 19 lines (the search path, no fix); this runs on the command line's
    overrides before Hydra composes them. Overrides Hydra cannot parse, and sweeps other than a plain
    list (``glob(…)``, ``range(…)``), are left to Hydra to report.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep
    from hydra.errors import HydraException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException:
        return
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        loader = GlobalHydra.instance().config_loader()
        for override in parsed:
            options = loader.get_group_options(override.key_or_group) if not override.is_delete() else []
            if not options:  # a key (prune.epoch=…), not a config group
                continue
            value = override.value()
            if isinstance(value, ChoiceSweep):
                chosen = list(override.sweep_string_iterator())
            elif override.is_sweep_override():
                continue
            else:
                chosen = value if isinstance(value, list) else [value]
            for choice in chosen:
                if isinstance(choice, str) and choice not in options:
                    raise _unknown_choice(override.key_or_group, choice, options)


def _unknown_choice(group: str, choice: str, options: list[str]) -> ConfigError:
    close = difflib.get_close_matches(choice, options, n=1)
    hint = f" (did you mean {group}={close[0]}?)" if close else ""
    own = f"; your own: {group}=custom {group}._target_=<your class>" if "custom" in options else ""
    return ConfigError(f"{group}={choice} is not a config of {group}{hint}; choose one of: "
                       f"{', '.join(options)}{own}")

def cut_policy(p: DictConfig) -> dict:
    """The one policy a run's ``prune`` config cuts by: thresh or target_flops (when given) win over the
    default percent."""
    for key in ("thresh", "target_flops", "target_latency", "percent"):
        if p.get(key) is not None:
            if key == "target_latency":  # the table and how it is measured go with it
                return {key: p[key], "latency_table": p.get("latency_table"),
                        "latency_settings": OmegaConf.to_container(p.latency, resolve=True) if p.get("latency") else None}
            return {key: p[key]}
    return {}


def validate(cfg: DictConfig) -> None:
    """Raise ``ConfigError`` on the first problem found."""
    p = cfg.prune
    _check_own_keys(cfg)
    plugin = task_plugin(cfg)
    check_model_and_data(cfg)
    plugin.check(cfg)
    if p.thresh is not None and p.thresh != "auto" and (not _number(p.thresh) or math.isnan(p.thresh) or p.thresh < 0):
        raise ConfigError(f"prune.thresh={p.thresh} must be a number >= 0 (an absolute |γ| threshold) or auto (each "
                          "layer at the valley of its own |γ| histogram)")
    if p.percent is not None and (not _number(p.percent) or not 0 <= p.percent < 1):
        raise ConfigError(f"prune.percent={p.percent} must be in [0, 1) (the fraction of channels pruned)")
    if p.get("target_flops") is not None:
        if p.thresh is not None:
            raise ConfigError("prune.thresh and prune.target_flops are both set; keep one of them")
        if not _number(p.target_flops) or not 0 < p.target_flops <= 1:
            raise ConfigError(f"prune.target_flops={p.target_flops} must be in (0, 1] (the fraction of FLOPs kept)")
    if p.get("target_latency") is not None:
        if p.thresh is not None or p.get("target_flops") is not None:
            raise ConfigError("prune.target_latency and prune.thresh / prune.target_flops are both set; keep one of them")
        try:  # the target, the settings and a way to measure: before any epoch is trained
            check_latency_options(p.target_latency, p.get("latency_table"),
                                  OmegaConf.to_container(p.latency, resolve=True) if p.get("latency") else None)
        except ValueError as err:
            raise ConfigError(f"prune.{first_line(err)}") from None
    max_epochs = cfg.trainer.max_epochs
    if max_epochs is not None and max_epochs != -1 and (not isinstance(max_epochs, int) or max_epochs < 1):
        raise ConfigError(f"trainer.max_epochs={max_epochs} trains nothing; set it to 1 or more "
                          "(or -1 with trainer.max_steps)")
    if p.epoch is not None:
        if not isinstance(p.epoch, int) or p.epoch < 0:
            raise ConfigError(f"prune.epoch={p.epoch} must be an integer >= 0")
        if max_epochs is not None and max_epochs >= 0 and p.epoch >= max_epochs:
            raise ConfigError(f"prune.epoch={p.epoch} must be < trainer.max_epochs={max_epochs}, "
                              "or the model is never cut; lower prune.epoch or raise trainer.max_epochs")
    f = cfg.finetune
    if f.get("distill"):
        if not pruning_enabled(cfg):
            raise ConfigError("finetune.distill=true needs a cut to distil into (prune.epoch and a policy); "
                              "set finetune.distill=false or configure prune")
        if not (_number(f.distill_temperature) and f.distill_temperature > 0):
            raise ConfigError(f"finetune.distill_temperature={f.distill_temperature} must be > 0")
        if not (_number(f.distill_weight) and 0 <= f.distill_weight <= 1):
            raise ConfigError(f"finetune.distill_weight={f.distill_weight} must be in [0, 1]")
    if p.min_channels < 1:
        raise ConfigError(f"prune.min_channels={p.min_channels} must be >= 1 (a layer with no channel is dead)")
    if p.round_to < 1:
        raise ConfigError(f"prune.round_to={p.round_to} must be >= 1")
    for key in ("lam", "finetune_lam"):
        value = cfg.sparsity[key]
        if not _number(value) or math.isnan(value) or value < 0:
            raise ConfigError(f"sparsity.{key}={value} must be a number >= 0")
    kind = cfg.sparsity.get("kind", "l1")
    if kind not in KINDS:
        raise ConfigError(f"sparsity.kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}")
    target = cfg.sparsity.get("target")
    if target is not None and (not _number(target) or not 0 < target < 1):
        raise ConfigError(f"sparsity.target={target} must be in (0, 1): the share of BatchNorm channels to drive "
                          "below sparsity.eps by the prune epoch (null: keep λ fixed)")
    if target is not None and not cfg.sparsity.lam > 0:
        raise ConfigError("sparsity.target needs sparsity.lam > 0 to start the λ controller from")
    if kind == "polarization" and not (_number(cfg.sparsity.t) and cfg.sparsity.t > 0
                                       and _number(cfg.sparsity.bound) and cfg.sparsity.bound > 0):
        raise ConfigError("sparsity.t and sparsity.bound must be > 0 for polarization")
