"""The Python API against `branching predict`: the same answers, item for item (used by each parent kind's tests)."""

import json

import branching
from branching.cli import main as cli

FIELDS = {"predicted_class": "guess", "confidence": "score", "answered_by": "node", "rejected_at": "rejected_at",
          "rejected_confidence": "rejected_score", "threshold": "threshold"}


def assert_api_answers_as_predict(models, cli_inputs, api_inputs, out_json, capsys, flags=(), **load) -> list:
    """`branching predict --models MODELS *flags *cli_inputs --out OUT_JSON`, and branching.load(MODELS, **load)
    on `api_inputs` (the same items in another form): equal answers for every readable item. Returns the answers."""
    assert cli.main(["predict", "--models", str(models), *flags, *map(str, cli_inputs), "--out", str(out_json)]) in (0, 2)
    capsys.readouterr()
    rows = json.loads(out_json.read_text())["predictions"]
    answers = [a for a in branching.load(models, "cpu", **load)(api_inputs) if a.error is None]
    assert len(rows) == len(answers) > 0
    for row, answer in zip(rows, answers):
        for column, field in FIELDS.items():
            value = getattr(answer, field)
            assert row[column] == ("" if value is None and column == "rejected_at" else value), column
        assert row["path"] == " > ".join(answer.path) and bool(row["accepted"]) == answer.accepted
        assert answer.label == (answer.guess if answer.accepted else None)
    return answers
