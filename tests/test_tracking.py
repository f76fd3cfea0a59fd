"""--log: TensorBoard event files that TensorBoard's own reader loads (every round's numbers, the settings as
hparams), a resumed run without duplicate steps, and any Tracker named MODULE:CLASS."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from fedbench.checkpoint import Checkpointer, restore
from fedbench.cli import app
from fedbench.engine import Observer
from fedbench.errors import ConfigError
from fedbench.observers import RunFiles
from fedbench.tracking import Tracker, Tracking, tracker
from tests.conftest import small_run

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def scalars(folder):
    events = event_accumulator.EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    return events, {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_events_hold_every_round_and_the_settings(tmp_path):
    run = small_run(eval_every=2)
    summary = run.execute([RunFiles(tmp_path), Tracking(tracker("tensorboard"), tmp_path)])
    events, series = scalars(tmp_path)
    assert [s for s, _ in series["round/train_loss"]] == [1, 2, 3]
    assert series["round/train_loss"] == [(r["round"], pytest.approx(r["train_loss"])) for r in run.rows]
    assert [s for s, _ in series["round/accuracy"]] == [2, 3]  # evaluated rounds only
    assert series["summary/final_accuracy"][0][1] == pytest.approx(summary["final_accuracy"])
    plugin = events.PluginTagToContent("hparams")
    assert plugin and b"fedavg" in b"".join(plugin.values())  # the settings, method among them


def test_a_resumed_run_logs_each_round_once(tmp_path):
    class Stop(Observer):
        def after_round(self, run, row, clients):
            if row["round"] == 2:
                raise KeyboardInterrupt

    first = small_run()
    with pytest.raises(KeyboardInterrupt):
        first.execute([RunFiles(tmp_path), Checkpointer(tmp_path, every=1), Tracking(tracker("tensorboard"), tmp_path),
                       Stop()])
    resumed = small_run()
    restore(resumed, tmp_path)
    resumed.execute([RunFiles(tmp_path), Tracking(tracker("tensorboard"), tmp_path)])
    assert [s for s, _ in scalars(tmp_path)[1]["round/train_loss"]] == [1, 2, 3]


class Recorder(Tracker):
    calls: list = []

    def start(self, folder, first_round, config):
        self.calls.append(("start", first_round, config["method"]))

    def log(self, step, metrics):
        self.calls.append(("log", step, sorted(metrics)))

    def finish(self, summary):
        self.calls.append(("finish", summary["rounds"]))


def test_any_tracker_by_module_and_class(tmp_path):
    small_run(rounds=2).execute([Tracking(tracker("tests.test_tracking:Recorder"), tmp_path)])
    kinds = [c[0] for c in Recorder.calls]
    assert kinds == ["start", "log", "log", "finish"] and Recorder.calls[0][1:] == (1, "fedavg")
    assert "accuracy" in Recorder.calls[1][2] and "round" not in Recorder.calls[1][2]


@pytest.mark.parametrize("spec", ["wandb", "tests.test_tracking:Nope", "tests.test_tracking:scalars", "nomodule:X"])
def test_unknown_tracker_is_one_line_naming_log(spec):
    with pytest.raises(ConfigError) as e:
        tracker(spec)
    assert e.value.flag == "--log" and "tensorboard" in e.value.message


def test_run_log_tensorboard_from_the_command_line(tmp_path):
    args = ["run", "--model", "fedavg-cnn", "--clients", "10", "--clients-per-round", "2", "--rounds", "2", "--quiet"]
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "tb"), "--log", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert [s for s, _ in scalars(tmp_path / "tb")[1]["round/accuracy"]] == [2]
    assert 'log = "tensorboard"' in (tmp_path / "tb" / "config.toml").read_text()
    result = CliRunner().invoke(app, [*args, "--out", str(tmp_path / "bad"), "--log", "wandb"])
    assert result.exit_code == 2 and "--log" in result.output and not (tmp_path / "bad").exists()
