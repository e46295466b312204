"""The serving rule (``export --rule``): counts read from metrics.json, margins, and refusals of bad rules."""

import json

import pytest

from braintumor.config import DEFAULT_MODEL_REPOSITORY, MODEL_NAME
from braintumor_training.serving_rule import RuleError, ServingRule, card_section, describe, error_count

RULE = DEFAULT_MODEL_REPOSITORY.parent / "docs" / "serving-rule.json"


def _metrics(kaggle_errors: int, missed: int, alarms: int, n_tumour: int = 407, n_normal: int = 39) -> dict:
    """metrics.json with a 4-class validation confusion matrix (100 images a class) and an external part."""
    matrix = [[100 if i == j else 0 for j in range(4)] for i in range(4)]
    matrix[0][0], matrix[0][1] = 100 - kaggle_errors, kaggle_errors
    overall = {
        "grouping": "all",
        "subgroup": "all",
        "tumor_sensitivity": {"k": n_tumour - missed, "n": n_tumour},
        "specificity": {"k": n_normal - alarms, "n": n_normal},
    }
    return {"validation": {"confusion_matrix": matrix}, "external_val": {"subgroups": [overall]}}


def test_counts_come_from_the_confusion_matrix_and_the_subgroups():
    metrics = _metrics(kaggle_errors=7, missed=5, alarms=2)
    assert error_count(metrics, "validation.errors") == (7, 400)
    assert error_count(metrics, "external_val.missed") == (5, 407)
    assert error_count(metrics, "external_val.false_alarms") == (2, 39)
    for key, message in (
        ("test.errors", "unknown count 'test.errors'"),  # never a test set
        ("validation.missed", "has no subgroups"),
        ("external_val.errors", "has no confusion matrix"),
    ):
        with pytest.raises(RuleError, match=message):
            error_count(metrics, key)


def test_the_committed_rule_judges_margins_and_the_weighted_total():
    rule = ServingRule.from_file(RULE)
    served = _metrics(kaggle_errors=13, missed=10, alarms=3)  # version 6's validation errors
    # two more Kaggle errors (the margin), one fewer missed tumour: the total stays at version 6's
    at_the_margins = rule.judge(_metrics(kaggle_errors=15, missed=9, alarms=3), served, 6)
    assert at_the_margins["met"] and [r["limit"] for r in at_the_margins["conditions"]] == [14, 4, 15, 36]
    # 3 fewer Kaggle errors do not buy 2 more missed tumours: a missed tumour counts twice in the total
    traded = rule.judge(_metrics(kaggle_errors=10, missed=12, alarms=3), served, 6)
    assert not traded["met"] and [r["met"] for r in traded["conditions"]] == [True, True, True, False]
    assert describe(traded)[-1] == (
        "2 x missed tumours + false alarms + Kaggle errors: 37 (version 6: 36; at most 36) NOT MET"
    )
    too_many = rule.judge(_metrics(kaggle_errors=16, missed=8, alarms=3), served, 6)
    assert [r["met"] for r in too_many["conditions"]] == [True, True, False, True]
    assert "| missed external validation tumours | 9 | 10 | 14 |" in card_section(at_the_margins)
    with pytest.raises(RuleError, match="not judged on the same validation images"):
        rule.judge(_metrics(13, 10, 3, n_tumour=400), served, 6)


def test_the_published_versions_are_counted_as_their_metrics_say():
    served = json.loads((DEFAULT_MODEL_REPOSITORY / MODEL_NAME / "6" / "metrics.json").read_text())
    result = ServingRule.from_file(RULE).judge(served, served, 6)
    assert result["conditions"][-1]["run"] == 2 * 10 + 3 + 13 and len(result["sha256"]) == 64
    assert [r["at_most_more"] for r in result["conditions"]] == [4, 1, 2, 0]
    # version 1 was not judged on the external validation part: the rule says whose figures are missing
    first = json.loads((DEFAULT_MODEL_REPOSITORY / MODEL_NAME / "1" / "metrics.json").read_text())
    with pytest.raises(RuleError, match=r"version 1's metrics\.json hold no 'external_val' set"):
        ServingRule.from_file(RULE).judge(served, first, 1)


@pytest.mark.parametrize(
    "text, message",
    [
        ("not json", "cannot read the rule"),
        ('{"conditions": []}', "at least one condition"),
        ('{"conditions": [{"name": "x", "at_most_more": 1}]}', r"condition 1 needs a name, a count \(positive"),
        ('{"conditions": [{"name": "x", "count": {}, "at_most_more": 1}]}', r"condition 1 \(x\) counts nothing"),
        (
            '{"conditions": [{"name": "x", "count": {"test.missed": 1}, "at_most_more": 1}]}',
            "unknown count 'test.missed'",
        ),
        ("[1]", "a rule is an object with a list of conditions"),
        ('{"conditions": [{"name": "x", "count": {"validation.errors": 1}, "at_most_more": NaN}]}', "NaN is not"),
        ('{"conditions": [{"name": "x", "count": {"validation.errors": 1}, "at_most_more": Infinity}]}', "Infinity"),
        ('{"conditions": [{"name": "x", "count": {"validation.errors": -1}, "at_most_more": 0}]}', "must be positive"),
        ('{"conditions": [{"name": "x", "count": {"validation.errors": 0}, "at_most_more": 0}]}', "must be positive"),
        ('{"conditions": [{"name": "x", "count": {"validation.errors": true}, "at_most_more": 0}]}', "not a finite"),
        (
            '{"conditions": [{"name": "x", "count": {"validation.errors": 2, "validation.errors": 1}, '
            '"at_most_more": 0}]}',
            "validation.errors given twice",
        ),
    ],
)
def test_a_malformed_rule_is_refused_with_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "rule.json"
    path.write_text(text)
    with pytest.raises(RuleError, match=message):
        ServingRule.from_file(path)
