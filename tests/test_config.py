import dataclasses
import tomllib

import pytest

from fedhf.config.schema import (
    SPECS,
    FedHFConfig,
    default_flat,
    flatten,
    load_config_file,
    parse_config,
    parse_set_args,
)
from fedhf.errors import FedHFConfigError

from .conftest import REPO


def pyproject_config() -> dict:
    with (REPO / "pyproject.toml").open("rb") as fh:
        return flatten(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def test_pyproject_defaults_equal_code_defaults():
    schema = pyproject_config()
    code = default_flat()
    assert set(schema) == set(code), (
        f"keys only in pyproject: {set(schema) - set(code)}, only in code: {set(code) - set(schema)}"
    )
    for key, value in code.items():
        assert schema[key] == value, key
        assert type(schema[key]) is type(value), (
            f"{key}: pyproject {type(schema[key]).__name__}, code {type(value).__name__}"
        )


def test_issue_keys_exist():
    keys = {s.key for s in SPECS}
    for key in (
        "num-server-rounds",
        "seed",
        "output-dir",
        "data.dataset",
        "data.partitioner",
        "data.max-length",
        "model.name",
        "model.lora.r",
        "train.local-epochs",
        "train.batch-size",
        "train.lr",
        "strategy.name",
    ):
        assert key in keys


def test_defaults_and_overrides_land_in_the_typed_tree():
    cfg = parse_config({"num-server-rounds": 2, "model.lora.r": 4, "train.lr": 1, "data.dataset": "ag_news"})
    assert cfg.num_server_rounds == 2
    assert cfg.model.lora.r == 4
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.data.dataset == "ag_news"
    assert cfg.output_dir == "outputs"
    assert cfg.target_modules == ["query", "value"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]


def test_to_flat_round_trips():
    cfg = parse_config({"strategy.name": "fedprox", "data.dirichlet-alpha": 0.1})
    assert parse_config(cfg.to_flat()) == cfg


@pytest.mark.parametrize(
    ("flat", "needle"),
    [
        ({"num-server-round": 2}, "unknown config key 'num-server-round'. Did you mean 'num-server-rounds'?"),
        ({"model.lora.r": "eight"}, "config key 'model.lora.r': got 'eight'"),
        ({"model.lora.r": 2.5}, "config key 'model.lora.r': got 2.5"),
        ({"train.lr": True}, "config key 'train.lr': got True"),
        ({"num-server-rounds": 0}, "config key 'num-server-rounds': got 0; it must be >= 1"),
        ({"data.dirichlet-alpha": 0.0}, "config key 'data.dirichlet-alpha': got 0.0; it must be > 0"),
        ({"data.dirichlet-alpha": -1}, "config key 'data.dirichlet-alpha': got -1.0; it must be > 0"),
        (
            {"strategy.name": "fedsgd"},
            "config key 'strategy.name': got 'fedsgd'; allowed: fedavg, fedprox, fedadam, fedyogi",
        ),
        ({"data.partitioner": "dirichet"}, "Did you mean 'dirichlet'?"),
        ({"strategy.fraction-train": 1.5}, "config key 'strategy.fraction-train': got 1.5; it must be <= 1"),
        ({"model.lora.target-modules": " , "}, "config key 'model.lora.target-modules'"),
        ({"strategy.min-train-nodes": 5}, "config key 'strategy.min-train-nodes': got 5"),
        ({"strategy.central-eval-every": 0}, "config key 'strategy.central-eval-every': got 0; it must be >= 1"),
    ],
)
def test_bad_values_name_key_value_and_fix(flat, needle):
    with pytest.raises(FedHFConfigError) as err:
        parse_config(flat)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_set_args_parse_like_toml_values():
    flat = parse_set_args(
        [
            "num-server-rounds=2",
            "data.dataset=sst2",
            "output-dir=/some/dir",
            "train.lr=5e-4",
            "model.lora.target-modules=query,key,value",
            'run-name="a b"',
        ]
    )
    assert flat == {
        "num-server-rounds": 2,
        "data.dataset": "sst2",
        "output-dir": "/some/dir",
        "train.lr": 5e-4,
        "model.lora.target-modules": "query,key,value",
        "run-name": "a b",
    }
    cfg = parse_config(flat)
    assert cfg.output_dir == "/some/dir" and cfg.num_server_rounds == 2
    with pytest.raises(FedHFConfigError, match="expected KEY=VALUE"):
        parse_set_args(["num-server-rounds"])
    with pytest.raises(FedHFConfigError, match="unknown config key 'rounds'"):
        parse_set_args(["rounds=3"])


def test_config_file_with_tables_and_dotted_keys(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text(
        'num-server-rounds = 4\n[data]\npartitioner = "dirichlet"\ndirichlet-alpha = 0.3\n[model.lora]\nr = 16\n'
    )
    cfg = parse_config(load_config_file(f))
    assert (cfg.num_server_rounds, cfg.data.partitioner, cfg.data.dirichlet_alpha, cfg.model.lora.r) == (
        4,
        "dirichlet",
        0.3,
        16,
    )
    with pytest.raises(FedHFConfigError, match="no such file"):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("num-server-rounds = = 3")
    with pytest.raises(FedHFConfigError, match="not valid TOML"):
        load_config_file(bad)


def test_experiment_files_parse():
    for f in sorted((REPO / "experiments").glob("*.toml")):
        assert isinstance(parse_config(load_config_file(f)), FedHFConfig), f.name


def test_training_keys_left_to_auto_take_dp_defaults_only_under_sample_level_dp():
    """Private defaults that learn: FFA-LoRA r 2, mean pooling, SGD lr 2.0 decaying linearly over the rounds, batch
    64, 4 local epochs under sample-level DP; today's defaults otherwise; a key set explicitly keeps its value (and a
    learning rate keeps AdamW and a constant rate)."""
    from fedhf.config.schema import dp_defaults_in_force

    def training(cfg):
        m, t = cfg.model, cfg.train
        return (
            m.adapter,
            m.pooling,
            m.lora.r,
            m.lora.alpha,
            t.optimizer,
            t.lr,
            t.batch_size,
            t.local_epochs,
            t.lr_schedule,
        )

    plain = ("lora", "cls", 8, 16, "adamw", 0.001, 16, 2, "constant")
    assert training(parse_config({})) == plain
    assert training(parse_config({"privacy.mode": "client"})) == plain
    for mode in ("sample", "both"):
        cfg = parse_config({"privacy.mode": mode})
        assert training(cfg) == ("ffa-lora", "mean", 2, 4, "sgd", 2.0, 64, 4, "linear")
        assert parse_config(cfg.to_flat()) == cfg  # resolved once: the clients parse the same config
        assert list(dp_defaults_in_force(cfg.to_flat())) == [
            "model.adapter",
            "model.pooling",
            "model.lora.r",
            "train.optimizer",
            "train.lr",
            "train.batch-size",
            "train.local-epochs",
            "train.lr-schedule",
        ]
    mine = parse_config(
        {
            "privacy.mode": "sample",
            "model.adapter": "lora",
            "train.batch-size": 16,
            "model.lora.r": 8,
            "train.local-epochs": 1,
            "train.lr-schedule": "cosine",
        }
    )
    assert training(mine) == ("lora", "mean", 8, 16, "sgd", 2.0, 16, 1, "cosine")
    assert list(dp_defaults_in_force(mine.to_flat())) == ["model.pooling", "train.optimizer", "train.lr"]
    own_lr = parse_config({"privacy.mode": "sample", "train.lr": 0.003, "model.lora.alpha": 32})
    assert training(own_lr) == ("ffa-lora", "mean", 2, 32, "adamw", 0.003, 64, 4, "constant")
    # svd aggregation keeps LoRA and its rank (the nodes' ranks are measured against it)
    svd = parse_config({"privacy.mode": "sample", "strategy.lora-aggregation": "svd"})
    assert training(svd)[:4] == ("lora", "mean", 8, 16)
    assert parse_config({"privacy.mode": "sample", "train.lr": "", "model.pooling": "auto"}).train.lr == 2.0
    assert parse_config({"privacy.mode": "sample", "train.lr-schedule": "auto"}).train.lr_schedule == "linear"
    assert dp_defaults_in_force(parse_config({}).to_flat()) == {}
