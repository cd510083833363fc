"""The client's side of a job session: the hello, the enclave's answer, resumption."""

from __future__ import annotations

import hmac

import nacl.utils

from phala_p2p.chain.tx import Signer
from phala_p2p.crypto.identity import PUBLIC_KEY_SIZE
from phala_p2p.crypto.kx import EphemeralKey
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.errors import (
    BadEnclaveSignature,
    BadMac,
    BadSessionKey,
    ReplayedHello,
    SessionExpired,
    WrongAgreement,
)
from phala_p2p.jobs.framing import encode_frame
from phala_p2p.jobs.keys import (
    RESUME_LABEL,
    RESUME_OK_LABEL,
    Direction,
    SessionKeys,
    client_hello_statement,
    enclave_hello_valid,
    handshake_transcript,
)
from phala_p2p.jobs.messages import (
    AGREEMENT_ID_LEN,
    MAX_RESUMES,
    SESSION_ID_LEN,
    ClientHello,
    EnclaveHello,
    JobMessage,
    Resume,
    ResumeOk,
)
from phala_p2p.jobs.session import Event, HandshakeComplete, JobSession, Resumed, State
from phala_p2p.market.negotiation import Agreement


class ClientJobSession(JobSession):
    """Starts a session with the enclave that an agreement names; its ClientHello is queued
    at once (``data_to_send``). ``session_id`` and ``ephemeral`` are for test vectors only."""

    outbound_direction = Direction.CLIENT_TO_ENCLAVE

    def __init__(
        self,
        agreement_id: bytes,
        enclave_key: bytes,
        config: JobConfig | None = None,
        *,
        session_id: bytes | None = None,
        ephemeral: EphemeralKey | None = None,
        client: Signer | None = None,
    ) -> None:
        if not isinstance(agreement_id, bytes) or len(agreement_id) != AGREEMENT_ID_LEN:
            raise UsageError(f"agreement_id must be {AGREEMENT_ID_LEN} bytes")
        if not isinstance(enclave_key, bytes) or len(enclave_key) != PUBLIC_KEY_SIZE:
            raise UsageError(f"enclave_key must be {PUBLIC_KEY_SIZE} bytes")
        sid = nacl.utils.random(SESSION_ID_LEN) if session_id is None else session_id
        super().__init__(sid, agreement_id, config or JobConfig())
        self._enclave_key = enclave_key
        self._ephemeral: EphemeralKey | None = ephemeral or EphemeralKey.generate()
        pub = self._ephemeral.public_key
        sig = b"" if client is None else client.sign(client_hello_statement(agreement_id, sid, pub))
        self._hello = ClientHello(
            agreement_id=agreement_id,
            session_id=sid,
            client_pub=pub,
            window=self.config.window,
            client_sig=sig,
        )
        self._attempt = 0
        self._outbox.append(encode_frame(self._hello))

    @classmethod
    def for_agreement(
        cls, agreement: Agreement, config: JobConfig | None = None, *, client: Signer | None = None
    ) -> ClientJobSession:
        """A session under ``agreement``, with the enclave identity it names; ``client`` (the
        agreement's client account) signs the hello, as an enclave that runs jobs requires."""
        if client is not None and client.public_key != agreement.terms.client:
            raise UsageError("the hello is signed by the agreement's client account")
        return cls(agreement.id, agreement.terms.enclave, config, client=client)

    @property
    def holds_ephemeral_key(self) -> bool:
        """True until the keys are derived (or the session ends): then the X25519 private key
        is dropped, which is what makes the session forward secret."""
        return self._ephemeral is not None

    @property
    def attempt(self) -> int:
        """Resumes tried so far."""
        return self._attempt

    def _drop_secrets(self) -> None:
        self._ephemeral = None

    def _accepts_plain_cancel(self) -> bool:
        # a refusal of our hello or resume: the enclave may have no keys for us
        return self._state in (State.HELLO_SENT, State.RESUMING)

    def _on_other(self, msg: JobMessage, now_ms: int) -> list[Event]:
        if self._state is State.HELLO_SENT and isinstance(msg, EnclaveHello):
            return [self._on_enclave_hello(msg)]
        if self._state is State.RESUMING and isinstance(msg, ResumeOk):
            return [self._on_resume_ok(msg)]
        return super()._on_other(msg, now_ms)

    def _on_enclave_hello(self, reply: EnclaveHello) -> HandshakeComplete:
        hello = self._hello
        if not hmac.compare_digest(reply.agreement_id, hello.agreement_id):
            raise WrongAgreement("the EnclaveHello names another agreement")
        if not hmac.compare_digest(reply.session_id, hello.session_id):
            raise ReplayedHello("the EnclaveHello answers another session")
        if not enclave_hello_valid(reply, hello, self._enclave_key):
            raise BadEnclaveSignature("the EnclaveHello is not signed by the agreement's enclave")
        assert self._ephemeral is not None
        try:
            shared = self._ephemeral.exchange(reply.enclave_pub)
        except ProtocolViolation as err:
            raise BadSessionKey(str(err)) from err
        self._ephemeral = None
        transcript = handshake_transcript(hello, reply, self._enclave_key)
        self._install(SessionKeys.derive(shared, transcript, hello), peer_window=reply.window)
        return HandshakeComplete(session_id=self.session_id)

    def resume(self, now_ms: int) -> None:
        """On a new connection: queue a Resume proving we hold the session's keys.
        SessionExpired (and the session closes) once the grace period is over."""
        if self._state is not State.SUSPENDED:
            raise (
                self._not_open()
                if self._state is State.CLOSED
                else UsageError(f"resume only a suspended session (state {self._state.value})")
            )
        if self.expired(now_ms):
            self.close()
            raise SessionExpired("the session's grace period is over")
        if self._attempt >= MAX_RESUMES:
            raise UsageError("the session was resumed too often")
        assert self._receiver is not None
        self._attempt += 1
        index = self._receiver.index
        keys = self._live_keys()
        mac = keys.mac(Direction.CLIENT_TO_ENCLAVE, RESUME_LABEL, self._attempt, index)
        self._new_connection()
        self._generation += 1
        self._state = State.RESUMING
        self._outbox.append(
            encode_frame(
                Resume(session_id=self.session_id, attempt=self._attempt, next_index=index, mac=mac)
            )
        )

    def _on_resume_ok(self, ok: ResumeOk) -> Resumed:
        keys = self._live_keys()
        if ok.session_id != self.session_id or ok.attempt != self._attempt:
            raise ProtocolViolation(
                "the ResumeOk answers another resume", reason="unexpected_message"
            )
        peer = Direction.ENCLAVE_TO_CLIENT
        if not keys.mac_valid(peer, ok.mac, RESUME_OK_LABEL, ok.attempt, ok.next_index):
            raise BadMac("the ResumeOk has a bad MAC")
        assert self._sender is not None
        frames = self._sender.resend_from(ok.next_index)
        self._outbox.extend(frames)
        self._state = State.OPEN
        return Resumed(attempt=ok.attempt, resent_from=ok.next_index, resent=len(frames))


__all__ = ["ClientJobSession"]
