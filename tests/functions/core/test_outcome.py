"""A finished task's end in words (functions.core.outcome): the pure part, one case per kind of end.
The same cases run end to end through `dockyard dev` in tests/functions/devstack/test_failures.py."""

from __future__ import annotations

from agent import contract
from functions.core.outcome import describe_end

RECORD = {"created_at": "2026-01-01T00:00:00.500Z", "task": {"limits": {"deadline_seconds": 25}}, "attempts": 0}


def job(reason: str, message: str, *, failed: int, succeeded: int = 0, start: str = "2026-01-01T00:00:21Z") -> tuple[dict, dict]:
    condition = {"type": "Complete" if succeeded else "Failed", "status": "True", "reason": reason, "message": message,
                 "lastTransitionTime": "2026-01-01T00:00:46Z"}
    return condition, {"status": {"startTime": start, "failed": failed, "succeeded": succeeded, "conditions": [condition]},
                       "spec": {"activeDeadlineSeconds": 25}}


def test_a_fatal_exit_with_the_agents_words():
    condition, j = job("PodFailurePolicy", "Container agent failed with exit code 3 matching FailJob rule", failed=1)
    result = {"outcome": "failed", "reason": "git clone failed: repository not found", "failure_class": "fatal",
              "detail": "fatal: repository '/x' does not exist"}
    end = describe_end(outcome="failed", condition=condition, job=j, result=result, record=RECORD, termination_message=None, agent_exit=None)
    assert end == {
        "reason": "git clone failed: repository not found", "failure_class": "fatal",
        "detail": "fatal: repository '/x' does not exist", "attempts": 1, "deadline_seconds": 25,
        "started_at": "2026-01-01T00:00:21Z", "queued_seconds": 20.5, "finished_at": "2026-01-01T00:00:46.000Z",
    }


def test_exit_3_without_a_result_is_fatal_all_the_same():
    condition, j = job("PodFailurePolicy", "Container agent failed with exit code 3 matching FailJob rule", failed=1)
    end = describe_end(outcome="failed", condition=condition, job=j, result=None, record=RECORD,
                       termination_message="agent: fatal: no key for provider openai", agent_exit="Error (exit code 3)")
    assert end["failure_class"] == contract.FAILURE_FATAL
    assert end["reason"] == "the agent ended with Error (exit code 3): agent: fatal: no key for provider openai"


def test_retries_used_up_name_the_count_and_the_last_error_and_are_transient():
    condition, j = job("BackoffLimitExceeded", "Job has reached the specified backoff limit", failed=3)
    tail = "Traceback (most recent call last):\n  File \"x.py\", line 1\n    boom()\n    ^^^^^^\nRuntimeError: the disk is full\n"
    end = describe_end(outcome="failed", condition=condition, job=j, result=None, record={**RECORD, "attempts": 2},
                       termination_message=tail, agent_exit="Error (exit code 1)")
    assert end["failure_class"] == contract.FAILURE_TRANSIENT
    assert end["attempts"] == 3  # the Job's pods: one died before it could say it had started
    assert end["reason"] == "the agent failed 3 times, retries used up; the last time: RuntimeError: the disk is full"
    assert end["detail"] == tail


def test_a_deadline_states_its_limit_and_the_queue_time():
    condition, j = job("DeadlineExceeded", "Job was active longer than specified deadline", failed=1)
    end = describe_end(outcome="deadline", condition=condition, job=j, result=None, record={**RECORD, "attempts": 1},
                       termination_message=None, agent_exit=None)
    assert end["reason"] == "the deadline of 25 s passed, counted from the first start"
    assert (end["failure_class"], end["deadline_seconds"], end["queued_seconds"]) == ("transient", 25, 20.5)


def test_a_budget_is_fatal_and_done_has_no_class():
    condition, j = job("CompletionsReached", "Reached expected number of succeeded pods", failed=0, succeeded=1)
    spent = describe_end(outcome="budget_exhausted", condition=condition, job=j, result={"reason": "the budget of 30 strategic rounds is spent"},
                         record={**RECORD, "attempts": 1}, termination_message=None, agent_exit=None)
    assert (spent["failure_class"], spent["reason"], spent["attempts"]) == ("fatal", "the budget of 30 strategic rounds is spent", 1)
    done = describe_end(outcome="done", condition=condition, job=j, result={"outcome": "done"}, record=RECORD,
                        termination_message=None, agent_exit=None)
    assert (done["failure_class"], done["reason"]) == (None, None)


def test_what_the_agents_result_says_is_taken_only_when_well_typed():
    condition, j = job("BackoffLimitExceeded", "Job has reached the specified backoff limit", failed=2)
    end = describe_end(outcome="failed", condition=condition, job=j, result={"failure_class": "harmless", "reason": 7, "detail": ["x"]},
                       record=RECORD, termination_message=None, agent_exit=None)
    assert end["failure_class"] == contract.FAILURE_TRANSIENT
    assert end["reason"].startswith("the agent failed 2 times") and end["detail"] is None


def test_without_a_final_result_the_words_of_the_agents_own_terminal_event_are_kept():
    """The snapshotter may fail to upload the final set; the tracker put the agent's words on the record."""
    condition, j = job("PodFailurePolicy", "Container agent failed with exit code 3 matching FailJob rule", failed=1)
    record = {**RECORD, "state": "finished", "reason": "git clone failed: repository not found", "failure_class": "fatal",
              "detail": "file:///x: no such path on this machine"}
    end = describe_end(outcome="failed", condition=condition, job=j, result=None, record=record,
                       termination_message="git clone failed: repository not found", agent_exit=None)
    assert (end["reason"], end["failure_class"], end["detail"]) == (record["reason"], "fatal", record["detail"])
    # Without them either, the termination message (the agent's summary) is the reason.
    bare = describe_end(outcome="failed", condition=condition, job=j, result=None, record=RECORD,
                        termination_message="git clone failed: repository not found", agent_exit=None)
    assert (bare["reason"], bare["failure_class"]) == ("git clone failed: repository not found", "fatal")
