"""`--gamma auto`: choose γ every round from the cost model and a running estimate of α.

Each round the policy asks the cost model which γ (0 = a plain decoding step) maximises the
speedup for the batch as it is now — its size and every sequence's current context — at the
acceptance rate estimated so far. The estimate counts, per sequence and round, the draft positions
that were tried (up to and including the first rejection) and those accepted, with older rounds
forgotten geometrically, starting from a prior worth a few rounds. While γ = 0 is chosen nothing
is learned about α, so a one-token probe round runs every `probe_every` plain steps.
"""

from __future__ import annotations

from magicdec.costmodel import CostModel
from magicdec.engine.state import BatchState

ALPHA_PRIOR = 0.8  # StreamingLLM-512 self-speculation accepts 0.79-0.84 on PG-19 (MagicDec, Llama-3.1-8B)
PRIOR_TRIALS = 16.0  # the prior weighs as much as 16 observed draft positions
FORGET = 0.9  # per round: an estimate follows the text within ~10 rounds
PROBE_EVERY = 16


class AlphaEstimate:
    def __init__(self, prior: float = ALPHA_PRIOR, weight: float = PRIOR_TRIALS, forget: float = FORGET) -> None:
        self.accepted, self.trials, self.forget = prior * weight, weight, forget

    @property
    def value(self) -> float:
        return min(max(self.accepted / self.trials, 0.0), 0.999)

    def update(self, gamma: int, accepted: list[int]) -> None:
        self.accepted = self.forget * self.accepted + sum(accepted)
        self.trials = self.forget * self.trials + sum(min(k + 1, gamma) for k in accepted)


class AutoGamma:
    """A `GammaPolicy` driven by a `CostModel`."""

    def __init__(self, cost: CostModel, max_gamma: int, alpha: AlphaEstimate | None = None,
                 probe_every: int = PROBE_EVERY) -> None:
        self.cost, self.max_gamma = cost, max_gamma
        self.alpha = alpha or AlphaEstimate()
        self.probe_every, self._plain_steps = probe_every, 0
        self.predicted: list[float] = []  # the model's speedup for each choice, for diagnostics

    def choose(self, state: BatchState) -> int:
        contexts = state.contexts()
        gamma, predicted = self.cost.best_gamma(len(contexts), contexts, self.alpha.value, self.max_gamma)
        if gamma == 0:
            self._plain_steps += 1
            if self._plain_steps % self.probe_every == 0:
                gamma = 1
        self.predicted.append(predicted)
        return gamma

    def observe(self, gamma: int, accepted: list[int]) -> None:
        if gamma > 0:
            self.alpha.update(gamma, accepted)
