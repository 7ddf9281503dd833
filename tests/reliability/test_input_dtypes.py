"""Input dtypes the models take: float64 raw inputs and images are cast to the weights' dtype, integer
token ids of up to 32 bits are range-checked and read as torch.long; what cannot be read so (uint8
images, uint64 or float ids) is a TypeError naming the argument, what was expected and what came."""
import pytest
import torch

from percnb.config import PerceiverConfig, image_config, mlm_config
from percnb.models import Perceiver, PerceiverImage, PerceiverMLM


def raw_model() -> Perceiver:
    return Perceiver(PerceiverConfig(input_len=8, input_dim=4, latent_len=2, latent_dim=8, output_dim=8,
                                     ffw_latent=8, ffw_output=8, num_heads=2, num_layers=1), fast=False).eval()


def image_model() -> PerceiverImage:
    return PerceiverImage(image_config(1, 4, 4, 3, input_dim=8, latent_dim=8, output_dim=8, num_heads=2,
                                       latent_len=2, ffw_latent=8, ffw_output=8, num_layers=1)).eval()


def token_model() -> PerceiverMLM:
    return PerceiverMLM(mlm_config(8, 300, input_dim=8, latent_dim=8, output_dim=8, num_heads=2, cross_heads=1,
                                   ffw_latent=8, ffw_output=8, num_layers=1)).eval()


def test_float64_raw_inputs_are_read_in_the_weights_dtype():
    model, x = raw_model(), torch.randn(2, 8, 4, dtype=torch.float64)
    out = model(x)
    assert out.dtype == torch.float32 and torch.equal(out, model(x.float()))


def test_float64_images_are_read_in_the_weights_dtype():
    model, images = image_model(), torch.rand(2, 1, 4, 4, dtype=torch.float64)
    assert torch.equal(model(images), model(images.float()))


def test_a_float64_model_reads_float32_inputs_in_float64():
    model, x = raw_model().double(), torch.randn(2, 8, 4)
    assert model(x).dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32, torch.uint16, torch.uint32])
def test_integer_token_ids_of_any_width_up_to_32_bits_are_read_as_long(dtype):
    model, ids = token_model(), torch.randint(0, 100, (2, 8))
    assert torch.equal(model(ids.to(dtype)), model(ids))


def test_token_ids_out_of_range_are_refused_after_the_cast():
    with pytest.raises(ValueError, match=r"token ids must be in \[0, input_num_tokens=300\), got min 400"):
        token_model()(torch.full((2, 8), 400, dtype=torch.uint32))


@pytest.mark.parametrize("dtype", [torch.uint64, torch.float32, torch.bool])
def test_token_ids_that_are_not_ids_are_a_type_error(dtype):
    with pytest.raises(TypeError, match=rf"input_type='tokens' needs integer token ids .*got input_array of dtype "
                                        rf"{dtype}"):
        token_model()(torch.ones(2, 8).to(dtype))


def test_uint8_images_are_a_type_error_saying_how_to_convert():
    images = (torch.rand(2, 1, 4, 4) * 255).to(torch.uint8)
    with pytest.raises(TypeError, match=r"images must be floating point .* got images of dtype torch.uint8; "
                                        r"convert with images.float\(\) / 255"):
        image_model()(images)
