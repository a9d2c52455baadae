"""Config files and `--config.a.b=v` overrides."""

import glob
import os

import pytest

from lsp_jax.errors import UserError
from lsp_jax.train import config as config_lib

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_configs_load_and_pass_checks(path):
    from lsp_jax.train.loop import check_config

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
