"""Differential-privacy settings: validation, the Flower strategy wrapper and the privacy accountant.

Central DP (client-level, DP-FedAvg): every sampled client clips its model update (new shared parameters
minus the global ones) to L2 norm `clipping_norm` (Flower's `fixedclipping_mod`, registered on the train
handler only), the server averages the clipped updates with equal weights and adds Gaussian noise of
standard deviation `noise_multiplier * clipping_norm / n` to the average of n updates
(`DifferentialPrivacyClientSideFixedClipping`). Each round that aggregates is one Gaussian release with
sensitivity `clipping_norm / n`; `ClientLevelAccountant` composes them with Renyi DP (Opacus's
`RDPAccountant`) and converts to (epsilon, delta):

* `epsilon` assumes no amplification by sampling (every round could have used any client): a sound
  bound whatever way the server picks clients.
* `epsilon_amplified` assumes each client takes part in a round independently with probability
  q = sampled / num_clients (Poisson sampling) and that the sample stays secret. Flower samples a fixed
  number of clients uniformly without replacement, so this is an approximation; it is only meaningful
  when the server is trusted to sample at random. With fraction 1.0 both are equal.

The guarantee is *client-level*: for neighbouring federations that differ in one client's whole
dataset (all its users), under the threat model in docs/federated.md (honest-but-curious server that
runs the noise step faithfully; anyone who sees the released global models is the adversary).

Local DP (`LocalDpMod`): each client clips its update and adds Gaussian noise itself before sending,
calibrated to (local_epsilon, local_delta) per release; this protects even against the server, at a
much larger utility cost. Rounds compose (basic composition is reported: rounds x local_epsilon).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from logging import INFO

from flwr.app import Message

try:  # imported lazily by name in tests that never touch Flower's strategies
    from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping
except ImportError:  # pragma: no cover
    DifferentialPrivacyClientSideFixedClipping = object  # type: ignore[assignment,misc]

from flwr.supercore import log

CENTRAL_DP_STRATEGIES = ("fedavg", "fedprox")


class PrivacyConfigError(ValueError):
    """An invalid privacy setting; the message names the setting and what to do."""


@dataclass
class DPSettings:
    central: bool = False
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float | None = None  # None: 0.1 / num_clients
    local: bool = False
    local_epsilon: float = 1.0
    local_delta: float = 1e-5
    local_sensitivity: float = 1.0
    local_clipping_norm: float = 1.0

    def as_dict(self) -> dict:
        return asdict(self)


def validate_dp(dp: dict | None, num_clients: int, strategy: str = "fedavg",
                secure_aggregation: bool = False) -> DPSettings:
    """Check `federated.dp.*` against the federation; returns settings with `delta` resolved.

    Raises PrivacyConfigError naming the offending setting.
    """
    dp = dict(dp or {})
    unknown = set(dp) - set(DPSettings.__dataclass_fields__)
    if unknown:
        raise PrivacyConfigError(f"federated.dp has unknown keys {sorted(unknown)}; "
                                 f"known: {sorted(DPSettings.__dataclass_fields__)}.")
    s = DPSettings(**dp)
    if num_clients < 1:
        raise PrivacyConfigError(f"federated.num_clients={num_clients} must be >= 1.")
    if s.central:
        if not _finite(s.noise_multiplier) or s.noise_multiplier < 0:
            raise PrivacyConfigError(f"federated.dp.noise_multiplier={s.noise_multiplier} must be a finite number "
                                     ">= 0 (1.0 or more for meaningful privacy).")
        if not _finite(s.clipping_norm) or s.clipping_norm <= 0:
            raise PrivacyConfigError(f"federated.dp.clipping_norm={s.clipping_norm} must be > 0 (the L2 bound on "
                                     "each client's update).")
        if s.delta is None:
            s.delta = 0.1 / num_clients
        if not _finite(s.delta) or not 0 < s.delta < 1.0 / num_clients:
            raise PrivacyConfigError(
                f"federated.dp.delta={s.delta} must be in (0, 1/num_clients) = (0, {1.0 / num_clients:.3g}) for "
                f"{num_clients} clients: a delta of 1/num_clients or more allows leaking one client's data "
                "outright. Use e.g. 0.1/num_clients (the default when delta is null).")
        if strategy not in CENTRAL_DP_STRATEGIES:
            raise PrivacyConfigError(
                f"federated.dp.central=true with federated.strategy.name={strategy!r}: central DP noise is "
                f"calibrated to a plain average of clipped updates; use one of {CENTRAL_DP_STRATEGIES}.")
        if secure_aggregation:
            raise PrivacyConfigError("federated.dp.central=true and federated.secure_aggregation=true together are "
                                     "not supported: the SecAgg+ path uses Flower's legacy workflow; pick one.")
    if s.local:
        if not _finite(s.local_epsilon) or s.local_epsilon <= 0:
            raise PrivacyConfigError(f"federated.dp.local_epsilon={s.local_epsilon} must be > 0.")
        if not _finite(s.local_delta) or not 0 < s.local_delta < 1:
            raise PrivacyConfigError(f"federated.dp.local_delta={s.local_delta} must be in (0, 1).")
        if not _finite(s.local_sensitivity) or s.local_sensitivity <= 0:
            raise PrivacyConfigError(f"federated.dp.local_sensitivity={s.local_sensitivity} must be > 0.")
        if not _finite(s.local_clipping_norm) or s.local_clipping_norm <= 0:
            raise PrivacyConfigError(f"federated.dp.local_clipping_norm={s.local_clipping_norm} must be > 0.")
    return s


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def gaussian_local_std(sensitivity: float, epsilon: float, delta: float) -> float:
    """Noise std of the classic Gaussian mechanism that LocalDpMod uses (Dwork & Roth, Thm A.1)."""
    return sensitivity * math.sqrt(2 * math.log(1.25 / delta)) / epsilon


class ClientLevelAccountant:
    """Composes one sampled Gaussian release per aggregated round with Opacus's RDP accountant.

    Two views are kept (see the module docstring): `epsilon()` without amplification by sampling
    (sample rate 1) and `epsilon_amplified()` with Poisson-sampling amplification at the round's rate.
    """

    def __init__(self, noise_multiplier: float, delta: float):
        from opacus.accountants import RDPAccountant

        self.noise_multiplier, self.delta = float(noise_multiplier), float(delta)
        self._plain, self._amplified = RDPAccountant(), RDPAccountant()
        self.releases = 0

    def step(self, sample_rate: float) -> None:
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample rate {sample_rate} must be in (0, 1].")
        self.releases += 1
        if self.noise_multiplier <= 0:
            return
        self._plain.step(noise_multiplier=self.noise_multiplier, sample_rate=1.0)
        self._amplified.step(noise_multiplier=self.noise_multiplier, sample_rate=float(sample_rate))

    def epsilon(self) -> float:
        return self._eps(self._plain)

    def epsilon_amplified(self) -> float:
        return self._eps(self._amplified)

    def _eps(self, acc) -> float:
        if self.releases == 0:
            return 0.0
        if self.noise_multiplier <= 0:
            return math.inf
        return float(acc.get_epsilon(self.delta))

    def state_dict(self) -> dict:
        return {"noise_multiplier": self.noise_multiplier, "delta": self.delta, "releases": self.releases,
                "plain": [list(h) for h in self._plain.history],
                "amplified": [list(h) for h in self._amplified.history]}

    def load_state_dict(self, state: dict) -> None:
        if (state["noise_multiplier"], state["delta"]) != (self.noise_multiplier, self.delta):
            raise PrivacyConfigError(
                f"resuming with federated.dp noise_multiplier={self.noise_multiplier}, delta={self.delta} but the run "
                f"was accounted with {state['noise_multiplier']}, {state['delta']}: keep the DP settings of the run.")
        self.releases = int(state["releases"])
        self._plain.history = [tuple(h) for h in state["plain"]]
        self._amplified.history = [tuple(h) for h in state["amplified"]]


class RobustClientSideFixedClipping(DifferentialPrivacyClientSideFixedClipping):
    """Flower's client-side fixed-clipping wrapper, tolerant of failed clients.

    Flower's wrapper skips a round's aggregation when any reply is an error; here failed replies are
    dropped first (the server loop already logged them) and the noise is calibrated to the number of
    updates actually averaged (sensitivity clipping_norm / n_aggregated), so the per-round guarantee
    the accountant composes holds whatever arrived.
    """

    def aggregate_train(self, server_round: int, replies):
        ok = [m for m in replies if isinstance(m, Message) and not m.has_error()]
        if not ok:
            return None, None
        configured = self.num_sampled_clients
        self.num_sampled_clients = len(ok)
        try:
            log(INFO, "central DP: %d clipped updates, noise std %.5f", len(ok),
                self.noise_multiplier * self.clipping_norm / len(ok))
            return super().aggregate_train(server_round, ok)
        finally:
            self.num_sampled_clients = configured
