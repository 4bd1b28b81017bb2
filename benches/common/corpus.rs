//! The benchmark corpus: deterministic log lines of the shapes ztail ships (70 % plain text,
//! 20 % JSON, 10 % logfmt), shared by the throughput harness and the snappy comparison.

/// Deterministic lines of the shape: 70 % plain text, 20 % JSON, 10 % logfmt, ~206 B;
/// or ~60 B short lines.
pub fn line(rng: &mut fastrand::Rng, n: u64, short: bool) -> String {
    const LOGGERS: [&str; 6] = ["http", "db", "auth", "cache", "payments", "scheduler"];
    const WORDS: [&str; 12] = [
        "request",
        "served",
        "user",
        "order",
        "retry",
        "timeout",
        "cache",
        "miss",
        "ok",
        "queued",
        "flushed",
        "connection",
    ];
    let ts = format!(
        "2026-11-26T06:{:02}:{:02}.{:03}Z",
        (n / 60_000) % 60,
        (n / 1000) % 60,
        n % 1000
    );
    let logger = LOGGERS[rng.usize(..LOGGERS.len())];
    if short {
        return format!(
            "{ts} INFO [{logger}] {} seq={n}",
            WORDS[rng.usize(..WORDS.len())]
        );
    }
    let words: Vec<&str> = (0..8).map(|_| WORDS[rng.usize(..WORDS.len())]).collect();
    match rng.u8(..10) {
        0 | 1 => format!(
            "{{\"ts\":\"{ts}\",\"level\":\"info\",\"logger\":\"{logger}\",\"msg\":\"{}\",\"user_id\":{},\"trace_id\":\"{:016x}\",\"seq\":{n}}}",
            words.join(" "),
            rng.u32(..100_000),
            rng.u64(..)
        ),
        2 => format!(
            "ts={ts} level=warn logger={logger} msg=\"{}\" attempt={} latency_ms={} seq={n}",
            words.join(" "),
            rng.u8(1..5),
            rng.u16(..2000)
        ),
        _ => format!(
            "{ts} INFO [{logger}] {} path=/api/v1/orders/{} status=200 took={}ms user={} seq={n}",
            words.join(" "),
            rng.u32(..100_000),
            rng.u16(..500),
            rng.u32(..10_000)
        ),
    }
}
