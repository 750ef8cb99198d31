"""A site's failure on the wire: site_error encodes the site as a field, read_error decodes it.

Hand-built Flower Errors and Messages, as a coordinator receives them: fedmed's JSON reason,
an older fedmed site's "site 'x': ..." text, and replies that are neither (Flower's own errors,
garbage, a reason far too long).
"""

from __future__ import annotations

import json

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.supercore.task_identity import TaskIdentity

from fedmed.errors import DataError, PolicyViolation, PrivacyBudgetExceeded
from fedmed.protocol import (
    MAX_DETAIL_CHARS,
    MAX_WIRE_CHARS,
    SiteFailure,
    SiteReason,
    read_error,
    site_error,
)


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id = 1, 1
    TaskIdentity.node_id = SUPERLINK_NODE_ID


def _over_the_wire(error: Error) -> Error:
    """``error`` as a reply carrying it arrives: serialized and parsed back by Flower."""
    asked = Message(RecordDict(), dst_node_id=7, message_type="train")
    asked.metadata.__dict__["_message_id"] = "m1"
    reply = message_from_proto(message_to_proto(Message(error, reply_to=asked)))
    assert reply.has_error()
    return reply.error


@pytest.mark.parametrize("code", list(SiteReason))
def test_every_reason_round_trips_through_a_flower_message(code: SiteReason) -> None:
    error = _over_the_wire(site_error("st-marys", code, "why, in a few words"))
    assert type(error.code) is int and error.code == int(code)
    assert json.loads(error.reason) == {"site": "st-marys", "reason": "why, in a few words"}
    told = read_error(error)
    assert told == SiteFailure("st-marys", code, "why, in a few words")
    assert told.reason is code
    assert str(told) == "site 'st-marys': why, in a few words"


def test_reasons_are_distinct_and_clear_of_flowers_own_codes() -> None:
    flower = {v for k, v in vars(ErrorCode).items() if k.isupper()}
    assert len({int(c) for c in SiteReason}) == len(SiteReason)
    assert not flower & {int(c) for c in SiteReason}
    assert SiteReason.IMPERSONATION == 403


def test_a_site_name_with_quotes_or_colons_is_still_one_field() -> None:
    """The text form could not carry these; the JSON one does not care."""
    told = read_error(site_error("o'brien: east", SiteReason.FAILED, "site 'x': not me"))
    assert (told.site, told.detail) == ("o'brien: east", "site 'x': not me")


LEDGER = "privacy ledger failed verification; the site trains no more until restored"


@pytest.mark.parametrize(
    ("code", "detail", "meant"),
    [
        (403, "plan sha256:ab is not approved by this site", SiteReason.POLICY_REFUSED),
        (400, "the plan could not be read", SiteReason.PLAN_UNREADABLE),
        (500, "privacy budget exhausted", SiteReason.BUDGET_EXHAUSTED),
        (500, LEDGER, SiteReason.LEDGER_DAMAGED),
        (500, "site data failed validation (details in the site's log)", SiteReason.DATA_INVALID),
        (500, "site failed (details in the site's log)", SiteReason.FAILED),
        (500, "the site only trains with local differential privacy", SiteReason.FAILED),
    ],
)
def test_an_older_sites_text_is_read(code: int, detail: str, meant: SiteReason) -> None:
    error = _over_the_wire(Error(code=code, reason=f"site 'delta': {detail}"))
    assert read_error(error) == SiteFailure("delta", meant, detail)


def test_an_older_site_that_did_not_know_its_name_names_no_site() -> None:
    text = "site '?': site failed (details in the site's log)"
    assert read_error(Error(500, text)) == SiteFailure(None, 500, text)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        # Flower's own errors name no site: the coordinator attributes them by node.
        (Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "ClientApp raised RuntimeError"),
         SiteFailure(None, 2, "ClientApp raised RuntimeError")),
        (Error(ErrorCode.NODE_UNAVAILABLE), SiteFailure(None, 5, "failed")),
        (Error(500, ""), SiteFailure(None, 500, "failed")),
        (Error(500, "{not json"), SiteFailure(None, 500, "{not json")),
        (Error(500, '{"reason": "disk full"}'), SiteFailure(None, 500, "disk full")),
        (Error(500, '{"site": 7, "reason": "x"}'), SiteFailure(None, 500, "x")),
        (Error(500, '{"site": "", "reason": "x"}'), SiteFailure(None, 500, "x")),
        (Error(500, '{"site": "a", "reason": ["x"]}'), SiteFailure("a", 500, "failed")),
        (Error(500, '["site", "a"]'), SiteFailure(None, 500, '["site", "a"]')),
        (Error(500, '{"site": "a\\nb", "reason": "x"}'), SiteFailure(None, 500, "x")),
        (Error(500, '{"site": "a", "reason": "line\\nbreak\\u001b[31m"}'),
         SiteFailure("a", 500, "line break [31m")),
        (Error(500, "site 'a' with no colon"), SiteFailure(None, 500, "site 'a' with no colon")),
        (Error(999, '{"site": "a", "reason": "x"}'), SiteFailure("a", 999, "x")),
    ],
)  # fmt: skip
def test_a_malformed_reason_is_read_without_failing(error: Error, expected: SiteFailure) -> None:
    told = read_error(_over_the_wire(error))
    assert told == expected
    assert told.reason is None or told.reason == told.code


def test_a_huge_reason_is_cut_and_not_parsed() -> None:
    told = read_error(Error(500, "x" * 1_000_000))
    assert told.site is None and len(told.detail) == MAX_DETAIL_CHARS and told.detail[-1] == "…"

    padded = json.dumps({"site": "a", "reason": "x", "pad": "y" * MAX_WIRE_CHARS})
    assert read_error(Error(500, padded)).site is None  # not ours: too long to be parsed

    told = read_error(site_error("a", SiteReason.FAILED, "z" * 100_000))  # cut when sent too
    assert told.site == "a" and len(told.detail) == MAX_DETAIL_CHARS

    long_site = json.dumps({"site": "s" * 65, "reason": "x"})
    assert read_error(Error(500, long_site)).site is None  # a cut name would blame another site


@pytest.mark.parametrize(
    ("exc", "code", "detail"),
    [
        (PrivacyBudgetExceeded("site 'a': ε 3.2 over cap 3 at /srv/ledger.json"),
         SiteReason.BUDGET_EXHAUSTED, "privacy budget exhausted"),
        (DataError("/data/patients.csv row 17: age 'abc'"),
         SiteReason.DATA_INVALID, "site data failed validation (details in the site's log)"),
        (PolicyViolation("the site only trains with local differential privacy"),
         SiteReason.POLICY_REFUSED, "the site only trains with local differential privacy"),
        (RuntimeError("Traceback: /home/site/secret.py line 3"),
         SiteReason.FAILED, "site failed (details in the site's log)"),
    ],
)  # fmt: skip
def test_a_failing_site_handler_replies_with_a_code_and_says_little(
    exc: Exception, code: SiteReason, detail: str
) -> None:
    from fedmed.site.app import fail_closed_mod

    def handler(msg: Message, context: Context) -> Message:
        raise exc

    asked = Message(RecordDict(), dst_node_id=7, message_type="train")
    asked.metadata.__dict__["_message_id"] = "m1"
    context = Context(1, 7, {"partition-id": 0}, RecordDict(), {})
    reply = fail_closed_mod(asked, context, handler)
    # The message carries no plan, so the site cannot tell its name: the coordinator names it.
    assert read_error(_over_the_wire(reply.error)) == SiteFailure(None, code, detail)


# -- federated statistics replies ------------------------------------------------------------


def _stats_shape(key: str) -> int | None:
    return {"cohort": 1, "outcome": 3, "bins/age": 4}.get(key)


def test_a_sites_statistics_round_trip() -> None:
    from fedmed.protocol import decode_stats, encode_stats

    text = encode_stats(
        {"cohort": [40], "bins/age": [0, None, 30, 10]},
        {"age": [2.0, 9.0]},
        epsilon=0.5,
        min_cell=10,
    )

    body = decode_stats(text, _stats_shape)

    assert body["cells"]["bins/age"] == [0, None, 30, 10]
    assert body["sums"] == {"age": [2.0, 9.0]} and body["epsilon"] == 0.5 and body["min_cell"] == 10


@pytest.mark.parametrize(
    "cells",
    [
        {"rows": [1]},  # a vector nobody asked for
        {"cohort": [1, 2]},  # another shape
        {"cohort": [1.5]},  # not a count
        {"cohort": [-1]},
        {"cohort": [True]},
        {"cohort": ["40"]},
        {"cohort": [10**12]},
    ],
)
def test_a_statistics_reply_that_is_not_counts_is_refused(cells: dict) -> None:
    from fedmed.protocol import decode_stats, encode_stats

    with pytest.raises(ValueError):
        decode_stats(encode_stats(cells, {}, epsilon=0.0, min_cell=10), _stats_shape)


@pytest.mark.parametrize(
    "body",
    [
        {"cells": {}, "sums": {"age": [1.0, -1.0]}, "epsilon": 0.0, "min_cell": 10},
        {"cells": {}, "sums": {"bp": [1.0, 1.0]}, "epsilon": 0.0, "min_cell": 10},
        {"cells": {}, "sums": {"age": [float("nan"), 1.0]}, "epsilon": 0.0, "min_cell": 10},
        {"cells": {}, "sums": {}, "epsilon": -1.0, "min_cell": 10},
        {"cells": {}, "sums": {}, "epsilon": 0.0, "min_cell": 0},
        {"cells": {}, "sums": {}, "epsilon": 0.0, "min_cell": 10, "rows": [[1, 2]]},
    ],
)
def test_a_statistics_reply_with_bad_sums_or_extra_fields_is_refused(body: dict) -> None:
    from fedmed.protocol import decode_stats

    with pytest.raises(ValueError):
        decode_stats(json.dumps(body), _stats_shape)


@pytest.mark.parametrize(
    "edges",
    [
        {"features": {"age": [1.0, 1.0]}, "km": None},  # not increasing
        {"features": {"age": [1.0]}, "km": None},
        {"features": {"age": [0.0, float("inf")]}, "km": None},
        {"features": {}, "km": list(range(2000))},
        {"features": {}},
    ],
)
def test_a_site_refuses_edges_that_are_not_edges(edges: dict) -> None:
    from fedmed.protocol import decode_edges

    with pytest.raises(ValueError):
        decode_edges(json.dumps(edges))
