"""The registered generator's MLflow pyfunc: seeds in, images out (MLflow "models from code").

MLflow runs this file when it loads the model; it needs no progan-pipeline code: the model's
artifacts hold a generator bundle (pipeline.tools.bundle), whose own loader
(`progan_bundle.py`: torch, safetensors, numpy) renders the images.

Input, one row per request line (a pandas DataFrame; `dataframe_records` in JSON):

    seed        int >= 0     the latents of `progan generate --seed SEED`
    count       int >= 1     images of that seed: indices 0..count-1 (default 1)
    truncation  float        psi of the truncation trick, 1 = none (default 1.0)

Output, one row per image: `seed`, `index` and, by the `format` param, `png` (base64 PNG,
the default) or `pixels` (uint8 [H][W][3] nested lists). Image `index` of `seed` is pixel for
pixel `progan generate --seed SEED --n COUNT --individual DIR`'s `seed<S>-<index>.png`.
"""

import base64
import io
import sys

import mlflow.pyfunc
import pandas as pd
from mlflow.models import set_model

MAX_IMAGES = 256  # per request


class SeedsToImages(mlflow.pyfunc.PythonModel):
    """pyfunc: seeds -> generated faces (see the module doc)."""

    def load_context(self, context):
        bundle = context.artifacts["bundle"]
        sys.path.insert(0, bundle)
        from progan_bundle import latents, load_bundle, to_uint8

        self.latents, self.to_uint8 = latents, to_uint8
        self.generate, self.cfg = load_bundle(bundle)

    def predict(self, context, model_input, params=None):
        from PIL import Image

        fmt = (params or {}).get("format", "png")
        if fmt not in ("png", "pixels"):
            raise ValueError(f"format: 'png' or 'pixels', got {fmt!r}")
        rows = []
        frame = pd.DataFrame(model_input)
        if int(frame.get("count", pd.Series([1] * len(frame))).fillna(1).sum()) > MAX_IMAGES:
            raise ValueError(f"at most {MAX_IMAGES} images per request")
        for record in frame.to_dict("records"):
            seed, count = int(record["seed"]), int(record.get("count") or 1)
            psi = record.get("truncation")
            psi = 1.0 if psi is None or pd.isna(psi) else float(psi)
            if seed < 0 or count < 1:
                raise ValueError(f"seed must be >= 0 and count >= 1, got {seed}, {count}")
            z = self.latents(seed, count, self.cfg["latent_size"])
            images = self.to_uint8(self.generate(z, psi=psi)).numpy()
            for index, image in enumerate(images):
                row = {"seed": seed, "index": index}
                if fmt == "png":
                    buffer = io.BytesIO()
                    Image.fromarray(image).save(buffer, format="PNG")
                    row["png"] = base64.b64encode(buffer.getvalue()).decode("ascii")
                else:
                    row["pixels"] = image.tolist()
                rows.append(row)
        return pd.DataFrame(rows)


set_model(SeedsToImages())
