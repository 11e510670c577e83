"""The README's notebook example runs as written (paths pointed at the tiny pipeline)."""
import re
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_api_example_runs(tiny_pipeline, capsys):
    text = (REPO_ROOT / "README.md").read_text()
    block = re.search(r"## Python API.*?```python\n(.*?)```", text, re.S).group(1)
    for shipped, tiny in (("checkpoints/teacher_mnist5k.pt", tiny_pipeline.teacher),
                          ("demo/student/best_model.pt", tiny_pipeline.student),
                          ("demo/reference_features.pt", tiny_pipeline.features)):
        assert shipped in block
        block = block.replace(f'"{shipped}"', repr(str(tiny)))
    # The tiny reference set is the first 120 mnist5k digits (all zeros): aim the class hook at a class it has.
    block = block.replace("toward_class(3, 0.8)", "toward_class(0, 0.8)")
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["base"].images.shape == (8, 1, 28, 28)
    assert scope["base"].images.abs().max() <= 1
    assert scope["threes"].top_k_indices.shape == (8, 5)
    assert scope["mixed"].features.shape[1:] == scope["pipe"].student.decoder.bottleneck_shape
    assert scope["teacher_view"].shape == (8, 1, 28, 28)
    assert scope["indices"].shape == (8, 5) and scope["feats"].shape == scope["base"].features.shape
    # ranked by the features' rule (shape: the cosine's best, ordered by distortion distance), scores its cosines
    pipe, teacher_view = scope["pipe"], scope["teacher_view"]
    scores, indices, _ = pipe.steering.attribute_shape(teacher_view, 5)
    assert torch.equal(scope["indices"], indices) and torch.equal(scope["scores"], scores)
    assert capsys.readouterr().out.strip(), "the example prints its attributions"
