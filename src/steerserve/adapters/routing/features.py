"""A prompt's routing feature, computed off the engine: ELREA's gradient, or a hidden state.

Routing never runs on the request worker either: a request whose routing is not known yet
raises RoutingPending from its translation; the server computes it on a thread of its own
(ServingContext.translate) and translates again, now finding it among the recent routings.

The feature model is a float32 copy of the base model taken before the engine touches it,
with the router's feature adapter applied by forward hooks (y + s (x A^T) B^T, as peft does).
The gradient feature is that of the prompt's own next-token loss with respect to the
adapter's B matrices in the router's feature layer (the only leaves that require grad, so
autograd records the top of the network only), flattened in module-path (name) order and
normalised.
The hidden feature is the mean final hidden state of the prompt without the adapter. Both run
on the routing worker, one prompt at a time, never in the batched step.
"""

from __future__ import annotations

import copy
import threading
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn

from steerserve.adapters.lora.files import LoraAdapter, load_lora_adapter
from steerserve.adapters.routing.files import Router


class FeatureModel:
    def __init__(self, base: nn.Module, router: Router, max_rank: int) -> None:
        self.model = copy.deepcopy(base).eval()
        # Tensor by tensor: a model read from GGUF refuses .float() (its quantization config).
        for tensor in [*self.model.parameters(), *self.model.buffers()]:
            if tensor.is_floating_point():
                tensor.data = tensor.data.float()
            tensor.requires_grad_(False)
        adapter = load_lora_adapter("feature", router.feature_adapter, self.model, max_rank,
                                    param=None)
        layer = f"layers.{router.config.feature_layer}."
        self.leaves: list[torch.Tensor] = []
        self.enabled = True
        modules = dict(self.model.named_modules())
        self.device = next(self.model.parameters()).device
        for path in sorted(adapter.weights):
            a, b = (t.float().to(self.device) for t in adapter.weights[path])
            b = b.clone().requires_grad_(layer in path)
            if b.requires_grad:
                self.leaves.append(b)
            modules[path].register_forward_hook(self._hook(adapter, a, b))
        if not self.leaves:
            raise ValueError(f"the feature adapter has no weights in layer "
                             f"{router.config.feature_layer}")
        self._lock = threading.Lock()

    def _hook(self, adapter: LoraAdapter, a: torch.Tensor, b: torch.Tensor) -> Callable:
        def add_lora(_module, inputs, output):
            if not self.enabled:
                return output
            return output + adapter.scaling * (inputs[0] @ a.T) @ b.T
        return add_lora

    @property
    def width(self) -> int:
        """D, the gradient feature's length."""
        return sum(leaf.numel() for leaf in self.leaves)

    def gradient(self, prompt: list[int]) -> torch.Tensor:
        """(D,) unit gradient of the prompt's mean next-token loss w.r.t. the leaves (CPU);
        a prompt needs two tokens for a loss."""
        ids = torch.tensor([prompt], device=self.device)
        with self._lock, torch.enable_grad():
            self.enabled = True
            loss = self.model(input_ids=ids, labels=ids).loss
            grads = torch.autograd.grad(loss, self.leaves)
        flat = torch.cat([g.flatten() for g in grads]).cpu()
        return flat / flat.norm().clamp_min(1e-12)

    def hidden(self, prompt: list[int]) -> torch.Tensor:
        """(H,) mean final hidden state of the prompt, without the adapter (CPU)."""
        with self._lock, torch.no_grad():
            self.enabled = False
            try:
                states = self.model(input_ids=torch.tensor([prompt], device=self.device),
                                    output_hidden_states=True).hidden_states[-1]
            finally:
                self.enabled = True
        return states[0].mean(0).cpu()


ROUTING_TOKENS = 512  # the prompt's last tokens a feature reads: bounds a routing's cost
RECENT_ROUTINGS = 256  # kept, so a translation run again finds its own

RoutingKey = tuple[tuple[int, ...], bool, int]  # (prompt's last tokens, by hidden, top_k)


class RoutingPending(Exception):  # noqa: N818 (a signal, not an error)
    """Raised where a routing is needed and not yet computed; `compute` computes it."""

    def __init__(self, router: PromptRouter, key: RoutingKey) -> None:
        super().__init__("routing pending")
        self.router, self.key = router, key

    def compute(self) -> None:
        self.router.compute(self.key)


class PromptRouter:
    """A router with its feature model: what a request's routing asks."""

    def __init__(self, router: Router, features: FeatureModel, model: str) -> None:
        self.router, self.features = router, features
        self.model = model  # the hosted model whose prompts it routes
        if features.width != router.centroids.shape[1]:
            raise ValueError(f"the router's centroids are {router.centroids.shape[1]} wide, "
                             f"its feature adapter's gradient {features.width}")
        self._recent: OrderedDict[RoutingKey, list[tuple[str, float]]] = OrderedDict()
        self._recent_lock = threading.Lock()

    @property
    def experts(self) -> tuple[str, ...]:
        return self.router.config.experts

    def route(self, prompt: list[int], by_hidden: bool, top_k: int) -> list[tuple[str, float]]:
        """The experts for a prompt, from its last ROUTING_TOKENS tokens (bounding what one
        routing costs); RoutingPending until it has been computed."""
        key = (tuple(prompt[-ROUTING_TOKENS:]), by_hidden, top_k)
        with self._recent_lock:
            found = self._recent.get(key)
            if found is not None:
                self._recent.move_to_end(key)
                return found
        raise RoutingPending(self, key)

    def compute(self, key: RoutingKey) -> None:
        prompt, by_hidden, top_k = key
        feature = (self.features.hidden(list(prompt)) if by_hidden
                   else self.features.gradient(list(prompt)))
        chosen = self.router.route(feature, by_hidden, top_k)
        with self._recent_lock:
            self._recent[key] = chosen
            while len(self._recent) > RECENT_ROUTINGS:
                self._recent.popitem(last=False)
