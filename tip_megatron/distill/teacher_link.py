"""The teacher on a grid of its own (another layout, other ranks, or both): what crosses
between the student's grid and the teacher's. docs/teacher.md draws it.

    link = TeacherLink(student_groups, teacher_groups, bridge(), spec)
    weight = link.output_weight(teacher_chunks)        # set-up, once: [V/tp_s, h_t] on the
                                                       # student's last stage
    hidden = link.exchange(microbatches, teacher_chunks)   # every step: one per micro-batch
    hidden[i].get()                                    # [s, b, h_t], waits for it to arrive

Ranks are named by their coordinates (tp, pp, dp) in each grid, megatron's order (TP fastest,
then DP, then PP: rank = offset + tp + TP*dp + TP*DP*pp, checked against the groups at
set-up). A step's micro-batches are numbered g = d*M + i over the student's replicas d (M
each); teacher replica j scores those with g % DP_t == j.

  1. token ids and positions: student rank (tp 0, stage 0) of replica d -> every rank of
     each teacher replica (one header [n, b, s] and, when n > 0, ids and positions);
  2. the teacher replica's forward-only pass over them (right-padded to one length: causal
     attention leaves the real positions' hidden states unchanged), in order of g;
  3. final hidden states [s, b, h_t] (compute dtype, gathered under sequence parallelism):
     teacher last-stage rank tp k -> the student's last-stage ranks tp r with r % TP_t == k
     of replica d, each micro-batch as soon as it is done (at most `queue_depth` in flight).

The student posts its receives before the teacher runs, so a rank that is both (the
`shared` placement) never waits on itself; a message to the same rank is handed over in
memory. Statistics, selection and the fused divergence read the hidden states and the
output-weight shard exactly as on one grid.
"""
from __future__ import annotations

import time
from collections import deque
from typing import Callable, Optional, Sequence

import torch

from tip_megatron.distill.step import Microbatch, output_weight, teacher_hidden_states
from tip_megatron.distill.teacher_grid import LinkSpec, spec_grids
from tip_megatron.runtime.parallel import Bridge, ParallelGroups

_HEADER, _IDS, _POS, _HIDDEN, _WEIGHT, _SIGNAL = 1, 2, 3, 4, 5, 6
STOP = -1
"""A header's n that tells a teacher rank the student has stopped (no more steps)."""


def _wait_sent(out: tuple) -> None:
    _wait(out[0], f"sending teacher hidden states to rank {out[2]}")


class TeacherRankLost(RuntimeError):
    """A transfer with a rank of the other grid failed (the rank died or hung up)."""


class PendingHidden:
    """One micro-batch's teacher hidden states, arriving (or arrived)."""

    def __init__(self, buffer: torch.Tensor, work=None, src: int = -1, on_wait: Optional[Callable] = None):
        self._buffer, self._work, self._src, self._on_wait = buffer, work, src, on_wait

    def get(self) -> torch.Tensor:
        if self._work is not None:
            start = time.perf_counter()
            _wait(self._work, f"receiving teacher hidden states from rank {self._src}")
            self._work = None
            if self._on_wait is not None:
                self._on_wait(time.perf_counter() - start)
        return self._buffer


def _wait(work, what: str) -> None:
    try:
        work.wait()
    except RuntimeError as err:  # gloo: the peer closed its connection (it died)
        raise _lost(what, err) from None


def _lost(what: str, err: RuntimeError) -> TeacherRankLost:
    # "[.../pair.cc:553] Connection closed by peer [127.0.0.1]:197. This is ..." -> its cause
    cause = str(err).splitlines()[0].split("] ", 1)[-1].split(". ")[0]
    return TeacherRankLost(f"{what} failed: that rank has stopped or died ({cause})")


class TeacherLink:
    """Both directions of the student <-> teacher traffic, for one rank (student, teacher
    or both). `student` / `teacher`: this rank's groups in each grid, None when it has no
    place there."""

    def __init__(self, student: Optional[ParallelGroups], teacher: Optional[ParallelGroups],
                 bridge: Bridge, spec: LinkSpec, device: torch.device) -> None:
        self.s, self.t, self.bridge, self.spec, self.device = student, teacher, bridge, spec, device
        self.me = bridge.rank
        self.wait_s = 0.0
        """Seconds the student waited for hidden states (the trainer reads and resets it)."""
        self.received_bytes = 0
        """Hidden-state bytes this rank received from other ranks (read and reset likewise)."""
        self.signal = 0
        """A teacher rank's received stop signal (its number; 0: none), sent after each step."""
        self._signals: list = []
        self._local: dict = {}
        for groups, grid, name in ((student, spec.student, "student"), (teacher, spec.teacher, "teacher")):
            if groups is not None and grid.rank(groups.tp_rank, groups.pp_rank, groups.dp_rank) != self.me:
                raise RuntimeError(f"{name} grid: megatron placed rank {self.me} at tp {groups.tp_rank}, "
                                   f"pp {groups.pp_rank}, dp {groups.dp_rank}, not where TeacherLink "
                                   "expects it (megatron's rank order changed)")

    # -------------------------------------------------------------- transport
    def _send(self, tensor: torch.Tensor, dst: int, tag: int, key) -> Optional[tuple]:
        if dst == self.me:
            self._local[(key, tag)] = tensor
            return None
        staged = tensor.detach().to(self.bridge.device).contiguous()  # gloo: host memory
        return self._isend(staged, dst, tag), staged, dst

    # gloo raises at once, not at wait(), when the peer's connection is already closed
    def _isend(self, tensor: torch.Tensor, dst: int, tag: int):
        try:
            return self.bridge.isend(tensor, dst, self.spec.tag_base + tag)
        except RuntimeError as err:
            raise _lost(f"sending to {self._peer(dst)} {dst}", err) from None

    def _irecv(self, buffer: torch.Tensor, src: int, tag: int):
        try:
            return self.bridge.irecv(buffer, src, self.spec.tag_base + tag)
        except RuntimeError as err:
            raise _lost(f"receiving from {self._peer(src)} {src}", err) from None

    def _peer(self, rank: int) -> str:
        """'teacher rank' / 'student rank' for a rank of the other world (`separate`)."""
        t = self.spec.teacher
        if not self.spec.separate:
            return "rank"
        return "teacher rank" if t.offset <= rank < t.offset + self._teacher_ranks() else "student rank"

    def _recv_into(self, buffer: torch.Tensor, src: int, tag: int, key):
        """(work or None, host buffer); a message from this rank is taken from memory."""
        if src == self.me:
            buffer.copy_(self._local.pop((key, tag)))
            return None, buffer
        host = buffer if buffer.device == self.bridge.device else torch.empty_like(buffer, device=self.bridge.device)
        return self._irecv(host, src, tag), host

    def _recv(self, shape, dtype, src: int, tag: int, key) -> torch.Tensor:
        buffer = torch.empty(shape, dtype=dtype)
        work, host = self._recv_into(buffer, src, tag, key)
        if work is not None:
            _wait(work, f"receiving from rank {src}")
        return host.to(self.device)

    # -------------------------------------------------------------- set-up
    def output_weight(self, teacher_chunks: Sequence[torch.nn.Module]) -> Optional[torch.Tensor]:
        """The teacher's output-weight rows of this student rank's vocabulary shard
        ([V/tp_s, h_t]) on the student's last stage (None elsewhere), cut from the shards
        of the teacher's replica 0 (collective over both grids)."""
        sp, tp_, spec = spec_grids(self.spec)
        v = self.spec.padded_vocab
        vs, vt = v // sp.tp, v // tp_.tp
        sends, mine = [], None
        held = None
        if self.t is not None and self.t.dp_rank == 0 and self.t.is_last_stage:
            held = output_weight(teacher_chunks)
        if self.s is not None and self.s.is_last_stage:
            mine = torch.empty(vs, spec.hidden_size, dtype=spec.dtype, device=self.device)
        recvs = []
        for d in range(sp.dp):
            for r in range(sp.tp):
                dst = sp.rank(r, sp.pp - 1, d)
                for k in range(tp_.tp):
                    lo, hi = max(r * vs, k * vt), min((r + 1) * vs, (k + 1) * vt)
                    if lo >= hi:
                        continue
                    src = tp_.rank(k, tp_.pp - 1, 0)
                    key = ("weight", d, r, k)
                    if self.me == src:
                        out = self._send(held[lo - k * vt:hi - k * vt], dst, _WEIGHT, key)
                        if out:
                            sends.append(out)
                    if self.me == dst:
                        work, host = self._recv_into(
                            torch.empty(hi - lo, spec.hidden_size, dtype=spec.dtype), src, _WEIGHT, key)
                        recvs.append((work, host, lo - r * vs, hi - r * vs, src))
        for work, host, a, b, src in recvs:
            if work is not None:
                _wait(work, f"receiving the teacher's output weight from rank {src}")
            mine[a:b] = host.to(self.device)
        for work, _, dst in sends:
            _wait(work, f"sending the teacher's output weight to rank {dst}")
        return mine

    # -------------------------------------------------------------- one step
    def exchange(self, microbatches: Sequence[Microbatch],
                 teacher_chunks: Sequence[torch.nn.Module]) -> list[PendingHidden]:
        """One step's round trip on this rank: send this replica's inputs (student), post
        the hidden-state receives (student's last stage), score the teacher replica's share
        (teacher). Returns the student's pending hidden states (one per micro-batch on its
        last stage; [] elsewhere)."""
        sends = self._send_inputs(microbatches) if self._is_sender() else []
        pending = self._post_hidden_receives(microbatches)
        if self.spec.separate and self.me == 0:  # each teacher rank's signal flag, after its step
            for src in range(self.spec.teacher.offset, self.spec.teacher.offset + self._teacher_ranks()):
                flag = torch.zeros(1, dtype=torch.int64)
                self._signals.append((self._irecv(flag, src, _SIGNAL), flag, src))
        if self.t is not None:
            self.serve_once(teacher_chunks)
        for work, _, dst in sends:
            _wait(work, f"sending rollouts to teacher rank {dst}")
        return pending

    def _teacher_ranks(self) -> int:
        t = self.spec.teacher
        return t.tp * t.pp * t.dp

    def teacher_signal(self) -> int:
        """Student rank 0, under `separate`: the stop signal a teacher rank received during
        the last step (0: none), so a signal that reached only the teacher's ranks still
        stops the run at a step boundary (the student's ranks then agree on it)."""
        got = 0
        for work, flag, src in self._signals:
            _wait(work, f"receiving the signal flag of teacher rank {src}")
            got = max(got, int(flag.item()))
        self._signals = []
        return got

    def stop(self) -> None:
        """The student's last word to the teacher ranks (after its last step or save)."""
        if self._is_sender():
            sends = [self._send(torch.tensor([STOP, 0, 0, 0]), dst, _HEADER, ("in", self.s.dp_rank, j))
                     for j in range(self.spec.teacher.dp) for dst in self.spec.teacher.replica(j)]
            for out in sends:
                if out:
                    _wait(out[0], f"telling teacher rank {out[2]} to stop")

    def _is_sender(self) -> bool:
        return self.s is not None and self.s.tp_rank == 0 and self.s.pp_rank == 0

    def _send_inputs(self, microbatches: Sequence[Microbatch]) -> list:
        d, spec = self.s.dp_rank, self.spec
        sends = []
        m = len(microbatches)  # <= M; fewer (or none) when several teachers share the rows
        b, s = microbatches[0].input_ids.shape if m else (0, 0)
        for j in range(spec.teacher.dp):
            mine = [i for i in range(m) if (d * spec.microbatches + i) % spec.teacher.dp == j]
            header = torch.tensor([len(mine), b, s, m])
            ids = torch.stack([microbatches[i].input_ids for i in mine]) if mine else None
            pos = torch.stack([microbatches[i].position_ids for i in mine]) if mine else None
            for dst in spec.teacher.replica(j):
                key = ("in", d, j)
                for tensor, tag in ((header, _HEADER), (ids, _IDS), (pos, _POS)):
                    if tensor is not None:
                        out = self._send(tensor, dst, tag, key + (dst,))
                        if out:
                            sends.append(out)
        return sends

    def _post_hidden_receives(self, microbatches: Sequence[Microbatch]) -> list[PendingHidden]:
        """One pending transfer per micro-batch (last stage). Under `separate` at most
        `queue_depth` receives are posted ahead of the micro-batch the loss path is reading
        (their host buffers bound the staging memory); under `shared` all of them at once (the
        same ranks run the teacher first: a bounded window would wait on itself)."""
        if self.s is None or not self.s.is_last_stage:
            return []
        spec, d, r = self.spec, self.s.dp_rank, self.s.tp_rank
        window = _Window(self, ahead=spec.queue_depth if spec.separate else len(microbatches))
        pending: list[PendingHidden] = []
        for i, mb in enumerate(microbatches):
            g = d * spec.microbatches + i
            j = g % spec.teacher.dp
            src = spec.teacher.rank(r % spec.teacher.tp, spec.teacher.pp - 1, j)
            b, s = mb.input_ids.shape
            if src == self.me:  # scored by this very rank: filled in memory during `serve_once`
                pending.append(_LocalHidden(self._local, (("hidden", g, self.me), _HIDDEN)))
            else:
                pending.append(window.add((s, b, spec.hidden_size), src))
        window.post_through(0)
        return pending

    def _add_wait(self, seconds: float) -> None:
        self.wait_s += seconds

    def serve_once(self, teacher_chunks: Sequence[torch.nn.Module]) -> bool:
        """A teacher rank's part of one step: receive the inputs of its replica's share,
        score them, send the hidden states. False when the student said stop."""
        spec, j = self.spec, self.t.dp_rank
        items = []
        stopped = False
        for d in range(spec.student.dp):
            src = spec.student.rank(0, 0, d)
            key = ("in", d, j, self.me)
            n, b, s, m = self._recv((4,), torch.int64, src, _HEADER, key).tolist()
            if n == STOP:
                stopped = True
                continue
            if n == 0:
                continue
            ids = self._recv((n, b, s), torch.int64, src, _IDS, key)
            pos = self._recv((n, b, s), torch.int64, src, _POS, key)
            owned = [i for i in range(m) if (d * spec.microbatches + i) % spec.teacher.dp == j]
            items.extend((d * spec.microbatches + i, d, ids[k], pos[k]) for k, i in enumerate(owned))
        if stopped:
            return False
        items.sort(key=lambda item: item[0])
        if items:
            self._score_and_send(items, teacher_chunks)
        if self.spec.separate:
            out = self._send(torch.tensor([self.signal]), 0, _SIGNAL, ("signal", self.me))
            _wait(out[0], "sending the signal flag to rank 0")
        return True

    def _score_and_send(self, items: list, teacher_chunks) -> None:
        spec, t = self.spec, self.t
        length = max(ids.shape[1] for _, _, ids, _ in items)
        if spec.teacher_sequence_parallel:
            length = -(-length // spec.teacher.tp) * spec.teacher.tp
        mbs = [_padded(ids, pos, length) for _, _, ids, pos in items]
        in_flight: deque = deque()

        def sink(index: int, hidden: torch.Tensor) -> None:
            g, d, ids, _ = items[index]
            real = hidden[:ids.shape[1]].contiguous()
            for r in range(t.tp_rank, spec.student.tp, spec.teacher.tp):
                dst = spec.student.rank(r, spec.student.pp - 1, d)
                out = self._send(real, dst, _HIDDEN, ("hidden", g, dst))
                if out:
                    in_flight.append(out)
            while len(in_flight) > spec.queue_depth * max(1, spec.student.tp // spec.teacher.tp):
                _wait_sent(in_flight.popleft())

        teacher_hidden_states(teacher_chunks, t, mbs, seq_length=length,
                              micro_batch_size=items[0][2].shape[0], sink=sink)
        while in_flight:
            _wait_sent(in_flight.popleft())


class _Window:
    """The student's receives of one step's remote hidden states, posted in micro-batch
    order (the order each teacher rank sends in) at most `ahead` beyond the one being read."""

    def __init__(self, link: TeacherLink, ahead: int) -> None:
        self.link, self.ahead = link, ahead
        self.items: list[_HostHidden] = []
        self.posted = 0

    def add(self, shape, src: int) -> "_HostHidden":
        item = _HostHidden(self, len(self.items), shape, src)
        self.items.append(item)
        return item

    def post_through(self, index: int) -> None:
        """Post the receives of items [posted, index + ahead]."""
        link, spec = self.link, self.link.spec
        while self.posted < len(self.items) and self.posted <= index + self.ahead:
            item = self.items[self.posted]
            buffer = torch.empty(item.shape, dtype=spec.dtype, device=link.bridge.device)
            item.post(buffer, link._irecv(buffer, item.src, _HIDDEN))
            link.received_bytes += buffer.nbytes
            self.posted += 1


class _HostHidden(PendingHidden):
    """Hidden states of a micro-batch another rank scored: received into a buffer on the
    bridge's device, moved to the compute device once, the buffer then dropped."""

    def __init__(self, window: _Window, index: int, shape, src: int) -> None:
        super().__init__(torch.empty(0), None, src, window.link._add_wait)
        self._window, self._index, self.shape, self.src = window, index, shape, src
        self._ready = False

    def post(self, buffer: torch.Tensor, work) -> None:
        self._buffer, self._work = buffer, work

    def get(self) -> torch.Tensor:
        if not self._ready:
            self._window.post_through(self._index)
            self._buffer = super().get().to(self._window.link.device)
            self._ready = True
        return self._buffer


class _LocalHidden(PendingHidden):
    """Hidden states this rank scored for itself (the `shared` placement)."""

    def __init__(self, local: dict, key) -> None:
        super().__init__(torch.empty(0))
        self._store, self._key = local, key

    def get(self) -> torch.Tensor:
        if self._key is not None:
            self._buffer = self._store.pop(self._key)
            self._key = None
        return self._buffer


def _padded(ids: torch.Tensor, pos: torch.Tensor, length: int) -> Microbatch:
    b, s = ids.shape
    if s < length:
        extra = length - s
        ids = torch.cat([ids, ids.new_zeros(b, extra)], dim=1)
        pos = torch.cat([pos, pos[:, -1:] + torch.arange(1, extra + 1, device=pos.device)], dim=1)
    zeros = torch.zeros(b, length, dtype=torch.bool, device=ids.device)
    return Microbatch(ids, pos, zeros, torch.zeros(b, dtype=torch.int64, device=ids.device))
