"""The running ComfyUI's list of model classes is the spec of the family matrix: every class in
``comfy.supported_models.models`` is either the ``detected_as`` of a family (tools/family_models.py; the matrix trains
it, tests/test_family_matrix.py) or in the one table of classes it cannot train, with the reason
(tools/untrainable_families.py). A class a newer ComfyUI adds fails here until it is one or the other. Only imports
ComfyUI and compares lists (the size checks build models on the meta device).
"""
from __future__ import annotations

import math
import types

import pytest

import family_models as fm
import harness
import untrainable_families as ut

pytestmark = pytest.mark.fast


def comfyui_classes() -> list[str]:
    harness.put_comfyui_on_path()
    import comfy.supported_models

    return [model.__name__ for model in comfy.supported_models.models]


FAMILY_CLASSES = {family.detected_as for family in fm.FAMILIES}


def test_every_model_class_of_the_running_comfyui_is_a_family_or_in_the_table():
    classes = comfyui_classes()
    missing = [name for name in classes if name not in FAMILY_CLASSES | set(ut.UNTRAINABLE)]
    assert not missing, (f"ComfyUI {harness.comfyui_version()} has model classes that are neither a family in "
                         f"tools/family_models.py nor in tools/untrainable_families.py (with the reason it cannot "
                         f"train at a tiny size): {', '.join(missing)}")


def test_the_table_lists_no_class_that_has_a_family():
    stale = sorted(set(ut.UNTRAINABLE) & FAMILY_CLASSES)
    assert not stale, f"these classes have a family in tools/family_models.py: drop them from the table: {stale}"


@pytest.mark.parametrize("name", sorted(ut.UNTRAINABLE))
def test_each_entry_gives_a_reason_of_its_kind(name):
    entry = ut.UNTRAINABLE[name]
    assert entry.kind in ut.KINDS and entry.reason.strip(), name
    assert (entry.kind == ut.BIG) == (entry.probe is not None) == (entry.billions > 0), \
        f"{name}: a BIG entry (only) states its size and keeps the probe that builds it"
    if entry.probe is not None:
        assert entry.probe.detected_as == name and entry.billions * 1e9 > ut.TINY_LIMIT, name


@pytest.mark.parametrize("name", sorted(n for n, e in ut.UNTRAINABLE.items() if e.kind == ut.BIG))
def test_a_big_entry_is_as_big_as_it_says_on_the_running_comfyui(name):
    """The probe's model, as this ComfyUI builds it (meta device), is the stated size, over the matrix's limit."""
    if name not in comfyui_classes():
        pytest.skip(f"ComfyUI {harness.comfyui_version()} has no {name} model")
    entry = ut.UNTRAINABLE[name]
    width = entry.probe.widths[0]
    detected, shapes = fm.detect(entry.probe.probe(width), entry.probe.metadata, real_memory=False)
    assert detected == name
    parameters = sum(math.prod(s) for s in shapes.values())
    assert parameters > ut.TINY_LIMIT
    assert round(parameters / 1e9, 2) == entry.billions, \
        f"{name}: the smallest model has {parameters / 1e9:.2f} B parameters, the table says {entry.billions}"


# The model class of each image-to-image sampling (table entries that quote the trainer's refusal)
IMAGE_TO_IMAGE_CLASSES = {"IMG_TO_IMG": "LotusD", "IMG_TO_IMG_FLOW": "WAN21_FlowRVS"}


def test_an_image_to_image_model_is_refused_before_training():
    """Lotus and FlowRVS start from a source latent, not noise: the trainer refuses them, naming the input, as their
    table entries quote."""
    harness.put_comfyui_on_path()
    import comfy.model_base
    import comfy.model_sampling

    comfy_bridge = harness.load_pack().nodes.comfy_bridge
    for name in comfy_bridge.IMAGE_TO_IMAGE:
        if not hasattr(comfy.model_sampling, name):
            continue  # IMG_TO_IMG_FLOW: ComfyUI 0.33+
        model_class = IMAGE_TO_IMAGE_CLASSES[name]
        config = types.new_class(model_class)()
        config.sampling_settings = {}
        patcher = types.SimpleNamespace(model=types.SimpleNamespace(
            model_config=config,
            model_sampling=comfy.model_base.model_sampling(config, getattr(comfy.model_base.ModelType, name))))
        with pytest.raises(ValueError) as e:
            comfy_bridge.check_trainable(patcher)
        assert str(e.value).startswith(f"model: this {model_class} model maps a source latent to a target "
                                       f"(ComfyUI's {name} sampling")
        assert f"'{e.value}'" in ut.UNTRAINABLE[model_class].reason
