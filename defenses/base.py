"""The Defense contract: what the pipeline, the metrics and the attack adapters rely on.

A defense is a small class that supplies only what differs between defenses; the pipeline
(:mod:`bench.pipeline`, with the training loop of :mod:`bench.training`) owns every loop
(epochs, batches, noise draws, progress, checkpoints).

Lifecycle, as the pipeline drives it::

    defense = create_defense("pixeldp", epsilon=1.0, ...)   # keyword-only hyper-parameters
    defense.setup(model, input_shape=(1, 28, 28), num_classes=10)  # builds defense.model_
    for each step:                                           # the training loop
        loss = defense.training_loss(x, y, progress)
        loss.backward(); optimizer.step(); defense.after_step(progress)
    defense.predict(x)  /  defense.certify(x, norm="l2")     # the evaluation stages

Conventions shared by every method:

* inputs ``x`` are float tensors of shape ``(N, C, H, W)`` with pixels in ``[0, 1]`` and no
  normalisation applied (a model may normalise inside itself, after any noise layer);
* labels are ``int64`` tensors of shape ``(N,)``; ``-1`` means *abstain* and counts as wrong;
* radii are ``float64`` tensors of shape ``(N,)`` in input (pixel) units for the named norm,
  ``0`` when nothing is certified;
* ``seed`` plus the global example ``indices`` fix every noise draw, so results do not depend
  on batch size or on how the test set is sharded.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bench.threat import NORMS

ABSTAIN = -1
DEFAULT_PREDICT_DRAWS = 1000
"""Draws per example of the default :meth:`Defense.predict` of a randomized defense whose
:meth:`Defense.record` declares no ``n_draws``."""
DEFAULT_PREDICT_ALPHA = 0.001
"""Level of the default predict's abstention test when :meth:`Defense.record` declares no
``alpha`` (Cohen et al.'s value)."""


@dataclass(frozen=True)
class TrainProgress:
    """Position of the training loop: global ``step`` of ``total_steps``, ``epoch``.

    ``fraction`` is ``step / total_steps`` in [0, 1] (used by ramp-up schedules).
    """

    step: int
    total_steps: int
    epoch: int
    epochs: int

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total_steps)


@dataclass
class Certificate:
    """Per-example certified predictions.

    Attributes:
        labels: ``(N,)`` int64, the (smoothed / noisy-expectation) prediction, ``-1`` = abstain.
        radii: norm name (``"l1"``, ``"l2"``, ``"linf"``) -> ``(N,)`` float64 certified radius
            in input units; the prediction provably does not change for any perturbation of
            smaller norm (with probability ``>= 1 - alpha`` for Monte Carlo certificates).
            ``0`` where nothing is certified or the prediction abstains.
        bound: short label of the bound that produced ``radii`` (e.g. ``"pixeldp-argmax"``,
            ``"cohen-gaussian"``, ``"wong-kolter-dual"``).
        extra: further labelled per-example tensors (e.g. alternative bounds, counts).
    """

    labels: Tensor
    radii: dict[str, Tensor]
    bound: str = ""
    extra: dict[str, Tensor] = field(default_factory=dict)

    def radius(self, norm: str) -> Tensor:
        """Certified radius for ``norm``; zeros if this certificate says nothing about it."""
        if norm in self.radii:
            return self.radii[norm]
        return torch.zeros(self.labels.shape, dtype=torch.float64)


@dataclass(frozen=True)
class Citation:
    """The paper a defense comes from (shown on the leaderboard site with a BibTeX entry).

    A defense class declares it as ``citation = Citation(...)``; plugins can too.
    ``bibtex`` is generated from the fields unless given.
    """

    title: str
    authors: tuple[str, ...]
    venue: str
    year: int
    url: str = ""
    key: str = ""
    entry: str = ""

    @property
    def bibtex(self) -> str:
        """An ``@inproceedings`` BibTeX entry (``entry`` itself when one was given)."""
        if self.entry:
            return self.entry
        first = self.authors[0].split()[-1].lower() if self.authors else "anon"
        key = self.key or f"{first}{self.year}"
        fields = [
            ("title", "{" + self.title + "}"),
            ("author", " and ".join(self.authors)),
            ("booktitle", self.venue),
            ("year", str(self.year)),
        ]
        if self.url:
            fields.append(("url", self.url))
        body = ",\n".join(f"  {k} = {{{v}}}" for k, v in fields)
        return f"@inproceedings{{{key},\n{body}\n}}"


@dataclass(frozen=True)
class DefenseRecord:
    """What a defense declares for the board row of its results (never guessed by the
    harness from parameter names).

    Attributes:
        n_draws: noise draws behind each prediction / certificate of a randomized defense
            (Cohen's ``n``, PixelDP's draws); ``None`` for deterministic defenses.
        alpha: failure probability of each Monte Carlo certificate or level of its test
            (Cohen's ``alpha``, PixelDP's ``eta``); ``None`` when nothing is estimated.
        bound: name of the bound behind the certified radii (``"cohen-gaussian"``,
            ``"pixeldp-argmax"``, ``"wong-kolter-dual"``); ``None`` when nothing is certified.
        method: how the Monte Carlo draws are spent: ``"fixed-n"`` (``n_draws`` per example)
            or ``"sequential-<confidence sequence>"`` (rounds, at most ``n_draws`` per
            example; the certificate's ``extra["draws"]`` says how many each took);
            ``None`` when nothing is sampled (the pipeline records a randomized defense
            that declares none as ``"fixed-n"``).
    """

    n_draws: int | None = None
    alpha: float | None = None
    bound: str | None = None
    method: str | None = None


class Defense:
    """Base class of every defense. Subclass it, declare capabilities, override what differs.

    Class attributes (capabilities):
        name: unique kebab-case registry name (set by ``@register_defense``).
        randomized: noise at prediction time; attacks then average gradients over draws and
            predictions use Monte Carlo estimates.
        certifies: norms for which :meth:`certify` returns a non-trivial radius.
        norms: threat-model norms the defense is designed for (training-time).
        param_help: one line per hyper-parameter, shown by ``certbench defenses show``.
        check_params: small-sample hyper-parameters used by the contract checks.

    ``__init__`` must take keyword-only hyper-parameters with defaults and store each
    unchanged under the same attribute name (scikit-learn's convention), so that
    :meth:`get_params` can read them back; they become the run record.
    """

    name: ClassVar[str] = ""
    randomized: ClassVar[bool] = False
    certifies: ClassVar[tuple[str, ...]] = ()
    norms: ClassVar[tuple[str, ...]] = NORMS
    param_help: ClassVar[dict[str, str]] = {}
    #: Hyper-parameters that keep :func:`bench.testing.check_defense` fast (e.g. few draws).
    check_params: ClassVar[dict[str, Any]] = {}
    #: The paper the defense comes from (:class:`Citation`), shown on the leaderboard site.
    citation: ClassVar[Citation | None] = None

    model_: nn.Module
    input_shape_: tuple[int, ...]
    num_classes_: int

    # ------------------------------------------------------------------ parameters
    @classmethod
    def param_names(cls) -> list[str]:
        """Names of the keyword-only hyper-parameters of ``__init__``."""
        sig = inspect.signature(cls.__init__)
        return [
            p.name
            for p in sig.parameters.values()
            if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]

    @classmethod
    def param_defaults(cls) -> dict[str, Any]:
        """Hyper-parameter defaults as declared in ``__init__``."""
        sig = inspect.signature(cls.__init__)
        return {
            n: sig.parameters[n].default
            for n in cls.param_names()
            if sig.parameters[n].default is not inspect.Parameter.empty
        }

    def get_params(self) -> dict[str, Any]:
        """The hyper-parameters, exactly as passed to ``__init__``."""
        return {n: getattr(self, n) for n in self.param_names()}

    def record(self) -> DefenseRecord:
        """What the board row needs from this defense (draws, confidence, bound name).

        Override in a randomized or certifying defense; the default declares nothing.
        """
        return DefenseRecord()

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.get_params().items())
        return f"{type(self).__name__}({args})"

    # ------------------------------------------------------------------ building
    def build(self, model: nn.Module) -> nn.Module:
        """Return the network this defense trains and evaluates (default: ``model`` itself).

        Randomized defenses insert :class:`bench.noise.NoiseLayer` modules here.
        ``self.input_shape_`` and ``self.num_classes_`` are already set.
        """
        return model

    def setup(self, model: nn.Module, *, input_shape: tuple[int, ...], num_classes: int) -> Defense:
        """Attach the defense to ``model`` (inputs of ``input_shape`` = (C, H, W), in [0, 1])."""
        self.input_shape_ = tuple(int(s) for s in input_shape)
        self.num_classes_ = int(num_classes)
        self.model_ = self.build(model)
        return self

    @property
    def device(self) -> torch.device:
        for t in self.model_.parameters():
            return t.device
        for t in self.model_.buffers():
            return t.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ training hooks
    def training_loss(self, x: Tensor, y: Tensor, progress: TrainProgress) -> Tensor:
        """Scalar loss for one batch (default: cross-entropy of one forward pass)."""
        return F.cross_entropy(self.model_(x), y)

    def after_step(self, progress: TrainProgress) -> None:
        """Called after every optimiser step (e.g. to project weights)."""

    def train_defaults(self) -> dict[str, Any]:
        """Optimiser/epoch defaults this defense suggests; the spec overrides them."""
        return {}

    # ------------------------------------------------------------------ prediction
    def logits(self, x: Tensor) -> Tensor:
        """One differentiable forward pass, ``(N, K)`` logits (noisy if randomized)."""
        return self.model_(x)

    @torch.no_grad()
    def predict(
        self,
        x: Tensor,
        *,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
    ) -> Tensor:
        """Predicted labels ``(N,)`` int64 for ``x`` ``(N, C, H, W)`` in [0, 1], ``-1`` = abstain.

        Default, deterministic defense: the argmax of one forward pass. Default, randomized
        defense: a Monte Carlo majority vote, Cohen et al.'s PREDICT on this defense's own
        network (:func:`bench.sampling.cohen.predict_from_counts`): ``record().n_draws``
        draws per example (:data:`DEFAULT_PREDICT_DRAWS` if ``None``) through the sampling
        engine, which supplies the noise of every :class:`bench.noise.NoiseLayer` of
        ``model_``, seeded by ``seed`` and the global ``indices`` (so the result does not
        depend on batch size or sharding); abstain where the binomial test of the top two
        counts has p-value ``> record().alpha`` (:data:`DEFAULT_PREDICT_ALPHA` if ``None``).
        The returned label differs from the majority class of the noisy network with
        probability ``<= alpha``. ``batch_size``: rows per forward pass (no effect on results).
        """
        self.model_.eval()
        if not self.randomized:
            return self.logits(x).argmax(dim=1)
        from bench.errors import ConfigError
        from bench.sampling import PREDICTION, NotRandomizedError, sample
        from bench.sampling.cohen import predict_from_counts

        rec = self.record()
        n = DEFAULT_PREDICT_DRAWS if rec.n_draws is None else rec.n_draws
        alpha = DEFAULT_PREDICT_ALPHA if rec.alpha is None else rec.alpha
        try:
            samples = sample(
                self.model_,
                x,
                n,
                num_classes=self.num_classes_,
                seed=seed,
                stream=PREDICTION,
                indices=indices,
                batch_size=batch_size,
            )
        except NotRandomizedError:
            raise ConfigError(
                f"defense {self.name or type(self).__name__!r} is randomized but no "
                "bench.noise.NoiseLayer runs in its network: add its noise as a NoiseLayer in "
                "build() (register a new distribution with bench.noise.register_noise), or "
                "override predict()"
            ) from None
        return predict_from_counts(samples.counts, alpha).to(x.device)

    def certify(
        self,
        x: Tensor,
        *,
        norm: str,
        seed: int = 0,
        indices: Tensor | None = None,
        batch_size: int | None = None,
        radii: Sequence[float] | None = None,
        labels: Tensor | None = None,
    ) -> Certificate:
        """Certified predictions for ``norm``. Non-certifying defenses return radius 0.

        ``radii`` (sorted, input units of ``norm``) are the radii the caller will score, e.g.
        a board's grid. A defense whose certificate is a yes/no test per radius (a dual
        bound at a fixed ε, a sequential Monte Carlo test) may use them and return, per
        example, the largest radius of ``radii`` it certifies (0 if none); otherwise it
        ignores them and returns its own radius. Either way ``radius >= r`` must imply a
        certificate at ``r``.

        ``labels``: optional ``(N,)`` int64 true labels. A defense may test them directly
        (e.g. sequential randomized smoothing, which then needs no selection draws); the
        returned labels are then the true label where it is certified at radius ``>= 0`` and
        ``-1`` (abstain) elsewhere: the smoothed prediction is ``y`` with probability
        ``>= 1 - alpha`` wherever it is certified, and a wrong prediction is never reported as
        certified. Other defenses ignore them. Callers pass them only where wrong
        certified predictions need not be seen (never when re-scoring attacked inputs).
        A certificate may report the Monte Carlo draws it spent per example as
        ``extra["draws"]`` (``(N,)`` int64).
        """
        labels = self.predict(x, seed=seed, indices=indices, batch_size=batch_size)
        zeros = torch.zeros(labels.shape, dtype=torch.float64)
        return Certificate(labels=labels, radii={norm: zeros}, bound="none")

    def shared_certificate_norms(self) -> tuple[str, ...]:
        """Norms of :attr:`certifies` whose radii one :meth:`certify` call reports together.

        A promise about :meth:`certify`: for the same ``x``, ``seed`` and ``indices`` it
        returns the same labels and the same ``radii[n]`` for every ``n`` listed here,
        whatever ``norm``, ``radii`` and ``labels`` it is given (``extra`` may differ; the
        runner reads only ``extra["draws"]``, which must not), e.g. PixelDP with a fixed
        number of draws, whose certificate is one size converted to each norm. Cells of
        these norms that share a trained defense are then certified once on their clean
        test examples, and each reads its own norm (:func:`bench.pipeline.evaluate_shards`;
        half the draws for an ℓ2 and an ℓ∞ cell). Default ``()``: every norm is certified
        by its own call (needed where the certificate depends on the norm or on the radii
        asked for, e.g. a bound at a fixed ε or a sequential test of a radius grid).
        """
        return ()

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Tensor]:
        """Tensors to checkpoint (default: the defended network's state dict)."""
        return self.model_.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Inverse of :meth:`state_dict`; raises on missing or unexpected keys."""
        self.model_.load_state_dict(state, strict=True)
