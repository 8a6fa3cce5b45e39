"""Writes the fuzz targets' seed corpus (fuzz/corpus/<target>/), small and deterministic:
valid archives in each format and the hostile shapes the unpacker must refuse, manifests,
model-config YAMLs and config.properties files, and request bodies for every content type
the handlers read (a first byte picks the content type, see fuzz_targets/request_decoding.rs).
Run from the repository root:
    python3 fuzz/make_corpus.py
"""

import base64
import io
import json
import os
import struct
import tarfile
import urllib.parse
import zipfile
import zlib

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


def png_bytes(width, height):
    """An RGB PNG of a gradient, from the standard library."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    rows = b"".join(b"\0" + bytes((x * 40 + y * 20) % 256 for x in range(width) for _ in range(3))
                    for y in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def bmp_bytes(width, height):
    """A 24-bit BMP, rows padded to four bytes."""
    row = bytes(range(width * 3)) + b"\0" * ((4 - width * 3 % 4) % 4)
    pixels = row * height
    header = b"BM" + struct.pack("<IHHI", 54 + len(pixels), 0, 0, 54)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, len(pixels), 2835, 2835, 0, 0)
    return header + info + pixels


def npy_bytes(descr, shape, data, fortran=False):
    header = "{'descr': '%s', 'fortran_order': %s, 'shape': %s, }" % (
        descr, "True" if fortran else "False", repr(tuple(shape)))
    header = header.encode() + b" " * ((64 - (len(header) + 11) % 64) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + data


# The request target's first byte: which content type (index into its TYPES), plus 0x80 for
# an X-Tensor-Shape of 2,2.
NONE, JSON, NPY, OCTET, MULTIPART, URLENCODED, PNG, TEXT = range(8)
SHAPE = 0x80


def requests():
    png, bmp = png_bytes(3, 2), bmp_bytes(2, 2)
    b64 = base64.b64encode(png).decode()
    four = struct.pack("<4f", 1.0, 2.5, -3.0, 4.0)
    yield "json-data", JSON, b'{"data": [1.0, 2.0, 3.0]}'
    yield "json-list", JSON, b'[{"data": [1, 2]}, {"body": [3, 4]}, [5, 6]]'
    yield "json-nested", JSON, b'{"features": [[1.5, -2], [3e2, 4]]}'
    yield "kserve-v1", JSON, b'{"instances": [[1, 2], [3, 4]]}'
    yield "kserve-b64", JSON, json.dumps({"instances": [{"data": {"b64": b64}}]}).encode()
    yield "json-image", JSON, json.dumps({"data": b64}).encode()
    yield "oip-v2", JSON, json.dumps({"inputs": [
        {"name": "x", "shape": [2, 2], "datatype": "FP32", "data": [1, 2, 3, 4]},
        {"name": "ids", "shape": [1, 3], "datatype": "INT64", "data": [[1, 2, 3]]},
        {"name": "img", "shape": [1], "datatype": "BYTES", "data": [b64]}]}).encode()
    yield "oip-v2-bool", JSON, b'{"inputs": [{"name": "m", "shape": [2], "datatype": "BOOL", "data": [true, false]}]}'
    yield "npy-f4", NPY, npy_bytes("<f4", (2, 2), four)
    yield "npy-f8-big", NPY, npy_bytes(">f8", (2,), struct.pack(">2d", 1.0, 2.0))
    yield "npy-fortran", NPY, npy_bytes("<i8", (2, 2), struct.pack("<4q", 1, 2, 3, 4), fortran=True)
    yield "npy-bool", NPY, npy_bytes("|b1", (3,), b"\x01\x00\x01")
    yield "npy-f2", NPY, npy_bytes("<f2", (2,), struct.pack("<2e", 1.0, -2.0))
    yield "octet-shaped", OCTET | SHAPE, four
    yield "octet-image", OCTET, png
    yield "multipart-image", MULTIPART, (
        b'--XyZ\r\nContent-Disposition: form-data; name="data"; filename="x.png"\r\n'
        b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--XyZ--\r\n")
    yield "multipart-two", MULTIPART, (
        b'--XyZ\r\nContent-Disposition: form-data; name="data"\r\n\r\n[1, 2]\r\n'
        b'--XyZ\r\nContent-Disposition: form-data; name="body"\r\n\r\n' + bmp + b"\r\n--XyZ--\r\n")
    yield "urlencoded", URLENCODED, ("data=" + urllib.parse.quote(b64)).encode()
    yield "png", PNG, png
    yield "bmp", NONE, bmp
    yield "png-truncated", PNG, png[: len(png) // 2]
    yield "text", TEXT, "a short review, with ünïcode".encode()


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

    for name, selector, body in requests():
        write("request_decoding", name, bytes([selector]) + body)

    write("properties", "seed.properties", PROPERTIES.encode())
    write("properties", "continued.properties",
          b"cors_allowed_origin=*\\\n  more\nallowed_urls=file://.*,s3://b/.*\nkey\\:with\\=escapes = v\\u00e9\n")


if __name__ == "__main__":
    main()
