//! `deploy/`: every Kubernetes YAML document and systemd unit parses, holds together (names,
//! ports, mounts), and uses only `tsusage` subcommands, flags, environment names and config keys
//! that this tsusage has (asked of the real binary and the real config loader).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use tsusage::config::{Config, ENV_PREFIX, ENV_RESERVED};
use yaml_rust2::{Yaml, YamlLoader};

/// Config keys that `deploy/` uses and that other branches of the scale-out work add (the
/// PostgreSQL store, object storage output). Until they land, these keys are skipped where they
/// appear; the test fails once one of them is a real key, so that the list is emptied then.
const PENDING_KEYS: &[&str] = &[];

/// While a pending key is skipped, the key the loader still requires in its place (this branch's
/// loader has no `state.url` yet, so a `[state]` without `path` would not load).
const STAND_INS: &[(&str, &str, &str)] = &[];

/// Environment names other than `TSUSAGE_*` that the manifests may set: object storage
/// credentials come from the standard AWS variables only.
const OTHER_ENV: &[&str] = &["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"];

/// The smallest configuration the loader takes, for trying one environment variable at a time.
const MINIMAL: &str = "account_name = \"0000123456-00001\"\n[output]\ndir = \"out\"\n[state]\npath = \"state/tsusage.db\"\n";

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    found.sort();
    found
}

/// Every YAML document under `deploy/kubernetes/`, with its file name.
fn documents() -> Vec<(String, Yaml)> {
    let mut docs = Vec::new();
    for path in files(&deploy_dir().join("kubernetes"), "yaml") {
        let text = std::fs::read_to_string(&path).expect("read");
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let parsed = YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(!parsed.is_empty(), "{name}: no YAML document");
        for doc in parsed {
            docs.push((name.clone(), doc));
        }
    }
    docs
}

fn str_of<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {y:?}"))
}

fn list(y: &Yaml) -> &[Yaml] {
    y.as_vec().map_or(&[], Vec::as_slice)
}

fn kind(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or("")
}

fn name(doc: &Yaml) -> String {
    doc["metadata"]["name"]
        .as_str()
        .or_else(|| doc["metadata"]["generateName"].as_str())
        .unwrap_or("")
        .to_owned()
}

/// The pod template of a workload (Deployment, Job, CronJob), if it is one.
fn pod_spec(doc: &Yaml) -> Option<&Yaml> {
    let template = match kind(doc) {
        "Deployment" | "Job" => &doc["spec"]["template"],
        "CronJob" => &doc["spec"]["jobTemplate"]["spec"]["template"],
        _ => return None,
    };
    Some(template)
}

/// A `[section]` → key → values reading of a systemd unit (repeated keys keep every value).
fn unit_sections(path: &Path) -> BTreeMap<String, BTreeMap<String, Vec<String>>> {
    let text = std::fs::read_to_string(path).expect("read unit");
    let mut sections: BTreeMap<String, BTreeMap<String, Vec<String>>> = BTreeMap::new();
    let mut current: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let at = format!("{}:{}", path.display(), n + 1);
        if let Some(section) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = Some(section.to_owned());
            sections.entry(section.to_owned()).or_default();
            continue;
        }
        let section = current
            .clone()
            .unwrap_or_else(|| panic!("{at}: a key before any [section]"));
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("{at}: not KEY=VALUE: {line:?}"));
        assert!(
            !line.ends_with('\\'),
            "{at}: continued lines are not used here"
        );
        sections
            .entry(section)
            .or_default()
            .entry(key.trim().to_owned())
            .or_default()
            .push(value.trim().to_owned());
    }
    sections
}

/// `KEY=VALUE` lines of an environment file (systemd `EnvironmentFile=`).
fn env_file(path: &Path) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .expect("read env file")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l
                .split_once('=')
                .unwrap_or_else(|| panic!("{}: not KEY=VALUE: {l:?}", path.display()));
            (k.to_owned(), v.to_owned())
        })
        .collect()
}

/// Checks `args` (what follows `tsusage`) against the real binary: the subcommand exists, and
/// every `--flag` is one of its options; date values are dates.
fn check_command(args: &[String], at: &str) {
    let sub = args
        .first()
        .unwrap_or_else(|| panic!("{at}: no tsusage subcommand"));
    assert!(
        !sub.starts_with('-'),
        "{at}: put the subcommand first, then its options: {args:?}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_tsusage"))
        .args([sub.as_str(), "--help"])
        .output()
        .expect("tsusage --help");
    let help = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success() && help.contains(&format!("Usage: tsusage {sub}")),
        "{at}: `tsusage {sub}` is not a subcommand:\n{help}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut tokens = args[1..].iter().peekable();
    while let Some(token) = tokens.next() {
        let Some(flag) = token.strip_prefix("--") else {
            continue;
        };
        let (flag, inline) = match flag.split_once('=') {
            Some((f, v)) => (f, Some(v.to_owned())),
            None => (flag, None),
        };
        let spelled = format!("--{flag}");
        let listed = help.lines().any(|l| {
            l.trim_start()
                .split([' ', ',', '='])
                .any(|word| word == spelled)
        });
        assert!(
            listed,
            "{at}: `tsusage {sub}` has no option {spelled}:\n{help}"
        );
        let takes_value = help
            .lines()
            .any(|l| l.trim_start().starts_with(&format!("{spelled} <")));
        let value = if takes_value {
            inline.or_else(|| tokens.next().cloned())
        } else {
            None
        };
        if ["date", "from", "to", "before"].contains(&flag) {
            let value = value.unwrap_or_else(|| panic!("{at}: {spelled} without a value"));
            assert!(
                chrono::NaiveDate::parse_from_str(&value, "%Y-%m-%d").is_ok(),
                "{at}: {spelled} {value:?} is not YYYY-MM-DD"
            );
        }
    }
}

/// `section.key` of a `TSUSAGE_SECTION__KEY` name.
fn key_of(var: &str) -> String {
    var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_lowercase)
        .collect::<Vec<_>>()
        .join(".")
}

/// Checks one environment variable of a manifest: a reserved `TSUSAGE_` name, a pending key, a
/// configuration key the loader takes with this value, or one of [`OTHER_ENV`].
fn check_env(var: &str, value: &str, at: &str) {
    if !var.starts_with(ENV_PREFIX) {
        assert!(
            OTHER_ENV.contains(&var),
            "{at}: {var} is neither a TSUSAGE_ variable nor one of {OTHER_ENV:?}"
        );
        return;
    }
    if ENV_RESERVED.contains(&var) {
        return;
    }
    if PENDING_KEYS.contains(&key_of(var).as_str()) {
        return;
    }
    let env = [(var.to_owned(), value.to_owned())];
    // The store is named once: a URL replaces the minimal config's path.
    let minimal = if key_of(var) == "state.url" {
        MINIMAL.replace("path = \"state/tsusage.db\"", "")
    } else {
        MINIMAL.to_owned()
    };
    if let Err(e) = Config::from_toml_str(&minimal, Path::new("deploy"), env) {
        panic!("{at}: {var}={value:?} is refused by the config loader: {e}");
    }
}

/// The environment of every container, every Secret key (they reach containers by `envFrom`),
/// and the systemd units' `Environment=` and environment file: `(name, value, where)`.
fn environment(docs: &[(String, Yaml)]) -> Vec<(String, String, String)> {
    let mut vars = Vec::new();
    for (file, doc) in docs {
        if kind(doc) == "Secret" {
            for field in ["stringData", "data"] {
                if let Some(map) = doc[field].as_hash() {
                    for (k, v) in map {
                        let k = str_of(k, file).to_owned();
                        let v = v.as_str().unwrap_or("").to_owned();
                        vars.push((k, v, format!("{file}: Secret {}", name(doc))));
                    }
                }
            }
        }
        if let Some(pod) = pod_spec(doc) {
            for container in list(&pod["spec"]["containers"]) {
                for env in list(&container["env"]) {
                    let k = str_of(&env["name"], file).to_owned();
                    let v = env["value"].as_str().unwrap_or("").to_owned();
                    vars.push((k, v, format!("{file}: {} {}", kind(doc), name(doc))));
                }
            }
        }
    }
    let systemd = deploy_dir().join("systemd");
    for unit in files(&systemd, "service") {
        let sections = unit_sections(&unit);
        for value in sections
            .get("Service")
            .and_then(|s| s.get("Environment"))
            .into_iter()
            .flatten()
        {
            let (k, v) = value.split_once('=').expect("Environment=KEY=VALUE");
            vars.push((k.to_owned(), v.to_owned(), unit.display().to_string()));
        }
    }
    for file in files(&systemd, "example") {
        for (k, v) in env_file(&file) {
            vars.push((k, v, file.display().to_string()));
        }
    }
    vars
}

#[test]
fn the_pending_keys_are_still_unknown_to_the_loader() {
    // Once a branch adds one of these keys, remove it from PENDING_KEYS (and its stand-in).
    for key in PENDING_KEYS {
        let (section, field) = key.split_once('.').expect("section.key");
        let var = format!(
            "{ENV_PREFIX}{}__{}",
            section.to_uppercase(),
            field.to_uppercase()
        );
        let env = [(var.clone(), "postgres://h/db".to_owned())];
        match Config::from_toml_str(MINIMAL, Path::new("t.toml"), env) {
            Ok(_) => panic!(
                "{key} is a configuration key now: remove it from PENDING_KEYS in tests/integration/deploy.rs"
            ),
            Err(e) => assert!(
                e.to_string().contains(&format!("unknown field `{field}`")),
                "{key}: {e}"
            ),
        }
    }
}

#[test]
fn every_kubernetes_document_parses_and_names_what_exists() {
    let docs = documents();
    let kinds: BTreeSet<&str> = docs.iter().map(|(_, d)| kind(d)).collect();
    for needed in [
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "CronJob",
        "Job",
    ] {
        assert!(kinds.contains(needed), "no {needed} in deploy/kubernetes/");
    }
    let names = |k: &str| -> BTreeSet<String> {
        docs.iter()
            .filter(|(_, d)| kind(d) == k)
            .map(|(_, d)| name(d))
            .collect()
    };
    let (secrets, config_maps) = (names("Secret"), names("ConfigMap"));
    for (file, doc) in &docs {
        let at = format!("{file}: {} {}", kind(doc), name(doc));
        assert!(doc["apiVersion"].as_str().is_some(), "{at}: no apiVersion");
        assert!(!name(doc).is_empty(), "{at}: no metadata.name");
        let Some(pod) = pod_spec(doc) else { continue };
        let volumes: BTreeMap<String, &Yaml> = list(&pod["spec"]["volumes"])
            .iter()
            .map(|v| (str_of(&v["name"], &at).to_owned(), v))
            .collect();
        for volume in volumes.values() {
            if let Some(cm) = volume["configMap"]["name"].as_str() {
                assert!(config_maps.contains(cm), "{at}: no ConfigMap {cm}");
            }
            if let Some(s) = volume["secret"]["secretName"].as_str() {
                assert!(secrets.contains(s), "{at}: no Secret {s}");
            }
        }
        let containers = list(&pod["spec"]["containers"]);
        assert!(!containers.is_empty(), "{at}: no containers");
        for container in containers {
            for mount in list(&container["volumeMounts"]) {
                let volume = str_of(&mount["name"], &at);
                assert!(volumes.contains_key(volume), "{at}: no volume {volume}");
            }
            for from in list(&container["envFrom"]) {
                if let Some(s) = from["secretRef"]["name"].as_str() {
                    assert!(secrets.contains(s), "{at}: no Secret {s}");
                }
                if let Some(cm) = from["configMapRef"]["name"].as_str() {
                    assert!(config_maps.contains(cm), "{at}: no ConfigMap {cm}");
                }
            }
        }
    }
}

#[test]
fn every_command_in_deploy_is_a_tsusage_subcommand_with_its_flags() {
    let docs = documents();
    let mut checked = 0;
    for (file, doc) in &docs {
        let Some(pod) = pod_spec(doc) else { continue };
        for container in list(&pod["spec"]["containers"]) {
            let at = format!("{file}: {} {}", kind(doc), name(doc));
            assert!(
                container["command"].is_badvalue(),
                "{at}: use args (the image's entrypoint is tsusage)"
            );
            let args: Vec<String> = list(&container["args"])
                .iter()
                .map(|a| str_of(a, &at).to_owned())
                .collect();
            check_command(&args, &at);
            checked += 1;
        }
    }
    for unit in files(&deploy_dir().join("systemd"), "service") {
        let at = unit.display().to_string();
        let sections = unit_sections(&unit);
        let exec = sections
            .get("Service")
            .and_then(|s| s.get("ExecStart"))
            .unwrap_or_else(|| panic!("{at}: no ExecStart"));
        for line in exec {
            let mut words = line.split_whitespace().map(str::to_owned);
            let binary = words.next().unwrap_or_default();
            assert!(binary.ends_with("/tsusage"), "{at}: runs {binary}");
            check_command(&words.collect::<Vec<_>>(), &at);
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} commands found");
}

#[test]
fn every_environment_name_in_deploy_is_a_config_key_or_a_known_variable() {
    let docs = documents();
    let vars = environment(&docs);
    assert!(vars.len() >= 10, "only {} variables found", vars.len());
    for (var, value, at) in &vars {
        check_env(var, value, at);
    }
    // The secrets reach every workload, and every secret key of the loader has a placeholder.
    let secret_names: BTreeSet<&str> = vars
        .iter()
        .filter(|(_, _, at)| at.contains("Secret"))
        .map(|(k, _, _)| k.as_str())
        .collect();
    for secret in [
        "TSUSAGE_API__APP_KEY",
        "TSUSAGE_API__APP_SECRET",
        "TSUSAGE_API__USERNAME",
        "TSUSAGE_API__PASSWORD",
        "TSUSAGE_CALLBACKS__USERNAME",
        "TSUSAGE_CALLBACKS__PASSWORD",
    ] {
        assert!(secret_names.contains(secret), "the Secret has no {secret}");
    }
    for (var, value, at) in &vars {
        if at.contains("Secret") && var.starts_with(ENV_PREFIX) && !var.ends_with("__URL") {
            assert_eq!(
                value, "CHANGE-ME",
                "{at}: {var} is a placeholder, not a value"
            );
        }
    }
}

/// The ConfigMap's `tsusage.toml`, with the pending keys taken out (and their stand-ins put in).
fn config_map_config(docs: &[(String, Yaml)]) -> (Config, BTreeSet<String>) {
    let (_, doc) = docs
        .iter()
        .find(|(_, d)| kind(d) == "ConfigMap" && name(d) == "tsusage-config")
        .expect("ConfigMap tsusage-config");
    let text = str_of(&doc["data"]["tsusage.toml"], "tsusage-config data");
    let table: toml::Table = text.parse().expect("tsusage.toml is TOML");
    // Line by line, so that what the loader sees is the file less the pending keys.
    let mut pending = BTreeSet::new();
    let mut section = String::new();
    let mut kept = Vec::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = name.trim().to_owned();
            kept.push(line.to_owned());
            for (pending_key, needed, value) in STAND_INS {
                let (pending_section, _) = pending_key.split_once('.').expect("section.key");
                let (_, field) = needed.split_once('.').expect("section.key");
                let present = table
                    .get(&section)
                    .and_then(toml::Value::as_table)
                    .is_some_and(|t| t.contains_key(field));
                if pending_section == section && !present {
                    kept.push(format!("{field} = \"{value}\""));
                }
            }
            continue;
        }
        let key = trimmed.split('=').next().unwrap_or("").trim();
        let full = format!("{section}.{key}");
        if !trimmed.starts_with('#') && PENDING_KEYS.contains(&full.as_str()) {
            pending.insert(full);
            continue;
        }
        kept.push(line.to_owned());
    }
    let text = kept.join("\n");
    let config = Config::from_toml_str(&text, Path::new("configmap.yaml tsusage.toml"), [])
        .unwrap_or_else(|e| panic!("the ConfigMap's tsusage.toml does not load: {e}"));
    (config, pending)
}

#[test]
fn the_config_map_loads_and_the_workloads_mount_it_where_they_read_it() {
    let docs = documents();
    let (config, pending) = config_map_config(&docs);
    assert!(pending.is_empty(), "{pending:?}");
    assert!(
        config.state.url.is_some() && config.output.url.is_some(),
        "the scaled setup uses state.url and output.url"
    );
    assert_eq!(
        config.callbacks.source,
        tsusage::config::CallbackSource::External,
        "the listener tier journals; run reads the journal"
    );
    let port = config.callbacks.listen_addr.port();
    assert!(
        config.callbacks.listen_addr.ip().is_unspecified(),
        "a pod listens on every interface"
    );
    for (file, doc) in &docs {
        let Some(pod) = pod_spec(doc) else { continue };
        let at = format!("{file}: {} {}", kind(doc), name(doc));
        let volumes = list(&pod["spec"]["volumes"]);
        for container in list(&pod["spec"]["containers"]) {
            let args: Vec<&str> = list(&container["args"])
                .iter()
                .filter_map(Yaml::as_str)
                .collect();
            let config_path = args
                .iter()
                .position(|a| *a == "--config")
                .and_then(|i| args.get(i + 1))
                .unwrap_or_else(|| panic!("{at}: no --config"));
            let (dir, file_name) = config_path.rsplit_once('/').expect("absolute path");
            let mount = list(&container["volumeMounts"])
                .iter()
                .find(|m| m["mountPath"].as_str() == Some(dir))
                .unwrap_or_else(|| panic!("{at}: nothing mounted at {dir}"));
            let volume = volumes
                .iter()
                .find(|v| v["name"] == mount["name"])
                .unwrap_or_else(|| panic!("{at}: no volume for {dir}"));
            assert_eq!(
                volume["configMap"]["name"].as_str(),
                Some("tsusage-config"),
                "{at}"
            );
            assert_eq!(file_name, "tsusage.toml", "{at}");
            // What `run` reads (input.paths) is mounted too.
            if args.first() == Some(&"run") {
                for input in &config.input.paths {
                    let input = input.display().to_string();
                    let mounted = list(&container["volumeMounts"]).iter().any(|m| {
                        m["mountPath"]
                            .as_str()
                            .is_some_and(|p| input.starts_with(&format!("{p}/")))
                    });
                    assert!(mounted, "{at}: input {input} is not on a mounted volume");
                }
            }
        }
        if kind(doc) == "Deployment" {
            let container = &list(&pod["spec"]["containers"])[0];
            let ports = list(&container["ports"]);
            let named = ports
                .iter()
                .find(|p| p["containerPort"].as_i64() == Some(i64::from(port)))
                .unwrap_or_else(|| panic!("{at}: no containerPort {port} (callbacks.listen_addr)"));
            let probe = &container["readinessProbe"]["httpGet"];
            assert_eq!(probe["path"].as_str(), Some("/healthz"), "{at}");
            assert!(
                probe["port"] == named["name"] || probe["port"].as_i64() == Some(i64::from(port)),
                "{at}: the readiness probe asks another port"
            );
            assert_eq!(
                pod["metadata"]["annotations"]["prometheus.io/path"].as_str(),
                Some("/metrics"),
                "{at}"
            );
            let replicas = doc["spec"]["replicas"].as_i64().unwrap_or(1);
            assert!(replicas >= 2, "{at}: {replicas} replica(s): not a tier");
            // SIGTERM lets in-flight callbacks finish for 30 s: the pod must get longer.
            let grace = pod["spec"]["terminationGracePeriodSeconds"]
                .as_i64()
                .unwrap_or(30);
            assert!(grace > 30, "{at}: terminationGracePeriodSeconds {grace}");
            // The Service sends to these pods, on that port.
            let (_, service) = docs
                .iter()
                .find(|(_, d)| kind(d) == "Service")
                .expect("a Service");
            let selector = service["spec"]["selector"].as_hash().expect("selector");
            let labels = pod["metadata"]["labels"].as_hash().expect("pod labels");
            for (k, v) in selector {
                assert_eq!(
                    labels.get(k),
                    Some(v),
                    "Service selector {k:?} misses the pods"
                );
            }
            for p in list(&service["spec"]["ports"]) {
                let target = &p["targetPort"];
                assert!(
                    *target == named["name"] || target.as_i64() == Some(i64::from(port)),
                    "the Service targets another port: {target:?}"
                );
            }
        }
        if kind(doc) == "Job" {
            let spec = &doc["spec"];
            assert_eq!(spec["completionMode"].as_str(), Some("Indexed"), "{at}");
            let (completions, parallelism) = (
                spec["completions"].as_i64().unwrap_or(1),
                spec["parallelism"].as_i64().unwrap_or(1),
            );
            assert!(
                completions >= 2 && parallelism == completions,
                "{at}: {completions} completions, {parallelism} at once"
            );
        }
        if kind(doc) == "CronJob" {
            let schedule = str_of(&doc["spec"]["schedule"], &at);
            assert_eq!(schedule.split_whitespace().count(), 5, "{at}: {schedule}");
            assert_eq!(
                doc["spec"]["concurrencyPolicy"].as_str(),
                Some("Forbid"),
                "{at}"
            );
        }
    }
}

#[test]
fn the_systemd_units_parse_and_the_timer_starts_the_service() {
    let dir = deploy_dir().join("systemd");
    let services = files(&dir, "service");
    let timers = files(&dir, "timer");
    assert!(
        !services.is_empty() && !timers.is_empty(),
        "a service and a timer"
    );
    for service in &services {
        let sections = unit_sections(service);
        let at = service.display().to_string();
        let s = sections.get("Service").expect("[Service]");
        assert_eq!(
            s.get("Type").map(Vec::as_slice),
            Some(&["oneshot".to_owned()][..]),
            "{at}"
        );
        // Exit 3 (partial, listed in the report) is a finished run.
        assert!(
            s.get("SuccessExitStatus")
                .is_some_and(|v| v.iter().any(|c| c.split_whitespace().any(|c| c == "3"))),
            "{at}"
        );
        assert!(sections.contains_key("Unit"), "{at}: no [Unit]");
    }
    for timer in &timers {
        let sections = unit_sections(timer);
        let at = timer.display().to_string();
        let t = sections.get("Timer").expect("[Timer]");
        assert!(t.contains_key("OnCalendar"), "{at}: no OnCalendar");
        let unit = t
            .get("Unit")
            .and_then(|u| u.first())
            .cloned()
            .unwrap_or_else(|| {
                timer
                    .with_extension("service")
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            });
        assert!(
            dir.join(&unit).exists(),
            "{at}: starts {unit}, which deploy/ lacks"
        );
        let install = sections.get("Install").expect("[Install]");
        assert_eq!(
            install.get("WantedBy").map(Vec::as_slice),
            Some(&["timers.target".to_owned()][..]),
            "{at}"
        );
    }
    // systemd's own reading, where the machine has it: copies of the units that run the binary
    // under test, so that verify finds the executable; any complaint is a failure.
    let Ok(version) = Command::new("systemd-analyze").arg("--version").output() else {
        eprintln!(
            "deploy: no systemd-analyze here; the units were checked by this test's reading only"
        );
        return;
    };
    assert!(version.status.success());
    let tmp = tempfile::tempdir().expect("tempdir");
    let mut copies = Vec::new();
    for unit in services.iter().chain(&timers) {
        let text = std::fs::read_to_string(unit).expect("read");
        let text = text.replace("/usr/local/bin/tsusage", env!("CARGO_BIN_EXE_tsusage"));
        let copy = tmp.path().join(unit.file_name().expect("name"));
        std::fs::write(&copy, text).expect("copy");
        copies.push(copy);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&copies)
        .output()
        .expect("systemd-analyze verify");
    let complaints = String::from_utf8_lossy(&out.stderr);
    let ours: Vec<&str> = complaints
        .lines()
        .filter(|l| l.contains("tsusage"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify:\n{complaints}"
    );
}
