"""The engine: a step loop on its own thread over continuously batched lanes.

One step = admit -> forward (per hosted model: decode its running lanes, prefill the new
ones, whatever request they belong to) -> combine (each request's lanes into one row) ->
sample once -> postprocess (detokenize, stop, report, free slots).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from steerserve.adapters.lora.bank import LoraBank
from steerserve.adapters.lora.slots import LoraSlots
from steerserve.adapters.steering.hooks import install_steering_hooks
from steerserve.decoding.engine.detokenizer import IncrementalDetokenizer
from steerserve.decoding.engine.scheduler import Scheduler
from steerserve.decoding.methods.combination import next_token_logits, prompt_logits
from steerserve.decoding.methods.strategies import ponder_prompt, sh2_keys
from steerserve.decoding.model import forward as lane_forward
from steerserve.decoding.model.hosted import HostedModel, Lane, LaneSpec
from steerserve.decoding.model.loader import LoadedModel
from steerserve.decoding.model.runner import ModelRunner
from steerserve.decoding.request import (
    FinishReason,
    GenerationRequest,
    RequestOutput,
    Sequence,
)
from steerserve.decoding.sampling.adaptive import head_choices
from steerserve.decoding.sampling.logprobs import TokenText, prompt_logprobs, token_logprob
from steerserve.decoding.sampling.sampler import RowState, SampleResult, sample

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # KV-cache slots per hosted model = lanes decoded together
    max_queue: int = 512  # waiting requests beyond this are refused (HTTP 429)
    max_prefill_tokens: int = 4096  # padded prompt tokens per prefill forward
    max_loras: int = 0  # LoRA slots (adapters resident at once); 0 = LoRA off
    max_lora_rank: int = 16
    lora_triton: bool | None = None  # None: Triton where kernels.dispatch says so


@dataclass
class EngineStats:
    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    steps: int = 0


class QueueFull(RuntimeError):
    pass


def eos_token_ids(loaded: LoadedModel) -> frozenset[int]:
    ids = {loaded.tokenizer.eos_token_id}
    configured = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    return frozenset(i for i in ids if i is not None)


class Engine:
    """Hosts one or more models (the first is the default); LoRA adapters run on the first."""

    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None,
                 others: list[LoadedModel] | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.models: dict[str, HostedModel] = {}
        for index, model in enumerate([loaded, *(others or [])]):
            self._host(model, with_lora=index == 0)
        self.scheduler = Scheduler(self.config.max_prefill_tokens)
        self.eos_ids = {name: eos_token_ids(h.loaded) for name, h in self.models.items()}
        self.token_text = {name: TokenText(h.loaded.tokenizer)
                           for name, h in self.models.items()}
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted but not yet finished, for the queue bound
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def _host(self, loaded: LoadedModel, with_lora: bool) -> None:
        lora_slots, bank = None, None
        if with_lora and self.config.max_loras > 0:
            bank = LoraBank(loaded.model, self.config.max_loras, self.config.max_lora_rank,
                            self.config.lora_triton)
            lora_slots = LoraSlots(bank)
        install_steering_hooks(loaded.model)
        runner = ModelRunner(loaded, self.config.max_num_seqs, bank)
        self.models[loaded.name] = HostedModel(loaded.name, loaded, runner, lora_slots)

    @property
    def primary(self) -> HostedModel:
        return self.models[self.loaded.name]

    @property
    def runner(self) -> ModelRunner:
        return self.primary.runner

    @property
    def lora_slots(self) -> LoraSlots | None:
        return self.primary.lora_slots

    # ---- thread-safe API -------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        if self.num_waiting >= self.config.max_queue:
            raise QueueFull(f"the request queue is full ({self.config.max_queue} waiting)")
        self._pending += 1
        self._inbox.put(("add", request))

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def call_between_steps(self, work: Callable[[], object]) -> Future:
        """Run `work` on the engine thread between two steps (it may use the model)."""
        future: Future = Future()
        self._inbox.put(("call", (work, future)))
        return future

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return max(0, self._pending - self.num_running)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="steerserve-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._inbox.put(("wake", None))
        if self._thread is not None:
            self._thread.join(timeout=30)

    # ---- engine thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            if not self.scheduler.has_work():
                self._handle(*self._inbox.get())
            try:
                self.step()
            except Exception as exc:  # keep serving: fail the lanes in flight, not the server
                logger.exception("engine step failed")
                self._fail_all(f"internal error during generation: {exc}")

    def _handle(self, kind: str, payload) -> None:
        if kind == "add":
            self.scheduler.waiting.append(payload)
        elif kind == "abort":
            self._abort(payload)
        elif kind == "call":
            work, future = payload
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(work())
                except Exception as exc:  # reported to the caller, the engine goes on
                    future.set_exception(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                self._handle(*self._inbox.get_nowait())
            except queue.Empty:
                return

    def has_work(self) -> bool:
        return self.scheduler.has_work() or not self._inbox.empty()

    def step(self) -> None:
        self._drain_inbox()
        admitted = self.scheduler.admit(self._new_sequence)
        running = list(self.scheduler.running)
        if not running:
            return
        for hosted in self.models.values():
            lane_forward.forward(hosted)
        self._start_ponder_lanes(admitted)
        logits = next_token_logits(running, self._runners(), self._width(running))
        given = head_choices(running, admitted)
        result = sample(logits, [self._row_state(s, t) for s, t in zip(running, given,
                                                                        strict=True)])
        self._postprocess(running, result, admitted)
        self.stats.steps += 1

    def _runners(self) -> dict[str, ModelRunner]:
        return {name: hosted.runner for name, hosted in self.models.items()}

    def _width(self, running: list[Sequence]) -> int:
        return max(self.models[s.lanes[0].spec.model].runner.vocab_size for s in running)

    # ---- admission ---------------------------------------------------------------------------
    def _lane_specs(self, request: GenerationRequest) -> tuple[LaneSpec, ...]:
        if request.method is not None:
            return request.method.lanes
        return (LaneSpec(request.model or self.loaded.name, request.prompt_ids,
                         request.adapter, request.steering),)

    def _new_sequence(self, request: GenerationRequest) -> Sequence | None:
        """A request's lanes, in free slots of their models; None = wait (no slot now)."""
        specs = self._lane_specs(request)
        unique: list[LaneSpec] = []
        for spec in specs:
            if not any(spec.same_as(u) for u in unique):
                unique.append(spec)
        if not self._slots_available(unique, request):
            return None
        lora = self._acquire_lora(unique)
        if lora is None:
            return None  # every LoRA slot is pinned by running lanes: wait
        sequence = self._sequence(request, specs[0].model)
        lanes = [Lane(spec, sequence, lora_slot=slot) for spec, slot in zip(unique, lora,
                                                                           strict=True)]
        sequence.lanes = [next(lane for lane in lanes if lane.spec.same_as(spec))
                          for spec in specs]
        sequence.lane_temperatures = [spec.temperature for spec in specs]
        self._prepare_lanes(sequence, lanes)
        return sequence

    def _slots_available(self, unique: list[LaneSpec], request: GenerationRequest) -> bool:
        needed: dict[str, int] = {}
        for spec in unique:
            needed[spec.model] = needed.get(spec.model, 0) + 1
        if request.method is not None and request.method.name == "sh2":
            model = unique[0].model  # the ponder lane joins after the original's prefill
            needed[model] += 1
        return all(self.models[name].free_slots >= count for name, count in needed.items())

    def _acquire_lora(self, unique: list[LaneSpec]) -> list[int] | None:
        taken: list[tuple[HostedModel, int]] = []
        for spec in unique:
            if spec.adapter is None:
                taken.append((None, -1))
                continue
            hosted = self.models[spec.model]
            if hosted.lora_slots is None:
                raise ValueError(f"model '{spec.model}' has LoRA disabled")
            slot = hosted.lora_slots.acquire(spec.adapter)
            if slot is None:
                for owner, held in taken:
                    if held >= 0:
                        owner.lora_slots.release(held)
                return None
            taken.append((hosted, slot))
        return [slot for _, slot in taken]

    def _sequence(self, request: GenerationRequest, model: str) -> Sequence:
        params = request.params
        loaded = self.models[model].loaded
        generator = None
        if params.seed is not None:
            generator = torch.Generator(loaded.device).manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer.for_prompt(
            loaded.tokenizer, list(request.prompt_ids), stop=params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens)
        return Sequence(request, detokenizer, generator, eos_ids=self.eos_ids[model])

    def _prepare_lanes(self, sequence: Sequence, lanes: list[Lane]) -> None:
        method = sequence.request.method
        scoring = sequence.params.prompt_logprobs is not None
        for lane in lanes:
            lane.wants_prompt_logits = scoring and (method is not None or lane is lanes[0])
            if method is not None and method.name == "dola":
                lane.capture_layers = method.layers
            self.models[lane.spec.model].add(lane)
        if method is not None and method.name == "sh2":
            lanes[0].wants_prompt_logits = True  # its prompt logprobs pick the keys
            self.models[lanes[0].spec.model].reserved += 1

    def _start_ponder_lanes(self, admitted: list[Sequence]) -> None:
        """SH2: the hesitation lane, keyed on the original lane's prefill, prefilled now."""
        joining: dict[str, list[Lane]] = {}
        for sequence in admitted:
            method = sequence.request.method
            if method is None or method.name != "sh2":
                continue
            orig = sequence.lanes[0]
            hosted = self.models[orig.spec.model]
            tokenizer = hosted.loaded.tokenizer
            keys = sh2_keys(orig.prompt_ids, orig.prompt_logits, method.key_num,
                            frozenset(tokenizer.all_special_ids), method.seed)
            spec = LaneSpec(orig.spec.model, ponder_prompt(tokenizer, orig.prompt_ids, keys),
                            orig.spec.adapter, orig.spec.steering)
            lora_slot = hosted.lora_slots.acquire(spec.adapter) if spec.adapter else -1
            ponder = Lane(spec, sequence, lora_slot=lora_slot,
                          wants_prompt_logits=orig.wants_prompt_logits
                          and sequence.params.prompt_logprobs is not None)
            hosted.reserved -= 1
            hosted.add(ponder)
            sequence.lanes.append(ponder)
            sequence.lane_temperatures.append(1.0)
            joining.setdefault(hosted.name, []).append(ponder)
        for name, lanes in joining.items():
            lane_forward.prefill(self.models[name], lanes)

    @staticmethod
    def _row_state(s: Sequence, given: float | None) -> RowState:
        return RowState(s.params, s.prompt_ids if s.params.repetition_penalty != 1.0 else [],
                        s.output_ids, s.generator, given)

    # ---- postprocess -------------------------------------------------------------------------
    def _postprocess(self, running: list[Sequence], result: SampleResult,
                     admitted: list[Sequence]) -> None:
        tokens = result.tokens.tolist()
        chosen = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        temperatures = result.temperatures.tolist()
        finished: list[Sequence] = []
        for row, s in enumerate(running):
            text = self.token_text[s.lanes[0].spec.model]
            record = None
            if s.params.logprobs is not None and chosen is not None:
                k = s.params.logprobs
                record = token_logprob(text, tokens[row], chosen[row],
                                       top_ids[row][:k] if k else [],
                                       top_values[row][:k] if k else [])
            scored = None
            if s in admitted and s.params.prompt_logprobs is not None:
                scored = self._prompt_logprobs(s, text)
            self._advance(s, tokens[row], record, scored, temperatures[row])
            if s.finished:
                finished.append(s)
        if finished:
            self._release(finished)

    def _prompt_logprobs(self, s: Sequence, text: TokenText):
        logits = prompt_logits(s, self._runners()) if len(s.request.prompt_ids) > 1 else None
        return prompt_logprobs(text, s.prompt_ids, logits, s.params.prompt_logprobs or 0)

    def _advance(self, s: Sequence, token: int, record, scored, temperature: float) -> None:
        params = s.params
        if params.max_tokens == 0:  # scoring only (echo): no generated token
            s.finish_reason = FinishReason.LENGTH
            self._emit(s, (), (), scored)
            return
        s.output_ids.append(token)
        self.stats.generation_tokens += 1
        if s.first_token_time is None:
            s.first_token_time = time.monotonic()
        if token in params.stop_token_ids or (token in s.eos_ids and not params.ignore_eos):
            s.finish_reason = FinishReason.STOP
        else:
            s.detokenizer.add_token(token)
            if s.detokenizer.stopped:
                s.finish_reason = FinishReason.STOP
        at_limit = (len(s.output_ids) >= params.max_tokens
                    or s.longest_lane_tokens >= self._context_limit(s))
        if s.finish_reason is None and at_limit:
            s.finish_reason = FinishReason.LENGTH
        used = (temperature,) if params.report_temperatures else ()
        self._emit(s, (token,), (record,) if record else (), scored, temperatures=used)

    def _context_limit(self, s: Sequence) -> int:
        return min(self.models[lane.spec.model].loaded.max_model_len for lane in s.lanes)

    def _emit(self, s: Sequence, tokens, records, scored, error: str | None = None,
              temperatures: tuple[float, ...] = ()) -> None:
        text = s.detokenizer.release(final=s.finished)
        output = RequestOutput(
            request_id=s.request_id, token_ids=tokens, text=text, logprobs=records,
            finished=s.finished, finish_reason=s.finish_reason,
            prompt_tokens=len(s.request.prompt_ids),
            completion_tokens=len(s.output_ids), prompt_logprobs=scored, error=error,
            temperatures=temperatures)
        s.request.sink(output)

    def _release(self, leaving: list[Sequence]) -> None:
        """Free every lane of the leaving requests (slots compacted per hosted model)."""
        by_model: dict[str, list[Lane]] = {}
        for s in leaving:
            for lane in s.unique_lanes:
                if lane.slot >= 0:
                    by_model.setdefault(lane.spec.model, []).append(lane)
            self._unreserve(s)
        for name, lanes in by_model.items():
            self.models[name].release(lanes)
        self.scheduler.release(leaving)
        for s in leaving:
            self._pending -= 1
            reason = s.finish_reason.value if s.finish_reason else "unknown"
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    def _unreserve(self, s: Sequence) -> None:
        """An SH2 request leaving before its ponder lane joined gives its slot back."""
        method = s.request.method
        if method is not None and method.name == "sh2" and len(s.lanes) == 1:
            self.models[s.lanes[0].spec.model].reserved -= 1

    # ---- aborts and failures -----------------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        request = self.scheduler.remove_waiting(request_id)
        if request is not None:
            self._pending -= 1
            request.sink(RequestOutput(request_id, (), "", finished=True,
                                       finish_reason=FinishReason.ABORT,
                                       prompt_tokens=len(request.prompt_ids)))
            return
        s = self.scheduler.find_running(request_id)
        if s is not None:
            s.finish_reason = FinishReason.ABORT
            self._release([s])
            self._emit(s, (), (), None)

    def _fail_all(self, message: str) -> None:
        running = list(self.scheduler.running)
        for s in running:
            s.finish_reason = FinishReason.ERROR
        if running:
            self._release(running)
        for s in running:
            self._emit(s, (), (), None, error=message)
