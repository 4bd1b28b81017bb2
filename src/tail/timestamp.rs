//! Timestamps written in log lines, parsed to Unix nanoseconds.
//!
//! Hand-written rather than taken from `time` or `chrono`: the CRI format puts an RFC 3339
//! timestamp on every line, so this is on the hot path, and the forms found in real logs are a
//! small, fixed family (`T` or space between date and time, `.` or `,` before the fraction, `Z`,
//! `±hh:mm`, `±hhmm`, `±hh` or no zone). Named zones with daylight saving are not supported:
//! such logs must carry their offset in the text.

/// How a captured timestamp is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TsFormat {
    /// RFC 3339 and its common relatives; a timestamp without a zone is in the configured one.
    Rfc3339,
    /// Seconds since the Unix epoch, optionally with a fraction (`1732600000.123`).
    UnixSeconds,
    UnixMillis,
    UnixMicros,
    UnixNanos,
}

impl TsFormat {
    pub fn from_name(name: &str) -> Option<TsFormat> {
        Some(match name {
            "rfc3339" => TsFormat::Rfc3339,
            "unix_seconds" => TsFormat::UnixSeconds,
            "unix_millis" => TsFormat::UnixMillis,
            "unix_micros" => TsFormat::UnixMicros,
            "unix_nanos" => TsFormat::UnixNanos,
            _ => return None,
        })
    }

    /// Parses `s`; `zone` is the offset in seconds east of UTC for zone-less RFC 3339 text.
    pub fn parse(self, s: &[u8], zone: i32) -> Option<i64> {
        match self {
            TsFormat::Rfc3339 => parse_rfc3339(s, zone),
            TsFormat::UnixSeconds => parse_unix(s, 1_000_000_000),
            TsFormat::UnixMillis => parse_unix(s, 1_000_000),
            TsFormat::UnixMicros => parse_unix(s, 1_000),
            TsFormat::UnixNanos => parse_unix(s, 1),
        }
    }
}

/// Parses a zone setting: `UTC`, `Z` or `±hh:mm`. Returns seconds east of UTC.
pub fn parse_zone(s: &str) -> Option<i32> {
    if s.eq_ignore_ascii_case("utc") || s == "Z" {
        return Some(0);
    }
    let (offset, rest) = parse_offset(s.as_bytes())?;
    rest.is_empty().then_some(offset)
}

/// Parses `YYYY-MM-DD(T| )hh:mm:ss[(.|,)fraction][zone]`; without a zone the time is taken to
/// be at `default_zone` seconds east of UTC.
pub fn parse_rfc3339(s: &[u8], default_zone: i32) -> Option<i64> {
    if s.len() < 19 {
        return None;
    }
    let year = digits(&s[0..4])? as i64;
    let month = digits(&s[5..7])?;
    let day = digits(&s[8..10])?;
    let hour = digits(&s[11..13])?;
    let minute = digits(&s[14..16])?;
    let second = digits(&s[17..19])?.min(59); // a leap second becomes :59
    if s[4] != b'-'
        || s[7] != b'-'
        || !matches!(s[10], b'T' | b't' | b' ')
        || s[13] != b':'
        || s[16] != b':'
        || !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
    {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos: i64 = 0;
    if let [b'.' | b',', tail @ ..] = rest {
        let n = tail.iter().take_while(|b| b.is_ascii_digit()).count();
        if n == 0 {
            return None;
        }
        let mut scale = 100_000_000;
        for &d in &tail[..n.min(9)] {
            nanos += (d - b'0') as i64 * scale;
            scale /= 10;
        }
        rest = &tail[n..];
    }
    let zone = match rest {
        [] => default_zone,
        [b'Z' | b'z'] => 0,
        _ => {
            let (offset, after) = parse_offset(rest)?;
            if !after.is_empty() {
                return None;
            }
            offset
        }
    };
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + (hour * 3600 + minute * 60 + second) as i64 - zone as i64;
    secs.checked_mul(1_000_000_000)?.checked_add(nanos)
}

/// `±hh:mm`, `±hhmm` or `±hh`; returns the offset in seconds and what follows it.
fn parse_offset(s: &[u8]) -> Option<(i32, &[u8])> {
    let sign = match s.first()? {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let hours = digits(s.get(1..3)?)? as i32;
    let (minutes, rest) = match &s[3..] {
        [b':', m1, m2, rest @ ..] => (digits(&[*m1, *m2])? as i32, rest),
        [m1, m2, rest @ ..] if m1.is_ascii_digit() => (digits(&[*m1, *m2])? as i32, rest),
        rest => (0, rest),
    };
    if hours > 23 || minutes > 59 {
        return None;
    }
    Some((sign * (hours * 3600 + minutes * 60), rest))
}

fn parse_unix(s: &[u8], unit_nanos: i64) -> Option<i64> {
    let (int, frac) = match s.iter().position(|&b| b == b'.') {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, &s[..0]),
    };
    if int.is_empty() || int.len() > 19 || !int.iter().all(u8::is_ascii_digit) {
        return None;
    }
    if !frac.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let whole: i64 = std::str::from_utf8(int).ok()?.parse().ok()?;
    let mut ns = whole.checked_mul(unit_nanos)?;
    let mut scale = unit_nanos / 10;
    for &d in frac {
        if scale == 0 {
            break;
        }
        ns += (d - b'0') as i64 * scale;
        scale /= 10;
    }
    Some(ns)
}

fn digits(s: &[u8]) -> Option<u32> {
    let mut v = 0u32;
    for &b in s {
        if !b.is_ascii_digit() {
            return None;
        }
        v = v * 10 + (b - b'0') as u32;
    }
    Some(v)
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: i64 = 1_000_000_000;

    #[test]
    fn rfc3339_forms() {
        // 2026-11-26T03:15:00Z is 1795662900.
        let base = 1_795_662_900 * NS;
        let cases: &[(&str, i64)] = &[
            ("2026-11-26T03:15:00Z", base),
            ("2026-11-26T03:15:00.123456789Z", base + 123_456_789),
            ("2026-11-26T03:15:00.1Z", base + 100_000_000),
            ("2026-11-26T03:15:00.1234567891234Z", base + 123_456_789),
            ("2026-11-26 03:15:00,250", base + 250_000_000),
            ("2026-11-26T04:15:00+01:00", base),
            ("2026-11-26T04:15:00+0100", base),
            ("2026-11-26T02:15:00-01", base),
            ("2026-11-26t03:15:00z", base),
        ];
        for (text, want) in cases {
            assert_eq!(parse_rfc3339(text.as_bytes(), 0), Some(*want), "{text}");
        }
        // Without a zone, the configured one applies.
        assert_eq!(
            parse_rfc3339(b"2026-11-26T05:15:00", 2 * 3600),
            Some(base),
            "zone-less at +02:00"
        );
    }

    #[test]
    fn rfc3339_rejects_nonsense() {
        for text in [
            "",
            "2026-11-26",
            "2026-13-01T00:00:00Z",
            "2026-02-29T00:00:00Z",
            "2026-11-26X03:15:00Z",
            "2026-11-26T24:00:00Z",
            "2026-11-26T03:15:00.Z",
            "2026-11-26T03:15:00+25:00",
            "2026-11-26T03:15:00Zjunk",
            "abcd-11-26T03:15:00Z",
        ] {
            assert_eq!(parse_rfc3339(text.as_bytes(), 0), None, "{text}");
        }
        assert!(parse_rfc3339(b"2024-02-29T00:00:00Z", 0).is_some());
    }

    #[test]
    fn matches_known_epochs() {
        assert_eq!(parse_rfc3339(b"1970-01-01T00:00:00Z", 0), Some(0));
        assert_eq!(
            parse_rfc3339(b"2000-03-01T00:00:00Z", 0),
            Some(951_868_800 * NS)
        );
        assert_eq!(parse_rfc3339(b"1969-12-31T23:59:59Z", 0), Some(-NS));
    }

    #[test]
    fn unix_forms() {
        assert_eq!(
            TsFormat::UnixSeconds.parse(b"1795662900", 0),
            Some(1_795_662_900 * NS)
        );
        assert_eq!(
            TsFormat::UnixSeconds.parse(b"1795662900.5", 0),
            Some(1_795_662_900 * NS + 500_000_000)
        );
        assert_eq!(
            TsFormat::UnixMillis.parse(b"1795662900123", 0),
            Some(1_795_662_900_123_000_000)
        );
        assert_eq!(TsFormat::UnixNanos.parse(b"17", 0), Some(17));
        assert_eq!(TsFormat::UnixSeconds.parse(b"", 0), None);
        assert_eq!(TsFormat::UnixSeconds.parse(b"12a", 0), None);
        assert_eq!(
            TsFormat::UnixSeconds.parse(b"99999999999999999999", 0),
            None
        );
    }

    #[test]
    fn zones() {
        assert_eq!(parse_zone("UTC"), Some(0));
        assert_eq!(parse_zone("+05:30"), Some(5 * 3600 + 1800));
        assert_eq!(parse_zone("-08:00"), Some(-8 * 3600));
        assert_eq!(parse_zone("Europe/Paris"), None);
        assert_eq!(parse_zone("+05:30x"), None);
    }
}
