"""percnb.train: the one training loop (fit / evaluate)."""
import pytest
import torch

from percnb.models import Perceiver, PerceiverConfig
from percnb.train import evaluate, fit

torch.set_num_threads(1)



def toy_problem(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, 3, generator=g)
    y = (torch.rand(n, generator=g) > 0.5).long()
    x[:, :, 0] += (2 * y - 1)[:, None] * 0.7   # one channel only: LayerNorm would erase a uniform shift
    return x, y


def toy_model():
    return Perceiver(PerceiverConfig(input_len=6, input_dim=3, latent_len=4, latent_dim=16, output_dim=16,
                                     ffw_latent=32, ffw_output=32, num_heads=2, num_layers=1, n_classes=2,
                                     pos_encoding="none", seed=0))


def test_fit_is_deterministic_for_a_seed():
    data = toy_problem()
    a = fit(toy_model(), data, steps=15, batch_size=16, progress=False, seed=3)
    b = fit(toy_model(), data, steps=15, batch_size=16, progress=False, seed=3)
    assert a.loss == b.loss


def test_fit_learns_a_simple_rule():
    x, y = toy_problem(256)
    model = toy_model()
    history = fit(model, (x[:192], y[:192]), val_data=(x[192:], y[192:]), epochs=15, batch_size=32,
                  lr=3e-3, progress=False)
    assert history.val_accuracy[-1] >= 0.85, history.val_accuracy
    assert sum(history.loss[-10:]) < sum(history.loss[:10])
    assert evaluate(model, (x[192:], y[192:]))["accuracy"] == pytest.approx(history.val_accuracy[-1])


def test_custom_step_fn_counts_what_it_says():
    def step_fn(model, batch):
        logits = model(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return loss, 0, 2 * len(batch[1])
    metrics = evaluate(toy_model(), toy_problem(10), step_fn=step_fn)
    assert metrics["accuracy"] == 0.0 and metrics["loss"] > 0


def test_onecycle_schedule_warms_up_then_anneals():
    history = fit(toy_model(), toy_problem(), steps=20, batch_size=16, lr=1e-2, warmup=5, progress=False)
    peak = max(history.lr)
    assert history.lr.index(peak) == 5 and history.lr[0] == pytest.approx(peak / 25) and history.lr[-1] < peak / 10


def test_max_seconds_stops_early():
    history = fit(toy_model(), toy_problem(), steps=10_000, batch_size=16, max_seconds=0.5, progress=False)
    assert len(history.loss) < 10_000


@pytest.mark.parametrize("kwargs, message", [
    (dict(), "give exactly one of epochs or steps"),
    (dict(steps=5, schedule="linear"), "schedule must be one of"),
    (dict(steps=0), "steps must be an int >= 1"),
    (dict(steps=5, warmup=50), "warmup must be a fraction"),
])
def test_fit_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        fit(toy_model(), toy_problem(), progress=False, **kwargs)


def test_fit_rejects_mismatched_tensors():
    with pytest.raises(ValueError, match="must share their first"):
        fit(toy_model(), (torch.randn(5, 6, 3), torch.zeros(4).long()), steps=1, progress=False)


def test_fit_trains_through_a_custom_step_fn():
    calls = []

    def step_fn(model, batch):
        calls.append(len(batch[0]))
        logits = model(batch[0])
        loss = torch.nn.functional.cross_entropy(logits, batch[1])
        return loss, len(batch[1]), 2 * len(batch[1])          # "half right", whatever the model does

    data = toy_problem(64)
    history = fit(toy_model(), data, val_data=data, steps=6, batch_size=16, step_fn=step_fn, progress=False)
    assert calls[:4] == [16, 16, 16, 16] and len(calls) > 6          # train steps, then validation
    assert history.train_accuracy == [0.5] * 6 and history.val_accuracy == [0.5, 0.5]   # epoch end, end


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_cosine_and_constant_schedules_warm_up_linearly(schedule):
    history = fit(toy_model(), toy_problem(), steps=20, batch_size=16, lr=1e-2, warmup=4, schedule=schedule,
                  progress=False)
    assert history.lr[:4] == pytest.approx([0.0, 2.5e-3, 5e-3, 7.5e-3] if schedule == "cosine"
                                           else [2.5e-3, 5e-3, 7.5e-3, 1e-2])
    assert max(history.lr) == pytest.approx(1e-2)
    assert (history.lr[-1] < 1e-3) if schedule == "cosine" else history.lr[-1] == pytest.approx(1e-2)


def test_augment_sees_training_batches_only():
    seen = []

    def augment(batch):
        seen.append(len(batch[0]))
        return [batch[0] * 0, batch[1]]                # erase the inputs: nothing left to learn

    x, y = toy_problem(96)
    history = fit(toy_model(), (x, y), val_data=(x[:40], y[:40]), steps=3, batch_size=32, augment=augment,
                  progress=False)
    assert seen == [32, 32, 32] and len(history.val_accuracy) == 1


def test_grad_clip_bounds_the_update():
    # AdamW divides by sqrt(v) + eps (1e-8): its first step is about lr * sign(grad), unless the clipped
    # gradient is far below eps, when the step shrinks to lr * grad / eps.
    model, free = toy_model(), toy_model()
    before = [p.detach().clone() for p in model.parameters()]
    kwargs = dict(steps=1, batch_size=96, lr=1.0, schedule="constant", warmup=0, weight_decay=0.0, progress=False)
    fit(model, toy_problem(), grad_clip=1e-12, **kwargs)
    fit(free, toy_problem(), **kwargs)
    moved = max(float((p.detach() - b).abs().max()) for p, b in zip(model.parameters(), before))
    moved_free = max(float((p.detach() - b).abs().max()) for p, b in zip(free.parameters(), before))
    assert moved_free > 0.5 and moved < 1e-3


def test_label_smoothing_with_a_custom_step_fn_is_refused():
    with pytest.raises(ValueError, match="label_smoothing applies to the default"):
        fit(toy_model(), toy_problem(), steps=1, label_smoothing=0.1, step_fn=lambda m, b: None, progress=False)


def test_fit_rejects_a_non_dataset():
    with pytest.raises(TypeError, match="train_data must be a Dataset"):
        fit(toy_model(), [1, 2, 3], steps=1, progress=False)


def test_evaluate_records_no_autograd_graph():
    # a graph per batch would hold every activation of the evaluation in memory until the loss is dropped
    from percnb.train import classification_step
    seen = []

    def step(model, batch):
        loss, correct, n = classification_step(model, batch)
        seen.append(loss.requires_grad)
        return loss, correct, n

    evaluate(toy_model(), toy_problem(32), step_fn=step, batch_size=8)
    assert seen == [False] * 4
