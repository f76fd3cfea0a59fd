"""One source of truth for every setting (issue 14, section 2): the declarations in RunConfig and each method's
``Options`` give the CLI options of run / compare / profile, their help, the checks of flags and TOML values,
and config.toml, which --config reads back to the same RunConfig."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedbench import cli, config
from fedbench.cli import from_text
from fedbench.config import EXECUTION, RUN, resolve
from fedbench.errors import ConfigError
from fedbench.launch import configure
from fedbench.observers import to_toml
from fedbench.registry import list_methods, option_specs
from fedbench.settings import specs


def options_of(command) -> dict[str, object]:
    """The Typer option of each parameter of a command: name -> typer OptionInfo."""
    params = inspect.signature(command).parameters.values()
    return {p.name: p.annotation.__metadata__[0] for p in params if hasattr(p.annotation, "__metadata__")}


def test_cli_options_are_derived_from_the_declarations():
    methods = {name for m in list_methods() for name in specs(m.Options)}
    assert methods and methods <= set(option_specs())
    own = {"run": {"resume", "overwrite", "config"}, "profile": {"config", "csv"},
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
    cfg = configure(from_text(flags))
    assert cfg.lr == 0.1 and cfg.rounds == 7 and cfg.memory_budget == (0.5, 1.0)
    assert cfg.options == {"distill_temperature": 2.0, "distill": False, "depth": 3}
    text = to_toml(cfg.settings())
    assert "distill-temperature = 2.0\n" in text and "distill = false\n" in text and "depth = 3\n" in text
    assert "# Client learning rate.\nlr = 0.1\n" in text
    (tmp_path / "config.toml").write_text(text)
    stored = configure({}, tmp_path / "config.toml")
    assert stored == cfg and type(stored.options["distill_temperature"]) is float


def test_toml_values_are_checked_like_flags_ints_count_as_floats(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('method = "fedepth"\nlr = 1\ndistill-weight = 2\n')
    cfg = configure({}, config)
    assert cfg.lr == 1.0 and type(cfg.lr) is float and cfg.options == {"distill_weight": 2.0}
    assert type(cfg.options["distill_weight"]) is float
    with pytest.raises(ConfigError, match="'2' is not a number"):
        config.write_text('method = "fedepth"\ndistill-weight = "2"\n')
        configure({}, config)


def test_processes_is_an_execution_setting_recorded_in_config_toml():
    """auto or an integer >= 1, from a flag, TOML or FEDBENCH_PROCESSES (the tests' 1); like --quiet it neither
    splits a report's tables nor blocks --resume."""
    assert resolve({}).processes == 1 and "processes" in EXECUTION
    assert [resolve(from_text({"processes": p})).processes for p in ("auto", "3")] == ["auto", 3]
    assert "\nprocesses = 3\n" in to_toml(resolve({"processes": 3}).settings())
    for bad in (0, "two", True, 1.5):
        with pytest.raises(ConfigError, match="allowed: auto or an integer >= 1"):
            resolve({"processes": bad})



def test_eval_every_defaults_to_10_for_long_runs_and_is_recorded():
    assert resolve({"rounds": 99}).eval_every == 5
    assert resolve({"rounds": 100}).eval_every == 10
    assert resolve({"rounds": 300, "eval_every": 3}).eval_every == 3
    assert resolve({"rounds": 300}).to_dict()["eval_every"] == 10  # config.toml holds the value used


@pytest.mark.parametrize("flags, flag", [({"method": "nosuch"}, "--method"), ({"model": "nosuch"}, "--model"),
                                         ({"tau": 0.1}, "--tau"), ({"partition": "nosuch"}, "--partition"),
                                         ({"devices": "nosuch"}, "--devices")])
def test_each_module_checks_its_own_part(flags, flag):
    """config.py checks the run's own settings and imports nothing inside a function (once its way around import
    cycles); the method, model and options (the registry), the partition and the device profile are checked by
    their own modules, which ``configure`` composes."""
    tree = ast.parse(Path(config.__file__).read_text())
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
    assert not [n for f in functions for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))]
    resolve(flags)
    with pytest.raises(ConfigError) as refused:
        configure(flags)
    assert refused.value.flag == flag
