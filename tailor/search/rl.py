"""AdaDeep's optimiser (Liu et al., IEEE TMC 2021) in numpy: two agents build a plan unit
by unit.

- A DQN-style agent picks the technique **family** of each unit (an option's
  :attr:`~tailor.search.base.Option.family`: its label up to the first `(` or `+`, so
  `keep`, `prune`, `tucker2`, `quantize`, ...), among those the unit offers: a small MLP
  Q(state) -> value per family, epsilon-greedy, experience replay, a target network
  (soft updates) and double-DQN targets.
- A DDPG-style actor-critic picks the **strength** within the family: the actor maps
  (state, family) to a continuous action in [0, 1] (plus Gaussian exploration noise),
  which becomes the family's option whose `strength` is nearest; the critic
  Q(state, family, action) is trained on the same transitions and the actor ascends its
  gradient.

The state of unit i is its features (z-scored across units), its position, the share of
units so far given to each family and their mean strength. An episode is one whole
assignment; episodes are evaluated in batches, and the reward, at the episode's end, is
minus the Scorer's objective plus a budget penalty (:func:`_reward`), recomputed at
training time because the objective's normaliser widens as the search sees more. The
value targets mix the bootstrap with the Monte Carlo return (`mc`). Exploration
decays with the evaluations spent (a repeated plan costs none), and each batch after the
first includes one exploiting episode, the agents' current answer. Seeded, deterministic.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from tailor.search.base import SearchContext

__all__ = ["run", "MLP"]

logger = logging.getLogger(__name__)


class MLP:
    """A small ReLU MLP trained with Adam, optionally with a sigmoid output; rows are
    samples."""

    def __init__(self, sizes: list[int], rng: np.random.Generator, *, sigmoid: bool = False):
        self.sigmoid = sigmoid
        self.params: list[np.ndarray] = []
        for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True):
            self.params += [rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, fan_out)),
                            np.zeros(fan_out)]  # fmt: skip
        self.params[-2] *= 0.1  # small first outputs keep the first targets sane
        self._m = [np.zeros_like(p) for p in self.params]
        self._v = [np.zeros_like(p) for p in self.params]
        self._t = 0

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """The output and the activations :meth:`backward` needs."""
        acts = [x]
        n = len(self.params) // 2
        for k in range(n):
            z = acts[-1] @ self.params[2 * k] + self.params[2 * k + 1]
            if k < n - 1:
                z = np.maximum(z, 0.0)
            elif self.sigmoid:
                z = 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))
            acts.append(z)
        return acts[-1], acts

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.forward(x)[0]

    def backward(
        self, acts: list[np.ndarray], grad: np.ndarray
    ) -> tuple[list[np.ndarray], np.ndarray]:
        """Gradients of the parameters and of the input, given d(loss)/d(output)."""
        n = len(self.params) // 2
        g = grad * acts[-1] * (1.0 - acts[-1]) if self.sigmoid else grad
        grads: list[np.ndarray] = [np.zeros(0)] * len(self.params)
        for k in reversed(range(n)):
            grads[2 * k] = acts[k].T @ g
            grads[2 * k + 1] = g.sum(axis=0)
            g = g @ self.params[2 * k].T
            if k > 0:
                g = g * (acts[k] > 0)
        return grads, g

    def step(self, grads: list[np.ndarray], lr: float) -> None:
        """One Adam step."""
        self._t += 1
        b1, b2 = 0.9, 0.999
        c1, c2 = 1 - b1**self._t, 1 - b2**self._t
        for p, g, m, v in zip(self.params, grads, self._m, self._v, strict=True):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= lr * (m / c1) / (np.sqrt(v / c2) + 1e-8)

    def clone(self) -> MLP:
        out = MLP.__new__(MLP)
        out.sigmoid, out._t = self.sigmoid, 0
        out.params = [p.copy() for p in self.params]
        out._m = [np.zeros_like(p) for p in self.params]
        out._v = [np.zeros_like(p) for p in self.params]
        return out

    def follow(self, other: MLP, tau: float) -> None:
        """Soft update towards `other` (for a target network)."""
        for p, q in zip(self.params, other.params, strict=True):
            p += tau * (q - p)


def _reward(
    ctx: SearchContext, plan: tuple[int, ...], violation_weight: float, flat: float
) -> float:
    """`-(objective + penalty)`, the penalty 0 for a plan that meets every budget and
    `flat + violation_weight * violation` for one that does not (violation: the Scorer's
    sum of relative shortfalls). Unlike the Scorer's ranking, which puts every miss after
    every hit, the reward stays smooth across a budget's edge, so a near miss still tells
    the agents which way the objective goes (with a cliff of 1 the agents learned little
    beyond "compress less" on tests/search's synthetic problems). Failures and far
    misses are capped."""
    scorer = ctx.scorer
    cap = scorer.penalty + 3.0
    metrics = ctx.metrics(plan)
    if metrics is None:
        return -cap
    violation = scorer.violation(metrics)
    penalty = flat + violation_weight * violation if violation > 0 else 0.0
    return -min(scorer.objective(metrics) + penalty, cap)


class _Space:
    """Families per unit and the agents' state vectors."""

    def __init__(self, ctx: SearchContext):
        units = ctx.units
        self.n = len(units)
        self.families: list[str] = []
        for u in units:
            for o in u.options:
                if o.family not in self.families:
                    self.families.append(o.family)
        nf = len(self.families)
        # members[i][f]: option indices of family f in unit i, by strength.
        self.members = [[[] for _ in range(nf)] for _ in units]
        for i, u in enumerate(units):
            for j, o in enumerate(u.options):
                self.members[i][self.families.index(o.family)].append(j)
            for f in range(nf):
                self.members[i][f].sort(key=lambda j, u=u: (u.options[j].strength, j))
        self.strengths = [[o.strength for o in u.options] for u in units]
        self.valid = np.array([[bool(m) for m in row] for row in self.members])
        self.choose = np.array([[len(m) > 1 for m in row] for row in self.members])
        rows = [np.nan_to_num(np.asarray(u.features, dtype=float).ravel()) for u in units]
        width = max((len(r) for r in rows), default=0)
        x = np.zeros((self.n, width))
        for i, r in enumerate(rows):
            x[i, : len(r)] = r
        std = x.std(axis=0)
        self.features = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
        self.dim = width + 2 + nf

    def state(self, i: int, counts: np.ndarray, strength: float) -> np.ndarray:
        position = i / max(self.n - 1, 1)
        return np.concatenate([self.features[i], [position], counts / self.n, [strength / self.n]])

    def option(self, i: int, f: int, action: float) -> int:
        """The option of family f in unit i whose strength is nearest to `action`."""
        return min(self.members[i][f], key=lambda j: (abs(self.strengths[i][j] - action), j))


class _Replay:
    """Transitions in growing arrays: state, family, action, next state and family, last?,
    unit, episode."""

    def __init__(self, dim: int):
        self.size = 0
        self.s = np.zeros((256, dim))
        self.ns = np.zeros((256, dim))
        self.ints = np.zeros((256, 4), dtype=int)  # family, next family, unit, episode
        self.a = np.zeros(256)

    def add(self, s, f, a, ns, nf, unit, episode) -> None:
        if self.size == len(self.a):
            self.s = np.concatenate([self.s, np.zeros_like(self.s)])
            self.ns = np.concatenate([self.ns, np.zeros_like(self.ns)])
            self.ints = np.concatenate([self.ints, np.zeros_like(self.ints)])
            self.a = np.concatenate([self.a, np.zeros_like(self.a)])
        k = self.size
        self.s[k], self.ns[k], self.a[k] = s, ns, a
        self.ints[k] = (f, nf, unit, episode)
        self.size += 1


def run(
    ctx: SearchContext,
    seed: int = 0,
    *,
    episodes: int | None = None,
    batch: int = 4,
    hidden: int = 32,
    lr: float = 3e-3,
    updates: int = 6,
    minibatch: int = 64,
    explore: int | None = None,
    gamma: float = 1.0,
    tau: float = 0.1,
    mc: float = 0.5,
    violation_weight: float = 10.0,
    flat_penalty: float = 0.1,
) -> None:
    """Runs the two agents on `ctx`.

    Args:
        ctx: the search context.
        seed: seeds the networks and the exploration.
        episodes: at most this many (default: four times the evaluation budget, or 300).
        batch: episodes evaluated per batch.
        hidden: width of the networks' two hidden layers.
        lr: Adam's learning rate.
        updates: gradient steps per new evaluation, each on `minibatch` replayed
            transitions (a batch of repeated plans teaches nothing new).
        explore: evaluations over which epsilon and the action noise decay (default:
            half the evaluation budget, or 150).
        gamma: discount (1: the reward comes once, at the episode's end).
        tau: soft-update rate of the target networks.
        mc: weight of the Monte Carlo return in the value targets (the rest is the
            target networks' bootstrap): the reward comes only at the end, and the
            return carries it back to the first units at once.
        violation_weight: how much a missed budget's relative shortfall costs in the
            reward (see :func:`_reward`).
        flat_penalty: what missing any budget costs in the reward, on top.
    """
    rng = np.random.default_rng(seed)
    space = _Space(ctx)
    n, nf = space.n, len(space.families)
    budget = ctx.budget.max_evaluations
    episodes = episodes or (4 * budget if budget else 300)
    explore = explore or max((budget or 300) // 2, 1)
    q_net = MLP([space.dim, hidden, hidden, nf], rng)
    actor = MLP([space.dim + nf, hidden, hidden, 1], rng, sigmoid=True)
    critic = MLP([space.dim + nf + 1, hidden, hidden, 1], rng)
    q_target, actor_target, critic_target = q_net.clone(), actor.clone(), critic.clone()
    eye = np.eye(nf)
    replay = _Replay(space.dim)
    plans: list[tuple[int, ...]] = []

    def rollout(epsilon: np.ndarray, sigma: np.ndarray) -> list[tuple[tuple[int, ...], list]]:
        """Episodes side by side, one per entry of `epsilon` and `sigma`."""
        m = len(epsilon)
        counts, strength = np.zeros((m, nf)), np.zeros(m)
        choice = np.zeros((m, n), dtype=int)
        steps: list[list] = [[] for _ in range(m)]
        for i in range(n):
            s = np.array([space.state(i, counts[e], strength[e]) for e in range(m)])
            q = np.where(space.valid[i], q_net(s), -np.inf)
            options = np.flatnonzero(space.valid[i])
            greedy = np.argmax(q, axis=1)
            fam = np.where(
                rng.random(m) < epsilon, options[rng.integers(len(options), size=m)], greedy
            )
            act = actor(np.column_stack([s, eye[fam]]))[:, 0]
            noisy = np.clip(act + sigma * rng.normal(size=m), 0.0, 1.0)
            act = np.where(rng.random(m) < epsilon, rng.random(m), noisy)
            for e in range(m):
                f, a = int(fam[e]), float(act[e])
                j = space.option(i, f, a)
                choice[e, i] = j
                steps[e].append((s[e], f, a))
                counts[e, f] += 1
                strength[e] += space.strengths[i][j]
        return [(tuple(int(c) for c in choice[e]), steps[e]) for e in range(m)]

    def train(steps: int) -> None:
        size = replay.size
        rewards = {p: _reward(ctx, p, violation_weight, flat_penalty) for p in set(plans)}
        f_all, nf_all, k_all, ep_all = replay.ints[:size].T
        reward = np.array([rewards[plans[e]] for e in ep_all])
        last = k_all == n - 1
        ret = reward * gamma ** (n - 1 - k_all)
        next_valid = space.valid[np.minimum(k_all + 1, n - 1)]
        for _ in range(steps):
            idx = rng.integers(size, size=min(minibatch, size))
            rows = np.arange(len(idx))
            s, ns, a = replay.s[idx], replay.ns[idx], replay.a[idx, None]
            f, nfam, r, g, d = f_all[idx], nf_all[idx], reward[idx], ret[idx], last[idx]
            # Family agent: double-DQN bootstrap, mixed with the Monte Carlo return.
            best_next = np.argmax(np.where(next_valid[idx], q_net(ns), -np.inf), axis=1)
            boot = q_target(ns)[rows, best_next]
            y = np.where(d, r, (1 - mc) * gamma * boot + mc * g)
            q, acts = q_net.forward(s)
            grad = np.zeros_like(q)
            grad[rows, f] = np.clip(q[rows, f] - y, -1.0, 1.0) / len(idx)
            q_net.step(q_net.backward(acts, grad)[0], lr)
            # Strength agent: the critic likewise, the actor up the critic's gradient.
            na = actor_target(np.column_stack([ns, eye[nfam]]))
            nxt = critic_target(np.column_stack([ns, eye[nfam], na]))[:, 0]
            yc = np.where(d, r, (1 - mc) * gamma * nxt + mc * g)
            qc, acts = critic.forward(np.column_stack([s, eye[f], a]))
            grad = np.clip(qc - yc[:, None], -1.0, 1.0) / len(idx)
            critic.step(critic.backward(acts, grad)[0], lr)
            pick = space.choose[k_all[idx], f]
            if pick.any():
                xa = np.column_stack([s[pick], eye[f[pick]]])
                mu, acts_a = actor.forward(xa)
                _, acts_c = critic.forward(np.column_stack([xa, mu]))
                _, gx = critic.backward(acts_c, -np.ones((len(mu), 1)) / len(mu))
                actor.step(actor.backward(acts_a, gx[:, -1:])[0], lr)
            for target, net in ((q_target, q_net), (actor_target, actor), (critic_target, critic)):
                target.follow(net, tau)

    done_episodes = stale = 0
    while done_episodes < episodes and not ctx.exhausted:
        ctx.phase = f"episode {done_episodes + 1}"
        progress = min(ctx.evaluations / explore, 1.0)
        m = min(batch, episodes - done_episodes)
        # Batches that find nothing new raise exploration again, so an agent that has
        # settled spends the rest of the budget around its answer instead of idling.
        boredom = min(0.1 * stale, 0.5)
        epsilon = np.full(m, min(1.0 - 0.9 * progress + boredom, 1.0))
        sigma = np.full(m, 0.3 - 0.2 * progress + 0.2 * boredom)
        if plans:  # the first episode exploits: the agents' current answer
            epsilon[0] = sigma[0] = 0.0
        episodes_run = rollout(epsilon, sigma)
        batch_plans = [plan for plan, _ in episodes_run]
        batch_steps = [steps for _, steps in episodes_run]
        done_episodes += m
        before = ctx.evaluations
        results = ctx.evaluate(batch_plans)
        stale = stale + 1 if ctx.evaluations == before else 0
        for plan, steps, ev in zip(batch_plans, batch_steps, results, strict=True):
            if ev is None:  # the budget ran out first
                continue
            plans.append(plan)
            for k, (s, f, a) in enumerate(steps):
                ns, nfam, _ = steps[min(k + 1, n - 1)]
                replay.add(s, f, a, ns, nfam, k, len(plans) - 1)
        if replay.size and ctx.evaluations > before:
            train(updates * (ctx.evaluations - before))
        if stale >= 50:
            logger.debug("rl: no new plans for 50 batches; stopping")
            break
