"""Activation checkpointing (`PerceiverConfig.checkpoint_activations`) changes memory and time, never the
function: losses and gradients are bit-identical with and without it, on the fast kernels and on the
textbook code, with dropout on (torch.utils.checkpoint replays the random state of the forward)."""
import pytest
import torch

from percnb import PerceiverMLM, mlm_config
from percnb.config import PerceiverConfig
from percnb.models import Perceiver

torch.set_num_threads(1)


def loss_and_grads(config: PerceiverConfig, fast: bool, inputs: torch.Tensor):
    model = Perceiver(config, fast=fast).train()
    torch.manual_seed(1)                                        # the same dropout masks for both runs
    loss = (model(inputs) * torch.linspace(-1, 1, config.n_classes)).sum()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "textbook"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_checkpointing_gives_identical_losses_and_gradients(fast, dropout):
    config = PerceiverConfig(input_len=32, num_layers=3, dropout=dropout)
    inputs = torch.randn(3, 32, 8, generator=torch.Generator().manual_seed(0))
    loss, grads = loss_and_grads(config, fast, inputs)
    loss_ck, grads_ck = loss_and_grads(config.replace(checkpoint_activations=True), fast, inputs)
    # exact: the same kernels run on the same values in the same order, once more in backward
    assert torch.equal(loss, loss_ck)
    assert grads.keys() == grads_ck.keys() and len(grads) > 10
    for name in grads:
        assert torch.equal(grads[name], grads_ck[name]), name


def test_checkpointing_keeps_only_block_inputs_for_backward():
    config = PerceiverConfig(input_len=32, latent_len=8, latent_dim=32, ffw_latent=128, num_layers=4)
    inputs = torch.randn(2, 32, 8)

    def saved_elements(model):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(inputs).sum().backward()
        return total

    plain = saved_elements(Perceiver(config))
    checkpointed = saved_elements(Perceiver(config.replace(checkpoint_activations=True)))
    assert checkpointed < plain / 2, (checkpointed, plain)


def test_checkpointing_survives_save_and_load(tmp_path):
    config = mlm_config(16, 32, num_layers=2, checkpoint_activations=True)
    model = PerceiverMLM(config)
    model.save(tmp_path / "m.pt")
    loaded = PerceiverMLM.load(tmp_path / "m.pt")
    assert loaded.config.checkpoint_activations and all(b.checkpoint for b in loaded.processors)
    tokens = torch.randint(0, 32, (2, 16))
    assert torch.equal(loaded(tokens), model.eval()(tokens))


def test_attention_maps_are_returned_with_checkpointing_on():
    model = Perceiver(PerceiverConfig(checkpoint_activations=True)).train()
    logits, maps = model(torch.randn(2, 64, 8), return_attentions=True)
    assert len(maps) == 4 and all(m is not None for m in maps)
    logits.sum().backward()


def test_checkpoint_activations_must_be_a_bool():
    with pytest.raises(ValueError, match="checkpoint_activations must be True or False"):
        PerceiverConfig(checkpoint_activations=1)
