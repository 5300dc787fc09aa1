"""The labeling app's error-prone pure parts: agreement maths and turning the ranking form (shuffled
display positions, ties, ratings, flags, a correction) into an answer in the items' own indices."""
import math

import pytest

from alignloop.errors import InputError
from alignloop.feedback import agreement as A
from alignloop.feedback import store
from alignloop.feedback.app import ranking_text
from alignloop.feedback.export import pseudonym


def test_pairwise_agreement_and_kendall_tau():
    same, rev = A.ranks([0, 1, 2, 3]), A.ranks([3, 2, 1, 0])
    assert A.pairwise_agreement(same, same) == 1.0 and A.kendall_tau(same, same) == 1.0
    assert A.pairwise_agreement(same, rev) == 0.0 and A.kendall_tau(same, rev) == -1.0
    one_swap = A.ranks([1, 0, 2, 3])  # 5 of the 6 pairs ordered alike
    assert A.pairwise_agreement(same, one_swap) == pytest.approx(5 / 6)
    assert A.kendall_tau(same, one_swap) == pytest.approx(4 / 6)


def test_ties_count_half_and_tau_b_corrects_for_them():
    tied = A.ranks([0, 1, 2], [[0, 1]])
    assert tied == {0: 0, 1: 0, 2: 2}
    strict = A.ranks([0, 1, 2])
    assert A.pairwise_agreement(tied, strict) == pytest.approx(2.5 / 3)
    # tau-b of x=[1,1,3], y=[1,2,3] (scipy.stats.kendalltau gives 0.8165)
    assert A.kendall_tau(tied, strict) == pytest.approx(2 / math.sqrt(6))
    all_tied = A.ranks([0, 1], [[0, 1]])
    assert A.kendall_tau(all_tied, A.ranks([0, 1])) is None
    assert A.pairwise_agreement(all_tied, all_tied) == 1.0


def test_summarize_per_project_per_labeler_and_against_gold():
    gold = A.ranks([0, 1, 2])
    items = [{"rankings": {"ann": A.ranks([0, 1, 2]), "bob": A.ranks([0, 1, 2]), "cy": A.ranks([2, 1, 0])},
              "gold": gold},
             {"rankings": {"ann": A.ranks([1, 0])}, "gold": None}]  # one ranking: no pair to compare
    s = A.summarize(items)
    assert s["project"]["pairs"] == 3
    assert s["project"]["agreement"] == pytest.approx((1 + 0 + 0) / 3)
    assert s["labelers"]["ann"]["pairs"] == 2 and s["labelers"]["ann"]["tau"] == pytest.approx(0.0)
    assert s["labelers"]["cy"]["agreement"] == 0.0 and s["labelers"]["cy"]["gold_tau"] == -1.0
    assert s["labelers"]["bob"]["gold_agreement"] == 1.0 and s["project"]["gold_n"] == 3


def test_ranking_form_maps_display_positions_back_to_answer_indices():
    shown = [2, 0, 1]  # position 0 shows answer 2, position 1 answer 0, position 2 answer 1
    fields = {"order": "1,0,2", "ties": "1,0", "critique": " too long \r\n",
              "helpful_0": "7", "truthful_0": "6", "harmless_0": "5",
              "helpful_1": "1", "truthful_1": "2", "harmless_1": "3",
              "helpful_2": "4", "truthful_2": "4", "harmless_2": "4",
              "flag_hallucination_2": "on", "correct_p": "2", "correction": "Better."}
    a = store.ranking_answer(shown, fields, ["zero", "one", "two"])
    assert a["ranking"] == [0, 2, 1]            # positions 1, 0, 2 hold answers 0, 2, 1
    assert a["ties"] == [[0, 2]]
    assert a["ratings"][2] == {"helpful": 7, "truthful": 6, "harmless": 5}
    assert a["ratings"][0] == {"helpful": 1, "truthful": 2, "harmless": 3}
    assert a["flags"][1]["hallucination"] and not a["flags"][0]["hallucination"]
    assert a["correction"] == {"index": 1, "text": "Better."}
    assert a["critique"] == "too long" and a["all_bad"] is False
    plain = store.ranking_answer(shown, {"order": "0,1,2", "all_bad": "on"})
    assert plain["ratings"] is None and plain["ties"] == [] and plain["all_bad"] is True
    assert plain["correction"] is None and plain["critique"] is None


def test_rating_one_answer_does_not_demand_the_rest():
    # position 1 shows answer 0: only its helpfulness is rated, every other answer stays unrated
    a = store.ranking_answer([2, 0, 1], {"order": "0,1,2", "helpful_1": "6"})
    assert a["ratings"] == [{"helpful": 6}, {}, {}]


@pytest.mark.parametrize("fields, field", [
    ({"order": "0,1"}, "order"),
    ({"order": "0,0,1"}, "order"),
    ({"order": "0,x,2"}, "order"),
    ({"order": "0,1,2", "ties": "0,2"}, "ties"),           # not neighbours in the order
    ({"order": "0,1,2", "ties": "0"}, "ties"),
    ({"order": "0,1,2", "ties": "0,1;1,2"}, "ties"),
    ({"order": "0,1,2", **{f"{c}_{p}": "8" for c in store.CRITERIA for p in range(3)}}, "helpful_0"),
    ({"order": "0,1,2", "correct_p": "1"}, "correction"),
    ({"order": "0,1,2", "correction": "text"}, "correct_p"),
    ({"order": "0,1,2", "correct_p": "0", "correction": "zero"}, "correction"),  # unchanged
    ({"order": "0,1,2", "critique": "x" * (store.MAX_TEXT + 1)}, "critique"),
])
def test_ranking_form_errors_name_the_field(fields, field):
    with pytest.raises(InputError) as e:
        store.ranking_answer([0, 1, 2], fields, ["zero", "one", "two"])
    assert e.value.field == field


def test_typed_rankings_for_reviewers_and_gold():
    r = store.ranking_of({"ranking": "2=1 3 > 4"}, 4)
    assert r == {"ranking": [1, 0, 2, 3], "ties": [[0, 1]]}
    assert ranking_text(r) == "2 = 1 > 3 > 4"
    for bad in ("1 2 3", "1 2 3 3", "a b c d", "1 2 3 5"):
        with pytest.raises(InputError):
            store.ranking_of({"ranking": bad}, 4)


def test_pseudonyms_are_stable_and_hide_the_name():
    assert pseudonym("s1", "alice") == pseudonym("s1", "alice")
    assert pseudonym("s1", "alice") != pseudonym("s1", "bob") != pseudonym("s2", "bob")
    assert "alice" not in pseudonym("s1", "alice") and pseudonym("s1", "alice").startswith("labeler-")
