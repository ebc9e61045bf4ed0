"""`dockyard logs` prints a long tool output as head, "… N bytes cut …", tail, and a failed task's end in
words: reason, class, attempts, deadline, queue time, the details' last lines (issue 12, items 3 and 4)."""

from __future__ import annotations

from functions.cli import render


def test_a_long_output_is_its_head_then_what_was_cut_then_its_tail_and_where_all_of_it_is():
    head = "".join(f"line {i:06d}\n" for i in range(200))
    tail = "".join(f"line {i:06d}\n" for i in range(6800, 7000)) + "FAILED test_x.py::test_y\n"
    text = render.render("tool", {
        "type": "tool", "stage": "end", "name": "execute", "ok": False, "seconds": 2.5,
        "result": "exit code 1\nline 000000", "output_bytes": 651_030, "output_head": head, "output_tail": tail,
        "output_file": ".dockyard/outputs/call_1_0.log",
    })
    lines = text.splitlines()
    assert lines[0] == "  -> error 2.5s (635.8 KiB): exit code 1"
    assert [line.strip() for line in lines[1:6]] == [f"line {i:06d}" for i in range(5)]
    shown = sum(len(f"line {i:06d}\n") for i in [*range(5), *range(6991, 7000)]) + len("FAILED test_x.py::test_y\n")
    assert lines[6].strip() == f"… {651_030 - shown} bytes cut …"
    assert [line.strip() for line in lines[7:17]] == [*(f"line {i:06d}" for i in range(6991, 7000)), "FAILED test_x.py::test_y"]
    assert lines[17].strip() == "full output: .dockyard/outputs/call_1_0.log"
    assert len(lines) == 18


def test_a_short_output_is_shown_whole_without_a_cut():
    text = render.render("tool", {"type": "tool", "stage": "end", "ok": True, "seconds": 0.1, "result": "exit code 0\nhello",
                                  "output_bytes": 12, "output_head": "hello\nworld\n", "output_tail": ""})
    assert text.splitlines() == ["  -> ok 0.1s (12 B): exit code 0", "     hello", "     world"]


def test_an_output_cut_by_the_bound_says_so_and_an_old_event_renders_as_before():
    cut = render.render("tool", {"type": "tool", "stage": "end", "ok": True, "output_bytes": 3, "output_head": "ab\n",
                                 "output_tail": "", "output_file": ".dockyard/outputs/x.log", "output_file_cut": True})
    assert cut.splitlines()[-1].strip() == "full output: .dockyard/outputs/x.log (its first bytes only: the task's outputs bound)"
    old = render.render("tool", {"type": "tool", "stage": "end", "ok": True, "seconds": 1.0, "result": "exit code 0\nok"})
    assert old == "  -> ok 1.0s: exit code 0 ok"


def test_a_fatal_failure_says_its_reason_class_attempts_and_the_details_last_lines():
    text = render.render("status", {
        "type": "status", "state": "finished", "outcome": "failed", "failure_class": "fatal",
        "reason": "git clone failed: repository not found", "summary": "git clone failed: repository not found",
        "detail": "Traceback (most recent call last):\n" + "".join(f"  frame {i}\n" for i in range(10)) + "fatal: repository '/x' does not exist",
        "attempts": 1,
    })
    assert text.splitlines() == [
        "-- finished: failed (fatal): git clone failed: repository not found",
        "   1 attempt",
        "   details (last lines):",
        "       frame 6", "       frame 7", "       frame 8", "       frame 9",
        "     fatal: repository '/x' does not exist",
    ]


def test_a_deadline_says_its_limit_and_the_time_queued_before_the_first_start():
    text = render.render("status", {
        "type": "status", "state": "finished", "outcome": "deadline", "failure_class": "transient",
        "reason": "the deadline of 25 s passed, counted from the first start", "attempts": 1,
        "deadline_seconds": 25, "queued_seconds": 21.0,
    })
    assert text.splitlines() == [
        "-- finished: deadline (transient): the deadline of 25 s passed, counted from the first start",
        "   1 attempt, deadline 25 s from the first start, queued 21.0s before its first start",
    ]


def test_the_tasks_column_words():
    assert render.outcome_words({"outcome": "failed", "failure_class": "transient", "reason": "the agent failed 3 times"}) == (
        "failed (transient): the agent failed 3 times")
    assert render.outcome_words({"outcome": "done"}) == "done"
