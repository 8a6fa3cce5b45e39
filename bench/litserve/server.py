# LitServe's side of torchfn's benchmark: one LitAPI serving one of the benchmark's TorchScript
# files (the seed classifier or the wide MLP), answering the same JSON as torchfn for the same
# body. torchfn-bench starts it with the venv's Python, one inference worker, on 127.0.0.1 and
# a port it picked, waits for GET /health to answer 200, and stops it with its process group.
#
#   python bench/litserve/server.py --model <fixtures>/models/model_scripted.pt \
#       --kind classifier --labels <fixtures>/src/index_to_name.json --port 8123 \
#       --path /predictions/classifier [--max-batch-size 32 --batch-timeout-ms 5] [--device cpu]
#
# prints `litserve-bench: model loaded ...` once the worker holds the model; then
#   curl -d '{"features": [0.1, ...]}' localhost:8123/predictions/classifier
# answers {"predicted_class": ..., "confidence": ..., "probabilities": [...], "class_name": ...}.
#
# Kinds, as torchfn's built-in handlers answer them:
#   classifier  {"features": [numbers]} -> softmax over the output row (computed in float64 and
#               rounded to float32, as torchfn does), its argmax, and the argmax's label;
#   tensor      a JSON array of numbers (or {"data": [...]}) -> the model's output row.
# Floats are written in float32's shortest round-trip form (0.1, not 0.10000000149011612),
# as torchfn writes them, so that the two answers are the same JSON values.
#
# torch is imported in the inference worker only (setup), so that LitServe's own processes
# (the launcher and the uvicorn API server) do not carry it; its intra-op threads are left at
# torch's default and printed on the `model loaded` line.
import argparse
import json

import litserve as ls


def f32_values(row):
    """A float32 tensor row as Python floats in float32's shortest round-trip form."""
    return [float(str(x)) for x in row.numpy()]


class TorchScriptAPI(ls.LitAPI):
    def __init__(self, model, kind, labels, **kwargs):
        super().__init__(**kwargs)
        self.model_path = model
        self.kind = kind
        self.labels_path = labels

    def setup(self, device):
        import torch

        self.torch_device = torch.device(device)
        self.model = torch.jit.load(self.model_path, map_location=self.torch_device).eval()
        self.labels = None
        if self.labels_path:
            with open(self.labels_path) as f:
                self.labels = json.load(f)
        print(
            f"litserve-bench: model loaded from {self.model_path} on {device}; "
            f"torch {torch.__version__}, intra-op threads {torch.get_num_threads()}",
            flush=True,
        )

    def decode_request(self, request):
        import torch

        if self.kind == "classifier":
            values = request["features"]
        else:
            values = request["data"] if isinstance(request, dict) else request
        return torch.tensor(values, dtype=torch.float32)

    def predict(self, x):
        # Batching off hands one instance, batching on a stacked batch (LitAPI.batch).
        import torch

        single = x.dim() == 1
        if single:
            x = x.unsqueeze(0)
        with torch.inference_mode():
            out = self.model(x.to(self.torch_device)).float().cpu()
            if self.kind == "classifier":
                shifted = out - out.max(dim=1, keepdim=True).values
                exps = shifted.double().exp()
                out = (exps / exps.sum(dim=1, keepdim=True)).float()
        return out[0] if single else out

    def encode_response(self, output):
        if self.kind != "classifier":
            return f32_values(output)
        probabilities = f32_values(output)
        k = max(range(len(probabilities)), key=lambda i: probabilities[i])
        answer = {
            "predicted_class": k,
            "confidence": probabilities[k],
            "probabilities": probabilities,
        }
        if self.labels is not None:
            answer["class_name"] = self.labels.get(str(k), "unknown")
        return answer


def main():
    parser = argparse.ArgumentParser(
        description="LitServe serving one of torchfn-bench's TorchScript models"
    )
    parser.add_argument("--model", required=True, help="the TorchScript file")
    parser.add_argument("--kind", choices=["classifier", "tensor"], required=True)
    parser.add_argument("--labels", help="index_to_name.json, for the classifier's class_name")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/predict", help="the prediction route")
    parser.add_argument("--max-batch-size", type=int, default=1)
    parser.add_argument("--batch-timeout-ms", type=float, default=0.0)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()

    if args.device == "cpu":
        accelerator, devices = "cpu", "auto"
    else:
        accelerator = "cuda"
        devices = [int(args.device.partition(":")[2] or 0)]
    api = TorchScriptAPI(
        args.model,
        args.kind,
        args.labels,
        max_batch_size=args.max_batch_size,
        batch_timeout=args.batch_timeout_ms / 1e3,
        api_path=args.path,
    )
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=1)
    # One API server process (LitServe's default for one worker); warning level, since
    # uvicorn's access log would print a line per request.
    server.run(
        host="127.0.0.1",
        port=args.port,
        num_api_servers=1,
        log_level="warning",
        generate_client_file=False,
    )


if __name__ == "__main__":
    main()
