//! The `ztail` command: parses arguments, sets up logging and signals, and maps errors to exit
//! codes (0 ok, 1 runtime error, 2 configuration error). Everything else lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use ztail::config::{Config, LogFormat};

mod status;

/// Threads of the runtime's blocking pool: file reads (at most 4 at a time), request encoding
/// (one per core at a time), rescans and identity file loads. tokio's default of 512 let the
/// pool grow to 27 idle threads with 1,000 files. These tasks are CPU- or disk-bound and never
/// wait for one another, so a full pool only queues them.
const MAX_BLOCKING_THREADS: usize = 8;

#[derive(Parser)]
#[command(
    name = "ztail",
    about = "Zero-trust log shipping: files to Loki over SPIFFE mutual TLS"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Tail the configured files and ship them until SIGTERM or SIGINT; SIGHUP (or
    /// `POST /-/reload` on the admin endpoint) reloads the config.
    Run {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// Reload the config when its file changes (checked every 5 s), as a Kubernetes
        /// ConfigMap changes under a running pod.
        #[arg(long)]
        watch_config: bool,
    },
    /// Validate a configuration (and the identity files it names) without side effects.
    Check {
        #[arg(short, long, value_name = "FILE", required_unless_present = "file")]
        config: Option<PathBuf>,
        #[arg(value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
    },
    /// Feed sample lines through a source's framing and stages and print what each entry
    /// becomes (one JSON object per entry), or why it was dropped. Keeps no state, loads no
    /// identity, sends nothing.
    Try {
        #[arg(short, long, value_name = "FILE")]
        config: PathBuf,
        /// The source whose framing and stages to use (default: the first).
        #[arg(short, long, value_name = "NAME")]
        source: Option<String>,
        /// The path the input is taken to be read from (for `filename` and path labels);
        /// default: FILE, or the source's first include pattern for stdin.
        #[arg(long, value_name = "PATH")]
        path: Option<PathBuf>,
        /// Sample input (default: stdin).
        #[arg(value_name = "FILE")]
        file: Option<PathBuf>,
    },
    /// Show a running ztail's state: identity, sink, files (reads its admin endpoint).
    Status {
        /// The config of the running ztail (for its admin address).
        #[arg(short, long, value_name = "FILE", conflicts_with = "addr")]
        config: Option<PathBuf>,
        /// The admin address, if not from a config.
        #[arg(long, value_name = "IP:PORT", default_value = "127.0.0.1:9311")]
        addr: std::net::SocketAddr,
    },
    /// Take over from another shipper.
    #[command(subcommand)]
    Convert(Convert),
    /// Print the version.
    Version,
}

#[derive(Subcommand)]
enum Convert {
    /// Write a ztail config from a Promtail config, with a report of what was not converted.
    Promtail {
        /// Promtail's config file.
        #[arg(value_name = "CONFIG.yaml")]
        config: PathBuf,
        /// Where to write the ztail config (default: stdout).
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Also write the report as JSON.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
        /// ztail's `state_dir`.
        #[arg(long, value_name = "DIR", default_value = "/var/lib/ztail")]
        state_dir: String,
        /// Loki's SPIFFE ID (`sink.peer.allowed_ids`); without it the config refuses every Loki
        /// until you set one.
        #[arg(long, value_name = "SPIFFE_ID")]
        peer_id: Option<String>,
        /// Expand ${VAR} references first, as Promtail's -config.expand-env=true does.
        #[arg(long)]
        expand_env: bool,
    },
    /// Write ztail checkpoints from Promtail's positions file, so that ztail starts where
    /// Promtail stopped. Run it with both stopped, before ztail's first start.
    PromtailPositions {
        /// Promtail's `positions.filename` (e.g. /var/lib/promtail/positions.yaml).
        #[arg(value_name = "POSITIONS.yaml")]
        positions: PathBuf,
        /// ztail's `state_dir`.
        #[arg(long, value_name = "DIR")]
        state_dir: PathBuf,
        /// Replace the checkpoints of a ztail that has already run with this state directory.
        #[arg(long)]
        force: bool,
        /// Also write what was and was not imported, as JSON.
        #[arg(long, value_name = "FILE")]
        report: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            println!("ztail {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Check { config, file } => {
            let path = config.or(file).unwrap_or_default();
            check(&path)
        }
        Command::Run {
            config,
            watch_config,
        } => run(&config, watch_config),
        Command::Convert(Convert::Promtail {
            config,
            output,
            report,
            state_dir,
            peer_id,
            expand_env,
        }) => convert_promtail(
            &config,
            output.as_deref(),
            report.as_deref(),
            ztail::convert::promtail::Options {
                state_dir,
                peer_id,
                expand_env,
            },
        ),
        Command::Convert(Convert::PromtailPositions {
            positions,
            state_dir,
            force,
            report,
        }) => convert_positions(&positions, &state_dir, force, report.as_deref()),
        Command::Try {
            config,
            source,
            path,
            file,
        } => try_stages(&config, source.as_deref(), path, file),
        Command::Status { config, addr } => {
            let addr = match config {
                Some(path) => match load(&path) {
                    Ok(c) => c.admin.listen,
                    Err(code) => return code,
                },
                None => addr,
            };
            match status::show(addr) {
                Ok(text) => {
                    print!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ztail: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn convert_promtail(
    config: &std::path::Path,
    output: Option<&std::path::Path>,
    report_path: Option<&std::path::Path>,
    opts: ztail::convert::promtail::Options,
) -> ExitCode {
    let text = match std::fs::read_to_string(config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ztail: cannot read {}: {e}", config.display());
            return ExitCode::from(2);
        }
    };
    let out = output.unwrap_or(std::path::Path::new("ztail.toml"));
    let write_report = |report: &ztail::convert::promtail::Report| {
        for line in report.lines() {
            eprintln!("{line}");
        }
        let Some(path) = report_path else {
            return true;
        };
        // Serializing strings cannot fail.
        let json = serde_json::to_string_pretty(report).unwrap_or_default();
        std::fs::write(path, json + "\n")
            .map_err(|e| eprintln!("ztail: cannot write the report {}: {e}", path.display()))
            .is_ok()
    };
    let conv =
        match ztail::convert::promtail::convert(&config.display().to_string(), &text, out, &opts) {
            Ok(c) => c,
            Err(e) => {
                if let Some(report) = &e.report {
                    write_report(report);
                }
                eprintln!("ztail: {e}");
                return ExitCode::from(2);
            }
        };
    if !write_report(&conv.report) {
        return ExitCode::FAILURE;
    }
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &conv.toml) {
                eprintln!("ztail: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!(
                "wrote {} ({} not converted, {} changed, {} to do); check it with `ztail check {}`",
                path.display(),
                conv.report.not_converted.len(),
                conv.report.changed.len(),
                conv.report.to_do.len(),
                path.display()
            );
        }
        None => print!("{}", conv.toml),
    }
    ExitCode::SUCCESS
}

fn convert_positions(
    positions: &std::path::Path,
    state_dir: &std::path::Path,
    force: bool,
    report_path: Option<&std::path::Path>,
) -> ExitCode {
    let report = match ztail::convert::positions::convert(positions, state_dir, force) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztail: {e:#}");
            return ExitCode::from(2);
        }
    };
    eprint!("{}", report.summary());
    if let Some(path) = report_path {
        // Serializing strings and integers cannot fail.
        let json = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(e) = std::fs::write(path, json + "\n") {
            eprintln!("ztail: cannot write the report {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

fn load(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("ztail: config error: {e}");
        ExitCode::from(2)
    })
}

fn check(path: &std::path::Path) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match ztail::validate(&config) {
        Ok(warnings) => {
            for warning in warnings {
                eprintln!("ztail: warning: {warning}");
            }
        }
        Err(e) => {
            eprintln!("ztail: config error: {e:#}");
            return ExitCode::from(2);
        }
    }
    println!(
        "{}: ok ({} source(s), Loki at {})",
        path.display(),
        config.sources.len(),
        config
            .sinks
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    // Which sink gets which source, with which tenants: each sink reads with positions of
    // its own, and a sink with tenants bound to peers was checked to get only those.
    let routes = config.routes();
    if config.sinks.len() > 1 || routes.iter().any(|(_, _, t)| t.iter().any(Option::is_some)) {
        println!("routes (source -> sink -> tenants):");
        for (source, sink, tenants) in routes {
            let tenants: Vec<String> = tenants
                .iter()
                .map(|t| match (t, &sink.tenants) {
                    (None, _) => "(no tenant)".to_owned(),
                    (Some(t), None) => t.clone(),
                    (Some(t), Some(bound)) => {
                        let ids: Vec<String> =
                            bound[t].ids().iter().map(|id| id.to_string()).collect();
                        format!("{t} (only to {})", ids.join(" or "))
                    }
                })
                .collect();
            println!(
                "  {} -> {} ({}) -> {}",
                source.name,
                sink.name,
                sink.url,
                tenants.join(", ")
            );
        }
    }
    if let Some(k) = &config.kubernetes {
        if let Some(why) = k.unresolved() {
            eprintln!("ztail: warning: {why} (fine off the node; `ztail run` needs it)");
        }
        // What a pod may ask for by annotation: only ever a narrowing of this config.
        for src in config.sources.iter().filter(|s| s.kubernetes) {
            let formats: Vec<String> = src.formats.iter().map(|f| f.name.clone()).collect();
            println!("source {:?}: pod annotations accepted:", src.name);
            for line in k.describe_annotations(&formats) {
                println!("  {line}");
            }
        }
    }
    ExitCode::SUCCESS
}

fn try_stages(
    config: &std::path::Path,
    source: Option<&str>,
    path: Option<PathBuf>,
    file: Option<PathBuf>,
) -> ExitCode {
    let config = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let src = match source {
        Some(name) => config.sources.iter().find(|s| s.name == name),
        None => config.sources.first(),
    };
    let Some(src) = src else {
        let names: Vec<&str> = config.sources.iter().map(|s| s.name.as_str()).collect();
        eprintln!(
            "ztail: no source {:?} in {}: it has {names:?}",
            source.unwrap_or_default(),
            config.file.display()
        );
        return ExitCode::from(2);
    };
    let input = match &file {
        Some(f) => std::fs::read(f).map_err(|e| format!("cannot read {}: {e}", f.display())),
        None => ztail::stage::dry_run::read_input(std::io::stdin().lock())
            .map_err(|e| format!("cannot read stdin: {e}")),
    };
    let input = match input {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ztail: {e}");
            return ExitCode::FAILURE;
        }
    };
    let path = path
        .or(file)
        .unwrap_or_else(|| PathBuf::from(src.include.first().cloned().unwrap_or_default()));
    match ztail::stage::dry_run::dry_run(src, &path, &input) {
        Ok(entries) => {
            for e in entries {
                // A value of plain strings and maps always serialises.
                println!("{}", serde_json::to_string(&e).unwrap_or_default());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ztail: cannot frame the input: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: &std::path::Path, watch_config: bool) -> ExitCode {
    let config = match load(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    tune_allocator();
    init_logging(config.log.format, &config.log.level);
    for warning in config.permission_warnings() {
        tracing::warn!("{warning}");
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ztail: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        let shutdown = CancellationToken::new();
        let signals = shutdown.clone();
        tokio::spawn(async move {
            wait_for_signal().await;
            signals.cancel();
        });
        let reloads = ztail::Reloads::default();
        let reload = reloads.handle();
        tokio::spawn(async move {
            use tokio::signal::unix::{SignalKind, signal};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                tracing::warn!("cannot listen for SIGHUP: reload with POST /-/reload instead");
                return;
            };
            // The outcome is logged, counted and shown in /status by the reload itself.
            while hup.recv().await.is_some() {
                let _ = reload.reload().await;
            }
        });
        if watch_config {
            tokio::spawn(watch(path.to_owned(), reloads.handle()));
        }
        ztail::run(config, shutdown, reloads).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("ztail: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives each thread that allocates its own arena (up to 8 per core), and every arena
/// keeps the megabyte buffers it once freed: with the runtime's worker and blocking threads that
/// was a third of ztail's peak RSS while shipping. ztail allocates per chunk, not per line, so
/// one shared arena costs no measurable CPU (benches/RESULTS.md). `MALLOC_ARENA_MAX` or
/// `GLIBC_TUNABLES` in the environment take precedence.
///
/// The arena still keeps freed pages after a burst (a backlog shipped, a Loki outage drained);
/// a thread hands them back to the kernel every few seconds, so an idle ztail is small again.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_allocator() {
    let tuned = ["MALLOC_ARENA_MAX", "GLIBC_TUNABLES"]
        .iter()
        .any(|v| std::env::var_os(v).is_some());
    if !tuned {
        // SAFETY: mallopt only sets a tunable of glibc's allocator and takes no pointers. It
        // runs before the runtime starts any thread (logging is set up without threads), and
        // glibc serialises mallopt against allocation with the arena lock anyway.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
    let trim = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                ztail::release_idle_memory();
                // SAFETY: malloc_trim takes no pointers; it only returns free heap pages to the
                // kernel, under glibc's arena locks, and may be called from any thread.
                unsafe {
                    libc::malloc_trim(0);
                }
            }
        });
    if let Err(e) = trim {
        tracing::warn!(error = %e, "cannot start the allocator trimming thread; idle memory stays higher");
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_allocator() {}

/// How often `--watch-config` reads the config file.
const WATCH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// Reloads when the config file's content changes. A ConfigMap volume swaps a symlink, so the
/// content is compared, not the file's times. Content that was refused is not tried again.
async fn watch(path: PathBuf, reload: ztail::ReloadHandle) {
    let mut seen = std::fs::read(&path).ok();
    loop {
        tokio::time::sleep(WATCH_INTERVAL).await;
        let now = match std::fs::read(&path) {
            Ok(b) => Some(b),
            // Between a ConfigMap's swap and its cleanup, or a file being replaced.
            Err(_) => continue,
        };
        if now != seen {
            seen = now;
            tracing::info!(config = %path.display(), "config file changed; reloading");
            // The outcome is logged, counted and shown in /status by the reload itself.
            let _ = reload.reload().await;
        }
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `RUST_LOG`, else `log.level`, as a filter. kube-client logs each failed connection to the
/// API server at error level and each watch that ends without TLS close_notify (an API server
/// restart, a load balancer's idle timeout) as a warning, and ztail's own warning and
/// `ztail_kubernetes_api_up` already report both. Its lines show when the filter names
/// `kube_client` or sets `debug` or `trace` for everything.
fn log_filter(spec: &str) -> String {
    let everything_verbose = spec
        .split(',')
        .any(|d| matches!(d.trim(), "debug" | "trace"));
    if spec.contains("kube_client") || everything_verbose {
        spec.to_owned()
    } else {
        format!("{spec},kube_client=off")
    }
}

fn init_logging(format: LogFormat, level: &str) {
    let from_env = std::env::var("RUST_LOG").ok().filter(|s| !s.is_empty());
    let filter = from_env
        .and_then(|spec| tracing_subscriber::EnvFilter::try_new(log_filter(&spec)).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new(log_filter(level)));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Human => builder.init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn kube_client_warnings_are_quiet_unless_asked_for() {
        assert_eq!(super::log_filter("info"), "info,kube_client=off");
        assert_eq!(
            super::log_filter("info,ztail=debug"),
            "info,ztail=debug,kube_client=off"
        );
        assert_eq!(super::log_filter("debug"), "debug");
        assert_eq!(super::log_filter("ztail=info,trace"), "ztail=info,trace");
        assert_eq!(
            super::log_filter("info,kube_client=warn"),
            "info,kube_client=warn"
        );
    }
}
