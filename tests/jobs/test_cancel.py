"""Cancellation: either side ends the session with a code and a text, which the other side
gets as JobCancelled; only the session's keys can produce a Cancel after the handshake."""

from __future__ import annotations

import pytest

from phala_p2p.errors import Cancelled, UsageError
from phala_p2p.jobs import (
    CancelCode,
    ClientJobSession,
    JobCancelled,
    JobConfig,
    State,
    refusal,
)
from phala_p2p.jobs.errors import BadMac, SessionClosed, WrongAgreement
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.messages import MAX_CANCEL_TEXT, Cancel

from .helpers import (
    AGREEMENT_ID,
    ENCLAVE,
    NOW,
    OTHER_AGREEMENT_ID,
    connect,
    make_table,
    messages_of,
    only_frame,
)


def test_the_client_cancels_and_the_enclave_gets_the_reason() -> None:
    client, enclave, _ = connect()
    client.cancel(CancelCode.ABORTED, "the user pressed ctrl-c")
    assert client.state is State.CLOSED
    with pytest.raises(JobCancelled) as info:
        enclave.receive_data(client.data_to_send(), NOW)
    err = info.value
    assert isinstance(err, Cancelled)
    assert err.code == CancelCode.ABORTED
    assert err.reason == "aborted"
    assert err.text == "the user pressed ctrl-c"
    assert err.authenticated
    assert enclave.state is State.CLOSED
    assert enclave.keys is None


def test_the_enclave_cancels_and_the_client_gets_the_reason() -> None:
    client, enclave, _ = connect()
    enclave.cancel(CancelCode.EXECUTION_FAILED, "trap: unreachable")
    with pytest.raises(JobCancelled) as info:
        client.receive_data(enclave.data_to_send(), NOW)
    assert info.value.reason == "execution_failed"
    assert info.value.text == "trap: unreachable"


def test_a_code_this_version_does_not_know_is_kept() -> None:
    client, enclave, _ = connect()
    client.cancel(999, "from the future")
    with pytest.raises(JobCancelled) as info:
        enclave.receive_data(client.data_to_send(), NOW)
    assert info.value.code == 999
    assert info.value.reason == "code_999"


def test_a_long_text_is_cut() -> None:
    client, _, _ = connect()
    client.cancel(CancelCode.ABORTED, "é" * 1000)
    (cancel,) = messages_of(client.data_to_send())
    assert isinstance(cancel, Cancel)
    assert cancel.text == "é" * MAX_CANCEL_TEXT


def test_a_cancel_with_a_forged_mac_is_refused() -> None:
    _, enclave, _ = connect()
    forged = Cancel(code=int(CancelCode.DEADLINE), text="forged", mac=bytes(32))
    with pytest.raises(BadMac):
        enclave.receive_data(encode_frame(forged), NOW)


def test_a_cancel_without_mac_after_the_handshake_is_refused() -> None:
    client, _, _ = connect()
    with pytest.raises(BadMac):
        client.receive_data(encode_frame(Cancel(code=1, text="relay says stop", mac=b"")), NOW)


def test_a_cancel_whose_text_was_changed_is_refused() -> None:
    client, enclave, _ = connect()
    client.cancel(CancelCode.ABORTED, "original")
    (cancel,) = messages_of(client.data_to_send())
    assert isinstance(cancel, Cancel)
    changed = Cancel(code=cancel.code, text="changed!", mac=cancel.mac)
    with pytest.raises(BadMac):
        enclave.receive_data(encode_frame(changed), NOW)


def test_a_refused_hello_reaches_the_client_as_an_unauthenticated_cancel() -> None:
    client = ClientJobSession(OTHER_AGREEMENT_ID, ENCLAVE.public_key)
    with pytest.raises(WrongAgreement) as info:
        make_table().open(only_frame(client.data_to_send()), NOW)
    with pytest.raises(JobCancelled) as cancelled:
        client.receive_data(refusal(info.value), NOW)
    assert cancelled.value.code == CancelCode.UNKNOWN_AGREEMENT
    assert not cancelled.value.authenticated
    assert "wrong_agreement" in cancelled.value.text
    assert client.state is State.CLOSED


def test_cancel_takes_a_code_and_a_text_only_once() -> None:
    client, _, _ = connect()
    with pytest.raises(UsageError):
        client.cancel(70_000)
    client.cancel()
    with pytest.raises(SessionClosed):
        client.cancel()


def test_cancel_while_suspended_just_closes() -> None:
    client, _, _ = connect(JobConfig(grace_ms=1000))
    client.connection_lost(NOW)
    client.cancel(CancelCode.ABORTED, "gave up")
    assert client.state is State.CLOSED
    assert client.data_to_send() == b""


def test_a_client_that_cancels_before_the_enclave_answers_sends_nothing() -> None:
    client = ClientJobSession(AGREEMENT_ID, ENCLAVE.public_key)
    client.cancel(CancelCode.ABORTED, "changed my mind")
    assert client.state is State.CLOSED
    assert client.data_to_send() == b""  # not even the hello
    assert not client.holds_ephemeral_key
