"""Zero-invariant group discovery and channel surgery: every zoo model, plus models built here
for torch.cat with depthwise convs, an op the tracer cannot follow, and an untraceable forward."""
from __future__ import annotations

import math
import random
import warnings
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cifarpress.errors import CifarpressError
from cifarpress.models import MODELS
from cifarpress.profile import profile_model
from cifarpress.channels.groups import UnsupportedOpWarning, discover_groups
from cifarpress.channels.surgery import compact_model, round_kept, verify_compact

# Counted by hand. ResNet-(6n+2): 112 (n+1) = three residual streams (16+32+64) plus n inner
# widths per stage. VGG: the sum of conv widths. WRN-(6n+4)-2: 16 (stem) + 224 (n+1).
# MobileNetV2: stem 32 + every expansion width + each block output not added to a residual + 1280.
EXPECTED_GROUPS = {
    "resnet20": 448, "resnet32": 672, "resnet44": 896, "resnet56": 1120, "resnet110": 2128,
    "vgg11_bn": 2752, "vgg16_bn": 4224, "mobilenetv2": 9128, "wrn16_2": 688, "wrn40_2": 1584,
}


def realistic(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN affine params (a nonzero bias, so a cut that forgets one shows up) and running
    stats from one train-mode batch, so deep nets keep O(1) outputs; returns it in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.2)
            m.momentum = None  # cumulative average: one batch sets the stats
            m.reset_running_stats()
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32, generator=gen))
    return model.eval()


def random_cut(n_groups: int, fraction: float = 0.3, seed: int = 0) -> list[int]:
    return sorted(random.Random(seed).sample(range(n_groups), int(fraction * n_groups)))


def predicted_after_cut(model: nn.Module, groupset, cut: list[int]) -> tuple[int, int]:
    """Params and MACs of the compacted model, from the cut groups' slices alone."""
    lost: dict[tuple[str, int], set[int]] = defaultdict(set)
    for g in cut:
        group = groupset.groups[g]
        for s in group.producers + group.buffers + group.consumers:
            lost[(s.param, s.dim)].update(s.indices)

    def kept_numel(name: str, shape) -> int:
        return math.prod(size - len(lost[(name, d)]) for d, size in enumerate(shape))

    params = sum(kept_numel(name, p.shape) for name, p in model.named_parameters())
    macs = 0
    for layer in profile_model(model).layers:
        if layer.macs:  # conv/linear MACs scale with the weight's kept elements at a fixed output size
            weight = model.get_parameter(f"{layer.name}.weight")
            scaled = layer.macs * kept_numel(f"{layer.name}.weight", weight.shape)
            assert scaled % weight.numel() == 0
            macs += scaled // weight.numel()
    return params, macs


def assert_exact_compaction(model: nn.Module, groupset, cut: list[int]) -> nn.Module:
    before = profile_model(model)
    groupset.zero_groups(model, cut)
    assert groupset.zero_group_ids(model) == cut
    x = torch.randn(2, 3, 32, 32)
    compact = compact_model(model, groupset, check_input=x)
    assert type(compact) is type(model)
    assert verify_compact(model, compact, x) <= 1e-4
    after = profile_model(compact)
    params, macs = predicted_after_cut(model, groupset, cut)
    assert after.params == params < before.params
    assert after.macs == macs < before.macs
    return compact


def output_spaces(groupset) -> set[str]:
    return {name for name, why in groupset.unprunable_spaces.items() if why == "network output"}


@pytest.mark.parametrize("arch", list(MODELS))
def test_zoo_model_compacts_exactly(arch):
    torch.manual_seed(0)
    model = realistic(MODELS[arch](num_classes=10))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)  # the zoo needs no fallback
        groupset = discover_groups(model)
    assert len(groupset) == EXPECTED_GROUPS[arch]
    assert groupset.unprunable_spaces["input:x"] == "network input"
    assert len(output_spaces(groupset)) == 1
    never = {"input:x"} | output_spaces(groupset)
    assert not never & set(groupset.prunable_spaces)
    assert not any(space in never for g in groupset.groups for space, _ in g.channels)
    assert_exact_compaction(model, groupset, random_cut(len(groupset)))


def test_resnet20_stage_groups_join_every_conv_adding_into_the_stage():
    groupset = discover_groups(MODELS["resnet20"](num_classes=10).eval())
    # residual stream of each stage: the conv that opens it, then each block's conv2
    stages = [
        ("conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"),
        ("layer2.0.conv2", "layer2.0.shortcut.0", "layer2.1.conv2", "layer2.2.conv2"),
        ("layer3.0.conv2", "layer3.0.shortcut.0", "layer3.1.conv2", "layer3.2.conv2"),
    ]

    def bn_of(conv: str) -> str:  # the BatchNorm right after each of those convs
        return "bn1" if conv == "conv1" else conv.replace("conv2", "bn2").replace("shortcut.0", "shortcut.1")

    assert sorted(groupset.coupled_spaces) == sorted(stages)
    for stage in stages:
        group = groupset.groups[groupset.group_of(stage[0], 5)]
        assert group.channels == tuple((conv, 5) for conv in stage)
        expected = {f"{c}.weight" for c in stage} | {f"{bn_of(c)}.{p}" for c in stage for p in ("weight", "bias")}
        assert {s.param for s in group.producers} == expected
        assert all(s.indices == (5,) for s in group.producers + group.buffers + group.consumers)
    head = groupset.groups[groupset.group_of("layer3.2.conv2", 7)]
    assert ("fc.weight", 1, (7,)) in [(s.param, s.dim, s.indices) for s in head.consumers]
    assert groupset.group_of("fc", 0) is None and groupset.group_of("input:x", 0) is None


def test_preactivation_bn_on_the_residual_sum_belongs_to_the_stream_group():
    model = realistic(MODELS["wrn16_2"](num_classes=10))
    groupset = discover_groups(model)
    stream = groupset.groups[groupset.group_of("blocks.0.conv2", 3)]
    producers = {s.param for s in stream.producers}
    assert {"blocks.0.shortcut.weight", "blocks.1.conv2.weight", "blocks.1.bn1.weight", "blocks.1.bn1.bias",
            "blocks.2.bn1.bias"} <= producers
    last = groupset.groups[groupset.group_of("blocks.5.conv2", 0)]
    assert {"bn.weight", "bn.bias"} <= {s.param for s in last.producers}
    # leave that BN's bias alone and BN(0) = bias leaks into the next conv: the check must refuse
    groupset.zero_groups(model, [stream.id], consumers=False)  # zeroed consumers would hide the leak
    with torch.no_grad():
        model.blocks[1].bn1.bias[3] = 0.5
    with pytest.raises(CifarpressError, match="not all zero"):
        compact_model(model, groupset, group_ids=[stream.id], check_input=torch.randn(2, 3, 32, 32))


class CatDepthwiseNet(nn.Module):
    """Two branches concatenated on channels (one depthwise), the concat added to a 1x1 conv,
    then a 2x2 map flattened into a two-layer head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.branch_a = nn.Sequential(nn.Conv2d(16, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.branch_b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16), nn.BatchNorm2d(16), nn.ReLU6(),
                                      nn.Conv2d(16, 20, 1))
        self.mix = nn.BatchNorm2d(32)
        self.skip = nn.Conv2d(16, 32, 1)
        self.head = nn.Sequential(nn.Linear(32 * 4, 24), nn.ReLU(), nn.BatchNorm1d(24), nn.Linear(24, 10))

    def forward(self, x):
        s = self.stem(x)
        y = torch.cat([self.branch_a(s), self.branch_b(s)], dim=1)
        y = F.relu(self.mix(y)) + self.skip(s)
        y = F.adaptive_avg_pool2d(y, 2)
        return self.head(y.view(y.size(0), -1))


def test_cat_depthwise_and_flattened_map():
    model = realistic(CatDepthwiseNet())
    groupset = discover_groups(model)
    assert len(groupset) == 16 + 32 + 24
    assert ("branch_a.0", "branch_b.3", "skip") in groupset.coupled_spaces
    # the add couples the concat channel by channel, across the two branches' offsets
    assert groupset.group_of("branch_a.0", 11) == groupset.group_of("skip", 11)
    assert groupset.group_of("branch_b.3", 0) == groupset.group_of("skip", 12)
    stem = groupset.groups[groupset.group_of("stem.0", 5)]
    assert {"branch_b.0.weight", "branch_b.0.bias", "branch_b.1.weight", "branch_b.1.bias"} \
        <= {s.param for s in stem.producers}  # the depthwise conv and its BN ride on the stem channel
    joined = groupset.groups[groupset.group_of("skip", 3)]
    assert ("head.0.weight", 1, (12, 13, 14, 15)) in [(s.param, s.dim, s.indices) for s in joined.consumers]
    whole_space = [groupset.group_of("head.0", i) for i in range(24)]
    with pytest.raises(CifarpressError, match="no channels"):
        compact_model(model, groupset, group_ids=whole_space)
    assert_exact_compaction(model, groupset, random_cut(len(groupset), seed=1))


class ChannelPermute(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.register_buffer("perm", torch.randperm(channels))

    def forward(self, x):
        return x[:, self.perm]


class PermutingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.shuffle = ChannelPermute(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 24, 3, padding=1, bias=False), nn.BatchNorm2d(24)
        self.conv3, self.bn3 = nn.Conv2d(24, 24, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(24)
        self.fc = nn.Linear(24, 10)

    def forward(self, x):
        x = self.shuffle(F.relu(self.bn1(self.conv1(x))))
        x = F.relu(self.bn3(self.conv3(F.relu(self.bn2(self.conv2(x))))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_unsupported_op_is_named_and_its_spaces_stay_whole():
    model = realistic(PermutingNet())
    with pytest.warns(UnsupportedOpWarning, match=r"getitem\(\) in 'shuffle' \(ChannelPermute\).*conv1"):
        groupset = discover_groups(model)
    assert "shuffle" in groupset.unprunable_spaces["conv1"]
    assert set(groupset.prunable_spaces) == {"conv2", "conv3"}
    assert len(groupset) == 48
    assert_exact_compaction(model, groupset, random_cut(len(groupset), seed=2))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.conv(x)
        return -y if y.sum() > 0 else y


def test_untraceable_model_is_a_clear_error():
    with pytest.raises(CifarpressError, match="torch.fx cannot trace DataDependent"):
        discover_groups(DataDependent())


def test_round_kept():
    assert [round_kept(13, 8), round_kept(0, 8), round_kept(30, 8, total=28), round_kept(5, 1)] == [16, 8, 28, 5]
