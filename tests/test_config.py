"""Config files and `--config.a.b=v` overrides."""

import glob
import os

import pytest

from lsp_jax.errors import UserError
from lsp_jax.train import config as config_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load_and_pass_checks(path):
    from lsp_jax.train.run import check_config

    config = config_lib.load_config(path)
    if not config.model.source:  # The paper's configs need the user's model paths.
        with config.unlocked():
            config.model.source = "/path/to/model"
            config.reward.model = "/path/to/rm"
    check_config(config)


def test_paper_config_reads_n_and_g_as_documented():
    path = [p for p in CONFIGS if p.endswith("lsp_llama3_2_3b.py")][0]
    config = config_lib.load_config(path)
    assert (config.game.num_queries, config.game.answers_per_query) == (8, 4)
    assert config.loss.beta == 0.05 and config.optim.lr == 3e-6 and config.optim.grad_accum == 2
    grpo = config_lib.load_config(path + ":grpo")
    assert grpo.game.mode == "grpo" and grpo.optim.lr == 1e-6


def test_overrides_parse_to_the_type_of_the_key():
    config = config_lib.default_config()
    config_lib.apply_overrides(
        config,
        [
            "optim.lr=1e-6",
            "train.num_steps=7",
            "model.remat=true",
            "game.task=Pure & Applied Mathematics",
            "mesh.shape=(2,2,2)",
            "loss.beta=1",
        ],
    )
    assert config.optim.lr == 1e-6
    assert config.train.num_steps == 7
    assert config.model.remat is True
    assert config.game.task == "Pure & Applied Mathematics"
    assert tuple(config.mesh.shape) == (2, 2, 2)
    assert config.loss.beta == 1.0 and isinstance(config.loss.beta, float)


def test_unknown_key_names_the_key_and_close_matches():
    config = config_lib.default_config()
    with pytest.raises(UserError) as error:
        config_lib.apply_overrides(config, ["optim.learning_rat=1e-6"])
    assert "optim.learning_rat" in str(error.value)
    with pytest.raises(UserError) as error:
        config_lib.apply_overrides(config, ["game.num_querys=3"])
    assert "num_queries" in str(error.value)


def test_wrong_value_type_is_refused():
    config = config_lib.default_config()
    with pytest.raises(UserError, match="expects a int"):
        config_lib.apply_overrides(config, ["train.num_steps=abc"])
    with pytest.raises(UserError, match="true or false"):
        config_lib.apply_overrides(config, ["model.remat=maybe"])


def test_config_file_with_unknown_key_is_refused(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from lsp_jax.train.config import default_config\n"
        "def get_config(arg=None):\n"
        "    c = default_config()\n"
        "    c.train.num_stepz = 3\n"
        "    return c\n"
    )
    with pytest.raises(UserError, match="train.num_stepz.*num_steps"):
        config_lib.load_config(str(path))


def test_missing_config_file_names_it():
    with pytest.raises(UserError, match="nope.py"):
        config_lib.load_config("configs/nope.py")


@pytest.mark.parametrize(
    "body, line, kind",
    [
        ("def get_config(arg=None):\n    c = default_config(\n    return c\n", 3, "SyntaxError"),
        ("def get_config(arg=None):\n    c = default_config()\n    return c.nope\n", 4, ""),
        ("def get_config(arg=None):\n    return undefined_name\n", 3, "NameError"),
    ],
)
def test_config_file_errors_name_file_and_line(tmp_path, capsys, body, line, kind):
    from lsp_jax import cli

    path = tmp_path / "broken.py"
    path.write_text("from lsp_jax.train.config import default_config\n" + body)
    code = cli.main(["train", "--config", str(path), "--workdir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"{path}:{line}" in err and kind in err and "Traceback" not in err, err


def test_lengths_and_stray_flags_are_usage_errors(tmp_path, capsys):
    from lsp_jax import cli

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    args = ["train", "--config", tiny, "--workdir", str(tmp_path / "run")]
    for key in ("game.max_answer_tokens", "game.max_query_tokens", "reward.judge_max_tokens"):
        assert cli.main([*args, f"--config.{key}=0"]) == 2
        err = capsys.readouterr().err
        assert f"{key}=0" in err and "max_new_tokens" not in err, err
    assert cli.main([*args, "--bogus"]) == 2
    assert "unrecognized argument '--bogus'" in capsys.readouterr().err
    # Every command that takes overrides treats a stray flag the same way (aot exited 1).
    for command in (["aot", "--topology", "v5e:2x2"], ["reward-check"]):
        assert cli.main([command[0], "--config", tiny, *command[1:], "--bogus"]) == 2
        err = capsys.readouterr().err
        assert f"see lsp-jax {command[0]} --help" in err, err


def _checked(**overrides):
    from lsp_jax.train.run import check_config

    tiny = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.py")
    config = config_lib.load_config(tiny)
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    check_config(config)


def test_self_judge_reward_in_lsp_mode_is_refused():
    with pytest.raises(UserError, match="always 0.*game.mode=lsp_zero"):
        _checked(**{"reward.kind": "self_judge", "game.mode": "lsp"})
    _checked(**{"reward.kind": "self_judge", "game.mode": "lsp_zero"})
    # The missing-reward-model error suggests only combinations that train a Challenger.
    with pytest.raises(UserError) as error:
        _checked(**{"reward.model": ""})
    assert "reward.kind=self_judge --config.game.mode=lsp_zero" in str(error.value)


@pytest.mark.parametrize("mode", ["lsp", "lsp_zero"])
def test_a_single_query_is_refused_where_the_challenger_learns(mode):
    with pytest.raises(UserError, match="num_queries is 1.*at least 2 queries"):
        _checked(**{"game.mode": mode, "game.num_queries": 1})
    _checked(**{"game.mode": mode, "game.num_queries": 2})


def test_grpo_config_matches_trl_defaults():
    grpo = os.path.join(os.path.dirname(__file__), "..", "configs", "grpo_llama3_2_3b.py")
    config = config_lib.load_config(grpo)
    # TRL's GRPOTrainer: advantages divided by the group's std, loss averaged per token.
    assert config.game.normalize_std and config.loss.aggregation == "token_mean"
    assert config.loss.kl_estimator == "k3"  # TRL's per-token KL estimator.
    lsp = config_lib.load_config(grpo.replace("grpo_", "lsp_"))
    assert not lsp.game.normalize_std and lsp.loss.aggregation == "sequence_sum"  # The paper.
    _checked(**{"game.mode": "grpo", "game.num_queries": 1})  # No Challenger: one is fine.
