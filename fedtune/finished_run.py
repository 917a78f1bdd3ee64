"""A run's final adapter on this machine's copy of its base model: what ``fedtune evaluate``, ``export`` and
``predict`` load.

The run's saved config says what was trained (base model, LoRA, task, label names); only where this machine
keeps the base model may differ. The adapter is used only with the base model it was trained on: the run's
checkpoints carry the experiment hash, which holds a fingerprint of the model's files
(fedtune/model_fingerprint.py), so a copy of other weights is refused. Nothing is written to the run
directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from fedtune import config
from fedtune.adapters import set_adapter
from fedtune.experiment import Experiment, get_experiment
from fedtune.run_dir import Checkpoint, RunDir


@dataclass(frozen=True)
class FinishedRun:
    """A run's final adapter, checked against the base model here.

    Attributes:
        path: The run directory.
        cfg: The run's saved config (read-only), with ``model.path`` where this machine keeps the base model.
        experiment: The experiment that config composes here.
        checkpoint: The run's last checkpoint, whose adapter is the final one.
    """

    path: Path
    cfg: DictConfig
    experiment: Experiment
    checkpoint: Checkpoint

    @property
    def label_names(self) -> tuple[str, ...] | None:
        """The run's class names (None for a causal LM): from its config (set for deployments), else from its
        data (a built-in corpus, or the run's own file where this machine has it).

        Raises:
            ConfigError: Neither is available here.
        """
        if self.experiment.model_spec.task != "classification":
            return None
        try:
            return tuple(self.experiment.label_names or ())
        except (OSError, ValueError) as error:  # the run's file is on the server's machine
            raise config.ConfigError(
                "the run's class names are neither in its config.yaml (data.loader.label_names) nor readable from "
                f"its data here ({error}); use the run where its data is, or rerun with data.loader.label_names set."
            ) from error

    def model(self) -> PeftModel:
        """The base model with the final adapter, in evaluation mode. It is the process's cached model
        (:meth:`fedtune.experiment.Experiment.model`): copy it before changing more than its adapter.

        Raises:
            ConfigError: A classifier's class names are not available here (:attr:`label_names`).
        """
        self.label_names  # noqa: B018 - a classifier's head is sized by them: say so cleanly where they are missing
        model = self.experiment.model()
        set_adapter(model, self.checkpoint.adapter)
        return model.eval()


def load_run(run_dir: Path, model_path: str | None = None, setting: str = "model.path=...") -> FinishedRun:
    """The final adapter of ``run_dir``, on the base model at ``model_path`` (default: where the run's config
    says). ``setting`` is how the user gives ``model_path`` to the command, for the messages.

    Raises:
        ConfigError: ``run_dir`` is not a run directory, has no (decrypted) checkpoint, or the base model here
            is missing or is not the one the adapter was trained on.
    """
    trained = _saved_config(run_dir, model_path)
    try:
        config.instantiate(trained.model)  # the base model is here (a directory with config.json)
        run = get_experiment(trained)
        run_hash = run.hash
    except (ValueError, OSError, InstantiationException) as error:
        cause = error.__cause__ or error  # Hydra wraps the model spec's own message
        raise config.ConfigError(f"{cause} Set {setting} to this machine's copy of the run's base model.") from error
    checkpoint = _last_checkpoint(run_dir)
    if checkpoint.experiment_hash != run_hash:
        raise config.ConfigError(
            f"{run_dir}'s adapter was trained on another base model than the files at model.path="
            f"{trained.model.path} ({run.base_model[:23]}...), or by a fedtune version that composes its config "
            f"differently. Set {setting} to a copy of the run's base model (its model card names the fingerprint)."
        )
    return FinishedRun(run_dir, trained, run, checkpoint)


def _saved_config(run_dir: Path, model_path: str | None) -> DictConfig:
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise config.ConfigError(f"{run_dir} is not a run directory (no config.yaml).")
    cfg = OmegaConf.load(saved)
    assert isinstance(cfg, DictConfig)
    if model_path is not None:
        cfg.model.path = model_path
    OmegaConf.set_readonly(cfg, True)
    return cfg


def _last_checkpoint(run_dir: Path) -> Checkpoint:
    runs = RunDir(run_dir)
    folder, checkpoints = runs.checkpoints, runs.checkpoint_paths()
    if not checkpoints:
        encrypted = any(folder.glob("round-*.pt.enc"))
        raise config.ConfigError(
            f"{folder} holds only encrypted checkpoints: `fedtune decrypt {folder} --key-file ...` first."
            if encrypted
            else f"{run_dir} has no adapter yet: no round has finished (no checkpoint in {folder})."
        )
    return RunDir.read_checkpoint(checkpoints[-1])
