"""The one interface every recommender in :mod:`cm3_pyg.models` implements.

A model is built from plain numbers and run on :class:`GraphInputs`, a bundle of tensors
(features and pre-normalised adjacencies); models never see a dataset. Its training loss is
split into the parts a user may want to swap or inspect (:class:`LossTerms`):

* the **ranking objective** on the scores of ``(user, positive)`` and ``(user, negative)``
  (:attr:`Recommender.objective`, BPR by default, chosen by the ``objective`` config key);
* the model's own **auxiliary losses** (already weighted), e.g. FREEDOM's modality BPR
  terms or SEA's CLUB bound and Solosimloss;
* its **regulariser** (already weighted).

A model whose method *is* its objective (CM3's alignment + calibrated uniformity, BM3's
bootstrap loss) sets :attr:`Recommender.objectives` to ``()`` and overrides
:meth:`Recommender.loss_terms`; asking it for another objective is a clear error.

Sub-networks fitted by their own optimiser (SEA's CLUB network) are declared as
:class:`InnerProblem` s: their parameters belong to the module tree (so ``.to()``,
``state_dict()`` and checkpoints see them) but not to the outer optimiser, and the trainer
runs their inner steps and checkpoints their optimisers.
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import yaml
from torch import Tensor

from cm3_pyg.checks import Range, check_choice, check_ids, type_noun
from cm3_pyg.errors import ConfigError
from cm3_pyg.nn.objectives import make_objective, objective_names
from cm3_pyg.nn.rows import RowTable
from cm3_pyg.nn.sparse import SparseAdjacency


@dataclass
class GraphInputs:
    """Everything a model's forward pass reads, as tensors.

    Attributes:
        num_users: ``U``.
        num_items: ``I``.
        features: per modality ``[I, d_m]`` float tensors, in fusion order (in a trainer on
            several processes, for a model with ``row_local_features``: each process's rows
            only, as :class:`~cm3_pyg.nn.parallel.RowShard`).
        modalities: names of ``features``.
        ui_adj: normalised ``[U + I, U + I]`` user-item adjacency (users first).
        item_adj: normalised ``[I, I]`` item-item graph (``out = item_adj @ h``), or ``None``.
    """

    num_users: int
    num_items: int
    features: list[Tensor]
    modalities: list[str]
    ui_adj: SparseAdjacency
    item_adj: SparseAdjacency | None = None

    @property
    def feature_dims(self) -> list[int]:
        return [int(f.size(1)) for f in self.features]

    def to(self, device: torch.device | str) -> GraphInputs:
        """A copy with every tensor on ``device``."""
        return GraphInputs(
            num_users=self.num_users,
            num_items=self.num_items,
            features=[f.to(device) for f in self.features],
            modalities=list(self.modalities),
            ui_adj=self.ui_adj.to(device),
            item_adj=None if self.item_adj is None else self.item_adj.to(device),
        )


class Batch(NamedTuple):
    """One training batch: ``[B]`` users, their positive items and sampled negatives."""

    users: Tensor
    pos_items: Tensor
    neg_items: Tensor


class BatchRows(NamedTuple):
    """What a pairwise model's training forward gives for one batch.

    Attributes:
        user: ``[B, D]`` scoring rows of the batch's users.
        pos: ``[B, D]`` rows of their positive items.
        neg: ``[B, D]`` rows of the negatives.
        out: whatever else the model's auxiliary losses and regulariser read (e.g. the full
            propagated tables); ``None`` if nothing.
    """

    user: Tensor
    pos: Tensor
    neg: Tensor
    out: Any = None

    @classmethod
    def gather(cls, user_emb: Tensor, item_emb: Tensor, batch: Batch, out: Any = None) -> BatchRows:
        """The batch's rows of full ``[U, D]`` / ``[I, D]`` scoring tables."""
        return cls(
            user_emb.index_select(0, batch.users),
            item_emb.index_select(0, batch.pos_items),
            gather_rows(item_emb, batch.neg_items),
            out,
        )


@dataclass
class LossTerms:
    """The parts of one batch's training loss.

    Attributes:
        ranking: the ranking objective's value (for a pairwise model: the objective on
            ``score(u, i)`` and ``score(u, j)``, times the model's ``ranking_weight``).
        auxiliary: the model's own further losses, each already weighted, in summation
            order.
        regularization: the weighted regulariser (``0`` if the model has none).
        inner_inputs: for each :class:`InnerProblem` (by name) the detached data its inner
            steps fit on (read by the trainer after this batch's loss).
    """

    ranking: Tensor
    auxiliary: dict[str, Tensor] = field(default_factory=dict)
    regularization: Tensor | float = 0.0
    inner_inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total(self) -> Tensor:
        """``ranking + auxiliary terms (in order) + regularization``."""
        total = self.ranking
        for term in self.auxiliary.values():
            total = total + term
        if isinstance(self.regularization, float) and self.regularization == 0.0:
            return total
        return total + self.regularization

    def as_floats(self) -> dict[str, float]:
        """Every term as a Python float (for logging)."""
        out = {"ranking": float(self.ranking.detach())}
        out.update({k: float(v.detach()) for k, v in self.auxiliary.items()})
        reg = self.regularization
        out["regularization"] = float(reg.detach()) if isinstance(reg, Tensor) else float(reg)
        return out


@dataclass(frozen=True)
class InnerProblem:
    """A sub-network fitted by its own optimiser, ``steps`` Adam steps after every batch.

    Attributes:
        name: key of its data in :attr:`LossTerms.inner_inputs` and of its optimiser state
            in checkpoints.
        module: the sub-network (a registered submodule of the model).
        steps: inner steps per training batch (``0``: never fitted).
        lr: the inner Adam's learning rate; ``None`` takes the run's ``learning_rate``.
    """

    name: str
    module: torch.nn.Module
    steps: int
    lr: float | None = None


#: Constructor argument name -> config key, where the config uses MMRec's name. Every other
#: constructor argument is its own config key.
CONFIG_KEYS: dict[str, str] = {
    "embedding_dim": "embedding_size",
    "num_layers": "n_layers",
    "num_ui_layers": "n_ui_layers",
    "num_mm_layers": "n_mm_layers",
    "temperature": "temp",
}
#: Config key -> option of :func:`~cm3_pyg.nn.objectives.make_objective`.
OBJECTIVE_KEYS: dict[str, str] = {
    "loss_reduction": "reduction",
    "flip_dim": "flip_dim",
    "flip_weight_decay": "flip_weight_decay",
}
#: Constructor arguments filled from the data (:class:`GraphInputs`), not from the config.
SIZE_ARGUMENTS: tuple[str, ...] = ("num_users", "num_items", "feature_dims")

_REGISTRY: dict[str, type[Recommender]] = {}


class Recommender(torch.nn.Module):
    """Base class: separated training-loss terms, deterministic embeddings, top-k lists.

    A subclass sets :attr:`name`, declares its hyper-parameters as keyword arguments of
    ``__init__`` with their defaults (the one source of the model's defaults; config keys
    per :data:`CONFIG_KEYS`), and implements :meth:`compute_embeddings` and either
    :meth:`batch_rows` (pairwise models: the objective is swappable) or
    :meth:`loss_terms` (models whose method is their objective). Defining the subclass
    registers it by name; the YAML beside its module holds training overrides and the
    ``grid`` of its search space.
    """

    name: ClassVar[str] = ""
    #: Feature modalities the model needs (``0`` for ID-only models).
    min_modalities: ClassVar[int] = 0
    #: Whether the model reads ``GraphInputs.item_adj`` (the modality kNN graph).
    uses_item_graph: ClassVar[bool] = False
    #: Whether the model reads ``GraphInputs.features`` only row-wise through
    #: :func:`~cm3_pyg.nn.feature_linear`, so that a trainer on several processes keeps only
    #: each process's block of their rows (:class:`~cm3_pyg.nn.parallel.RowShard`).
    row_local_features: ClassVar[bool] = False
    #: Ranking objectives the model accepts (the first is its default); ``()`` for a model
    #: whose method is its own objective.
    objectives: ClassVar[tuple[str, ...]] = ("bpr", "bpo", "nbpo", "nbpo_original")
    #: For a model with ``objectives = ()``: what its objective is (for error messages).
    own_objective: ClassVar[str] = ""
    #: Factor on the ranking objective (SEA's reference uses BPR in log base 2).
    ranking_weight: ClassVar[float] = 1.0
    #: The model's own tensors with one row per user or item (name -> (kind, axis));
    #: submodules add theirs through a ``row_tables()`` method (see :meth:`row_tables`).
    id_rows: ClassVar[dict[str, tuple[str, int]]] = {
        "user_embedding": ("user", 0),
        "item_embedding": ("item", 0),
    }
    #: The allowed values of the numeric hyper-parameters, by constructor argument. A
    #: subclass lists its own; they are merged with its bases' (the subclass wins), and every
    #: int or float hyper-parameter must have one (tested for every registered model).
    hyperparameter_ranges: ClassVar[dict[str, Range]] = {
        "embedding_dim": Range(1),
        "num_layers": Range(0),
        "num_ui_layers": Range(0),
        "num_mm_layers": Range(0),
        "reg_weight": Range(0),
    }
    #: The allowed values of the string hyper-parameters, by constructor argument (merged
    #: over the class tree like :attr:`hyperparameter_ranges`; every ``str`` one must have
    #: one, tested for every registered model).
    hyperparameter_choices: ClassVar[dict[str, tuple[str, ...]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            key = cls.name.lower()
            known = _REGISTRY.get(key)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise TypeError(
                    f"model name {cls.name!r} of {cls.__module__}.{cls.__qualname__} is "
                    f"taken by {known.__module__}.{known.__qualname__}"
                )
            _REGISTRY[key] = cls
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self) -> None:
        super().__init__()
        self.objective: torch.nn.Module | None = None
        if self.objectives:
            self.objective = make_objective(self.objectives[0])
        self._cached_embeddings: tuple[Tensor, Tensor] | None = None
        self._cache_version: int | None = None

    # ------------------------------------------------------------------ configuration
    @classmethod
    def hyperparameters(cls) -> dict[str, Any]:
        """``{config key: default}`` of the constructor's hyper-parameters."""
        out = {}
        for param in _init_parameters(cls):
            out[CONFIG_KEYS.get(param.name, param.name)] = param.default
        return out

    @classmethod
    def ranges(cls) -> dict[str, Range]:
        """:attr:`hyperparameter_ranges` merged over the class hierarchy."""
        merged: dict[str, Range] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("hyperparameter_ranges", {}))
        return merged

    @classmethod
    def choices(cls) -> dict[str, tuple[str, ...]]:
        """:attr:`hyperparameter_choices` merged over the class hierarchy."""
        merged: dict[str, tuple[str, ...]] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("hyperparameter_choices", {}))
        return merged

    @classmethod
    def check_hyperparameters(cls, values: Mapping[str, Any], as_config: bool = False) -> None:
        """Check hyper-parameter values (by constructor argument) against :meth:`ranges`,
        their annotation's int/float type, :meth:`choices` and :meth:`check_relations`.

        Args:
            values: constructor argument -> value; arguments absent are not checked.
            as_config: name them by config key (``config key 'n_ui_layers'``) rather than
                as ``CM3: num_ui_layers``.

        Raises:
            TypeError: an int hyper-parameter given a non-integer (constructor only; config
                values are type-checked when read).
            ValueError: a value out of its range or not among its choices, or a cross-key
                constraint broken.
        """
        ranges, choices = cls.ranges(), cls.choices()

        def label(argument: str) -> str:
            if as_config:
                return f"config key {CONFIG_KEYS.get(argument, argument)!r}"
            return f"{cls.__name__}: {argument}"

        for param in _init_parameters(cls):
            value = values.get(param.name)
            if value is None:
                continue
            if param.name in choices:
                check_choice(value, label(param.name), choices[param.name])
            if param.name in ranges:
                integer = _annotation_types(param)[0] == ["int"]
                ranges[param.name].check(value, label(param.name), integer=integer)
        cls.check_relations(values, label)

    @classmethod
    def check_relations(cls, values: Mapping[str, Any], label: Callable[[str], str]) -> None:
        """Constraints between hyper-parameters (none by default); ``label(argument)`` names
        an argument in the message."""

    @classmethod
    def check_config(cls, config: Mapping[str, Any]) -> None:
        """Check ``config``'s hyper-parameter keys before any data is read.

        Raises:
            ConfigError: naming the config key and its allowed range.
        """
        values = {}
        try:
            for param in _init_parameters(cls):
                key = CONFIG_KEYS.get(param.name, param.name)
                if key in config:
                    values[param.name] = _coerce(config[key], param, key)
            cls.check_hyperparameters(values, as_config=True)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model {cls.name!r}: {exc}") from None

    @classmethod
    def _yaml(cls) -> dict[str, Any]:
        path = Path(sys.modules[cls.__module__].__file__ or "").with_suffix(".yaml")
        return _read_model_yaml(str(path))

    @classmethod
    def default_config(cls) -> dict[str, Any]:
        """The model's defaults: its hyper-parameters, then its YAML's training overrides."""
        config = cls.hyperparameters()
        config.update({k: v for k, v in cls._yaml().items() if k != "grid"})
        return config

    @classmethod
    def default_grid(cls) -> dict[str, list[Any]]:
        """The hyper-parameter search space listed under ``grid`` in the model's YAML."""
        return {k: list(v) for k, v in dict(cls._yaml().get("grid") or {}).items()}

    @classmethod
    def check_feature_dims(cls, feature_dims: Sequence[int]) -> list[int]:
        """``feature_dims`` as ints, at least :attr:`min_modalities` of them."""
        if len(feature_dims) < cls.min_modalities:
            count = {1: "one item modality", 2: "two item modalities"}.get(
                cls.min_modalities, f"{cls.min_modalities} item modalities"
            )
            raise ValueError(
                f"{cls.__name__} needs at least {count}, got feature_dims={list(feature_dims)}"
            )
        return [int(d) for d in feature_dims]

    @classmethod
    def from_config(cls, config: Mapping[str, Any], inputs: GraphInputs) -> Recommender:
        """The model sized by ``inputs``, its hyper-parameters read from ``config``.

        Every constructor argument takes ``config[key]`` (key per :data:`CONFIG_KEYS`) or,
        when the key is absent, its default; values are checked against the argument's
        annotation. ``config["objective"]`` (if present and not null) selects the ranking
        objective.

        Raises:
            ValueError: a value of the wrong type, an objective the model does not accept,
                or too few modalities (the message names the config key).
        """
        sizes = {
            "num_users": inputs.num_users,
            "num_items": inputs.num_items,
            "feature_dims": inputs.feature_dims,
        }
        kwargs: dict[str, Any] = {}
        signature = inspect.signature(cls.__init__)
        for name in SIZE_ARGUMENTS:
            if name in signature.parameters:
                kwargs[name] = sizes[name]
        for param in _init_parameters(cls):
            key = CONFIG_KEYS.get(param.name, param.name)
            if key in config:
                kwargs[param.name] = _coerce(config[key], param, key)
        objective = config.get("objective")
        cls.check_objective(objective)
        cls.check_protocol(config)
        model = cls(**kwargs)
        if cls.objectives:
            options = {
                "num_users": inputs.num_users,
                "num_items": inputs.num_items,
                **{opt: config[key] for key, opt in OBJECTIVE_KEYS.items() if key in config},
            }
            model.set_objective(objective or cls.objectives[0], **options)
        return model

    @classmethod
    def check_protocol(cls, config: Mapping[str, Any]) -> None:
        """Raise ``ValueError`` for training options a model with its own objective ignores
        (several negatives per positive, a summed objective)."""
        if cls.objectives:
            return
        if config.get("num_negatives", 1) != 1:
            raise ValueError(
                f"model {cls.name!r} trains with its own objective ({cls.own_objective}) on "
                f"one negative per positive; got num_negatives={config['num_negatives']}"
            )
        if config.get("loss_reduction", "mean") != "mean":
            raise ValueError(
                f"model {cls.name!r} trains with its own objective ({cls.own_objective}); "
                f"loss_reduction={config['loss_reduction']!r} does not apply (leave 'mean')"
            )

    @classmethod
    def check_objective(cls, objective: str | None) -> None:
        """Raise ``ValueError`` unless ``objective`` (``None``: the default) applies."""
        if objective is None:
            return
        if not cls.objectives:
            raise ValueError(
                f"model {cls.name!r} trains with its own objective ({cls.own_objective}); "
                f"objective {objective!r} does not apply (leave 'objective' null)"
            )
        if objective not in cls.objectives:
            raise ValueError(
                f"model {cls.name!r} accepts the objectives {list(cls.objectives)}, got "
                f"{objective!r} (known objectives: {objective_names()})"
            )

    def set_objective(self, objective: str | torch.nn.Module, **options: Any) -> None:
        """Train with another ranking objective: a name (built by
        :func:`~cm3_pyg.nn.objectives.make_objective` with ``options``), or any module mapping
        ``(pos_scores, neg_scores, batch)`` to a scalar loss."""
        if isinstance(objective, str):
            self.check_objective(objective)
            objective = make_objective(objective, **options)
        elif not self.objectives:
            self.check_objective(type(objective).__name__)
        self.objective = objective

    # ------------------------------------------------------------------ training
    def on_epoch_start(self, epoch: int, inputs: GraphInputs) -> None:
        """Called by the trainer before the first batch of every epoch (``epoch`` is 1-based).

        The default does nothing; models with per-epoch state override it (FREEDOM redraws
        its pruned graph, LIRDRec advances its progressive weight copying). After a resume
        the trainer calls it for the next epoch exactly as an uninterrupted run would.
        """

    def item_graph(self, inputs: GraphInputs) -> SparseAdjacency | None:
        """``inputs.item_adj``; an error if a model that reads it was given none."""
        reads_it = self.uses_item_graph and getattr(self, "num_mm_layers", 1) > 0
        if inputs.item_adj is None and reads_it:
            raise ValueError(
                f"{type(self).__name__} reads the modality item graph: build the inputs "
                "with build_graph_inputs(..., uses_item_graph=True)"
            )
        return inputs.item_adj

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        """A pairwise model's training forward: the batch's scoring rows (and more)."""
        raise NotImplementedError(f"{type(self).__name__} defines no batch_rows")

    @staticmethod
    def score(user: Tensor, item: Tensor) -> Tensor:
        """Scores of matching rows, ``(user * item).sum(-1)``: ``[B]`` for ``item`` ``[B, D]``,
        ``[B, K]`` for ``K`` items per user (``item`` ``[B, K, D]``)."""
        if item.dim() == user.dim() + 1:
            user = user.unsqueeze(-2)
        return (user * item).sum(-1)

    def auxiliary_losses(self, inputs: GraphInputs, batch: Batch, rows: BatchRows) -> dict:
        """The model's own further losses of the batch, each weighted (default: none)."""
        return {}

    def regularization(self, batch: Batch, rows: BatchRows) -> Tensor | float:
        """The weighted regulariser of the batch (default: none)."""
        return 0.0

    def loss_terms(self, inputs: GraphInputs, batch: Batch) -> LossTerms:
        """The batch's loss, term by term (pairwise models: objective on the scores)."""
        rows = self.batch_rows(inputs, batch)
        assert self.objective is not None
        ranking = self.objective(
            self.score(rows.user, rows.pos), self.score(rows.user, rows.neg), batch
        )
        if self.ranking_weight != 1.0:
            ranking = ranking * self.ranking_weight
        return LossTerms(
            ranking=ranking,
            auxiliary=self.auxiliary_losses(inputs, batch, rows),
            regularization=self.regularization(batch, rows),
        )

    def training_loss(
        self, inputs: GraphInputs, users: Tensor, pos_items: Tensor, neg_items: Tensor
    ) -> Tensor:
        """The total loss of one batch of ``(user, positive item, negative item)`` rows."""
        return self.loss_terms(inputs, Batch(users, pos_items, neg_items)).total

    def inner_problems(self) -> list[InnerProblem]:
        """Sub-networks with their own optimiser (default: none)."""
        return []

    def inner_loss(self, name: str, data: Any) -> Tensor:
        """The loss the inner problem ``name`` minimises on ``data`` (its inner inputs)."""
        raise NotImplementedError(f"{type(self).__name__} has no inner problem {name!r}")

    def outer_parameters(self) -> list[torch.nn.Parameter]:
        """The parameters the outer optimiser trains: all but the inner problems'."""
        inner = {id(p) for problem in self.inner_problems() for p in problem.module.parameters()}
        return [p for p in self.parameters() if id(p) not in inner]

    # ------------------------------------------------------------------ rows by id
    def row_tables(self) -> list[RowTable]:
        """Every parameter and buffer indexed by user or item id (:class:`RowTable`).

        The model's :attr:`id_rows` plus the tables its submodules declare (fine-tuned
        feature copies, NBPO's flip factors). Unlearning resets exactly these rows; a test
        checks that no other tensor of any registered model has a user- or item-sized axis.
        """
        tables = [RowTable(name, kind, axis) for name, (kind, axis) in self.id_rows.items()]
        for prefix, module in self.named_modules():
            if module is not self and callable(getattr(module, "row_tables", None)):
                tables.extend(table.prefixed(prefix) for table in module.row_tables())
        return tables

    @torch.no_grad()
    def copy_rows(
        self,
        source: Recommender,
        users: Tensor | None = None,
        items: Tensor | None = None,
        modality: int | None = None,
    ) -> list[str]:
        """Overwrite the rows of ``users`` / ``items`` with ``source``'s (same architecture).

        With ``source`` a freshly initialised model this returns those rows to the state a
        model that never saw them would start from. ``modality`` restricts the item rows to
        tables derived from that modality's features. Returns the names of the tables
        written.
        """
        theirs = {**dict(source.named_parameters()), **dict(source.named_buffers())}
        ours = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        written = []
        for table in self.row_tables():
            ids = users if table.kind == "user" else items
            if ids is None or ids.numel() == 0:
                continue
            if modality is not None and table.modality != modality:
                continue
            target, fresh = ours[table.name], theirs[table.name]
            ids = ids.to(target.device)
            target.index_copy_(
                table.axis, ids, fresh.to(target.device).index_select(table.axis, ids)
            )
            written.append(table.name)
        return written

    # ------------------------------------------------------------------ inference
    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        """``(user [U, D], item [I, D])`` scoring embeddings in the current mode."""
        raise NotImplementedError

    def _param_version(self) -> int:
        # Parameters' in-place version counters move on every optimizer step, which
        # tells us cached embeddings are stale.
        return sum(p._version for p in self.parameters())

    @torch.no_grad()
    def embed(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        """Deterministic scoring embeddings (evaluation mode), cached for :meth:`recommend`."""
        was_training = self.training
        self.eval()
        try:
            user_emb, item_emb = self.compute_embeddings(inputs)
        finally:
            self.train(was_training)
        self._cached_embeddings = (user_emb, item_emb)
        self._cache_version = self._param_version()
        return user_emb, item_emb

    @torch.no_grad()
    def recommend(
        self,
        users: Tensor,
        k: int,
        exclude: Tensor | None = None,
        embeddings: tuple[Tensor, Tensor] | None = None,
    ) -> Tensor:
        """Top-``k`` item ids for each user, highest score first.

        Args:
            users: ``[B]`` user ids.
            k: list length.
            exclude: optional ``[2, E]`` (user id, item id) pairs never to recommend
                (typically the training interactions). Rows whose user is not in
                ``users`` are ignored.
            embeddings: ``(user, item)`` from :meth:`embed`; default: the embeddings cached
                by the last :meth:`embed` call (an error if parameters changed since).

        Returns:
            ``[B, k]`` int64 item ids.
        """
        if embeddings is None:
            if self._cached_embeddings is None or self._cache_version != self._param_version():
                raise RuntimeError(
                    "no up-to-date embeddings: call model.embed(inputs) after training, "
                    "or pass embeddings=(user_emb, item_emb)"
                )
            embeddings = self._cached_embeddings
        user_emb, item_emb = embeddings
        num_users, num_items = user_emb.size(0), item_emb.size(0)
        if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= num_items:
            raise ValueError(f"k must be an int in [1, {num_items}], got {k!r}")
        users = check_ids(users, "users", num_users, "user")
        if exclude is not None:
            if not isinstance(exclude, Tensor) or exclude.dim() != 2 or exclude.size(0) != 2:
                shape = tuple(exclude.shape) if isinstance(exclude, Tensor) else type(exclude)
                raise ValueError(
                    f"exclude must be a [2, E] tensor of (user id, item id) rows, got {shape}"
                )
            check_ids(exclude[0], "exclude[0]", num_users, "user")
            check_ids(exclude[1], "exclude[1]", num_items, "item")
        users = users.to(user_emb.device)
        scores = user_emb[users] @ item_emb.t()
        if exclude is not None and exclude.numel() > 0:
            exclude = exclude.long().to(user_emb.device)
            # map global user ids to rows of this batch (users may repeat: mask all copies)
            order = torch.argsort(users)
            sorted_users = users[order]
            lo = torch.searchsorted(sorted_users, exclude[0], right=False)
            hi = torch.searchsorted(sorted_users, exclude[0], right=True)
            counts = hi - lo
            rows = order[torch.repeat_interleave(lo, counts) + _ranges(counts)]
            cols = torch.repeat_interleave(exclude[1], counts)
            scores[rows, cols] = float("-inf")
        return scores.topk(k, dim=-1).indices


def gather_rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]`` for ids of any shape (``[B]`` -> ``[B, D]``, ``[B, K]`` -> ``[B, K, D]``),
    through one ``index_select``."""
    if ids.dim() == 1:
        return table.index_select(0, ids)
    return table.index_select(0, ids.reshape(-1)).view(*ids.shape, table.size(-1))


def registered_models() -> dict[str, type[Recommender]]:
    """Every model class defined so far, by (lower-case) name."""
    return dict(_REGISTRY)


def _checked_init(init: Any) -> Any:
    """``init`` preceded by :meth:`Recommender.check_hyperparameters` of the instance's
    class, done once: by the outermost ``__init__`` (a base class's reached through
    ``super()`` does not check again)."""
    signature = inspect.signature(init)

    @functools.wraps(init)
    def checked(self: Recommender, *args: Any, **kwargs: Any) -> None:
        if type(self).__init__ is checked:  # the outermost __init__ of this instance
            bound = signature.bind(self, *args, **kwargs)
            bound.apply_defaults()
            type(self).check_hyperparameters(bound.arguments)
        init(self, *args, **kwargs)

    return checked


def _init_parameters(cls: type[Recommender]) -> list[inspect.Parameter]:
    """The constructor's hyper-parameters: keyword arguments with defaults, sizes excluded."""
    params = []
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.name in SIZE_ARGUMENTS:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.default is inspect.Parameter.empty:
            raise TypeError(
                f"{cls.__name__}.__init__ argument {param.name!r} needs a default: "
                "hyper-parameters are keyword arguments with defaults"
            )
        params.append(param)
    return params


_ANNOTATION_TYPES: dict[str, tuple[type, ...]] = {
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "str": (str,),
}


def _annotation_types(param: inspect.Parameter) -> tuple[list[str], bool]:
    """``(type names, optional)`` of a string annotation such as ``"float | None"``."""
    annotation = param.annotation if isinstance(param.annotation, str) else ""
    parts = [p.strip() for p in annotation.split("|")]
    return [p for p in parts if p != "None"], "None" in parts


def _coerce(value: Any, param: inspect.Parameter, key: str) -> Any:
    """``value`` checked against ``param``'s annotation (``int``, ``float``, ``bool``,
    ``str``, optionally ``| None``); ints become floats for float arguments."""
    names, optional = _annotation_types(param)
    if value is None:
        if optional:
            return None
        raise ValueError(f"config key {key!r} must not be null (default {param.default!r})")
    if len(names) != 1 or names[0] not in _ANNOTATION_TYPES:
        return value  # an annotation this check does not know: passed through
    allowed = _ANNOTATION_TYPES[names[0]]
    if isinstance(value, bool) and bool not in allowed:
        allowed = ()
    if not isinstance(value, allowed):
        expected = type_noun(names[0]) + (" or null" if optional else "")
        raise ValueError(
            f"config key {key!r} expects {expected} (like the default {param.default!r}), "
            f"got {value!r}"
        )
    return float(value) if names[0] == "float" else value


@cache
def _read_model_yaml(path: str) -> dict[str, Any]:
    if not Path(path).exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        loaded = yaml.safe_load(fh) or {}
    if not isinstance(loaded, dict):
        raise TypeError(f"{path}: expected a mapping of config keys")
    return loaded


def _ranges(counts: Tensor) -> Tensor:
    """``cat([arange(c) for c in counts])`` without a Python loop."""
    if counts.numel() == 0:
        return counts
    offsets = torch.cumsum(counts, 0) - counts
    return torch.arange(int(counts.sum()), device=counts.device) - torch.repeat_interleave(
        offsets, counts
    )
