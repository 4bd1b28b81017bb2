//! `ztail status`: fetches `/status` from a running ztail's admin endpoint and renders it for a
//! terminal.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

/// Fetches and renders the status of the ztail whose admin endpoint is at `addr`.
pub fn show(addr: SocketAddr) -> anyhow::Result<String> {
    let body = fetch(addr).with_context(|| {
        format!("cannot read the admin endpoint at {addr}: is ztail running with admin.listen = \"{addr}\"?")
    })?;
    let status: Value = serde_json::from_str(&body)
        .context("the admin endpoint answered something other than ztail's status JSON")?;
    Ok(render(&status, ztail::pipeline::unix_seconds()))
}

fn fetch(addr: SocketAddr) -> anyhow::Result<String> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(b"GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut raw = String::new();
    s.read_to_string(&mut raw)?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .context("malformed HTTP response")?;
    anyhow::ensure!(
        head.starts_with("HTTP/1.1 200"),
        "unexpected answer: {}",
        head.lines().next().unwrap_or("")
    );
    Ok(body.to_owned())
}

/// Renders the status JSON; pure, so it is unit-tested.
pub fn render(s: &Value, now: i64) -> String {
    let mut out = String::new();
    let ready = if s["ready"].as_bool() == Some(true) {
        "READY"
    } else {
        "NOT READY"
    };
    let _ = writeln!(
        out,
        "ztail {}  {ready}",
        s["version"].as_str().unwrap_or("?")
    );

    match s["identity"].as_object() {
        Some(id) => {
            let left = id
                .get("expires_in_secs")
                .and_then(Value::as_i64)
                .unwrap_or(0);
            let bundles: Vec<&str> = id
                .get("bundle_trust_domains")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "identity  {}  serial {}  expires in {}  bundles [{}]  updates {}",
                id.get("spiffe_id").and_then(Value::as_str).unwrap_or("?"),
                short(id.get("serial").and_then(Value::as_str).unwrap_or("?")),
                duration(left),
                bundles.join(", "),
                id.get("updates").and_then(Value::as_u64).unwrap_or(0),
            );
        }
        None => {
            let _ = writeln!(
                out,
                "identity  none: waiting for an SVID (nothing is sent meanwhile)"
            );
        }
    }

    // Every sink; a single one (`[sink]`, or an older ztail without `sinks`) without its name.
    let several = s["sinks"].as_array().filter(|a| a.len() > 1);
    let sinks: Vec<&Value> = match several {
        Some(a) => a.iter().collect(),
        None => vec![&s["sink"]],
    };
    for sink in sinks {
        let last_ok = sink["last_success_unix"].as_i64().unwrap_or(0);
        let since = if last_ok > 0 {
            format!("{} ago", duration(now - last_ok))
        } else {
            "never".into()
        };
        let state = if sink["failing"].as_bool() == Some(true) {
            "FAILING"
        } else {
            "ok"
        };
        let name = match several {
            Some(_) => format!(" {}", sink["name"].as_str().unwrap_or("?")),
            None => String::new(),
        };
        let behind = match sink["lag_bytes"].as_u64() {
            Some(b) if several.is_some() => format!("  behind {}", bytes(b)),
            _ => String::new(),
        };
        let _ = writeln!(
            out,
            "sink{name}      {state}  last success {since}  requests ok {}  failures in a row {}{behind}",
            sink["requests_ok"].as_u64().unwrap_or(0),
            sink["consecutive_failures"].as_u64().unwrap_or(0)
        );
        if let Some(err) = sink["last_error"].as_str() {
            let _ = writeln!(out, "          last error: {err}");
        }
    }
    if let Some(r) = s["last_reload"].as_object() {
        let at = r.get("at_unix").and_then(Value::as_i64).unwrap_or(0);
        let ago = duration(now - at);
        match r.get("error").and_then(Value::as_str) {
            None => {
                let _ = writeln!(out, "reload    ok {ago} ago");
            }
            Some(why) => {
                let _ = writeln!(
                    out,
                    "reload    REFUSED {ago} ago (the running config stays): {why}"
                );
            }
        }
    }

    let files = s["files"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(out, "files     {}", files.len());
    if !files.is_empty() {
        let _ = writeln!(
            out,
            "  {:<8} {:>10} {:>10} {:>10}  PATH",
            "STATE", "SIZE", "COMMITTED", "LAG"
        );
        for f in &files {
            let mut state = f["state"].as_str().unwrap_or("?").to_owned();
            if f["deleted"].as_bool() == Some(true) {
                state.push('*');
            }
            let _ = writeln!(
                out,
                "  {:<8} {:>10} {:>10} {:>10}  {}",
                state,
                bytes(f["size"].as_u64().unwrap_or(0)),
                bytes(f["committed_offset"].as_u64().unwrap_or(0)),
                bytes(f["lag_bytes"].as_u64().unwrap_or(0)),
                f["path"].as_str().unwrap_or("?"),
            );
        }
    }
    let probes = s["probes"].as_array().cloned().unwrap_or_default();
    if !probes.is_empty() {
        let _ = writeln!(out, "probes    {}", probes.len());
        let _ = writeln!(
            out,
            "  {:<16} {:<5} {:>9} {:>8}  {:<16} TARGET",
            "NAME", "UP", "LATENCY", "ATTEMPTS", "LAST"
        );
        for p in &probes {
            let ok = p["ok"].as_bool() == Some(true);
            let last = if ok {
                p["status"]
                    .as_u64()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "ok".into())
            } else {
                p["error"].as_str().unwrap_or("?").to_owned()
            };
            let _ = writeln!(
                out,
                "  {:<16} {:<5} {:>7.1}ms {:>8}  {:<16} {}",
                p["probe"].as_str().unwrap_or("?"),
                if ok { "up" } else { "DOWN" },
                p["latency_ms"].as_f64().unwrap_or(0.0),
                p["attempts"].as_u64().unwrap_or(0),
                last,
                p["target"].as_str().unwrap_or("?"),
            );
        }
    }
    out
}

fn short(serial: &str) -> String {
    if serial.len() > 12 {
        format!("{}…", &serial[..12])
    } else {
        serial.to_owned()
    }
}

fn duration(secs: i64) -> String {
    if secs < 0 {
        return format!("-{}", duration(-secs));
    }
    match secs {
        0..=119 => format!("{secs}s"),
        120..=7199 => format!("{}m{}s", secs / 60, secs % 60),
        _ => format!("{}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else {
        format!("{v:.1}{}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_last_reload() {
        let mut status = serde_json::json!({
            "version": "0.1.0", "ready": true, "identity": null, "files": [],
            "sink": {"failing": false, "consecutive_failures": 0, "last_error": null,
                     "last_success_unix": 990, "requests_ok": 1},
            "last_reload": {"at_unix": 940, "ok": true}
        });
        assert!(render(&status, 1000).contains("reload    ok 60s ago\n"));
        status["last_reload"] = serde_json::json!({"at_unix": 995, "ok": false,
            "error": "ztail.toml: state_dir cannot change on reload; restart ztail to apply it"});
        let text = render(&status, 1000);
        assert!(
            text.contains("reload    REFUSED 5s ago (the running config stays): ztail.toml: state_dir cannot change"),
            "{text}"
        );
    }

    #[test]
    fn renders_identity_sink_and_files() {
        let status = serde_json::json!({
            "version": "0.1.0",
            "ready": true,
            "identity": {"spiffe_id": "spiffe://example.org/ztail", "serial": "0123456789abcdef0123",
                         "not_after_unix": 1100, "expires_in_secs": 45,
                         "bundle_trust_domains": ["example.org"], "updates": 3},
            "sink": {"failing": false, "consecutive_failures": 0, "last_error": null,
                     "last_success_unix": 998, "requests_ok": 12},
            "files": [{"path": "/var/log/a.log", "source": "app", "state": "active", "deleted": false,
                       "size": 2048, "read_offset": 2048, "committed_offset": 1024, "lag_bytes": 1024}]
        });
        let text = render(&status, 1000);
        assert!(text.starts_with("ztail 0.1.0  READY\n"), "{text}");
        assert!(text.contains("spiffe://example.org/ztail  serial 0123456789ab…  expires in 45s  bundles [example.org]  updates 3"), "{text}");
        assert!(
            text.contains("sink      ok  last success 2s ago  requests ok 12"),
            "{text}"
        );
        assert!(
            text.contains("active       2.0KiB     1.0KiB     1.0KiB  /var/log/a.log"),
            "{text}"
        );
    }

    #[test]
    fn renders_every_sink_by_name_when_there_are_several() {
        let sink = |name: &str, failing: bool| {
            serde_json::json!({"name": name, "failing": failing, "consecutive_failures": 0,
                "last_error": null, "last_success_unix": 990, "requests_ok": 3, "lag_bytes": 2048})
        };
        let status = serde_json::json!({
            "version": "0.1.0", "ready": false, "identity": null,
            "sink": sink("ops", false), "sinks": [sink("ops", false), sink("team", true)],
            "files": []
        });
        let text = render(&status, 1000);
        assert!(
            text.contains("sink ops      ok  last success 10s ago"),
            "{text}"
        );
        assert!(text.contains("sink team      FAILING"), "{text}");
        assert!(text.contains("behind 2.0KiB"), "{text}");
    }

    #[test]
    fn renders_a_missing_identity_and_a_failing_sink() {
        let status = serde_json::json!({
            "version": "0.1.0", "ready": false, "identity": null,
            "sink": {"failing": true, "consecutive_failures": 4, "last_error": "Loki answered 503",
                     "last_success_unix": 0, "requests_ok": 0},
            "files": []
        });
        let text = render(&status, 1000);
        assert!(!text.contains("reload"), "{text}");
        assert!(text.contains("NOT READY"));
        assert!(text.contains("identity  none: waiting for an SVID"));
        assert!(text.contains("sink      FAILING  last success never"));
        assert!(text.contains("last error: Loki answered 503"));
    }
}
