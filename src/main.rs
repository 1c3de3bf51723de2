//! The `tsusage` command: parses arguments, sets up logging, runs a command, maps the result to an exit code.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tsusage::config::Config;
use tsusage::pipeline::{self, Outcome};
use tsusage::report::EXIT_FAILED;

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
    /// Check ICCID lists: print counts and write the rejects, without contacting anything.
    Validate {
        /// CSV files: a column named iccid (any case), or the only column.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        #[arg(long)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();
    match run(cli.command) {
        Ok(outcome) => {
            print_outcome(&outcome);
            ExitCode::from(outcome.report.exit_code)
        }
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("tsusage: {e}");
            ExitCode::from(match &e {
                tsusage::Error::Config(_) | tsusage::Error::Usage(_) => e.exit_code(),
                _ => EXIT_FAILED,
            })
        }
    }
}

fn run(command: Command) -> tsusage::Result<Outcome> {
    match command {
        Command::Ingest { dir, config, keep } => {
            let config = Config::load(&config)?;
            pipeline::ingest_dir(&config, &dir, keep)
        }
        Command::Validate { files, config } => {
            let config = Config::load(&config)?;
            pipeline::validate(&config, &files)
        }
    }
}

/// The summary line, then the report's path last (schedulers read the last line).
#[allow(clippy::print_stdout)]
fn print_outcome(outcome: &Outcome) {
    println!("{}", outcome.report.summary());
    for path in &outcome.report.rejects_files {
        println!("rejects: {}", path.display());
    }
    println!("{}", outcome.report_path.display());
}
