"""`python -m tests.e2e.faulty_server [server flags]`: the real server with two faults
that a test triggers per request through its `cache_salt`:

* "fault-request": building this request's sampling row raises once it has 3 output
  tokens: a per-request fault; the request must fail alone (the step guard).
* "kill-engine": the scheduler raises while this request is queued, outside the
  step guard: the engine thread dies, as a bug would kill it.

Test-only: nothing outside tests/ imports it.
"""
from __future__ import annotations

import sys

import server.__main__ as cli
from engine.sample import metadata
from engine.sched.scheduler import Scheduler

_suppressed_ids = metadata._suppressed_ids
_schedule = Scheduler.schedule


def _faulty_suppressed_ids(row):
    if row.params.cache_salt == "fault-request" and len(row.output_token_ids) >= 3:
        raise RuntimeError("injected request fault")
    return _suppressed_ids(row)


def _schedule_or_die(self):
    if any(r.params.cache_salt == "kill-engine" for r in self.requests.values()):
        raise RuntimeError("injected engine bug")
    return _schedule(self)


metadata._suppressed_ids = _faulty_suppressed_ids
Scheduler.schedule = _schedule_or_die

if __name__ == "__main__":
    sys.exit(cli.main(sys.argv[1:]))
