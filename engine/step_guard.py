"""StepGuard: one request's fault fails that request, never the step or the engine.

`execute(sched)` runs the model step. If it raises, the guard finds the
culprit requests: from the exception when a stage knows whose work failed
(`RequestFault`, raised by batch building and sampling-metadata code), else
by bisecting the batch (re-running halves until single failing requests
remain). The culprits (and, through `expand`, their n > 1 siblings) are
dropped and the step is re-run without them; seeded noise is keyed by
(seed, token position), so the survivors sample exactly as they would have.
Re-running is safe: a step only writes the KV slots of its
own scheduled tokens, and the final run rewrites all of them.

A fault that no single request reproduces (every request fails alone, or no
subset fails) is not a request's fault: it propagates and the engine dies.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from engine.errors import RequestFault
from engine.sched.output import ModelRunnerOutput, ScheduledRequest, SchedulerOutput

log = logging.getLogger(__name__)


class StepGuard:
    def __init__(self, execute: Callable[[SchedulerOutput], ModelRunnerOutput]):
        self._execute = execute

    def execute(self, sched: SchedulerOutput, expand: Callable[[set[str]], set[str]]
                ) -> tuple[SchedulerOutput, ModelRunnerOutput | None, dict[str, BaseException]]:
        """Returns (the step actually run, its result or None if nothing is left,
        culprit request id -> its exception). `expand` maps culprit ids to every
        id that must leave the step with them (siblings of an n > 1 request)."""
        culprits: dict[str, BaseException] = {}
        while True:  # each failed attempt removes >= 1 request: at most len(batch) rounds
            try:
                return sched, self._execute(sched), culprits
            except Exception as exc:
                found = self._find_culprits(sched, exc)
                if not found:
                    raise
                for rid, err in found.items():
                    log.error("request %s failed in the model step; it is finished with an error "
                              "and the step retried without it", rid, exc_info=err)
                culprits.update(found)
                gone = expand(set(culprits))
                sched = sched.without(gone)
                if sched.is_empty:
                    return sched, None, culprits

    def _find_culprits(self, sched: SchedulerOutput, exc: Exception) -> dict[str, BaseException]:
        ids = {s.request_id for s in sched.scheduled}
        if isinstance(exc, RequestFault) and exc.request_id in ids:
            return {exc.request_id: exc.cause}
        entries = list(sched.scheduled)
        if len(entries) == 1:
            return {entries[0].request_id: exc}
        mid = len(entries) // 2
        found = {**self._bisect(sched, entries[:mid]), **self._bisect(sched, entries[mid:])}
        if len(found) == len(entries):  # every request fails alone: the step itself is broken
            return {}
        return found

    def _bisect(self, sched: SchedulerOutput, entries: list[ScheduledRequest]
                ) -> dict[str, BaseException]:
        try:
            kept = {s.request_id for s in entries}
            self._execute(sched.without({s.request_id for s in sched.scheduled} - kept))
            return {}
        except Exception as exc:
            if isinstance(exc, RequestFault):
                return {exc.request_id: exc.cause}
            if len(entries) == 1:
                return {entries[0].request_id: exc}
            mid = len(entries) // 2
            return {**self._bisect(sched, entries[:mid]), **self._bisect(sched, entries[mid:])}
