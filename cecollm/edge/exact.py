"""The exact mode over the broker: the edge drafts and never waits, the cloud verifies behind it.

Every step the edge drafts the next token (the confident exit's top-1, else the last exit's)
and feeds it at once; the rows go up with their drafts (the sender), and one VERIFY at a time
asks the cloud to check the drafts of every row it has. A verdict that confirms is taken between
two layers as it arrives; one that finds a wrong draft stops the edge step in flight at the next
layer boundary, both sides roll back (the cloud already has, before it answered) and the edge
goes on from the cloud's token in the session's next epoch. Below `wait_below` confidence the
edge does not draft: it waits for the cloud's token, as the paper's mode does. When the cloud
is lost the edge says so once and finishes alone, its tokens marked unverified. The shown
tokens are the confirmed ones, in order (drafts.DraftBook).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from cecollm.dtypes import to_numpy
from cecollm.edge.drafts import DraftBook
from cecollm.edge.session import CloudGone, EdgeResult, Generation
from cecollm.generation import StopGeneration
from cecollm.wire import edge_cloud as ep
from cecollm.wire.rpc import CallTimeout
from cecollm.wire.wire import ErrorCode, ProtocolError

log = logging.getLogger(__name__)


@dataclass
class _InFlight:
    seq: int
    row: int  # the last row it asks the cloud to check
    sent: float  # time.perf_counter() when it left
    deadline: float  # time.monotonic() past which it timed out


class ExactRun:
    """One exact generation of an EdgeClient (its sockets, partition and sender)."""

    def __init__(self, client, gen: Generation, prompt_ids: list[int], result: EdgeResult, on_token,
                 max_new_tokens: int | None = None) -> None:
        self.client = client
        self.gen = gen
        self.stats = gen.stats
        self.prompt = list(prompt_ids)
        self.result = result
        budget = client.config.max_new_tokens if max_new_tokens is None else max_new_tokens
        self.book = DraftBook(len(prompt_ids), budget, client.eos, on_token)
        self.in_flight: _InFlight | None = None
        self.last_row = -1  # the last row handed to the sender
        self.rollback_to: int | None = None  # a verdict's roll-back, applied once the step in flight stops
        self.step_seconds: list[float] = []  # edge compute of the step that drafted each token (for waste)

    # ---- the loop ------------------------------------------------------------------------
    def run(self) -> None:
        try:
            self._loop()
        except StopGeneration:  # on_token ended it: the tokens shown so far are the answer
            pass
        book, stats = self.book, self.stats
        self.result.token_ids[:] = [r.token_id for r in book.shown]
        self.result.tokens[:] = list(book.shown)
        stats.edge_tokens = sum(1 for r in book.shown if r.verified and r.decided_by != "cloud")
        stats.cloud_tokens = sum(1 for r in book.shown if r.decided_by == "cloud")
        stats.fallback_tokens = sum(1 for r in book.shown if not r.verified)

    def _loop(self) -> None:
        book, edge, stats = self.book, self.gen.edge, self.stats
        inputs = self.prompt
        while not book.done:
            if self.gen.session is None:  # the cloud is lost (or never was): the edge finishes alone
                inputs = self._alone(inputs)
                continue
            if book.drafting_done:
                t0 = time.perf_counter()
                self._upload(edge.flush())  # the last drafts' rows must reach the cloud
                stats.edge_seconds += time.perf_counter() - t0
            else:
                t0 = time.perf_counter()
                out = edge.step(inputs, abort=self._verdict_stops_step)
                seconds = time.perf_counter() - t0
                stats.edge_seconds += seconds
                if out is None:  # a wrong draft before this step's input: the step is waste
                    stats.wasted_seconds += seconds
                    inputs = self._roll_back()
                    continue
                if out.confidence < self.client.config.wait_below:  # no draft: the cloud decides this one
                    self._upload(out.uploads)
                    inputs = self._wait_for(out)
                    continue
                book.draft(out.token, out.exit, out.confidence)
                stats.drafts += 1
                self.step_seconds.append(seconds)
                self._upload(out.uploads)
                inputs = [out.token]
            self._ask()
            if self._take_replies(block=book.drafting_done):
                inputs = self._roll_back()

    def _alone(self, inputs: list[int]) -> list[int]:
        """One step with no cloud: the drafting exit decides, the token is shown unverified."""
        if self.book.drafts and self.book.confirmed < len(self.book.drafts):
            self.book.go_unverified()
            return inputs
        t0 = time.perf_counter()
        out = self.gen.edge.step(inputs)
        self.stats.edge_seconds += time.perf_counter() - t0
        self.book.take_unverified(out.token, out.exit, out.confidence)
        return [out.token]

    def _wait_for(self, out) -> list[int]:
        """The cloud's token after the step's row (the edge made no draft there): the next inputs. With
        the cloud lost meanwhile, the step's own top-1 is taken, unverified."""
        index = out.position + 1 - len(self.prompt)  # the generated token the cloud is to give
        while self.book.confirmed <= index:
            if self.gen.session is None:
                self.book.go_unverified()
                self.book.take_unverified(out.token, out.exit, out.confidence)
                return [out.token]
            self._ask()
            if self._take_replies(block=True):
                return self._roll_back()
        return [self.book.last_token()]

    # ---- uploads and requests ----------------------------------------------------------
    def _upload(self, uploads) -> None:
        client, gen = self.client, self.gen
        for up in uploads:
            rows = to_numpy(up.hidden[0].to(client.wire_dtype).contiguous())  # [n, hidden] in the wire dtype
            gen.kept.append((up.start, rows))
            client._sender.rows(up.start, rows, self._drafts_for(up.start, rows.shape[0]))
            self.last_row = max(self.last_row, up.start + rows.shape[0] - 1)

    def _drafts_for(self, start: int, n: int) -> tuple[int, ...]:
        drafts = (self.book.draft_after(r) for r in range(start, start + n))
        return tuple(ep.NO_DRAFT if d is None else d for d in drafts)

    def _ask(self) -> None:
        """Send a VERIFY for every row the cloud has, unless one is under way or nothing is unconfirmed."""
        if self.in_flight is not None or self.gen.session is None:
            return
        if self.last_row + 1 - len(self.prompt) < self.book.confirmed:
            return  # the rows uploaded so far hold no unconfirmed draft
        client, gen = self.client, self.gen
        msg = ep.Verify(client.config.device_id, client._next_seq(), gen.session, gen.epoch, self.last_row)
        sent = client._rpc.bytes_sent
        try:
            client._rpc.send(msg.to_frames())
        except CallTimeout as exc:
            self._go_alone(str(exc))
            return
        self.stats.bytes_up += client._rpc.bytes_sent - sent
        self.in_flight = _InFlight(msg.seq, self.last_row, time.perf_counter(),
                                   time.monotonic() + client.config.timeout)

    # ---- verdicts ------------------------------------------------------------------------
    def _verdict_stops_step(self) -> bool:
        """Between two layers of a step: take a verdict that has come; stop the step at a roll-back."""
        return self.in_flight is not None and self._take_replies(block=False)

    def _take_replies(self, block: bool) -> bool:
        """Take the reply to the VERIFY under way if it is here (or, blocking, when it comes); whether
        it rolled back. A timeout or a lost cloud ends the verification (the edge goes on alone)."""
        rpc, flight = self.client._rpc, self.in_flight
        if flight is None:
            return False
        while True:
            wait = max(0.0, flight.deadline - time.monotonic()) if block else 0.0
            t0 = time.perf_counter()
            got = rpc.bytes_received
            frames = rpc.poll(wait)
            if block:
                self.stats.waiting_seconds += time.perf_counter() - t0
            self.stats.bytes_down += rpc.bytes_received - got
            if frames is None:
                if time.monotonic() >= flight.deadline:
                    self._timed_out()
                return False
            try:
                reply = ep.parse(frames, ep.REPLIES)
            except ProtocolError as exc:
                log.warning("reply refused: %s", exc)
                continue
            if reply.seq != flight.seq:
                log.debug("late reply to request %d skipped", reply.seq)
                continue
            self.in_flight = None
            return self._verdict(reply, flight)

    def _verdict(self, reply, flight: _InFlight) -> bool:
        stats, gen = self.stats, self.gen
        if isinstance(reply, ep.Error):
            self._refused(reply)
            return False
        gen.timeouts_in_row = 0
        stats.verifies += 1
        stats.verify_seconds += time.perf_counter() - flight.sent
        stats.cloud_seconds += reply.cloud_seconds
        rollback = self.book.verdict(reply.position, reply.token, reply.prob)
        if rollback is None:
            return False
        stats.rollbacks += 1
        wrong = rollback - len(self.prompt)  # the generated token the cloud replaced
        stats.wasted_seconds += sum(self.step_seconds[wrong + 1:])
        del self.step_seconds[wrong + 1:]
        self.rollback_to = rollback
        return True

    def _roll_back(self) -> list[int]:
        """Apply the verdict's roll-back: the edge's KV and pending rows, the kept rows, a new epoch."""
        length, gen = self.rollback_to, self.gen
        assert length is not None, "a roll-back was announced"
        self.rollback_to = None
        gen.edge.rollback(length)
        gen.kept = [(s, rows[:length - s]) for s, rows in gen.kept if s < length]
        gen.epoch += 1
        self.client._sender.new_epoch(gen.epoch)
        self.last_row = min(self.last_row, length - 1)
        return [self.book.last_token()]

    def _timed_out(self) -> None:
        """The VERIFY under way got no answer in time: ask again, or after `max_timeouts` go alone."""
        self.client._rpc.reset()  # a late answer cannot pass for the next request's
        self.in_flight = None
        self.stats.timeouts += 1
        self.gen.timeouts_in_row += 1
        if self.gen.timeouts_in_row >= self.client.config.max_timeouts:
            self._go_alone(f"{self.gen.timeouts_in_row} verifications in a row timed out")

    def _refused(self, reply: ep.Error) -> None:
        """The cloud refused the VERIFY: a lost state is reopened and uploaded again (once), else go alone."""
        client, gen = self.client, self.gen
        if reply.code in (ErrorCode.UNKNOWN_DEVICE, ErrorCode.MISSING) and not self.stats.reuploads:
            log.info("device %d: %s; opening a new session and uploading again", client.config.device_id,
                     reply.message)
            self.stats.reuploads += 1
            gen.epoch = 0
            try:
                gen.session = client.session = client._open(self.stats, gen.kept, self._drafts_for)
            except CloudGone as exc:
                self._go_alone(str(exc))
            return
        self._go_alone(f"the cloud refused to verify: {reply.message}")

    def _go_alone(self, why: str) -> None:
        self.in_flight = None
        self.client._go_alone(self.gen, why)
