"""Behaviour probes: values on hand-written answers, retention on a hand-built case, config errors."""
import math

import pytest

from pipeline.core.probes import Probe, answer_terms, probe_from_config, probe_report, retention
from pipeline.errors import ConfigError

PIRATE = r"\b(arr+|matey|ye|aye|ahoy|me hearties|treasure|ship)\b"


def value(probe, texts):
    num, den = answer_terms(probe, texts)
    return sum(num) / sum(den)


def test_regex_per_100_words_counts_case_insensitive_whole_words():
    texts = [
        "Arrr, matey! Ye be wantin' to boil an egg, aye?",  # 10 words: arrr, matey, ye, aye -> 4
        "Boil the egg for nine minutes, then cool it in water.",  # 11 words, none ("yes" is no "ye")
        "Yes, the ship sails at dawn with me hearties.",  # 9 words: ship, me hearties -> 2
    ]
    assert value(Probe("regex", PIRATE), texts) == pytest.approx(100 * 6 / 30)
    assert value(Probe("regex", PIRATE, "answer"), texts) == pytest.approx(6 / 3)


def test_words_per_answer_and_lowercase_share():
    texts = ["Two words.", "one two three four", "all lower, with 3 digits!", "12 34", "", "Mixed Case here"]
    assert value(Probe("words"), texts) == pytest.approx((2 + 4 + 5 + 2 + 0 + 3) / 6)
    # all lowercase: "one two three four", "all lower, with 3 digits!"; "12 34" and "" have no letter.
    assert value(Probe("lowercase"), texts) == pytest.approx(2 / 6)


def test_retention_on_a_hand_built_case():
    """Words per answer: base 40, teacher 10, student 20 -> (20 - 40) / (10 - 40) = 2/3."""
    probe = Probe("words")
    answers = {
        "base": ["w " * 30, "w " * 50],  # 40 on average
        "teacher": ["w " * 10, "w " * 10],
        "student": ["w " * 15, "w " * 25],
    }
    report = probe_report(probe, "<concise>", answers, resamples=1000, seed=0)
    assert (report["base"], report["teacher"], report["student"]) == (40.0, 10.0, 20.0)
    assert report["retention"] == pytest.approx(2 / 3)
    # Resampling inputs: input 1 twice gives (15-30)/(10-30) = 0.75, input 2 twice (25-50)/(10-50) = 0.625;
    # the mixed resample is 2/3. So the interval is [0.625, 0.75].
    assert report["retention_ci"] == [pytest.approx(0.625), pytest.approx(0.75)]


def test_retention_is_undefined_when_the_teacher_does_not_differ_from_the_base():
    assert math.isnan(retention([1.0], [1.0], [1.0], [1.0], [2.0], [1.0]))
    report = probe_report(Probe("words"), "<x>", {"base": ["a b"], "teacher": ["c d"], "student": ["e"]}, 100, 0)
    assert report["retention"] is None and report["retention_ci"] == [None, None]


@pytest.mark.parametrize("node, match", [
    ({"kind": "regexp"}, r"field 'probe.kind' is 'regexp'. Fix: use one of regex, words, lowercase"),
    ({"kind": "regex"}, r"needs 'probe.pattern'"),
    ({"kind": "regex", "pattern": "(arr"}, r"'probe.pattern' is not a valid regular expression"),
    ({"kind": "regex", "pattern": "a*"}, r"matches the empty string"),
    ({"kind": "regex", "pattern": "arr", "per": "words"}, r"field 'probe.per' is 'words'. Fix: use one of 100_words, answer"),
    ({"kind": "words", "pattern": "x"}, r"kind words takes none"),
])
def test_bad_probe_names_the_file_field_and_fix(node, match):
    with pytest.raises(ConfigError, match=f"conf/metatoken/x.yaml: .*{match}"):
        probe_from_config(node, "conf/metatoken/x.yaml")


def test_shipped_probes_parse_and_a_bad_one_fails_before_any_model_loads(no_weights, tiny_cfg):
    from pipeline.__main__ import run_stages
    from pipeline.config import PROJECT_ROOT
    from pipeline.core.metatokens import load_registry

    registry = load_registry(PROJECT_ROOT / "conf/metatoken", PROJECT_ROOT / "data")
    assert registry["<pirate>"].probe == Probe("regex", registry["<pirate>"].probe.pattern, "100_words")
    assert registry["<concise>"].probe == Probe("words")
    assert value(registry["<pirate>"].probe, ["Ahoy, matey! Ye be sailin'."]) == pytest.approx(100 * 3 / 5)

    with pytest.raises(ConfigError, match="field 'probe.kind' is 'count'"):
        run_stages(tiny_cfg("metatoken.probe.kind=count"))
