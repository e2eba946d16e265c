"""Tag patterns, immutability and which tags retention removes (pure rules)."""

from __future__ import annotations

import pytest

from registry_server.protocol.tag_rules import (
    NO_RULES,
    Retention,
    TagPatternError,
    TagRules,
    combine,
    validate_pattern,
)


@pytest.mark.parametrize("pattern", ["v*", "release-?", "latest", "1.2.*", "*", "a_b-c.d"])
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["", "v[0-9]", "a/b", "x" * 129, "v* ", "../x"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(TagPatternError):
        validate_pattern(pattern)


def test_immutable_matching_is_whole_tag_and_case_sensitive() -> None:
    rules = TagRules(immutable=("v*", "release-?"))
    assert rules.is_immutable("v1.2.3")
    assert rules.is_immutable("release-1")
    assert not rules.is_immutable("release-10")
    assert not rules.is_immutable("V1")
    assert not rules.is_immutable("dev-v1")
    assert not NO_RULES.is_immutable("anything")


def test_retention_keeps_the_newest_and_every_protected_tag() -> None:
    rules = TagRules(immutable=("v*",), retention=Retention(2, ("stable",)))
    tags = [("v1", 1), ("stable", 2), ("a", 3), ("b", 4), ("c", 5), ("d", 6), ("v2", 7)]
    assert rules.expired(tags) == ["a", "b"]
    assert rules.expired([("a", 1)]) == []
    assert NO_RULES.expired(tags) == []


def test_retention_ties_are_broken_by_name_the_same_everywhere() -> None:
    rules = TagRules(retention=Retention(1))
    assert rules.expired([("b", 5), ("a", 5)]) == ["a"]
    assert rules.expired([("a", 5), ("b", 5)]) == ["a"]


def test_combine_keeps_the_most() -> None:
    combined = combine(
        [
            TagRules(immutable=("v*",), retention=Retention(2, ("stable",))),
            TagRules(immutable=("v*", "prod"), retention=Retention(5, ("lts-*",))),
            NO_RULES,
        ]
    )
    assert combined == TagRules(("v*", "prod"), Retention(5, ("stable", "lts-*")))
    assert combine([]) == NO_RULES


def test_combined_untagged_days_keep_the_most() -> None:
    weekly = TagRules(retention=Retention(None, (), 7.0))
    monthly = TagRules(retention=Retention(10, ("v*",), 30.0))
    assert combine([weekly, monthly]).retention == Retention(10, ("v*",), 30.0)
    # Each rule has a say in what it states only.
    assert combine([weekly, TagRules(retention=Retention(3))]).retention == Retention(3, (), 7.0)
    # Retention of untagged manifests alone removes no tag.
    assert weekly.expired([("a", 1), ("b", 2)]) == []
