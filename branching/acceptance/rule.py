"""A node's fitted acceptance: its temperature and the threshold of its rule, both chosen on validation.

A prediction is accepted when its confidence, by default the max softmax probability of logits /
temperature (or another score of branching.confidence: `score`), is at least the threshold. `Acceptance.fit` chooses both on a node's validation logits (see
branching.selective for the rules); training, evaluation, routing, predict, compare and the reports
all use the same object, stored in each checkpoint's meta as `to_dict()`.

A node without a reject option (the parent, unless its [parent.accept] sets a threshold, coverage
or risk) has rule None: it accepts every prediction, and routes with its recipe's threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from branching.acceptance import calibration, confidence, selective
from branching.models.meta import DEFAULT_THRESHOLD

RULE_KEYS = ("rule", "asked", "threshold", "attained", "reason", "validation")
EXTRA_KEYS = ("delta", "tests", "risk_bound")  # the risk rule's


@dataclass
class Acceptance:
    temperature: float = 1.0
    calibrated: bool = False
    calibration: dict = field(default_factory=dict)  # validation_samples, val_nll_raw, val_nll, reason
    rule: str | None = None                          # "threshold", "coverage", "risk"; None: accept all
    threshold: float | None = None                   # None with a rule: the rule could not be met
    asked: dict | None = None
    attained: bool = True
    reason: str | None = None
    validation: dict | None = None                   # samples, accepted, coverage, risk on validation
    extra: dict = field(default_factory=dict)
    score: str = "msp"                               # the confidence the threshold applies to

    # ---- fitting --------------------------------------------------------------------------

    @classmethod
    def fit(cls, accept, recipe_node, val_logits, val_labels, rejects: bool = True, judge=None) -> "Acceptance":
        """Fit on validation logits: the temperature (fixed by the config, fit when calibrating, else 1),
        then, if the node `rejects`, the threshold of `accept.rule` on the score `accept.score`. `accept` is
        a config.Acceptance, `recipe_node` a recipes.NodeRecipe (its calibrate and threshold are the
        defaults); `judge` the self-evaluation branch's probabilities of the validation images."""
        val_logits = np.asarray(val_logits)
        val_labels = np.asarray(val_labels, dtype=np.int64)
        n = len(val_labels)
        calibrate = recipe_node.calibrate if accept.calibrate is None else accept.calibrate
        if accept.temperature is not None:
            temperature, fitted = accept.temperature, False
        elif calibrate and n:
            temperature, fitted = calibration.fit_temperature(val_logits, val_labels), True
        else:
            temperature, fitted = 1.0, False
        info: dict = {"validation_samples": n}
        if n:
            info.update(val_nll_raw=calibration.nll(val_logits, val_labels),
                        val_nll=calibration.nll(val_logits, val_labels, temperature))
        elif calibrate and accept.temperature is None:
            info["reason"] = "no validation images to fit a temperature on; using 1"
        threshold = accept.threshold if accept.threshold is not None else recipe_node.threshold
        score = getattr(accept, "score", "msp")
        fitted_rule = cls(float(temperature), fitted, info, threshold=float(threshold))
        if not rejects:
            return fitted_rule
        probabilities = calibration.softmax(val_logits, fitted_rule.temperature)
        scores = (probabilities.max(axis=1) if score == "msp"
                  else confidence.score(score, val_logits, fitted_rule.temperature, judge))
        chosen = selective.fit_rule(accept.rule, scores, probabilities.argmax(axis=1) == val_labels,
                                    threshold=threshold, coverage=accept.coverage, risk=accept.risk,
                                    delta=accept.delta)
        return cls(fitted_rule.temperature, fitted, info, **_rule_fields({**chosen, "score": score}))

    # ---- use ------------------------------------------------------------------------------

    @property
    def rejects(self) -> bool:
        """Whether this node has a reject option (a rule); without one it accepts every prediction."""
        return self.rule is not None

    def confidence(self, logits, judge=None) -> np.ndarray:
        """The node's score of its answers, float64 (N,): by default the max softmax probability of logits /
        temperature; `judge` holds the self-evaluation branch's probabilities when the score is "selfeval"."""
        return confidence.score(self.score, logits, self.temperature, judge)

    def accepts(self, confidence) -> np.ndarray:
        """Which confidences are accepted: all without a rule, none when the rule could not be met."""
        confidence = np.asarray(confidence, dtype=np.float64)
        if not self.rejects:
            return np.ones(len(confidence), dtype=bool)
        return selective.accept_mask(confidence, self.threshold)

    def routing(self) -> dict:
        """Temperature and threshold the routed tree uses at this node, and where the threshold comes from
        (the node's rule, or for a node without one its recipe's threshold)."""
        source = f"acceptance rule {self.rule!r}" if self.rejects else "recipe threshold"
        out = {"temperature": self.temperature, "threshold": self.threshold, "from": source}
        return out if self.score == "msp" else {**out, "score": self.score}

    def describe(self) -> str:
        """What the rule asked for, e.g. "risk <= 2% with confidence 95%"."""
        return describe_rule(self.to_dict())

    # ---- records --------------------------------------------------------------------------

    def summary(self) -> dict | None:
        """The rule as metrics.json shows it (None for a node without a reject option)."""
        if not self.rejects:
            return None
        out = {"rule": self.rule, "asked": self.asked, "threshold": self.threshold, "attained": self.attained,
               "reason": self.reason, "validation": self.validation, **self.extra}
        if self.score != "msp":  # files of msp nodes stay as they were
            out["score"] = self.score
        return {**out, "temperature": self.temperature, "calibrated": self.calibrated}

    def to_dict(self) -> dict:
        return {**(self.summary() or {"rule": None, "threshold": self.threshold, "temperature": self.temperature,
                                      "calibrated": self.calibrated}),
                "calibration": dict(self.calibration)}

    @classmethod
    def from_dict(cls, d: dict) -> "Acceptance":
        d = dict(d)
        return cls(float(d.get("temperature", 1.0)), bool(d.get("calibrated", False)), dict(d.get("calibration") or {}),
                   **_rule_fields(d))

    @classmethod
    def of(cls, meta) -> "Acceptance":
        """A node's acceptance from its file's record (a models.meta.NodeMeta, which reads older files' own ways of
        keeping it); a file recording none routes at DEFAULT_THRESHOLD."""
        return cls.from_dict(meta.acceptance or {"threshold": DEFAULT_THRESHOLD})


def rejects(spec) -> bool:
    """Whether a node (a config.NodeSpec) has a reject option: branches always; the parent only when
    its [parent.accept] sets a threshold, a coverage, a risk or a score other than msp."""
    a = spec.accept
    return (spec.source is not None or any(v is not None for v in (a.threshold, a.coverage, a.risk))
            or getattr(a, "score", "msp") != "msp")


def _rule_fields(d: dict) -> dict:
    rule = d.get("rule")
    threshold = d.get("threshold")
    return {"rule": rule, "threshold": None if threshold is None else float(threshold), "asked": d.get("asked"),
            "attained": d.get("attained", True), "reason": d.get("reason"), "validation": d.get("validation"),
            "extra": {k: d[k] for k in EXTRA_KEYS if k in d}, "score": d.get("score", "msp")}


def describe_rule(rule: dict) -> str:
    """What an acceptance rule (a dict as in metrics.json) asked for, e.g. "coverage 80%"."""
    asked = rule.get("asked") or {"threshold": rule.get("threshold")}
    if rule.get("rule") == "coverage":
        return f"coverage {100 * asked['coverage']:g}%"
    if rule.get("rule") == "risk":
        return f"risk <= {100 * asked['risk']:g}% with confidence {100 * (1 - asked['delta']):g}%"
    return f"threshold {asked['threshold']:g}"
