"""Hierarchical synthetic features (a child only with its parent) and the absorption metric."""
import dataclasses

import pytest
import torch

from sae.bench.synthetic import Case, DenseTopKReference, decoder_rows, synthetic_data
from sae.bench.hierarchy import absorption, hierarchical_activations, recall_by_context
from sae.bench.recipe import main


def coefficients(data):
    """Each token's feature coefficients, read back by least squares (features fewer than d_in are
    linearly independent; the 1% noise and the scaling leave them readable)."""
    return torch.linalg.lstsq(data.features.t(), data.x.t()).solution.t()


def test_a_child_is_active_only_with_its_parent():
    data = hierarchical_activations(d_in=64, n_true=20, children=4, per_token=2, n=3000, seed=0)
    assert data.n_parents == 4 and data.features.shape == (20, 64)
    assert data.x.pow(2).sum(dim=1).mean().item() == pytest.approx(64, rel=1e-4)
    read = coefficients(data).abs()  # the noise reads ~0.1 here, a feature up to ~8 (x is scaled up)
    held = torch.zeros(3000, 4, dtype=torch.bool).scatter(1, data.parents.long(), True)  # [token, parent]
    parents_read, children_read = read[:, :4], read[:, 4:].reshape(3000, 4, 4)  # [token, parent, child]
    assert parents_read[~held].max() < 0.6 and parents_read[held].max() > 4
    assert children_read[~held].max() < 0.6  # no child of a parent the token does not hold ...
    assert (children_read[held] > 0.6).sum() > 500  # ... while children of held parents do occur
    assert 0.45 < data.has_child.float().mean().item() < 0.55  # one in two parents comes with a child
    again = hierarchical_activations(d_in=64, n_true=20, children=4, per_token=2, n=3000, seed=0)
    assert torch.equal(again.x, data.x) and torch.equal(again.parents, data.parents)


def test_recall_by_context_counts_each_occurrence_once():
    fired = torch.tensor([True, True, False, True, False, False])
    has_child = torch.tensor([False, False, False, True, True, True])
    scores = recall_by_context(fired, has_child)
    assert scores["parent_recall_alone"] == pytest.approx(2 / 3)
    assert scores["parent_recall_with_child"] == pytest.approx(1 / 3)
    assert scores["absorption"] == pytest.approx(1 / 3)


def dictionary_of_the_true_features(data, k):
    """A TopK SAE whose latents are exactly the true features (decoder and encoder)."""
    n, d_in = data.features.shape
    sae = DenseTopKReference(d_in, n, k=k, k_aux=2, aux_coef=0.0)
    with torch.no_grad():
        sae.W_dec.copy_(data.features)
        sae.W_enc.copy_(data.features.t())
    return sae.eval()


def test_a_dictionary_of_the_true_features_absorbs_nothing_and_one_that_folds_parents_into_children_does():
    data = hierarchical_activations(d_in=256, n_true=20, children=4, per_token=1, n=4000, seed=1)
    clean = dictionary_of_the_true_features(data, k=20)  # no top-k cut: a latent fires iff its pre-activation > 0
    scores = absorption(clean, data, slice(None), decoder_rows(clean))
    assert scores["parents_recovered"] == scores["children_recovered"] == 1.0
    assert scores["parent_recall_alone"] > 0.95 and abs(scores["absorption"]) < 0.05
    absorbing = dictionary_of_the_true_features(data, k=20)
    with torch.no_grad():  # a parent's encoder also reads its children negatively: silent when one is there
        children = data.features[4:].reshape(4, 4, -1).sum(dim=1)  # [parent, d_in]
        absorbing.W_enc[:, :4] -= 5 * children.t()
    scores = absorption(absorbing, data, slice(None), decoder_rows(absorbing))
    assert scores["parents_recovered"] == 1.0  # the same decoder: recovery cannot see absorption ...
    assert scores["parent_recall_alone"] > 0.85 and scores["absorption"] > 0.7  # ... recall with a child can (0.82)


def test_the_study_reports_absorption_with_children(capsys):
    (result,) = main(["--sizes", "16,64,6", "--tokens", str(256 * 12), "--seeds", "0", "--threads", "1",
                      "--children", "3", "--base", "batch=256"])
    assert result["children"] == 3 and 0 <= result["parent_recall_alone"] <= 1
    assert "| absorption |" in capsys.readouterr().out


@pytest.mark.parametrize("children", [0, 3])
def test_token_features_sets_the_true_features_per_token_apart_from_k(children):
    """k 16 reads 8 features per token by default; --token-features 3 draws 3 (flat) or 2 parents
    with half a child each (hierarchy), whatever k is: L0 slack becomes a knob of its own."""
    case = Case("topk", 64, 64, 16, 256, 0, 1e-3, "cpu", 1, "float32", true_features=0.25, children=children)
    for token_features, most in ((None, 8 if not children else 5 * 2), (3, 3 if not children else 2 * 2)):
        x, features, hierarchy = synthetic_data(dataclasses.replace(case, token_features=token_features), 2000)
        read = torch.linalg.lstsq(features.t(), x.t()).solution.t().abs()
        counts = (read > 0.1 * read.max()).sum(dim=1)
        assert counts.max() <= most and counts.float().mean() > most / 3
        if children:
            assert hierarchy.parents.shape[1] == most // 2


@pytest.mark.parametrize("args, message", [(["--children", "-1"], "--children must be >= 0"),
                                           (["--token-features", "0"], "--token-features must be >= 1"),
                                           (["--children", "2", "--varied-complexity"], "pick one")])
def test_bad_children_are_refused_before_any_run(args, message, capsys):
    with pytest.raises(SystemExit):
        main(["--sizes", "8,32,2", "--seeds", "0", *args])
    err = capsys.readouterr()
    assert message in err.err.strip().splitlines()[-1] and "seed 0" not in err.out
