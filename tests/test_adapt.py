"""AdaPT: the switching rules on hand-made histograms and gradients, the fixed-point layer, the plug-in, its errors."""
import copy
import math

import pytest
import torch
from torch import nn

from cifarpress.errors import CifarpressError, RecipeError
from cifarpress.pipeline.recipe import recipe_from_dict
from cifarpress.techniques.quantize import adapt_rules as rules
from cifarpress.techniques.quantize.adapt import AdaptQAT, bit_weighted_macs
from cifarpress.techniques.quantize.config import AdaptQuantConfig
from cifarpress.techniques.quantize.fake_quant import FakeQuantConv2d
from cifarpress.techniques.quantize.ternary import TernaryConfig, quantize_model, quantized_layers
from cifarpress.train.trainer import TrainConfig, Trainer


def grid_weights(step_bits: int, largest: float, n: int = 4000, seed: int = 0) -> torch.Tensor:
    """Weights that lie exactly on the 2^-step_bits grid, up to +-largest, in no regular pattern."""
    g = torch.Generator().manual_seed(seed)
    steps = int(largest * 2 ** step_bits)
    codes = torch.randint(-steps, steps + 1, (n,), generator=g).float()
    codes[:2] = torch.tensor([-steps, steps])
    return codes * 2.0 ** -step_bits


# -- information loss ---------------------------------------------------------------------

def test_information_loss_is_kl_of_the_histograms():
    w = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.9, 1.0])
    assert rules.information_loss(w, w.clone(), bins=4) == 0.0
    # same range, one value moved into the next bin: P = (3, 1, 0, 2)/6, Q = (2, 2, 0, 2)/6
    moved = torch.tensor([0.0, 0.1, 0.3, 0.3, 0.9, 1.0])
    p, q = torch.tensor([3, 1, 2]) / 6, torch.tensor([2, 2, 2]) / 6
    assert rules.information_loss(w, moved, bins=4) == pytest.approx(float((p * (p / q).log()).sum()))
    # a bin P fills and Q leaves empty: infinitely many nats, never "no loss"
    assert rules.information_loss(w, torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0]), bins=4) == math.inf


def test_a_loss_the_reference_formula_scores_as_none_counts_here():
    # The reference fed probabilities to KLDivLoss(log_target=True): sum exp(Q) (Q - P), which is <= 0 here.
    w = torch.tensor([0.0, 0.0, 0.0, 1.0])
    w_hat = torch.tensor([0.0, 0.0, 1.0, 1.0])
    p, q = torch.tensor([0.75, 0.25]), torch.tensor([0.5, 0.5])
    assert float((q.exp() * (q - p)).sum()) <= 0
    assert rules.information_loss(w, w_hat, bins=2) > 0


def test_clipping_is_an_information_loss():
    w = grid_weights(6, 0.5)
    assert rules.lossless(w, 16, 6, bins=50)
    assert not rules.lossless(w, 5, 6, bins=50)  # qmax 15 -> |w| <= 0.23: the tails pile up at the clip


# -- PushDown --------------------------------------------------------------------------------

def test_push_down_finds_the_narrowest_lossless_format_by_midpoint_bisection():
    w = grid_weights(5, 0.75)  # exact at FL = 5; the largest code is 0.75 * 32 = 24 -> 6 bits (qmax 31)
    assert rules.push_down(w, 16, 12, bins=64, tolerance=0.0, min_bits=2, max_bits=16, buffer_bits=0) == (6, 5)
    # The reference tested the lower bound instead of the midpoint: from FL 12 it would stop at 4 + 1.
    # With a result buffer the word keeps FL + RB bits.
    assert rules.push_down(w, 16, 12, bins=64, tolerance=0.0, min_bits=2, max_bits=16, buffer_bits=8) == (13, 5)


def test_push_down_only_lowers_and_keeps_a_lossy_format():
    w = grid_weights(10, 0.5)
    assert rules.push_down(w, 12, 6, bins=64, tolerance=0.0, min_bits=2, max_bits=16, buffer_bits=0) == (12, 6)


def test_push_down_tolerance_allows_a_coarser_step():
    w = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 0.1
    exact = rules.push_down(w, 16, 15, bins=16, tolerance=0.0, min_bits=4, max_bits=16, buffer_bits=0)
    loose = rules.push_down(w, 16, 15, bins=16, tolerance=0.003, min_bits=4, max_bits=16, buffer_bits=0)
    assert loose[1] < exact[1] and loose[0] <= 8
    assert rules.information_loss(w, rules.fixed_point(w, *loose), 16) <= 0.003


def test_sampling_floor_is_the_kl_a_histogram_shows_by_sampling_alone():
    # N uniform samples in R equal bins against the true (flat) distribution: E[KL] -> (R - 1) / 2N.
    generator = torch.Generator().manual_seed(0)
    count, bins = 4000, 50
    kls = []
    for _ in range(200):
        p = torch.histc(torch.rand(count, generator=generator, dtype=torch.float64), bins, 0, 1) / count
        filled = p > 0
        kls.append(float((p[filled] * (p[filled] * bins).log()).sum()))
    assert sum(kls) / len(kls) == pytest.approx(rules.sampling_floor(count, bins), rel=0.1)


def test_sampling_tolerance_passes_a_coarser_step_than_zero_but_scales_with_the_tensor():
    w = torch.randn(20000, generator=torch.Generator().manual_seed(2)) * 0.1
    exact = rules.push_down(w, 32, 24, bins=50, tolerance=0.0, min_bits=12, max_bits=32, buffer_bits=8)
    floor = rules.push_down(w, 32, 24, bins=50, tolerance=rules.SAMPLING, min_bits=12, max_bits=32, buffer_bits=8)
    assert floor[1] < exact[1]
    assert rules.information_loss(w, rules.fixed_point(w, *floor), 50) <= rules.sampling_floor(w.numel(), 50)
    # one step coarser than the chosen one is past the floor: the floor is a bound, not a pass for everything
    assert not rules.lossless(w, floor[0], floor[1] - 1, 50, rules.SAMPLING)
    # fewer weights, a higher floor: the same values subsampled tolerate at least as coarse a step
    small = rules.push_down(w[:500], 32, 24, bins=50, tolerance=rules.SAMPLING, min_bits=12, max_bits=32,
                            buffer_bits=8)
    assert small[1] <= floor[1]


def test_floored_tolerance_lets_a_small_tensor_past_histogram_noise_but_not_a_large_one():
    # the first conv of a CIFAR ResNet has 432 weights: at 16 bins its sampling floor, 15/864 nats, is far
    # above a fixed 0.003, and a format whose KL lies between the two is one the histogram cannot tell apart
    w = torch.randn(432, generator=torch.Generator().manual_seed(3)) * 0.3
    floor = rules.sampling_floor(432, 16)
    assert rules.tolerance_for(w, 16, 0.003, floored=True) == pytest.approx(floor)
    assert rules.tolerance_for(w, 16, 0.003) == 0.003
    start = rules.initial_format(w, 16, 0, 4)
    fixed = rules.push_down(w, *start, bins=16, tolerance=0.003, min_bits=4, max_bits=16, buffer_bits=0)
    floored = rules.push_down(w, *start, bins=16, tolerance=0.003, min_bits=4, max_bits=16, buffer_bits=0,
                              floored=True)
    assert floored[0] < fixed[0]
    assert 0.003 < rules.information_loss(w, rules.fixed_point(w, *floored), 16) <= floor
    # a large tensor's floor is under 0.003: flooring changes nothing there
    big = torch.randn(36864, generator=torch.Generator().manual_seed(3)) * 0.05
    assert rules.tolerance_for(big, 16, 0.003, floored=True) == 0.003


def test_deploy_mode_floors_its_tolerance_and_the_paper_mode_needs_no_floor():
    assert AdaptQuantConfig(mode="deploy").sampling_floor is True
    assert AdaptQuantConfig(mode="paper").sampling_floor is False
    assert AdaptQuantConfig(mode="deploy", sampling_floor=False).sampling_floor is False


def test_buffer_and_bounds():
    assert rules.enforce_buffer(10, 6, buffer_bits=8, min_bits=12, max_bits=32) == (14, 6)
    assert rules.enforce_buffer(32, 30, buffer_bits=8, min_bits=12, max_bits=32) == (32, 24)
    assert rules.enforce_buffer(6, 9, buffer_bits=0, min_bits=4, max_bits=16) == (6, 9)  # no buffer: < 1/4


# -- PushUp and the windows ------------------------------------------------------------------

def test_gradient_diversity():
    g = torch.tensor([0.6, 0.8])
    assert rules.gradient_diversity(g * 5, 5) == pytest.approx(1.0)  # all aligned
    orthogonal = torch.eye(16).sum(0)  # 16 orthogonal unit gradients
    assert rules.gradient_diversity(orthogonal, 16) == pytest.approx(4.0)
    assert rules.gradient_diversity(torch.zeros(2), 2) == math.inf  # they cancel


@pytest.mark.parametrize("strategy,expected", [("min", 1), ("mean", 11), ("max", 20)])
def test_push_up_amount_with_t_equal_to_one(strategy, expected):
    # GD = e^2 -> t = 1: s1 = ceil(1/t^2) = 1, s2 = ceil(32 t^2) - FL = 32 - 12 = 20
    assert rules.push_up_amount(math.e ** 2, 12, strategy) == expected


def test_push_up_only_when_t_is_positive():
    assert rules.push_up_amount(math.e, 12, "max") == 0  # t = 0
    assert rules.push_up_amount(1.5, 12, "max") == 0
    assert rules.push_up_amount(math.inf, 12, "max") == 0
    # t = 0.5: s1 = 4, s2 = ceil(8) - 6 = 2 -> min 2; then WL = max(WL, FL) + 1, and the buffer
    assert rules.push_up(14, 6, math.exp(1.5), "min", buffer_bits=8, min_bits=12, max_bits=32) == (16, 8)


def test_push_up_never_makes_the_format_clip():
    # at max_bits PushUp would take FL to 16 with a 16-bit word: |w| < 0.5 only; 0.7 needs FL <= 15
    word, frac = rules.push_up(16, 15, math.e ** 2, "max", buffer_bits=0, min_bits=4, max_bits=16)
    assert (word, frac) == (16, 16)
    assert rules.within_range(0.7, word, frac) == 15 and rules.within_range(0.3, 16, 16) == 16


def test_lookback_resolution_and_strategy_follow_their_signals():
    assert rules.next_lookback(1.0, 50, 25, 100, 1.0) == 100  # aligned gradients: the longest window
    assert rules.next_lookback(10.0, 50, 25, 100, 1.0) == 25  # 100 / 10 -> clamped to the shortest
    assert rules.next_lookback(2.0, 100, 25, 100, 0.5) == 75  # momentum blends 50 with 100
    assert rules.next_resolution(100, 60, 25, 100, 50, 150) == 61
    assert rules.next_resolution(25, 50, 25, 100, 50, 150) == 50
    assert rules.next_strategy("min", 1.0, 1.0) == "mean" and rules.next_strategy("mean", 1.2, 1.0) == "max"
    assert rules.next_strategy("max", 1.2, 1.0) == "max" and rules.next_strategy("max", 0.9, 1.0) == "min"


# -- the fixed-point layer -------------------------------------------------------------------

def fixed_layer(word=8, frac=5) -> FakeQuantConv2d:
    torch.manual_seed(0)
    layer = FakeQuantConv2d.from_float(nn.Conv2d(4, 6, 3))
    layer.set_fixed_point(word, frac)
    return layer


def test_fixed_point_layer_codes_and_step():
    layer = fixed_layer(6, 7)
    assert layer.precision == "int6" and layer.frac_bits == 7 and layer.fixed_point
    assert float(layer.weight_scale()) == 2.0 ** -7
    expected = rules.fixed_point(layer.weight.detach(), 6, 7)
    assert torch.equal(layer.quantized_weight(), expected) and layer.weight_codes().abs().max() <= 31
    layer.set_weight_bits(8)  # back to the absmax rule
    assert not layer.fixed_point and layer.weight_codes().abs().amax().item() == 127


def test_stochastic_rounding_is_unbiased_and_only_in_training():
    layer = fixed_layer(8, 3)
    layer.stochastic_rounding, layer.rounding_generator = True, torch.Generator().manual_seed(0)
    layer.train()
    draws = torch.stack([layer.effective_weight().detach() for _ in range(4000)])
    step = 2.0 ** -3
    assert ((draws / step) == (draws / step).round()).all()  # on the grid
    assert (draws.mean(0) - layer.weight.detach()).abs().max() < 0.05 * step * 4  # unbiased (4000 draws)
    layer.eval()
    assert torch.equal(layer.effective_weight(), layer.quantized_weight())


def test_fixed_inputs_round_to_the_layer_format():
    layer = fixed_layer(8, 4).eval()
    layer.set_fixed_inputs(True)
    x = torch.randn(2, 4, 5, 5) * 3
    plain = nn.functional.conv2d(rules.fixed_point(x, 8, 4), layer.quantized_weight(), layer.bias)
    assert torch.equal(layer(x), plain) and layer.input_bits == 8


def test_fixed_point_state_loads_into_a_fresh_layer():
    layer = fixed_layer(11, 9)
    layer.set_fixed_inputs(True)
    fresh = FakeQuantConv2d.from_float(nn.Conv2d(4, 6, 3))
    fresh.load_state_dict(layer.state_dict())
    assert (fresh.bits, fresh.frac_bits, fresh.fixed_inputs) == (11, 9, True)
    twin = copy.deepcopy(layer)  # the EMA's in-place copies reach the fixed-point buffers too
    layer.set_fixed_point(7, 6)
    twin.weight_bits.copy_(layer.weight_bits)
    twin.weight_frac_bits.copy_(layer.weight_frac_bits)
    assert (twin.bits, twin.frac_bits) == (7, 6)
    with pytest.raises(CifarpressError, match="fractional length"):
        layer.set_fixed_point(8, -1)


# -- the plug-in -----------------------------------------------------------------------------

def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def batches(n=12, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 8, 8, generator=g), torch.randint(0, 10, (size,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("mode", ["paper", "deploy"])
def test_adapt_trains_and_switches_formats(mode):
    config = AdaptQuantConfig(mode=mode, min_lookback=3, max_lookback=4)
    plugin = AdaptQAT(config)
    trainer = Trainer(tiny_net(), TrainConfig(epochs=2, lr=0.05, batch_size=16), [plugin],
                      device=torch.device("cpu"), quiet=True)
    result = trainer.fit(batches(), None)
    layers = quantized_layers(result.model)
    assert set(layers) == {"0", "3", "8"} and all(layer.fixed_point for layer in layers.values())
    for layer in layers.values():
        assert config.min_bits <= layer.bits <= config.max_bits
        if config.buffer_bits:
            assert layer.bits >= layer.frac_bits + config.buffer_bits
    switches = [t for t in plugin.trajectory if t[0] > 0]
    assert switches and all(0 < t[0] <= trainer.total_steps for t in switches)
    assert [t[1] for t in plugin.trajectory[:3]] == ["0", "3", "8"]  # every layer's start
    cost = bit_weighted_macs(result.model, plugin.macs)
    assert 0 < cost["bops_ratio"] < 1 and result.history[-1]["adapt_bops"] == pytest.approx(cost["bops_ratio"])
    if mode == "deploy":
        assert all(layer.act_bits == 8 for layer in layers.values())


def test_adapt_refuses_a_quantized_model():
    model = tiny_net()
    quantize_model(model, TernaryConfig())
    trainer = Trainer(model, TrainConfig(epochs=1, batch_size=16), [AdaptQAT(AdaptQuantConfig())],
                      device=torch.device("cpu"), quiet=True)
    with pytest.raises(CifarpressError) as caught:
        trainer.fit(batches(2), None)
    assert "already quantized" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("body,expected", [
    ({"min_bits": 20, "max_bits": 16}, "min_bits=20 is above max_bits=16"),
    ({"max_bits": 40}, "max_bits"),
    ({"min_bits": 1}, "min_bits"),
    ({"buffer_bits": -1}, "buffer_bits"),
    ({"tolerance": -1}, "tolerance=-1.0 is not a KL divergence"),
    ({"tolerance": "loose"}, "use a number >= 0 (nats) or 'sampling'"),
])
def test_bad_adapt_settings_fail_in_one_line(tmp_path, body, expected):
    raw = {"name": "r", "model": {"arch": "resnet20", "checkpoint": "builtin:resnet20-cifar10"},
           "stages": [{"quantize": {"method": "adapt", **body}}]}
    with pytest.raises(RecipeError) as caught:
        recipe_from_dict(raw, tmp_path, "r.yaml")
    message = str(caught.value)
    assert expected in message and "stages[0].quantize" in message and "\n" not in message


# -- export: int8 QDQ up to 8 bits, float above; the packed file at every width ----------------

@pytest.fixture(scope="module")
def test_images(tiny_cifar_root):
    from cifarpress.data import load_split

    return load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)


def mixed_fixed_point_net(fixed_inputs: bool):
    from test_ternary import randomize_batchnorm, small_net

    model = randomize_batchnorm(small_net())
    names = list(dict.fromkeys(n for n, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)))
    quantize_model(model, TernaryConfig(act_bits=8, keep=names))
    layers = quantized_layers(model)
    formats = {"0": (6, 7), "3": (13, 11), "8": (8, 6)}  # BN-folded narrow, wide, the plain classifier
    for name, (word, frac) in formats.items():
        layers[name].set_fixed_point(word, frac)
        if fixed_inputs and word > 8:
            layers[name].set_fixed_inputs(True)
    return model.eval(), formats


@pytest.mark.parametrize("fixed_inputs", [False, True])
def test_fixed_point_export_is_exact_int8_up_to_8_bits_and_float_above(fixed_inputs, test_images, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cifarpress.data import dataset_spec
    from cifarpress.export.qdq import check_qdq, export_qdq
    from cifarpress.techniques.quantize.ternary import calibrate_activations
    from test_ternary import normalized

    model, formats = mixed_fixed_point_net(fixed_inputs)
    calibrate_activations(model, normalized(test_images.images[:50]))
    path = export_qdq(model, tmp_path / "m.onnx", dataset_spec("cifar10"), [str(i) for i in range(10)])
    graph = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert "model.3.weight_quantized" not in inits  # 13 bits: a float layer
    for name in ("0", "8"):
        codes = inits[f"model.{name}.weight_quantized"]
        assert codes.dtype == np.int8 and np.abs(codes).max() <= 2 ** (formats[name][0] - 1) - 1
    assert np.all(inits["model.8.weight_scale"] == np.float32(2.0 ** -6))  # no BN folded: the step itself
    assert np.array_equal(inits["model.8.weight_quantized"], quantized_layers(model)["8"].weight_codes().numpy())
    assert ("Round" in {n.op_type for n in graph.node}) == fixed_inputs
    check = check_qdq(model, path, test_images, threads=1)  # raises past its tolerance
    assert check.top1_agreement >= 95.0


def test_packed_file_holds_every_fixed_point_width(test_images, tmp_path, monkeypatch):
    from cifarpress.export.packed import load_packed, read_packed_header, save_packed
    from test_ternary import normalized, small_net

    monkeypatch.setattr("cifarpress.export.packed.build_model", lambda arch, n, **_: small_net(seed=5))
    model, formats = mixed_fixed_point_net(fixed_inputs=True)
    x = normalized(test_images.images[:20])
    from cifarpress.techniques.quantize.ternary import calibrate_activations

    calibrate_activations(model, x)
    path = save_packed(model, tmp_path / "m.cpt", "small", 10, "cifar10")
    assert read_packed_header(path)["layers"] == {"0": "int6", "3": "int13", "8": "int8"}
    loaded = load_packed(path).eval()
    for name, (word, frac) in formats.items():
        again = quantized_layers(loaded)[name]
        assert (again.bits, again.frac_bits) == (word, frac)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_deploy_export_is_the_int8_engine_with_the_models_own_codes(tiny_cifar_root, tmp_path):
    import numpy as np
    import onnx
    from onnx import numpy_helper

    from cifarpress.data import load_split
    from cifarpress.export.fixed_point import export_fixed_point_int8_checked, is_fixed_point_int8

    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    test = load_split("cifar10", "test", tiny_cifar_root, download_if_missing=False)
    model, formats = mixed_fixed_point_net(fixed_inputs=False)
    assert is_fixed_point_int8(model)
    from cifarpress.techniques.quantize.ternary import calibrate_activations
    from test_ternary import normalized

    calibrate_activations(model, normalized(test.images[:50]))
    exported = export_fixed_point_int8_checked(model, tmp_path / "m.onnx", train, test, calib_images=100,
                                               check_images=100, threads=1)
    assert exported.violations == [] and exported.check.top1_agreement >= 90.0
    graph = onnx.load(str(exported.path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert "model.3.weight_quantized" not in inits  # the 13-bit layer stays float
    layers = quantized_layers(model)
    for name in ("0", "8"):  # the model's codes (up to the sign a folded BN factor gives), not absmax ones
        codes = inits[f"model.{name}.weight_quantized"].reshape(len(inits[f"model.{name}.weight_scale"]), -1)
        mine = layers[name].weight_codes().numpy().reshape(codes.shape[0], -1)
        assert np.array_equal(np.abs(codes), np.abs(mine)) and np.abs(codes).max() < 127
    assert "QuantizeLinear" in {n.op_type for n in graph.node}
    # each int8 layer's input keeps the scale it trained with (not a recalibrated one)
    made = {o: n for n in graph.node for o in n.output}
    for name in ("0", "8"):
        layer_node = next(n for n in graph.node if n.op_type in ("Conv", "Gemm")
                          and n.input[1] in made and made[n.input[1]].input[0] == f"model.{name}.weight_quantized")
        input_dq = made[layer_node.input[0]]
        assert input_dq.op_type == "DequantizeLinear"
        assert inits[input_dq.input[1]] == np.float32(layers[name].static_input_scale().item())
