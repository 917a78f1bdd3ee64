"""Experiment configuration: Hydra composition, validation, and the bridge to Flower's run_config.

This is the only module that imports Hydra. Every Flower app (server and client, simulation and
deployment) obtains its config through :func:`load_experiment`, so all sides compose the same thing.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import importlib
import inspect
import itertools
import re
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import ConfigCompositionException, InstantiationException, MissingConfigException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, ListConfig, OmegaConf

from fedtune import model_fingerprint
from fedtune.errors import DataError

# run_config keys (Flower's wire format: flat scalars, hyphenated names).
OVERRIDES_KEY = "overrides"
RUN_DIR_KEY = "run-dir"

# Keys that only steer the server's bookkeeping; they do not change what is trained.
_BOOKKEEPING_KEYS = ("run_dir", "resume", "tracker")
# Top-level groups built at validation time so that their own value checks run. All of them are cheap:
# the model and the data loader are descriptions here and are only loaded later.
_COMPONENTS = (
    "model",
    "data",
    "partition",
    "lora",
    "strategy",
    "privacy",
    "secure",
    "federation",
    "train",
    "attack",
    "contribution",
    "tracker",
)
# contribution=none is left out of the experiment hash, so that the hashes that nodes pinned and keyed their
# records on before contribution accounting existed still name the same experiments.
_NO_CONTRIBUTION = "fedtune.contribution.NoContribution"
_HYDRA_KEYS = {"_target_", "_recursive_", "_convert_", "_partial_", "_args_"}


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it and says how to fix it."""


def conf_dir() -> Path:
    """Return the ``conf/`` directory, from an installed wheel or from a source tree / Flower app bundle."""
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "conf", package_dir.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"fedtune's conf/ directory was not found next to {package_dir}; reinstall fedtune.")


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """Compose ``conf/config.yaml`` with Hydra overrides, resolve interpolations, and validate.

    Args:
        overrides: Hydra override strings such as ``"model=smollm2"`` or ``"federation.num_clients=8"``.

    Returns:
        The resolved, validated config (read-only).

    Raises:
        ConfigError: An override names an unknown key or group option, or a value is invalid.
    """
    overrides = list(overrides)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=overrides)
    except (ConfigCompositionException, MissingConfigException) as error:
        raise ConfigError(_explain_composition_error(error, overrides)) from error
    OmegaConf.resolve(cfg)
    validate(cfg)
    OmegaConf.set_readonly(cfg, True)
    return cfg


def validate(cfg: DictConfig) -> None:
    """Check every component node against its constructor signature, then build the cheap ones.

    Building runs each component's own value checks (a negative learning rate, an unknown LoRA option,
    a Dirichlet alpha of zero...), so bad values fail before any data or model is loaded.

    Raises:
        ConfigError: Naming the key, what is wrong, and the fix.
    """
    missing = OmegaConf.missing_keys(cfg)
    if missing:
        keys = ", ".join(sorted(missing))
        raise ConfigError(
            f"Config value(s) required but not set: {keys}. Set them on the command line, e.g. {sorted(missing)[0]}=..."
        )
    for path, node in _component_nodes(cfg):
        _bind_signature(path, node)
    for name in _COMPONENTS:
        try:
            instantiate(cfg[name])
        except ConfigError:
            raise
        except (TypeError, ValueError, InstantiationException) as error:
            cause = error.__cause__ or error  # Hydra wraps the component's own message
            raise ConfigError(f"Invalid value in config group '{name}': {cause}") from error


def instantiate(node: DictConfig, **kwargs: Any) -> Any:
    """Build the object a config node describes (``_target_`` + arguments).

    Raises:
        DataError: The object's data could not be used (raised as is, not wrapped in Hydra's error).
    """
    try:
        return hydra_instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, DataError):
            cause.__suppress_context__ = True  # the data's own error, once, not twice
            raise cause  # noqa: B904 - the cause itself, with its own traceback
        raise


def load_experiment(
    run_config: Mapping[str, Any], model_path: str | None = None, device: str | None = None
) -> DictConfig:
    """Compose the experiment a Flower run_config describes; both the ServerApp and the ClientApp call this.

    Args:
        run_config: Flower's run_config (or the same keys passed in-process by ``fedtune run``):
            ``overrides`` holds the Hydra overrides as one shell-quoted string, ``run-dir`` the run directory.
        model_path: Where this node keeps its copy of the base model (node config ``model-path``), in place of
            the run's ``model.path``; the experiment hash holds the files' fingerprint, not the path, so a copy
            of the same files composes the same experiment.
        device: Where this node trains (node config ``device``: auto, cpu, cuda or cuda:N), in place of the
            run's ``train.device``; like the path, it is not part of the experiment hash.

    Raises:
        ConfigError: A node setting cannot be written as an override (a quote, a backslash, an interpolation),
            or names no device.
    """
    for setting, value in (("model-path", model_path), ("device", device)):
        if value is not None and any(c in value for c in ("'", "\\", "${")):
            raise ConfigError(f"node config {setting}={value!r}: a value without quotes, backslashes or '${{', please.")
    run_dir = str(run_config.get(RUN_DIR_KEY, ""))
    return _load(str(run_config.get(OVERRIDES_KEY, "")), run_dir, model_path, device)


@functools.lru_cache(maxsize=8)
def _load(overrides: str, run_dir: str, model_path: str | None, device: str | None) -> DictConfig:
    # Cached: a client handles several messages per round, and composing costs about 0.07 s each time.
    words = shlex.split(overrides)
    if run_dir:
        words.append(f"run_dir={run_dir}")
    if model_path is not None:
        words.append(f"model.path='{model_path}'")
    if device is not None:
        words.append(f"train.device='{device}'")
    return compose(words)


def to_run_config(overrides: Sequence[str], run_dir: str) -> dict[str, str]:
    """The run_config that makes :func:`load_experiment` compose the same config as ``overrides``."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith("run_dir=")]
    return {OVERRIDES_KEY: shlex.join(kept), RUN_DIR_KEY: run_dir}


def experiment_hash(cfg: DictConfig) -> str:
    """SHA-256 of everything that determines training: bookkeeping keys such as run_dir and model.public_name
    (the name the exported adapter gives its base) and the device each node trains on excluded, and the base
    model by its content, not its path (fedtune/model_fingerprint.py), so that nodes holding copies of the
    same files at other paths agree and a node with other weights does not."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    for key in _BOOKKEEPING_KEYS:
        container.pop(key, None)
    if container.get("contribution", {}).get("_target_") == _NO_CONTRIBUTION:
        container.pop("contribution")
    container["model"]["path"] = model_fingerprint.model_identity(str(container["model"]["path"]))
    container["train"].pop("device")  # where a node trains, not what: under `auto` nodes differ already
    container["model"].pop("public_name", None)
    return hashlib.sha256(OmegaConf.to_yaml(OmegaConf.create(container)).encode()).hexdigest()


def to_yaml(cfg: DictConfig) -> str:
    """The resolved config as YAML, as saved in the run directory."""
    return OmegaConf.to_yaml(cfg, resolve=True)


def expand_sweeps(overrides: Sequence[str]) -> list[list[str]]:
    """Expand Hydra sweep syntax (``lora.r=4,8 seed=0,1``) into the list of single-run override lists."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    return [list(combination) for combination in itertools.product(*choices)]


def _component_nodes(node: Any, path: str = "") -> list[tuple[str, DictConfig]]:
    """All nodes that have a ``_target_``, with their dotted paths."""
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            found.append((path, node))
        for key in node:
            child_path = f"{path}.{key}" if path else str(key)
            found.extend(_component_nodes(node[key], child_path))
    elif isinstance(node, ListConfig):
        for index, item in enumerate(node):
            found.extend(_component_nodes(item, f"{path}[{index}]"))
    return found


def _bind_signature(path: str, node: DictConfig) -> None:
    """Raise ConfigError unless the node's keys are accepted by its target's signature."""
    target = _import_target(path, str(node["_target_"]))
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return  # a builtin without an introspectable signature: let the call itself check
    arguments = {str(k): None for k in node if str(k) not in _HYDRA_KEYS}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    valid = [name for name in signature.parameters if name not in ("self", "args", "kwargs")]
    for key in arguments:
        if key not in signature.parameters and not accepts_any:
            hint = difflib.get_close_matches(key, valid, n=1)
            fix = f"did you mean '{path}.{hint[0]}'?" if hint else f"valid keys: {', '.join(valid)}"
            raise ConfigError(f"Unknown config key '{path}.{key}' ({node['_target_']} has no such argument); {fix}")
    try:
        signature.bind_partial(**arguments)
    except TypeError as error:
        raise ConfigError(f"Config node '{path}' does not fit {node['_target_']}: {error}") from error
    required = [
        p.name
        for p in signature.parameters.values()
        if p.default is inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in arguments
        and p.name != "self"
    ]
    if required and str(node.get("_partial_", False)).lower() != "true":
        raise ConfigError(
            f"Config node '{path}' is missing required key(s) {required} for {node['_target_']}; set {path}.{required[0]}=..."
        )


def _import_target(path: str, dotted: str) -> Any:
    module_name, _, attribute = dotted.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ConfigError(
            f"'{path}._target_: {dotted}' cannot be imported ({error}); check the spelling or install the package that provides it."
        ) from error


def _explain_composition_error(error: Exception, overrides: Sequence[str]) -> str:
    """Turn Hydra's composition errors into a message that names the key and the fix."""
    message = str(error)
    unknown = re.search(r"Could not override '([^']+)'", message) or re.search(
        r"Key '([^']+)' (?:is not in struct|not in)", message
    )
    if unknown:
        key = unknown.group(1)
        group_choices = [o for o in overrides if "=" in o and "." not in o.split("=", 1)[0]]
        try:
            with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
                base = hydra_compose(
                    config_name="config", overrides=[o for o in group_choices if o.split("=")[0] != key]
                )
            known = _all_keys(base)
        except Exception:  # noqa: BLE001 - the suggestion is best-effort; the main message stands
            known = []
        hint = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
        fix = f"Did you mean '{hint[0]}'?" if hint else "Run `fedtune run --cfg` to list the keys."
        return f"Unknown config key '{key}'. {fix}"
    missing_option = re.search(r"Could not find '([^']+)'", message)
    if missing_option:
        group = missing_option.group(1).split("/")[0]
        options = sorted(p.stem for p in (conf_dir() / group).glob("*.yaml")) if (conf_dir() / group).is_dir() else []
        available = f" Available {group} options: {', '.join(options)}." if options else ""
        return f"Unknown config option '{missing_option.group(1)}'.{available}"
    return f"Invalid config override: {message}"


def _all_keys(cfg: DictConfig, prefix: str = "") -> list[str]:
    keys = []
    for key in cfg:
        path = f"{prefix}.{key}" if prefix else str(key)
        keys.append(path)
        value = cfg._get_node(key)
        if isinstance(value, DictConfig):
            keys.extend(_all_keys(value, path))
    return keys
