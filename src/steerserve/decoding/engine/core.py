"""The engine: a step loop on its own thread over continuously batched lanes.

One step = plan (the scheduler places waiting requests and says which rows run, which join,
which long prompt gets a chunk) -> execute the plan (refusals answered, the chunk
prefilled, the rows computed: forwards per hosted model, late lanes, combine, sample; each
request alone if the batch raised) -> commit (lanes advance, tokens reach their requests,
finished and failed requests free their slots). Other threads only submit, abort, call and
read counts.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.lora.slots import LoraSlots
from steerserve.decoding.engine.admission import Admission, Inadmissible
from steerserve.decoding.engine.chunking import prefill_chunk
from steerserve.decoding.engine.compute import StepComputer
from steerserve.decoding.engine.inbox import Abort, Call, Message, Submit, Wake
from steerserve.decoding.engine.isolation import Computed, compute_isolated
from steerserve.decoding.engine.output import EngineStats, Output, rows_of
from steerserve.decoding.engine.plan import StepPlan
from steerserve.decoding.engine.scheduler import Scheduler
from steerserve.decoding.engine.state import Sequence
from steerserve.decoding.model.capture import Capture
from steerserve.decoding.model.hosted import HostedModel
from steerserve.decoding.model.info import ModelInfo
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import (
    EngineRequest,
    Failure,
    FinishReason,
    OutputSink,
    RequestOutput,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # KV-cache slots per hosted model = lanes decoded together
    max_queue: int = 512  # waiting requests beyond this are refused (HTTP 429)
    max_prefill_tokens: int = 512  # padded prompt tokens per prefill forward; longer
    # prompts are prefilled this many tokens a step (chunked prefill)
    max_loras: int = 0  # LoRA slots (adapters resident at once); 0 = LoRA off
    max_lora_rank: int = 16
    lora_triton: bool | None = None  # None: the process's choice (kernels.dispatch)
    forward: str = "auto"  # "fused" (own forward), "hf" (the modules), or auto
    packed_weights: bool = True  # projections and LM head on oneDNN-packed copies (CPU)
    compile_decode: bool = False  # decode batches as one inductor graph (minutes at start)
    threads: int | None = None  # torch threads of the engine thread (None: torch's default)
    prefix_cache_slots: int = 0  # KV slots keeping recent prompts for reuse (0: off)


class QueueFull(RuntimeError):
    pass


class EngineUnavailable(RuntimeError):
    """The engine thread has stopped: nothing can be served (HTTP 503)."""


class Engine:
    """Hosts one or more models (the first is the default and carries the LoRA adapters)."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 others: list[LoadedModel] | None = None) -> None:
        self.config = config or EngineConfig()
        self.models: dict[str, HostedModel] = {}
        for index, model in enumerate([loaded, *(others or [])]):
            self.models[model.name] = self._host(model, with_lora=index == 0)
        self.primary = self.models[loaded.name]
        self.admission = Admission(self.models)
        self.scheduler = Scheduler(self.admission, self.config.max_prefill_tokens)
        self.compute = StepComputer(self.models)
        self.stats = EngineStats()
        self.output = Output(self.models, self.stats)
        self._inbox: queue.SimpleQueue[Message] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards the counts below and the death flag
        self._queued = 0  # submitted, not yet admitted (the 429 bound)
        self._running = 0
        self._death: str | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _host(self, loaded: LoadedModel, with_lora: bool) -> HostedModel:
        bank, slots = None, None
        if with_lora and self.config.max_loras > 0:
            bank = LoraBank(loaded.model, self.config.max_loras, self.config.max_lora_rank,
                            self.config.lora_triton)
            slots = LoraSlots(bank)
        runner = ModelRunner(loaded, self.config.max_num_seqs, bank, self.config.forward,
                             self.config.prefix_cache_slots, self.config.packed_weights,
                             self.config.compile_decode)
        return HostedModel(loaded, runner, slots)

    # ---- any thread --------------------------------------------------------------------------
    def submit(self, request: EngineRequest, sink: OutputSink) -> None:
        self.submit_all([(request, sink)])

    def submit_all(self, pairs: list[tuple[EngineRequest, OutputSink]]) -> None:
        """Queue all or none: Inadmissible (can never run here), QueueFull, EngineUnavailable."""
        if len(pairs) > self.config.max_queue:  # waiting could never make room for it
            raise Inadmissible(f"this request has {len(pairs)} choices; the queue holds at "
                               f"most {self.config.max_queue} (--max-queue)", "n")
        for request, _ in pairs:
            self.admission.check(request)
        with self._lock:
            if self._death is not None:
                raise EngineUnavailable(self._death)
            if self._queued + len(pairs) > self.config.max_queue:
                raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting)")
            self._queued += len(pairs)
            for request, sink in pairs:
                self._inbox.put(Submit(request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(Abort(request_id))

    def call_between_steps(self, work) -> Future:
        """Run `work` on the engine thread between two steps (it may use the models)."""
        future: Future = Future()
        with self._lock:
            if self._death is not None:
                future.set_exception(EngineUnavailable(self._death))
                return future
            self._inbox.put(Call(work, future))
        return future

    def model_infos(self) -> dict[str, ModelInfo]:
        return {name: hosted.info for name, hosted in self.models.items()}

    def lora_targets(self) -> dict[str, torch.nn.Linear] | None:
        """The primary model's adapter-capable projections by module path (None: LoRA off)."""
        slots = self.primary.lora_slots
        return slots.bank.linears if slots is not None else None

    def capture(self, model: str, prompts: list[list[int]], capture: Capture) -> None:
        """A forward of `prompts` outside any lane, filling `capture.found`. Engine thread
        only: call it through `call_between_steps`."""
        runner = self.models[model].runner
        if capture.positions is not None:
            capture.positions = capture.positions.to(runner.device)
        runner.capture(prompts, capture)

    @property
    def num_running(self) -> int:
        return self._running

    @property
    def num_waiting(self) -> int:
        return self._queued

    @property
    def death(self) -> str | None:
        return self._death

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="steerserve-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._death is None

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(Wake())
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- engine thread -----------------------------------------------------------------------
    def _run(self) -> None:
        if self.config.threads:
            torch.set_num_threads(self.config.threads)  # a per-thread setting in OpenMP
        try:
            while not self._stopping.is_set():
                if not self.scheduler.has_work():
                    self._handle(self._inbox.get())
                self.step()
        except BaseException as exc:  # a fault of the engine itself, not of one request
            logger.critical("the engine thread died", exc_info=True)
            self._die(f"the engine stopped: {type(exc).__name__}: {exc}")

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    def step(self) -> None:
        self._drain_inbox()
        plan = self.scheduler.plan()
        self._dequeued(plan.left_the_queue)
        for submitted, exc in plan.refused:
            self._refuse(submitted, exc)
        if plan.chunk is not None:
            self._prefill_chunk(plan.chunk)
        self._running = self.scheduler.num_placed
        if not plan.rows:
            return
        computed = compute_isolated(self.compute, plan.rows, plan.joining)
        self._commit(computed, plan)
        self.stats.steps += 1

    def _prefill_chunk(self, s: Sequence) -> None:
        try:
            prefill_chunk(self.models, s, self.config.max_prefill_tokens)
        except Exception as exc:  # this request only; its lanes are freed at once
            logger.exception("request %s failed in a prefill chunk", s.request_id)
            self._report_failure(s, exc)
            self._release([s])

    def _commit(self, computed: Computed, plan: StepPlan) -> None:
        """Lanes advance and rows take their tokens; then every finished or failed request
        leaves (a failed one's lanes are freed only now: the outcomes may share its slots'
        runs)."""
        for outcome in computed.outcomes:
            self.output.advance_lanes(outcome.results)
        leaving = []
        for s, exc in computed.failed:
            self._report_failure(s, exc)
            leaving.append(s)
        for s, row in rows_of(computed.outcomes):
            try:
                self.output.take(s, row, s in plan.joining)
            except Exception as exc:  # this request's postprocessing only
                logger.exception("request %s failed after its step", s.request_id)
                self._report_failure(s, exc)
            if s.finished:
                leaving.append(s)
        if leaving:
            self._release(leaving)

    def _handle(self, message: Message) -> None:
        if isinstance(message, Submit):
            self.scheduler.waiting.append(message)
        elif isinstance(message, Abort):
            self._abort(message.request_id)
        elif isinstance(message, Call) and message.future.set_running_or_notify_cancel():
            try:
                message.future.set_result(message.work())
            except Exception as exc:  # reported to the caller; the engine goes on
                message.future.set_exception(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._handle(self._inbox.get_nowait())
            except queue.Empty:
                return

    # ---- admission, leaving, failures ---------------------------------------------------------
    def _dequeued(self, count: int) -> None:
        if count:
            with self._lock:
                self._queued -= count

    def _refuse(self, submitted: Submit, exc: Exception) -> None:
        logger.exception("request %s could not be admitted", submitted.request.request_id,
                         exc_info=exc)
        submitted.sink(_ended(submitted.request, FinishReason.ERROR,
                              Failure(f"internal error while admitting the request: {exc}")))

    def _report_failure(self, s: Sequence, exc: Exception) -> None:
        s.finish_reason = FinishReason.ERROR
        self.output.emit(s, (), (), None, failure=Failure(f"internal error during generation: "
                                                          f"{type(exc).__name__}: {exc}"))

    def _release(self, leaving: list[Sequence]) -> None:
        self.admission.release(leaving)
        self.scheduler.release(leaving)
        self._running = self.scheduler.num_placed
        for s in leaving:
            self.output.count_finished(s)

    def _abort(self, request_id: str) -> None:
        submitted = self.scheduler.remove_waiting(request_id)
        if submitted is not None:
            self._dequeued(1)
            submitted.sink(_ended(submitted.request, FinishReason.ABORT))
            return
        s = self.scheduler.find_running(request_id)
        if s is not None:
            s.finish_reason = FinishReason.ABORT
            self._release([s])
            self.output.emit(s, (), (), None)

    def _die(self, reason: str) -> None:
        """Every request the engine holds or will never read gets a 503 now."""
        with self._lock:
            self._death = reason
        failure = Failure(reason, status=503)
        for s in (*self.scheduler.running, *self.scheduler.warming):
            s.finish_reason = FinishReason.ERROR
            s.sink(_ended(s.request, FinishReason.ERROR, failure, len(s.output_ids)))
        pending = list(self.scheduler.waiting)
        while True:
            try:
                pending.append(self._inbox.get_nowait())
            except queue.Empty:
                break
        for message in pending:
            if isinstance(message, Submit):
                message.sink(_ended(message.request, FinishReason.ERROR, failure))
            elif isinstance(message, Call):
                message.future.set_exception(EngineUnavailable(reason))


def _ended(request: EngineRequest, reason: FinishReason, failure: Failure | None = None,
           completion_tokens: int = 0) -> RequestOutput:
    return RequestOutput(request.request_id, (), "", finished=True, finish_reason=reason,
                         prompt_tokens=len(request.prompt_ids),
                         completion_tokens=completion_tokens, failure=failure)
