"""Which skills are "hot": ready to run without loading a model first.

The heartbeat reports ``hot_skills`` so that the orchestrator can prefer a
worker that already holds a skill's models in memory. The rule is the reference
README's: a skill is hot when every model it depends on is in the hot cache.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

__all__ = ["hot_skills"]


def hot_skills(
    skill_dependencies: Mapping[str, Sequence[str]], hot_cache: Collection[str]
) -> list[str]:
    """The skills whose every dependency is in ``hot_cache``, in ``skill_dependencies`` order.

    A skill declared with no dependencies is hot: it needs nothing loaded, so
    it is as ready as it will ever be, and saying so lets the orchestrator
    count it among the worker's ready skills. This is also what the reference
    SDK reports (an empty set is a subset of any cache), so migrated blueprints
    see the same list.

    The order is the declaration order rather than sorted, so that the
    heartbeat body is stable from one beat to the next and reads like the
    worker's own ``skill_dependencies``.
    """
    hot = frozenset(hot_cache)
    return [skill for skill, models in skill_dependencies.items() if hot.issuperset(models)]
