"""What the two streams of a job session carry (``protocols/job.md``, "Job payload"): the
client's JobSpec header and the enclave's records. Both decoders are incremental: any split of
the bytes decodes the same, and arbitrary bytes raise only ProtocolViolation, with bounded
buffering."""

from __future__ import annotations

import itertools

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from phala_p2p.errors import ProtocolViolation, UsageError
from phala_p2p.jobs.errors import InboundTooLarge
from phala_p2p.jobs.payload import (
    MAX_MODULE,
    MAX_RECORD,
    FailedRecord,
    JobFailed,
    JobSpec,
    Output,
    ReceiptRecord,
    Record,
    RecordDecoder,
    RecordType,
    SpecReader,
    encode_record,
    header_size,
    job_header,
    output_records,
)
from phala_p2p.market.receipt import JobReceipt, output_hash
from phala_p2p.wire.codec import encode, kind_of

from .helpers import AGREEMENT_ID, ENCLAVE, MIB


def receipt(seq: int, *, final: bool = False) -> JobReceipt:
    return JobReceipt(
        chain_id="phala-test",
        agreement_id=AGREEMENT_ID,
        seq=seq,
        fuel_used=1000 * seq,
        bytes_in=4096 * seq,
        bytes_out=100 * seq,
        output_hash=output_hash(b"%d" % seq),
        final=final,
        enclave=ENCLAVE.public_key,
    ).sign(ENCLAVE)


RECEIPTS = [receipt(seq) for seq in range(4)]
FINAL = receipt(4, final=True)


def encoded(record: Record) -> bytes:
    if isinstance(record, Output):
        return encode_record(RecordType.OUTPUT, record.data)
    if isinstance(record, ReceiptRecord):
        return encode_record(RecordType.RECEIPT, encode(record.receipt))
    return encode_record(RecordType.FAILED, encode(record.failure))


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def decode_all(pieces: list[bytes]) -> list[Record]:
    decoder = RecordDecoder()
    records = [r for p in pieces for r in decoder.feed(p)]
    decoder.finish()
    return records


# -- the layouts, pinned ------------------------------------------------------------------


def test_kinds() -> None:
    assert kind_of(JobSpec) == 427
    assert kind_of(JobFailed) == 428


def test_the_job_header_layout() -> None:
    header = job_header(JobSpec(module_len=1000, max_fuel=1_000_000))
    #        u32 BE length | [1, 427, [1000, 1000000]]
    assert header == bytes.fromhex("0000000e9301cd01ab92cd03e8ce000f4240")
    assert header_size(JobSpec(module_len=1000, max_fuel=1_000_000)) == 18


def test_the_record_layouts() -> None:
    assert encode_record(RecordType.OUTPUT, b"hi") == bytes.fromhex("01000000026869")
    failed = encode(JobFailed(error="Trap", text="job trapped"))
    assert failed == bytes.fromhex("9301cd01ac92a454726170ab6a6f622074726170706564")
    assert encode_record(RecordType.FAILED, failed) == b"\x03\x00\x00\x00\x17" + failed
    body = encode(FINAL)
    assert encode_record(RecordType.RECEIPT, body) == b"\x02" + len(body).to_bytes(4, "big") + body


def test_record_payloads_are_bounded_when_encoded() -> None:
    assert len(encode_record(RecordType.OUTPUT, bytes(MAX_RECORD))) == 5 + MAX_RECORD
    for kind, payload in [
        (RecordType.OUTPUT, b""),
        (RecordType.OUTPUT, bytes(MAX_RECORD + 1)),
        (RecordType.RECEIPT, bytes(1025)),
        (RecordType.FAILED, bytes(1025)),
    ]:
        with pytest.raises(UsageError):
            encode_record(kind, payload)


def test_output_is_cut_into_records_of_at_most_one_mib() -> None:
    data = bytes(range(256)) * (10 * MIB // 256 // 4)  # 2.5 MiB
    records = output_records(data)
    assert [len(r) - 5 for r in records] == [MIB, MIB, MIB // 2]
    assert decode_all([*records, encoded(ReceiptRecord(FINAL))])[:3] == [
        Output(data[:MIB]),
        Output(data[MIB : 2 * MIB]),
        Output(data[2 * MIB :]),
    ]
    assert output_records(b"") == []


# -- the enclave's records ----------------------------------------------------------------

record_strategy = st.one_of(
    st.binary(min_size=1, max_size=300).map(Output),
    st.sampled_from(RECEIPTS).map(ReceiptRecord),
)
failed_strategy = st.builds(JobFailed, error=st.text(max_size=64), text=st.text(max_size=100)).map(
    FailedRecord
)


@given(
    st.lists(record_strategy, max_size=12),
    st.lists(failed_strategy, max_size=1),
    st.lists(st.integers(min_value=0), max_size=20),
)
def test_records_round_trip_under_any_split(
    records: list[Record], failed: list[Record], cuts: list[int]
) -> None:
    stream = [*records, *failed, ReceiptRecord(FINAL)]
    data = b"".join(encoded(r) for r in stream)
    assert decode_all(split(data, cuts)) == stream


@pytest.mark.parametrize("after", ["output", "failed", "intermediate receipt"])
def test_only_the_final_receipt_may_follow_failed(after: str) -> None:
    following = {
        "output": Output(b"late"),
        "failed": FailedRecord(JobFailed(error="Trap", text="again")),
        "intermediate receipt": ReceiptRecord(RECEIPTS[0]),
    }[after]
    assert not RECEIPTS[0].final
    decoder = RecordDecoder()
    decoder.feed(encoded(FailedRecord(JobFailed(error="Trap", text="t"))))
    with pytest.raises(ProtocolViolation) as err:
        decoder.feed(encoded(following))
    assert err.value.reason == "bad_record"


def test_a_largest_record_split_byte_by_byte_near_its_edges() -> None:
    data = encode_record(RecordType.OUTPUT, bytes(range(256)) * (MAX_RECORD // 256))
    final = encoded(ReceiptRecord(FINAL))
    decoder = RecordDecoder()
    for i in range(7):
        assert decoder.feed(data[i : i + 1]) == []
    assert decoder.feed(data[7:-1]) == []
    assert decoder.buffered == len(data) - 1
    assert decoder.feed(data[-1:] + final[:3]) == [Output(data[5:])]
    assert decoder.feed(final[3:]) == [ReceiptRecord(FINAL)]
    decoder.finish()


@given(st.lists(st.binary(max_size=64), max_size=8))
def test_arbitrary_bytes_raise_only_protocol_violation(pieces: list[bytes]) -> None:
    decoder = RecordDecoder()
    try:
        for p in pieces:
            decoder.feed(p)
        decoder.finish()
    except ProtocolViolation:
        pass
    assert decoder.buffered <= 5 + MAX_RECORD


@given(
    st.lists(
        st.tuples(st.integers(0, 5), st.binary(max_size=80), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_well_framed_arbitrary_payloads_raise_only_protocol_violation(
    parts: list[tuple[int, bytes, bool]],
) -> None:
    """Valid headers around arbitrary payloads: every payload decoder is exercised."""
    data = b"".join(
        bytes([kind]) + (len(payload) if honest else len(payload) + 1).to_bytes(4, "big") + payload
        for kind, payload, honest in parts
    )
    decoder = RecordDecoder()
    try:
        decoder.feed(data)
        decoder.finish()
    except ProtocolViolation:
        pass


@pytest.mark.parametrize("kind", [0, 4, 255])
def test_an_unknown_record_type_is_refused_from_its_header(kind: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        RecordDecoder().feed(bytes([kind]) + (10).to_bytes(4, "big"))
    assert info.value.reason == "bad_record"


@pytest.mark.parametrize(
    ("kind", "length"),
    [
        (RecordType.OUTPUT, 0),
        (RecordType.OUTPUT, MAX_RECORD + 1),
        (RecordType.RECEIPT, 0),
        (RecordType.RECEIPT, 1025),
        (RecordType.FAILED, 0),
        (RecordType.FAILED, 1025),
        (RecordType.OUTPUT, 0xFFFF_FFFF),
    ],
)
def test_a_bad_record_length_is_refused_from_its_header(kind: RecordType, length: int) -> None:
    decoder = RecordDecoder()
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(bytes([kind]) + length.to_bytes(4, "big"))  # no payload yet
    assert info.value.reason == "bad_record"


@pytest.mark.parametrize(
    ("kind", "payload", "reason"),
    [
        (RecordType.RECEIPT, encode(JobFailed(error="Trap", text="")), "unknown_kind"),
        (RecordType.RECEIPT, b"\x93\x01", "malformed"),
        (RecordType.FAILED, encode(FINAL), "unknown_kind"),
        (RecordType.FAILED, b"\xc1", "malformed"),
    ],
)
def test_a_payload_that_is_not_its_message_is_refused(
    kind: RecordType, payload: bytes, reason: str
) -> None:
    with pytest.raises(ProtocolViolation) as info:
        RecordDecoder().feed(bytes([kind]) + len(payload).to_bytes(4, "big") + payload)
    assert info.value.reason == reason


def test_a_receipt_with_a_short_field_is_refused() -> None:
    fields = msgpack.unpackb(encode(FINAL))
    fields[2][1] = bytes(31)  # agreement_id
    payload = msgpack.packb(fields, use_bin_type=True)
    with pytest.raises(ProtocolViolation):
        RecordDecoder().feed(encode_record(RecordType.RECEIPT, payload))


def test_data_after_the_final_receipt_is_refused_in_the_same_read() -> None:
    data = encoded(ReceiptRecord(FINAL)) + encoded(Output(b"late"))
    with pytest.raises(ProtocolViolation) as info:
        RecordDecoder().feed(data)
    assert info.value.reason == "after_final"


def test_data_after_the_final_receipt_is_refused_in_a_later_read() -> None:
    decoder = RecordDecoder()
    assert decoder.feed(encoded(ReceiptRecord(FINAL))) == [ReceiptRecord(FINAL)]
    assert decoder.final_seen
    assert decoder.feed(b"") == []
    with pytest.raises(ProtocolViolation) as info:
        decoder.feed(b"\x01")
    assert info.value.reason == "after_final"


def test_a_failed_job_reads_failed_then_its_final_receipt() -> None:
    failure = JobFailed(error="FuelExhausted", text="job ran out of fuel")
    stream = [Output(b"partial"), FailedRecord(failure), ReceiptRecord(FINAL)]
    assert decode_all([b"".join(encoded(r) for r in stream)]) == stream


@pytest.mark.parametrize(
    "stream",
    [
        b"",
        encoded(Output(b"all of it")),
        encoded(ReceiptRecord(RECEIPTS[1])),  # a receipt, but not the final one
        encoded(Output(b"x")) + encoded(ReceiptRecord(FINAL))[:-1],  # cut inside it
    ],
    ids=["empty", "output-only", "not-final", "cut"],
)
def test_a_stream_that_ends_without_its_final_receipt_is_refused(stream: bytes) -> None:
    decoder = RecordDecoder()
    decoder.feed(stream)
    with pytest.raises(ProtocolViolation) as info:
        decoder.finish()
    assert info.value.reason == "no_final_receipt"


# -- the client's stream head -------------------------------------------------------------


@given(
    st.binary(min_size=1, max_size=200),
    st.binary(max_size=200),
    st.lists(st.integers(min_value=0), max_size=12),
)
def test_the_spec_reader_takes_any_split(module: bytes, data: bytes, cuts: list[int]) -> None:
    spec = JobSpec(module_len=len(module), max_fuel=12345)
    stream = job_header(spec) + module + data
    reader = SpecReader(max_module=200)
    rest = b""
    for p in split(stream, cuts):
        before = reader.complete
        got = reader.feed(p)
        if before:
            assert got == p  # after the module, every byte is input, untouched
        rest += got
    assert reader.complete
    assert reader.spec == spec
    assert reader.module == module
    assert rest == data


@given(st.lists(st.binary(max_size=40), max_size=8))
def test_the_spec_reader_raises_only_protocol_violation(pieces: list[bytes]) -> None:
    reader = SpecReader(max_module=1000)
    try:
        for p in pieces:
            reader.feed(p)
    except ProtocolViolation:
        pass
    assert reader.spec is None or reader.spec.module_len <= 1000


@pytest.mark.parametrize("size", [0, 257, 0xFFFF_FFFF])
def test_a_spec_length_out_of_bounds_is_refused_from_four_bytes(size: int) -> None:
    with pytest.raises(ProtocolViolation) as info:
        SpecReader(max_module=1000).feed(size.to_bytes(4, "big"))
    assert info.value.reason == "bad_spec"


def test_a_module_above_the_readers_limit_is_refused_before_it_arrives() -> None:
    reader = SpecReader(max_module=1000)
    with pytest.raises(InboundTooLarge) as info:
        reader.feed(job_header(JobSpec(module_len=1001, max_fuel=1)))
    assert info.value.reason == "too_large"
    assert reader.module is None


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ([MAX_MODULE + 1, 1], "bad_field"),
        ([0, 1], "bad_field"),
        ([10, 0], "bad_field"),
        ([10, (1 << 62) + 1], "bad_field"),
        ([10], "bad_field"),
        (["10", 1], "bad_field"),
    ],
)
def test_a_spec_out_of_bounds_is_refused(fields: list[object], reason: str) -> None:
    body = msgpack.packb([1, 427, fields], use_bin_type=True)
    with pytest.raises(ProtocolViolation) as info:
        SpecReader(max_module=MAX_MODULE).feed(len(body).to_bytes(4, "big") + body)
    assert info.value.reason == reason


def test_another_message_in_place_of_the_spec_is_refused() -> None:
    body = encode(JobFailed(error="x", text="y"))
    with pytest.raises(ProtocolViolation) as info:
        SpecReader(max_module=1000).feed(len(body).to_bytes(4, "big") + body)
    assert info.value.reason == "unknown_kind"


def test_job_spec_bounds_when_encoding() -> None:
    assert len(job_header(JobSpec(module_len=MAX_MODULE, max_fuel=1 << 62))) <= 4 + 256
    for spec in [
        JobSpec(module_len=0, max_fuel=1),
        JobSpec(module_len=MAX_MODULE + 1, max_fuel=1),
        JobSpec(module_len=1, max_fuel=0),
    ]:
        with pytest.raises(UsageError):
            job_header(spec)
