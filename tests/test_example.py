"""examples/compress_your_model.py (the notebook-style walk-through) runs, on tiny data."""
import runpy
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "compress_your_model.py"


def test_the_example_prunes_quantizes_and_exports_a_user_model(tmp_path, monkeypatch, capsys):
    for key, value in {"EXAMPLE_IMAGES": "128", "EXAMPLE_EPOCHS": "2", "EXAMPLE_SECONDS": "0.05",
                       "EXAMPLE_OUT": str(tmp_path)}.items():
        monkeypatch.setenv(key, value)
    done = runpy.run_path(str(EXAMPLE), run_name="__main__")
    params = [sum(p.numel() for p in done[name].parameters()) for name in ("baseline", "pruned")]
    assert params[1] < params[0]
    assert done["int8"].path.is_file() and done["int8"].violations == []
    assert done["packed"].packed.is_file()
    shapes = {tuple(x.shape[1:]) for x, _ in done["test_loader"]}
    assert shapes == {(3, 64, 64)}
    assert len(done["measured"]["models"]) == 3
    assert "int8: agreement with PyTorch" in capsys.readouterr().out
    torch.set_num_threads(1)
