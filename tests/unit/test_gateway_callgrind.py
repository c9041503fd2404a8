"""benchmarks/gateway_callgrind.py: reading callgrind's output and reporting the change.

The benchmark itself needs valgrind, which the test machines do not have; its parser and report
are what could silently go wrong (a call's inclusive cost counted again as the caller's own
would double the totals), so they are checked on a file in callgrind's format.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from gateway_callgrind import by_object, main, report, self_costs

# Two objects; main (python) calls run (ort) twice, ort calls memcpy (libc); names compressed.
DUMP = """\
version: 1
creator: callgrind-3.19.0
events: Ir
summary: 1650

ob=(1) /usr/bin/python3.11
fl=(1) python.c
fn=(1) main
10 100
cob=(2) /opt/ort/onnxruntime_pybind11_state.so
cfi=(2) run.cc
cfn=(2) run
calls=2 20
11 1500
12 50

ob=(2)
fl=(2)
fn=(2)
20 1000
cob=(3) /lib/libc.so.6
cfi=(3) memcpy.S
cfn=(3) memcpy
calls=4 30
21 500

ob=(3)
fl=(3)
fn=(3)
30 400
+1 100
"""


def test_each_function_keeps_only_its_own_instructions() -> None:
    own = self_costs(DUMP.splitlines(keepends=True))
    assert own == Counter(
        {
            ("python3.11", "main"): 150,  # 100 + 50: the call's 1500 is run's
            ("onnxruntime_pybind11_state.so", "run"): 1000,
            ("libc.so.6", "memcpy"): 500,  # relative line numbers ("+1") count too
        }
    )
    assert sum(own.values()) == 1650
    assert by_object(own, 10) == {
        "python3.11": 15.0,
        "onnxruntime_pybind11_state.so": 100.0,
        "libc.so.6": 50.0,
    }


# The same program written with instruction positions, two events, jumps and names
# uncompressed (callgrind --dump-instr=yes --collect-jumps=yes --compress-strings=no ...).
DUMP_WIDE = """\
version: 1
positions: instr line
events: Dr Ir
summary: 300 1650

ob=/usr/bin/python3.11
fn=main
0x10 10 7 100
jump=3 0x20 12
0x14 11
calls=2 0x30 20
0x18 11 40 1500
+4 12 1 50
ob=/opt/ort/onnxruntime_pybind11_state.so
fn=run
0x30 20 200 1000
jcnd=1/2 0x34 21
* *
cob=/lib/libc.so.6
cfn=memcpy
calls=4 0x40 30
0x32 21 9 500
ob=/lib/libc.so.6
fn=memcpy
0x40 30 50 400
+1 +1 3 100
"""


def test_positions_events_jumps_and_plain_names_are_read_as_callgrind_writes_them() -> None:
    own = self_costs(DUMP_WIDE.splitlines(keepends=True))
    assert own == self_costs(DUMP.splitlines(keepends=True))
    assert sum(self_costs(DUMP_WIDE.splitlines(), event="Dr").values()) == 7 + 1 + 200 + 53
    assert self_costs(DUMP_WIDE.splitlines(), event="Bc") == Counter()


def test_the_report_gives_each_configurations_change_by_object() -> None:
    one = Counter({("python", "f"): 2000, ("ort", "g"): 1000})
    split = Counter({("python", "f"): 2200, ("ort", "g"): 1030, ("random", "r"): 10})
    lines = report([("one", 10, one), ("split", 10, split)], top=2)
    assert lines[0].split()[:2] == ["one", "0.3"]  # 300 per request
    assert "+24 (+8.00 %)" in lines[1]
    assert lines[2].split() == ["+20", "python"]
    assert lines[3].split() == ["+3", "ort"]
    assert len(lines) == 4


def test_it_refuses_bad_counts_and_needs_valgrind(monkeypatch: pytest.MonkeyPatch) -> None:
    for bad in (["--requests", "0"], ["--windows", "0"], ["--clients", "0"]):
        with pytest.raises(SystemExit):
            main(bad)
    monkeypatch.setattr("shutil.which", lambda tool: None)
    with pytest.raises(SystemExit):
        main(["a: one", "b: split"])
