"""The enclave's side of job sessions: answering hellos, and the table that resumes sessions.

This is the half that must later run inside the enclave process: it signs with the enclave's
identity key (any ``Signer``), so the key never has to leave the enclave.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from phala_p2p.chain.tx import Signer
from phala_p2p.crypto.kx import EphemeralKey
from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs.config import JobConfig
from phala_p2p.jobs.errors import (
    AgreementExpired,
    BadSessionKey,
    ReplayedHello,
    ResumeRefused,
    SessionExpired,
    SessionsFull,
    WrongAgreement,
    cancel_code_for,
)
from phala_p2p.jobs.framing import Frame, decode_frame, encode_frame
from phala_p2p.jobs.keys import (
    RESUME_LABEL,
    RESUME_OK_LABEL,
    Direction,
    SessionKeys,
    handshake_transcript,
    sign_enclave_hello,
)
from phala_p2p.jobs.messages import MAX_CANCEL_TEXT, Cancel, ClientHello, Resume, ResumeOk
from phala_p2p.jobs.session import JobSession, Resumed, State
from phala_p2p.market.negotiation import AgreementTerms

AgreementLookup = Callable[[bytes], AgreementTerms | None]


def refusal(err: BaseException) -> bytes:
    """The Cancel frame (without MAC: no session keys yet) refusing a connection's first frame
    because of ``err``."""
    text = f"{getattr(err, 'reason', type(err).__name__)}: {err}"[:MAX_CANCEL_TEXT]
    return encode_frame(Cancel(code=cancel_code_for(err), text=text, mac=b""))


class EnclaveJobSession(JobSession):
    """Answers one ClientHello: makes an ephemeral key, signs it, derives the keys and drops
    the ephemeral key at once. The EnclaveHello is queued in ``data_to_send``."""

    outbound_direction = Direction.ENCLAVE_TO_CLIENT

    def __init__(
        self,
        hello: ClientHello,
        signer: Signer,
        config: JobConfig | None = None,
        *,
        ephemeral: EphemeralKey | None = None,
    ) -> None:
        super().__init__(hello.session_id, hello.agreement_id, config or JobConfig())
        mine = ephemeral or EphemeralKey.generate()
        try:
            shared = mine.exchange(hello.client_pub)
        except ProtocolViolation as err:
            raise BadSessionKey(str(err)) from err
        reply = sign_enclave_hello(signer, hello, mine.public_key, self.config.window)
        del mine  # the only reference: the private key goes with it
        transcript = handshake_transcript(hello, reply, signer.public_key)
        self._install(SessionKeys.derive(shared, transcript, hello), peer_window=hello.window)
        self._last_attempt = 0
        self._outbox.append(encode_frame(reply))

    def accept_resume(self, msg: Resume, now_ms: int) -> Resumed:
        """Continue on the connection that sent ``msg``: the ResumeOk and our chunks from the
        client's position are queued. Refusals leave the session as it was, except that an
        expired session is closed (SessionExpired)."""
        if self._state is State.CLOSED or msg.session_id != self.session_id:
            raise ResumeRefused("no such session", reason="unknown_session")
        if self.expired(now_ms):
            self.close()
            raise SessionExpired("the session's grace period is over")
        keys = self._live_keys()
        proof = (Direction.CLIENT_TO_ENCLAVE, msg.mac, RESUME_LABEL, msg.attempt, msg.next_index)
        if not keys.mac_valid(*proof):
            raise ResumeRefused("the resume proof does not verify", reason="bad_proof")
        if msg.attempt <= self._last_attempt:
            raise ResumeRefused(f"resume attempt {msg.attempt} was seen", reason="replayed")
        if self._state is State.OPEN:  # the client moved on before we noticed the drop
            self.connection_lost(now_ms)
        self._last_attempt = msg.attempt
        self._new_connection()
        self._generation += 1
        assert self._sender is not None
        assert self._receiver is not None
        try:
            frames = self._sender.resend_from(msg.next_index)
        except ProtocolViolation:
            self.close()  # the client holds the keys and is broken: refuse, and end it
            raise
        index = self._receiver.index
        mac = keys.mac(Direction.ENCLAVE_TO_CLIENT, RESUME_OK_LABEL, msg.attempt, index)
        ok = ResumeOk(session_id=self.session_id, attempt=msg.attempt, next_index=index, mac=mac)
        self._outbox.append(encode_frame(ok))
        self._outbox.extend(frames)
        self._state = State.OPEN
        return Resumed(attempt=msg.attempt, resent_from=msg.next_index, resent=len(frames))


class SessionTable:
    """The enclave's sessions, by id: opens one per ClientHello, resumes one per Resume.

    ``agreements`` maps an agreement id to the terms this enclave agreed to (None if it serves
    no such agreement). At most ``max_sessions`` sessions are held (closed and expired ones are
    dropped first); the latest ``remember`` session ids are refused if a hello reuses them. An
    id forgotten after that could start a fresh session, which gives a replayer nothing: the
    keys need the client's ephemeral private key.
    """

    def __init__(
        self,
        signer: Signer,
        agreements: AgreementLookup,
        config: JobConfig | None = None,
        *,
        max_sessions: int = 64,
        remember: int = 4096,
    ) -> None:
        if type(max_sessions) is not int or max_sessions < 1:
            raise UsageError("max_sessions must be a positive int")
        if type(remember) is not int or remember < max_sessions:
            raise UsageError("remember must be an int of at least max_sessions")
        self._signer = signer
        self._agreements = agreements
        self.config = config or JobConfig()
        self.max_sessions = max_sessions
        self._remember = remember
        self._sessions: dict[bytes, EnclaveJobSession] = {}
        self._seen: OrderedDict[bytes, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: bytes) -> EnclaveJobSession | None:
        return self._sessions.get(session_id)

    def open(
        self, frame: Frame, now_ms: int, *, config: JobConfig | None = None
    ) -> EnclaveJobSession:
        """The session the first frame of a new connection opens (ClientHello) or resumes
        (Resume). Raises a ProtocolViolation (HandshakeFailed, ResumeRefused, ...) or
        SessionExpired; the driver then sends ``refusal(err)`` and closes the connection.
        ``config`` (default: the table's) applies to a session this hello opens."""
        msg = decode_frame(frame)
        if isinstance(msg, ClientHello):
            return self._start(msg, now_ms, config or self.config)
        if isinstance(msg, Resume):
            return self._resume(msg, now_ms)
        raise ProtocolViolation(
            "a connection starts with ClientHello or Resume", reason="unexpected_message"
        )

    def _start(self, hello: ClientHello, now_ms: int, config: JobConfig) -> EnclaveJobSession:
        terms = self._agreements(hello.agreement_id)
        if terms is None or terms.enclave != self._signer.public_key:
            raise WrongAgreement("this enclave serves no such agreement")
        if now_ms >= terms.deadline_ms:
            raise AgreementExpired("the agreement's deadline has passed")
        if hello.session_id in self._seen or hello.session_id in self._sessions:
            raise ReplayedHello("the session id was used before")
        self.expire(now_ms)
        if len(self._sessions) >= self.max_sessions:
            raise SessionsFull(f"{self.max_sessions} sessions are open")
        session = EnclaveJobSession(hello, self._signer, config)
        self._sessions[hello.session_id] = session
        self._seen[hello.session_id] = None
        while len(self._seen) > self._remember:
            self._seen.popitem(last=False)
        return session

    def _resume(self, msg: Resume, now_ms: int) -> EnclaveJobSession:
        session = self._sessions.get(msg.session_id)
        if session is None or session.state is State.CLOSED:
            raise ResumeRefused("no such session", reason="unknown_session")
        try:
            session.accept_resume(msg, now_ms)
        except SessionExpired:
            del self._sessions[msg.session_id]
            raise
        return session

    def expire(self, now_ms: int) -> list[bytes]:
        """Close and drop the sessions that are closed or past their grace period."""
        gone = [
            sid for sid, s in self._sessions.items() if s.state is State.CLOSED or s.expired(now_ms)
        ]
        for sid in gone:
            self._sessions.pop(sid).close()
        return gone

    def next_deadline(self) -> int | None:
        """The earliest time a held session expires (for the driver's timer)."""
        deadlines = [d for s in self._sessions.values() if (d := s.next_deadline()) is not None]
        return min(deadlines, default=None)


__all__ = ["AgreementLookup", "EnclaveJobSession", "SessionTable", "refusal"]
