"""percnb.train.fit / evaluate refuse what would wreck the weights or hang, and clean up when they raise."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset

from percnb.models import Perceiver, PerceiverConfig
from percnb.train import evaluate, fit

torch.set_num_threads(1)


def toy_problem(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).long()
    return x, y


def toy_model():
    return Perceiver(PerceiverConfig(input_len=6, input_dim=3, latent_len=4, latent_dim=16, output_dim=16,
                                     ffw_latent=32, ffw_output=32, num_heads=2, num_layers=1, n_classes=2,
                                     pos_encoding="none", seed=0))


def weights(model):
    return [p.detach().clone() for p in model.parameters()]


def unchanged(model, before):
    return all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


@pytest.mark.parametrize("kwargs, name", [
    (dict(grad_clip=-1.0), "grad_clip"), (dict(grad_clip=0.0), "grad_clip"), (dict(grad_clip=math.nan), "grad_clip"),
    (dict(grad_clip=math.inf), "grad_clip"),
    (dict(lr=math.inf), "lr"), (dict(lr=math.nan), "lr"), (dict(lr=0.0), "lr"), (dict(lr=-1e-3), "lr"),
    (dict(weight_decay=math.nan), "weight_decay"), (dict(weight_decay=math.inf), "weight_decay"),
    (dict(weight_decay=-0.01), "weight_decay"),
    (dict(label_smoothing=1.0), "label_smoothing"), (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(label_smoothing=math.nan), "label_smoothing"),
    (dict(warmup=math.nan), "warmup"), (dict(warmup=2.5), "warmup"), (dict(warmup=-1), "warmup"),
    (dict(warmup=-0.5), "warmup"), (dict(warmup="10%"), "warmup"),
    (dict(eval_every=0), "eval_every"), (dict(eval_every=-5), "eval_every"), (dict(eval_every=2.0), "eval_every"),
    (dict(max_seconds=0), "max_seconds"), (dict(max_seconds=-1.0), "max_seconds"),
    (dict(max_seconds=math.nan), "max_seconds"),
    (dict(batch_size=0), "batch_size"), (dict(batch_size=True), "batch_size"),
    (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=2 ** 64), "seed"),
    (dict(augment="shift"), "augment"), (dict(callback=3), "callback"), (dict(step_fn=0), "step_fn"),
    (dict(lr="1e-3"), "lr"),
])
def test_fit_refuses_a_bad_setting_before_any_step(kwargs, name):
    model = toy_model()
    before = weights(model)
    settings = dict(steps=4, batch_size=16, progress=False)
    settings.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=rf"\b{name}\b"):
        fit(model, toy_problem(), **settings)
    assert unchanged(model, before)


def test_valid_edge_settings_still_train():
    # The boundaries that stay legal: no weight decay, no warm-up, an integral float warm-up, seed 0.
    history = fit(toy_model(), toy_problem(), steps=3, batch_size=16, weight_decay=0.0, warmup=0, seed=0,
                  progress=False)
    assert len(history.loss) == 3
    history = fit(toy_model(), toy_problem(), steps=3, batch_size=16, warmup=2.0, seed=2 ** 64 - 1,
                  label_smoothing=0.5, grad_clip=1e-3, max_seconds=1e9, progress=False)
    assert len(history.loss) == 3


@pytest.mark.parametrize("kwargs, name", [(dict(batch_size=0), "batch_size"), (dict(step_fn="ce"), "step_fn")])
def test_evaluate_refuses_a_bad_setting(kwargs, name):
    with pytest.raises((ValueError, TypeError), match=rf"{name} must be"):
        evaluate(toy_model(), toy_problem(), **kwargs)


def _step_with_infinite_gradient(parameter_name):
    """Cross-entropy plus sqrt(p.sum() - p.sum().detach()): adds exactly 0 to the loss, but its derivative
    at 0 is infinite, so `parameter_name` gets an inf gradient under a finite loss."""
    def step_fn(model, batch):
        parameter = dict(model.named_parameters())[parameter_name]
        logits = model(batch[0])
        loss = F.cross_entropy(logits, batch[1]) + (parameter.sum() - parameter.sum().detach()).sqrt()
        return loss, 0, len(batch[1])
    return step_fn


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_a_finite_loss_with_a_nonfinite_gradient_is_not_applied(grad_clip):
    model = toy_model()
    name = [n for n, _ in model.named_parameters()][-1]
    before = weights(model)
    with pytest.raises(FloatingPointError, match=rf"gradient of {name} holds NaN or inf at step 0.*not applied"):
        fit(model, toy_problem(), steps=3, batch_size=16, grad_clip=grad_clip,
            step_fn=_step_with_infinite_gradient(name), progress=False)
    assert unchanged(model, before)


def test_the_first_parameter_with_a_nonfinite_gradient_is_named():
    model = toy_model()
    names = [n for n, _ in model.named_parameters()]

    def step_fn(m, batch):
        a, b = (dict(m.named_parameters())[n] for n in (names[1], names[-1]))
        loss = F.cross_entropy(m(batch[0]), batch[1])
        loss = loss + (a.sum() - a.sum().detach()).sqrt() + (b.sum() - b.sum().detach()).sqrt()
        return loss, 0, len(batch[1])

    with pytest.raises(FloatingPointError, match=rf"gradient of {names[1]} holds"):
        fit(model, toy_problem(), steps=1, batch_size=16, step_fn=step_fn, progress=False)


class OneShot(IterableDataset):
    """An iterable with a len() that is used up after its first pass (one shared iterator)."""

    def __init__(self, x, y):
        self.items, self.passes = iter(list(zip(x, y))), 0
        self.length = len(x)

    def __len__(self):
        return self.length

    def __iter__(self):
        self.passes += 1
        if self.passes > 50:                      # before the fix fit asked forever; fail instead of hanging
            raise AssertionError("fit kept asking an exhausted iterable for another pass")
        return self.items


def test_a_loader_used_up_after_one_pass_raises_instead_of_looping_forever():
    x, y = toy_problem(32)
    data = OneShot(x, y)
    with pytest.raises(ValueError, match=r"yielded no batch on pass 2 .* len\(\) is 2"):
        fit(toy_model(), DataLoader(data, batch_size=16), steps=10, progress=False)
    assert data.passes == 2


def test_an_empty_val_data_is_refused_before_the_first_step():
    x, y = toy_problem()
    steps = []
    with pytest.raises(ValueError, match="val_data is empty"):
        fit(toy_model(), (x, y), val_data=(x[:0], y[:0]), steps=8, batch_size=16, eval_every=4,
            callback=lambda step, history: steps.append(step), progress=False)
    assert steps == []


def test_an_ill_typed_val_data_is_refused_before_the_first_step():
    steps = []
    with pytest.raises(TypeError, match="val_data must be a Dataset"):
        fit(toy_model(), toy_problem(), val_data=[1, 2], steps=8, batch_size=16, eval_every=4,
            callback=lambda step, history: steps.append(step), progress=False)
    assert steps == []


def _raise_on_call(n, error):
    calls = []

    def step_fn(model, batch):
        calls.append(1)
        if len(calls) == n:
            raise error
        return F.cross_entropy(model(batch[0]), batch[1]), 0, len(batch[1])
    return step_fn


@pytest.mark.parametrize("error", [RuntimeError("broken batch"), KeyboardInterrupt()])
@pytest.mark.parametrize("training", [False, True])
def test_fit_gives_the_model_its_mode_back_when_it_raises(error, training):
    model = toy_model().train(training)
    with pytest.raises(type(error)):
        fit(model, toy_problem(), steps=5, batch_size=16, step_fn=_raise_on_call(3, error), progress=False)
    assert all(m.training == training for m in model.modules())


def test_fit_restores_a_frozen_submodule_mode_after_an_exception():
    model = toy_model().train()
    frozen = next(m for m in model.modules() if isinstance(m, torch.nn.LayerNorm))
    frozen.eval()
    modes = {m: m.training for m in model.modules()}
    with pytest.raises(RuntimeError):
        fit(model, toy_problem(), steps=5, batch_size=16, step_fn=_raise_on_call(2, RuntimeError()), progress=False)
    assert {m: m.training for m in model.modules()} == modes


def test_evaluate_gives_the_model_its_mode_back_when_a_step_raises():
    model = toy_model().train()
    with pytest.raises(RuntimeError):
        evaluate(model, toy_problem(), batch_size=16, step_fn=_raise_on_call(2, RuntimeError()))
    assert model.training


def test_fit_closes_its_progress_bar_when_it_raises(monkeypatch):
    import tqdm.auto
    bars = []

    class RecordingBar(tqdm.auto.tqdm):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **{**kwargs, "disable": True})
            self.closed_by_fit = False
            bars.append(self)

        def close(self):
            self.closed_by_fit = True
            super().close()

    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    with pytest.raises(KeyboardInterrupt):
        fit(toy_model(), toy_problem(), steps=5, batch_size=16, step_fn=_raise_on_call(2, KeyboardInterrupt()))
    assert len(bars) == 1 and bars[0].closed_by_fit
