"""The microsandbox agent codec against the frames captured from the real client.

Hex strings below are copied from shared/reference/microsandbox-agent-protocol.md §5, §11.
"""

from __future__ import annotations

import cbor2
import pytest

from corral.errors import FrameTooLarge, ProtocolError
from corral.server import msb_agent as ma


def h(text: str) -> bytes:
    return bytes.fromhex(text.replace(" ", "").replace("|", ""))


EXEC_REQ_HEADER = h("000000610000000102")
EXEC_REQ_BODY = h(
    "a361760a617471636f72652e657865632e7265717565737461705840"
    "a963636d64646563686f64617267738162686963656e768063637764612f6475736572f663747479f464726f7773"
    "181864636f6c73185067726c696d69747380"
)
STDIN_EOF = h("000000250000000100a361760a61746f636f72652e657865632e737464696e617047a1646461746140")
STARTED = h(
    "000000280000000100a3617607617471636f72652e657865632e73746172746564617048a16370696419529c"
)
STDOUT_HI = h(
    "000000290000000100a3617607617470636f72652e657865632e7374646f757461704aa164646174614368690a"
)
EXITED_0 = h("000000260000000101a3617607617470636f72652e657865632e657869746564617047a164636f646500")
READY_CAPTURED = h(
    "00000001 02000000 | 00000065 00000000 00 | a3 6176 07 6174 6a 636f72652e7265616479 6170 584b"
    " a4 6c 626f6f745f74696d655f6e73 1903e8 6c 696e69745f74696d655f6e73 1907d0"
    " 6d 72656164795f74696d655f6e73 190bb8 6d 6167656e745f76657273696f6e 6a 302e302e302d656d756c"
)


def test_handshake_is_byte_identical_to_the_capture() -> None:
    got = ma.encode_handshake(
        boot_time_ns=1000, init_time_ns=2000, ready_time_ns=3000, agent_version="0.0.0-emul"
    )
    assert got == READY_CAPTURED


def test_server_frames_are_byte_identical_to_the_capture() -> None:
    assert ma.exec_started(1, 21148) == STARTED
    assert ma.exec_stdout(1, b"hi\n") == STDOUT_HI
    assert ma.exec_exited(1, 0) == EXITED_0


def test_fs_response_payloads_match_the_capture() -> None:
    def payload(frame: bytes) -> bytes:
        (raw,) = ma.FrameDecoder().feed(frame)
        p: bytes = cbor2.loads(raw.body)["p"]
        return p

    assert payload(ma.fs_response(1)) == h("a3626f6bf5656572726f72f66464617461f6")
    assert payload(ma.fs_response(1, data={"Handle": 1})) == h(
        "a3626f6bf5656572726f72f66464617461a16648616e646c6501"
    )
    err = "No such file or directory (os error 2)"
    assert payload(ma.fs_response(1, ok=False, error=err)) == h(
        "a3626f6bf4656572726f7278264e6f20737563682066696c65206f72206469726563746f727920286f73"
        "206572726f722032296464617461f6"
    )
    (raw,) = ma.FrameDecoder().feed(ma.fs_response(7))
    assert (raw.id, raw.flags) == (7, ma.TERMINAL)


def test_decoder_reassembles_the_clients_two_message_frames() -> None:
    dec = ma.FrameDecoder()
    assert dec.feed(EXEC_REQ_HEADER) == []
    assert dec.buffered == 9
    (frame,) = dec.feed(EXEC_REQ_BODY)
    assert (frame.id, frame.flags) == (1, ma.SESSION_START)
    env = ma.decode_envelope(frame.body)
    assert (env.v, env.t) == (10, ma.EXEC_REQUEST)
    req = ma.parse_payload(env.payload, ma.ExecRequest)
    assert req == ma.ExecRequest(
        cmd="echo", args=["hi"], env=[], cwd="/", user=None, tty=False, rows=24, cols=80
    )
    assert dec.buffered == 0


def test_decoder_splits_many_frames_and_byte_by_byte_input() -> None:
    stream = STDIN_EOF + STARTED + STDOUT_HI + EXITED_0
    dec = ma.FrameDecoder()
    frames = []
    for i in range(len(stream)):
        frames += dec.feed(stream[i : i + 1])
    assert [ma.decode_envelope(f.body).t for f in frames] == [
        ma.EXEC_STDIN,
        ma.EXEC_STARTED,
        ma.EXEC_STDOUT,
        ma.EXEC_EXITED,
    ]
    assert ma.parse_payload(ma.decode_envelope(frames[0].body).payload, ma.ExecStdin).data == b""
    assert ma.decode_envelope(frames[1].body).payload == {"pid": 21148}


def test_decoder_refuses_oversized_and_undersized_lengths_for_good() -> None:
    dec = ma.FrameDecoder()
    with pytest.raises(FrameTooLarge):
        dec.feed((ma.MAX_LEN + 1).to_bytes(4, "big") + b"\0" * 5)
    with pytest.raises(FrameTooLarge):
        dec.feed(STARTED)  # stays failed
    with pytest.raises(ProtocolError):
        ma.FrameDecoder().feed(h("00000004 00000001 00"))


def test_largest_frame_fits_and_one_more_byte_does_not() -> None:
    # body overhead: {v,t,p} map + "core.fs.data" + bstr header + {data: <bstr>}.
    data = b"x" * (ma.MAX_LEN - 64)
    frame = ma.fs_data(3, data)
    assert len(frame) - 4 <= ma.MAX_LEN
    (raw,) = ma.FrameDecoder().feed(frame)
    assert ma.decode_envelope(raw.body).payload == {"data": data}
    with pytest.raises(FrameTooLarge):
        ma.fs_data(3, b"x" * ma.MAX_LEN)


def test_follow_up_payloads_from_the_capture() -> None:
    assert ma.parse_payload(
        cbor2.loads(h("a164646174614c70697065642d62797465730a")), ma.ExecStdin
    ) == (ma.ExecStdin(b"piped-bytes\n"))
    assert ma.parse_payload(cbor2.loads(h("a264726f7773182864636f6c731864")), ma.ExecResize) == (
        ma.ExecResize(rows=40, cols=100)
    )
    assert ma.parse_payload(cbor2.loads(h("a1667369676e616c0f")), ma.ExecSignal) == ma.ExecSignal(
        15
    )
    assert ma.parse_payload(cbor2.loads(h("a16464617461446572720a")), ma.FsData) == ma.FsData(
        b"err\n"
    )


@pytest.mark.parametrize(
    ("hexpayload", "expected"),
    [
        (
            "a1626f70a1684f70656e46696c65a264706174686f2f776f726b2f68656c6c6f2e747874676f7074696f6e73"
            "a86472656164f4657772697465f566617070656e64f466637265617465f5687472756e63617465f56a6372"
            "656174655f6e6577f4646d6f6465f66475736572f6",
            ma.OpenFile(
                path="/work/hello.txt",
                options=ma.OpenOptions(write=True, create=True, truncate=True),
            ),
        ),
        (
            "a1626f70a1655772697465a36668616e646c6501666f666673657400636c656e09",
            ma.Write(handle=1, offset=0, len=9),
        ),
        (
            "a1626f70a16452656164a36668616e646c6501666f666673657400636c656ef6",
            ma.Read(handle=1, offset=0, len=None),
        ),
        ("a1626f70a16b436c6f736548616e646c65a16668616e646c6501", ma.CloseHandle(1)),
        (
            "a1626f70a16453746174a264706174686f2f776f726b2f68656c6c6f2e7478746e666f6c6c6f775f73796d"
            "6c696e6bf5",
            ma.Stat(path="/work/hello.txt", follow_symlink=True),
        ),
    ],
)
def test_fs_ops_from_the_capture(hexpayload: str, expected: ma.FsOp) -> None:
    assert ma.parse_fs_op(cbor2.loads(h(hexpayload))) == expected


def test_unknown_and_malformed_fs_ops() -> None:
    with pytest.raises(ma.UnknownFsOp) as info:
        ma.parse_fs_op({"op": {"ReadLink": {"path": "/x"}}})
    assert info.value.op_name == "ReadLink"
    bads: list[object] = [None, {}, {"op": []}, {"op": {"A": {}, "B": {}}}, {"op": {"Stat": {}}}]
    for bad in bads:
        with pytest.raises(ProtocolError):
            ma.parse_fs_op(bad)


def test_undecodable_envelopes_raise_protocol_error() -> None:
    for body in (b"", b"\xff\xff", cbor2.dumps([1, 2]), cbor2.dumps({"v": 1, "t": 3})):
        with pytest.raises(ProtocolError):
            ma.decode_envelope(body)
    with pytest.raises(ProtocolError):
        ma.decode_envelope(cbor2.dumps({"v": 1, "t": "x", "p": {"not": "bytes"}}))
    assert ma.decode_envelope(cbor2.dumps({"v": 1, "t": "x"})).payload is None


def test_exec_failed_unknown_kind_becomes_other() -> None:
    (raw,) = ma.FrameDecoder().feed(ma.exec_failed(5, kind="weird", message="m", errno=2))
    env = ma.decode_envelope(raw.body)
    assert raw.flags == ma.TERMINAL
    assert env.payload == {
        "kind": "other",
        "errno": 2,
        "errno_name": None,
        "message": "m",
        "stage": None,
    }


def test_exec_request_env_map() -> None:
    req = ma.ExecRequest(cmd="x", env=["A=1", "B=x=y", "bad", "=z", "TERM=xterm"])
    assert req.env_map() == {"A": "1", "B": "x=y", "TERM": "xterm"}
