"""rlhf.models.linear: oneDNN's float32 linear gives nn.Linear's values and gradients, and falls back elsewhere."""

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from rlhf.models import apply_lora, linear
from rlhf.models.linear import OneDNNLinear, full_width_avx512_amd, onednn_available, use_onednn_linear

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")


@pytest.fixture
def every_size(monkeypatch):
    """oneDNN for products of any size (by default only from MIN_MACS multiply-adds up), so small layers test it."""
    monkeypatch.setattr(linear, "MIN_MACS", 0)


def pair(bias: bool, seed: int = 0) -> tuple[nn.Linear, OneDNNLinear]:
    torch.manual_seed(seed)
    plain = nn.Linear(48, 80, bias=bias)
    fast = OneDNNLinear(48, 80, bias=bias)
    fast.load_state_dict(plain.state_dict())
    return plain, fast


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(7, 48), (3, 5, 48)])
@pytest.mark.parametrize("transposed_input", [False, True])
def test_values_and_gradients_match_nn_linear(bias, shape, transposed_input, every_size):
    plain, fast = pair(bias)
    x = torch.randn(*shape[:-1][::-1], 48).transpose(0, -2) if transposed_input and len(shape) == 3 \
        else torch.randn(*shape)
    grads = {}
    for name, layer in (("plain", plain), ("fast", fast)):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads[name] = out.detach(), xi.grad, [p.grad for p in layer.parameters()]
    (out_a, gx_a, gp_a), (out_b, gx_b, gp_b) = grads["plain"], grads["fast"]
    assert out_b.shape == out_a.shape and torch.allclose(out_b, out_a, atol=1e-5, rtol=1e-5)
    assert torch.allclose(gx_b, gx_a, atol=1e-5, rtol=1e-5)
    for a, b in zip(gp_a, gp_b):
        assert torch.allclose(b, a, atol=1e-5, rtol=1e-5), (a - b).abs().max()


def test_the_oneDNN_kernel_runs_forward_and_backward(monkeypatch, every_size):
    """The float32 CPU path is oneDNN's op, in the forward and in both backward products."""
    calls = []
    op = torch.ops.mkldnn._linear_pointwise

    def spy(x, w, *args):
        calls.append((tuple(x.shape), tuple(w.shape)))
        return op(x, w, *args)

    monkeypatch.setattr("rlhf.models.linear.onednn_linear", lambda x, w, b=None: spy(x, w, b, "none", [], ""))
    _, fast = pair(bias=True)
    fast(torch.randn(6, 48, requires_grad=True)).sum().backward()
    assert calls == [((6, 48), (80, 48)), ((6, 80), (48, 80)), ((80, 6), (48, 6))]
    calls.clear()
    with torch.no_grad():
        fast(torch.randn(6, 48))
    assert calls == [((6, 48), (80, 48))]


def test_small_products_stay_with_torch_and_large_ones_go_to_onednn(monkeypatch):
    calls = []
    op = linear.onednn_linear
    monkeypatch.setattr(linear, "onednn_linear", lambda *a: calls.append(a[0].shape) or op(*a))
    layer = OneDNNLinear(64, 256)
    rows = linear.MIN_MACS // (64 * 256)  # the smallest batch that reaches MIN_MACS
    with torch.no_grad():
        layer(torch.randn(rows - 1, 64))
        assert calls == []
        layer(torch.randn(rows, 64))
    assert calls == [(rows, 64)]


def test_falls_back_to_nn_linear_under_autocast_and_for_other_dtypes(monkeypatch, every_size):
    monkeypatch.setattr("rlhf.models.linear.onednn_linear", lambda *a: pytest.fail("oneDNN path taken"))
    _, fast = pair(bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(torch.randn(4, 48)).dtype == torch.bfloat16  # autocast's bf16 matmul, as nn.Linear's
    assert fast.double()(torch.randn(4, 48, dtype=torch.float64)).dtype == torch.float64
    assert fast.float()(torch.randn(0, 48)).shape == (0, 80)


def tiny_lm(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


CPUINFO = "processor\t: 0\nvendor_id\t: {vendor}\ncpu family\t: {family}\nmodel\t\t: {model}\n"


@pytest.mark.parametrize("vendor, family, model, pays", [
    ("AuthenticAMD", 26, 2, True),  # Zen 5: full-width AVX-512
    ("AuthenticAMD", 25, 17, False),  # Zen 4: AVX-512 on 256-bit halves, MKL as fast
    ("GenuineIntel", 6, 143, False),  # MKL runs its own AVX-512 code
])
def test_onednn_is_chosen_on_full_width_avx512_amd_cpus_only(vendor, family, model, pays):
    assert full_width_avx512_amd(CPUINFO.format(vendor=vendor, family=family, model=model)) is pays
    assert not full_width_avx512_amd("")


@pytest.mark.skipif(not onednn_available(), reason="the switch applies where torch runs AVX-512 code")
@pytest.mark.parametrize("peft", [False, True])
def test_a_switched_model_trains_as_before_and_saves_the_same_checkpoint(peft, tmp_path, every_size, monkeypatch):
    monkeypatch.setattr(linear, "onednn_pays", lambda: True)  # on any AVX-512 CPU, where it pays or not
    ids = torch.randint(3, 40, (4, 9), generator=torch.Generator().manual_seed(1))
    results = []
    for switch in (False, True):
        model = tiny_lm()
        if peft:
            model = apply_lora(model, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        if switch:
            model = use_onednn_linear(model)
            linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
            assert linears and all(type(m) is OneDNNLinear for m in linears)  # LoRA's A and B too
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        for _ in range(3):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
        results.append((loss.item(), {k: v.clone() for k, v in model.state_dict().items()}))
    (loss_a, state_a), (loss_b, state_b) = results
    assert abs(loss_a - loss_b) < 1e-5
    assert state_a.keys() == state_b.keys()
    for k in state_a:
        assert torch.allclose(state_a[k], state_b[k], atol=1e-5), k
    if not peft:
        model.save_pretrained(tmp_path)
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path)
        assert all(type(m) is nn.Linear for m in reloaded.modules() if isinstance(m, nn.Linear))
        assert torch.allclose(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-6)
