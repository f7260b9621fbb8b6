"""Channel groups on what modern CNNs are made of, as small faithful replicas (no timm here: it needs
torchvision): a fused BatchNorm + activation module written as timm writes it, squeeze-and-excitation,
grouped and multiplier-depthwise convs, chunk/split/getitem along channels, a conv called twice,
subclasses of nn.Conv2d / nn.Linear, cross-channel norms, nn.MaxPool1d on (batch, features) and a
Linear on token tensors. Each is either cut exactly or refused with a warning naming the op."""
from __future__ import annotations

import random
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cifarpress
from cifarpress.channels.budget import PruneBudget, PruneTarget
from cifarpress.channels.groups import UnsupportedOpWarning, discover_groups
from cifarpress.channels.surgery import compact_model, verify_compact
from test_prune_groups import realistic  # random BN affine parameters and statistics from one batch


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's fused norm + activation, as it is written: not an fx leaf, so fx traces its forward,
    and in training mode bakes batch statistics and `num_batches_tracked.add_(1)` into the graph."""

    def __init__(self, num_features, act=nn.SiLU):
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = True if self.training else (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                         self.running_var if not self.training or self.track_running_stats else None,
                         self.weight, self.bias, bn_training, factor, self.eps)
        return self.act(self.drop(x))


class SqueezeExcite(nn.Module):
    """efficientnet / mobilenetv3 SE: x * gate(expand(act(reduce(mean(x)))))."""

    def __init__(self, channels, reduced, gate=nn.Sigmoid):
        super().__init__()
        self.conv_reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.ReLU()
        self.conv_expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.conv_expand(self.act(self.conv_reduce(s))))


class Linear(nn.Linear):
    """timm's Linear: a subclass whose forward is F.linear on its own parameters."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


class PaddedConv(nn.Conv2d):
    """A conv subclass with its own forward (explicit padding, then F.conv2d)."""

    def forward(self, x):
        return F.conv2d(F.pad(x, (1, 1, 1, 1)), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def cut_exactly(model: nn.Module, fraction: float = 0.4, seed: int = 0, shape=(2, 3, 32, 32)):
    """Zero a random share of the groups, compact, and return (groupset, compact, relative difference)."""
    groupset = discover_groups(model, torch.randn(*shape))
    assert len(groupset) > 0
    cut = sorted(random.Random(seed).sample(range(len(groupset)), max(1, int(fraction * len(groupset)))))
    groupset.zero_groups(model, cut)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed + 1))
    compact = compact_model(model, groupset, group_ids=cut)
    with torch.no_grad():
        scale = model.eval()(x).abs().max().item()
    diff = verify_compact(model, compact, x) / max(scale, 1e-12)
    assert sum(p.numel() for p in compact.parameters()) < sum(p.numel() for p in model.parameters())
    return groupset, compact, diff


def groups_without_fallback(model: nn.Module):
    """discover_groups, failing on any UnsupportedOpWarning: the construct must be followed, not refused."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnsupportedOpWarning)
        return discover_groups(model)


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.clone() for name, b in model.named_buffers()}


class FusedNormNet(nn.Module):
    """Stem, a residual block and a head, every norm a BatchNormAct2d, spatial size down to 1x1."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), BatchNormAct2d(16))
        self.conv1 = nn.Conv2d(16, 24, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(24, nn.ReLU)
        self.conv2 = nn.Conv2d(24, 16, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(16, nn.Identity)
        self.down = nn.Sequential(nn.Conv2d(16, 32, 3, stride=16, padding=1, bias=False), BatchNormAct2d(32))
        self.head = Linear(32, classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.bn2(self.conv2(self.bn1(self.conv1(x))))
        return self.head(self.down(x).flatten(1))  # the map is 1x1 here


def test_fused_norm_module_is_followed_and_discovery_changes_nothing():
    model = realistic(FusedNormNet()).train()
    before = buffers(model)
    groupset = discover_groups(model)  # in train mode, the default probe
    assert all(torch.equal(before[name], b) for name, b in model.named_buffers())  # not one buffer moved
    # the stem/residual stream (16), the inner width (24) and the 1x1 head width (32)
    assert len(groupset) == 16 + 24 + 32
    producers = {s.param for g in groupset.groups for s in g.producers}
    assert {"stem.1.weight", "bn1.bias", "bn2.weight", "down.1.weight"} <= producers
    assert "head.weight" in {s.param for g in groupset.groups for s in g.consumers}  # F.linear of a subclass
    _, compact, diff = cut_exactly(realistic(FusedNormNet()))
    assert diff <= 1e-5
    assert type(compact.bn1) is BatchNormAct2d and isinstance(compact.bn1.act, nn.ReLU)  # still fused
    assert compact.bn1.num_features < 24 and type(compact.head) is Linear


def test_prune_stage_runs_on_a_fused_norm_model_through_the_api():
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.randn(32, 3, 32, 32, generator=gen), torch.arange(32) % 10
    loader = DataLoader(TensorDataset(images, labels), batch_size=8)
    torch.manual_seed(0)
    dense = FusedNormNet()
    pruned = cifarpress.prune(dense, loader, sparsity=0.4, epochs=1, channel_multiple=1, pruning_periods=1,
                              start_fraction=0.0, end_fraction=1.0, lr=0.05, quiet=True, device="cpu")
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in dense.parameters())
    assert pruned(torch.randn(2, 3, 32, 32)).shape == (2, 10)


class SENet(nn.Module):
    def __init__(self, gate=nn.Sigmoid):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.se = SqueezeExcite(16, 8, gate)
        self.conv2 = nn.Conv2d(16, 16, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.se(F.silu(self.bn2(self.dw(x))))
        x = x + self.bn3(self.conv2(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


@pytest.mark.parametrize("gate", [nn.Sigmoid, nn.Hardsigmoid])
def test_squeeze_excite_couples_the_gate_rows_with_the_stream_it_multiplies(gate):
    model = realistic(SENet(gate))
    groupset = groups_without_fallback(model)
    assert len(groupset) == 16 + 8  # the gated stream and SE's reduced width
    stream = next(g for g in groupset.groups if g.space == "conv1")
    assert {s.param for s in stream.producers} >= {"bn1.weight", "bn3.weight", "se.conv_expand.weight"}
    assert {s.param for s in stream.consumers} >= {"se.conv_reduce.weight", "fc.weight"}
    _, compact, diff = cut_exactly(model)
    assert diff <= 1e-5 and compact.se.conv_expand.out_channels == compact.bn1.num_features


class SigmoidFeedsConv(nn.Module):
    """A sigmoid output read as channels by a conv: sigmoid(0) = 0.5, so the conv's input must stay."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        x = self.conv2(torch.sigmoid(self.conv1(x)))
        return self.fc(x.mean((2, 3)))


def test_a_shifted_tensor_read_as_channels_is_refused():
    with pytest.warns(UnsupportedOpWarning, match="conv2.*not zero where their producers are"):
        groupset = discover_groups(SigmoidFeedsConv())
    assert "conv1" not in groupset.prunable_spaces and "conv2" in groupset.prunable_spaces


class GroupedNet(nn.Module):
    """regnet's bottleneck (a grouped 3x3 between 1x1s) and a depthwise conv with a multiplier."""

    def __init__(self, groups: int = 4):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(16))
        self.conv1 = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.conv2 = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, groups=groups, bias=False), nn.BatchNorm2d(32),
                                   nn.ReLU())
        self.conv3 = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.expand(self.stem(x))
        x = F.relu(x + self.conv3(self.conv2(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_grouped_convs_lose_equal_counts_per_group_or_whole_groups():
    # 4 groups of 8: position p of every group is one group (8 on each side); 16 groups of 2: whole groups
    for groups, expected in ((4, {"conv1.0": (8, 4), "conv2.0": (8, 4)}), (16, {("conv1.0", "conv2.0"): (16, 4)})):
        model = realistic(GroupedNet(groups))
        groupset = groups_without_fallback(model)
        for spaces, (count, size) in expected.items():
            spaces = {spaces} if isinstance(spaces, str) else set(spaces)
            found = [g for g in groupset.groups if {s for s, _ in g.channels} == spaces]
            assert len(found) == count and all(len(g.channels) == size for g in found)
        # the multiplier-depthwise expand: one input and its two outputs per group
        assert len([g for g in groupset.groups if g.space == "stem.0"]) == 8
        for seed in range(3):
            _, compact, diff = cut_exactly(realistic(GroupedNet(groups)), 0.5, seed)
            assert diff <= 1e-5
            conv2 = compact.conv2[0]
            assert conv2.in_channels == compact.conv1[0].out_channels and conv2.out_channels % conv2.groups == 0
            assert conv2.groups == groups if groups == 4 else conv2.groups <= groups
            assert compact.expand[0].out_channels == 2 * compact.expand[0].groups
    # a budget over groups of several channels per space needs no rounding it cannot do
    budget = PruneBudget(model, groupset, PruneTarget(sparsity=0.3, channel_multiple=8))
    assert budget.capacity > 0


class ChunkNet(nn.Module):
    """A gated linear unit by chunk (equal parts at run time), a no-op channel slice (GhostNet's
    out[:, :out_chs]) and a branch sliced at a fixed offset."""

    def __init__(self, fixed_slice: bool = False, split: bool = False):
        super().__init__()
        self.fixed_slice, self.split = fixed_slice, split
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        y = self.conv1(x)
        a, b = torch.split(y, [16, 16], dim=1) if self.split else y.chunk(2, dim=1)
        x = a * torch.sigmoid(b)
        x = x[:, :16] if not self.fixed_slice else torch.cat([x[:, :8], x[:, :8]], 1)
        return self.fc(self.conv2(x).mean((2, 3)))


def test_chunk_keeps_its_parts_equal_and_fixed_splits_are_refused():
    model = ChunkNet()
    groupset = groups_without_fallback(model)
    halves = [g for g in groupset.groups if g.space == "conv1"]
    assert len(halves) == 16 and all(len(g.channels) == 2 for g in halves)  # position p of both halves
    _, compact, diff = cut_exactly(ChunkNet())
    assert diff <= 1e-5 and compact.conv1.out_channels % 2 == 0
    with pytest.warns(UnsupportedOpWarning, match="split.*fixed sizes"):
        assert "conv1" not in discover_groups(ChunkNet(split=True)).prunable_spaces
    with pytest.warns(UnsupportedOpWarning, match="getitem.*fixed offsets"):
        assert "conv1" not in discover_groups(ChunkNet(fixed_slice=True)).prunable_spaces


class SharedConvNet(nn.Module):
    """One conv applied twice (to two resolutions): its rows serve both calls."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.shared = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        a = F.relu(self.shared(x)).mean((2, 3))
        b = F.relu(self.shared(F.avg_pool2d(x, 2))).mean((2, 3))
        return self.fc(torch.cat([a, b], 1))


def test_a_conv_called_twice_is_cut_once_for_both_calls():
    groupset, compact, diff = cut_exactly(SharedConvNet())
    assert diff <= 1e-5
    assert len([g for g in groupset.groups if g.space == "shared"]) == 16


class PaddedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = PaddedConv(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = PaddedConv(16, 16, 3, groups=4)
        self.fc = Linear(16, 10)

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


def test_subclasses_of_conv_and_linear_keep_their_class_and_forward():
    _, compact, diff = cut_exactly(realistic(PaddedConvNet()))
    assert diff <= 1e-5
    assert type(compact.conv1) is PaddedConv and type(compact.conv2) is PaddedConv and type(compact.fc) is Linear
    assert compact.conv2.in_channels == compact.bn1.num_features == compact.conv1.out_channels


class NormNet(nn.Module):
    def __init__(self, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.norm = norm
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(self.conv2(F.relu(self.norm(self.conv1(x)))).mean((2, 3)))


@pytest.mark.parametrize("norm", [nn.GroupNorm(4, 16), nn.LayerNorm([16, 32, 32])])
def test_cross_channel_norms_stay_unprunable_with_a_warning_naming_them(norm):
    with pytest.warns(UnsupportedOpWarning, match=f"{type(norm).__name__} module 'norm'.*normalizes across channels"):
        groupset = discover_groups(NormNet(norm))
    assert "conv1" not in groupset.prunable_spaces and "conv2" in groupset.prunable_spaces


class PooledFeatures(nn.Module):
    """nn.MaxPool1d on (batch, features): PyTorch reads it as (channels, length) and pools across features."""

    def __init__(self, batched: bool = False):
        super().__init__()
        self.batched = batched
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Linear(16, 32)
        self.pool = nn.MaxPool1d(3, stride=1, padding=1)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        h = self.fc1(self.conv(x).mean((2, 3)))
        h = self.pool(h[:, :, None])[:, :, 0] if self.batched else self.pool(h)
        return self.fc2(F.relu(h))


def test_maxpool1d_on_features_is_not_taken_for_a_per_channel_op():
    with pytest.warns(UnsupportedOpWarning, match="MaxPool1d module 'pool'.*2-D input"):
        groupset = discover_groups(PooledFeatures())
    assert "fc1" not in groupset.prunable_spaces
    # on (batch, channels, length) it is per channel; the None index and [:, :, 0] are refused, not misread
    with pytest.warns(UnsupportedOpWarning, match="getitem"):
        assert "fc1" not in discover_groups(PooledFeatures(batched=True)).prunable_spaces


class TokenMLP(nn.Module):
    """A Linear on (batch, tokens, channels): its input features are not dim 1."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.fc2(F.gelu(self.fc1(tokens))).mean(1)


def test_linear_on_token_tensors_is_refused_with_its_name():
    with pytest.warns(UnsupportedOpWarning) as record:
        groupset = discover_groups(TokenMLP())
    assert any("flatten" in str(w.message) and "left unprunable: conv" in str(w.message) for w in record)
    assert "conv" not in groupset.prunable_spaces  # nothing is cut on a guess


class TwoWeights(nn.Module):
    """One module calling F.conv2d on two weights of its own: two channel spaces, not one."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.w2 = nn.Parameter(torch.randn(12, 8, 3, 3) * 0.3)

    def forward(self, x):
        return F.conv2d(F.relu(F.conv2d(x, self.w1, padding=1)), self.w2, padding=1)


class TwoWeightsNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = TwoWeights()
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        return self.fc(F.relu(self.block(x)).mean((2, 3)))


def test_functional_convs_on_a_module_s_own_weights_each_make_a_space():
    groupset, compact, diff = cut_exactly(TwoWeightsNet())
    assert {g.space for g in groupset.groups} == {"block.w1", "block.w2"}
    assert len(groupset) == 8 + 12 and diff <= 1e-5
    assert compact.block.w1.shape[0] == compact.block.w2.shape[1] < 8


class ConvNeXtBlock(nn.Module):
    """ConvNeXt's block as timm writes it without conv_mlp: depthwise conv, then LayerNorm and an MLP of
    nn.Linear on (B, H, W, C) between two permutes, a layer scale, and the residual add."""

    def __init__(self, dim=16):
        super().__init__()
        self.conv_dw = nn.Conv2d(dim, dim, 7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(torch.full((dim,), 0.5))

    def forward(self, x):
        shortcut = x
        x = self.conv_dw(x).permute(0, 2, 3, 1)
        x = self.fc2(self.act(self.fc1(self.norm(x))))
        x = x.permute(0, 3, 1, 2).mul(self.gamma.reshape(1, -1, 1, 1))
        return x + shortcut


class ConvNeXtNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 4, stride=4)
        self.block = ConvNeXtBlock()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_a_linear_mlp_between_permutes_is_cut_and_the_layernorm_stream_is_kept():
    with pytest.warns(UnsupportedOpWarning, match="LayerNorm module 'block.norm'.*normalizes across channels"):
        groupset = discover_groups(ConvNeXtNet())
    assert groupset.prunable_spaces == ["block.fc1"]  # the MLP's hidden width, read by fc2 on the last dim
    with pytest.warns(UnsupportedOpWarning):
        _, compact, diff = cut_exactly(ConvNeXtNet())
    assert diff <= 1e-5 and compact.block.fc1.out_features == compact.block.fc2.in_features < 64


class PermutedConvInput(nn.Module):
    """A conv reading a tensor whose channels a permute moved: refused, not misread."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = self.conv1(x).transpose(1, 3)  # (B, 32, 32, 8): dim 1 is now width
        return self.fc(self.conv2(y).mean((2, 3)))


def test_channels_moved_off_dim_one_are_not_read_as_channels():
    with pytest.warns(UnsupportedOpWarning, match="conv2.*moved to dim 3"):
        groupset = discover_groups(PermutedConvInput())
    assert "conv1" not in groupset.prunable_spaces
