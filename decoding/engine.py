"""The engine: a step loop on its own thread over continuously batched lanes.

One step = admit -> forward (decode running lanes, prefill new ones) -> sample once ->
postprocess (detokenize, stop, report, free slots).
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

from decoding.adaptive_temperature import head_temperature
from decoding.detokenizer import IncrementalDetokenizer
from decoding.logprobs import TokenText, prompt_logprobs, token_logprob
from decoding.lora_bank import LoraBank
from decoding.lora_slots import LoraSlots
from decoding.model_loader import LoadedModel
from decoding.model_runner import ModelRunner, PrefillResult
from decoding.sampler import RowState, SampleResult, sample
from decoding.scheduler import Scheduler
from decoding.sequence import (
    FinishReason,
    GenerationRequest,
    RequestOutput,
    Sequence,
)
from decoding.steering_hooks import install_steering_hooks
from decoding.steering_plan import SteeringPlan, decode_plan, prefill_plan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int = 64  # KV-cache slots = lanes decoded together
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
    def __init__(self, loaded: LoadedModel, config: EngineConfig | None = None) -> None:
        self.loaded = loaded
        self.config = config or EngineConfig()
        self.lora_slots = None
        bank = None
        if self.config.max_loras > 0:
            bank = LoraBank(loaded.model, self.config.max_loras, self.config.max_lora_rank,
                            self.config.lora_triton)
            self.lora_slots = LoraSlots(bank)
        install_steering_hooks(loaded.model)
        self.runner = ModelRunner(loaded, self.config.max_num_seqs, bank)
        self._decode_plan: tuple[tuple, SteeringPlan | None] = ((), None)
        self.scheduler = Scheduler(self.config.max_num_seqs, self.config.max_prefill_tokens)
        self.eos_ids = eos_token_ids(loaded)
        self.token_text = TokenText(loaded.tokenizer)
        self.stats = EngineStats()
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending = 0  # submitted but not yet finished, for the queue bound
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

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
        decoding = list(self.scheduler.running)
        admitted = self.scheduler.admit(self._new_sequence)
        if not decoding and not admitted:
            return
        logits, hidden, prefill = self._forward(decoding, admitted)
        lanes = decoding + admitted
        result = sample(logits, [self._row_state(s, hidden[row], row >= len(decoding))
                                 for row, s in enumerate(lanes)])
        self._postprocess(lanes, result, admitted, prefill)
        self.stats.steps += 1

    def _forward(self, decoding: list[Sequence], admitted: list[Sequence]):
        """(B, V) logits and (B, C) final hidden states, decode rows first, and the prefill."""
        parts, hidden, prefill = [], [], None
        if decoding:
            decoded = self.runner.decode(
                0, [s.output_ids[-1] for s in decoding], [s.num_tokens - 1 for s in decoding],
                [s.lora_slot for s in decoding], self._steering_for_decode(decoding))
            parts.append(decoded.logits)
            hidden.append(decoded.hidden)
        if admitted:
            prompts = [s.prompt_ids for s in admitted]
            steering = prefill_plan([s.request.steering for s in admitted],
                                    [len(p) for p in prompts], max(len(p) for p in prompts),
                                    self.loaded.device)
            prefill = self.runner.prefill(
                len(decoding), prompts, [s.params.prompt_logprobs is not None for s in admitted],
                [s.lora_slot for s in admitted], steering)
            parts.append(prefill.last_logits)
            hidden.append(prefill.last_hidden)
            self.stats.prompt_tokens += sum(len(s.request.prompt_ids) for s in admitted)
        if len(parts) == 1:
            return parts[0], hidden[0], prefill
        return torch.cat(parts), torch.cat(hidden), prefill

    def _steering_for_decode(self, decoding: list[Sequence]) -> SteeringPlan | None:
        """Rebuilt only when the running lanes change (their order is the batch order)."""
        specs = [s.request.steering for s in decoding]
        key = tuple(specs)  # specs compare by identity, and the key keeps them alive
        if key != self._decode_plan[0]:
            self._decode_plan = (key, decode_plan(specs, self.loaded.device))
        return self._decode_plan[1]

    def _new_sequence(self, request: GenerationRequest) -> Sequence | None:
        lora_slot = -1
        if request.adapter is not None:
            if self.lora_slots is None:
                raise ValueError("this engine has LoRA disabled (max_loras=0)")
            lora_slot = self.lora_slots.acquire(request.adapter)
            if lora_slot is None:
                return None  # every LoRA slot is pinned by running lanes: wait
        params = request.params
        generator = None
        if params.seed is not None:
            generator = torch.Generator(self.loaded.device).manual_seed(params.seed)
        detokenizer = IncrementalDetokenizer.for_prompt(
            self.loaded.tokenizer, list(request.prompt_ids), stop=params.stop,
            include_stop=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens)
        return Sequence(request, detokenizer, generator, lora_slot=lora_slot)

    @staticmethod
    def _row_state(s: Sequence, hidden: torch.Tensor, first_token: bool) -> RowState:
        return RowState(s.params, s.prompt_ids if s.params.repetition_penalty != 1.0 else [],
                        s.output_ids, s.generator, Engine._head_choice(s, hidden, first_token))

    @staticmethod
    def _head_choice(s: Sequence, hidden: torch.Tensor, first_token: bool) -> float | None:
        """A learned head's temperature: every token, or once from the last prompt position."""
        rule = s.params.adaptive
        if rule is None or rule.method != "learned":
            return None
        if rule.level == "token":
            return head_temperature(rule, hidden, s.generator)
        if first_token:
            s.sequence_temperature = head_temperature(rule, hidden, s.generator)
        return s.sequence_temperature

    # ---- postprocess -------------------------------------------------------------------------
    def _postprocess(self, lanes: list[Sequence], result: SampleResult,
                     admitted: list[Sequence], prefill: PrefillResult | None) -> None:
        tokens = result.tokens.tolist()
        chosen = result.logprobs.tolist() if result.logprobs is not None else None
        top_ids = result.top_ids.tolist() if result.top_ids is not None else None
        top_values = result.top_logprobs.tolist() if result.top_logprobs is not None else None
        temperatures = result.temperatures.tolist()
        first_new = len(lanes) - len(admitted)
        finished: list[Sequence] = []
        for row, lane in enumerate(lanes):
            record = None
            if lane.params.logprobs is not None and chosen is not None:
                k = lane.params.logprobs
                record = token_logprob(self.token_text, tokens[row], chosen[row],
                                       top_ids[row][:k] if k else [],
                                       top_values[row][:k] if k else [])
            scored = None
            if row >= first_new and lane.params.prompt_logprobs is not None:
                scored = self._prompt_logprobs(lane, prefill.prompt_logits[row - first_new])
            self._advance(lane, tokens[row], record, scored, temperatures[row])
            if lane.finished:
                finished.append(lane)
        if finished:
            self._release(finished)

    def _prompt_logprobs(self, lane: Sequence, logits: torch.Tensor | None):
        if len(lane.request.prompt_ids) < 2:
            logits = None
        return prompt_logprobs(self.token_text, lane.prompt_ids, logits,
                               lane.params.prompt_logprobs or 0)

    def _advance(self, lane: Sequence, token: int, record, scored, temperature: float) -> None:
        params = lane.params
        if params.max_tokens == 0:  # scoring only (echo): no generated token
            lane.finish_reason = FinishReason.LENGTH
            self._emit(lane, (), (), scored)
            return
        lane.output_ids.append(token)
        self.stats.generation_tokens += 1
        if lane.first_token_time is None:
            lane.first_token_time = time.monotonic()
        if token in params.stop_token_ids or (token in self.eos_ids and not params.ignore_eos):
            lane.finish_reason = FinishReason.STOP
        else:
            lane.detokenizer.add_token(token)
            if lane.detokenizer.stopped:
                lane.finish_reason = FinishReason.STOP
        at_limit = (len(lane.output_ids) >= params.max_tokens
                    or lane.num_tokens >= self.loaded.max_model_len)
        if lane.finish_reason is None and at_limit:
            lane.finish_reason = FinishReason.LENGTH
        used = (temperature,) if params.report_temperatures else ()
        self._emit(lane, (token,), (record,) if record else (), scored, temperatures=used)

    def _emit(self, lane: Sequence, tokens, records, scored, error: str | None = None,
              temperatures: tuple[float, ...] = ()) -> None:
        text = lane.detokenizer.release(final=lane.finished)
        output = RequestOutput(
            request_id=lane.request_id, token_ids=tokens, text=text, logprobs=records,
            finished=lane.finished, finish_reason=lane.finish_reason,
            prompt_tokens=len(lane.request.prompt_ids),
            completion_tokens=len(lane.output_ids), prompt_logprobs=scored, error=error,
            temperatures=temperatures)
        lane.request.sink(output)

    def _release(self, leaving: list[Sequence]) -> None:
        for move in self.scheduler.release(leaving):
            self.runner.move_slot(move.source, move.target, move.length)
        for lane in leaving:
            self._pending -= 1
            if lane.lora_slot >= 0:
                self.lora_slots.release(lane.lora_slot)
                lane.lora_slot = -1
            reason = lane.finish_reason.value if lane.finish_reason else "unknown"
            self.stats.finished[reason] = self.stats.finished.get(reason, 0) + 1

    # ---- aborts and failures -----------------------------------------------------------------
    def _abort(self, request_id: str) -> None:
        request = self.scheduler.remove_waiting(request_id)
        if request is not None:
            self._pending -= 1
            request.sink(RequestOutput(request_id, (), "", finished=True,
                                       finish_reason=FinishReason.ABORT,
                                       prompt_tokens=len(request.prompt_ids)))
            return
        lane = self.scheduler.find_running(request_id)
        if lane is not None:
            lane.finish_reason = FinishReason.ABORT
            self._release([lane])
            self._emit(lane, (), (), None)

    def _fail_all(self, message: str) -> None:
        lanes = list(self.scheduler.running)
        for lane in lanes:
            lane.finish_reason = FinishReason.ERROR
        if lanes:
            self._release(lanes)
        for lane in lanes:
            self._emit(lane, (), (), None, error=message)
