"""Eval metrics against hand-computed values on fixed predictions; the shipped class subsets."""
import math

import pytest
import torch
from open_clip import IMAGENET_CLASSNAMES

from open_clip_starft.errors import StarftError
from open_clip_starft.eval.sets import builtin_subset, load_subset
from open_clip_starft.eval.metrics import (
    classification_metrics, expected_calibration_error, per_class_accuracy, restrict_logits, topk_accuracy,
)


def test_top5_and_per_class_on_known_logits():
    # 6 classes; the rank of the label among the logits: 1st, 4th, 3rd, 6th
    logits = torch.tensor([
        [9., 1, 2, 3, 4, 5],   # label 0: rank 1
        [1., 2, 9, 8, 3, 4],   # label 4 (logit 3): rank 4, behind 9, 8 and 4
        [6., 5, 4, 3, 2, 1],   # label 2: rank 3
        [1., 2, 3, 4, 5, 6],   # label 0: rank 6
    ])
    labels = torch.tensor([0, 4, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 4)
    assert topk_accuracy(logits, labels, 5) == pytest.approx(3 / 4)
    assert topk_accuracy(logits[:, :4], torch.tensor([0, 1, 2, 0]), 5) is None  # fewer than 5 classes
    assert per_class_accuracy(logits.argmax(1), labels) == {0: 0.5, 2: 0.0, 4: 0.0}
    m = classification_metrics(logits, labels)
    assert m["top1"] == pytest.approx(0.25) and m["top5"] == pytest.approx(0.75)
    assert m["per_class_mean"] == pytest.approx(0.5 / 3)
    assert m["groups"] == {0: 0.25} and m["worst_group"] == m["avg_group"] == pytest.approx(0.25)


def test_group_metrics_worst_and_average_group():
    logits = torch.eye(3)[[0, 1, 1, 1, 0, 2, 2, 0]] * 5  # predictions 0,1,1,1,0,2,2,0
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
    groups = torch.tensor([0, 0, 1, 1, 1, 3, 3, 3])      # group 2 is empty and must not appear
    m = classification_metrics(logits, labels, groups)
    assert m["groups"] == {0: 0.5, 1: pytest.approx(2 / 3), 3: pytest.approx(2 / 3)}
    assert m["worst_group"] == 0.5
    assert m["avg_group"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)
    assert m["top1"] == pytest.approx(5 / 8) and m["n"] == 8


def test_expected_calibration_error_by_hand():
    # confidence, correct: .95 yes, .55 no, .65 yes, .85 no
    probs = torch.tensor([[0.95, 0.05], [0.55, 0.45], [0.35, 0.65], [0.15, 0.85]])
    labels = torch.tensor([0, 1, 1, 0])
    # 10 bins: one sample per bin → mean |acc − conf| = (.05 + .55 + .35 + .85) / 4
    assert expected_calibration_error(probs, labels, 10) == pytest.approx(1.8 / 4)
    # 2 bins: all four in (0.5, 1]: |0.5 − 0.75|
    assert expected_calibration_error(probs, labels, 2) == pytest.approx(0.25)
    # through classification_metrics: logits are log-probabilities (softmax gives the probabilities back)
    assert classification_metrics(probs.log(), labels, n_bins=10)["ece"] == pytest.approx(0.45)
    # a perfectly calibrated case
    assert expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])) == 0.0


def test_class_subset_restricts_the_logits():
    logits = torch.zeros(2, 10)
    logits[0, 9] = 5.0  # the global argmax, outside the subset
    logits[0, 3] = 2.0  # the best class of the subset: subset position 1
    logits[1, 7] = 4.0  # subset position 2
    class_map = [[1], [3], [7]]
    restricted = restrict_logits(logits, class_map)
    assert restricted.shape == (2, 3)
    assert restricted.argmax(1).tolist() == [1, 2]
    m = classification_metrics(restricted, torch.tensor([1, 2]))
    assert m["top1"] == 1.0
    assert classification_metrics(logits, torch.tensor([3, 7]))["top1"] == 0.5  # without the subset: one wrong
    # a many-to-one map (ObjectNet): the maximum logit over each class's head classes
    mapped = restrict_logits(logits, [[0, 9], [3, 7]])
    assert mapped.tolist() == [[5.0, 2.0], [0.0, 4.0]]


@pytest.mark.parametrize("name, first", [("imagenet-a", [6, 11, 13, 15, 17, 22, 23, 27, 30, 37]),
                                         ("imagenet-r", [1, 2, 4, 6, 8, 9, 11, 13, 22, 23])])
def test_shipped_200_class_subsets(name, first):
    ids = builtin_subset(name)
    assert len(ids) == 200 and ids == sorted(set(ids)) and 0 <= ids[0] and ids[-1] < 1000
    assert ids[:10] == first
    assert load_subset(name, 1000) == ids
    assert IMAGENET_CLASSNAMES[ids[0]] == {"imagenet-a": "stingray", "imagenet-r": "goldfish"}[name]


def test_subset_errors():
    with pytest.raises(StarftError, match="class id 1000 of the list is out of range for the 1000 class names"):
        load_subset([1, 2, 1000], 1000)
    with pytest.raises(StarftError, match="out of range for the 4 class names"):
        load_subset("1,2,9", 4)
    with pytest.raises(StarftError, match="appears twice"):
        load_subset("1,1", 4)
    with pytest.raises(StarftError, match="no such file"):
        load_subset("missing-subset.txt", 4)
    assert load_subset("0, 2", 4) == [0, 2] and load_subset(None, 4) is None
    assert not math.isnan(expected_calibration_error(torch.tensor([[0.5, 0.5]]), torch.tensor([0])))
