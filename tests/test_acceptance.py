"""The acceptance object: fit, confidence, acceptance, records, and checkpoints written before it."""

import numpy as np
import pytest
import scipy.special

from branching.acceptance.rule import Acceptance
from branching.config.parse import parse_config
from branching.config.recipes import get_recipe
from branching.models.meta import NodeMeta, meta_from_dict

TREE = '[parent]\nclasses = ["a", "b", "c"]\n[branches.x]\nclasses = ["a", "b"]\n'


def validation(seed=0, n=200):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    logits = rng.normal(size=(n, 2)) * 3
    logits[np.arange(n), labels] += 2.0
    return logits, labels


def test_coverage_rule_fit_on_validation_and_applied_to_new_logits():
    config = parse_config(TREE + '[branches.x.accept]\nrule = "coverage"\ncoverage = 0.5\n')
    logits, labels = validation()
    a = Acceptance.fit(config.node("x").accept, get_recipe("default").branch, logits, labels)
    reference = scipy.special.softmax(logits / a.temperature, axis=1).max(axis=1)  # independent softmax
    np.testing.assert_allclose(a.confidence(logits), reference, rtol=1e-12)
    assert a.calibrated and a.rule == "coverage" and a.asked == {"coverage": 0.5}
    assert a.threshold == pytest.approx(np.sort(reference)[::-1][99])  # the 100th most confident of 200
    assert a.accepts(reference).sum() == 100 == a.validation["accepted"]
    assert a.summary()["temperature"] == a.temperature and "calibration" not in a.summary()
    assert Acceptance.from_dict(a.to_dict()) == a
    assert a.describe() == "coverage 50%"
    assert a.routing() == {"temperature": a.temperature, "threshold": a.threshold,
                           "from": "acceptance rule 'coverage'"}


def test_a_node_without_a_rule_accepts_everything_and_routes_with_its_recipe_threshold():
    logits, labels = validation()
    a = Acceptance.fit(parse_config(TREE).parent.accept, get_recipe("default").parent, logits, labels,
                       rejects=False)
    assert not a.rejects and a.summary() is None and a.accepts(np.array([0.0, 0.5])).all()
    assert a.routing()["threshold"] == 0.96 and a.routing()["from"] == "recipe threshold"


def test_checkpoints_written_before_the_object_existed_still_load():
    node = {"name": "n", "classes": ["a", "b"]}  # read as a file of schema 1 (before the schema had a number)
    old_parent = {"calibration": {"temperature": 1.5, "calibrated": True, "validation_samples": 9},
                  "recipe": {"parent": {"threshold": 0.9}}, "kind": "parent", "normalization": {}, **node}
    a = Acceptance.of(meta_from_dict(old_parent, None))
    assert (a.temperature, a.calibrated, a.rejects, a.threshold) == (1.5, True, False, 0.9)
    assert a.calibration == {"validation_samples": 9}
    old_branch = {"calibration": {"temperature": 2.0, "calibrated": True},
                  "acceptance": {"rule": "threshold", "asked": {"threshold": 0.8}, "threshold": 0.8,
                                 "attained": True, "reason": None, "validation": {"samples": 3},
                                 "temperature": 2.0, "calibrated": True},
                  "kind": "branch", "source": "parent", "layer": 1, "where": "pre", **node}
    b = Acceptance.of(meta_from_dict(old_branch, None))
    assert (b.temperature, b.rule, b.threshold) == (2.0, "threshold", 0.8)
    assert b.accepts(np.array([0.79, 0.8])).tolist() == [False, True]
    assert Acceptance.of(NodeMeta("parent", "parent")).routing()["threshold"] == 0.96  # a file recording nothing at all
