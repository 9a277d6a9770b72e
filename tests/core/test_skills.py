"""hot_skills: a skill is hot when every model it needs is in the hot cache."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rca_core._skills import hot_skills

DEPS = {
    "image_generation": ["stable_diffusion_v1.5", "vae-ft-mse"],
    "upscale": ["realesrgan_x4"],
}


def test_the_reference_readme_walkthrough() -> None:
    assert hot_skills(DEPS, []) == []
    assert hot_skills(DEPS, ["stable_diffusion_v1.5"]) == []
    assert hot_skills(DEPS, ["stable_diffusion_v1.5", "vae-ft-mse"]) == ["image_generation"]


def test_order_follows_the_declared_skills_not_the_cache() -> None:
    cache = {"realesrgan_x4", "vae-ft-mse", "stable_diffusion_v1.5", "unrelated"}
    assert hot_skills(DEPS, cache) == ["image_generation", "upscale"]


def test_a_skill_without_dependencies_is_always_hot() -> None:
    assert hot_skills({"echo": [], "upscale": ["realesrgan_x4"]}, ()) == ["echo"]


def test_no_skills_no_hot_skills() -> None:
    assert hot_skills({}, ["anything"]) == []


MODELS = st.sampled_from(["a", "b", "c", "d", "e"])


@given(
    st.dictionaries(st.text(max_size=4), st.lists(MODELS, max_size=3), max_size=6),
    st.lists(MODELS, max_size=5),
)
def test_hot_skills_are_exactly_the_satisfied_skills_in_order(
    deps: dict[str, list[str]], cache: list[str]
) -> None:
    hot = hot_skills(deps, cache)
    assert hot == [skill for skill in deps if set(deps[skill]) <= set(cache)]
    assert hot_skills(deps, list(deps_models(deps))) == list(deps)


def deps_models(deps: dict[str, list[str]]) -> set[str]:
    return {model for models in deps.values() for model in models}
