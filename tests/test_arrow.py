"""The Arrow wire contract, without a server."""

import pyarrow as pa
import pytest

from byzerllm_spark.protocol import arrow as _arrow


def test_params_round_trip_keeps_nulls_and_order():
    rows = ['{"instruction": "a"}', None, '{"instruction": "c"}']
    assert _arrow.decode_params(_arrow.encode_params(rows)).to_pylist() == rows


def test_results_round_trip():
    body = _arrow.encode_results(["x", None], [None, "boom"], [{"k": "v"}, None])
    table = _arrow.decode_results(body)
    assert table.schema == _arrow.RESPONSE_SCHEMA
    assert table.column("response").to_pylist() == ["x", None]
    assert table.column("error").to_pylist() == [None, "boom"]
    assert table.column("metadata").to_pylist() == [[("k", "v")], None]


def test_metadata_values_that_are_not_strings_are_sent_as_text():
    # A plugin may report {"completion_tokens": 12}: the wire type is map<string, string>.
    body = _arrow.encode_results(["x", "y"], [None, None], [{"completion_tokens": 12, 3: 0.5}, {"k": "v"}])
    assert _arrow.decode_results(body).column("metadata").to_pylist() == [
        [("completion_tokens", "12"), ("3", "0.5")], [("k", "v")]]


def test_bad_bodies_are_explained():
    with pytest.raises(ValueError, match="not an Arrow IPC stream"):
        _arrow.decode_params(b"hello")
    sink = pa.BufferOutputStream()
    table = pa.table({"q": ["a"]})
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write(table)
    with pytest.raises(ValueError, match="needs a 'params' string column"):
        _arrow.decode_params(sink.getvalue().to_pybytes())
