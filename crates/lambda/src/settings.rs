//! A function's settings: a `clap` derive struct whose fields name their environment
//! variables (`#[arg(long, env = "TORCHFN_…")]`), so that `--help` lists them all. Under
//! Lambda they come from the environment; a flag wins over its variable.
//!
//! A blank variable (empty, or spaces only) counts as unset: its field takes its default, or
//! `None`, as when the variable is absent. Lambda's console and templates leave variables
//! empty rather than removing them.

use std::ffi::OsString;

/// Parses the process's arguments and environment into `T`. `--help` and `--version` print
/// and exit, as `clap` does; any other failure is returned.
pub fn parse<T: clap::Parser>() -> Result<T, clap::Error> {
    parse_from(std::env::args_os())
}

/// [`parse`] with the given arguments (the first is the program's name); the values still
/// come from the process's environment.
pub fn parse_from<T, I>(args: I) -> Result<T, clap::Error>
where
    T: clap::Parser,
    I: IntoIterator,
    I::Item: Into<OsString> + Clone,
{
    let mut command = T::command();
    let blank: Vec<clap::Id> = command
        .get_arguments()
        .filter(|arg| {
            arg.get_env()
                .and_then(std::env::var_os)
                .is_some_and(|value| is_blank(&value))
        })
        .map(|arg| arg.get_id().clone())
        .collect();
    for id in blank {
        command = command.mut_arg(id, |arg| arg.env(None::<&'static str>));
    }
    let matches = match command.try_get_matches_from(args) {
        Ok(matches) => matches,
        // Help and version are answers, on stdout, not failures.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => return Err(e),
    };
    T::from_arg_matches(&matches)
}

fn is_blank(value: &std::ffi::OsStr) -> bool {
    value.to_str().is_some_and(|v| v.trim().is_empty())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[derive(clap::Parser, Debug)]
    struct Example {
        /// A number.
        #[arg(long, env = "TORCHFN_LAMBDA_TEST_NUMBER", default_value_t = 7)]
        number: u32,
        /// A name.
        #[arg(long, env = "TORCHFN_LAMBDA_TEST_NAME")]
        name: Option<String>,
        /// A prefix.
        #[arg(long, env = "TORCHFN_LAMBDA_TEST_PREFIX", default_value = "archives/")]
        prefix: String,
    }

    /// Set only in the copy of this test binary that `blank_variables_count_as_unset` starts
    /// (the environment of this process is left as it is).
    const CHILD: &str = "TORCHFN_LAMBDA_TEST_CHILD";

    #[test]
    fn flags_and_defaults() {
        if std::env::var_os(CHILD).is_some() {
            return;
        }
        let parsed: Example = parse_from(["test", "--number", "3", "--name", "m"]).unwrap();
        assert_eq!(
            (
                parsed.number,
                parsed.name.as_deref(),
                parsed.prefix.as_str()
            ),
            (3, Some("m"), "archives/")
        );
        let error = parse_from::<Example, _>(["test", "--number", "many"]).unwrap_err();
        assert!(error.to_string().contains("many"), "{error}");
    }

    #[test]
    fn blank_variables_count_as_unset() {
        if std::env::var_os(CHILD).is_some() {
            // The child: blank variables give the defaults, set ones their values.
            let parsed: Example = parse_from(["test"]).unwrap();
            assert_eq!(
                (
                    parsed.number,
                    parsed.name.as_deref(),
                    parsed.prefix.as_str()
                ),
                (7, Some("set"), "archives/")
            );
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "settings::tests::blank_variables_count_as_unset",
                "--test-threads=1",
            ])
            .env(CHILD, "1")
            .env("TORCHFN_LAMBDA_TEST_NUMBER", "")
            .env("TORCHFN_LAMBDA_TEST_PREFIX", "  ")
            .env("TORCHFN_LAMBDA_TEST_NAME", "set")
            .status()
            .unwrap();
        assert!(status.success(), "the child test failed: {status}");
    }

    #[test]
    fn help_names_the_variables() {
        use clap::CommandFactory;
        let help = Example::command().render_long_help().to_string();
        for name in [
            "TORCHFN_LAMBDA_TEST_NUMBER",
            "TORCHFN_LAMBDA_TEST_NAME",
            "TORCHFN_LAMBDA_TEST_PREFIX",
        ] {
            assert!(help.contains(name), "{help}");
        }
    }
}
