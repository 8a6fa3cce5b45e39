# TorchServe's side of the benchmark's wide model (256 -> 4096 -> 4096 -> 10 MLP).
# TorchServe's base_handler cannot read a JSON body, so this handler does what torchfn's
# built-in `tensor` handler does: a JSON array of 256 numbers (or {"data": [...]}) is one
# instance, the answer is the model's output row. torchfn-bench archives it, with the
# fixture's wide_scripted.pt, into a TorchServe-only wide.mar; torchfn serves the fixture's
# own wide.mar (base_handler) instead.
import json

import torch
from ts.torch_handler.base_handler import BaseHandler


class WideHandler(BaseHandler):
    def preprocess(self, data):
        rows = []
        for row in data:
            body = row.get("body", row.get("data")) if isinstance(row, dict) else row
            if isinstance(body, (bytes, bytearray)):
                body = json.loads(body.decode("utf-8"))
            if isinstance(body, dict):
                body = body["data"]
            rows.append(torch.tensor(body, dtype=torch.float32))
        return torch.stack(rows).to(self.device)

    def postprocess(self, data):
        return data.tolist()
