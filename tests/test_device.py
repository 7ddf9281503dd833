"""percnb.device picks CUDA when torch sees a GPU and the CPU otherwise, for fit, evaluate and the
notebooks; bfloat16 autocast (`fit(amp=True)`) stays close to float32. No GPU here: the CUDA answers
are checked with torch.cuda's queries monkeypatched, and autocast's numerics on the CPU."""
import pytest
import torch

from percnb.device import autocast, default_device, describe, resolve_device
from percnb.models import Perceiver, PerceiverConfig, PerceiverMLM
from percnb.train import evaluate, fit, masked_lm_step


def fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    """Make torch.cuda report `count` GPUs named 'Fake T4' (nothing touches a real device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake T4")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16)


def small_model() -> Perceiver:
    return Perceiver(PerceiverConfig(input_len=32, input_dim=16, latent_len=8, latent_dim=32, num_heads=2,
                                     num_layers=2, n_classes=5, seed=0))


def test_the_default_device_is_the_cpu_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert default_device() == torch.device("cpu") == resolve_device(None)


@pytest.mark.parametrize("count", [1, 2])
def test_the_default_device_is_the_first_gpu_when_there_is_one(monkeypatch, count):
    fake_gpus(monkeypatch, count)
    assert default_device() == torch.device("cuda", 0) == resolve_device(None)


def test_a_gpu_that_is_not_there_is_refused_by_name(monkeypatch):
    fake_gpus(monkeypatch, 0)
    with pytest.raises(ValueError, match="asks for CUDA device 0, but this machine has 0"):
        resolve_device("cuda")
    fake_gpus(monkeypatch, 1)
    assert resolve_device("cuda") == torch.device("cuda")
    with pytest.raises(ValueError, match="asks for CUDA device 1, but this machine has 1"):
        resolve_device("cuda:1")


def test_a_malformed_device_is_an_error_naming_it():
    with pytest.raises(ValueError, match="device='gpu'"):
        resolve_device("gpu")
    with pytest.raises(TypeError, match="device must be None, a string"):
        resolve_device(0)


def test_describe_names_the_gpu_and_how_many_there_are(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert describe() == "cuda:0 (Fake T4), 2 CUDA devices"
    assert describe(torch.device("cpu")).startswith("cpu (")


def test_fit_trains_on_the_gpu_when_torch_reports_one(monkeypatch):
    # torch.cuda says yes, but there is no driver: the move to cuda:0 fails, which shows fit chose it;
    # the model is handed back where it was.
    fake_gpus(monkeypatch, 1)
    model = small_model()
    asked = []
    original_to = torch.nn.Module.to

    def recording_to(self, *args, **kwargs):
        asked.append(torch.device(args[0]) if args else kwargs.get("device"))
        return original_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", recording_to)
    with pytest.raises((RuntimeError, AssertionError)):
        fit(model, (torch.randn(8, 32, 16), torch.randint(0, 5, (8,))), steps=1, batch_size=4, progress=False)
    assert asked[0] == torch.device("cuda", 0)
    assert asked[-1] == torch.device("cpu")                 # handed back home
    assert all(p.device.type == "cpu" for p in model.parameters())


def test_fit_refuses_a_gpu_the_machine_does_not_have_before_training(monkeypatch):
    fake_gpus(monkeypatch, 0)
    model = small_model()
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="this machine has 0 CUDA device"):
        fit(model, (torch.randn(8, 32, 16), torch.randint(0, 5, (8,))), steps=1, batch_size=4, progress=False,
            device="cuda")
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_amp_on_a_gpu_without_bfloat16_is_refused(monkeypatch):
    fake_gpus(monkeypatch, 1, bf16=False)
    with pytest.raises(ValueError, match="Fake T4 does not support"):
        autocast(torch.device("cuda"), True)
    with pytest.raises(ValueError, match="amp must be True or False"):
        fit(small_model(), (torch.randn(8, 32, 16), torch.randint(0, 5, (8,))), steps=1, amp="yes", progress=False)


def test_bf16_autocast_logits_stay_within_bf16_rounding_of_float32():
    model, x = small_model().eval(), torch.randn(4, 32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(x)
        with autocast(torch.device("cpu")):
            mixed = model(x)
    assert mixed.dtype == torch.bfloat16
    # bfloat16 keeps 8 significant bits (relative rounding 2**-8 = 0.4% per product); through two
    # cross-attentions and two latent blocks that compounds to a few percent of the logits' scale.
    assert (mixed.float() - exact).abs().max() <= 0.05 * exact.abs().max()


def test_bf16_autocast_keeps_the_shipped_mlm_score():
    from percnb.data.text import ByteMasker, load_text_splits, masked_eval_set
    model = PerceiverMLM.from_pretrained("bytes-mlm")
    data = masked_eval_set(load_text_splits().test, 128, ByteMasker(), seed=1, max_windows=32)
    exact = evaluate(model, data, step_fn=masked_lm_step)
    mixed = evaluate(model, data, step_fn=masked_lm_step, amp=True)
    # ~600 scored bytes: a flipped near-tie moves accuracy by 1/600; bf16 flips a handful at most.
    assert abs(mixed["accuracy"] - exact["accuracy"]) < 0.02
    assert abs(mixed["loss"] - exact["loss"]) < 0.01 * exact["loss"]


def test_fit_with_amp_keeps_float32_weights_and_follows_float32_training():
    inputs = torch.randn(64, 32, 16, generator=torch.Generator().manual_seed(1))
    data = (inputs, inputs[:, :, :5].mean(1).argmax(-1))
    runs = {}
    for amp in (False, True):
        model = small_model()
        history = fit(model, data, steps=8, batch_size=16, lr=1e-2, schedule="constant", warmup=0, progress=False,
                      amp=amp, device="cpu")
        assert all(p.dtype == torch.float32 for p in model.parameters())
        runs[amp] = history.loss
    # Same seed, same batches: bfloat16 rounding of the forward pass moves each step's loss by about
    # 0.1% here (measured); 1% leaves room for another CPU's kernels.
    for step, (mixed, exact) in enumerate(zip(runs[True], runs[False])):
        assert abs(mixed - exact) <= 0.01 * exact, (step, mixed, exact)


def test_a_model_already_on_a_gpu_trains_where_it_is(monkeypatch):
    from percnb.train import _run_device
    fake_gpus(monkeypatch, 2)
    assert _run_device(None, torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert _run_device(None, torch.device("cpu")) == torch.device("cuda", 0)      # a CPU model goes to the GPU
    assert _run_device("cpu", torch.device("cuda", 1)) == torch.device("cpu")     # an explicit device wins
