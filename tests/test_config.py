"""Config composition, validation errors, and the Flower run_config bridge."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from omegaconf import OmegaConf
from omegaconf.errors import ReadonlyConfigError

from fedtune import cli, config
from fedtune.config import ConfigError

GROUPS = [
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
    "tracker",
]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (config.conf_dir() / group).glob("*.yaml"))


def _required_values(group: str, option: str, tiny_bert_dir: Path, tmp_path: Path) -> list[str]:
    """Values the user must supply for options that point at their own files."""
    if (group, option) == ("model", "local"):
        return [f"model.path={tiny_bert_dir}"]
    if (group, option) == ("data", "local"):
        csv = tmp_path / "notes.csv"
        csv.write_text("text,label\nchest pain,cardio\nfever,infection\n")
        return [f"data.loader.path={csv}"]
    return []


@pytest.mark.parametrize("group, option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_config_option_composes_and_binds_to_its_signature(
    group: str, option: str, tiny_bert_dir: Path, tmp_path: Path
) -> None:
    cfg = config.compose([f"{group}={option}", *_required_values(group, option, tiny_bert_dir, tmp_path)])
    node = cfg[group]
    target = config._import_target(group, node._target_)
    parameters = inspect.signature(target).parameters
    assert all(key in parameters for key in node if not str(key).startswith("_"))


def test_defaults_describe_the_demo() -> None:
    cfg = config.compose()
    assert cfg.model.path == "builtin:minilm"
    assert cfg.model.pooling == "mean"  # as MiniLM was trained; its checkpoint's pooler is untrained
    assert cfg.data.loader._target_.endswith("icd10_chapters")
    assert cfg.partition._target_.endswith("DirichletPartitioner")
    assert cfg.federation.num_clients == 4
    assert cfg.partition.num_partitions == cfg.federation.num_clients  # interpolation resolved


def test_override_changes_the_value() -> None:
    cfg = config.compose(["federation.num_clients=8", "partition.alpha=0.3", "lora.r=4"])
    assert (cfg.federation.num_clients, cfg.partition.num_partitions, cfg.partition.alpha, cfg.lora.r) == (8, 8, 0.3, 4)


def test_unknown_key_is_named_with_a_suggestion() -> None:
    with pytest.raises(
        ConfigError, match=r"Unknown config key 'federation.num_client'.*Did you mean 'federation.num_clients'"
    ):
        config.compose(["federation.num_client=8"])


def test_added_key_that_the_component_does_not_take_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'lora.lora_alph'.*did you mean 'lora.lora_alpha'"):
        config.compose(["+lora.lora_alph=4"])


def test_unknown_group_option_lists_the_available_ones() -> None:
    with pytest.raises(ConfigError, match=r"Available partition options: .*dirichlet.*iid"):
        config.compose(["partition=zipf"])


@pytest.mark.parametrize(
    "override, key",
    [
        ("federation.fraction_train=1.5", "federation.fraction_train"),
        ("federation.min_train_clients=9", "federation.min_train_clients"),
        ("train.lr=-1", "train.lr"),
        ("train.lr_schedule=linear", "train.lr_schedule"),
        ("data.val_fraction=1.0", "data.val_fraction"),
        ("model.task=translation", "model.task"),
    ],
)
def test_bad_value_fails_before_any_work_and_names_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.compose([override])


def test_wrong_type_is_rejected() -> None:
    with pytest.raises(ConfigError):
        config.compose(["federation.num_clients=many"])


def test_missing_model_path_says_what_to_set() -> None:
    with pytest.raises(ConfigError, match=r"model\.path"):
        config.compose(["model=local"])


def test_nonexistent_model_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="never downloads"):
        config.compose(["model=local", f"model.path={tmp_path / 'nope'}"])


def test_run_config_round_trip_composes_the_identical_config(tmp_path: Path) -> None:
    overrides = ["federation.num_clients=3", "train.lr=0.01", "lora.target_modules=[query,key,value]"]
    direct = config.compose([*overrides, f"run_dir={tmp_path}"])
    run_config = config.to_run_config(overrides, str(tmp_path))
    assert all(isinstance(v, str) for v in run_config.values())  # Flower's run_config holds flat scalars only
    via_flower = config.load_experiment(run_config)
    assert OmegaConf.to_yaml(via_flower) == OmegaConf.to_yaml(direct)
    assert config.experiment_hash(via_flower) == config.experiment_hash(direct)


def test_experiment_hash_ignores_bookkeeping_but_not_training_settings(tmp_path: Path) -> None:
    base = config.experiment_hash(config.compose([f"run_dir={tmp_path / 'a'}"]))
    assert config.experiment_hash(config.compose([f"run_dir={tmp_path / 'b'}", "resume=true"])) == base
    assert config.experiment_hash(config.compose([f"run_dir={tmp_path / 'a'}", "seed=1"])) != base


def test_sweeps_expand_to_the_cartesian_product() -> None:
    jobs = config.expand_sweeps(["lora.r=4,8", "seed=0,1", "train.lr=0.01"])
    assert sorted(map(tuple, jobs)) == sorted(
        [
            ("lora.r=4", "seed=0", "train.lr=0.01"),
            ("lora.r=4", "seed=1", "train.lr=0.01"),
            ("lora.r=8", "seed=0", "train.lr=0.01"),
            ("lora.r=8", "seed=1", "train.lr=0.01"),
        ]
    )


def test_composed_config_is_read_only() -> None:
    cfg = config.compose()
    with pytest.raises(ReadonlyConfigError):
        cfg.seed = 3


def test_model_and_data_of_different_tasks_fail_at_start(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert cli.main(["run", "model=smollm2", "data=icd10", f"run_dir={tmp_path}"]) == 2
    assert "model=minilm data=icd10 or model=smollm2 data=icd10_instructions" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing was started


def test_a_local_file_is_read_for_the_model_s_task_unless_told_otherwise(tmp_path: Path) -> None:
    notes = ["model=smollm2", "model.task=plain_text", "data=local", f"data.loader.path={tmp_path / 'notes.csv'}"]
    assert config.compose(notes).data.loader.task == "plain_text"
    assert config.compose([*notes, "data.loader.task=causal_lm"]).data.loader.task == "causal_lm"


def test_natural_partitions_must_match_the_number_of_clients(
    tiny_bert_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    csv = tmp_path / "notes.csv"
    csv.write_text("text,label,hospital\n" + "".join(f"note {i},{i % 2},h{i % 3}\n" for i in range(30)))
    args = ["run", "model=local", f"model.path={tiny_bert_dir}", "data=local", f"data.loader.path={csv}", "partition=natural",
            "partition.partition_by=hospital", "federation.num_clients=4", f"run_dir={tmp_path / 'run'}"]  # fmt: skip
    assert cli.main(args) == 2
    assert "set federation.num_clients=3" in capsys.readouterr().err


@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_overlay_composes(name: str) -> None:
    cfg = config.compose([f"experiment={name}"])
    assert cfg != config.compose()  # an overlay changes something
