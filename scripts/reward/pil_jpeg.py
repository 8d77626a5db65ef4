"""Save each image of a uint8 [N, H, W, C] .npy as JPEG the way Cosmos-RL's
jpeg rewards do (PIL, quality 95), writing OUT_DIR/<i>.jpg.

Used by reward-service/tests/jpeg_matches_pil.rs to check that our encoder
writes the same bytes.  Usage: pil_jpeg.py IMAGES.npy OUT_DIR
"""

import io
import os
import sys

import numpy as np
from PIL import Image


def main() -> None:
    images = np.load(sys.argv[1], allow_pickle=False)
    out_dir = sys.argv[2]
    for i, image in enumerate(images):
        if image.shape[-1] == 1:
            image = image[..., 0]
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=95)
        with open(os.path.join(out_dir, f"{i}.jpg"), "wb") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
