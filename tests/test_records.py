"""The declared records (``fedbench.records``): a run writes exactly the declared fields, each with a unit and a
description, every one it must; a round's totals are its client-rounds' rollups; README lists every field."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from fedbench.observers import RunFiles
from fedbench.records import DEVICES, EVAL_INITIAL, ClientRound, Record, Round, Summary
from tests.conftest import small_run

README = Path(__file__).resolve().parents[1] / "README.md"
FILES = {"clients.csv": ClientRound, "rounds.csv": Round, "summary.json": Summary}
# A CPU run with --devices (and a deadline) and --eval-initial writes every field but the CUDA one.
SETTINGS = {frozenset(): {}, frozenset({DEVICES, EVAL_INITIAL}): dict(devices="edge", deadline=1.0, eval_initial=True)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[frozenset, Path]:
    """Short real runs, plain and with the optional fields, by the conditions that hold: 2 rounds of
    fedavg-exclusive, whose clients under budget 0.5 train nothing, evaluated after round 2 only."""
    folders = {}
    for conditions, settings in SETTINGS.items():
        folder = tmp_path_factory.mktemp("run")
        small_run(method="fedavg-exclusive", memory_budget=(0.5, 1.0), rounds=2, eval_every=2,
                  **settings).execute([RunFiles(folder)])
        folders[conditions] = folder
    return folders


def written(folder: Path, name: str) -> list[str]:
    """The columns of a CSV or the keys of summary.json, in the order written."""
    path = folder / name
    return list(json.loads(path.read_text()) if name.endswith(".json") else pd.read_csv(path).columns)


@pytest.mark.parametrize("name", FILES)
def test_every_field_written_is_declared_with_a_unit_and_a_description(runs, name):
    specs = FILES[name].specs()
    assert all(s.unit.strip() and s.doc.strip() for s in specs.values())
    for folder in runs.values():
        fields = written(folder, name)
        assert [f for f in fields if f not in specs] == [], f"{name} has undeclared fields"
        assert fields == [f for f in specs if f in fields]  # in the declared order


@pytest.mark.parametrize("name", FILES)
def test_every_field_that_must_be_written_is(runs, name):
    for conditions, folder in runs.items():
        due = [f for f, s in FILES[name].specs().items() if s.when is None or s.when in conditions]
        assert [f for f in due if f not in written(folder, name)] == [], f"{name} lacks fields, {set(conditions)}"


def test_a_rounds_totals_are_the_rollups_of_its_client_rounds(runs):
    for folder in runs.values():
        rounds, clients = pd.read_csv(folder / "rounds.csv"), pd.read_csv(folder / "clients.csv")
        assert clients["excluded"].any() and not clients["excluded"].all()  # a rollup over trained clients matters
        for row in rounds.to_dict("records"):
            totals = Round.totals(clients[clients["round"] == row["round"]].to_dict("records"))
            assert set(totals) == {f for f, s in Round.specs().items() if s.rollup and f in rounds}
            for field, total in totals.items():
                assert total == pytest.approx(row[field], rel=1e-12, nan_ok=True), field


def test_a_record_takes_its_declared_fields_only_and_every_one_it_must():
    row = dict(round=1, client=0, budget=1.0, budget_bytes=10, config="full", peak_bytes=8, of_budget=0.8,
               within_budget=True, train_flops=6, bytes_down=4, bytes_up=4, samples=2, train_loss=0.5, excluded=False, dropped=False)
    assert ClientRound(**row).row() == row  # optional fields left out are not written
    with pytest.raises(TypeError, match="energy_j"):
        ClientRound(**row, energy_j=1.0)
    with pytest.raises(TypeError, match="peak_bytes"):
        ClientRound(**{k: v for k, v in row.items() if k != "peak_bytes"})


def test_rows_read_back_are_the_rows_written(runs):
    """What a resumed run continues from (``checkpoint.restore``): the declared types, None for an empty cell."""
    folder = runs[frozenset({DEVICES, EVAL_INITIAL})]
    rows = Round.read(pd.read_csv(folder / "rounds.csv"))
    assert rows[0]["accuracy"] is None and math.isfinite(rows[1]["accuracy"])
    numeric = Round.numeric()
    assert all(type(v) is numeric[k] for r in rows for k, v in r.items() if v is not None)


def readme_tables() -> str:
    """README's Records tables, as the schema declares them."""
    return "\n".join(f"*{name}* ({record.__name__}):\n\n| field | unit | description | notes |\n"
                     "|---|---|---|---|\n" + "".join(rows(record)) for name, record in FILES.items())


def rows(record: type[Record]) -> list[str]:
    return [f"| `{name}` | {s.unit} | {s.doc} | {s.note()} |\n" for name, s in record.specs().items()]


def test_readme_lists_every_field_with_its_unit_and_description():
    text = README.read_text()
    stale = [row for record in FILES.values() for row in rows(record) if row not in text]
    assert stale == [], "README.md's Records tables differ from fedbench.records (python -m tests.test_records)"


if __name__ == "__main__":
    print(readme_tables())
