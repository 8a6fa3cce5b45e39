//! `torchfn-local convert`: turns an eager-mode archive (`--model-file` with a state_dict),
//! which torchfn refuses, into a TorchScript archive it serves.
//!
//! The archive is unpacked here, by torchfn-archive (the one reader of the MAR layout, with
//! its safety checks); the rest is done in Python by `convert.py`, embedded in the binary and run with the
//! project venv's interpreter (torch and torch-model-archiver, from `scripts/setup`): it
//! builds the model as TorchServe's base handler does, scripts it (or traces it with an
//! example input), checks it against the eager model and writes `<out>/<model-name>.mar`
//! with the real torch-model-archiver, keeping the name, version, handler, extra files and
//! model-config YAML. On success its one-line JSON summary is printed on stdout:
//!     {"archive": "/srv/store/classifier.mar", "method": "script", "model": "classifier", "version": "1.0"}

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context};

/// The converter, run as `python convert.py ARCHIVE OUT --unpacked DIR [flags]`.
const SCRIPT: &str = include_str!("convert.py");

/// The venv `scripts/setup` makes, under torchfn's cache folder.
const VENV_PYTHON: &str = "venv-torch-2.13.0/bin/python";

/// Exit statuses of `convert.py` (it prints the reason on stderr, after `convert: `).
const EXIT_FAILED: i32 = 1;
const EXIT_USAGE: i32 = 2;
const EXIT_ALREADY_TORCHSCRIPT: i32 = 3;

/// Flags of `torchfn-local convert`.
#[derive(clap::Args, Debug, Clone)]
pub struct ConvertArgs {
    /// The eager archive: a .mar, a .tar.gz (--archive-format tgz) or a no-archive folder.
    pub archive: PathBuf,

    /// Folder the new `<model-name>.mar` is written to (made when missing).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub out: PathBuf,

    /// Trace with --example-input instead of scripting. Without it the model is scripted,
    /// and traced only when scripting fails and an example input is given.
    #[arg(long)]
    pub trace: bool,

    /// One model input without the batch dimension, as JSON (`[0.1, 0.2, 0.3]`) or
    /// `@file.json`. Used to trace, and to check the converted model's output against the
    /// eager model's (within 1e-5).
    #[arg(long, value_name = "JSON|@FILE")]
    pub example_input: Option<String>,

    /// Name of the new archive (default: the original's).
    #[arg(long)]
    pub model_name: Option<String>,

    /// Version of the new archive (default: the original's).
    #[arg(long = "version", id = "model_version", value_name = "VERSION")]
    pub model_version: Option<String>,

    /// Overwrite `<out>/<model-name>.mar` when it exists.
    #[arg(long)]
    pub force: bool,

    /// Python with torch and torch-model-archiver. Default: $TORCHFN_PYTHON, else the venv
    /// `scripts/setup` makes (under $TORCHFN_CACHE, default ~/.cache/torchfn), else python3.
    #[arg(long, value_name = "PATH")]
    pub python: Option<PathBuf>,
}

/// Runs the conversion; the new archive's summary goes to stdout, progress and the reason
/// for a failure to stderr.
pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    let interpreter = python(args.python.as_deref());
    let dir = tempfile::Builder::new()
        .prefix("torchfn-convert-")
        .tempdir()
        .context("could not make a temporary folder for the converter")?;
    let script = dir.path().join("convert.py");
    std::fs::write(&script, SCRIPT)
        .with_context(|| format!("could not write {}", script.display()))?;
    if !args.archive.exists() {
        bail!("{} does not exist", args.archive.display());
    }
    let archive = torchfn_archive::mar::open(
        &args.archive,
        &dir.path().join("unpacked"),
        &torchfn_archive::mar::Limits::default(),
    )
    .with_context(|| format!("could not read {}", args.archive.display()))?;

    let mut cmd = Command::new(&interpreter);
    cmd.arg(&script)
        .arg(&args.archive)
        .arg(&args.out)
        .arg("--unpacked")
        .arg(archive.dir())
        // Handlers torch-model-archiver knows by name: the archive holds no file for them.
        .arg("--named-handlers")
        .arg(torchfn_archive::handlers::TORCHSERVE.join(","));
    if args.trace {
        cmd.arg("--trace");
    }
    for (flag, value) in [
        ("--example-input", &args.example_input),
        ("--model-name", &args.model_name),
        ("--version", &args.model_version),
    ] {
        if let Some(v) = value {
            cmd.arg(flag).arg(v);
        }
    }
    if args.force {
        cmd.arg("--force");
    }
    // stdout and stderr are this process's: the summary, and the reasons.
    cmd.env("PYTHONUNBUFFERED", "1")
        .env("PYTHONDONTWRITEBYTECODE", "1");

    let status = cmd.status().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            anyhow!(
                "no Python at {}: run scripts/setup, or pass --python (or set TORCHFN_PYTHON) \
                 with a Python that has torch and torch-model-archiver",
                interpreter.display()
            )
        } else {
            anyhow!("could not run {}: {e}", interpreter.display())
        }
    })?;
    match status.code() {
        Some(0) => Ok(()),
        Some(EXIT_ALREADY_TORCHSCRIPT) => bail!(
            "{} is already TorchScript: nothing converted",
            args.archive.display()
        ),
        Some(EXIT_USAGE) => bail!("nothing converted (the reason is above)"),
        Some(EXIT_FAILED) => bail!(
            "could not convert {} (the reason is above)",
            args.archive.display()
        ),
        Some(code) => bail!(
            "{} exited with status {code} while converting {}",
            interpreter.display(),
            args.archive.display()
        ),
        None => bail!(
            "{} was stopped by a signal while converting {}",
            interpreter.display(),
            args.archive.display()
        ),
    }
}

/// The interpreter to run: `--python`, `TORCHFN_PYTHON`, the project venv when it exists,
/// else `python3` from PATH.
fn python(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    if let Some(p) = env_path("TORCHFN_PYTHON") {
        return p;
    }
    cache_dir()
        .map(|c| c.join(VENV_PYTHON))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("python3"))
}

/// torchfn's cache folder as `scripts/setup` finds it:
/// `${TORCHFN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/torchfn}`.
fn cache_dir() -> Option<PathBuf> {
    env_path("TORCHFN_CACHE")
        .or_else(|| env_path("XDG_CACHE_HOME").map(|d| d.join("torchfn")))
        .or_else(|| env_path("HOME").map(|h| h.join(".cache/torchfn")))
}

/// An environment variable as a path; unset and empty are alike, as in the shell's `:-`.
fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    /// The shape `torchfn-local` gives it: a subcommand of a command with `--version`.
    #[derive(Parser)]
    #[command(name = "torchfn-local", version)]
    struct Cli {
        #[command(subcommand)]
        command: Option<Sub>,
    }

    #[derive(clap::Subcommand)]
    enum Sub {
        Convert(ConvertArgs),
    }

    fn parse(args: &[&str]) -> ConvertArgs {
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        match cli.command {
            Some(Sub::Convert(c)) => c,
            None => panic!("no subcommand parsed from {args:?}"),
        }
    }

    #[test]
    fn flags_parse() {
        Cli::command().debug_assert();
        let c = parse(&[
            "torchfn-local",
            "convert",
            "eager.mar",
            "--out",
            "store",
            "--example-input",
            "[1, 2]",
            "--version",
            "2.0",
            "--trace",
        ]);
        assert_eq!(c.archive, PathBuf::from("eager.mar"));
        assert_eq!(c.out, PathBuf::from("store"));
        assert_eq!(c.example_input.as_deref(), Some("[1, 2]"));
        assert_eq!(c.model_version.as_deref(), Some("2.0"));
        assert!(c.trace && !c.force);
        assert_eq!(c.python, None);
        let c = parse(&["torchfn-local", "convert", "eager.mar"]);
        assert_eq!(c.out, PathBuf::from("."));
        assert!(Cli::try_parse_from(["torchfn-local", "convert"]).is_err());
    }

    #[test]
    fn the_python_flag_wins() {
        assert_eq!(
            python(Some(Path::new("/opt/py/bin/python"))),
            PathBuf::from("/opt/py/bin/python")
        );
    }
}
