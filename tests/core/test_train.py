import numpy as np
import pytest
import torch

from fkd_core.augment import AugmentConfig, sample_batch
from fkd_core.geometry import denormalise
from fkd_core.train import FitConfig, evaluate_arrays, fit


def _toy(n=24, seed=0):
    """Canonical crops with a bright dot at keypoint 0's position: learnable, and cheap."""
    rng = np.random.default_rng(seed)
    crops = np.zeros((n, 144, 144), np.uint8)
    kp = np.tile(rng.uniform(40, 104, size=(1, 68, 2)), (n, 1, 1)).astype(np.float32)
    for i in range(n):
        crops[i] = rng.integers(0, 40, size=(144, 144))
        kp[i] += rng.normal(0, 2, size=(68, 2)).astype(np.float32)
    return crops, kp


def test_unaugmented_sample_is_the_inner_square():
    crops, kp = _toy(2)
    x, y = sample_batch(crops, kp, np.arange(2), 96, 1 / 1.5)
    assert x.shape == (2, 1, 96, 96) and y.shape == (2, 136)
    # the inner 96 px of a 144 px canonical crop is taken 1:1
    assert np.allclose(x[0, 0], crops[0, 24:120, 24:120] / 255.0, atol=1e-6)
    assert np.allclose(denormalise(y[0].reshape(68, 2), 96), kp[0] - 24, atol=1e-4)


def test_augmented_keypoints_follow_the_pixels():
    """Jittered crops move their keypoints with the pixels."""
    crops = np.zeros((1, 144, 144), np.uint8)
    kp = np.full((1, 68, 2), 72.0, np.float32)
    kp[0, 45] = [90.0, 60.0]
    crops[0, 58:63, 88:93] = 255
    rng = np.random.default_rng(5)
    for _ in range(10):
        aug = AugmentConfig(flip=0.0, brightness=0, contrast=0)
        x, y = sample_batch(crops, kp, np.array([0]), 96, 1 / 1.5, rng, aug)
        assert np.abs(denormalise(y[0].reshape(68, 2), 96)[45] - _bright_centroid(x[0, 0])).max() < 0.6


def test_a_flipped_face_relabels_its_left_and_right_points():
    """A mirrored face's right outer eye corner (45) becomes its left one (36): the label follows the mirror."""
    crops = np.zeros((1, 144, 144), np.uint8)
    kp = np.full((1, 68, 2), 72.0, np.float32)
    kp[0, 45] = [90.0, 60.0]  # a dot right of centre, labelled 45
    crops[0, 58:63, 88:93] = 255
    aug = AugmentConfig(scale=0, shift=0, rotate_deg=0, flip=0.5, brightness=0, contrast=0)
    rng = np.random.default_rng(3)
    seen = set()
    for _ in range(20):
        x, y = sample_batch(crops, kp, np.array([0]), 96, 1 / 1.5, rng, aug)
        pts, dot = denormalise(y[0].reshape(68, 2), 96), _bright_centroid(x[0, 0])
        flipped = dot[0] < 47.5  # the dot crossed to the left of the crop's centre
        seen.add(flipped)
        label = 36 if flipped else 45
        assert np.abs(pts[label] - dot).max() < 0.6 and np.abs(pts[81 - label] - dot).max() > 10
    assert seen == {True, False}


def _bright_centroid(img: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(img > 0.05)
    w = img[ys, xs]
    return np.array([(xs * w).sum() / w.sum(), (ys * w).sum() / w.sum()])


def test_fit_is_deterministic_and_learns():
    crops, kp = _toy()
    params = FitConfig(epochs=3, batch_size=8, patience=5, seed=7)
    torch.set_num_threads(1)
    m1, h1 = fit((crops, kp), (crops[:8], kp[:8]), params=params, inner=1 / 1.5)
    m2, h2 = fit((crops, kp), (crops[:8], kp[:8]), params=params, inner=1 / 1.5)
    for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert [e.train_mse for e in h1.epochs] == [e.train_mse for e in h2.epochs]
    assert h1.epochs[-1].train_mse < h1.epochs[0].train_mse
    assert h1.best_epoch == min(h1.epochs, key=lambda e: e.val_nme).epoch


def test_with_an_average_both_weights_are_validated_and_the_better_is_kept():
    crops, kp = _toy()
    val = (crops[:8], kp[:8])
    torch.set_num_threads(1)
    base = dict(epochs=3, batch_size=8, patience=5, seed=3)
    m_raw, h_raw = fit((crops, kp), val, params=FitConfig(**base, ema_decay=0.0), inner=1 / 1.5)
    m_ema, h_ema = fit((crops, kp), val, params=FitConfig(**base, ema_decay=0.5), inner=1 / 1.5)
    # averaging never touches the optimiser's trajectory ...
    assert [e.train_mse for e in h_ema.epochs] == [e.train_mse for e in h_raw.epochs]
    assert [e.raw_val_nme for e in h_ema.epochs] == [e.val_nme for e in h_raw.epochs]
    # ... each epoch offers the better of the two, and says which
    for e in h_ema.epochs:
        assert e.val_nme == min(e.averaged_val_nme, e.raw_val_nme)
        assert e.weights == ("averaged" if e.averaged_val_nme <= e.raw_val_nme else "raw")
    # what is returned is what scored best
    _, nme = evaluate_arrays(m_ema, *val, 1 / 1.5)
    assert abs(nme - h_ema.best.val_nme) < 1e-6 and h_ema.best.val_nme <= h_raw.best.val_nme
    # with a vanishing decay the average is the current weights
    m_0, _ = fit((crops, kp), val, params=FitConfig(**base, ema_decay=1e-12), inner=1 / 1.5)
    for a, b in zip(m_raw.state_dict().values(), m_0.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6)


def test_cosine_schedule_decays_to_min_lr_and_bad_values_are_refused():
    crops, kp = _toy(16)
    torch.set_num_threads(1)
    params = FitConfig(epochs=3, batch_size=8, patience=5, schedule="cosine", min_lr=1e-5)
    _, h = fit((crops, kp), (crops[:4], kp[:4]), params=params, inner=1 / 1.5)
    lrs = [e.lr for e in h.epochs]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] < 1e-3
    assert abs(lrs[-1] - 1e-5) < 1e-9
    with pytest.raises(ValueError, match="schedule must be"):
        fit((crops, kp), (crops[:4], kp[:4]), params=FitConfig(schedule="step"), inner=1 / 1.5)
    with pytest.raises(ValueError, match="ema_decay must be"):
        fit((crops, kp), (crops[:4], kp[:4]), params=FitConfig(ema_decay=1.0), inner=1 / 1.5)


def test_the_weight_average_warms_up_so_a_short_run_is_not_its_starting_point():
    from fkd_core.train import ema_decay_at

    decays = [ema_decay_at(s, 0.998) for s in (1, 10, 100, 1000, 100_000)]
    assert decays == sorted(decays) and decays[0] < 0.5 and decays[-1] == 0.998
    assert ema_decay_at(1, 0.998, warmup=False) == 0.998
    # 300 steps (a few epochs): with the warm-up the random start weighs almost nothing in the average
    start_weight = lambda warmup: float(np.prod([ema_decay_at(s, 0.998, warmup) for s in range(1, 301)]))  # noqa: E731
    assert start_weight(True) < 1e-6 < 0.5 < start_weight(False)
    # a few steps in, the warmed-up average validates close to the raw weights; the cold one is still the start
    crops, kp = _toy(48)
    val = (crops[:8], kp[:8])
    torch.set_num_threads(1)
    base = dict(epochs=3, batch_size=8, patience=5, seed=3, ema_decay=0.998)
    _, warm = fit((crops, kp), val, params=FitConfig(**base), inner=1 / 1.5)
    _, cold = fit((crops, kp), val, params=FitConfig(**base, ema_warmup=False), inner=1 / 1.5)
    lag = {k: h.epochs[-1].averaged_val_nme - h.epochs[-1].raw_val_nme for k, h in (("warm", warm), ("cold", cold))}
    assert 0 < 2 * lag["warm"] < lag["cold"], lag
    # and whichever it is, the run keeps weights at least as good as the raw ones
    assert cold.best.val_nme <= cold.best.raw_val_nme and cold.best.weights == "raw"


def test_loss_plot_names_the_averaged_curves_and_counts_whole_epochs():
    from fkd_core.plots import loss_curve_figure

    fig = loss_curve_figure(
        [1, 2, 3], [0.3, 0.2, 0.1], [0.4, 0.3, 0.2], [0.5, 0.4, 0.3], averaged="EMA 0.998", raw_val_nme=[0.4] * 3
    )
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert len(legends) == 1  # one legend: two on the twin axes covered each other
    labels = [t.get_text() for t in legends[0].get_texts()]
    assert "validation MSE (EMA 0.998 weights)" in labels and "validation NME (EMA 0.998 weights)" in labels
    assert "train MSE (raw weights)" in labels and "validation NME (raw weights)" in labels
    fig.canvas.draw()
    ticks = [t for t in fig.axes[0].get_xticks() if 1 <= t <= 3]
    assert ticks and all(float(t).is_integer() for t in ticks)
    plain = loss_curve_figure([1, 2], [0.3, 0.2], [0.4, 0.3])
    assert [t.get_text() for t in plain.axes[0].get_legend().get_texts()] == ["train MSE", "validation MSE"]
    # the legend sits outside the plotting area, over no curve, and inside the picture
    for f in (fig, plain):
        f.canvas.draw()
        (legend,) = [ax.get_legend() for ax in f.axes if ax.get_legend()]
        box, area = legend.get_window_extent(), f.axes[0].get_window_extent()
        assert not box.overlaps(area) and box.y0 >= 0, (box, area)


def test_a_run_starts_from_the_weights_its_recipe_names():
    """Fine-tuning starts from init's weights (its refining stage for a refining run), a new refining stage from its
    first stage's weights (a copy, so the first stage is never trained by accident), a new first stage fresh."""
    from fkd_core.checkpoint import LoadedModel
    from fkd_core.detect import DetectorConfig
    from fkd_core.errors import UserError
    from fkd_core.geometry import CropPolicy
    from fkd_core.model import NaimishNet, NaimishNetConfig
    from fkd_core.train import start_model

    def loaded(refine: bool = False, size: int = 96) -> LoadedModel:
        cfg = NaimishNetConfig(input_size=size)
        two = NaimishNet(cfg) if refine else None
        return LoadedModel.of(NaimishNet(cfg), two, policy=CropPolicy(), detector=DetectorConfig(), model_id="m-0")

    first, init, pair = loaded(), loaded(), loaded(refine=True)
    assert start_model(None, None, 96) is None
    assert start_model(init, None, 96) is init.model
    assert start_model(pair, first, 96) is pair.refine
    assert start_model(init, first, 96) is init.model
    copied = start_model(None, first, 96)
    assert copied is not first.model
    for a, b in zip(copied.state_dict().values(), first.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(UserError, match="input_size 64"):
        start_model(loaded(size=64), None, 96)


@pytest.mark.parametrize("schedule,ema_decay", [("cosine", 0.9), ("plateau", 0.0)])
def test_a_run_resumed_from_any_epochs_state_ends_bit_for_bit_as_an_uninterrupted_one(schedule, ema_decay):
    """Weights, optimiser, average, schedule, early stopping and every random generator (the augmentation's and
    dropout's) are in the state: a resumed run is the same run. The state loads without pickled code."""
    threads = torch.get_num_threads()
    try:
        _resume_and_compare(schedule, ema_decay)
    finally:
        torch.set_num_threads(threads)  # later tests in this process keep every core


def _resume_and_compare(schedule: str, ema_decay: float) -> None:
    import io

    crops, kp = _toy()
    val = (crops[:8], kp[:8])
    augment = AugmentConfig(shift=0.05, rotate_deg=10.0)  # the augmentation draws from the generator too
    params = FitConfig(epochs=4, batch_size=8, patience=5, seed=11, schedule=schedule, ema_decay=ema_decay,
                       augment=augment)  # fmt: skip
    torch.set_num_threads(1)
    states: list[bytes] = []

    def keep(state: dict) -> None:
        buf = io.BytesIO()
        torch.save(state, buf)
        states.append(buf.getvalue())

    whole, h_whole = fit((crops, kp), val, params=params, inner=1 / 1.5, on_state=keep)
    assert len(states) == 4
    for stopped_after in (1, 3):
        state = torch.load(io.BytesIO(states[stopped_after - 1]), weights_only=True)
        resumed, h_res = fit((crops, kp), val, params=params, inner=1 / 1.5, resume=state)
        for a, b in zip(whole.state_dict().values(), resumed.state_dict().values(), strict=True):
            assert torch.equal(a, b)
        same = ("epoch", "train_mse", "val_mse", "val_nme", "lr", "weights")
        assert [[getattr(e, k) for k in same] for e in h_res.epochs] == [
            [getattr(e, k) for k in same] for e in h_whole.epochs
        ]
        assert h_res.best_epoch == h_whole.best_epoch
    other = FitConfig(**{**params.__dict__, "seed": 12})
    with pytest.raises(ValueError, match="another run"):
        fit((crops, kp), val, params=other, inner=1 / 1.5, resume=torch.load(io.BytesIO(states[0]), weights_only=True))
