"""Writes the fuzz targets' seed corpus (fuzz/corpus/<target>/), small and deterministic:
valid archives in each format and the hostile shapes the unpacker must refuse, manifests,
model-config YAMLs and config.properties files. Run from the repository root:
    python3 fuzz/make_corpus.py
"""

import io
import json
import os
import tarfile
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")

MANIFEST = {
    "createdOn": "25/11/2026 12:00:00",
    "runtime": "python",
    "model": {
        "modelName": "classifier",
        "serializedFile": "model.pt",
        "handler": "classifier",
        "modelVersion": "1.0",
        "configFile": "model-config.yaml",
    },
    "archiverVersion": "0.12.0",
}
CONFIG = "minWorkers: 1\nmaxWorkers: 2\nbatchSize: 8\nmaxBatchDelay: 5\nresponseTimeout: 30\n" \
         "deviceType: cpu\nhandler:\n  threshold: 0.7\n"
PROPERTIES = "inference_address=http://127.0.0.1:8080\nmanagement_address=http://127.0.0.1:8081\n" \
             "load_models=all\njob_queue_size=100\nbatch_size=32\nmax_batch_delay=100\n" \
             "models={\"classifier\": {\"1.0\": {\"marName\": \"classifier.mar\", \"batchSize\": 4}}}\n" \
             "install_py_dep_per_model=$$SET$$\n"


def write(target, name, data):
    d = os.path.join(ROOT, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def zip_bytes(entries, compression=zipfile.ZIP_DEFLATED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as z:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=(2026, 11, 25, 12, 0, 0))
            info.compress_type = compression
            z.writestr(info, data)
    return buf.getvalue()


def tgz_bytes(entries):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.GNU_FORMAT) as t:
        for name, data, kind, link in entries:
            info = tarfile.TarInfo(name)
            info.mtime = 0
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
            else:
                info.linkname = link
                t.addfile(info)
    return buf.getvalue()


def main():
    manifest = json.dumps(MANIFEST, indent=2).encode()
    good = [("MAR-INF/MANIFEST.json", manifest), ("model.pt", b"PK\x03\x04 not a model"),
            ("model-config.yaml", CONFIG.encode()), ("index_to_name.json", b'{"0": "a"}')]
    write("mar_archive", "good.mar", zip_bytes(good))
    write("mar_archive", "good-store.mar", zip_bytes(good, zipfile.ZIP_STORED))
    write("mar_archive", "good.tar.gz",
          tgz_bytes([("classifier/" + n, d, tarfile.REGTYPE, "") for n, d in good]))
    write("mar_archive", "traversal.mar", zip_bytes(good + [("../../evil.txt", b"x")]))
    write("mar_archive", "absolute.mar", zip_bytes(good + [("/tmp/evil.txt", b"x")]))
    write("mar_archive", "duplicate.mar", zip_bytes(good + [("model.pt", b"again")]))
    write("mar_archive", "symlink.tar.gz", tgz_bytes(
        [("classifier/" + n, d, tarfile.REGTYPE, "") for n, d in good]
        + [("classifier/link", b"", tarfile.SYMTYPE, "/etc/passwd"),
           ("classifier/hard", b"", tarfile.LNKTYPE, "classifier/model.pt")]))
    write("mar_archive", "bomb.mar", zip_bytes(good + [("zeros.bin", b"\0" * 200_000)]))
    outside = dict(MANIFEST, model=dict(MANIFEST["model"], serializedFile="../outside.pt"))
    write("mar_archive", "manifest-outside.mar",
          zip_bytes([("MAR-INF/MANIFEST.json", json.dumps(outside).encode())] + good[1:]))

    write("manifest", "seed.json", manifest)
    write("manifest", "outside.json", json.dumps(outside).encode())
    write("manifest", "minimal.json", b'{"model": {"modelName": "m", "serializedFile": "m.pt"}}')
    write("manifest", "empty.json", b"{}")

    write("model_config", "seed.yaml", CONFIG.encode())
    write("model_config", "torchrun.yaml",
          b"parallelType: pp\nparallelLevel: 2\ntorchrun:\n  nproc-per-node: 2\ndeviceIds: [0, 1]\n")
    write("model_config", "anchors.yaml", b"a: &x [1, 2]\nb: *x\nminWorkers: -3\n")

    write("properties", "seed.properties", PROPERTIES.encode())
    write("properties", "continued.properties",
          b"cors_allowed_origin=*\\\n  more\nallowed_urls=file://.*,s3://b/.*\nkey\\:with\\=escapes = v\\u00e9\n")


if __name__ == "__main__":
    main()
