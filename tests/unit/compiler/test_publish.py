"""``--publish`` flags: parsed as strictly as the spec's ``network.forwards``, merged into it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from microagent.compiler.loader import load_spec
from microagent.compiler.overrides import Overrides, apply_overrides, parse_publish, parse_publishes
from microagent.compiler.spec import Forward, NetworkMode
from microagent.errors import InvalidInputError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8080:80", Forward(8080, 80)),
        ("8080:80/tcp", Forward(8080, 80)),
        ("0.0.0.0:8080:80", Forward(8080, 80, "0.0.0.0")),
        ("192.0.2.7:1:65535/tcp", Forward(1, 65535, "192.0.2.7")),
    ],
)
def test_publish_forms(text: str, expected: Forward) -> None:
    assert parse_publish(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("8080:80/udp", "UDP is not supported: published ports are TCP only"),
        ("8080:80/UDP", "UDP is not supported"),
        ("8080:80/sctp", "unknown protocol 'sctp'"),
        ("8080:80/", "unknown protocol ''"),
        ("8080", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("8080:", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("a:b", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("080:80", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("+80:80", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("\uff18\uff10:80", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),  # fullwidth digits
        ("123456:80", "expected [HOST:]HOSTPORT:GUESTPORT[/tcp]"),
        ("0:80", "host port 0 is not 1-65535"),
        ("8080:65536", "guest port 65536 is not 1-65535"),
        ("[::1]:8080:80", "IPv6 host addresses are not supported"),
        ("::1:8080:80", "IPv6 host addresses are not supported"),
        ("localhost:8080:80", "invalid value 'localhost'"),
        (":8080:80", "invalid value ''"),
        ("1.2.3:8080:80", "invalid value '1.2.3'"),
        ("01.2.3.4:8080:80", "invalid value '01.2.3.4'"),
        ("127.0.0.1\n:8080:80", "invalid value"),
        ("224.0.0.1:8080:80", "224.0.0.1 is not an address a listener can bind"),
    ],
)
def test_publish_errors_are_clear(text: str, message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)) as raised:
        parse_publish(text)
    assert raised.value.message.startswith("--publish ")
    assert raised.value.exit_code == 2


def test_long_flags_are_cut_in_messages() -> None:
    with pytest.raises(InvalidInputError) as raised:
        parse_publish("9" * 5000)
    assert len(raised.value.message) < 200


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("8080:80", "8080:81"), "127.0.0.1:8080 is published twice"),
        (("8080:80", "0.0.0.0:8080:81"), "0.0.0.0:8080 overlaps 127.0.0.1:8080"),
    ],
)
def test_duplicate_flags_are_refused(flags: tuple[str, ...], message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        parse_publishes(flags)


def test_same_port_on_two_addresses_is_fine() -> None:
    assert len(parse_publishes(("127.0.0.1:8080:80", "127.0.0.2:8080:81"))) == 2


def _spec(tmp_path: Path, network: str) -> Path:
    path = tmp_path / "microagent.yaml"
    path.write_text(f"name: demo\n{network}")
    return path


def test_flags_extend_the_spec_and_replace_its_entry_on_the_same_bind(tmp_path: Path) -> None:
    spec = load_spec(
        _spec(
            tmp_path,
            "network:\n  forwards:\n"
            "    - {hostPort: 8080, guestPort: 80}\n"
            "    - {hostPort: 9090, guestPort: 90}\n",
        )
    )
    merged = apply_overrides(spec, Overrides(publish=("8080:8000", "0.0.0.0:7070:70")))
    assert merged.network.forwards == (
        Forward(9090, 90),
        Forward(8080, 8000),
        Forward(7070, 70, "0.0.0.0"),
    )
    assert apply_overrides(spec, Overrides()).network == spec.network


def test_publish_with_an_isolated_network_is_refused(tmp_path: Path) -> None:
    isolated = load_spec(_spec(tmp_path, "network: {mode: isolated}\n"))
    with pytest.raises(InvalidInputError, match="--publish needs network mode 'user'"):
        apply_overrides(isolated, Overrides(publish=("8080:80",)))
    with pytest.raises(InvalidInputError, match="--publish needs network mode 'user'"):
        user = load_spec(_spec(tmp_path, ""))
        apply_overrides(user, Overrides(network="isolated", publish=("8080:80",)))
    opened = apply_overrides(isolated, Overrides(network="user", publish=("8080:80",)))
    assert opened.network.mode is NetworkMode.USER


def test_an_isolated_flag_over_spec_forwards_is_refused(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path, "network:\n  forwards: [{hostPort: 8080, guestPort: 80}]\n"))
    with pytest.raises(InvalidInputError, match="--network isolated: the spec publishes ports"):
        apply_overrides(spec, Overrides(network="isolated"))
