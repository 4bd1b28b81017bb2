//! Probe load: ztail (release) running 1,000 TCP probes and 200 HTTP probes at a 1 s interval
//! against loopback servers, shipping every result to a Loki receiver over mTLS. Prints ztail's
//! CPU share and RSS, and the same figures for an idle ztail (no probes) measured in the same run
//! as the baseline.
//!
//!   cargo bench --bench probes [-- SECONDS]

#[allow(dead_code)]
mod common;
#[path = "../tests/support/mod.rs"]
#[allow(dead_code)]
mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{cpu_seconds, status_mib};
use support::http_target::HttpTarget;
use support::ztail::{Env, LOKI_ID, Ztail};

struct Figures {
    cpu_share: f64,
    rss_mib: f64,
    peak_mib: f64,
    results: usize,
}

async fn measure(probes: &str, seconds: u64) -> Figures {
    let env = Env::new();
    let rx = env.receiver(LOKI_ID).await;
    // Production intervals, not the test config's fast ones.
    let config = common::config(&env, &rx.url(), "", "", &[]) + probes;
    let zt = Ztail::start(&env, &config);
    zt.wait_up().await;
    tokio::time::sleep(Duration::from_secs(3)).await; // past start-up and the first round
    let (cpu0, t0, n0) = (cpu_seconds(zt.pid()), Instant::now(), rx.entries().len());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let cpu = cpu_seconds(zt.pid()) - cpu0;
    let wall = t0.elapsed().as_secs_f64();
    Figures {
        cpu_share: cpu / wall,
        rss_mib: status_mib(zt.pid(), "VmRSS:"),
        peak_mib: status_mib(zt.pid(), "VmHWM:"),
        results: rx.entries().len() - n0,
    }
}

#[tokio::main]
async fn main() {
    // Under `cargo test` (a debug build) a short run only keeps the harness working.
    let default_secs = if cfg!(debug_assertions) { 3 } else { 30 };
    let seconds: u64 = common::args()
        .first()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default_secs);
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tcp_addr = tcp.local_addr().unwrap();
    tokio::spawn(async move { while tcp.accept().await.is_ok() {} });
    let http = HttpTarget::start(Arc::new(|_| (Duration::ZERO, 200, "ok"))).await;

    let mut probes = String::new();
    for i in 0..1000 {
        probes += &format!(
            "\n[[probes]]\nname = \"tcp-{i}\"\nkind = \"tcp\"\ntarget = \"{tcp_addr}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n"
        );
    }
    for i in 0..200 {
        probes += &format!(
            "\n[[probes]]\nname = \"http-{i}\"\nkind = \"http\"\ntarget = \"{}\"\ninterval = \"1s\"\ntimeout = \"500ms\"\n",
            http.url("/healthz")
        );
    }
    let idle = measure("", seconds).await;
    let loaded = measure(&probes, seconds).await;
    println!(
        "probe load over {seconds} s ({} ztail, 2-core machine, loopback):",
        common::profile()
    );
    println!(
        "  {:<34} {:>10} {:>10} {:>10} {:>12}",
        "", "CPU share", "RSS MiB", "peak MiB", "results/s"
    );
    for (name, f) in [
        ("idle ztail (baseline)", &idle),
        ("1,000 TCP + 200 HTTP probes @ 1 s", &loaded),
    ] {
        println!(
            "  {:<34} {:>9.1}% {:>10.1} {:>10.1} {:>12.0}",
            name,
            f.cpu_share * 100.0,
            f.rss_mib,
            f.peak_mib,
            f.results as f64 / seconds as f64
        );
    }
    println!(
        "  cost of the probes: {:.2} ms of CPU per result; RSS {:.1}x the idle baseline",
        (loaded.cpu_share - idle.cpu_share) * seconds as f64 * 1000.0
            / loaded.results.max(1) as f64,
        loaded.rss_mib / idle.rss_mib
    );
}
