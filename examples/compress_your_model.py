# %% [markdown]
# # Compress your own model with cifarpress
#
# A notebook in plain Python (`# %%` cells: VS Code, PyCharm and Jupytext open it as a notebook). It takes
# a model defined here, 64x64 images from an ordinary `DataLoader`, and runs the API's stages on them:
# train a baseline, prune it to half its MACs while distilling from it, export post-training int8 ONNX,
# train ternary weights, and measure the files side by side. Nothing here is CIFAR-specific.
#
# The sizes below are small enough for a laptop CPU; the test suite runs this file with tinier ones
# (EXAMPLE_IMAGES=128 EXAMPLE_EPOCHS=2).

# %%
import copy
import os
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import cifarpress

IMAGES = int(os.environ.get("EXAMPLE_IMAGES", "2048"))  # training images (a quarter as many test images)
EPOCHS = int(os.environ.get("EXAMPLE_EPOCHS", "4"))
SECONDS = float(os.environ.get("EXAMPLE_SECONDS", "1.0"))  # timing budget per batch size and file
OUT = Path(os.environ.get("EXAMPLE_OUT", "runs/example"))
CLASSES, SIZE = 5, 64


# %% [markdown]
# ## Your model and your data
# Any `nn.Module` that returns (batch, classes) logits, and any loader of `(images, labels)` whose images are
# what the model takes (your transforms and normalization stay yours).

# %%
class SmallNet(nn.Module):
    def __init__(self, width: int = 24):
        super().__init__()
        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*block(3, width, 2), *block(width, width, 1), *block(width, 2 * width, 2),
                                      *block(2 * width, 2 * width, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2 * width, CLASSES)

    def forward(self, x):
        return self.classifier(self.features(x))


def shapes_dataset(n: int, seed: int) -> TensorDataset:
    """Noise with a bright square whose position names the class: a stand-in for your images."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (n,), generator=gen)
    images = 0.3 * torch.randn(n, 3, SIZE, SIZE, generator=gen)
    for i, label in enumerate(labels.tolist()):
        top = 6 + 10 * label
        images[i, :, top:top + 12, top:top + 12] += 1.0
    return TensorDataset(images, labels)


torch.manual_seed(0)
train_loader = DataLoader(shapes_dataset(IMAGES, seed=0), batch_size=32, shuffle=True)
test_loader = DataLoader(shapes_dataset(max(IMAGES // 4, 32), seed=1), batch_size=64)

# %% [markdown]
# ## A baseline
# `train` fine-tunes by default (1 epoch at lr 0.01, cosine); here from scratch, with its own settings.

# %%
baseline = cifarpress.train(SmallNet(), train_loader, epochs=EPOCHS, lr=0.1, schedule="onecycle",
                            warmup_fraction=0.15, test=test_loader)
print(f"baseline: {cifarpress.evaluate(baseline, test_loader):.1f}% top-1")

# %% [markdown]
# ## Prune to half the MACs, distilling from the baseline
# The pruner traces the model on the loader's own 64x64 images; `distill=` without a teacher learns from the
# model as it entered the stage. `prune` trains the model it is given in place, hence the copy.

# %%
pruned = cifarpress.prune(copy.deepcopy(baseline), train_loader, macs=0.5, channel_multiple=8, epochs=EPOCHS,
                          pruning_periods=3, end_fraction=0.5, lr=0.02, distill={"method": "kd"}, test=test_loader)
print(f"pruned: {cifarpress.evaluate(pruned, test_loader):.1f}% top-1, "
      f"{sum(p.numel() for p in pruned.parameters()):,} parameters (from "
      f"{sum(p.numel() for p in baseline.parameters()):,})")

# %% [markdown]
# ## Deployable files
# Every export is checked in onnxruntime against PyTorch before it is written. int8 calibrates on batches of
# the training loader (or a `forward_loop(model)`) and reports the top-1 it lost on the test loader.

# %%
fp32 = cifarpress.export(baseline, OUT / "baseline.onnx", data=test_loader)
int8 = cifarpress.export(pruned, OUT / "pruned.int8.onnx", precision="int8", data=test_loader,
                         calibration=train_loader, calib_images=min(512, IMAGES))
print(f"int8: agreement with PyTorch {int8.check.top1_agreement:.1f}%, top-1 lost {int8.top1_drop_pp:.2f} pp, "
      f"TensorRT rule violations: {len(int8.violations)}")

# %% [markdown]
# ## Or quantization-aware training: ternary weights, distilled from the baseline

# %%
ternary = cifarpress.quantize(copy.deepcopy(pruned), train_loader, method="ternary", epochs=EPOCHS, lr=0.01,
                              distill={"method": "kd", "teacher": baseline}, test=test_loader)
packed = cifarpress.export(ternary, OUT / "pruned.ternary.onnx", data=test_loader)
print(f"ternary: {cifarpress.evaluate(ternary, test_loader):.1f}% top-1; packed file "
      f"{packed.packed.stat().st_size:,} bytes")

# %% [markdown]
# ## Measure them side by side on this CPU

# %%
measured = cifarpress.compare([fp32.path, int8.path, packed.path], test_loader, batch_sizes=[1, 32],
                              seconds=SECONDS, rounds=1)
for row in measured["models"]:
    print(f"{Path(row['model']).name:24} {row['onnx_bytes'] / 1e3:8.1f} kB  top-1 {row['top1']:5.1f}%  "
          f"batch 1: {row['latency_ms_p50']['1']:.3f} ms ({row['latency_vs_first']['1']:.2f}x)")
