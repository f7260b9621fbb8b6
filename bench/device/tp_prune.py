"""Here: the tp-taylor arm's one-shot Torch-Pruning step on the CPU, exactly as bench/prune_vs_torch_pruning.py's
train_arm does it (deterministic), so the device only fine-tunes; launch.sh puts the file in the arm's folder.

    python bench/device/tp_prune.py OUT.pt MODEL [MACS]
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/, for the benchmark's own functions
import prune_vs_torch_pruning as pvt  # noqa: E402

from cifarpress.data import Normalizer, balanced_subset, dataset_spec, load_split  # noqa: E402
from cifarpress.model_file import load_model, save_model  # noqa: E402

out, model_ref = Path(sys.argv[1]), sys.argv[2]
macs = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
baseline, info = load_model(model_ref)
spec = dataset_spec("cifar10")
train = load_split("cifar10", "train", "data")
idx = balanced_subset(train.labels, 1024, seed=0)
pruned, how = pvt.torch_pruning_prune(baseline, "taylor", macs, spec.num_classes, train.images[idx],
                                      train.labels[idx], Normalizer(spec.mean, spec.std))
print(how)
out.parent.mkdir(parents=True, exist_ok=True)
save_model(out, pruned, info["arch"], info["num_classes"], info["dataset"], {"torch_pruning": how})
