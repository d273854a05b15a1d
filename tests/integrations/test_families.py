"""The family registry: each family maps its config both ways and names every weight once."""

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from tests.integrations.hf_models import CONVERTIBLE, hf_config  # noqa: E402

from moekit.integrations.hf.families import (  # noqa: E402
    FAMILIES,
    Family,
    family_for,
    register_family,
)
from moekit.model.transformer import Transformer  # noqa: E402


def test_every_convertible_model_type_has_a_family():
    assert sorted(FAMILIES) == sorted(CONVERTIBLE)


@pytest.mark.parametrize("model_type", CONVERTIBLE)
def test_config_goes_both_ways_and_exports_as_its_own_family(model_type):
    family = FAMILIES[model_type]
    cfg = family.model_config(hf_config(model_type))
    assert [f.model_type for f in FAMILIES.values() if f.claims(cfg)] == [model_type]
    assert family_for(cfg) is family
    back = transformers.AutoConfig.for_model(model_type, **family.hf_config(cfg))
    assert family.model_config(back) == cfg


@pytest.mark.parametrize("model_type", CONVERTIBLE)
def test_links_name_every_moekit_weight_once(model_type):
    family = FAMILIES[model_type]
    cfg = family.model_config(hf_config(model_type))
    with torch.device("meta"):
        names = set(Transformer(cfg).state_dict())
    ours = [link.ours for link in family.links(cfg)]
    theirs = [n for link in family.links(cfg) for n in link.theirs]
    assert sorted(ours) == sorted(names) and len(set(theirs)) == len(theirs)


def test_a_model_type_registers_once_and_a_family_provides_every_method():
    class Again(type(FAMILIES["olmoe"])):
        pass

    with pytest.raises(ValueError, match="'olmoe' is registered twice"):
        register_family(Again)

    class Partial(Family):
        model_type, architecture = "partial", "PartialForCausalLM"

    with pytest.raises(TypeError, match="abstract"):
        register_family(Partial)
    assert "partial" not in FAMILIES
