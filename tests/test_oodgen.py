"""Paper 002 (CVAE OOD generation): Type I/II geometry, the classifier baselines on toy
problems with closed-form answers, a tiny real trial, and the study end to end."""


import numpy as np
import pytest
import torch
from conftest import assert_reports_validation_and_test_metrics, assert_resumes_exactly
from scipy.stats import chi2

from oodlab.experiment import ConfigError
from oodlab.methods import classifier_baselines as cb
from oodlab.methods import oodgen
from oodlab.methods import oodgen_samples as og
from oodlab.models.classifier import Classifier
from oodlab.models.cvae import CVAE, CVAEConfig
from oodlab.registry import build_config, run_trial


@pytest.fixture
def cvae():
    torch.manual_seed(0)
    return CVAE(CVAEConfig(n_classes=3, size=12, latent_dim=4, hidden=32)).eval()  # D = 144: cheap Jacobians


# ---------------------------------------------------------------- Type I

def _jacobian(model, z1, y1):
    """Reference Jacobian of one sample with torch.autograd.functional (reverse mode, no vmap): (D, d)."""
    c = model.onehot(y1[None])
    return torch.autograd.functional.jacobian(lambda z: torch.sigmoid(model.decode_logits(z[None], c)).flatten(), z1)


def test_decoder_jacobian_matches_autograd(cvae):
    z, y = torch.randn(3, 4), torch.tensor([0, 1, 2])
    ref = torch.stack([_jacobian(cvae, z[i], y[i]) for i in range(3)])
    torch.testing.assert_close(og.decoder_jacobian(cvae, z, y, "fwd"), ref, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(og.decoder_jacobian(cvae, z, y, "rev"), ref, atol=1e-6, rtol=1e-4)


def test_type1_perturbation_lies_in_jacobian_left_null_space(cvae):
    torch.manual_seed(1)
    x, y = torch.rand(5, 1, 12, 12), torch.tensor([0, 1, 2, 0, 1])
    text = og.Type1Spec(0.3, 0.7, direction="uniform", sign="positive", clip=False)  # the paper's text
    xt = og.type1(cvae, x, y, text, torch.Generator().manual_seed(0))
    delta = (xt - x).flatten(1).double()  # β·v
    beta = delta.norm(dim=1)
    assert ((beta >= 0.3 - 1e-6) & (beta <= 0.7 + 1e-6)).all() and beta.std() > 0
    with torch.no_grad():
        mu, _ = cvae.encode(x, y)
    for i in range(5):  # independent check: full SVD of the autograd Jacobian at z = μ(x, y)
        jac = _jacobian(cvae, mu[i], y[i]).double()  # (144, 4)
        v = delta[i] / beta[i]
        assert (jac.T @ v).norm() / jac.norm() < 1e-6, "v has a tangent component"
        u_full = torch.linalg.svd(jac, full_matrices=True)[0]
        null = u_full[:, 4:]  # basis of the left null space (140 vectors)
        assert (v - null @ (null.T @ v)).norm() < 1e-6, "v is not in span of the null-space basis"
    # random directions: two draws at the same point differ
    xt2 = og.type1(cvae, x, y, text, torch.Generator().manual_seed(1))
    assert ((xt2 - x).flatten(1).norm(dim=1) - beta.float()).abs().max() < 0.5
    assert not torch.allclose(xt2, xt)


def test_normal_directions_are_uniform_on_the_null_space():
    """For J = first d axes, null(Jᵀ) = the other axes: v has zero first d coordinates, isotropic rest."""
    b, dd, d = 4000, 6, 2
    jac = torch.zeros(b, dd, d, dtype=torch.float64)
    jac[:, 0, 0], jac[:, 1, 1] = 3.0, 0.5
    v = og.normal_directions(jac, torch.Generator().manual_seed(0))
    assert v[:, :2].abs().max() < 1e-12
    torch.testing.assert_close(v.norm(dim=1), torch.ones(b, dtype=torch.float64))
    second = (v[:, 2:].T @ v[:, 2:]) / b  # E[v vᵀ] = I/4 for uniform on the 3-sphere in R^4
    assert (second - torch.eye(4, dtype=torch.float64) / 4).abs().max() < 0.02


def test_basis_mix_equals_the_authors_sympy_nullspace_mix():
    """The notebook: sympy Matrix(Jᵀ).nullspace(), each vector unit-normalised, mixed with U(-1,1) weights."""
    import sympy

    torch.manual_seed(0)
    b, dd, d = 3, 12, 3
    jac = torch.randn(b, dd, d, dtype=torch.float64)
    jac[0, 0], jac[1, :2] = 0.0, 0.0  # zero rows (dead pixels) are never pivots
    w = 2 * torch.rand(b, dd, dtype=torch.float64) - 1
    v = og.basis_mix_directions(jac, w)
    for i in range(b):
        a = sympy.Matrix(jac[i].T.numpy())
        basis = np.array([np.array(n, dtype=np.float64).ravel() for n in a.nullspace()])
        basis /= np.linalg.norm(basis, axis=1, keepdims=True)
        free = [j for j in range(dd) if j not in a.rref()[1]]
        ref = (w[i].numpy()[free, None] * basis).sum(0)
        np.testing.assert_allclose(v[i].numpy(), ref / np.linalg.norm(ref), atol=1e-10)
        assert (jac[i].T @ v[i]).abs().max() < 1e-12  # in the left null space of J
    with pytest.raises(ValueError, match="rank"):
        og.basis_mix_directions(torch.zeros(1, 6, 2, dtype=torch.float64), torch.ones(1, 6, dtype=torch.float64))


def test_authors_type1_signs_clipping_and_null_space(cvae):
    torch.manual_seed(2)
    x, y = torch.rand(64, 1, 12, 12), torch.arange(64) % 3
    spec = og.Type1Spec()  # authors: β ~ U[0.1, 28], random sign, basis mix, clipped
    assert (spec.beta_low, spec.beta_high, spec.direction, spec.sign, spec.clip) == (
        0.1,
        28.0,
        "basis_mix",
        "random",
        True,
    )
    xt = og.type1(cvae, x, y, spec, torch.Generator().manual_seed(0))
    assert xt.shape == x.shape and xt.min() >= 0 and xt.max() <= 1 and (xt == 1).any() and (xt == 0).any()
    raw = og.type1(cvae, x, y, og.Type1Spec(clip=False), torch.Generator().manual_seed(0))
    torch.testing.assert_close(raw.clamp(0, 1), xt)
    delta = (raw - x).flatten(1).double()
    beta = delta.norm(dim=1)
    assert beta.min() >= 0.1 - 1e-4 and beta.max() <= 28 + 1e-3 and beta.max() > 10
    with torch.no_grad():
        mu, _ = cvae.encode(x, y)
    jac = og.decoder_jacobian(cvae, mu, y).double()
    assert (
        (jac.transpose(1, 2) @ (delta / beta[:, None]).unsqueeze(-1)).norm(dim=1).squeeze(-1)
        < 1e-4 * jac.norm(dim=(1, 2))
    ).all()
    # random sign: the direction for the same weights, flipped for about half the images
    w = 2 * torch.rand(64, 144, generator=torch.Generator().manual_seed(0)) - 1
    v = og.basis_mix_directions(jac.float(), w.double().float())
    signs = torch.sign(((delta / beta[:, None]).float() * v).sum(1))
    assert 10 < (signs > 0).sum() < 54


def test_cvae_layers_authors_and_text():
    authors = CVAE(CVAEConfig(n_classes=5, size=28, latent_dim=10))
    convs = [m for m in authors.conv if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.stride) for m in convs] == [(32, (3, 3), (2, 2)), (64, (3, 3), (2, 2))]
    assert authors.enc[0].out_features == 16 and [h.out_features for h in authors.heads] == [10, 10]
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    mu, logvar = authors.encode(x, y)
    assert mu.shape == logvar.shape == (4, 10)
    assert authors.decode(mu, y).shape == (4, 1, 28, 28)
    t1, t2 = authors.elbo_terms(x, y, sample=False), authors.elbo_terms(x, y, sample=False)
    torch.testing.assert_close(t1["elbo"], t2["elbo"])  # z = μ: deterministic
    assert not torch.allclose(authors.elbo_terms(x, y)["rec"], t1["rec"])
    text = CVAE(CVAEConfig(n_classes=5, size=28, latent_dim=10, arch="text"))
    assert text.enc[0].out_features == 256 and len(text.heads) == 1 and text.decode(mu, y).shape == (4, 1, 28, 28)


# ---------------------------------------------------------------- Type II

def test_latent_gaussians_cholesky_and_95_radius():
    torch.manual_seed(0)
    d, n = 5, 20000
    a = torch.randn(d, d)
    cov = a @ a.T + 0.5 * torch.eye(d)
    z = torch.cat([torch.randn(n, d) @ torch.linalg.cholesky(cov).T + 3.0, torch.randn(n, d) - 2.0])
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])
    g = og.fit_latent_gaussians(z, y, 2, 0.95)
    emp = np.cov(z[:n].double().numpy().T)
    np.testing.assert_allclose((g.chol[0] @ g.chol[0].T).double().numpy(), emp, rtol=1e-4, atol=1e-4)
    assert torch.allclose(torch.tril(g.chol[0]), g.chol[0])
    # for Gaussian latents the 95% radius is sqrt(χ²_d quantile); exactly 95% of each class lies within it
    np.testing.assert_allclose(g.r95.numpy(), np.sqrt(chi2.ppf(0.95, d)), rtol=0.02)
    r = og.mahalanobis_radius(z, y, g)
    for c in (0, 1):
        assert abs((r[y == c] <= g.r95[c]).float().mean().item() - 0.95) < 1e-3


def test_type2_latents_lie_outside_the_95_ellipsoid():
    torch.manual_seed(0)
    d = 6
    z = torch.randn(3000, d) @ torch.diag(torch.linspace(0.5, 3.0, d)) + 1.0
    y = torch.arange(3000) % 3
    g = og.fit_latent_gaussians(z, y, 3, 0.95)
    ys = torch.arange(3000) % 3
    zt = og.type2_latents(g, ys, 2.0, torch.Generator().manual_seed(0))
    for c in range(3):  # independent Mahalanobis distance with numpy's covariance and inverse
        zc = z[y == c].double().numpy()
        prec = np.linalg.inv(np.cov(zc.T) + 1e-6 * np.eye(d))
        diff = zt[ys == c].double().numpy() - zc.mean(0)
        dist = np.sqrt(np.einsum("bi,ij,bj->b", diff, prec, diff))
        r95 = np.quantile(np.sqrt(np.einsum("bi,ij,bj->b", zc - zc.mean(0), prec, zc - zc.mean(0))), 0.95)
        assert dist.min() >= r95 * (1 - 1e-4), "a Type II latent lies inside the 95% ellipsoid"
        assert dist.max() <= 2.0 * r95 * (1 + 1e-4) and dist.std() > 0.1 * r95
        assert (np.sqrt(np.einsum("bi,ij,bj->b", zc - zc.mean(0), prec, zc - zc.mean(0))) <= r95).mean() >= 0.949
    on_surface = og.type2_latents(g, ys, 1.0, torch.Generator().manual_seed(1))
    torch.testing.assert_close(og.mahalanobis_radius(on_surface, ys, g), g.r95[ys], rtol=1e-4, atol=1e-4)


def test_type2_samples_decode_to_images(cvae):
    g = og.fit_latent_gaussians(torch.randn(300, 4), torch.arange(300) % 3, 3)
    x = og.type2(cvae, g, torch.tensor([0, 1, 2]), 1.5)
    assert x.shape == (3, 1, 12, 12) and (x >= 0).all() and (x <= 1).all()


# ---------------------------------------------------------------- baselines on toy problems

class Linear(torch.nn.Module):
    """logits = W x on flattened inputs; features = x (identity), so answers are closed-form."""

    def __init__(self, w):
        super().__init__()
        self.w = torch.nn.Parameter(w)

    def features(self, x):
        return x.flatten(1)

    def forward(self, x):
        return x.flatten(1) @ self.w.T


def test_odin_matches_closed_form_on_linear_model():
    torch.manual_seed(0)
    w, x, t, eps = torch.randn(3, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64), 10.0, 0.05
    model = Linear(w)
    p = torch.softmax(x @ w.T / t, -1)
    k = p.argmax(-1)
    grad = -(w[k] - p @ w) / t  # ∇_x [−log softmax(Wx/T)_k̂]
    x_ref = x - eps * grad.sign()
    torch.testing.assert_close(cb.odin_preprocess(model, x, t, eps), x_ref)
    torch.testing.assert_close(cb.odin(model, x, t, eps), -torch.softmax(x_ref @ w.T / t, -1).amax(-1))
    # the step raises every sample's top softmax score, and T = 1, ε = 0 is max-softmax
    assert (cb.odin(model, x, t, eps) < cb.odin(model, x, t, 0.0)).all()
    torch.testing.assert_close(cb.odin(model, x, 1.0, 0.0), cb.msp(model(x)))


def test_mahalanobis_recovers_tied_gaussian_and_scores_closed_form():
    torch.manual_seed(0)
    d, n = 3, 20000
    cov = torch.tensor([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]], dtype=torch.float64)
    means = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 1.0, 0.0]], dtype=torch.float64)
    y = torch.arange(2 * n) % 2
    x = means[y] + torch.randn(2 * n, d, dtype=torch.float64) @ torch.linalg.cholesky(cov).T
    det = cb.MahalanobisDetector().fit(Linear(torch.zeros(2, d, dtype=torch.float64)), x, y, 2)
    torch.testing.assert_close(det.g.means, means, atol=0.05, rtol=0)
    torch.testing.assert_close(det.g.chol @ det.g.chol.T, cov, atol=0.05, rtol=0)
    q = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 10.0]], dtype=torch.float64)
    prec = torch.linalg.inv(det.g.chol @ det.g.chol.T)
    diff = q[:, None] - det.g.means  # (3, 2, d)
    ref = torch.einsum("bki,ij,bkj->bk", diff, prec, diff).amin(1)
    model = Linear(torch.zeros(2, d, dtype=torch.float64))
    torch.testing.assert_close(det(model, q), ref)
    assert det(model, q)[0] < 0.01 and det(model, q)[2] > 100  # at a class mean vs far off
    # preprocessing: x̃ = x − ε·sign(∇ d²_min), ∇ d² = 2 Σ⁻¹ (x − μ_ĉ) with ĉ the nearest class
    eps = 0.1
    near = torch.einsum("bki,ij,bkj->bk", diff, prec, diff).argmin(1)
    x_ref = q - eps * (2 * (q - det.g.means[near]) @ prec).sign()
    diff_ref = x_ref[:, None] - det.g.means
    pre = cb.MahalanobisDetector(eps)
    pre.g = det.g
    torch.testing.assert_close(pre(model, q), torch.einsum("bki,ij,bkj->bk", diff_ref, prec, diff_ref).amin(1))
    assert (pre(model, q)[1:] < det(model, q)[1:]).all()  # the step moves points towards their class


def test_mahalanobis_requires_fit():
    with pytest.raises(cb.NotFittedError):
        cb.MahalanobisDetector()(Linear(torch.zeros(2, 3)), torch.zeros(1, 3))


def test_msp_mc_dropout_and_kl_to_uniform():
    confident, unsure = torch.tensor([[10.0, 0.0, 0.0]]), torch.tensor([[0.1, 0.0, 0.0]])
    assert cb.msp(unsure) > cb.msp(confident)  # higher = more OOD
    torch.testing.assert_close(cb.kl_to_uniform(torch.zeros(2, 5)), torch.zeros(2))
    logits = torch.randn(4, 5)
    ref = torch.nn.functional.kl_div(logits.log_softmax(-1), torch.full((4, 5), 0.2), reduction="none").sum(-1)
    torch.testing.assert_close(cb.kl_to_uniform(logits), ref)
    # no dropout -> every pass equal: mutual information 0, MC score = max-softmax
    model = Linear(torch.randn(3, 4))
    x = torch.randn(5, 4)
    out = cb.mc_dropout(cb.mc_dropout_probs(model, x, 7))
    torch.testing.assert_close(out["mutual_info"], torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(out["mc_dropout"], cb.msp(model(x)))
    # the CNN: trunk reuse gives t different passes, mean over passes near the eval-mode output
    torch.manual_seed(0)
    clf = Classifier(3).eval()
    xi = torch.rand(2, 1, 28, 28)
    p = cb.mc_dropout_probs(clf, xi, 400)
    assert p.shape == (400, 2, 3) and p.std(0).min() > 0 and not clf.head[0].training
    assert (p.mean(0) - clf(xi).softmax(-1)).abs().max() < 0.05


def test_classifier_is_the_authors_notebook_model():
    """Keras: Conv(32, 3×3 valid), Conv(64, 3×3 valid), MaxPool(2), Dense(128) on 64·12·12 = 9,216 features."""
    clf = Classifier(6)
    convs = [m for m in clf.trunk if isinstance(m, torch.nn.Conv2d)]
    assert [(m.out_channels, m.kernel_size, m.padding) for m in convs] == [(32, (3, 3), (0, 0)), (64, (3, 3), (0, 0))]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in clf.trunk) == 1
    assert clf.dense[2].in_features == 9216 and clf(torch.rand(2, 1, 28, 28)).shape == (2, 6)
    assert Classifier(6, arch="pooled").dense[2].in_features == 3136


def test_adadelta_has_keras_constants():
    opt = oodgen.classifier_optimizer(build_config({"method": "oodgen"}), Classifier(3).parameters())
    assert isinstance(opt, torch.optim.Adadelta)
    assert (opt.defaults["rho"], opt.defaults["eps"], opt.defaults["lr"]) == (0.95, 1e-7, 0.1)


def test_accuracy_counts_the_ood_class_as_an_error():
    """Labels 0, 1, 2 of 3 ID classes; the (n+1) classifier predicts 0, OOD, 2 (class 1 second):
    the paper's 4-way accuracy 2/3, the ID-only argmax 3/3."""
    logits = torch.tensor([[5.0, 0, 0, 1], [0, 2, 0, 9], [0, 0, 3, 1]])
    acc = oodgen.id_accuracies({"n1": logits, "plain": logits[:, :3]}, torch.tensor([0, 1, 2]), 3)
    assert acc == pytest.approx({"acc_n1": 2 / 3, "acc_n1_among_id": 1.0, "acc_plain": 1.0})


# ---------------------------------------------------------------- the trial

def test_tiny_trial_reports_every_detector_and_resumes_exactly(tmp_path):
    cfg = dict(method="oodgen", train_n=200, test_n=40, epochs=1, cvae_epochs=1, mc_samples=2, batch_size=100,
               ood="mnist,uniform_noise", device="cpu")
    res = run_trial(cfg)
    assert_reports_validation_and_test_metrics(build_config(cfg), res)
    names = ("n1_prob", "msp", "odin", "mahalanobis", "mc_dropout", "mutual_info", "confident")
    for ood in ("mnist", "uniform_noise"):
        for s in names:
            for m in ("fpr95", "auroc", "aupr_in", "aupr_out", "detection_error"):
                assert 0.0 <= res.metrics[f"{m}_{ood}_{s}"] <= 1.0
    assert (
        res.scores["id"]["n1_prob"].shape == (40,)
        and ((res.scores["id"]["n1_prob"] >= 0) & (res.scores["id"]["n1_prob"] <= 1)).all()
    )
    assert {"acc_n1", "acc_n1_among_id", "acc_plain", "acc_conf", "loss_n1", "loss"} <= set(res.train)
    assert res.train["acc_n1"] <= res.train["acc_n1_among_id"]  # predicting the OOD class only adds errors
    assert res.train["acc_plain"] > 0.3  # 5 classes: chance is 0.2

    small = build_config({**cfg, "baselines": False, "train_n": 100})
    _, c = assert_resumes_exactly(lambda: oodgen.Experiment(small), tmp_path,
                                  params=lambda e: [*e.cvae.parameters(), *e.clf["n1"].parameters()])
    c.write_artifacts(tmp_path)
    assert (tmp_path / "ood_samples.png").stat().st_size > 5000


def test_ood_pools_follow_the_notebooks_schedule():
    """Type I pool redrawn every type1_every epochs, Type II every epoch; batches draw from them."""
    exp = oodgen.Experiment(build_config(dict(method="oodgen", train_n=96, test_n=20, epochs=3, cvae_epochs=1,
                                              batch_size=48, baselines=False, type1_every=2, device="cpu")))
    exp.step()
    assert exp.pools is not None and exp.pools[0].shape == exp.pools[1].shape == (96, 1, 28, 28)
    first = tuple(p.clone() for p in exp.pools)
    exp.step()  # classifier epoch 1: Type I kept, Type II redrawn
    assert torch.equal(exp.pools[0], first[0]) and not torch.equal(exp.pools[1], first[1])
    exp.step()  # epoch 2: both redrawn
    assert not torch.equal(exp.pools[0], first[0])
    x, m1 = exp.from_pools(10)
    assert x.shape == (10, 1, 28, 28) and m1 == 5
    pool_rows = torch.cat(exp.pools).flatten(1)
    assert all((pool_rows == r).all(1).any() for r in x.flatten(1))  # every batch sample is a pool sample


@pytest.mark.parametrize("bad,match", [
    (dict(beta_low=1.0, beta_high=0.5), "beta_low"), (dict(radius_factor=0.9), "radius_factor"),
    (dict(type1_frac=1.5), "type1_frac"), (dict(optimizer="lbfgs"), "optimizer"),
    (dict(ood_weight=-1.0), "ood_weight"), (dict(mc_samples=0), "mc_samples"),
    (dict(cvae_arch="vgg"), "cvae_arch"), (dict(type1_direction="x"), "type1_direction"),
    (dict(beta_sign="neg"), "beta_sign"), (dict(cvae_optimizer="sgd"), "cvae_optimizer"),
    (dict(clf_arch="vgg"), "clf_arch"), (dict(adadelta_rho=1.0), "adadelta_rho"), (dict(type1_every=0), "type1_every"),
])
def test_config_errors(bad, match):
    with pytest.raises(ConfigError, match=match):
        build_config({"method": "oodgen", **bad})
