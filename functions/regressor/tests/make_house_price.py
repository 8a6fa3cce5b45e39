"""Packages a tiny house-price regression model the way a user would, for tests/house_price.rs.

    make_house_price.py OUT_DIR

Writes into OUT_DIR: house_price.pt (a TorchScript Linear(3, 1) with known weights),
features.json (the normalisation statistics the handler reads), house_price.py (a placeholder
torch-model-archiver needs), house_price.mar (made by the real torch-model-archiver with
`--handler house_price --extra-files features.json`), no_features.mar (the same without
features.json) and
expected.json (the test houses and the prices Python torch computes for them, normalising as
the handler documents and rounding to cents).
"""

import json
import os
import subprocess
import sys

import torch

out = sys.argv[1]
os.makedirs(out, exist_ok=True)

FEATURES = ["rooms", "area_m2", "year_built"]
stats = {
    "features": {
        "rooms": {"mean": 3.2, "std": 1.4},
        "area_m2": {"mean": 92.0, "std": 38.5},
        "year_built": {"mean": 1978.0, "std": 27.0},
    },
    "currency": "EUR",
}
with open(os.path.join(out, "features.json"), "w") as f:
    json.dump(stats, f, indent=2)


class HousePrice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)
        with torch.no_grad():
            self.linear.weight.copy_(torch.tensor([[21000.0, 87000.0, 4000.0]]))
            self.linear.bias.fill_(312000.0)

    def forward(self, x):
        return self.linear(x)


model = torch.jit.script(HousePrice().eval())
model.save(os.path.join(out, "house_price.pt"))

houses = [
    {"rooms": 3, "area_m2": 84.5, "year_built": 1998},
    {"rooms": 1, "area_m2": 5, "year_built": 1800},
    {"rooms": 20, "area_m2": 2000, "year_built": 2030},
    {"rooms": 5, "area_m2": 140.25, "year_built": 1965},
]
mean = torch.tensor([stats["features"][k]["mean"] for k in FEATURES], dtype=torch.float32)
std = torch.tensor([stats["features"][k]["std"] for k in FEATURES], dtype=torch.float32)
x = torch.tensor([[float(h[k]) for k in FEATURES] for h in houses], dtype=torch.float32)
with torch.no_grad():
    prices = model((x - mean) / std).reshape(-1).tolist()
expected = {
    "houses": houses,
    "prices": [round(p * 100.0) / 100.0 for p in prices],
    "currency": stats["currency"],
}
with open(os.path.join(out, "expected.json"), "w") as f:
    json.dump(expected, f, indent=2)

# torch-model-archiver takes `--handler NAME` for its own built-ins only; any other name must
# be a Python file in the working directory (`NAME.py`), which it packs. The manifest then says
# `"handler": "house_price"`, which torchfn-regressor serves with its Rust handler; the file is
# a placeholder (and lets the S3 registrar see that the handler is shipped).
with open(os.path.join(out, "house_price.py"), "w") as f:
    f.write(
        '"""The house_price handler is Rust code compiled into the torchfn-regressor model\n'
        "function (functions/regressor in torchfn), which serves this archive. This file only\n"
        'satisfies torch-model-archiver; TorchServe cannot serve the archive with it."""\n'
    )
archiver = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")


def archive(name, *extra):
    subprocess.run(
        [
            archiver,
            "--model-name", name,
            "--version", "1.0",
            "--serialized-file", "house_price.pt",
            "--handler", "house_price",
            *extra,
            "--export-path", ".",
            "--force",
        ],
        cwd=out,
        check=True,
    )
    assert os.path.exists(os.path.join(out, f"{name}.mar"))


archive("house_price", "--extra-files", "features.json")
# The same model without its statistics: the handler must refuse to load it.
archive("no_features")
