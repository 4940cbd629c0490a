"""The additive forward of SoRA and SNELL (``delta_in_place=False``) with a base of another dtype."""

import pytest
import torch
from peft import get_peft_model

from peft_sparse import SnellConfig, SoraConfig
from peft_sparse.tuners.snell import SnellLinear
from peft_sparse.tuners.sora import SoraLinear
from tests.conftest import make_tiny_llama
from tests.test_registration import randomize_adapter


@pytest.mark.parametrize(
    "config, layer_type",
    [(SoraConfig(r=4, gate_init="randn"), SoraLinear), (SnellConfig(r=4, sparsity=0.5, delta_in_place=False), SnellLinear)],
    ids=["sora", "snell"],
)
def test_bf16_base_with_fp32_adapter_returns_bf16_close_to_fp32(config, layer_type):
    model = get_peft_model(make_tiny_llama(), config)
    randomize_adapter(model)
    layer = next(module for module in model.modules() if isinstance(module, layer_type))
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = layer(x)
        adapter_part = expected - layer.base_layer(x)
        layer.base_layer.to(torch.bfloat16)  # the adapter stays in float32, as peft's autocast leaves it
        output = layer(x.to(torch.bfloat16))
    assert output.dtype == torch.bfloat16
    assert adapter_part.abs().max() > 0.1  # the adapter's share is large enough to be checked
    torch.testing.assert_close(output.float(), expected, rtol=2e-2, atol=3e-2)
