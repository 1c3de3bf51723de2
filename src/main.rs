//! The `tsusage` command: parses arguments, sets up logging, runs a command, maps the result to an exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tsusage::config::Config;
use tsusage::pipeline::{self, Outcome};
use tsusage::plan::DateRange;

/// Verizon ThingSpace usage → typed Parquet, resumable and correct to the byte.
///
/// Exit codes: 0 complete, 1 failed, 2 usage or config error, 3 partial (rejects present; see the run
/// report whose path is printed last on stdout).
#[derive(Debug, Parser)]
#[command(name = "tsusage", version, about, long_about = None)]
struct Cli {
    /// Log level: error, warn, info, debug, trace (also TSUSAGE_LOG).
    #[arg(long, global = true, env = "TSUSAGE_LOG", default_value = "info")]
    log: tracing::Level,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// The whole pipeline for a date or a range: read the ICCID lists, ask ThingSpace for the usage,
    /// collect every callback, write Parquet, report what is complete.
    Run {
        #[arg(long)]
        config: PathBuf,
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
    Listen {
        #[arg(long)]
        config: PathBuf,
    },
    /// Show jobs by state, requests outstanding and overdue, the last run's outcome, and with
    /// --date or --from/--to, each window's completeness.
    Status {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        dates: Dates,
    },
    /// Collect callbacks from a drop directory once: journal them, write Parquet, report.
    Ingest {
        /// The directory of *.json / *.ndjson / *.jsonl callback files.
        dir: PathBuf,
        #[arg(long)]
        config: PathBuf,
        /// Leave the files in place instead of moving them to DIR/processed/ and DIR/rejected/.
        #[arg(long)]
        keep: bool,
    },
    /// Ask ThingSpace for the usage of every ICCID (input.paths) over a date range; record each
    /// requestId. The callbacks are collected by `listen` or `ingest`.
    Submit {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        dates: Dates,
    },
    /// Move journaled callbacks received before --before (default: state.retain_days ago), whose
    /// partitions are written, out of the state store into compressed NDJSON under
    /// output.dir/archive/ (which `ingest` reads back), then reclaim the space.
    Prune {
        #[arg(long)]
        config: PathBuf,
        /// A UTC day, YYYY-MM-DD: callbacks received before its midnight are archived.
        #[arg(long)]
        before: Option<String>,
    },
    /// Manage the callback registration of the account (service callbacks.service_name).
    Callbacks {
        #[command(subcommand)]
        action: CallbacksAction,
        #[arg(long, global = true)]
        config: Option<PathBuf>,
    },
    /// Serve the built-in ThingSpace simulator on sim.listen_addr until Ctrl-C (base URL http://ADDR/api).
    Sim {
        #[arg(long)]
        config: PathBuf,
    },
    /// Check ICCID lists: print counts and write the rejects, without contacting anything.
    Validate {
        /// CSV files: a column named iccid (any case), or the only column.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        config: PathBuf,
    },
}

/// The days to ask for: `--date D` (default: yesterday, UTC) or `--from D1 --to D2` (inclusive).
#[derive(Debug, clap::Args)]
struct Dates {
    /// One UTC day, YYYY-MM-DD (default: yesterday).
    #[arg(long, conflicts_with_all = ["from", "to"])]
    date: Option<String>,
    /// First UTC day of a range, YYYY-MM-DD.
    #[arg(long, requires = "to")]
    from: Option<String>,
    /// Last UTC day of a range, inclusive.
    #[arg(long, requires = "from")]
    to: Option<String>,
}

#[derive(Debug, Subcommand)]
enum CallbacksAction {
    /// Register callbacks.public_url (with TSUSAGE_CALLBACKS__USERNAME/PASSWORD, if set).
    Register,
    /// List the account's registered callbacks.
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
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    match run(cli.command) {
        Ok(Done::Report(outcome)) => {
            print_outcome(&outcome);
            ExitCode::from(outcome.report.exit_code)
        }
        Ok(Done::Message(text)) => {
            print_message(&text);
            ExitCode::SUCCESS
        }
        Err(e) => {
            // Once, on stderr (where the logs go too); the exit code says which kind of failure.
            eprintln!("tsusage: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// What a command leaves to print.
enum Done {
    Report(Box<Outcome>),
    Message(String),
}

fn run(command: Command) -> tsusage::Result<Done> {
    match command {
        Command::Ingest { dir, config, keep } => {
            let config = Config::load(&config)?;
            pipeline::ingest_dir(&config, &dir, keep).map(|o| Done::Report(Box::new(o)))
        }
        Command::Validate { files, config } => {
            let config = Config::load(&config)?;
            pipeline::validate(&config, &files).map(|o| Done::Report(Box::new(o)))
        }
        Command::Run {
            config,
            dates,
            simulate,
            force,
        } => {
            let config = Config::load(&config)?;
            let range = DateRange::from_args(
                dates.date.as_deref(),
                dates.from.as_deref(),
                dates.to.as_deref(),
            )?;
            runtime()?
                .block_on(pipeline::run(
                    &config,
                    pipeline::RunOptions {
                        range,
                        simulate,
                        force,
                    },
                ))
                .map(|o| Done::Report(Box::new(o)))
        }
        Command::Listen { config } => {
            let config = Config::load(&config)?;
            runtime()?
                .block_on(pipeline::listen(&config))
                .map(|o| Done::Report(Box::new(o)))
        }
        Command::Status { config, dates } => {
            let config = Config::load(&config)?;
            let range = match (&dates.date, &dates.from) {
                (None, None) => None,
                _ => Some(DateRange::from_args(
                    dates.date.as_deref(),
                    dates.from.as_deref(),
                    dates.to.as_deref(),
                )?),
            };
            pipeline::status(&config, range).map(Done::Message)
        }
        Command::Submit { config, dates } => {
            let config = Config::load(&config)?;
            let range = DateRange::from_args(
                dates.date.as_deref(),
                dates.from.as_deref(),
                dates.to.as_deref(),
            )?;
            runtime()?
                .block_on(pipeline::submit(&config, range))
                .map(|o| Done::Report(Box::new(o)))
        }
        Command::Prune { config, before } => {
            let config = Config::load(&config)?;
            let before = before
                .as_deref()
                .map(tsusage::plan::parse_date)
                .transpose()?;
            pipeline::prune(&config, before).map(|o| Done::Report(Box::new(o)))
        }
        Command::Sim { config } => {
            let config = Config::load(&config)?;
            runtime()?.block_on(tsusage::sim::serve(config.sim))?;
            Ok(Done::Message(String::new()))
        }
        Command::Callbacks { action, config } => {
            let path =
                config.ok_or_else(|| tsusage::Error::Usage("--config is required".into()))?;
            let config = Config::load(&path)?;
            let rt = runtime()?;
            let text = match action {
                CallbacksAction::Register => rt.block_on(pipeline::register_callback(&config)),
                CallbacksAction::List => rt.block_on(pipeline::list_callbacks(&config)),
                CallbacksAction::Delete => rt.block_on(pipeline::delete_callback(&config)),
            }?;
            Ok(Done::Message(text))
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

/// The summary line, then the report's path last (schedulers read the last line).
#[allow(clippy::print_stdout)]
fn print_outcome(outcome: &Outcome) {
    println!("{}", outcome.report.summary());
    for path in &outcome.report.rejects_files {
        println!("rejects: {}", path.display());
    }
    if let Some(c) = &outcome.report.collect {
        println!("completeness: {}", c.completeness_file.display());
    }
    if let Some(o) = outcome
        .report
        .output
        .as_ref()
        .filter(|o| o.rows_written > 0)
    {
        let usage = outcome
            .report_path
            .parent()
            .and_then(|runs| runs.parent())
            .map(|out| out.join("usage"));
        if let Some(usage) = usage {
            println!(
                "parquet: {}/ ({} partitions rewritten); in DuckDB: SELECT * FROM read_parquet('{}/*/*.parquet', hive_partitioning = true)",
                usage.display(),
                o.partitions.len(),
                usage.display()
            );
        }
    }
    println!("{}", outcome.report_path.display());
}
