"""Upload session ids: the start time and the repository a session's id names."""

from __future__ import annotations

import uuid

from registry_server.storage import upload_ids


def test_an_id_names_its_start_and_repository() -> None:
    upload_id = upload_ids.new("team/app", 1_765_000_000.1234)
    parsed = upload_ids.parse(upload_id)
    assert parsed is not None
    assert parsed.started_at == 1_765_000_000.123  # to the millisecond
    assert upload_ids.belongs(upload_id, "team/app")
    assert not upload_ids.belongs(upload_id, "team/other")
    head, _, bound = upload_id.partition(".")
    value = uuid.UUID(head)
    assert value.version == 7 and value.variant == uuid.RFC_4122
    assert bound == upload_ids.binding("team/app") and len(bound) == 16
    assert not upload_ids.is_legacy(upload_id)


def test_ids_are_unique_at_the_same_millisecond() -> None:
    assert len({upload_ids.new("r", 1.0) for _ in range(1000)}) == 1000


def test_anything_else_is_not_an_id_of_the_current_form() -> None:
    good = upload_ids.new("r", 1.0)
    head, _, bound = good.partition(".")
    for text in [
        str(uuid.uuid4()),  # an earlier session's id
        f"{uuid.uuid4()}.{bound}",  # not a v7
        head,
        f"{head}.",
        f"{head}.{bound[:-1]}",
        f"{head}.{bound.upper()}",
        f"{head.upper()}.{bound}",
        f"{head}.{bound}.x",
        f"../{head}.{bound}",
        "",
        "." * 40,
    ]:
        assert upload_ids.parse(text) is None, text
        assert not upload_ids.belongs(text, "r")
    assert upload_ids.is_legacy(str(uuid.uuid4()))
    assert not upload_ids.is_legacy(good)
