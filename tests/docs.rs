//! The documentation, checked against the code (issue 19):
//!
//! - `docs/configuration.md` names every flag of `torchfn-local --help` (the built binary) and
//!   of `torchfn-local convert --help`, every flag of the other binaries' clap definitions (each
//!   in its program's section), every `TORCHFN_*` variable the source tree's `.rs` files and
//!   `scripts/` mention, every `config.properties` key the settings code knows, every key of
//!   the `models` JSON and every model-config YAML key;
//! - `docs/performance.md` holds one `scripts/bench` run between its markers, with a header
//!   that parses, target lines that are the ones `torchfn-bench` prints today, and exactly what
//!   `scripts/bench-docs` pastes;
//! - every fenced block whose info string is exactly `sh runnable`, in README.md and docs/*.md,
//!   runs against one `torchfn-local` serving what `scripts/quickstart` serves (see
//!   [`run_block`] for the contract).
//!
//! Run: `cargo test -p torchfn-local --test docs` (scripts/test runs it with the rest).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use torchfn_test_support::{fixtures, path_str, repo_root, server::Server, signal, venv_python};

// ---------------------------------------------------------------------------------------
// The configuration reference.

/// `TORCHFN_*` names in the source that are no setting of torchfn's, each with the reason.
const NOT_SETTINGS: &[(&str, &str)] = &[
    (
        "TORCHFN_LAMBDA_TEST_NUMBER",
        "crates/lambda/src/settings.rs: a field of its unit test's example settings struct",
    ),
    (
        "TORCHFN_LAMBDA_TEST_NAME",
        "crates/lambda/src/settings.rs: a field of its unit test's example settings struct",
    ),
    (
        "TORCHFN_LAMBDA_TEST_PREFIX",
        "crates/lambda/src/settings.rs: a field of its unit test's example settings struct",
    ),
    (
        "TORCHFN_LAMBDA_TEST_CHILD",
        "crates/lambda/src/settings.rs: marks the child process of its own unit test",
    ),
];

/// The files holding clap definitions, each with the program whose section of
/// docs/configuration.md must name their flags (`None`: not a program's).
const CLAP_SOURCES: &[(&str, Option<&str>)] = &[
    ("local/src/main.rs", Some("torchfn-local")),
    ("local/src/convert.rs", Some("torchfn-local")),
    ("functions/model/src/lib.rs", Some("torchfn-model")),
    ("functions/registrar/src/main.rs", Some("torchfn-registrar")),
    ("bench/src/main.rs", Some("torchfn-bench")),
    ("bench/src/soak.rs", Some("torchfn-soak")),
    // Its only clap struct is its unit test's example.
    ("crates/lambda/src/settings.rs", None),
];

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo_root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn configuration() -> String {
    read("docs/configuration.md")
}

/// The `## ` section of a page whose heading names `program`, up to the next `## ` heading.
fn section<'a>(page: &'a str, program: &str) -> &'a str {
    let mut start = None;
    let mut offset = 0;
    for line in page.split_inclusive('\n') {
        if line.starts_with("## ") {
            if let Some(start) = start {
                return &page[start..offset];
            }
            if line.contains(program) {
                start = Some(offset);
            }
        }
        offset += line.len();
    }
    match start {
        Some(s) => &page[s..],
        None => panic!("docs/configuration.md has no `## ` section whose heading names {program}"),
    }
}

/// Whether `text` holds `word` with no letter, digit, `_` or `-` on either side.
fn mentions(text: &str, word: &str) -> bool {
    let part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    text.match_indices(word).any(|(i, _)| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(part) && !after.is_some_and(part)
    })
}

/// The flags `--help` lists (`--long` and `-s`), from the option lines (clap indents the
/// wrapped descriptions further).
fn help_flags(args: &[&str]) -> BTreeSet<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_torchfn-local"))
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "torchfn-local {args:?} failed");
    let help = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeSet::new();
    for line in help.lines() {
        let text = line.trim_start();
        if !text.starts_with('-') || line.len() - text.len() > 6 {
            continue;
        }
        for token in text.split([' ', ',']) {
            let name: String = token
                .trim_start_matches('-')
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if token.starts_with("--") {
                flags.insert(format!("--{name}"));
                break;
            }
            if token.starts_with('-') && name.len() == 1 {
                flags.insert(format!("-{name}"));
            }
        }
    }
    assert!(!flags.is_empty(), "no flags found in:\n{help}");
    flags
}

/// The flags a file's clap derive attributes declare: `--field-name` for `#[arg(long)]`, the
/// name given by `long = "..."`, `-x` for `short = 'x'`, and each `alias`.
fn clap_flags(source: &str) -> BTreeSet<String> {
    let mut flags = BTreeSet::new();
    let mut rest = source;
    while let Some(at) = rest.find("#[arg(") {
        let attr_start = at + "#[arg(".len();
        let attr_len = closing_paren(&rest[attr_start..]);
        let attr = &rest[attr_start..attr_start + attr_len];
        rest = &rest[attr_start + attr_len..];
        // The field: the first line after the attribute that is no attribute or comment.
        let field = rest
            .lines()
            .skip(1)
            .map(str::trim)
            .find(|l| !l.is_empty() && !l.starts_with("#[") && !l.starts_with("//"))
            .unwrap_or_default();
        let field = field.trim_start_matches("pub ");
        let field = field.split(':').next().unwrap_or_default().trim();
        let words: Vec<&str> = attr
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .collect();
        if let Some(long) = quoted_after(attr, "long") {
            flags.insert(format!("--{long}"));
        } else if words.contains(&"long") {
            flags.insert(format!("--{}", field.replace('_', "-")));
        }
        if let Some(alias) = quoted_after(attr, "alias") {
            flags.insert(format!("--{alias}"));
        }
        if let Some(i) = attr.find("short = '") {
            flags.insert(format!("-{}", &attr[i + "short = '".len()..][..1]));
        }
    }
    flags
}

/// The length of an attribute's arguments up to its closing parenthesis (strings skipped).
fn closing_paren(text: &str) -> usize {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for (i, c) in text.char_indices() {
        match (in_string, c) {
            (true, '\\') if !escaped => {
                escaped = true;
                continue;
            }
            (true, '"') if !escaped => in_string = false,
            (false, '"') => in_string = true,
            (false, '(') => depth += 1,
            (false, ')') if depth == 0 => return i,
            (false, ')') => depth -= 1,
            _ => {}
        }
        escaped = false;
    }
    panic!("an `#[arg(` attribute is never closed");
}

/// The string given to `key = "..."` in an attribute.
fn quoted_after(attr: &str, key: &str) -> Option<String> {
    let i = attr.find(&format!("{key} = \""))?;
    let value = &attr[i + key.len() + 4..];
    Some(value[..value.find('"')?].to_string())
}

/// The string literal that starts a line's code (`"key",` or `"key" => ...`).
fn leading_literal(line: &str) -> Option<&str> {
    let line = line.trim().strip_prefix('"')?;
    Some(&line[..line.find('"')?])
}

/// The text of `source` from the line holding `from` up to the first line after it that
/// holds `to`.
fn between<'a>(source: &'a str, from: &str, to: &str) -> &'a str {
    let start = source
        .find(from)
        .unwrap_or_else(|| panic!("`{from}` not found: update tests/docs.rs"));
    let end = source[start..]
        .find(to)
        .unwrap_or_else(|| panic!("`{to}` not found after `{from}`: update tests/docs.rs"));
    &source[start..start + end]
}

/// The `config.properties` keys the settings code knows: those it acts on (`HANDLED_KEYS`
/// and the arms of `apply_properties`) and the TorchServe keys it accepts without effect.
fn config_keys() -> BTreeSet<String> {
    let source = read("crates/archive/src/settings.rs");
    let mut keys = BTreeSet::new();
    for block in [
        between(&source, "const HANDLED_KEYS", "];"),
        between(&source, "const INERT_KEYS", "];"),
    ] {
        keys.extend(block.lines().filter_map(leading_literal).map(String::from));
    }
    let apply = between(&source, "pub fn apply_properties", "pub fn env_overrides");
    keys.extend(
        apply
            .lines()
            .filter(|l| l.contains("\" =>"))
            .filter_map(leading_literal)
            .map(String::from),
    );
    assert!(keys.len() > 50, "too few keys found: {keys:?}");
    keys
}

#[test]
fn configuration_names_every_flag_of_torchfn_local_help() {
    let page = configuration();
    let local = section(&page, "torchfn-local");
    let main = help_flags(&["--help"]);
    let convert = help_flags(&["convert", "--help"]);
    let missing: Vec<_> = main
        .iter()
        .chain(&convert)
        .filter(|f| !mentions(local, f))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md's torchfn-local section does not name {missing:?}"
    );
    // The source reading below finds every flag `--help` shows (it is checked here against
    // the real thing, so that it can be trusted for the binaries this package does not build).
    let scanned: BTreeSet<String> = ["local/src/main.rs", "local/src/convert.rs"]
        .iter()
        .flat_map(|f| clap_flags(&read(f)))
        .collect();
    let unseen: Vec<_> = main
        .iter()
        .chain(&convert)
        .filter(|f| !["--help", "-h", "--version", "-V"].contains(&f.as_str()))
        .filter(|f| !scanned.contains(*f))
        .collect();
    assert!(
        unseen.is_empty(),
        "tests/docs.rs's reading of clap attributes misses {unseen:?}"
    );
}

#[test]
fn configuration_names_every_flag_of_every_binary() {
    // Every file with a clap definition is one we know.
    let known: Vec<&str> = CLAP_SOURCES.iter().map(|(f, _)| *f).collect();
    for file in source_files() {
        let rel = rel_path(&file);
        if !rel.ends_with(".rs") || rel == "tests/docs.rs" {
            continue;
        }
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let clap = ["derive(Parser", "clap::Parser", "clap::Args", "derive(Args"]
            .iter()
            .any(|p| text.contains(p));
        assert!(
            !clap || known.contains(&rel.as_str()),
            "{rel} defines command-line flags: document them in docs/configuration.md and add \
             the file to CLAP_SOURCES in tests/docs.rs"
        );
    }
    let page = configuration();
    let mut missing = Vec::new();
    for (file, program) in CLAP_SOURCES {
        let Some(program) = program else { continue };
        let text = section(&page, program);
        let flags = clap_flags(&read(file));
        assert!(!flags.is_empty(), "no flags found in {file}");
        missing.extend(
            flags
                .into_iter()
                .filter(|f| !mentions(text, f))
                .map(|f| format!("{program} {f} ({file})")),
        );
    }
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name, in the program's section: {missing:#?}"
    );
}

/// The files the variable scan reads: `.rs` files anywhere in the repository, and everything
/// under `scripts/` (not build output, not links).
fn source_files() -> Vec<PathBuf> {
    let root = repo_root();
    let mut out = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap().map(Result::unwrap) {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                let skip = [".git", "target", ".work", "node_modules", "__pycache__"];
                if !skip.contains(&name.as_str()) && !path.starts_with(root.join("fuzz/corpus")) {
                    dirs.push(path);
                }
            } else if kind.is_file()
                && (name.ends_with(".rs") || path.starts_with(root.join("scripts")))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn rel_path(path: &Path) -> String {
    path.strip_prefix(repo_root())
        .unwrap()
        .to_string_lossy()
        .to_string()
}

#[test]
fn configuration_names_every_torchfn_variable() {
    let mut found: BTreeSet<(String, String)> = BTreeSet::new();
    for file in source_files() {
        let rel = rel_path(&file);
        if rel == "tests/docs.rs" {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for (i, _) in text.match_indices("TORCHFN_") {
            if text[..i]
                .chars()
                .next_back()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                continue;
            }
            let name: String = text[i..]
                .chars()
                .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
                .collect();
            // `TORCHFN_` alone, or a prefix a script builds a name from (`TORCHFN_IMAGE_$kind`):
            // the names built are read, and found, elsewhere.
            if name.ends_with('_') {
                continue;
            }
            found.insert((name, rel.clone()));
        }
    }
    let names: BTreeSet<&str> = found.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains("TORCHFN_MODEL_URI") && names.contains("TORCHFN_WORKER_SPIN_US"),
        "the scan found too little: {names:?}"
    );
    for (name, _) in NOT_SETTINGS {
        assert!(
            names.contains(name),
            "{name} is no longer in the source: drop it from NOT_SETTINGS in tests/docs.rs"
        );
    }
    let page = configuration();
    let missing: Vec<String> = found
        .iter()
        .filter(|(n, _)| !NOT_SETTINGS.iter().any(|(x, _)| x == n))
        .filter(|(n, _)| !mentions(&page, n))
        .map(|(n, f)| format!("{n} ({f})"))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/configuration.md does not name these variables: {missing:#?}"
    );
}

#[test]
fn configuration_names_every_config_key() {
    let page = configuration();
    let local = section(&page, "torchfn-local");
    let mut missing = unnamed(local, config_keys(), "config.properties");

    // The `models` JSON: the fields of `ModelOverrides`, camelCase as serde reads them.
    let settings = read("crates/archive/src/settings.rs");
    let overrides = between(&settings, "pub struct ModelOverrides", "\n}");
    let json_keys: Vec<String> = overrides
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub "))
        .filter_map(|l| l.split_once(':').map(|(name, _)| camel_case(name.trim())))
        .collect();
    assert!(json_keys.len() > 5, "{json_keys:?}");
    missing.extend(unnamed(local, json_keys, "models JSON"));

    // The model-config YAML: the keys `ModelConfig::apply` matches.
    let model_config = read("crates/archive/src/model_config.rs");
    let apply = between(&model_config, "fn apply(&mut self", "_ =>");
    let yaml_keys: Vec<String> = apply
        .lines()
        .filter(|l| l.contains("\" =>"))
        .filter_map(leading_literal)
        .map(str::to_string)
        .collect();
    assert!(yaml_keys.len() > 15, "{yaml_keys:?}");
    missing.extend(unnamed(local, yaml_keys, "model-config YAML"));
    assert!(
        missing.is_empty(),
        "docs/configuration.md's torchfn-local section does not name: {missing:#?}"
    );
}

/// The keys `section` does not name in backticks, each labelled with the `kind` of key it is.
fn unnamed(section: &str, keys: impl IntoIterator<Item = String>, kind: &str) -> Vec<String> {
    keys.into_iter()
        .filter(|k| !section.contains(&format!("`{k}`")))
        .map(|k| format!("{kind} `{k}`"))
        .collect()
}

fn camel_case(snake: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in snake.chars() {
        if c == '_' {
            upper = true;
        } else if upper {
            out.push(c.to_ascii_uppercase());
            upper = false;
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn help_lists_every_builtin_handler_from_the_one_list() {
    // `--handler`'s help is made from torchfn_archive::handlers, not written out.
    let out = Command::new(env!("CARGO_BIN_EXE_torchfn-local"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(out.stdout).unwrap();
    let line = format!("Built-ins: {}", torchfn_archive::handlers::names_line());
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains(&line), "`{line}` not in:\n{help}");
    let page = configuration();
    for name in torchfn_archive::handlers::names() {
        assert!(
            page.contains(&format!("`{name}`")),
            "docs/configuration.md does not name the built-in handler `{name}`"
        );
    }
}

// ---------------------------------------------------------------------------------------
// The benchmark run in docs/performance.md.

const START: &str = "<!-- bench-output:start -->";
const END: &str = "<!-- bench-output:end -->";

/// The pasted run: its header's parts and the output.
#[derive(Debug)]
struct PastedRun {
    command: String,
    date: String,
    commit: String,
    machine: String,
    output: String,
}

/// Reads the block between the markers, in the shape `scripts/bench-docs` writes it.
fn pasted_run(page: &str) -> PastedRun {
    let lines: Vec<&str> = page.lines().collect();
    let at = |marker: &str| {
        let found: Vec<usize> = (0..lines.len()).filter(|&i| lines[i] == marker).collect();
        assert_eq!(
            found.len(),
            1,
            "docs/performance.md must hold `{marker}` once"
        );
        found[0]
    };
    let (start, end) = (at(START), at(END));
    assert!(start < end, "the markers are out of order");
    let block = &lines[start + 1..end];
    assert!(block.len() > 4, "no run between the markers");
    let header = block[0];
    let shape =
        "`Output of `COMMAND` on YYYY-MM-DD (UTC), commit HASH; machine: CPU, N CPUs, M GiB, GPU.`";
    let parse = || -> Option<PastedRun> {
        let rest = header.strip_prefix("Output of `")?;
        let (command, rest) = rest.split_once("` on ")?;
        let (date, rest) = rest.split_once(" (UTC), commit ")?;
        let (commit, machine) = rest.split_once("; machine: ")?;
        let machine = machine.strip_suffix('.')?;
        Some(PastedRun {
            command: command.into(),
            date: date.into(),
            commit: commit.into(),
            machine: machine.into(),
            output: String::new(),
        })
    };
    let mut run = parse().unwrap_or_else(|| panic!("header `{header}` is not {shape}"));
    let date_ok = run.date.len() == 10
        && run.date.char_indices().all(|(i, c)| match i {
            4 | 7 => c == '-',
            _ => c.is_ascii_digit(),
        });
    let hash = run.commit.strip_suffix("-dirty").unwrap_or(&run.commit);
    let commit_ok = (7..=40).contains(&hash.len()) && hash.chars().all(|c| c.is_ascii_hexdigit());
    let parts: Vec<&str> = run.machine.split(", ").collect();
    let counted = |unit: &str| {
        parts.iter().any(|p| {
            p.strip_suffix(unit)
                .is_some_and(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_digit()))
        })
    };
    assert!(
        run.command.starts_with("scripts/bench") && date_ok && commit_ok,
        "header `{header}` is not {shape}"
    );
    assert!(
        parts.len() >= 4 && counted(" CPUs") && counted(" GiB"),
        "the machine `{}` is not `CPU model, N CPUs, M GiB, GPU or no GPU`",
        run.machine
    );
    assert_eq!(block[1], "", "a blank line follows the header");
    assert_eq!(block[2], "```text", "the output is a fenced `text` block");
    assert_eq!(
        block[block.len() - 1],
        "```",
        "the block ends with its fence"
    );
    run.output = block[3..block.len() - 1].join("\n") + "\n";
    run
}

/// The target names `torchfn-bench` prints, as patterns (`{...}` stands for anything), from
/// the string literals of bench/src/report.rs that hold `≤` or `≥`.
fn target_patterns() -> Vec<String> {
    let source = read("bench/src/report.rs");
    // The line format this test reads; a change there wants this test changed too.
    for format in [
        "\"\\ntargets (issues {})\"",
        "\"  {verdict:<4}  {:<70} {}\"",
    ] {
        assert!(
            source.contains(format),
            "bench/src/report.rs no longer prints targets with {format}: update tests/docs.rs"
        );
    }
    let patterns: Vec<String> = source
        .lines()
        .filter(|l| !l.trim_start().starts_with("//") && (l.contains('≤') || l.contains('≥')))
        .filter_map(|l| {
            let from = l.find('"')? + 1;
            let len = l[from..].find('"')?;
            Some(l[from..from + len].to_string())
        })
        .filter(|p| !p.starts_with(' '))
        .collect();
    assert!(patterns.len() >= 10, "{patterns:?}");
    patterns
}

/// Whether `text` starts with `pattern` (each `{...}` matching one or more characters)
/// followed by a space.
fn matches_target(pattern: &str, text: &str) -> bool {
    let mut pieces = Vec::new();
    let mut rest = pattern;
    while let Some(open) = rest.find('{') {
        pieces.push(&rest[..open]);
        let close = rest[open..].find('}').map_or(rest.len(), |c| open + c + 1);
        rest = &rest[close..];
    }
    pieces.push(rest);
    fn glob(pieces: &[&str], text: &str, first: bool) -> bool {
        let Some((piece, more)) = pieces.split_first() else {
            return text.starts_with(' ');
        };
        if first {
            return text
                .strip_prefix(piece)
                .is_some_and(|t| glob(more, t, false));
        }
        // A wildcard (at least one character), then `piece`.
        text.char_indices()
            .skip(1)
            .filter(|(i, _)| text[*i..].starts_with(piece))
            .any(|(i, _)| glob(more, &text[i + piece.len()..], false))
    }
    glob(&pieces, text, true)
}

#[test]
fn performance_holds_one_pasted_run_with_todays_targets() {
    let run = pasted_run(&read("docs/performance.md"));
    assert!(
        run.output.starts_with("torchfn-bench ("),
        "the output does not start as torchfn-bench's table does"
    );
    let lines: Vec<&str> = run.output.lines().collect();
    let heading = lines
        .iter()
        .position(|l| l.starts_with("targets (issues "))
        .expect("the output has no `targets (issues ...)` section");
    let targets: Vec<&str> = lines[heading + 1..]
        .iter()
        .copied()
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert!(!targets.is_empty(), "no target lines");
    let patterns = target_patterns();
    let mut seen = vec![false; patterns.len()];
    for line in &targets {
        let verdict = &line[2..6.min(line.len())];
        let rest = line.get(8..).unwrap_or_default();
        assert!(
            ["PASS", "MISS", "n/a "].contains(&verdict)
                && line.get(6..8) == Some("  ")
                && !rest.starts_with(' '),
            "`{line}` is not a target line as torchfn-bench prints it"
        );
        let hit = patterns.iter().position(|p| matches_target(p, rest));
        match hit {
            Some(i) => seen[i] = true,
            None => panic!("`{line}` names no target torchfn-bench has (bench/src/report.rs)"),
        }
    }
    let unseen: Vec<&String> = patterns
        .iter()
        .zip(&seen)
        .filter(|(_, s)| !**s)
        .map(|(p, _)| p)
        .collect();
    assert!(
        unseen.is_empty(),
        "the pasted run predates these targets: paste a new run (scripts/bench-docs): {unseen:#?}"
    );
}

#[test]
fn performance_block_is_what_bench_docs_pastes() {
    let original = read("docs/performance.md");
    let run = pasted_run(&original);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("output.txt");
    let page = dir.path().join("performance.md");
    std::fs::write(&output, &run.output).unwrap();
    // The page with the block emptied: the script must write it back as it was.
    let emptied: String = {
        let start = original.find(START).unwrap() + START.len() + 1;
        let end = original.find(END).unwrap();
        format!("{}{}", &original[..start], &original[end..])
    };
    std::fs::write(&page, emptied).unwrap();
    let out = Command::new(repo_root().join("scripts/bench-docs"))
        .args(["--from", path_str(&output)])
        .args(["--date", &run.date, "--commit", &run.commit])
        .args(["--machine", &run.machine, "--command", &run.command])
        .args(["--doc", path_str(&page)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "scripts/bench-docs failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pasted = std::fs::read_to_string(&page).unwrap();
    assert!(
        pasted == original,
        "docs/performance.md's block is not what scripts/bench-docs pastes; paste runs with \
         the script, never by hand"
    );
}

// ---------------------------------------------------------------------------------------
// Runnable shell blocks.

/// One `sh runnable` block: where it is, and its text.
#[derive(Debug, Clone)]
struct Block {
    file: String,
    line: usize,
    code: String,
}

/// The fenced blocks of a page whose info string is exactly `sh runnable`.
fn runnable_blocks(file: &str, text: &str) -> Vec<Block> {
    let mut blocks = Vec::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, line)) = lines.next() {
        let trimmed = line.trim_start();
        let fence: String = trimmed.chars().take_while(|c| *c == '`').collect();
        if fence.len() < 3 {
            continue;
        }
        let info = trimmed[fence.len()..].trim();
        let mut code = String::new();
        for (_, body) in lines.by_ref() {
            let t = body.trim();
            if t.starts_with(&fence) && t.chars().all(|c| c == '`') {
                break;
            }
            code.push_str(body);
            code.push('\n');
        }
        if info == "sh runnable" {
            blocks.push(Block {
                file: file.to_string(),
                line: i + 1,
                code,
            });
        }
    }
    blocks
}

/// What a block runs against: the quickstart's server and the folders a block sees.
struct Stage {
    server: Server,
    path: String,
    _config: tempfile::TempDir,
}

/// One `torchfn-local` serving what `scripts/quickstart` serves: its config.properties and its
/// command line, read from the script, with the listeners on free loopback ports, the store the
/// fixtures' (made by the same `tests/fixtures/make_fixtures.py`).
fn quickstart_stage() -> Stage {
    let script = read("scripts/quickstart");
    assert!(
        script.contains("tests/fixtures/make_fixtures.py \"$work\""),
        "scripts/quickstart no longer makes its store with tests/fixtures/make_fixtures.py: \
         update tests/docs.rs to serve what it serves"
    );
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("config.properties");
    let props = between(&script, "<<'PROPS'", "\nPROPS\n");
    let props: String = props
        .lines()
        .skip(1)
        .map(|l| match l.split_once('=') {
            Some((key, _)) if key.ends_with("_address") => format!("{key}=http://127.0.0.1:0\n"),
            _ => format!("{l}\n"),
        })
        .collect();
    std::fs::write(&config, props).unwrap();
    let exec = script.find("exec target/release/torchfn-local").expect(
        "scripts/quickstart no longer ends by exec-ing torchfn-local: update tests/docs.rs",
    );
    // The command, its continuation lines joined.
    let command = script[exec..]
        .replace("\\\n", " ")
        .lines()
        .next()
        .unwrap()
        .to_string();
    let store = fixtures().join("store");
    let args: Vec<String> = command
        .split_whitespace()
        .skip(2)
        .map(|word| match word {
            "\"$work/store\"" => path_str(&store).to_string(),
            "\"$work/config.properties\"" => path_str(&config).to_string(),
            w if w.contains('$') || w.contains('"') => panic!(
                "scripts/quickstart's command has `{w}`, which tests/docs.rs does not know: \
                 update it to serve what the quickstart serves"
            ),
            w => w.to_string(),
        })
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&args).wait_healthy();
    let venv_bin = project_venv_bin();
    let bin_dir = PathBuf::from(env!("CARGO_BIN_EXE_torchfn-local"))
        .parent()
        .unwrap()
        .to_path_buf();
    let path = format!(
        "{}:{}:{}",
        venv_bin.display(),
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    Stage {
        server,
        path,
        _config: config_dir,
    }
}

/// The project venv's `bin`: the venv whose torch wheel this build's libtorch comes from, as
/// the build recorded it (no set-up run needed), else the one `scripts/setup` prints.
fn project_venv_bin() -> PathBuf {
    let python = torchfn_engine::python::interpreter(&Default::default());
    let python = if python.is_absolute() {
        python
    } else {
        venv_python()
    };
    python.parent().unwrap().to_path_buf()
}

/// The port of an address printed as `http://127.0.0.1:PORT`.
fn port(address: &str) -> &str {
    address.rsplit(':').next().unwrap()
}

/// A block's text as it runs: the documented ports replaced by the server's.
fn with_ports(code: &str, stage: &Stage) -> String {
    let mut code = code.to_string();
    for (documented, real) in [
        ("8080", port(&stage.server.inference)),
        ("8081", port(&stage.server.management)),
        ("8082", port(&stage.server.metrics)),
    ] {
        for host in ["localhost", "127.0.0.1"] {
            code = code.replace(&format!("{host}:{documented}"), &format!("{host}:{real}"));
        }
    }
    code
}

/// A fresh working folder holding a link to each top-level entry of the repository (but
/// `.git`): relative paths such as `tests/data/...` resolve, and files a block makes land in
/// the folder, not in the repository.
fn working_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let root = repo_root();
    for entry in std::fs::read_dir(&root).unwrap().map(Result::unwrap) {
        if entry.file_name() != ".git" {
            std::os::unix::fs::symlink(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    dir
}

/// How long one block may run.
const BLOCK_TIMEOUT: Duration = Duration::from_secs(120);

/// Runs one block, the contract the pages are written to:
/// - `localhost:8080/8081/8082` and `127.0.0.1:8080/8081/8082` become the server's real
///   inference, management and metrics ports (the server is the quickstart's: model
///   `classifier`, batching on with batch_size 32 and max_batch_delay 100);
/// - `bash -euo pipefail`, in a fresh folder of links to the repository's top-level entries;
/// - PATH starts with the project venv's `bin` (python, torch-model-archiver, ...) and the
///   folder of the built binaries (`torchfn-local`, ...);
/// - at most `timeout`, then the block's whole process group is killed; its processes are
///   killed when it ends, too.
///
/// Returns the working folder, or `file:line` with the reason, the block and its output.
fn run_block(block: &Block, stage: &Stage, timeout: Duration) -> Result<tempfile::TempDir, String> {
    let cwd = working_folder();
    let scratch = tempfile::tempdir().unwrap();
    let code = with_ports(&block.code, stage);
    let script = scratch.path().join("block.sh");
    std::fs::write(&script, &code).unwrap();
    let (stdout, stderr) = (scratch.path().join("stdout"), scratch.path().join("stderr"));
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail"])
        .arg(&script)
        .current_dir(cwd.path())
        .env("PATH", &stage.path)
        .env_remove("TS_CONFIG_FILE")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&stdout).unwrap())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .process_group(0)
        .spawn()
        .expect("bash runs");
    let group = child.id();
    let (tx, rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let kill_group = || {
        let _ = signal::group_by_id(group, signal::Signal::KILL);
    };
    let outcome = match rx.recv_timeout(timeout) {
        Ok(status) => {
            let status = status.unwrap();
            status
                .success()
                .then_some(())
                .ok_or_else(|| format!("failed ({status})"))
        }
        Err(_) => {
            kill_group();
            Err(format!("ran past {} s and was killed", timeout.as_secs()))
        }
    };
    // Whatever the block left running in the background goes with it.
    kill_group();
    waiter.join().unwrap();
    outcome.map(|()| cwd).map_err(|why| {
        format!(
            "{}:{}: `sh runnable` block {why}\n--- the block, as run ---\n{code}--- stdout ---\n{}\
             --- stderr ---\n{}",
            block.file,
            block.line,
            std::fs::read_to_string(&stdout).unwrap_or_default(),
            std::fs::read_to_string(&stderr).unwrap_or_default()
        )
    })
}

/// The runner itself, on a page written here: blocks are found (and only `sh runnable`
/// ones), ports substituted, relative paths resolved, new files kept out of the repository,
/// failures and timeouts reported with `file:line`.
#[test]
fn runnable_blocks_runner_works_on_a_fixture_page() {
    let page = "# Fixture\n\
                \n\
                ```sh runnable\n\
                curl -sf http://localhost:8080/ping | grep -q Healthy\n\
                curl -sf http://127.0.0.1:8081/models/classifier | grep -q '\"batchSize\": 32'\n\
                test -f tests/data/s3-object-created.json\n\
                command -v torchfn-local python > found\n\
                ```\n\
                \n\
                ```sh\n\
                exit 1\n\
                ```\n\
                \n\
                ```sh runnable\n\
                echo before\n\
                false\n\
                echo after\n\
                ```\n\
                \n\
                ```sh runnable\n\
                sleep 600\n\
                ```\n";
    let blocks = runnable_blocks("fixture.md", page);
    let lines: Vec<usize> = blocks.iter().map(|b| b.line).collect();
    assert_eq!(lines, [3, 14, 20]);
    let stage = quickstart_stage();

    let cwd = run_block(&blocks[0], &stage, BLOCK_TIMEOUT).unwrap_or_else(|e| panic!("{e}"));
    let found = std::fs::read_to_string(cwd.path().join("found")).unwrap();
    assert!(
        found.contains("/torchfn-local\n") && found.contains("/bin/python\n"),
        "{found}"
    );
    assert!(!repo_root().join("found").exists());

    let error = run_block(&blocks[1], &stage, BLOCK_TIMEOUT).unwrap_err();
    assert!(
        error.starts_with("fixture.md:14: `sh runnable` block failed"),
        "{error}"
    );
    assert!(
        error.contains("--- stdout ---\nbefore\n--- stderr"),
        "{error}"
    );

    let started = std::time::Instant::now();
    let error = run_block(&blocks[2], &stage, Duration::from_secs(1)).unwrap_err();
    assert!(
        error.starts_with("fixture.md:20: `sh runnable` block ran past 1 s"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
}

/// Every `sh runnable` block of README.md and docs/*.md runs, in page order, against one
/// server like the quickstart's; README.md must have some.
#[test]
fn runnable_blocks_of_the_docs_run() {
    let root = repo_root();
    let mut pages = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.ends_with(".md"))
        .map(|n| format!("docs/{n}"))
        .collect();
    docs.sort();
    pages.extend(docs);
    let blocks: Vec<Block> = pages
        .iter()
        .flat_map(|p| runnable_blocks(p, &read(p)))
        .collect();
    let stage = quickstart_stage();
    let failures: Vec<String> = blocks
        .iter()
        .filter_map(|b| run_block(b, &stage, BLOCK_TIMEOUT).err())
        .collect();
    assert!(
        failures.is_empty(),
        "{} of {} runnable blocks failed:\n\n{}",
        failures.len(),
        blocks.len(),
        failures.join("\n\n")
    );
    assert!(
        blocks.iter().any(|b| b.file == "README.md"),
        "README.md has no `sh runnable` block: its first prediction should be one"
    );
}
