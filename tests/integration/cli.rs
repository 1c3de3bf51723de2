//! The command line's contract: exit codes and error messages for configuration mistakes.

use crate::util::*;

#[test]
fn config_errors_exit_2_naming_file_and_key() {
    let ws = Workspace::with_config("[plan]\nchunk_size = 0\n");
    let run = ws.ingest();
    run.expect_code(2);
    assert!(
        run.stderr().contains("tsusage.toml") && run.stderr().contains("plan.chunk_size"),
        "{}",
        run.stderr()
    );

    let ws = Workspace::with_config("[plan]\nchunksize = 5\n");
    let run = ws.ingest();
    run.expect_code(2);
    assert!(
        run.stderr().contains("unknown field `chunksize`"),
        "{}",
        run.stderr()
    );

    let ws = Workspace::new();
    let inbox = ws.inbox();
    let run = ws.run_env(
        &["ingest", inbox.to_str().expect("path")],
        &[("TSUSAGE_PLAN__WINDOW_DAYS", "week")],
    );
    run.expect_code(2);
    assert!(
        run.stderr().contains("TSUSAGE_PLAN__WINDOW_DAYS"),
        "{}",
        run.stderr()
    );
}

#[test]
fn a_missing_drop_directory_is_a_usage_error() {
    let ws = Workspace::new();
    let run = ws.run(&["ingest", "no-such-dir"]);
    run.expect_code(2);
    assert!(
        run.stderr().contains("no-such-dir: not a directory"),
        "{}",
        run.stderr()
    );
}

#[test]
fn an_unwritable_state_store_fails_with_exit_1() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path("state"),
        "a file where the state directory should be",
    )
    .expect("write");
    ws.drop_file(
        "a.json",
        &usage_callback("req", 1, &[record(&iccid(1), 0, r#""1""#)]),
    );
    let run = ws.ingest();
    run.expect_code(1);
    assert!(run.stderr().contains("state store"), "{}", run.stderr());
    assert!(
        ws.inbox().join("a.json").exists(),
        "nothing journaled, so the file stays"
    );
}

#[test]
fn the_bundled_sample_ingests_cleanly_and_stays_in_place() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = Workspace::new();
    let inbox = root.join("data/callbacks");
    let before = files_under(&inbox);
    let run = ws.run(&["ingest", inbox.to_str().expect("path"), "--keep"]);
    run.expect_code(0);
    assert_eq!(
        files_under(&inbox),
        before,
        "--keep leaves the sample intact"
    );
    let rows = ws.rows();
    assert_eq!(rows.len(), 150);
    assert!(
        rows.iter()
            .all(|r| r.data_usage_bytes >= 0 && r.account_name == ACCOUNT)
    );
    let partitions: std::collections::BTreeSet<_> =
        rows.iter().map(|r| r.partition.clone()).collect();
    assert_eq!(partitions.len(), 3);
}

#[test]
fn the_readme_run_command_completes_the_sample_against_the_simulator() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let ws = Workspace::new();
    let out = ws.out();
    let state = ws.path("state/tsusage.db");
    let iccids = format!("[\"{}\"]", root.join("data/iccids.csv").display());
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
    cmd.args(["run", "--simulate", "--config"])
        .arg(root.join("data/tsusage.toml"))
        .args(["--from", "2021-08-15", "--to", "2021-08-17"])
        .current_dir(ws.dir.path())
        .env("TSUSAGE_OUTPUT__DIR", &out)
        .env("TSUSAGE_STATE__PATH", &state)
        .env("TSUSAGE_INPUT__PATHS", iccids);
    let run = Run(cmd.output().expect("run"));
    run.expect_code(3);
    let report = run.report();
    let completeness = &report["collect"]["completeness"];
    assert_eq!(completeness["rejected_input"], 3, "{completeness}");
    let usage = completeness["usage"].as_u64().expect("usage");
    assert_eq!(
        usage + completeness["no_usage"].as_u64().expect("no usage"),
        3000
    );
    assert_eq!(ws.rows().len() as u64, usage);
    // The summary: status first, a line per stage, then the paths, the report's last; 12 lines at
    // most, the stage lines within 80 columns.
    let stdout = run.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(lines.len() <= 12, "{stdout}");
    assert!(
        lines[0].starts_with("run partial (exit 3)   run "),
        "{stdout}"
    );
    for (i, stage) in [
        "iccids",
        "plan",
        "submit",
        "collect",
        "ICCID-days",
        "output",
    ]
    .iter()
    .enumerate()
    {
        assert!(lines[i + 1].starts_with(&format!("  {stage} ")), "{stdout}");
        assert!(lines[i + 1].chars().count() <= 80, "{stdout}");
    }
    assert!(
        lines[1].contains("1000 ICCIDs") && lines[1].contains("3 rejected"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("  submit     15/15 accepted"),
        "{stdout}"
    );
    assert!(
        lines[5].contains(&format!("{usage} usage")) && lines[5].contains("3 rejected input"),
        "{stdout}"
    );
    assert!(
        lines[6].contains(&format!("{usage} rows  3 partitions  3 files  in ")),
        "{stdout}"
    );
    assert!(stdout.contains("\ncompleteness: "), "{stdout}");
    let report_path = lines[lines.len() - 1];
    assert!(report_path.ends_with(".json"), "{stdout}");
    assert_eq!(
        lines[lines.len() - 2],
        format!("html:         {}", report_path.replace(".json", ".html"))
    );
    assert!(std::path::Path::new(&report_path.replace(".json", ".html")).is_file());
}

/// `tsusage` without --config, from `dir`, with `env` (nothing else from the test's environment).
fn without_flag(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
    cmd.args(args).current_dir(dir);
    for (k, _) in std::env::vars() {
        if k.starts_with("TSUSAGE_") {
            cmd.env_remove(k);
        }
    }
    for (k, v) in env {
        cmd.env(k, v);
    }
    Run(cmd.output().expect("run tsusage"))
}

#[test]
fn the_config_comes_from_the_flag_the_environment_or_the_working_directory() {
    let ws = Workspace::new();
    std::fs::write(ws.path("a.csv"), format!("iccid\n{}\n", iccid(1))).expect("csv");
    let empty = tempfile::tempdir().expect("tempdir");
    let csv = ws.path("a.csv");
    let csv = csv.to_str().expect("path");

    // Nowhere: a usage error that says where it looked.
    let run = without_flag(
        empty.path(),
        &["--log-format", "text", "validate", csv],
        &[],
    );
    run.expect_code(2);
    let stderr = run.stderr();
    assert!(
        stderr.starts_with("tsusage: no configuration file: --config was not given, TSUSAGE_CONFIG is not set, and there is no tsusage.toml in ")
            && stderr.contains(&empty.path().display().to_string()),
        "{stderr}"
    );

    // $TSUSAGE_CONFIG, from anywhere; it is not taken for a config key.
    let config = ws.config();
    let config = config.to_str().expect("path");
    let run = without_flag(
        empty.path(),
        &["validate", csv],
        &[("TSUSAGE_CONFIG", config)],
    );
    run.expect_code(0);
    assert_eq!(run.report()["iccids"]["accepted"], 1);
    assert!(run.report_path().starts_with(ws.out()), "{}", run.stdout());

    // ./tsusage.toml in the working directory.
    let run = without_flag(ws.dir.path(), &["validate", csv], &[]);
    run.expect_code(0);
    assert!(run.report_path().starts_with(ws.out()), "{}", run.stdout());

    // The flag wins over the environment.
    let run = without_flag(
        empty.path(),
        &["validate", csv, "--config", config],
        &[("TSUSAGE_CONFIG", "/nonexistent/tsusage.toml")],
    );
    run.expect_code(0);
}

#[test]
fn every_command_help_shows_examples() {
    let empty = tempfile::tempdir().expect("tempdir");
    for command in [
        "run",
        "listen",
        "status",
        "ingest",
        "submit",
        "prune",
        "callbacks",
        "sim",
        "validate",
        "report",
        "completions",
    ] {
        let run = without_flag(empty.path(), &[command, "--help"], &[]);
        run.expect_code(0);
        let help = run.stdout();
        assert!(help.contains("\nExamples:\n  "), "{command}: {help}");
        assert!(
            help.contains(&format!("tsusage {command}")),
            "{command}: {help}"
        );
        assert!(help.contains("--config <FILE>"), "{command}: {help}");
        assert!(
            help.contains("The configuration file [default: $TSUSAGE_CONFIG, else ./tsusage.toml]"),
            "{command}: {help}"
        );
    }
}

#[test]
fn completions_are_printed_for_bash_zsh_and_fish() {
    let empty = tempfile::tempdir().expect("tempdir");
    for (shell, marker) in [
        ("bash", "complete -F _tsusage"),
        ("zsh", "#compdef tsusage"),
        ("fish", "complete -c tsusage"),
    ] {
        let run = without_flag(empty.path(), &["completions", shell], &[]);
        run.expect_code(0);
        let script = run.stdout();
        assert!(script.contains(marker), "{shell}: {script}");
        for word in ["run", "ingest", "report", "log-format"] {
            assert!(script.contains(word), "{shell} completes {word}");
        }
    }
    let run = without_flag(empty.path(), &["completions", "tcsh"], &[]);
    run.expect_code(2);
}

#[test]
fn report_prints_a_stored_report_as_the_command_did() {
    let ws = Workspace::new();
    std::fs::write(
        ws.path("a.csv"),
        format!(
            "iccid\n{}\n{}\n{}\nnot-an-iccid\n",
            iccid(1),
            iccid(2),
            iccid(1)
        ),
    )
    .expect("csv");
    let first = ws.run(&["validate", "a.csv"]);
    first.expect_code(3);
    std::thread::sleep(std::time::Duration::from_millis(1100)); // run ids sort by second
    let second = ws.run(&["validate", "a.csv"]);
    second.expect_code(3);
    assert!(
        second
            .stdout()
            .contains("  iccids     4 rows  2 ICCIDs  1 duplicate  1 rejected"),
        "{}",
        second.stdout()
    );

    let latest = ws.run(&["report"]);
    latest.expect_code(0);
    assert_eq!(latest.stdout(), second.stdout());
    let run_id = first.report()["run_id"].as_str().expect("id").to_owned();
    let by_id = ws.run(&["report", &run_id]);
    by_id.expect_code(0);
    assert_eq!(by_id.stdout(), first.stdout());
    let json = ws.run(&["report", "latest", "--json"]);
    json.expect_code(0);
    let value: serde_json::Value = serde_json::from_str(&json.stdout()).expect("json");
    assert_eq!(value, second.report());

    let missing = ws.run(&["--log-format", "text", "report", "20200101T000000Z-00000"]);
    missing.expect_code(2);
    assert!(
        missing
            .stderr()
            .contains("no report for run 20200101T000000Z-00000"),
        "{}",
        missing.stderr()
    );
}

#[test]
fn a_bad_date_is_a_usage_error_printed_once() {
    let ws = Workspace::new();
    for args in [
        &["run", "--simulate", "--date", "2021-13-45"][..],
        &["submit", "--date", "2021-02-30"],
        &[
            "run",
            "--simulate",
            "--from",
            "2021-08-17",
            "--to",
            "2021-08-15",
        ],
        &["status", "--date", "yesterday"],
    ] {
        let text: Vec<&str> = ["--log-format", "text"]
            .into_iter()
            .chain(args.iter().copied())
            .collect();
        let run = ws.run(&text);
        run.expect_code(2);
        let stderr = run.stderr();
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{args:?}: one error line: {stderr}");
        assert!(
            lines[0].starts_with("tsusage: ")
                && (lines[0].contains("not a date (expected YYYY-MM-DD)")
                    || lines[0].contains("is after --to")),
            "{args:?}: {stderr}"
        );
        // Off a terminal the logs are JSON lines, the error too: one object, level ERROR.
        let run = ws.run(args);
        run.expect_code(2);
        let stderr = run.stderr();
        let lines: Vec<serde_json::Value> = stderr
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        assert_eq!(lines.len(), 1, "{args:?}: {stderr}");
        assert_eq!(lines[0]["level"], "ERROR", "{stderr}");
        assert_eq!(lines[0]["exit_code"], 2, "{stderr}");
        assert!(lines[0]["run_id"].is_string(), "{stderr}");
        let message = lines[0]["message"].as_str().expect("message");
        assert!(
            message.contains("not a date (expected YYYY-MM-DD)")
                || message.contains("is after --to"),
            "{stderr}"
        );
    }
    assert!(
        !ws.path("state/tsusage.db").exists(),
        "nothing was opened for a command refused at the door"
    );
}

/// The README's next step after `run --simulate` is a run without it: with the bundled config that
/// must never consume the bundled samples (it once read `data/callbacks` as its drop directory and
/// moved the checkout's files to `data/callbacks/processed/`). Here against a simulator on
/// loopback, in a copy of `data/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_run_with_the_sample_config_leaves_the_sample_callbacks_alone() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let work = tempfile::tempdir().expect("tempdir");
    let data = work.path().join("data");
    std::fs::create_dir_all(data.join("callbacks")).expect("data");
    for file in ["tsusage.toml", "iccids.csv"] {
        std::fs::copy(root.join("data").join(file), data.join(file)).expect("copy");
    }
    for file in files_under(&root.join("data/callbacks")) {
        let name = file.file_name().expect("name");
        std::fs::copy(&file, data.join("callbacks").join(name)).expect("copy");
    }
    let before = files_under(&data.join("callbacks"));
    assert!(!before.is_empty());
    let sim = tsusage::sim::start(tsusage::sim::SimConfig {
        listen_addr: "127.0.0.1:0".parse().expect("addr"),
        ..tsusage::sim::SimConfig::default()
    })
    .await
    .expect("sim");
    let port = free_port();
    let base_url = sim.base_url();
    let cwd = work.path().to_owned();
    let run = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_tsusage"));
        cmd.args([
            "run",
            "--config",
            "data/tsusage.toml",
            "--date",
            "2021-08-15",
        ])
        .current_dir(&cwd);
        for (k, _) in std::env::vars() {
            if k.starts_with("TSUSAGE_") {
                cmd.env_remove(k);
            }
        }
        let listen = format!("127.0.0.1:{port}");
        let public = format!("http://127.0.0.1:{port}/callbacks");
        for (k, v) in [
            ("TSUSAGE_API__BASE_URL", base_url.as_str()),
            ("TSUSAGE_API__APP_KEY", "k"),
            ("TSUSAGE_API__APP_SECRET", "s"),
            ("TSUSAGE_API__USERNAME", "u"),
            ("TSUSAGE_API__PASSWORD", "p"),
            ("TSUSAGE_CALLBACKS__USERNAME", "cb"),
            ("TSUSAGE_CALLBACKS__PASSWORD", "cb"),
            ("TSUSAGE_CALLBACKS__LISTEN_ADDR", listen.as_str()),
            ("TSUSAGE_CALLBACKS__PUBLIC_URL", public.as_str()),
            ("TSUSAGE_CALLBACKS__SETTLE_SECS", "1"),
            // Bounded either way: a run that gets no callbacks ends after 5 s.
            ("TSUSAGE_CALLBACKS__DEADLINE_SECS", "5"),
            ("TSUSAGE_CALLBACKS__MAX_RESUBMITS", "0"),
            ("TSUSAGE_API__REQUESTS_PER_SEC", "50"),
        ] {
            cmd.env(k, v);
        }
        Run(cmd.output().expect("run"))
    })
    .await
    .expect("join");
    sim.shutdown().await;
    assert_eq!(
        files_under(&data.join("callbacks")),
        before,
        "the sample callbacks are where they were"
    );
    assert!(!data.join("callbacks/processed").exists());
    run.expect_code(3); // the sample's three bad ICCID rows
    // The sample config's paths are relative to the working directory, so is the report's.
    let report: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(work.path().join(run.report_path())).expect("report"),
    )
    .expect("json");
    assert_eq!(
        report["collect"]["completeness"]["usage"]
            .as_u64()
            .expect("usage")
            + report["collect"]["completeness"]["no_usage"]
                .as_u64()
                .expect("no usage"),
        1000,
        "the run completed against the simulator: {report}"
    );
}
