import struct

from neonctl.engine import pgwire


def test_startup_message_layout():
    msg = pgwire.startup_message({"user": "u", "replication": "true"})
    (length, proto) = struct.unpack("!II", msg[:8])
    assert length == len(msg) and proto == 196608
    assert msg[8:] == b"user\0u\0replication\0true\0\0"


def test_message_buffer_splits_partial_input():
    stream = pgwire.message(b"Z", b"I") + pgwire.message(b"D", struct.pack("!Hi", 1, 2) + b"ok")
    buf = pgwire.MessageBuffer()
    out = []
    for i in range(len(stream)):  # one byte at a time
        buf.feed(stream[i : i + 1])
        while (m := buf.next_message()) is not None:
            out.append(m)
    assert out[0] == (b"Z", b"I")
    assert out[1][0] == b"D" and pgwire.parse_data_row(out[1][1]) == ["ok"]
    assert not buf.has_message()


def test_copy_payloads():
    w = b"w" + struct.pack("!QQq", 100, 200, 0) + b"walbytes"
    x = pgwire.parse_copy_payload(w)
    assert isinstance(x, pgwire.XLogData) and x.start_lsn == 100 and x.server_wal_end == 200 and x.data == b"walbytes"
    k = pgwire.parse_copy_payload(b"k" + struct.pack("!QqB", 300, 0, 1))
    assert isinstance(k, pgwire.Keepalive) and k.reply_requested and k.server_wal_end == 300


def test_standby_status_update_reports_flush():
    msg = pgwire.standby_status_update(1, 2, 3, reply=True)
    assert msg[:1] == b"d" and msg[5:6] == b"r"
    write, flush, apply, _ts, reply = struct.unpack("!QQQqB", msg[6:])
    assert (write, flush, apply, reply) == (1, 2, 3, 1)


def test_error_fields():
    body = b"SERROR\0C42710\0Mslot exists\0\0"
    err = pgwire.ServerError(pgwire.parse_error_fields(body))
    assert err.sqlstate == "42710" and "slot exists" in str(err)
