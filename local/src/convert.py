"""Converts an eager-mode TorchServe model archive into a TorchScript archive torchfn serves.

An eager archive (torch-model-archiver --model-file model.py --serialized-file weights.pth)
holds a Python class and its state_dict; torchfn runs TorchScript only. This script builds
the model as TorchServe's base handler does (the one nn.Module class of the model file, made
with no arguments, the state_dict loaded, eval()), scripts it (or traces it with an example
input), checks the result against the eager model, and archives the TorchScript file with
the real torch-model-archiver: same name, version, handler, extra files and model-config
YAML, `--serialized-file model.pt` and no `--model-file`.

`torchfn-local convert` runs it with the project venv's Python (torch and
torch-model-archiver, installed by scripts/setup), after unpacking the archive itself
(torchfn-archive is the one reader of the MAR layout):
    python convert.py IN_ARCHIVE OUT_DIR --unpacked DIR --named-handlers A,B,...
        [--trace] [--example-input JSON|@FILE] [--model-name NAME] [--version V] [--force]

IN_ARCHIVE names the original (.mar, .tar.gz or no-archive folder) in messages and for the
default model name; DIR is it unpacked (the folder holding MAR-INF/). The new archive is
OUT_DIR/<model-name>.mar. On success stdout is one JSON line:
    {"archive": "...", "method": "script"|"trace", "model": "...", "version": "..."}
Anything else the model code or torch prints goes to stderr. A failure is one line on
stderr starting `convert: `. Exit status: 0 converted, 1 conversion failed, 2 bad command
line, 3 already TorchScript (nothing written).

Uses only torch and the standard library.
"""

import argparse
import importlib.util
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ALREADY_TORCHSCRIPT = 3

MANIFEST = "MAR-INF/MANIFEST.json"
# The converted model's file name inside the new archive.
SERIALIZED = "model.pt"
# The largest difference allowed between the eager and the converted model's outputs.
TOLERANCE = 1e-5
# torch-model-archiver 0.12's rule for model names.
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_\-.]*$")
class Fail(Exception):
    """Ends the conversion: `message` on stderr, `code` as the exit status."""

    def __init__(self, message, code=EXIT_FAILED):
        super().__init__(message)
        self.code = code


def one_line(text, limit=800):
    """Text on a single line (runs of whitespace collapsed), cut at `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def describe(exc):
    """An exception as `Type: message` on one line."""
    message = one_line(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise Fail(f"{message} ({one_line(self.format_usage())})", EXIT_USAGE)


def parse_args(argv):
    p = Parser(prog="convert.py", description="Convert an eager-mode model archive to TorchScript.")
    p.add_argument("archive", help=".mar, .tar.gz or no-archive folder holding an eager model")
    p.add_argument("out_dir", help="folder for the new <model-name>.mar (made when missing)")
    p.add_argument("--trace", action="store_true",
                   help="trace with --example-input instead of scripting")
    p.add_argument("--example-input", metavar="JSON|@FILE",
                   help="one model input without the batch dimension, as a JSON number or "
                        "nested list, or @file (or a path) holding one")
    p.add_argument("--model-name", help="name of the new archive (default: the original's)")
    p.add_argument("--version", help="version of the new archive (default: the original's)")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT_DIR/<model-name>.mar when it exists")
    p.add_argument("--unpacked", required=True,
                   help="the archive as torchfn-local unpacked it (the folder holding MAR-INF/)")
    p.add_argument("--named-handlers", required=True,
                   help="comma-separated handler names torch-model-archiver knows by name "
                        "(the archive holds no file for them)")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------------------
# the example input


def read_example(spec):
    """The --example-input value as parsed JSON: inline JSON, `@file`, or a file path."""
    if spec.startswith("@"):
        path = spec[1:]
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise Fail(f"--example-input {spec}: could not read {path}: {e.strerror}", EXIT_USAGE)
    else:
        text = spec
        try:
            json.loads(text)
        except ValueError:
            if os.path.isfile(spec):
                with open(spec, encoding="utf-8") as f:
                    text = f.read()
    try:
        value = json.loads(text)
    except ValueError as e:
        raise Fail(f"--example-input is not JSON (nor a file holding JSON): {e}", EXIT_USAGE)
    check_numbers(value)
    return value


def check_numbers(value):
    """Accepts a number or a rectangular nested list of numbers."""
    if isinstance(value, bool) or not isinstance(value, (int, float, list)):
        raise Fail("--example-input must be a number or a nested list of numbers (one "
                   "instance, without the batch dimension), for example [0.1, 0.2, 0.3]",
                   EXIT_USAGE)
    if isinstance(value, list):
        if not value:
            raise Fail("--example-input holds an empty list", EXIT_USAGE)
        shapes = {json.dumps(shape_of(v)) for v in value}
        if len(shapes) != 1:
            raise Fail("--example-input is ragged: its nested lists differ in length", EXIT_USAGE)
        for v in value:
            check_numbers(v)


def shape_of(value):
    shape = []
    while isinstance(value, list):
        shape.append(len(value))
        value = value[0] if value else None
    return shape


# ---------------------------------------------------------------------------------------
# opening the archive


def safe_relative(name):
    """An archive entry name as a relative path inside the extraction folder, or Fail."""
    if "\x00" in name:
        raise Fail(f"archive entry {name!r} has a NUL in its name; refused")
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name):
        raise Fail(f"archive entry {name} is an absolute path; refused")
    parts = [p for p in re.split(r"[/\\]", name) if p not in ("", ".")]
    if ".." in parts:
        raise Fail(f"archive entry {name} climbs out with '..'; refused")
    return parts


def read_manifest(root, archive):
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise Fail(f"{archive}: could not read {MANIFEST}: {describe(e)}")
    model = manifest.get("model") if isinstance(manifest, dict) else None
    if not isinstance(model, dict):
        raise Fail(f"{archive}: {MANIFEST} has no \"model\" object")
    return manifest, model


def archive_file(root, model, key, archive):
    """The path of the file the manifest names under `key`, or None when it names none."""
    name = model.get(key)
    if name is None or name == "":
        return None
    if not isinstance(name, str):
        raise Fail(f"{archive}: the manifest's {key} is not a string")
    path = os.path.join(root, *safe_relative(name))
    if not os.path.isfile(path):
        raise Fail(f"{archive}: the manifest's {key} {name} is not in the archive")
    return path


def default_name(archive):
    base = os.path.basename(os.path.normpath(archive))
    for ext in (".tar.gz", ".mar", ".tgz", ".model"):
        if base.endswith(ext):
            base = base[: -len(ext)]
            break
    return re.sub(r"\W", "_", base)


def handler_file(root, handler, archive, named_handlers):
    """The handler's file in the archive (None for a handler the archiver knows by name)."""
    if handler in named_handlers:
        return None
    # As torch-model-archiver stores it: `x.py` as is, `x` and `x:fn` as `x.py`.
    name = handler if ".py" in handler else handler.split(":")[0] + ".py"
    path = os.path.join(root, *safe_relative(name))
    if not os.path.isfile(path):
        raise Fail(f"{archive}: the manifest's handler {handler} names {name}, which is not in the archive")
    return path


def stage_extras(root, skip, dest):
    """Copies every file of the archive but MAR-INF/ and `skip` under `dest`; returns how many."""
    count = 0
    skip = {os.path.normpath(p) for p in skip if p}
    for folder, dirs, files in os.walk(root):
        rel_folder = os.path.relpath(folder, root)
        dirs[:] = sorted(d for d in dirs if not (rel_folder == "." and d == "MAR-INF") and d != "__pycache__")
        for f in sorted(files):
            src = os.path.normpath(os.path.join(folder, f))
            if src in skip or f.endswith(".pyc"):
                continue
            rel = os.path.relpath(src, root)
            if rel == SERIALIZED:
                raise Fail(f"the archive holds a file named {SERIALIZED}, the name the converted "
                           "model takes in the new archive; rename it")
            target = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copy2(src, target)
            count += 1
    return count


# ---------------------------------------------------------------------------------------
# building, converting and checking the model


def import_model_file(path, model_file):
    """Imports the model file the way TorchServe does: by its stem, its folder on sys.path."""
    stem = os.path.splitext(os.path.basename(path))[0]
    if stem in sys.modules:
        raise Fail(f"the model file {model_file} is named like the Python module {stem}, which "
                   "is already imported; rename it")
    sys.path.insert(0, os.path.dirname(path))
    spec = importlib.util.spec_from_file_location(stem, path)
    if spec is None or spec.loader is None:
        raise Fail(f"could not import the model file {model_file}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[stem] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        raise Fail(f"importing the model file {model_file} failed: {describe(e)}")
    return module


def model_class(module, model_file):
    import torch

    classes = [
        cls for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__ and issubclass(cls, torch.nn.Module)
    ]
    if len(classes) == 1:
        return classes[0]
    if not classes:
        raise Fail(f"the model file {model_file} defines no torch.nn.Module subclass; TorchServe "
                   "needs exactly one there")
    names = ", ".join(c.__name__ for c in classes)
    raise Fail(f"the model file {model_file} defines {len(classes)} torch.nn.Module subclasses "
               f"({names}); TorchServe needs exactly one there: move the others to another "
               "file of the archive and import them")


def build_model(root, model, model_path, weights_path):
    import torch

    model_file = model["modelFile"]
    module = import_model_file(model_path, model_file)
    cls = model_class(module, model_file)
    try:
        net = cls()
    except Exception as e:
        raise Fail(f"{cls.__name__}() failed: {describe(e)}; TorchServe makes the model with no "
                   "arguments, so every __init__ argument needs a default")
    if weights_path is not None:
        weights = model.get("serializedFile")
        try:
            state = torch.load(weights_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise Fail(f"could not load the state_dict {weights}: {describe(e)} (the serialized "
                       "file of an eager archive is torch.save(model.state_dict(), ...))")
        if not isinstance(state, dict):
            raise Fail(f"{weights} holds a {type(state).__name__}, not a state_dict (save it with "
                       "torch.save(model.state_dict(), ...))")
        try:
            net.load_state_dict(state)
        except Exception as e:
            raise Fail(f"the state_dict {weights} does not fit {cls.__name__}: {describe(e)}")
    net.eval()
    return net, cls.__name__


def script_failure(exc):
    """Why torch.jit.script refused, on one line: the first line and where."""
    lines = [line for line in str(exc).splitlines() if line.strip()]
    first = lines[0].strip().rstrip(":") if lines else type(exc).__name__
    where = ""
    for i, line in enumerate(lines):
        m = re.match(r'\s*File "([^"]+)", line (\d+)', line)
        if m:
            code = lines[i + 1].strip() if i + 1 < len(lines) else ""
            where = f" (at {os.path.basename(m.group(1))} line {m.group(2)}: {code})"
            break
    return one_line(first + where, 600)


def trace(net, example):
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        try:
            traced = torch.jit.trace(net, example)
        except Exception as e:
            raise Fail(f"torch.jit.trace failed: {describe(e)}")
    said = set()
    for w in caught:
        text = one_line(w.message, 400)
        if issubclass(w.category, torch.jit.TracerWarning) and text not in said:
            # Each one marks something the trace fixed to the example's values.
            said.add(text)
            print(f"convert: warning: {text}", file=sys.stderr)
    return traced


def max_difference(want, got, where="output"):
    """The largest absolute difference between two outputs of the same structure."""
    import torch

    if isinstance(want, torch.Tensor):
        if not isinstance(got, torch.Tensor):
            raise Fail(f"the converted model's {where} is a {type(got).__name__}, the eager "
                       "model's a tensor")
        if want.shape != got.shape:
            raise Fail(f"the converted model's {where} has shape {list(got.shape)}, the eager "
                       f"model's {list(want.shape)}")
        if want.numel() == 0:
            return 0.0
        if want.is_floating_point() or want.is_complex():
            return float((want.double() - got.double()).abs().max())
        return 0.0 if torch.equal(want, got) else float("inf")
    if isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            raise Fail(f"the converted model's {where} differs in structure from the eager model's")
        return max([max_difference(w, g, f"{where}[{i}]") for i, (w, g) in enumerate(zip(want, got))],
                   default=0.0)
    if isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise Fail(f"the converted model's {where} differs in keys from the eager model's")
        return max([max_difference(want[k], got[k], f"{where}[{k!r}]") for k in want], default=0.0)
    return 0.0 if want == got else float("inf")


def convert_model(net, example, want_trace):
    """(TorchScript module, "script" | "trace")."""
    import torch

    if want_trace:
        return trace(net, example), "trace"
    try:
        return torch.jit.script(net), "script"
    except Exception as e:
        why = script_failure(e)
    if example is None:
        raise Fail(f"torch.jit.script failed: {why}; tracing instead needs an example input: "
                   "pass --example-input with one instance without the batch dimension, for "
                   "example --example-input '[0.1, 0.2, 0.3]'")
    print(f"convert: torch.jit.script failed ({why}); tracing with the example input",
          file=sys.stderr)
    return trace(net, example), "trace"


# ---------------------------------------------------------------------------------------
# the conversion


def archiver():
    here = os.path.join(os.path.dirname(sys.executable), "torch-model-archiver")
    found = here if os.path.isfile(here) else shutil.which("torch-model-archiver")
    if not found:
        raise Fail(f"torch-model-archiver is not beside {sys.executable} nor on PATH: use a "
                   "Python with torch and torch-model-archiver (scripts/setup makes one)")
    return found


def convert(args):
    example = read_example(args.example_input) if args.example_input is not None else None
    if args.trace and example is None:
        raise Fail("--trace needs --example-input (one instance without the batch dimension)",
                   EXIT_USAGE)
    if args.model_name is not None and not MODEL_NAME.match(args.model_name):
        raise Fail(f"--model-name {args.model_name} is not a model name (allowed: "
                   f"{MODEL_NAME.pattern})", EXIT_USAGE)
    if args.version is not None and not args.version.strip():
        raise Fail("--version is empty", EXIT_USAGE)
    archive = args.archive
    if not os.path.exists(archive):
        raise Fail(f"{archive} does not exist", EXIT_USAGE)
    out_dir = os.path.abspath(args.out_dir)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise Fail(f"{args.out_dir} is not a folder", EXIT_USAGE)

    with tempfile.TemporaryDirectory(prefix="torchfn-convert-") as tmp:
        root = args.unpacked
        manifest, model = read_manifest(root, archive)
        if not model.get("modelFile"):
            raise Fail(f"{archive} is already TorchScript; nothing to convert (its manifest "
                       "names no modelFile)", EXIT_ALREADY_TORCHSCRIPT)
        runtime = manifest.get("runtime", "python")
        if runtime not in ("python", "python3"):
            raise Fail(f"{archive}: runtime {runtime} archives are not converted")
        name = args.model_name or model.get("modelName") or default_name(archive)
        if not MODEL_NAME.match(name):
            raise Fail(f"{archive}: the model name {name} is not one torch-model-archiver "
                       "takes; pass --model-name")
        version = args.version or str(model.get("modelVersion") or "1.0")
        handler = model.get("handler")
        if not isinstance(handler, str) or not handler:
            raise Fail(f"{archive}: the manifest names no handler")
        target = os.path.join(out_dir, name + ".mar")
        if os.path.exists(target) and not args.force:
            raise Fail(f"{target} exists; pass --force to overwrite it, or another --out or "
                       "--model-name", EXIT_USAGE)
        tool = archiver()

        model_path = archive_file(root, model, "modelFile", archive)
        weights_path = archive_file(root, model, "serializedFile", archive)
        config_path = archive_file(root, model, "configFile", archive)
        requirements_path = archive_file(root, model, "requirementsFile", archive)
        handler_path = handler_file(root, handler, archive, set(args.named_handlers.split(",")))
        extras = os.path.join(tmp, "extra")
        os.makedirs(extras)
        n_extras = stage_extras(
            root, [model_path, weights_path, config_path, requirements_path, handler_path], extras)

        try:
            import torch
        except ImportError as e:
            raise Fail(f"{sys.executable} cannot import torch ({describe(e)}): use a Python with "
                       "torch and torch-model-archiver, such as the venv scripts/setup makes")

        sys.dont_write_bytecode = True
        net, class_name = build_model(root, model, model_path, weights_path)
        example_tensor = None
        if example is not None:
            example_tensor = torch.tensor(example, dtype=torch.float32).unsqueeze(0)
        converted, method = convert_model(net, example_tensor, args.trace)
        done_as = {"script": "scripted", "trace": "traced"}[method]

        pt = os.path.join(tmp, SERIALIZED)
        try:
            torch.jit.save(converted, pt)
            reloaded = torch.jit.load(pt, map_location="cpu")
        except Exception as e:
            raise Fail(f"the {done_as} {class_name} could not be saved and loaded back: {describe(e)}")
        if example_tensor is not None:
            with torch.no_grad():
                try:
                    want = net(example_tensor)
                except Exception as e:
                    raise Fail(f"the eager {class_name} fails on the example input (shape "
                               f"{list(example_tensor.shape)} with the batch dimension): {describe(e)}")
                try:
                    got = reloaded(example_tensor)
                except Exception as e:
                    raise Fail(f"the {done_as} {class_name} fails on the example input: {describe(e)}")
            diff = max_difference(want, got)
            if not diff <= TOLERANCE:
                raise Fail(f"the {done_as} {class_name} differs from the eager model by {diff:.3g} "
                           f"(more than {TOLERANCE}) on the example input")
        else:
            print("convert: no --example-input, so the converted model was not compared with the "
                  "eager one", file=sys.stderr)

        os.makedirs(out_dir, exist_ok=True)
        cmd = [tool, "--model-name", name, "--version", version, "--serialized-file", pt,
               "--handler", handler, "--export-path", out_dir, "--archive-format", "default"]
        if n_extras:
            cmd += ["--extra-files", extras]
        if config_path:
            cmd += ["--config-file", config_path]
        if requirements_path:
            cmd += ["--requirements-file", requirements_path]
        if runtime != "python":
            cmd += ["--runtime", runtime]
        if args.force:
            cmd.append("--force")
        # The archiver gathers files in $TMPDIR/<model-name>: a private TMPDIR keeps two
        # conversions of one model apart. It runs in the archive folder, where it finds a
        # custom handler by the manifest's name for it.
        private_tmp = os.path.join(tmp, "archiver-tmp")
        os.makedirs(private_tmp)
        done = subprocess.run(cmd, cwd=root, env=dict(os.environ, TMPDIR=private_tmp),
                              stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if done.returncode != 0:
            said = [line for line in (done.stderr + done.stdout).splitlines() if line.strip()]
            raise Fail(f"torch-model-archiver failed (status {done.returncode}): "
                       f"{one_line(said[-1] if said else 'no message')}")
        if not os.path.isfile(target):
            raise Fail(f"torch-model-archiver wrote no {target}")
    return {"archive": target, "method": method, "model": name, "version": version}


def main(argv):
    # stdout carries only the summary: whatever else is printed (by the model's code, torch,
    # or C++ below it) goes to stderr.
    sys.stdout.flush()
    summary_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        summary = convert(parse_args(argv))
    except Fail as e:
        sys.stdout.flush()
        print(f"convert: {one_line(e)}", file=sys.stderr)
        return e.code
    except KeyboardInterrupt:
        print("convert: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        sys.stdout.flush()
        print(f"convert: unexpected {describe(e)}", file=sys.stderr)
        return EXIT_FAILED
    sys.stdout.flush()
    with os.fdopen(summary_fd, "w") as out:
        out.write(json.dumps(summary) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
