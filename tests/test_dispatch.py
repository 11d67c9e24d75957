"""The measured dispatch table: buckets, verdicts from benchmark rows, the file format, and `auto` following it.

CUDA tensors here are fake (shape, dtype and device only) and the compute capability is set by hand, so the
policy is checked without a GPU.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastmsc
from fastmsc import dispatch
from fastmsc.backend import OPS
from fastmsc.bench.harness import Result
from fastmsc.bench.timing import Stats


def _entry(fused_ms=2.0, torch_ms=1.0, **overrides) -> dispatch.Entry:
    fields = dict(op="max_avg_pool", mode="fwd", dtype="float32", bucket="2^20", capability=90, choice="torch",
                  gpu="NVIDIA H200", shape="B=32 T=150 C=256", times_ms={"fused": fused_ms, "torch": torch_ms},
                  measured="2026-12-01T00:00:00+00:00", versions="fastmsc 0.1.0, torch 2.11.0, triton 3.6.0")
    fields.update(overrides)
    return dispatch.Entry(**fields)


@pytest.fixture
def table(tmp_path, monkeypatch):
    """A dispatch table file of the test's own, read by `auto` on a GPU of compute capability 9.0."""
    path = tmp_path / "dispatch_table.json"
    monkeypatch.setattr(dispatch, "compute_capability", lambda device: 90)
    monkeypatch.setattr(dispatch, "_table", dispatch._table)  # restored after the test

    def use(entries):
        dispatch.write_table(path, entries)
        dispatch.use_table(path)
        return path

    return use


def test_size_buckets_are_powers_of_four():
    assert [dispatch.size_bucket(n) for n in (0, 1, 3, 4, 15, 16, 63, 64)] == \
        ["2^0", "2^0", "2^0", "2^2", "2^2", "2^4", "2^4", "2^6"]
    assert dispatch.size_bucket(2**20) == dispatch.size_bucket(2**22 - 1) == "2^20"
    # The benchmark's shapes (B=32, E=256, T=150 / 512 / 2048) fall in three buckets.
    assert len({dispatch.size_bucket(32 * t * 256) for t in (150, 512, 2048)}) == 3


def _row(shape, numel, torch_ms, fused_ms, **overrides):
    row = dict(op="attention", mode="fwd", dtype="float32", shape=shape, numel=numel, capability=90,
               gpu="NVIDIA H200", measured="2026-12-01T00:00:00+00:00", versions="v",
               times_ms={"torch": torch_ms, "fused": fused_ms})
    row.update(overrides)
    return row


def test_verdicts_take_torch_where_fused_lost_or_failed_on_any_shape_of_a_bucket():
    rows = [
        _row("a", 2**20, 1.0, 0.5), _row("b", 2**20 + 5, 1.0, 1.1),  # one bucket: a win and a loss
        _row("c", 2**22, 1.0, 0.9), _row("d", 2**22 + 1, 1.0, 1.0),  # one bucket: a win and a tie
        _row("e", 2**24, 1.0, None),  # fused failed its check there
        _row("f", 2**26, None, 0.5),  # no torch time: no verdict
        _row("g", 2**20, 1.0, 0.5, mode="fwd+bwd"),  # another mode, its own verdict
    ]
    got = {(e.bucket, e.mode): e for e in dispatch.verdicts(rows)}
    assert set(got) == {("2^20", "fwd"), ("2^22", "fwd"), ("2^24", "fwd"), ("2^20", "fwd+bwd")}
    assert got["2^20", "fwd"].choice == "torch" and got["2^20", "fwd"].shape == "b"  # rests on the loss
    assert got["2^22", "fwd"].choice == "fused" and got["2^22", "fwd"].shape == "d"  # rests on the narrowest win
    assert got["2^24", "fwd"].choice == "torch" and "failed" in got["2^24", "fwd"].why()
    assert got["2^20", "fwd+bwd"].choice == "fused" and "(2.00x)" in got["2^20", "fwd+bwd"].why()


def test_write_merges_by_key_and_read_refuses_other_versions(tmp_path):
    path = tmp_path / "t.json"
    dispatch.write_table(path, [_entry(bucket="2^20"), _entry(bucket="2^22", choice="fused", fused_ms=0.5)])
    merged = dispatch.write_table(path, [_entry(bucket="2^20", choice="fused", fused_ms=0.9)])
    assert [(e.bucket, e.choice) for e in merged] == [("2^20", "fused"), ("2^22", "fused")]
    assert dispatch.read_table(path) == merged
    assert json.loads(path.read_text())["version"] == dispatch.TABLE_VERSION
    path.write_text(json.dumps({"version": 99, "entries": []}))
    with pytest.raises(dispatch.DispatchTableError, match="version 2 .*found version 99"):
        dispatch.read_table(path)
    path.write_text(json.dumps({"version": 2, "entries": [{"op": "x"}]}))
    with pytest.raises(dispatch.DispatchTableError, match="entry 0 lacks the fields"):
        dispatch.read_table(path)
    path.write_text("{not json")
    with pytest.raises(dispatch.DispatchTableError, match="cannot be read as JSON"):
        dispatch.read_table(path)
    assert dispatch.read_table(tmp_path / "absent.json") == []


def test_version_1_tables_still_read():
    """Version 1 kept fused_ms / torch_ms fields; they become times_ms."""
    fields = dataclasses.asdict(_entry(fused_ms=0.5, choice="fused"))
    del fields["times_ms"]
    fields.update(fused_ms=0.5, torch_ms=1.0)
    entries = dispatch._parse({"version": 1, "entries": [fields]}, "old.json")
    assert entries == [_entry(fused_ms=0.5, choice="fused")] and "(2.00x)" in entries[0].why()


def test_entries_refuse_a_choice_foreign_to_their_op(tmp_path):
    path = tmp_path / "t.json"
    dispatch.write_table(path, [_entry(op="lstm_impl", choice="fused")])
    with pytest.raises(dispatch.DispatchTableError, match=r"\(lstm_impl\) has choice 'fused'.*'persistent'"):
        dispatch.read_table(path)


def test_lstm_implementation_verdicts_compare_persistent_with_stepwise():
    rows = [_row("a", 2**20, None, None, op="lstm_impl", times_ms={"stepwise": 3.0, "persistent": 1.0}),
            _row("b", 2**22, None, None, op="lstm_impl", times_ms={"stepwise": 1.0, "persistent": 1.5}),
            _row("c", 2**24, None, None, op="lstm_impl", times_ms={"stepwise": 1.0, "persistent": None})]
    got = {e.bucket: e for e in dispatch.verdicts(rows)}
    assert {b: e.choice for b, e in got.items()} == {"2^20": "persistent", "2^22": "stepwise", "2^24": "stepwise"}
    assert got["2^20"].why().startswith("persistent 1 ms vs stepwise 3 ms (3.00x)")
    assert got["2^24"].why().startswith("persistent failed its check")


def test_auto_lstm_implementation_follows_the_table(table, monkeypatch):
    """FASTMSC_LSTM_IMPL=auto passes 'stepwise' down where the table measured the persistent kernel slower, 'auto'
    elsewhere; a forced implementation ignores the table. On CPU the table decides nothing, so the test lets it
    decide CPU calls for the duration."""
    monkeypatch.setattr(dispatch, "DEVICE_TYPES", ("cpu",))
    passed = []
    monkeypatch.setattr(OPS["lstm_layer"], "select", lambda device_type, **kw: passed.append(kw["lstm_impl"]) or (
        lambda x, *args: (x, None, None)))
    hidden, inputs = 3, 4
    weights = [(torch.randn(4 * hidden, inputs), torch.randn(4 * hidden, hidden), None, None)]
    x = torch.randn(5, 7, inputs)  # 140 elements: bucket 2^6
    table([_entry(op="lstm_impl", bucket="2^6", choice="stepwise", times_ms={"persistent": 2.0, "stepwise": 1.0}),
           _entry(op="lstm_impl", bucket="2^6", mode="fwd+bwd", choice="persistent",
                  times_ms={"persistent": 1.0, "stepwise": 2.0})])
    fastmsc.lstm_layer(x, weights)
    weights[0][0].requires_grad_()
    fastmsc.lstm_layer(x, weights)
    fastmsc.lstm_layer(torch.randn(5, 70, inputs), weights)  # bucket 2^10: not measured
    with fastmsc.backend.use_lstm_impl("persistent"):
        weights[0][0].requires_grad_(False)
        fastmsc.lstm_layer(x, weights)
    assert passed == ["stepwise", "auto", "auto", "persistent"]


def test_the_shipped_table_reads():
    assert dispatch.TABLE_PATH.is_file()
    dispatch.read_table(dispatch.TABLE_PATH)  # raises on a malformed file


def test_auto_follows_the_table_per_mode_dtype_and_size(table, monkeypatch):
    op = OPS["max_avg_pool"]
    monkeypatch.setattr(op, "why_not_fused", lambda device_type, **kw: None)
    with FakeTensorMode():
        small = torch.empty(32, 150, 256, device="cuda")  # 1.2M elements: bucket 2^20
        large = torch.empty(32, 2048, 256, device="cuda")  # 16.8M elements: bucket 2^24
        half = torch.empty(32, 150, 256, device="cuda", dtype=torch.bfloat16)
    table([_entry(bucket="2^20", mode="fwd", choice="torch"),
           _entry(bucket="2^20", mode="fwd+bwd", choice="fused", fused_ms=0.5)])

    def picked(x):
        return "fused" if op.select("cuda", x=x, lengths=None) is op.fused else "torch"

    assert picked(small) == "torch"  # measured slower there
    assert picked(small.requires_grad_()) == "fused"  # training measured faster
    with torch.no_grad():
        assert picked(small) == "torch"  # under no_grad the call is inference again
    small.requires_grad_(False)
    assert picked(large) == "fused" and picked(half) == "fused"  # no entry: the present rule
    with fastmsc.use_backend("fused"):
        assert op.select("cuda", x=small, lengths=None) is op.fused  # forcing fused ignores the table
    monkeypatch.setattr(dispatch, "compute_capability", lambda device: 80)
    assert picked(small) == "fused"  # measured on another GPU: no data for this one


def test_auto_follows_the_design_estimate_only_where_unmeasured(table, monkeypatch):
    """An op whose kernels' design estimate expects them slower than torch (attention on CUDA) runs torch under
    auto where the table is silent, fused where the table measured fused faster; backend 'fused' forces it."""
    op = OPS["attention"]
    monkeypatch.setattr(op, "why_not_fused", lambda device_type, **kw: None)
    with FakeTensorMode():
        q = torch.empty(32, 512, 64, device="cuda")  # 1M elements: bucket 2^20
        long = torch.empty(32, 4096, 64, device="cuda")  # bucket 2^22

    def picked(x):
        return "fused" if op.select("cuda", q=x, k=x, v=x, lengths=None, scale=None) is op.fused else "torch"

    table([_entry(op="attention", bucket="2^20", choice="fused", fused_ms=0.5)])
    assert op.expected_slower("cuda") is not None and op.expected_slower("cpu") is None
    assert picked(q) == "fused"  # measured faster
    assert picked(long) == "torch"  # unmeasured: the design estimate
    with fastmsc.use_backend("fused"):
        assert picked(long) == "fused"
    assert OPS["max_avg_pool"].expected_slower("cuda") is None  # the others expect to win by design


def test_the_lstm_and_conv_look_up_their_main_input(table, monkeypatch):
    """Ops whose weights come in lists: the size bucket is the main input's (x), not a weight's."""
    op = OPS["multiscale_conv1d"]
    monkeypatch.setattr(op, "why_not_fused", lambda device_type, **kw: None)
    with FakeTensorMode():
        x = torch.empty(32, 3, 512, device="cuda")  # 49152 elements: bucket 2^14
        weights = [torch.empty(64, 3, k, device="cuda") for k in (3, 5, 7)]
    table([_entry(op="multiscale_conv1d", bucket="2^14", choice="torch")])
    assert op.select("cuda", x=x, weights=weights, biases=None, activation=None) is op.torch


def test_info_shows_the_measured_choices_for_this_gpu(table, monkeypatch):
    import importlib

    from fastmsc.kernels import _common
    info_module = importlib.import_module("fastmsc.info")  # the module, not the function fastmsc.info
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(_common, "compute_capability", lambda device: 90)
    monkeypatch.setattr(info_module, "compute_capability", lambda device: 90)
    table([_entry(op="max_avg_pool", bucket="2^20", choice="torch"),
           _entry(op="max_avg_pool", bucket="2^22", choice="fused", fused_ms=0.5)])
    data = info_module.info()
    pool = data["ops"]["max_avg_pool"]["cuda"]
    assert pool["auto"] == "fused or torch by measurement"
    assert "measured on NVIDIA H200 (sm_90)" in pool["dispatch_note"]
    assert [(e["bucket"], e["choice"]) for e in pool["dispatch"]] == [("2^20", "torch"), ("2^22", "fused")]
    attention = data["ops"]["attention"]["cuda"]  # unmeasured, and its design estimate expects SDPA to be faster
    assert attention["auto"] == "torch" and "no dispatch measurements for sm_90 (this GPU): torch, as the design " \
        "estimate puts these kernels at" in attention["dispatch_note"]
    conv = data["ops"]["multiscale_conv1d"]["cuda"]
    assert conv["auto"] == "fused" and conv["dispatch_note"].endswith("fused wherever supported")
    text = info_module.format_info(data)
    assert "float32 fwd size 2^20: torch  (fused 2 ms vs torch 1 ms (0.50x) on NVIDIA H200" in text


def test_bench_rows_become_verdicts(monkeypatch):
    from fastmsc.commands.bench import _dispatch_rows
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    stats = {ms: Stats(ms, ms, ms, ms, ms, 10) for ms in (1.0, 2.0)}
    shape = "B=32 T=150 E=256"
    results = [
        Result("attention", "fwd", shape, "float32", "torch", "ok", stats=stats[1.0]),
        Result("attention", "fwd", shape, "float32", "fused", "ok", stats=stats[2.0]),
        Result("attention", "fwd+bwd", shape, "float32", "torch", "ok", stats=stats[2.0]),
        Result("attention", "fwd+bwd", shape, "float32", "fused", "mismatch"),
        Result("max_avg_pool", "fwd", "B=32 T=150 C=256", "float32", "torch", "ok", stats=stats[1.0]),
        Result("max_avg_pool", "fwd", "B=32 T=150 C=256", "float32", "fused", "unavailable"),
        Result("model", "train step", "B=32", "float32", "torch", "ok", stats=stats[1.0]),
        # lstm_layer: fused vs torch, and the two fused implementations against each other
        *[Result("lstm_layer", "fwd+bwd", "B=8 T=150 I=256 H=128", "bfloat16", backend, "ok", stats=stats[ms])
          for backend, ms in (("torch", 2.0), ("fused", 1.0), ("persistent", 1.0), ("stepwise", 2.0))],
    ]
    env = {"timestamp": "2026-12-01T00:00:00+00:00", "fastmsc": "0.1.0", "torch": "2.11", "triton": "3.6"}
    entries = dispatch.verdicts(_dispatch_rows(results, torch.device("cuda"), env))
    assert sorted((e.op, e.mode, e.choice, e.bucket, e.capability) for e in entries) == [
        ("attention", "fwd", "torch", "2^20", 90), ("attention", "fwd+bwd", "torch", "2^20", 90),
        ("lstm_impl", "fwd+bwd", "persistent", "2^18", 90), ("lstm_layer", "fwd+bwd", "fused", "2^18", 90)]


def test_torch_compile_traces_the_lookup_without_a_graph_break(table, monkeypatch):
    """fullgraph=True fails on any graph break: the lookup (grad mode, dtype name, size bucket, capability) must
    trace. On CPU the table decides nothing, so the test lets it decide CPU calls for the duration."""
    op = OPS["max_avg_pool"]
    monkeypatch.setattr(dispatch, "DEVICE_TYPES", ("cpu",))
    monkeypatch.setattr(op, "why_not_fused", lambda device_type, **kw: None)
    x = torch.randn(4, 37, 16)  # 2368 elements: bucket 2^10
    table([_entry(bucket="2^10", choice="torch")])
    calls = []
    monkeypatch.setattr(op, "torch", lambda x, lengths=None: calls.append("torch") or x.amax(1) * 2)
    monkeypatch.setattr(op, "fused", lambda x, lengths=None: calls.append("fused") or x.amax(1) * 3)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fastmsc.max_avg_pool(x), fullgraph=True, backend="eager", dynamic=False)
    torch.testing.assert_close(compiled(x), x.amax(1) * 2)
    assert calls == ["torch"]
    torch._dynamo.reset()
