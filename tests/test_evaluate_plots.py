"""The plots write real image files that pillow can open."""
import numpy as np
from PIL import Image

from trainer import plots
from trainer.skeleton import synthetic_skeleton, to_body_frame


def test_plots_write_images(tmp_path):
    poses, _ = to_body_frame(synthetic_skeleton(60, raise_right_wrist=10))
    plots.loss_curves({"loss": [1.0, 0.5, 0.3], "val_loss": [1.1, 0.7, 0.6]}, tmp_path / "loss.png")
    plots.stick_strip({"generated": poses, "ground truth": poses[::-1]}, tmp_path / "strip.png", n=6)
    plots.animate_gif({"generated": poses, "ground truth": poses}, tmp_path / "anim.gif", max_frames=20)
    for name in ("loss.png", "strip.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 200 and im.size[1] > 100
    with Image.open(tmp_path / "anim.gif") as im:
        assert im.n_frames == 10
        im.seek(5)
        assert np.asarray(im.convert("L")).std() > 1  # a figure is drawn, not a blank frame
