"""The list routes' paging, filtering and sorting (a pure function; the routes that use it
are tested over HTTP with them)."""

from __future__ import annotations

import pytest

from tabserve.errors import BadRequest
from tabserve.server.paging import asked, paginate

FIELDS = {"name": str, "version": int, "public": bool}
ITEMS = [{"name": f"model{i:03d}", "version": i % 7, "public": i % 2 == 0} for i in range(250)]


@pytest.mark.parametrize("size", [1, 100, 1000])
def test_pages_cover_every_item_once(size: int) -> None:
    seen = []
    number = 1
    while True:
        page, info = paginate(ITEMS, {"page_number": str(number), "page_size": str(size)}, FIELDS)
        assert info.total_available == 250 and info.page_size == size
        if not page:
            break
        seen.extend(page)
        number += 1
    assert seen == ITEMS
    assert number - 1 == -(-250 // size)


def test_filters_convert_values_to_the_field_type() -> None:
    page, info = paginate(ITEMS, {"filter": "version:gte:5,public:eq:true"}, FIELDS)
    assert info.total_available == len(page) > 0
    assert all(item["version"] >= 5 and item["public"] for item in page)
    page, _ = paginate(ITEMS, {"filter": "name:in:model001|model002|nope"}, FIELDS)
    assert [item["name"] for item in page] == ["model001", "model002"]
    page, _ = paginate(ITEMS, {"filter": "name:has:MODEL24"}, FIELDS)
    assert len(page) == 10


def test_sorts_by_several_fields() -> None:
    page, _ = paginate(ITEMS, {"sort": "version:desc,name:asc", "page_size": "1000"}, FIELDS)
    keys = [(-item["version"], item["name"]) for item in page]
    assert keys == sorted(keys)


@pytest.mark.parametrize(
    "query",
    [
        {"page_number": "0"},
        {"page_size": "1001"},
        {"page_size": "ten"},
        {"filter": "owner:eq:x"},
        {"filter": "version:eq:two"},
        {"filter": "version:like:2"},
        {"filter": "version"},
        {"sort": "version:up"},
        {"sort": "colour"},
    ],
)
def test_bad_parameters_are_400s_that_say_why(query: dict[str, str]) -> None:
    with pytest.raises(BadRequest) as caught:
        paginate(ITEMS, query, FIELDS)
    assert caught.value.status == 400 and caught.value.info["given"]


def test_asked_only_when_a_paging_parameter_is_present() -> None:
    assert not asked({})
    assert not asked({"other": "1"})
    assert asked({"page_size": "5"})


def test_a_filter_value_may_hold_a_comma_a_pipe_or_a_backslash() -> None:
    items = [{"name": "a,b", "version": 1, "public": True},
             {"name": "a", "version": 2, "public": True},
             {"name": "b|c\\d", "version": 3, "public": False}]  # fmt: skip
    page, _ = paginate(items, {"filter": r"name:eq:a\,b"}, FIELDS)
    assert [item["name"] for item in page] == ["a,b"]
    page, _ = paginate(items, {"filter": r"name:in:a\,b|b\|c\\d"}, FIELDS)
    assert [item["name"] for item in page] == ["a,b", "b|c\\d"]
    page, _ = paginate(items, {"filter": r"name:has:\,,version:lt:3"}, FIELDS)
    assert [item["name"] for item in page] == ["a,b"]
