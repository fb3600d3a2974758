"""Sender addresses are parsed strictly before `allowed_senders` sees them."""

from __future__ import annotations

import pytest

from gateway.mail.addresses import envelope_address, header_address, sender_matches

TRUSTED = ("*@trusted.example", "alerts@partner.example")


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("<Jane@Trusted.Example>", "jane@trusted.example", id="plain"),
        pytest.param("jane@trusted.example", "jane@trusted.example", id="no-brackets"),
        pytest.param("<>", "", id="null-sender"),
        pytest.param(
            "<@relay.example,@x.example:jane@trusted.example>",
            "jane@trusted.example",
            id="source-route",
        ),
        pytest.param('<"jane"@trusted.example>', "jane@trusted.example", id="needless-quotes"),
        pytest.param('<"x@evil.example"@trusted.example>', None, id="quoted-at"),
        pytest.param('<"x>@evil.example"@trusted.example>', None, id="quoted-bracket"),
        pytest.param("<x@evil.example@trusted.example>", None, id="two-ats"),
        pytest.param("<x@trusted.example\x00>", None, id="nul"),
        pytest.param("<x y@trusted.example>", None, id="space"),
        pytest.param("<x@[192.0.2.1]>", "x@[192.0.2.1]", id="address-literal"),
        pytest.param("<x@mail.trusted.example.>", "x@mail.trusted.example", id="trailing-dot"),
        pytest.param("<x@trusted..example>", None, id="empty-label"),
        # `(label\.?)+` backtracked exponentially here: 22 letters took seconds, 60 would hang
        pytest.param("<x@" + "a" * 60 + "->", None, id="no-catastrophic-backtracking"),
        pytest.param("<x@" + "a." * 2000 + "!>", None, id="many-labels"),
    ],
)
def test_envelope_addresses(path: str, expected: str | None) -> None:
    assert envelope_address(path) == expected


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param(["Jane <jane@trusted.example>"], "jane@trusted.example", id="display-name"),
        pytest.param(
            ['"jane@trusted.example" <x@evil.example>'],
            "x@evil.example",
            id="display-name-is-not-the-address",
        ),
        pytest.param(["a@trusted.example, b@evil.example"], None, id="two-addresses"),
        pytest.param(["a@trusted.example", "b@trusted.example"], None, id="two-from-headers"),
        pytest.param(["Team: a@trusted.example;"], None, id="group"),
        pytest.param([], None, id="no-from"),
        pytest.param(["not an address"], None, id="garbage"),
        pytest.param(
            ["=?utf-8?q?Doe=2C_Jane?= <Jane@Trusted.Example>"],
            "jane@trusted.example",
            id="encoded-display-name-with-comma",
        ),
        pytest.param(['"Doe, Jane" <jane@trusted.example>'], "jane@trusted.example", id="quoted"),
        pytest.param(["x <a@trusted.example> <b@evil.example>"], None, id="two-angle-addrs"),
        pytest.param(["<a@trusted.example"], None, id="unclosed-angle"),
        pytest.param(["a " * 8000 + "<x@trusted.example"], None, id="long-odd-value"),
        pytest.param(["Jane <jane@" + "a" * 60 + "->"], None, id="no-catastrophic-backtracking"),
    ],
)
def test_header_addresses(values: list[str], expected: str | None) -> None:
    assert header_address(values) == expected


@pytest.mark.parametrize(
    ("path", "allowed"),
    [
        ("<x@trusted.example>", True),
        ("<ALERTS@Partner.Example>", True),
        ('<"x@evil.example"@trusted.example>', False),
        ("<@trusted.example:x@evil.example>", False),  # the route is dropped, not the address
        ("<>", False),
        ("<x@evil.example>", False),
    ],
)
def test_only_a_plain_matching_address_is_allowed(path: str, allowed: bool) -> None:
    assert sender_matches(envelope_address(path), TRUSTED) is allowed
