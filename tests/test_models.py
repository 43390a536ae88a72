"""models.use_cpu_kernels: the faster CPU kernels compute what torch's own compute."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ensemble_delta import models
from ensemble_delta.config import RuntimeConfig
from ensemble_delta.engine import resolve_runtime

# (in, out, kernel, stride, padding, input size): ResNet's layer4 at 32 px, and edge cases
SHAPES = [
    (8, 6, 3, 1, 1, 1),  # 3x3 on a 1x1 map: only the centre tap meets the input
    (8, 6, 3, 2, 1, 2),  # stride 2 from 2x2 to 1x1: four taps
    (8, 6, 1, 2, 0, 2),  # the 1x1 downsample from 2x2: one tap, one input pixel
    (3, 4, 7, 2, 3, 1),  # stem-like 7x7 on a single pixel
    (5, 3, 3, 3, 0, 3),  # no padding, the window is the whole input
    (5, 3, (3, 1), (1, 2), (1, 0), (1, 2)),  # rectangular kernel and input
]


@pytest.mark.parametrize("cin,cout,k,s,p,n", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_one_pixel_output_matches_conv2d_and_its_gradients(cin, cout, k, s, p, n, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, bias=bias).double()
    win = models.use_cpu_kernels(copy.deepcopy(conv))
    hw = n if isinstance(n, tuple) else (n, n)
    x = torch.randn(4, cin, *hw, dtype=torch.float64, requires_grad=True)
    assert win._single_output_window(x.shape[-2:]) is not None  # the fast path is the one under test
    ref = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
    out = win(x)
    assert out.shape == ref.shape and ref.shape[-2:] == (1, 1)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    grads_ref = torch.autograd.grad(ref, [x, conv.weight], g)
    grads = torch.autograd.grad(out, [x, win.weight], g)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    # taps that meet only padding get an exactly zero gradient, as from the convolution itself
    assert torch.equal(grads[1] == 0, grads_ref[1] == 0)


@pytest.mark.parametrize("n", [4, 7])
def test_larger_outputs_run_the_usual_kernel(n):
    conv = nn.Conv2d(4, 4, 3, 1, 1)
    win = models.use_cpu_kernels(copy.deepcopy(conv))
    x = torch.randn(2, 4, n, n)
    assert win._single_output_window(x.shape[-2:]) is None
    assert torch.equal(win(x), conv(x))


def test_window_resnet_is_the_same_network():
    """A ResNet with window convolutions: same keys, same outputs and gradients at 32 px (layer4 is one pixel)."""
    torch.manual_seed(0)
    ref = models.build("resnet18", 1).double()
    win = models.use_cpu_kernels(copy.deepcopy(ref))
    assert list(win.state_dict()) == list(ref.state_dict())
    assert sum(isinstance(m, models.WindowConv2d) for m in win.modules()) == sum(isinstance(m, nn.Conv2d) for m in ref.modules())
    assert isinstance(win.maxpool, models.ChannelsLastMaxPool2d)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    for m in (ref, win):
        m.train()
        m(x).sum().backward()
    torch.testing.assert_close(win(x), ref(x), rtol=1e-10, atol=1e-10)
    for (name, a), b in zip(win.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("ties", [False, True])
def test_channels_last_max_pool_is_bit_identical(ties):
    """Values and gradients equal F.max_pool2d's exactly, ties included (ReLU zeros, equal integers)."""
    torch.manual_seed(1)
    x = torch.randn(6, 16, 16, 16)
    if ties:
        x = F.relu(x).round()
    pool = models.use_cpu_kernels(nn.MaxPool2d(3, 2, 1))
    assert isinstance(pool, models.ChannelsLastMaxPool2d)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    ref, out = F.max_pool2d(a, 3, 2, 1), pool(b)
    assert torch.equal(out, ref) and out.is_contiguous()
    g = torch.randn_like(ref)
    ref.backward(g)
    out.backward(g)
    assert torch.equal(b.grad, a.grad)


def test_cpu_runtime_prepares_cpu_kernels():
    rt = resolve_runtime(RuntimeConfig(device="cpu"))
    m = rt.prepare(models.build("resnet18", 1))
    assert isinstance(m.layer4[0].conv1, models.WindowConv2d)
    assert isinstance(m.maxpool, models.ChannelsLastMaxPool2d)
