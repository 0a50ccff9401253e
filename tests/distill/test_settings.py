"""``Distillation`` is checked when made, and every front end honours or refuses its settings."""

from __future__ import annotations

import pytest

from prunekit.distill import Distillation, DistillationCallback
from prunekit.errors import PrunekitError
from prunekit.lightning import PruningCallback


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(kd_temperature=2.0), "training without distillation does not use --kd-temperature"),
        (dict(task_loss_weight=0.0), "training without distillation does not use --task-loss-weight"),
        (dict(teacher="org/model"), "training without distillation does not use --teacher"),
        (dict(hidden_weight=1.0, kd_temperature=2.0), "distillation without kd_weight does not use --kd-temperature"),
        (dict(kd_weight=1.0, hidden_loss="cosine"), "distillation without hidden_weight does not use --hidden-loss"),
        (dict(kd_weight=1.0, hidden_layers=(1,)), "does not use --hidden-layers"),
        (dict(kd_weight=-1.0), "kd_weight must be a finite number >= 0"),
        (dict(kd_weight=1.0, kd_temperature=0.0), "kd_temperature must be"),
        (dict(hidden_weight=1.0, hidden_loss="l1"), "unknown hidden_loss"),
        (dict(hidden_weight=1.0, hidden_layers=(1, 1)), "distinct block indices"),
        (dict(kd_weight="1"), "kd_weight must be a number"),
        (dict(kd_weight=1.0, teacher_device="tpu:9"), "teacher_device: unknown device"),
    ],
)
def test_bad_or_unused_settings_fail_when_made(settings, message):
    with pytest.raises(PrunekitError, match=message):
        Distillation(**settings)


def test_the_callback_takes_the_settings_or_their_fields():
    settings = Distillation(kd_weight=1.0, kd_temperature=2.0)
    assert DistillationCallback(settings).settings == DistillationCallback(kd_weight=1.0, kd_temperature=2.0).settings
    assert DistillationCallback(teacher="org/model", kd_weight=1.0).settings.teacher == "org/model"
    assert Distillation(hidden_weight=1.0, hidden_layers=[0, 2]).hidden_layers == (0, 2)  # a YAML list
    with pytest.raises(PrunekitError, match="distils nothing"):
        DistillationCallback()
    with pytest.raises(PrunekitError, match="unknown distillation setting"):
        DistillationCallback(kd_weigth=1.0)
    with pytest.raises(PrunekitError, match="inside the Distillation"):
        DistillationCallback(settings, hidden_weight=1.0)


def test_the_pruning_callback_points_distillation_settings_to_its_own_callback():
    with pytest.raises(PrunekitError, match="PruningCallback does not distil \\(kd_weight\\).*DistillationCallback"):
        PruningCallback("wanda", 0.5, kd_weight=1.0)
