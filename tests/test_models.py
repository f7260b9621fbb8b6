"""Model zoo: shapes, sizes against the papers, the profiler, and user factories."""
from __future__ import annotations

import json
import sys
import textwrap

import pytest
import torch
from rich.console import Console
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.models import MODELS, build_model
from cifarpress.profile import LayerStat, ModelProfile, human, profile_model, render_profile

# Published parameter counts (10 classes). ResNets: He et al. 2016, table 6 (their
# shortcuts are parameter-free; our 1x1 projections add 2.7K-3K). WRN: Zagoruyko &
# Komodakis 2016. MobileNetV2 / VGG-BN: the usual CIFAR ports (e.g. kuangliu/pytorch-cifar).
PUBLISHED_PARAMS = {
    "resnet20": 0.27e6,
    "resnet32": 0.46e6,
    "resnet44": 0.66e6,
    "resnet56": 0.85e6,
    "resnet110": 1.7e6,
    "vgg11_bn": 9.23e6,
    "vgg16_bn": 14.7e6,
    "mobilenetv2": 2.2e6,
    "wrn16_2": 0.69e6,
    "wrn40_2": 2.2e6,
}
# Multiply-accumulates per 32x32 image (He et al. report ~41M and ~125M FLOPs as MACs).
PUBLISHED_MACS = {"resnet20": 41e6, "resnet56": 126e6}


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("num_classes", [10, 100])
def test_zoo_model_forward(arch, num_classes):
    torch.manual_seed(0)
    model = build_model(arch, num_classes=num_classes).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, num_classes)
    assert torch.isfinite(out).all()


def test_every_zoo_model_has_a_published_size():
    assert set(PUBLISHED_PARAMS) == set(MODELS)


@pytest.mark.parametrize("arch", list(PUBLISHED_PARAMS))
def test_param_count_matches_paper(arch):
    count = n_params(build_model(arch, num_classes=10))
    assert count == pytest.approx(PUBLISHED_PARAMS[arch], rel=0.03), f"{arch}: {count:,}"


@pytest.mark.parametrize("arch", list(PUBLISHED_MACS))
def test_macs_match_paper(arch):
    profile = profile_model(build_model(arch))
    assert profile.macs == pytest.approx(PUBLISHED_MACS[arch], rel=0.03), f"{arch}: {profile.macs:,}"
    assert profile.params == n_params(build_model(arch))


# --- profiler on a model small enough to count by hand -------------------------

def tiny_model() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),   # 8*3*9 + 8 = 224 params; 8*32*32 * 3*9 = 221,184 MACs
        nn.BatchNorm2d(8),               # 16 params, 0 MACs
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),                # 90 params; 80 MACs
    )


def test_profile_tiny_model_by_hand():
    profile = profile_model(tiny_model())
    rows = {layer.name: layer for layer in profile.layers}
    assert [layer.name for layer in profile.layers] == ["0", "1", "2", "3", "4", "5"]
    assert rows["0"] == LayerStat("0", "Conv2d", 224, 8 * 32 * 32 * 3 * 3 * 3, (1, 8, 32, 32))
    assert rows["1"] == LayerStat("1", "BatchNorm2d", 16, 0, (1, 8, 32, 32))
    assert rows["3"].output_shape == (1, 8, 1, 1) and rows["3"].macs == 0
    assert rows["5"] == LayerStat("5", "Linear", 90, 80, (1, 10))
    assert profile.macs == 221_184 + 80
    assert profile.params == 224 + 16 + 90


def test_profile_grouped_conv_and_per_image_macs():
    model = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8, bias=False))
    x = torch.randn(4, 8, 16, 16)
    profile = profile_model(model, input_shape=(4, 8, 16, 16))
    # depthwise: 8*8*8 outputs x 1 input channel x 9, for ONE image although the batch is 4
    assert profile.macs == 8 * 8 * 8 * 9
    assert profile.layers[0].output_shape == (4, 8, 8, 8)
    assert profile_model(model, example_input=x).macs == profile.macs


def test_profile_counts_shared_modules_per_call_and_unhooked_params():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))  # held by the container itself
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(self.fc(x)) * self.scale

    profile = profile_model(Shared(), input_shape=(1, 4))
    assert profile.params == 20 + 1
    assert profile.macs == 2 * 16
    assert sum(layer.params for layer in profile.layers) == profile.params


def test_profile_restores_mode_and_removes_hooks():
    model = tiny_model().train()
    model[1].eval()  # mixed modes must come back exactly
    profile_model(model)
    assert [m.training for m in model] == [True, False, True, True, True, True]
    assert all(not m._forward_hooks for m in model.modules())

    model.train()
    with pytest.raises(RuntimeError):
        profile_model(model, input_shape=(1, 5, 32, 32))  # wrong channel count
    assert all(m.training for m in model.modules())
    assert all(not m._forward_hooks for m in model.modules())


def test_profile_channels_last():
    model = tiny_model().to(memory_format=torch.channels_last)
    assert profile_model(model).macs == 221_184 + 80


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_profile_on_device():
    assert profile_model(tiny_model().cuda()).macs == 221_184 + 80


def test_profile_to_dict_and_render():
    profile = profile_model(build_model("resnet20"))
    d = profile.to_dict()
    json.dumps(d)
    assert d["params"] == profile.params and len(d["layers"]) == len(profile.layers)
    assert d["layers"][0]["output_shape"] == [1, 16, 32, 32]

    table = render_profile(profile, "resnet20")
    assert table.row_count == len(profile.layers) + 1
    console = Console(width=140, record=True)
    console.print(table)
    text = console.export_text()
    assert "0.27M" in text and "40.8M" in text and "layer3.2.conv2" in text


def test_human_numbers():
    assert [human(n) for n in (0, 432, 2304, 272_474, 40_813_184, 125_747_840, 1.5e9)] == [
        "0", "432", "2.3K", "0.27M", "40.8M", "126M", "1.5G"]


def test_empty_profile_renders():
    table = render_profile(ModelProfile(layers=[], params=0, macs=0), "empty")
    assert table.row_count == 1


# --- user factories and errors -------------------------------------------------

@pytest.fixture
def user_zoo(tmp_path, monkeypatch):
    """A package `userzoo_test` on sys.path with a few factories."""
    pkg = tmp_path / "userzoo_test"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=10):
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, num_classes))

        def no_classes():
            return tiny(7)

        def with_kwargs(**kw):
            return tiny(**kw)

        def not_a_model(num_classes=10):
            return "nope"

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userzoo_test.nets"
    for name in [m for m in sys.modules if m.startswith("userzoo_test")]:
        del sys.modules[name]


def test_user_factory(user_zoo):
    model = build_model(f"{user_zoo}:tiny", num_classes=100)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert build_model(f"{user_zoo}:with_kwargs", num_classes=100)(torch.randn(1, 3, 32, 32)).shape == (1, 100)
    assert build_model(f"{user_zoo}:no_classes")(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    assert profile_model(model).macs == 4 * 32 * 32 * 27 + 400


@pytest.mark.parametrize("attr", ["missing", "NOT_CALLABLE", "not_a_model"])
def test_user_factory_bad_attribute(user_zoo, attr):
    with pytest.raises(CifarpressError):
        build_model(f"{user_zoo}:{attr}")


def test_unknown_model_lists_known_names():
    with pytest.raises(CifarpressError) as info:
        build_model("resnet21")
    message = str(info.value)
    assert "resnet21" in message
    assert all(name in message for name in MODELS)


@pytest.mark.parametrize("spec", ["no_such_pkg_cifarpress.models:make", ":make", ".relative:make", "os:"])
def test_unimportable_factory(spec):
    with pytest.raises(CifarpressError):
        build_model(spec)


def test_macs_of_functional_ops_match_pytorchs_flop_counter():
    """A block calling F.conv2d and a matmul itself: every MAC is counted (module hooks saw only a quarter)."""
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(16, 3, 3, 3))
            self.conv = nn.Conv2d(16, 16, 3, padding=1)
            self.proj = nn.Parameter(torch.randn(16, 10))

        def forward(self, x):
            x = self.conv(F.relu(F.conv2d(x, self.w, padding=1)))
            return x.mean((2, 3)) @ self.proj

    model = Functional()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, 32, 32))
    prof = profile_model(model)
    assert prof.macs == counter.get_total_flops() // 2 == 16 * 32 * 32 * 27 + 16 * 32 * 32 * 144 + 160
    by_name = {layer.name: layer.macs for layer in prof.layers}
    assert by_name["conv"] == 16 * 32 * 32 * 144  # the nn.Conv2d child keeps its own
    assert by_name["Functional"] == 16 * 32 * 32 * 27 + 160  # the root ran the functional conv and the matmul

