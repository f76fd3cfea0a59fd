"""One source of truth for every setting (issue 14, section 2): the declarations in RunConfig and each method's
``Options`` give the CLI options of run / compare / profile, their help, the checks of flags and TOML values,
and config.toml, which --config reads back to the same RunConfig."""
from __future__ import annotations

import inspect

import pytest
from typer.testing import CliRunner

from fedbench import cli
from fedbench.config import RUN, from_text, option_specs, resolve
from fedbench.errors import ConfigError
from fedbench.observers import to_toml
from fedbench.registry import list_methods
from fedbench.settings import specs


def options_of(command) -> dict[str, object]:
    """The Typer option of each parameter of a command: name -> typer OptionInfo."""
    params = inspect.signature(command).parameters.values()
    return {p.name: p.annotation.__metadata__[0] for p in params if hasattr(p.annotation, "__metadata__")}


def test_cli_options_are_derived_from_the_declarations():
    methods = {name for m in list_methods() for name in specs(m.Options)}
    assert methods and methods <= set(option_specs())
    own = {"run": {"resume", "overwrite", "processes", "config"}, "profile": {"config", "csv"},
           "compare": {"methods", "memory_budget", "seeds", "out", "jobs", "preset", "check", "target_accuracy",
                       "config"}}
    for command, settings in ((cli.run, set(RUN)), (cli.profile, set(cli.PROFILE_SETTINGS)),
                              (cli.compare, set(cli.COMPARE_SETTINGS))):
        options = options_of(command)
        assert set(options) == own[command.__name__] | settings | set(option_specs()), command.__name__
        for name in settings - own[command.__name__]:  # the help is the declaration's, bounds added
            assert options[name].help.startswith(RUN[name].help), name
    assert options_of(cli.run)["lr"].help == "Client learning rate. (> 0 and <= 100)"


@pytest.mark.parametrize("command", ["run", "compare", "profile"])
def test_help_shows_defaults_choices_and_method_options(command):
    result = CliRunner().invoke(cli.app, [command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "[const|cosine]" in text or command == "profile"
    assert "[auto|cpu|cuda]" in text and "[default: (auto)]" in text
    assert "--distill-temperature" in text and "fedepth, mfedepth: softmax temperature" in text
    assert "--variant [paper|fedrolex-code|slt]" in text
    assert "[default: (0.05 (fedssl, lw-fedssl, prog-fedssl); 0.5 (fll-dd))]" in text  # --tau, per method
    assert "--depth INTEGER model vit-tiny" in text


def test_methods_name_lists_options_paper_and_deviations():
    result = CliRunner().invoke(cli.app, ["methods", "fedepth"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("fedepth: ") and lines[1].startswith("paper: Zhang et al. 2023")
    row = next(line for line in lines if "--distill-temperature" in line)
    assert all(w in row for w in ("float", "1.0", "> 0 and <= 100", "softmax temperature"))
    assert any("--distill " in line and "bool" in line and "True" in line for line in lines)
    assert "Deviations" in result.output or "deviation" in result.output.lower()
    result = CliRunner().invoke(cli.app, ["methods", "heterofl"], env={"COLUMNS": "200"})
    assert "paper, fedrolex-code, slt" in result.output and "fedrolex-code" in result.output
    assert "has no options of its own" in CliRunner().invoke(cli.app, ["methods", "fedavg"]).output


def test_flags_are_typed_and_config_toml_reads_back_the_same_run(tmp_path):
    flags = {"method": "fedepth", "model": "vit-tiny", "lr": "0.1", "rounds": "7", "memory_budget": "0.5,1",
             "distill_temperature": "2", "distill": "false", "depth": "3", "quiet": True}
    cfg = resolve(from_text(flags))
    assert cfg.lr == 0.1 and cfg.rounds == 7 and cfg.memory_budget == (0.5, 1.0)
    assert cfg.options == {"distill_temperature": 2.0, "distill": False, "depth": 3}
    text = to_toml(cfg.to_dict())
    assert "distill-temperature = 2.0\n" in text and "distill = false\n" in text and "depth = 3\n" in text
    assert "# Client learning rate.\nlr = 0.1\n" in text
    (tmp_path / "config.toml").write_text(text)
    stored = resolve({}, tmp_path / "config.toml")
    assert stored == cfg and type(stored.options["distill_temperature"]) is float


def test_toml_values_are_checked_like_flags_ints_count_as_floats(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "fedepth"\nlr = 1\ndistill-weight = 2\n')
    cfg = resolve({}, config)
    assert cfg.lr == 1.0 and type(cfg.lr) is float and cfg.options == {"distill_weight": 2.0}
    with pytest.raises(ConfigError, match="'2' is not a number"):
        config.write_text('method = "fedepth"\ndistill-weight = "2"\n')
        resolve({}, config)



def test_eval_every_defaults_to_10_for_long_runs_and_is_recorded():
    assert resolve({"rounds": 99}).eval_every == 5
    assert resolve({"rounds": 100}).eval_every == 10
    assert resolve({"rounds": 300, "eval_every": 3}).eval_every == 3
    assert resolve({"rounds": 300}).to_dict()["eval_every"] == 10  # config.toml holds the value used
