"""Cutting a residual branch whole (`remove_branches`): which spaces may go, exact surgery with
the stand-in layers, the model file round trip, ONNX, and the selection levels."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from cifarpress.model_file import load_model, save_model
from cifarpress.errors import CifarpressError
from cifarpress.models.layers import ChannelsCut, ConstantChannels
from cifarpress.models import build_model
from cifarpress.channels.budget import PruneBudget, PruneTarget
from cifarpress.channels.surgery import compact_model, verify_compact
from cifarpress.channels.groups import discover_groups

from test_prune_groups import assert_exact_compaction, realistic


def groups_of(groupset, space: str) -> list[int]:
    return [g.id for g in groupset.groups if g.channels[0][0] == space]


def test_only_residual_branch_inner_spaces_are_removable():
    resnet = discover_groups(build_model("resnet20"))
    assert resnet.removable_spaces == {f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3)}
    wrn = discover_groups(build_model("wrn16_2"))  # pre-activation blocks: the inner conv too
    assert wrn.removable_spaces == {f"blocks.{b}.conv1" for b in range(6)}
    # a plain chain would go constant, and a depthwise conv cannot lose all its channels
    assert discover_groups(build_model("vgg11_bn")).removable_spaces == frozenset()
    assert discover_groups(build_model("mobilenetv2")).removable_spaces == frozenset()


def test_cutting_a_whole_branch_is_exact_and_leaves_stand_ins():
    torch.manual_seed(0)
    model = realistic(build_model("resnet20"))
    groupset = discover_groups(model)
    cut = sorted(groups_of(groupset, "layer1.1.conv1") + groups_of(groupset, "layer2.0.conv1")
                 + groups_of(groupset, "layer3.2.conv1")[:5])
    compact = assert_exact_compaction(model, groupset, cut)  # MACs and params as predicted
    block = compact.layer2[0]  # the stride-2 block: the constant must come out at the halved size
    assert isinstance(block.conv1, ChannelsCut) and isinstance(block.bn1, nn.Identity)
    assert isinstance(block.conv2, ConstantChannels) and isinstance(compact.layer1[1].conv2, ConstantChannels)
    assert compact.layer3[2].conv1.out_channels == 59
    # what the cut block computes: its shortcut plus bn2 of a zero conv output
    x = torch.randn(2, 16, 32, 32)
    bn = block.bn2
    expected = block.shortcut(x) + (bn.bias - bn.running_mean * bn.weight / (bn.running_var + bn.eps).sqrt()).view(
        1, -1, 1, 1)
    assert torch.allclose(block(x), torch.relu(expected), atol=1e-5)


def test_a_branch_cut_is_refused_where_the_space_is_not_removable():
    model = build_model("vgg11_bn").eval()
    groupset = discover_groups(model)
    first = groupset.groups[0].channels[0][0]
    with pytest.raises(CifarpressError, match="no channels"):
        compact_model(model, groupset, group_ids=groups_of(groupset, first))


def test_cut_model_survives_the_model_file_and_onnx(tmp_path):
    import onnxruntime as ort

    from cifarpress.data import dataset_spec
    from cifarpress.export.onnx import NormalizedClassifier, export_onnx

    torch.manual_seed(1)
    model = realistic(build_model("resnet20"))
    groupset = discover_groups(model)
    cut = groups_of(groupset, "layer1.0.conv1") + groups_of(groupset, "layer3.1.conv1")
    groupset.zero_groups(model, cut)
    compact = compact_model(model, groupset, check_input=torch.randn(2, 3, 32, 32))
    save_model(tmp_path / "cut.pt", compact, "resnet20", 10, "cifar10")
    loaded, _ = load_model(tmp_path / "cut.pt")
    x = torch.randn(3, 3, 32, 32)
    assert verify_compact(compact, loaded.eval(), x) == 0.0
    assert isinstance(loaded.layer3[1].conv2, ConstantChannels)
    spec = dataset_spec("cifar10")
    path = export_onnx(loaded, tmp_path / "cut.onnx", spec, [str(i) for i in range(10)])
    session = ort.InferenceSession(str(path))
    pixels = torch.rand(5, 3, 32, 32)  # another batch size than the export's: the constant follows it
    got = session.run(None, {session.get_inputs()[0].name: pixels.numpy()})[0]
    want = NormalizedClassifier(loaded, spec.mean, spec.std).eval()(pixels).detach().numpy()
    assert np.abs(got - want).max() < 1e-4


def test_stand_ins_follow_the_layer_geometry():
    x = torch.randn(2, 4, 9, 11)
    for conv in (nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.Conv2d(4, 6, (1, 3), padding="same"),
                 nn.Conv2d(4, 6, 3, dilation=2), nn.Conv2d(4, 6, 1, bias=False)):
        shape = conv(x).shape
        assert ChannelsCut.replacing(conv)(x).shape == (2, 0, *shape[2:])
        bias = None if conv.bias is None else conv.bias[:5]
        out = ConstantChannels.replacing(conv, 5, bias)(x)
        assert out.shape == (2, 5, *shape[2:])
        assert torch.equal(out[1, :, -1, -1], torch.zeros(5) if bias is None else bias.detach())
    linear = nn.Linear(4, 3)
    assert ChannelsCut.replacing(linear)(torch.randn(7, 4)).shape == (7, 0)
    assert torch.equal(ConstantChannels.replacing(linear, 3, linear.bias)(torch.randn(7, 4))[6], linear.bias.detach())


def test_levels_reach_zero_only_for_removable_units_when_asked():
    model = build_model("resnet20").eval()
    groupset = discover_groups(model)
    inner = set(groups_of(groupset, "layer1.0.conv1"))
    for remove, deepest in ((False, 8), (True, 16)):
        budget = PruneBudget(model, groupset, PruneTarget(macs=0.5, channel_multiple=8, remove_branches=remove))
        levels = {tuple(sorted(members)): lv for members, lv in zip(budget.units, budget.levels)}
        assert levels[tuple(sorted(inner))] == [0, 8, deepest][: 3 if remove else 2]
        stream = budget.unit_of[groupset.group_of("conv1", 0)]  # a residual stream never goes whole
        assert budget.levels[stream][-1] < len(budget.units[stream])
    # equal scores, per MAC: whole branches are the cheapest MACs to cut, and the target is met
    budget = PruneBudget(model, groupset, PruneTarget(macs=0.5, channel_multiple=8, remove_branches=True))
    chosen = budget.select(torch.ones(len(groupset)), [], 1.0)
    assert budget.compact_macs(chosen) <= 0.5 * budget.mac_counter.full
    zeroed = copy.deepcopy(realistic(model))
    groupset.zero_groups(zeroed, chosen)
    compact = compact_model(zeroed, groupset, check_input=torch.randn(2, 3, 32, 32))
    assert any(isinstance(m, ConstantChannels) for m in compact.modules())


def test_prune_stage_passes_remove_branches_to_the_target():
    from pydantic import ValidationError

    from cifarpress.techniques.prune.config import HessoConfig
    from cifarpress.techniques.prune.plugin import build

    assert build(HessoConfig(macs=0.5, remove_branches=True)).target.remove_branches
    assert not build(HessoConfig(macs=0.5)).target.remove_branches
    with pytest.raises(ValidationError, match="remove_branches"):
        HessoConfig(macs=0.5, remove_branches="sometimes")


def test_cut_model_quantizes_to_int8_from_its_onnx(tmp_path, tiny_cifar_root):
    """Pruning then int8: the stand-ins' constants and the narrower convs go through the int8 PTQ."""
    from cifarpress.runtime.ort import make_session
    from cifarpress.data import dataset_spec, load_split
    from cifarpress.export.onnx import NormalizedClassifier, export_onnx
    from cifarpress.export.int8 import check_int8_rules, quantize_onnx_int8

    torch.manual_seed(2)
    model = realistic(build_model("resnet20"))
    groupset = discover_groups(model)
    cut = (groups_of(groupset, "layer2.1.conv1") + groups_of(groupset, "layer1.0.conv1")[:7]
           + groups_of(groupset, "layer3.0.conv1")[:20])
    groupset.zero_groups(model, cut)
    compact = compact_model(model, groupset, check_input=torch.randn(2, 3, 32, 32)).eval()
    spec = dataset_spec("cifar10")
    train = load_split("cifar10", "train", tiny_cifar_root, download_if_missing=False)
    float_path = export_onnx(compact, tmp_path / "cut.onnx", spec, train.classes)
    path = quantize_onnx_int8(float_path, tmp_path / "cut.int8.onnx", train.images[:64], "minmax", threads=1)
    assert check_int8_rules(path) == []
    pixels = train.images[:64].float() / 255
    with torch.no_grad():
        want = NormalizedClassifier(compact, spec.mean, spec.std).eval()(pixels).numpy()
    got = make_session(path, 1).run(["logits"], {"input": pixels.numpy()})[0]
    centred = lambda a: a - a.mean(0)  # noqa: E731  (what tells images apart, as in test_int8)
    cosine = (centred(got) * centred(want)).sum() / (np.linalg.norm(centred(got)) * np.linalg.norm(centred(want)))
    assert cosine > 0.99
