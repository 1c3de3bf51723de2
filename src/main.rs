//! The `tsusage` command: parses arguments, sets up logging, runs a command, maps the result to an exit code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use tsusage::config::Config;
use tsusage::pipeline::{self, Outcome};
use tsusage::plan::DateRange;

/// Credentials that the built-in simulator (`tsusage sim`) accepts, for the examples that talk to it.
macro_rules! sim_env {
    () => {
        "TSUSAGE_API__BASE_URL=http://127.0.0.1:9010/api TSUSAGE_API__APP_KEY=k TSUSAGE_API__APP_SECRET=s \\\n    TSUSAGE_API__USERNAME=u TSUSAGE_API__PASSWORD=p"
    };
}

/// Verizon ThingSpace usage → typed Parquet, resumable and correct to the byte.
///
/// Exit codes: 0 complete, 1 failed, 2 usage or config error, 3 partial (rejects present; see the run
/// report whose path is printed last on stdout).
///
/// Every command reads one TOML configuration: --config FILE, else $TSUSAGE_CONFIG, else
/// ./tsusage.toml. From a checkout, `cargo run --release --` stands for `tsusage`.
#[derive(Debug, Parser)]
#[command(name = "tsusage", version, about, long_about = None, after_help = "\
Examples:
  # The whole pipeline on the bundled sample, against the built-in simulator (no credentials):
  tsusage run --simulate --config data/tsusage.toml --from 2021-08-15 --to 2021-08-17
  # What that run did, again:
  tsusage report --config data/tsusage.toml
  # Shell completions:
  tsusage completions bash > ~/.local/share/bash-completion/completions/tsusage

`tsusage help COMMAND` shows each command's options and examples.")]
struct Cli {
    /// The configuration file [default: $TSUSAGE_CONFIG, else ./tsusage.toml].
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Log level on stderr: error, warn, info, debug or trace.
    #[arg(
        long,
        global = true,
        env = "TSUSAGE_LOG",
        default_value = "info",
        value_name = "LEVEL"
    )]
    log: tracing::Level,
    /// Log lines as human text or as JSON objects, one per line (for log shippers); auto is text on a
    /// terminal, JSON otherwise. Every line carries the run id.
    #[arg(
        long,
        global = true,
        env = "TSUSAGE_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Auto,
        value_name = "FORMAT"
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    /// Human text.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole pipeline for a date or a range: read the ICCID lists, ask ThingSpace for the usage,
    /// collect every callback, write Parquet, report what is complete.
    #[command(after_help = concat!("\
Examples:
  # Three days of the bundled sample against the built-in simulator, in-process (no credentials):
  tsusage run --simulate --config data/tsusage.toml --from 2021-08-15 --to 2021-08-17
  # The same config through the environment; one day, asked again although complete:
  TSUSAGE_CONFIG=data/tsusage.toml tsusage run --simulate --date 2021-08-15 --force
  # Against a separate simulator (`tsusage sim --config data/tsusage.toml` in another terminal),
  # as a nightly job would run against ThingSpace, with JSON log lines:
  ", sim_env!(), " TSUSAGE_CALLBACKS__USERNAME=cb TSUSAGE_CALLBACKS__PASSWORD=cb \\
    TSUSAGE_CALLBACKS__PUBLIC_URL=http://127.0.0.1:9001/callbacks TSUSAGE_CALLBACKS__SETTLE_SECS=2 \\
    tsusage run --config data/tsusage.toml --date 2021-08-15 --log-format json

Without --date or --from/--to: yesterday (UTC). Prints a summary, then the run report's path last.
Exit codes: 0 complete, 1 failed, 2 usage error, 3 partial."))]
    Run {
        #[command(flatten)]
        dates: Dates,
        /// Run against the built-in ThingSpace simulator, in-process (no credentials needed).
        #[arg(long)]
        simulate: bool,
        /// Ask again for windows already complete in the state store.
        #[arg(long)]
        force: bool,
    },
    /// Serve the callback listener until SIGTERM or Ctrl-C, journaling into the state store.
    #[command(after_help = "\
Examples:
  # Listen on callbacks.listen_addr (127.0.0.1:9001 in the sample) until Ctrl-C:
  TSUSAGE_CALLBACKS__USERNAME=cb TSUSAGE_CALLBACKS__PASSWORD=cb tsusage listen --config data/tsusage.toml")]
    Listen,
    /// Show jobs by state, requests outstanding and overdue, the last run's outcome, and with
    /// --date or --from/--to, each window's completeness.
    #[command(after_help = "\
Examples:
  tsusage status --config data/tsusage.toml
  # Which of these days are complete, and what is missing:
  tsusage status --config data/tsusage.toml --from 2021-08-15 --to 2021-08-17")]
    Status {
        #[command(flatten)]
        dates: Dates,
    },
    /// Collect callbacks from a drop directory once: journal them, write Parquet, report.
    #[command(after_help = "\
Examples:
  # The bundled sample callbacks, left where they are (--keep):
  tsusage ingest data/callbacks --config data/tsusage.toml --keep
  # A drop directory of your own: files move to inbox/processed/ once journaled:
  mkdir -p inbox && tsusage ingest inbox --config data/tsusage.toml")]
    Ingest {
        /// The directory of *.json / *.ndjson / *.jsonl callback files (and *.ndjson.zst archives).
        dir: PathBuf,
        /// Leave the files in place instead of moving them to DIR/processed/ and DIR/rejected/.
        #[arg(long)]
        keep: bool,
    },
    /// Ask ThingSpace for the usage of every ICCID (input.paths) over a date range; record each
    /// requestId. The callbacks are collected by `listen` or `ingest`.
    #[command(after_help = concat!("\
Examples:
  # Against a simulator (`tsusage sim --config data/tsusage.toml` in another terminal):
  ", sim_env!(), " \\
    tsusage submit --config data/tsusage.toml --date 2021-08-15

Without --date or --from/--to: yesterday (UTC)."))]
    Submit {
        #[command(flatten)]
        dates: Dates,
    },
    /// Move journaled callbacks received before --before (default: state.retain_days ago), whose
    /// partitions are written, out of the state store into compressed NDJSON under
    /// output.dir/archive/ (which `ingest` reads back), then reclaim the space.
    #[command(after_help = "\
Examples:
  # Archive what was received before 2021-09-01 (midnight UTC):
  tsusage prune --config data/tsusage.toml --before 2021-09-01
  # Journal an archive back:
  tsusage ingest out/archive --config data/tsusage.toml")]
    Prune {
        /// A UTC day, YYYY-MM-DD: callbacks received before its midnight are archived.
        #[arg(long, value_name = "DATE")]
        before: Option<String>,
    },
    /// Manage the callback registration of the account (service callbacks.service_name).
    #[command(after_help = concat!("\
Examples:
  # Against a simulator (`tsusage sim --config data/tsusage.toml` in another terminal):
  ", sim_env!(), " \\
    tsusage callbacks list --config data/tsusage.toml"))]
    Callbacks {
        #[command(subcommand)]
        action: CallbacksAction,
    },
    /// Serve the built-in ThingSpace simulator on sim.listen_addr until Ctrl-C (base URL http://ADDR/api).
    #[command(after_help = "\
Examples:
  # On 127.0.0.1:9010 (sim.listen_addr); point TSUSAGE_API__BASE_URL at http://127.0.0.1:9010/api:
  tsusage sim --config data/tsusage.toml")]
    Sim,
    /// Check ICCID lists: print counts and write the rejects, without contacting anything.
    #[command(after_help = "\
Examples:
  tsusage validate data/iccids.csv --config data/tsusage.toml")]
    Validate {
        /// CSV files: a column named iccid (any case), or the only column.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Print a stored run report (output.dir/runs/RUN_ID.json) as the summary a command prints at
    /// its end, or as its JSON. Its HTML page is beside it (RUN_ID.html).
    #[command(after_help = "\
Examples:
  # The last command's report:
  tsusage report --config data/tsusage.toml
  # A run's completeness counts, with jq:
  tsusage report latest --json --config data/tsusage.toml | jq .collect.completeness")]
    Report {
        /// The run id (the report's file name without .json), or `latest`.
        #[arg(default_value = "latest", value_name = "RUN_ID")]
        run_id: String,
        /// Print the report's JSON as stored.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script for tsusage on stdout.
    #[command(after_help = "\
Examples:
  tsusage completions bash > ~/.local/share/bash-completion/completions/tsusage
  tsusage completions zsh > ~/.zfunc/_tsusage        # with fpath+=(~/.zfunc) in ~/.zshrc
  tsusage completions fish > ~/.config/fish/completions/tsusage.fish")]
    Completions {
        /// The shell: bash, zsh, fish (also elvish, powershell).
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// The days to ask for: `--date D` (default: yesterday, UTC) or `--from D1 --to D2` (inclusive).
#[derive(Debug, clap::Args)]
struct Dates {
    /// One UTC day, YYYY-MM-DD [default: yesterday].
    #[arg(long, conflicts_with_all = ["from", "to"], value_name = "DATE")]
    date: Option<String>,
    /// First UTC day of a range, YYYY-MM-DD (with --to).
    #[arg(long, requires = "to", value_name = "DATE")]
    from: Option<String>,
    /// Last UTC day of a range, inclusive (with --from).
    #[arg(long, requires = "from", value_name = "DATE")]
    to: Option<String>,
}

impl Dates {
    fn range(&self) -> tsusage::Result<DateRange> {
        Ok(DateRange::from_args(
            self.date.as_deref(),
            self.from.as_deref(),
            self.to.as_deref(),
        )?)
    }
}

#[derive(Debug, Subcommand)]
enum CallbacksAction {
    /// Register callbacks.public_url (with TSUSAGE_CALLBACKS__USERNAME/PASSWORD, if set).
    Register,
    /// List the account's registered callbacks, one `service<TAB>url` line each.
    List,
    /// Delete the account's callback for callbacks.service_name.
    Delete,
}

/// glibc raises its mmap threshold each time a large block is freed, after which the multi-megabyte
/// buffers of an ingest come from the heap and are not given back: peak memory then grows with the
/// input (163 MB for 1 M rows, 260 MB for 10 M). A fixed threshold keeps large buffers in their own
/// mappings, returned when freed (147 MB and 193 MB; no measurable change in speed).
fn fixed_mmap_threshold() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tunable; called first thing, before other threads.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

fn main() -> ExitCode {
    fixed_mmap_threshold();
    let cli = Cli::parse();
    // The run id first, so that every log line carries the id of the report this command writes.
    let run_id = tsusage::report::fresh_run_id();
    tsusage::report::use_run_id(run_id.clone());
    let json = match cli.log_format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    tsusage::logging::init(cli.log, json, run_id);
    match run(cli.command, cli.config.as_deref()) {
        Ok(Done::Report(outcome)) => {
            print_lines(&outcome.report.summary_block(&outcome.report_path));
            ExitCode::from(outcome.report.exit_code)
        }
        Ok(Done::Message(text)) => {
            print_message(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Once, on stderr (where the logs go too); the exit code says which kind of failure.
            let code = e.exit_code();
            if json {
                tracing::error!(exit_code = code, "{e}");
            } else {
                eprintln!("tsusage: {e}");
            }
            ExitCode::from(code)
        }
    }
}

/// What a command leaves to print.
enum Done {
    Report(Box<Outcome>),
    Message(String),
}

/// The configuration: `--config`, else `$TSUSAGE_CONFIG`, else `./tsusage.toml` (exit 2 when none).
fn load_config(explicit: Option<&Path>) -> tsusage::Result<Config> {
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let from_env = std::env::var_os(tsusage::config::ENV_CONFIG);
    let path = tsusage::config::locate(explicit, from_env.as_deref(), &cwd)?;
    Ok(Config::load(&path)?)
}

fn run(command: Command, config: Option<&Path>) -> tsusage::Result<Done> {
    let report = |o: Outcome| Done::Report(Box::new(o));
    match command {
        Command::Ingest { dir, keep } => {
            pipeline::ingest_dir(&load_config(config)?, &dir, keep).map(report)
        }
        Command::Validate { files } => {
            pipeline::validate(&load_config(config)?, &files).map(report)
        }
        Command::Run {
            dates,
            simulate,
            force,
        } => {
            let config = load_config(config)?;
            let range = dates.range()?;
            runtime()?
                .block_on(pipeline::run(
                    &config,
                    pipeline::RunOptions {
                        range,
                        simulate,
                        force,
                    },
                ))
                .map(report)
        }
        Command::Listen => {
            let config = load_config(config)?;
            runtime()?.block_on(pipeline::listen(&config)).map(report)
        }
        Command::Status { dates } => {
            let config = load_config(config)?;
            let range = match (&dates.date, &dates.from) {
                (None, None) => None,
                _ => Some(dates.range()?),
            };
            pipeline::status(&config, range).map(Done::Message)
        }
        Command::Submit { dates } => {
            let config = load_config(config)?;
            let range = dates.range()?;
            runtime()?
                .block_on(pipeline::submit(&config, range))
                .map(report)
        }
        Command::Prune { before } => {
            let config = load_config(config)?;
            let before = before
                .as_deref()
                .map(tsusage::plan::parse_date)
                .transpose()?;
            pipeline::prune(&config, before).map(report)
        }
        Command::Sim => {
            let config = load_config(config)?;
            runtime()?.block_on(tsusage::sim::serve(config.sim))?;
            Ok(Done::Message(String::new()))
        }
        Command::Callbacks { action } => {
            let config = load_config(config)?;
            let rt = runtime()?;
            let text = match action {
                CallbacksAction::Register => rt.block_on(pipeline::register_callback(&config)),
                CallbacksAction::List => rt.block_on(pipeline::list_callbacks(&config)),
                CallbacksAction::Delete => rt.block_on(pipeline::delete_callback(&config)),
            }?;
            Ok(Done::Message(text))
        }
        Command::Report { run_id, json } => {
            let config = load_config(config)?;
            let (path, value) = tsusage::report::stored::load(&config.output.dir, &run_id)?;
            let text = if json {
                serde_json::to_string_pretty(&value).unwrap_or_default()
            } else {
                tsusage::report::summary::block(&value, &path).join("\n")
            };
            Ok(Done::Message(text))
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "tsusage", &mut script);
            Ok(Done::Message(
                String::from_utf8_lossy(&script).trim_end().to_owned(),
            ))
        }
    }
}

/// The async runtime for commands that talk HTTP: two worker threads (the machines this runs on
/// are small, and the work is I/O bound).
fn runtime() -> tsusage::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| tsusage::Error::Usage(format!("cannot start the async runtime: {e}")))
}

#[allow(clippy::print_stdout)]
fn print_message(text: &str) {
    if !text.is_empty() {
        println!("{text}");
    }
}

/// The summary block, the report's path last (schedulers read the last line).
#[allow(clippy::print_stdout)]
fn print_lines(lines: &[String]) {
    for line in lines {
        println!("{line}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The command lines of a command's `Examples:` block (continuation lines joined, environment
    /// assignments, `mkdir ... &&`, redirections and pipes left out).
    fn examples(help: &str) -> Vec<Vec<String>> {
        let Some((_, block)) = help.split_once("Examples:") else {
            return Vec::new();
        };
        let joined = block.replace("\\\n", " ");
        joined
            .lines()
            .skip(1)
            .map(str::trim)
            .take_while(|l| !l.is_empty())
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| {
                let l = l.rsplit("&& ").next().unwrap_or(l);
                let l = l.split(['>', '|', '#']).next().unwrap_or(l);
                let words: Vec<String> = l
                    .split_whitespace()
                    .skip_while(|w| w.contains('='))
                    .map(str::to_owned)
                    .collect();
                (words.first().map(String::as_str) == Some("tsusage")).then_some(words)
            })
            .collect()
    }

    #[test]
    fn every_command_has_examples_that_parse_and_every_option_is_described() {
        let cli = Cli::command();
        let mut commands: Vec<&clap::Command> = vec![&cli];
        commands.extend(cli.get_subcommands().filter(|c| c.get_name() != "help"));
        let mut parsed = 0;
        for command in commands {
            let name = command.get_name();
            let help = command
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            let lines = examples(&help);
            assert!(!lines.is_empty(), "{name}: no examples in:\n{help}");
            for words in lines {
                if let Err(e) = Cli::try_parse_from(&words) {
                    panic!("{name}: example {words:?} does not parse: {e}");
                }
                parsed += 1;
            }
            for arg in command.get_arguments() {
                assert!(
                    arg.get_help().is_some(),
                    "{name}: --{} has no description",
                    arg.get_id()
                );
            }
        }
        assert!(parsed >= 15, "{parsed} examples");
    }

    #[test]
    fn the_cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
