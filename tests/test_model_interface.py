"""The one model interface: separated loss terms, swappable objectives, one source of
defaults, the generic ``from_config``, self-registering models and loading a trained run."""

from __future__ import annotations

import importlib.util
import inspect
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cm3_pyg
from cm3_pyg.data import make_synthetic
from cm3_pyg.errors import CheckpointError, ConfigError
from cm3_pyg.models import (
    CM3,
    MODELS,
    SEA,
    Batch,
    LightGCN,
    Recommender,
    available_models,
    get_model_class,
)
from cm3_pyg.models.base import CONFIG_KEYS, SIZE_ARGUMENTS
from cm3_pyg.models.directau import DirectAU
from cm3_pyg.nn.objectives import BPRLoss, make_objective
from cm3_pyg.training import (
    build_graph_inputs,
    load_config,
    load_run,
    run_experiment,
    training_defaults,
)
from tests.model_helpers import a_batch, as_double, build

PAIRWISE = ["bprmf", "lightgcn", "vbpr", "freedom", "lirdrec", "sea"]
OWN_OBJECTIVE = ["cm3", "bm3", "directau"]
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data():
    return make_synthetic(num_users=60, num_items=80, seed=5)


# --- one source of defaults -----------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODELS))
def test_defaults_have_one_source(name):
    cls = get_model_class(name)
    hyper = cls.hyperparameters()
    training = training_defaults()
    yaml_keys = {k: v for k, v in cls._yaml().items() if k != "grid"}
    # every constructor hyper-parameter is a config key with its default ...
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name in ("self", *SIZE_ARGUMENTS):
            continue
        assert hyper[CONFIG_KEYS.get(param.name, param.name)] == param.default
    # ... the YAML repeats none of them, and only overrides training keys with new values
    assert not set(yaml_keys) & set(hyper), (name, set(yaml_keys) & set(hyper))
    for key, value in yaml_keys.items():
        assert key in training and training[key] != value, (name, key)
    # the grid searches keys the run knows
    config = load_config(cls.default_config())
    assert set(cls.default_grid()) <= set(config)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_from_config_reads_every_hyperparameter(name, data):
    cls = get_model_class(name)
    config = load_config(cls.default_config(), overrides={"embedding_size": 8})
    inputs = build_graph_inputs(data, config, uses_item_graph=cls.uses_item_graph)
    model = cls.from_config(config, inputs)
    assert model.embedding_dim == 8
    assert "embedding_dim=8" in repr(model)


def test_cm3_temperature_is_a_config_key(data):
    config = load_config(CM3.default_config(), overrides={"temp": 0.5, "embedding_size": 8})
    inputs = build_graph_inputs(data, config)
    assert CM3.from_config(config, inputs).temperature == 0.5
    with pytest.raises(ConfigError, match="'temp' expects a number"):
        load_config(CM3.default_config(), overrides={"temp": "warm"})


def test_from_config_checks_values_against_the_constructor(data):
    config = load_config(SEA.default_config(), overrides={"club_lr": "fast"})
    want = r"model 'sea': config key 'club_lr' expects a number or null \(like the default None\)"
    with pytest.raises(ConfigError, match=want + ", got 'fast'"):
        run_experiment(data, "sea", {**config, "epochs": 1}, progress=False)
    assert load_config(SEA.default_config(), overrides={"club_lr": 0.01})["club_lr"] == 0.01
    with pytest.raises(ConfigError, match=r"config key .dropout. must be in \[0, 1\), got 1.5"):
        run_experiment(
            data,
            "freedom",
            load_config(
                get_model_class("freedom").default_config(), overrides={"dropout": 1.5, "epochs": 1}
            ),
            progress=False,
        )


# --- loss terms and objectives ----------------------------------------------------------------


@pytest.mark.parametrize("name", PAIRWISE)
def test_pairwise_ranking_term_is_bpr_on_the_scores(name, data):
    model, inputs, _ = build(name, data)
    model = model.double().eval()  # eval: no dropout / pruning randomness
    inputs = as_double(inputs)
    users, pos, neg = a_batch(data)
    batch = Batch(users, pos, neg)
    torch.manual_seed(3)  # SEA draws the CLUB bound's permutations
    terms = model.loss_terms(inputs, batch)
    rows = model.batch_rows(inputs, batch)
    # independent: BPR from the rows by hand, in float64
    s_pos = (rows.user * rows.pos).sum(-1)
    s_neg = (rows.user * rows.neg).sum(-1)
    want = -torch.log(torch.sigmoid(s_pos - s_neg)).mean()
    if name == "sea":
        want = want / torch.log(torch.tensor(2.0, dtype=torch.float64))
    torch.testing.assert_close(terms.ranking, want, rtol=1e-10, atol=1e-12)
    # the total is the terms' sum, and training_loss is the total
    total = terms.ranking + sum(terms.auxiliary.values()) + terms.regularization
    torch.testing.assert_close(terms.total, total, rtol=1e-12, atol=1e-12)
    torch.manual_seed(3)
    torch.testing.assert_close(model.training_loss(inputs, users, pos, neg), terms.total)


class _Hinge(torch.nn.Module):
    """A margin objective written by a user: ``mean(relu(1 - (s+ - s-)))``."""

    def forward(self, pos_scores, neg_scores, batch=None):
        return F.relu(1.0 - (pos_scores - neg_scores)).mean()


def test_a_user_objective_replaces_the_ranking_term_only(data):
    model, inputs, _ = build("lightgcn", data, reg_weight=0.01)
    users, pos, neg = a_batch(data)
    batch = Batch(users, pos, neg)
    bpr = model.loss_terms(inputs, batch)
    model.set_objective(_Hinge())
    hinge = model.loss_terms(inputs, batch)
    rows = model.batch_rows(inputs, batch)
    margin = (rows.user * rows.pos).sum(-1) - (rows.user * rows.neg).sum(-1)
    torch.testing.assert_close(hinge.ranking, F.relu(1.0 - margin).mean())
    torch.testing.assert_close(hinge.regularization, bpr.regularization)  # untouched
    hinge.total.backward()
    assert model.user_embedding.grad is not None and model.user_embedding.grad.abs().sum() > 0


@pytest.mark.parametrize("name", OWN_OBJECTIVE)
def test_models_with_their_own_objective_reject_another(name, data):
    cls = get_model_class(name)
    assert cls.objectives == () and cls.own_objective
    config = load_config(cls.default_config(), overrides={"objective": "bpr", "epochs": 1})
    with pytest.raises(ConfigError, match=rf"model '{name}' trains with its own objective"):
        run_experiment(data, name, config, progress=False)
    model, _, _ = build(name, data)
    with pytest.raises(ValueError, match="trains with its own objective"):
        model.set_objective("bpr")


def test_objective_names_are_checked():
    with pytest.raises(
        ConfigError,
        match=r"'objective' must be null or one of \['bpo', 'bpr', 'nbpo', 'nbpo_original'\]",
    ):
        load_config(LightGCN.default_config(), overrides={"objective": "hinge"})
    with pytest.raises(ValueError, match="unknown objective 'hinge'"):
        make_objective("hinge")
    config = load_config(LightGCN.default_config(), overrides={"objective": "bpr"})
    assert config["objective"] == "bpr" and isinstance(LightGCN(3, 4).objective, BPRLoss)


def test_bpr_objective_matches_the_formula_and_multiple_negatives():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(6, generator=gen, dtype=torch.float64)
    neg = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    got = BPRLoss()(pos, neg)
    want = -torch.log(torch.sigmoid(pos[:, None] - neg)).mean()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


# --- DirectAU: the model added as one file + one YAML -----------------------------------------


def test_directau_loss_matches_a_float64_brute_force(data):
    model, inputs, _ = build("directau", data, gamma=0.7)
    model = model.double()
    users, pos, neg = a_batch(data, size=40)
    terms = model.loss_terms(inputs, Batch(users, pos, neg))
    u = model.user_embedding[users]
    i = model.item_embedding[pos]
    u, i = u / u.norm(dim=1, keepdim=True), i / i.norm(dim=1, keepdim=True)

    def unif(x):
        d2 = torch.cdist(x, x).pow(2)
        a, b = torch.triu_indices(len(x), len(x), offset=1)
        return torch.log(torch.exp(-2.0 * d2[a, b]).mean())

    want = (u - i).pow(2).sum(1).mean() + 0.7 * (unif(u) + unif(i)) / 2
    torch.testing.assert_close(terms.total, want, rtol=1e-9, atol=1e-10)
    assert DirectAU.min_modalities == 0 and not DirectAU.uses_item_graph


def test_directau_is_found_by_name_and_trains(data):
    assert "directau" in available_models() and get_model_class("DirectAU") is DirectAU
    config = load_config(DirectAU.default_config(), overrides={"epochs": 3, "n_layers": 1})
    assert config["weight_decay"] == 1e-6  # its YAML's training override
    metrics = run_experiment(data, "directau", config, progress=False)
    assert metrics["model"] == "directau" and metrics["test"]["recall@20"] > 0


MODEL_FILE = '''
from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import Parameter

from cm3_pyg.models.base import Batch, BatchRows, GraphInputs, Recommender


class ScaledMF(Recommender):
    """Matrix factorisation whose scores are scaled by a constant."""

    name = "scaled_mf_plugin"

    def __init__(self, num_users: int, num_items: int, embedding_dim: int = 16,
                 scale: float = 1.0) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        self.scale = scale
        self.user = Parameter(torch.randn(num_users, embedding_dim) * 0.1)
        self.item = Parameter(torch.randn(num_items, embedding_dim) * 0.1)

    def batch_rows(self, inputs: GraphInputs, batch: Batch) -> BatchRows:
        u = self.user[batch.users] * self.scale
        return BatchRows(u, self.item[batch.pos_items], self.item[batch.neg_items])

    def compute_embeddings(self, inputs: GraphInputs) -> tuple[Tensor, Tensor]:
        return self.user * self.scale, self.item
'''


def test_a_model_outside_the_package_is_one_file_and_one_yaml(tmp_path, data):
    (tmp_path / "scaled_mf.py").write_text(MODEL_FILE)
    (tmp_path / "scaled_mf.yaml").write_text("learning_rate: 0.01\ngrid:\n  scale: [0.5, 2.0]\n")
    spec = importlib.util.spec_from_file_location("scaled_mf_plugin_mod", tmp_path / "scaled_mf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    cls = get_model_class("scaled_mf_plugin")
    assert cls is module.ScaledMF and issubclass(cls, Recommender)
    assert cls.default_config() == {"embedding_size": 16, "scale": 1.0, "learning_rate": 0.01}
    assert cls.default_grid() == {"scale": [0.5, 2.0]}
    config = load_config(cls.default_config(), overrides={"scale": 2.0, "epochs": 2})
    metrics = run_experiment(data, "scaled_mf_plugin", config, progress=False)
    assert metrics["model"] == "scaled_mf_plugin" and metrics["epochs_run"] == 2


def test_a_hyperparameter_without_default_is_refused():
    class NoDefault(Recommender):
        def __init__(self, num_users: int, width: int) -> None:
            super().__init__()

    with pytest.raises(TypeError, match="argument 'width' needs a default"):
        NoDefault.hyperparameters()


# --- the package root and a trained run in another process ------------------------------------


def test_package_root_exposes_the_entry_points():
    for name in (
        "load_dataset",
        "get_model_class",
        "available_models",
        "load_config",
        "run_experiment",
        "load_run",
        "Recommender",
        "Trainer",
    ):
        assert callable(getattr(cm3_pyg, name)), name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cm3_pyg.nope  # noqa: B018


def test_load_run_in_another_process(tmp_path):
    data = make_synthetic(num_users=60, num_items=80, seed=5)
    config = load_config(LightGCN.default_config(), overrides={"epochs": 2, "embedding_size": 8})
    run_experiment(data, "lightgcn", config, out_dir=tmp_path / "run", progress=False)
    here = load_run(tmp_path / "run", data=data)
    users = torch.arange(5)
    want = here.recommend(users, k=7)
    assert here.epoch == 2 and here.metrics["model"] == "lightgcn"
    train = here.splits.train
    for row, user in zip(want.tolist(), users.tolist(), strict=True):
        seen = set(train[1, train[0] == user].tolist())
        assert not seen & set(row)
    script = textwrap.dedent(
        f"""
        import json, torch
        from cm3_pyg import load_run, make_synthetic
        run = load_run({str(tmp_path / "run")!r}, data=make_synthetic(num_users=60,
                       num_items=80, seed=5))
        print(json.dumps(run.recommend(torch.arange(5), k=7).tolist()))
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == want.tolist()
    other = make_synthetic(num_users=60, num_items=80, seed=6)
    with pytest.raises(CheckpointError, match="trained on other data"):
        load_run(tmp_path / "run", data=other)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        load_run(tmp_path / "missing")
