"""How imdb_face/ was made (run once; the outputs are committed): movie-still-like images of two
LFW frames side by side (the centre 100 px of each), served at 200x150, and IMDb-Face.csv rows
whose `rect` is the labelled face's dlib box measured in a frame twice that size ("300 400"),
as IMDb-Face's boxes often are measured in another size than the one served.

    .venv/bin/python tests/data/layouts/make_imdb_face.py
"""

from pathlib import Path

import numpy as np
from PIL import Image

from portrait.faces import load_backend

HERE = Path(__file__).resolve().parent
DEV = HERE.parents[3] / "shared" / "fixtures" / "faces" / "dev"
HOST = "https://m.media-amazon.com/images/M/"
FRAME = (300, 400)  # height width of the frame rect is measured in (2x the served image)
# (image, left photo, right photo, labelled side, name, index)
STILLS = [
    ("still_1.jpg", "Colin_Powell/Colin_Powell_0004.jpg", "Hugo_Chavez/Hugo_Chavez_0003.jpg", 0, "Colin Powell", "nm0693817"),
    ("still_2.jpg", "George_W_Bush/George_W_Bush_0004.jpg", "Colin_Powell/Colin_Powell_0005.jpg", 1, "Colin L. Powell", "nm0693817"),
    ("still_3.jpg", "Colin_Powell/Colin_Powell_0006.jpg", "Jennifer_Capriati/Jennifer_Capriati_0007.jpg", 0, "Colin Powell", "nm0693817"),
    ("still_4.jpg", "Hugo_Chavez/Hugo_Chavez_0004.jpg", "Jennifer_Capriati/Jennifer_Capriati_0009.jpg", 1, "Jennifer Capriati", "nm0135939"),
]


def still(left: Path, right: Path) -> Image.Image:
    halves = [np.asarray(Image.open(p).convert("RGB"))[:, 25:125] for p in (left, right)]
    return Image.fromarray(np.concatenate(halves, axis=1))


def main() -> None:
    backend = load_backend({"backend": "dlib"})
    rows = ["name,index,image,rect,height width,url"]
    (HERE / "imdb_face" / "images").mkdir(parents=True, exist_ok=True)
    sx, sy = FRAME[1] / 200, FRAME[0] / 150
    for image, left, right, side, name, index in STILLS:
        img = still(DEV / left, DEV / right)
        img.save(HERE / "imdb_face" / "images" / image, quality=95)
        faces = sorted(backend.detect(np.asarray(img)), key=lambda f: f.raw_box[0])
        x0, y0, x1, y1 = faces[side].raw_box
        rect = f"{x0 * sx:.0f} {y0 * sy:.0f} {x1 * sx:.0f} {y1 * sy:.0f}"
        rows.append(f"{name},{index},{index}_{image},{rect},{FRAME[0]} {FRAME[1]},{HOST}{image}")
    # the labelled person is not in the picture: the box points at the background
    rows.append(f"Colin Powell,nm0693817,nm0693817_still_4.jpg,10 250 60 290,{FRAME[0]} {FRAME[1]},{HOST}still_4.jpg")
    (HERE / "imdb_face" / "IMDb-Face.csv").write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
