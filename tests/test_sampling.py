"""Tests for gptoss_jax.sampling: greedy, temperature, top-k, top-p, per-row parameters."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gptoss_jax.sampling import greedy, sample_next_token, validate_sampling_args

N_DRAWS = 20000


def _fresh_key():
    return jax.random.key(np.random.SeedSequence().entropy % (2**31))


V_EMP = 8  # every empirical test uses an [N_DRAWS, 8] batch, so the sampler compiles once


def _empirical(logits_row, key, n=N_DRAWS, *, temperature=1.0, top_k=0, top_p=1.0):
    """Draw n samples from one row of logits (vectorised as a batch of n identical rows).

    Rows shorter than 8 are padded with -inf logits (which must never be drawn). The parameters
    are passed as per-row numpy arrays so all calls share one compiled sampler.
    """
    row = np.full(V_EMP, -np.inf, np.float32)
    row[: len(logits_row)] = logits_row
    logits = np.broadcast_to(row, (n, V_EMP))
    ids = sample_next_token(
        logits,
        key,
        temperature=np.full(n, temperature, np.float32),
        top_k=np.full(n, top_k, np.int32),
        top_p=np.full(n, top_p, np.float32),
    )
    chex.assert_shape(ids, (n,))
    chex.assert_type(ids, jnp.int32)
    freq = np.bincount(np.asarray(ids), minlength=V_EMP) / n
    assert freq[len(logits_row):].sum() == 0
    return freq[: len(logits_row)]


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def _tv(p, q):
    return 0.5 * np.abs(np.asarray(p) - np.asarray(q)).sum()


# With 20000 draws over <= 8 outcomes the TV distance to the true law has mean ~0.01 and is
# below 0.03 with overwhelming probability.
TV_TOL = 0.03


def _rows(n, **kw):
    """Per-row parameter arrays (numpy) for a batch of n."""
    t = np.full(n, kw.get("temperature", 1.0), np.float32)
    k = np.full(n, kw.get("top_k", 0), np.int32)
    p = np.full(n, kw.get("top_p", 1.0), np.float32)
    return dict(temperature=t, top_k=k, top_p=p)


# Non-empirical tests share one [B, V] shape so the (eagerly called) sampler compiles once for them:
# python-scalar parameters are broadcast to per-row arrays before the jitted body.
B, V = 16, 50


def test_shape_dtype_and_reproducible():
    key = _fresh_key()
    logits = jax.random.normal(_fresh_key(), (B, V))
    a = sample_next_token(logits, key, temperature=0.9, top_k=5, top_p=0.8)
    b = sample_next_token(logits, key, temperature=0.9, top_k=5, top_p=0.8)
    chex.assert_shape(a, (B,))
    chex.assert_type(a, jnp.int32)
    np.testing.assert_array_equal(a, b)
    assert np.all((np.asarray(a) >= 0) & (np.asarray(a) < V))
    # python scalars and the equivalent per-row arrays give the same draw
    np.testing.assert_array_equal(sample_next_token(logits, key, **_rows(B, temperature=0.9, top_k=5, top_p=0.8)), a)
    c = sample_next_token(logits, _fresh_key(), temperature=0.9, top_k=5, top_p=0.8)
    chex.assert_shape(c, (B,))


def test_temperature_zero_and_top_k_one_are_greedy():
    logits = jax.random.normal(_fresh_key(), (B, V)) * 3
    want = np.argmax(np.asarray(logits), axis=-1)
    np.testing.assert_array_equal(greedy(logits), want)
    for key in jax.random.split(_fresh_key(), 3):
        # python scalars take the static greedy path ...
        np.testing.assert_array_equal(sample_next_token(logits, key, temperature=0.0), want)
        np.testing.assert_array_equal(sample_next_token(logits, key, temperature=2.0, top_k=1), want)
        # ... per-row arrays the traced one
        np.testing.assert_array_equal(sample_next_token(logits, key, **_rows(B, temperature=0.0)), want)
        got = sample_next_token(logits, key, **_rows(B, temperature=2.0, top_k=1, top_p=0.99))
        np.testing.assert_array_equal(got, want)


def test_temperature_one_matches_softmax():
    logits = np.random.default_rng().normal(size=8) * 1.5
    freq = _empirical(logits, _fresh_key(), temperature=1.0)
    assert _tv(freq, _softmax(logits)) < TV_TOL, (freq, _softmax(logits))
    # chi-square goodness of fit, 7 dof: the 0.999 quantile is 24.3
    expected = _softmax(logits) * N_DRAWS
    chi2 = (((freq * N_DRAWS) - expected) ** 2 / expected).sum()
    assert chi2 < 24.3 * 1.5, chi2


def test_temperature_scales_distribution():
    logits = np.random.default_rng().normal(size=6)
    for t in (0.5, 2.0):
        freq = _empirical(logits, _fresh_key(), temperature=t)
        assert _tv(freq, _softmax(logits / t)) < TV_TOL, t


def test_top_k_truncation():
    logits = np.random.default_rng().permutation(np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0]))
    k = 3
    top = np.argsort(-logits)[:k]
    want = np.zeros(8)
    want[top] = _softmax(logits[top])
    freq = _empirical(logits, _fresh_key(), top_k=k)
    assert set(np.nonzero(freq)[0]) <= set(top.tolist())
    assert _tv(freq, want) < TV_TOL
    # top_k >= V is the same as no top-k
    freq_all = _empirical(logits, _fresh_key(), top_k=100)
    assert _tv(freq_all, _softmax(logits)) < TV_TOL


def test_top_p_truncation():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    perm = np.random.default_rng().permutation(5)
    logits = np.log(probs[perm])
    # top_p=0.65: 0.4 < 0.65 <= 0.4+0.3 -> keep {0.4, 0.3} (thresholds avoid exact float ties)
    for top_p, n_keep in ((0.65, 2), (0.69, 2), (0.71, 3), (0.9, 4), (0.96, 5), (0.1, 1)):
        kept = perm.argsort()[:n_keep]  # positions holding the n_keep largest probs
        want = np.zeros(5)
        want[kept] = probs[:n_keep] / probs[:n_keep].sum()
        freq = _empirical(logits, _fresh_key(), top_p=top_p)
        assert set(np.nonzero(freq)[0]) <= set(kept.tolist()), (top_p, freq)
        assert _tv(freq, want) < TV_TOL, (top_p, freq, want)


def test_top_k_then_top_p():
    probs = np.array([0.4, 0.3, 0.2, 0.1])
    logits = np.log(probs)
    # top_k=2 renormalises to [4/7, 3/7]; top_p=0.5 then keeps only the first.
    freq = _empirical(logits, _fresh_key(), top_k=2, top_p=0.5)
    np.testing.assert_allclose(freq, [1, 0, 0, 0])
    freq = _empirical(logits, _fresh_key(), top_k=3, top_p=0.9)
    want = np.array([0.4, 0.3, 0.2, 0]) / 0.9
    assert _tv(freq, want) < TV_TOL


def test_neg_inf_logits_never_sampled_and_no_nan():
    rng = np.random.default_rng()
    logits = rng.normal(size=(B, V)).astype(np.float32)
    banned = rng.random((B, V)) < 0.7
    banned[:, 0] = False  # at least one finite logit per row ...
    banned[-1, :] = True  # ... except the last row, which is fully masked
    logits = np.where(banned, -np.inf, logits)
    # four row groups: plain, top-k, top-p, both with a temperature
    t = np.repeat(np.array([1.0, 1.0, 1.0, 0.7], np.float32), B // 4)
    k = np.repeat(np.array([0, 3, 0, 5], np.int32), B // 4)
    p = np.repeat(np.array([1.0, 1.0, 0.8, 0.5], np.float32), B // 4)
    for key in jax.random.split(_fresh_key(), 8):
        ids = np.asarray(sample_next_token(logits, key, temperature=t, top_k=k, top_p=p))
        assert np.all((ids >= 0) & (ids < V))
        assert not banned[np.arange(B - 1), ids[:-1]].any()


def test_per_row_parameters_under_jit():
    rng = np.random.default_rng()
    logits = jnp.asarray(rng.normal(size=(6, 40)) * 2, jnp.float32).astype(jnp.bfloat16)
    temperature = jnp.array([0.0, 1.0, 1.0, 0.7, 1.0, 1.3])
    top_k = jnp.array([0, 1, 0, 4, 0, 2], jnp.int32)
    top_p = jnp.array([1.0, 1.0, 1e-6, 1.0, 0.5, 1.0])

    @jax.jit
    def step(logits, key):
        k1, k2 = jax.random.split(key)
        per_row = sample_next_token(logits, k1, temperature=temperature, top_k=top_k, top_p=top_p)
        static = sample_next_token(logits, k2, temperature=0.8, top_k=4, top_p=0.9)  # static python scalars
        return per_row, static

    l32 = np.asarray(logits.astype(jnp.float32))
    want_greedy = np.argmax(l32, -1)
    top4 = np.argsort(-l32, -1, kind="stable")[:, :4]
    top2 = np.argsort(-l32, -1, kind="stable")[:, :2]
    for key in jax.random.split(_fresh_key(), 20):
        ids, static = (np.asarray(x) for x in step(logits, key))
        chex.assert_shape(ids, (6,))
        assert ids.dtype == np.int32 and static.dtype == np.int32
        assert ids[0] == want_greedy[0]  # temperature 0
        assert ids[1] == want_greedy[1]  # top_k 1
        assert ids[2] == want_greedy[2]  # tiny top_p keeps only the best token
        assert ids[3] in top4[3]
        assert ids[5] in top2[5]
        assert all(static[i] in top4[i] for i in range(6))


def test_bad_shapes():
    with pytest.raises(ValueError, match="shape"):
        sample_next_token(jnp.zeros((10,)), _fresh_key())
    with pytest.raises(ValueError, match="shape"):
        sample_next_token(jnp.zeros((2, 10)), _fresh_key(), temperature=jnp.ones(3))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=-0.1), "temperature must be >= 0"),
        (dict(temperature=float("inf")), "temperature must be finite"),
        (dict(temperature=np.array([1.0, -1.0])), "temperature must be >= 0"),
        (dict(top_k=-1), "top_k must be >= 0"),
        (dict(top_k=2.5), "top_k must be an integer"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.01), r"top_p must be in \(0, 1\]"),
        (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
        (dict(top_p="0.5"), "top_p must be a number"),
        (dict(temperature=True), "temperature must be a number"),
        (dict(temperature=np.ones((2, 2))), "1-D"),
        (dict(temperature=np.ones(3), top_p=np.full(2, 0.5)), "disagree"),
    ],
)
def test_validate_sampling_args_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        validate_sampling_args(**kwargs)


def test_validate_sampling_args_ok():
    validate_sampling_args(0.0, 0, 1.0)
    validate_sampling_args(0.7, 50, 0.95)
    validate_sampling_args(np.array([0.0, 1.0]), np.array([0, 5]), np.array([1.0, 0.5]))
    validate_sampling_args(1.0, 3.0, 1.0)  # integral float top_k is accepted


def test_static_top_k_takes_top_k_without_sorting_the_vocabulary():
    """A python-int top_k bounds both truncations, so the sampler takes lax.top_k instead of a full sort; the law is
    unchanged (the very same draw as per-row arrays: test_shape_dtype_and_reproducible): softmax over the k best
    (ties: lower index first), then top-p within them."""
    logits = np.random.default_rng().permutation(np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0], np.float32))
    batch = np.broadcast_to(logits, (N_DRAWS, V_EMP))
    text = str(jax.make_jaxpr(lambda l_, k_: sample_next_token(l_, k_, top_k=3, top_p=0.9))(batch, _fresh_key()))
    assert "top_k[" in text and "sort[" not in text
    top = np.argsort(-logits)[:3]
    want = np.zeros(V_EMP)
    want[top] = _softmax(logits[top])
    freq = np.bincount(np.asarray(sample_next_token(batch, _fresh_key(), top_k=3)), minlength=V_EMP) / N_DRAWS
    assert set(np.nonzero(freq)[0]) <= set(top.tolist())
    assert _tv(freq, want) < TV_TOL
    # top-p after top-k: [0.4, 0.3, 0.2, 0.1] -> top_k=2 renormalises to [4/7, 3/7]; top_p=0.5 keeps the first only
    row = np.full(V_EMP, -np.inf, np.float32)
    row[:4] = np.log([0.4, 0.3, 0.2, 0.1])
    ids = sample_next_token(np.broadcast_to(row, (64, V_EMP)), _fresh_key(), top_k=2, top_p=0.5)
    np.testing.assert_array_equal(np.asarray(ids), 0)
    # top_k=3, top_p=0.9 keeps [0.4, 0.3, 0.2] / 0.9
    freq = np.bincount(np.asarray(sample_next_token(np.broadcast_to(row, (N_DRAWS, V_EMP)), _fresh_key(),
                                                    top_k=3, top_p=0.9)), minlength=V_EMP)[:4] / N_DRAWS
    assert _tv(freq, np.array([0.4, 0.3, 0.2, 0]) / 0.9) < TV_TOL
