//! Hot-path parsers for processing stages: fields of a JSON object, fields of a logfmt line, and
//! ANSI escape stripping.
//!
//! What it owns: finding values in one line's bytes and turning a found value into text. The
//! parsers borrow from the line and hand back [`Value`]s; nothing is allocated except what
//! [`Value::write_to`] and [`strip_ansi`] write into a buffer the caller owns (and reuses). No input
//! can make them panic or recurse: arbitrary bytes, invalid UTF-8, cut-off JSON and deep nesting
//! all end in "not found" or `false`.
//!
//! What it does not do:
//! - validate. [`json_fields`] checks the syntax of the object members it walks and stops as soon
//!   as every path is settled, so text after that point is never looked at; inside a nested value
//!   it does not need, it only matches brackets and strings. A line it accepts may still be
//!   rejected by a strict JSON parser.
//! - check or repair UTF-8: bytes go through as they are (see [`Value::write_to`]).
//! - index arrays: a path is a list of object keys only.
//! - decide what the fields mean (labels, metadata, timestamps): that is the calling stage's job.

use memchr::{memchr, memchr2};

/// A value found by a parser: either text to take as is, or the body of a quoted string that
/// still holds escapes (JSON `\n`, `\"`, `\u00e9`, surrogate pairs; logfmt `\"` `\\` and the
/// same escapes as JSON, as go-logfmt reads them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    /// Text to take as is: a string body without backslashes, a number, `true`/`false`, the raw
    /// JSON text of an object or array, or an unquoted logfmt value.
    Plain(&'a [u8]),
    /// The body of a JSON string (between the quotes) that holds at least one backslash.
    JsonEscaped(&'a [u8]),
    /// The body of a quoted logfmt value that holds at least one backslash. Unescaped as
    /// go-logfmt does (its decoder uses JSON's string rules): `\"` `\\` and also `\n` `\t` `\r`
    /// `\/` `\b` `\f` `\uXXXX`, which Go's logfmt and `strconv.Quote` writers emit.
    LogfmtEscaped(&'a [u8]),
}

impl Value<'_> {
    /// Appends the value's text to `out` (unescaping if needed). Invalid escapes are kept
    /// literally; a lone surrogate becomes U+FFFD. Output is valid UTF-8 if the input was.
    ///
    /// "Kept literally" means the backslash and what follows it are copied as they are (`\x41`
    /// stays `\x41`, `\u12G4` stays `\u12G4`, a trailing `\` stays). The output is never longer
    /// than the value's bytes.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        match *self {
            Value::Plain(text) => out.extend_from_slice(text),
            Value::JsonEscaped(body) | Value::LogfmtEscaped(body) => {
                out.reserve(body.len());
                unescape(body, |part| {
                    out.extend_from_slice(part);
                    true
                });
            }
        }
    }
}

const REPLACEMENT: char = '\u{FFFD}';

/// Feeds the unescaped text of `body` to `emit` piece by piece. Stops and returns false as soon
/// as `emit` does; returns true when all of `body` was fed.
fn unescape(body: &[u8], mut emit: impl FnMut(&[u8]) -> bool) -> bool {
    let mut rest = body;
    while let Some(at) = memchr(b'\\', rest) {
        let (plain, escape) = rest.split_at(at);
        if !plain.is_empty() && !emit(plain) {
            return false;
        }
        let mut utf8 = [0u8; 4];
        // `used`: bytes of `escape` consumed. An invalid escape emits its backslash alone and
        // goes on after it, so what follows the backslash is copied as plain text.
        let (piece, used): (&[u8], usize) = match escape.get(1) {
            Some(b'"') => (b"\"", 2),
            Some(b'\\') => (b"\\", 2),
            Some(b'/') => (b"/", 2),
            Some(b'b') => (b"\x08", 2),
            Some(b'f') => (b"\x0c", 2),
            Some(b'n') => (b"\n", 2),
            Some(b'r') => (b"\r", 2),
            Some(b't') => (b"\t", 2),
            Some(b'u') => match hex4(escape.get(2..6)) {
                Some(unit) => {
                    let (c, used) = utf16_char(unit, escape.get(6..).unwrap_or_default());
                    (c.encode_utf8(&mut utf8).as_bytes(), used)
                }
                None => (b"\\", 1),
            },
            _ => (b"\\", 1),
        };
        if !emit(piece) {
            return false;
        }
        rest = escape.get(used..).unwrap_or_default();
    }
    rest.is_empty() || emit(rest)
}

/// The value of exactly four hex digits.
fn hex4(digits: Option<&[u8]>) -> Option<u32> {
    let digits = digits?;
    if digits.len() != 4 {
        return None;
    }
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return None,
        };
        Some(acc << 4 | u32::from(v))
    })
}

/// The character of the UTF-16 code unit of a `\uXXXX` escape, joined with a low surrogate
/// escape in `after` if it is a high surrogate; and the bytes of the escape(s) consumed.
fn utf16_char(unit: u32, after: &[u8]) -> (char, usize) {
    match unit {
        0xD800..=0xDBFF => {
            if after.starts_with(b"\\u")
                && let Some(low @ 0xDC00..=0xDFFF) = hex4(after.get(2..6))
            {
                let c = 0x10000 + ((unit - 0xD800) << 10 | (low - 0xDC00));
                return (char::from_u32(c).unwrap_or(REPLACEMENT), 12);
            }
            (REPLACEMENT, 6)
        }
        0xDC00..=0xDFFF => (REPLACEMENT, 6),
        _ => (char::from_u32(unit).unwrap_or(REPLACEMENT), 6),
    }
}

// ---------------------------------------------------------------------------------------------
// JSON

/// Nesting limit of [`json_fields`] (the top-level object is depth 1), like serde_json's default.
const MAX_DEPTH: usize = 128;

/// Paths tracked by one pass over the text (one bit each in a `u64`); more take more passes.
const PATHS_PER_PASS: usize = 64;

/// Finds the values at `paths` in the JSON object `text` (whitespace around it is fine) and calls
/// `found(path_index, value)` for each, at most once per path.
///
/// A path is a list of object keys: `["user", "id"]` for `{"user":{"id":7}}`; an empty path is
/// the whole object. Keys are compared unescaped (`"lev\u0065l"` is `level`), without
/// allocating, escaped or not. Values:
/// - a string: its body, [`Value::Plain`] if it holds no backslash, else [`Value::JsonEscaped`];
/// - a number, `true`, `false`: [`Value::Plain`] of its literal text;
/// - an object or array: [`Value::Plain`] of its raw JSON text, brackets included;
/// - `null`: not found.
///
/// The first occurrence of a key wins, along the whole path: in `{"a":{"b":1},"a":{"c":2}}`
/// the path `a.c` is not found, and `{"a":null,"a":1}` finds nothing for `a`. Arrays are not
/// indexed: a path through one is not found.
///
/// Returns what the scan saw, and it stops as soon as every path is settled (found, or known to
/// be absent):
/// - `false` if `text` does not start (after whitespace) with `{`; then `found` is never called.
/// - `false` if the scan ran into a syntax error, the end of a cut-off line, nesting deeper than
///   128 (the top-level object is depth 1) or non-whitespace after the object. Values found before
///   that point have been handed to `found` and stand: each was complete on its own (a string
///   up to its closing quote, a number or literal up to the byte after it, an object or array up
///   to its closing bracket).
/// - `true` otherwise: no error up to where the scan stopped. Text after the value that settled
///   the last path is not looked at, so a line broken further on still gives `true`. With no
///   paths, only the opening `{` is checked.
///
/// Checking is limited to what the scan walks: the members of the objects on the paths are
/// checked strictly (strings, `:`, `,`, number grammar, literals); a value skipped over only has
/// its brackets matched and strings closed. The scan is iterative. Beyond 64 paths, each further
/// 64 take another pass over the text.
pub fn json_fields<'a>(
    text: &'a [u8],
    paths: &[Vec<String>],
    mut found: impl FnMut(usize, Value<'a>),
) -> bool {
    let open = skip_ws(text, 0);
    if text.get(open) != Some(&b'{') {
        return false;
    }
    let mut ok = true;
    for (pass, group) in paths.chunks(PATHS_PER_PASS).enumerate() {
        let base = pass * PATHS_PER_PASS;
        // The scan keeps one `Level` per object it walks into, at most one per key of a path:
        // a small stack for usual paths keeps the per-line setup cheap.
        let longest = group.iter().map(Vec::len).max().unwrap_or(0);
        ok &= if longest <= SHORT_PATH {
            json_pass::<_, { SHORT_PATH - 1 }>(text, open, group, base, &mut found)
        } else {
            json_pass::<_, { MAX_DEPTH - 1 }>(text, open, group, base, &mut found)
        };
    }
    ok
}

/// Paths up to this many keys are scanned with a small stack.
const SHORT_PATH: usize = 8;

/// An object the scan is walking because some paths go through it.
#[derive(Clone, Copy)]
struct Level {
    /// Paths that go on below a key of this object.
    through: u64,
    /// Paths that end at this object: found as its raw text when it closes.
    at_close: u64,
    /// Bit `n % 64` set for the length `n` of each key wanted here: a cheap first test.
    key_lens: u64,
    /// Where the object's `{` is.
    start: usize,
}

/// One pass of [`json_fields`] for up to 64 `paths`, numbered from `base`; `open` is the
/// position of the top-level `{`. `PARENTS` must be at least the longest path's length - 1.
fn json_pass<'a, F: FnMut(usize, Value<'a>), const PARENTS: usize>(
    text: &'a [u8],
    open: usize,
    paths: &[Vec<String>],
    base: usize,
    found: &mut F,
) -> bool {
    let mut cur = Level {
        through: 0,
        at_close: 0,
        key_lens: 0,
        start: open,
    };
    for (q, path) in paths.iter().enumerate().take(PATHS_PER_PASS) {
        match path.first() {
            None => cur.at_close |= 1 << q,
            Some(key) => {
                cur.through |= 1 << q;
                cur.key_lens |= length_bit(key);
            }
        }
    }
    // Paths not yet settled (found, or known to be absent).
    let mut remaining = cur.through | cur.at_close;
    if remaining == 0 {
        return true;
    }
    // The objects around `cur`, outermost first; `cur` is at depth `parents_len + 1`.
    let mut parents = [cur; PARENTS];
    let mut parents_len = 0usize;
    let mut i = open + 1;
    let mut first = true;
    loop {
        // At a member of `cur` (or its `}` if it may be empty).
        i = skip_ws(text, i);
        let mut closing = first && text.get(i) == Some(&b'}');
        if !closing {
            if text.get(i) != Some(&b'"') {
                return false;
            }
            let Some((key_end, key_escaped)) = string_end(text, i) else {
                return false;
            };
            let key = text.get(i + 1..key_end - 1).unwrap_or_default();
            i = skip_ws(text, key_end);
            if text.get(i) != Some(&b':') {
                return false;
            }
            i = skip_ws(text, i + 1);

            // Which unsettled paths take this key here: those ending at it, those going on.
            let (mut ends, mut goes_on) = (0u64, 0u64);
            let mut live = cur.through & remaining;
            if !key_escaped && cur.key_lens & length_bit(key) == 0 {
                live = 0;
            }
            while live != 0 {
                let bit = live & live.wrapping_neg();
                live ^= bit;
                let q = bit.trailing_zeros() as usize;
                if let Some(path) = paths.get(q)
                    && let Some(want) = path.get(parents_len)
                    && key_eq(key, key_escaped, want.as_bytes())
                {
                    if path.len() == parents_len + 1 {
                        ends |= bit;
                    } else {
                        goes_on |= bit;
                    }
                }
            }

            let value_start = i;
            match text.get(i) {
                Some(b'{') if goes_on != 0 => {
                    if parents_len + 1 >= MAX_DEPTH {
                        return false;
                    }
                    let Some(slot) = parents.get_mut(parents_len) else {
                        return false;
                    };
                    *slot = cur;
                    parents_len += 1;
                    cur = Level {
                        through: goes_on,
                        at_close: ends,
                        key_lens: 0,
                        start: i,
                    };
                    let mut next = goes_on;
                    while next != 0 {
                        let q = next.trailing_zeros() as usize;
                        next &= next - 1;
                        if let Some(key) = paths.get(q).and_then(|path| path.get(parents_len)) {
                            cur.key_lens |= length_bit(key);
                        }
                    }
                    i += 1;
                    first = true;
                    continue;
                }
                Some(b'{' | b'[') => {
                    let Some(end) = container_end(text, i, MAX_DEPTH - parents_len - 1) else {
                        return false;
                    };
                    i = end;
                    report(ends, base, Value::Plain(slice(text, value_start, i)), found);
                }
                Some(b'"') => {
                    let Some((end, escaped)) = string_end(text, i) else {
                        return false;
                    };
                    i = end;
                    let body = slice(text, value_start + 1, i - 1);
                    let value = if escaped {
                        Value::JsonEscaped(body)
                    } else {
                        Value::Plain(body)
                    };
                    report(ends, base, value, found);
                }
                Some(&b) => {
                    let end = match b {
                        b'n' => literal_end(text, i, b"null"),
                        b't' => literal_end(text, i, b"true"),
                        b'f' => literal_end(text, i, b"false"),
                        b'-' | b'0'..=b'9' => {
                            number_end(text, i).filter(|&end| ends_scalar(text, end))
                        }
                        _ => None,
                    };
                    let Some(end) = end else {
                        return false;
                    };
                    i = end;
                    // null: not found.
                    if b != b'n' {
                        report(ends, base, Value::Plain(slice(text, value_start, i)), found);
                    }
                }
                None => return false,
            }
            // Whatever the value was, these paths are settled: first occurrence wins.
            remaining &= !(ends | goes_on);
            if remaining == 0 {
                return true;
            }
        }

        // After a value of `cur`: a comma, or `}` closing `cur` (and maybe objects around it).
        loop {
            if !closing {
                i = skip_ws(text, i);
                match text.get(i) {
                    Some(b',') => {
                        i += 1;
                        first = false;
                        break;
                    }
                    Some(b'}') => {}
                    _ => return false,
                }
            }
            closing = false;
            i += 1;
            report(
                cur.at_close,
                base,
                Value::Plain(slice(text, cur.start, i)),
                found,
            );
            remaining &= !(cur.through | cur.at_close);
            if parents_len == 0 {
                return skip_ws(text, i) == text.len();
            }
            if remaining == 0 {
                return true;
            }
            parents_len -= 1;
            let Some(&parent) = parents.get(parents_len) else {
                return false;
            };
            cur = parent;
        }
    }
}

/// Calls `found` for each path in `mask`.
fn report<'a, F: FnMut(usize, Value<'a>)>(
    mut mask: u64,
    base: usize,
    value: Value<'a>,
    found: &mut F,
) {
    while mask != 0 {
        let q = mask.trailing_zeros() as usize;
        mask &= mask - 1;
        found(base + q, value);
    }
}

/// `text[from..to]`, or empty if out of range (never, by construction; but never a panic).
fn slice(text: &[u8], from: usize, to: usize) -> &[u8] {
    text.get(from..to).unwrap_or_default()
}

fn length_bit(key: &(impl AsRef<[u8]> + ?Sized)) -> u64 {
    1 << (key.as_ref().len() % 64)
}

/// Whether the key body `key` (holding escapes if `escaped`) unescapes to `want`.
#[inline]
fn key_eq(key: &[u8], escaped: bool, want: &[u8]) -> bool {
    if escaped {
        return escaped_key_eq(key, want);
    }
    // Most keys differ in length or first byte: spare them a call to memcmp.
    key.len() == want.len() && key.first() == want.first() && key == want
}

fn escaped_key_eq(key: &[u8], want: &[u8]) -> bool {
    // Unescaping never lengthens.
    if want.len() > key.len() {
        return false;
    }
    let mut rest = want;
    unescape(key, |part| match rest.strip_prefix(part) {
        Some(tail) => {
            rest = tail;
            true
        }
        None => false,
    }) && rest.is_empty()
}

fn skip_ws(text: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = text.get(i) {
        i += 1;
    }
    i
}

/// For the string whose opening quote is at `quote`: the position after its closing quote, and
/// whether it holds a backslash. None if it is not closed.
fn string_end(text: &[u8], quote: usize) -> Option<(usize, bool)> {
    let mut i = quote + 1;
    let mut escaped = false;
    loop {
        let at = find_quote_or_backslash(text, i)?;
        if text.get(at) == Some(&b'"') {
            return Some((at + 1, escaped));
        }
        escaped = true;
        i = at + 2;
    }
}

/// The position of the first `"` or `\` from `i`. Keys and values are mostly short, and for a
/// few bytes a call to `memchr2` costs more than looking at them 8 at a time (SWAR) here; longer
/// strings go on with `memchr2`.
fn find_quote_or_backslash(text: &[u8], i: usize) -> Option<usize> {
    const ONES: u64 = u64::from_le_bytes([1; 8]);
    const HIGHS: u64 = u64::from_le_bytes([0x80; 8]);
    const QUOTES: u64 = u64::from_le_bytes([b'"'; 8]);
    const BACKSLASHES: u64 = u64::from_le_bytes([b'\\'; 8]);
    let mut j = i;
    while j < i + 64
        && let Some(chunk) = text.get(j..).and_then(<[u8]>::first_chunk::<8>)
    {
        let word = u64::from_le_bytes(*chunk);
        // A zero byte in `x` sets the high bit of its byte in `(x - ONES) & !x` (bits above the
        // lowest such byte may be set wrongly; the lowest one is exact).
        let (q, b) = (word ^ QUOTES, word ^ BACKSLASHES);
        let hits = ((q.wrapping_sub(ONES) & !q) | (b.wrapping_sub(ONES) & !b)) & HIGHS;
        if hits != 0 {
            return Some(j + (hits.trailing_zeros() / 8) as usize);
        }
        j += 8;
    }
    memchr2(b'"', b'\\', text.get(j..)?).map(|at| j + at)
}

/// Bytes that matter when skipping over an object or array.
static STRUCTURAL: [bool; 256] = {
    let mut table = [false; 256];
    table[b'"' as usize] = true;
    table[b'{' as usize] = true;
    table[b'}' as usize] = true;
    table[b'[' as usize] = true;
    table[b']' as usize] = true;
    table
};

/// For the object or array opening at `open`: the position after its closing bracket. Only
/// brackets (which must match) and strings are looked at. None if it is not closed or nests
/// deeper than `limit` (at most 128).
fn container_end(text: &[u8], open: usize, limit: usize) -> Option<usize> {
    let limit = limit.min(128);
    // One bit per open bracket, innermost lowest: 1 for `{`, 0 for `[`.
    let mut kinds: u128 = 0;
    let mut depth = 0usize;
    let mut i = open;
    loop {
        while let Some(&b) = text.get(i)
            && !STRUCTURAL[usize::from(b)]
        {
            i += 1;
        }
        match *text.get(i)? {
            b'"' => i = string_end(text, i)?.0,
            b @ (b'{' | b'[') => {
                if depth >= limit {
                    return None;
                }
                kinds = kinds << 1 | u128::from(b == b'{');
                depth += 1;
                i += 1;
            }
            b => {
                if depth == 0 || (kinds & 1 == 1) != (b == b'}') {
                    return None;
                }
                kinds >>= 1;
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
        }
    }
}

/// The position after `word` at `i`, if it is there and followed by a delimiter.
fn literal_end(text: &[u8], i: usize, word: &[u8]) -> Option<usize> {
    let end = i + word.len();
    (text.get(i..end) == Some(word) && ends_scalar(text, end)).then_some(end)
}

/// Whether a number or literal ending at `end` is complete: followed by whitespace or
/// punctuation that may follow a value (the end of the text may have cut it short).
fn ends_scalar(text: &[u8], end: usize) -> bool {
    matches!(
        text.get(end),
        Some(b' ' | b'\t' | b'\n' | b'\r' | b',' | b'}' | b']')
    )
}

/// The end of the JSON number at `i`: `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`.
#[inline]
fn number_end(text: &[u8], mut i: usize) -> Option<usize> {
    if text.get(i) == Some(&b'-') {
        i += 1;
    }
    match text.get(i) {
        Some(b'0') => i += 1,
        Some(b'1'..=b'9') => i = digits_end(text, i + 1),
        _ => return None,
    }
    if text.get(i) == Some(&b'.') {
        let end = digits_end(text, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = text.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = text.get(i) {
            i += 1;
        }
        let end = digits_end(text, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

fn digits_end(text: &[u8], mut i: usize) -> usize {
    while let Some(b'0'..=b'9') = text.get(i) {
        i += 1;
    }
    i
}

// ---------------------------------------------------------------------------------------------
// logfmt

/// Finds the values of `keys` in a logfmt line (`level=info msg="hello \"world\"" dur=3ms flag`)
/// and calls `found(key_index, value)` for each, at most once per key; the first occurrence
/// wins. Stops as soon as every key is found.
///
/// A bare key without `=` (`flag`) has the empty value `Plain(b"")`, as go-logfmt gives it. A
/// quoted value may hold whitespace and escapes: its body is [`Value::LogfmtEscaped`] if it holds
/// a backslash, else [`Value::Plain`]. An unquoted value runs to the next whitespace. Garbage is
/// skipped, never a panic.
///
/// The grammar is go-logfmt's: pairs are separated by runs of bytes `<= b' '` (so any ASCII
/// control byte separates too); a key is a run of other bytes except `=` and `"`. Choices made
/// where go-logfmt would report an error:
/// - `key=` followed by whitespace or the end is `Plain(b"")`, like a bare key.
/// - An unquoted value runs to the next whitespace even if it holds `=` or `"`
///   (`a=b=c` gives `a` = `b=c`).
/// - A quoted value that is not closed (a line cut short) runs to the end of the text.
/// - `=value` without a key is skipped as a pair; a token with a `"` where a key or `=` should be
///   (`"quoted words"`, `ab"cd"`) is skipped up to the next whitespace after the quoted part, or
///   after the quote if it is never closed (garbage never swallows the rest of the line).
/// - A quoted value directly followed by more text (`a="x"b=1`) ends at its quote; the text
///   after it starts the next pair.
/// - An empty key in `keys` is never found. Beyond 64 keys, each further 64 takes another pass.
///
/// `keys` may be `&[&str]` or `&[String]` (anything that is `AsRef<str>`).
pub fn logfmt_fields<'a, K: AsRef<str>>(
    text: &'a [u8],
    keys: &[K],
    mut found: impl FnMut(usize, Value<'a>),
) {
    for (pass, group) in keys.chunks(PATHS_PER_PASS).enumerate() {
        logfmt_pass(text, group, pass * PATHS_PER_PASS, &mut found);
    }
}

/// One pass of [`logfmt_fields`] for up to 64 `keys`, numbered from `base`.
fn logfmt_pass<'a, K: AsRef<str>, F: FnMut(usize, Value<'a>)>(
    text: &'a [u8],
    keys: &[K],
    base: usize,
    found: &mut F,
) {
    let mut remaining = 0u64;
    for (q, key) in keys.iter().enumerate().take(PATHS_PER_PASS) {
        if !key.as_ref().is_empty() {
            remaining |= 1 << q;
        }
    }
    let mut i = 0;
    while remaining != 0 {
        while let Some(&b) = text.get(i)
            && b <= b' '
        {
            i += 1;
        }
        if i >= text.len() {
            return;
        }
        let key_start = i;
        while let Some(&b) = text.get(i)
            && b > b' '
            && b != b'='
            && b != b'"'
        {
            i += 1;
        }
        let key = slice(text, key_start, i);
        let value = match text.get(i) {
            Some(b'=') => {
                i += 1;
                if text.get(i) == Some(&b'"') {
                    let (body, escaped, end) = logfmt_quoted(text, i);
                    i = end;
                    if escaped {
                        Value::LogfmtEscaped(body)
                    } else {
                        Value::Plain(body)
                    }
                } else {
                    let start = i;
                    i = token_end(text, i);
                    Value::Plain(slice(text, start, i))
                }
            }
            Some(b'"') => {
                // Garbage: skip the quoted part (if it is closed) and the rest of the token.
                i = token_end(text, string_end(text, i).map_or(i, |(end, _)| end));
                continue;
            }
            _ => Value::Plain(b""),
        };
        if key.is_empty() {
            continue;
        }
        let mut live = remaining;
        while live != 0 {
            let bit = live & live.wrapping_neg();
            live ^= bit;
            let q = bit.trailing_zeros() as usize;
            if keys
                .get(q)
                .is_some_and(|want| want.as_ref().as_bytes() == key)
            {
                found(base + q, value);
                remaining &= !bit;
            }
        }
    }
}

/// The position of the first byte `<= b' '` from `i`, or the end.
fn token_end(text: &[u8], mut i: usize) -> usize {
    while let Some(&b) = text.get(i)
        && b > b' '
    {
        i += 1;
    }
    i
}

/// For the quoted logfmt value opening at `quote`: its body, whether the body holds a
/// backslash, and the position after the closing quote. Not closed: the body runs to the end.
fn logfmt_quoted(text: &[u8], quote: usize) -> (&[u8], bool, usize) {
    match string_end(text, quote) {
        Some((end, escaped)) => (slice(text, quote + 1, end - 1), escaped, end),
        None => {
            let body = text.get(quote + 1..).unwrap_or_default();
            (body, memchr(b'\\', body).is_some(), text.len())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// ANSI

const ESC: u8 = 0x1b;
const BEL: u8 = 0x07;

/// Strips ANSI escape sequences (CSI `ESC [ ... final-byte`, OSC `ESC ] ... BEL|ESC \`, and
/// two-byte `ESC x` sequences) from `text`. Returns false and leaves `out` untouched when the
/// text has no ESC byte (one `memchr`: the common path, which allocates nothing); otherwise
/// clears `out`, writes the stripped text into it and returns true. Valid UTF-8 stays valid.
///
/// Sequences, as ECMA-48 and terminals parse them (every ESC is removed):
/// - CSI: `ESC [`, parameter and intermediate bytes `0x20..=0x3F`, a final byte `0x40..=0x7E`.
///   A CSI cut short by another byte (ESC, a control, non-ASCII) loses what was read of it; that
///   byte is kept and read on.
/// - Strings: OSC `ESC ]`, and likewise DCS `ESC P`, SOS `ESC X`, PM `ESC ^`, APC `ESC _`, up to
///   and including BEL or ST (`ESC \`); another ESC ends them too (and starts a sequence).
/// - `ESC`, intermediate bytes `0x20..=0x2F`, a final byte `0x30..=0x7E`: charset selection
///   such as `ESC ( B`, which `tput sgr0` writes.
/// - `ESC` and one byte `0x30..=0x7E` (`ESC 7`, `ESC c`, `ESC =`, ...).
/// - `ESC` before anything else is removed alone.
///
/// A sequence the end of the text cuts short is removed to the end (as a terminal would swallow
/// it); for an unterminated OSC that is all the text after it. Only ASCII bytes, or whole OSC/DCS
/// strings between ASCII delimiters, are removed, so valid UTF-8 stays valid. 8-bit C1 controls
/// (0x9B CSI...) are not recognised: in UTF-8 text those bytes are continuation bytes.
pub fn strip_ansi(text: &[u8], out: &mut Vec<u8>) -> bool {
    let Some(mut esc) = memchr(ESC, text) else {
        return false;
    };
    out.clear();
    out.reserve(text.len());
    let mut copy_from = 0;
    loop {
        out.extend_from_slice(slice(text, copy_from, esc));
        copy_from = sequence_end(text, esc);
        match memchr(ESC, text.get(copy_from..).unwrap_or_default()) {
            Some(at) => esc = copy_from + at,
            None => {
                out.extend_from_slice(text.get(copy_from..).unwrap_or_default());
                return true;
            }
        }
    }
}

/// The position after the escape sequence whose ESC is at `esc` (at most the text's length).
fn sequence_end(text: &[u8], esc: usize) -> usize {
    let i = esc + 1;
    match text.get(i) {
        None => i,
        Some(b'[') => {
            let mut j = i + 1;
            while let Some(0x20..=0x3f) = text.get(j) {
                j += 1;
            }
            match text.get(j) {
                Some(0x40..=0x7e) => j + 1,
                _ => j,
            }
        }
        Some(b']' | b'P' | b'X' | b'^' | b'_') => {
            let body = i + 1;
            match memchr2(BEL, ESC, text.get(body..).unwrap_or_default()) {
                None => text.len(),
                Some(at) => {
                    let j = body + at;
                    if text.get(j) == Some(&BEL) {
                        j + 1
                    } else if text.get(j + 1) == Some(&b'\\') {
                        j + 2
                    } else {
                        j
                    }
                }
            }
        }
        Some(0x20..=0x2f) => {
            let mut j = i + 1;
            while let Some(0x20..=0x2f) = text.get(j) {
                j += 1;
            }
            match text.get(j) {
                Some(0x30..=0x7e) => j + 1,
                _ => j,
            }
        }
        Some(0x30..=0x7e) => i + 1,
        Some(_) => i,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value as Json;

    /// xorshift64*: reproducible inputs without a dependency.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }

        fn percent(&mut self, p: usize) -> bool {
            self.below(100) < p
        }

        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[self.below(items.len())]
        }
    }

    // --- JSON ---------------------------------------------------------------------------------

    const KEYS: &[&str] = &[
        "a",
        "b",
        "c",
        "level",
        "lvl",
        "msg",
        "user",
        "id",
        "é",
        "日本",
        "😀",
        "k\"q",
        "back\\slash",
        "tab\there",
        "nl\n",
        "",
        "a b",
        "/",
        "\u{1}",
        "levels",
    ];
    const STRINGS: &[&str] = &[
        "",
        "plain",
        "with \"quotes\"",
        "back\\slash",
        "line\nbreak\r\n",
        "tab\t",
        "unicode é 日本 😀 𝄞",
        "\u{0}\u{1f}\u{8}\u{c}",
        "slash / and \\/",
        "\u{7f}\u{2028}\u{feff}",
        "a reasonably long message with words in it, for memchr to run over",
    ];
    const NUMBERS: &[&str] = &[
        "0",
        "-0",
        "7",
        "-12",
        "3.25",
        "-0.5",
        "1e5",
        "1E+5",
        "2e-3",
        "-2.5E-3",
        "0.0e0",
        "123456789012345678901234567890",
        "18446744073709551615",
        "-9223372036854775808",
        "1.5e300",
    ];

    fn ws(rng: &mut Rng, out: &mut String) {
        while rng.percent(35) {
            out.push_str(rng.pick(&[" ", "\t", "\n", "\r", "  "]));
        }
    }

    fn hex_escape(rng: &mut Rng, unit: u16, out: &mut String) {
        if rng.percent(50) {
            out.push_str(&format!("\\u{unit:04x}"));
        } else {
            out.push_str(&format!("\\u{unit:04X}"));
        }
    }

    /// `s` as a JSON string, each character written raw or escaped at random.
    fn json_string(rng: &mut Rng, s: &str, out: &mut String) {
        out.push('"');
        for c in s.chars() {
            let escape = rng.percent(20);
            match c {
                '"' if !escape => out.push_str("\\\""),
                '\\' if !escape => out.push_str("\\\\"),
                '\n' if !escape => out.push_str("\\n"),
                '\t' if !escape => out.push_str("\\t"),
                '\r' if !escape => out.push_str("\\r"),
                '\u{8}' if !escape => out.push_str("\\b"),
                '\u{c}' if !escape => out.push_str("\\f"),
                '/' if escape && rng.percent(50) => out.push_str("\\/"),
                c if escape || (c as u32) < 0x20 => {
                    let mut units = [0u16; 2];
                    for &unit in c.encode_utf16(&mut units).iter() {
                        hex_escape(rng, unit, out);
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }

    fn json_value(rng: &mut Rng, depth: usize, out: &mut String) {
        let kinds = if depth < 4 { 8 } else { 6 };
        match rng.below(kinds) {
            0 | 1 => {
                let s = rng_str(rng);
                json_string(rng, s, out);
            }
            2 | 3 => out.push_str(rng.pick(NUMBERS)),
            4 => out.push_str(rng.pick(&["true", "false"])),
            5 => out.push_str("null"),
            6 => json_object(rng, depth + 1, out),
            _ => {
                out.push('[');
                let n = rng.below(4);
                for k in 0..n {
                    ws(rng, out);
                    json_value(rng, depth + 1, out);
                    ws(rng, out);
                    if k + 1 < n {
                        out.push(',');
                    }
                }
                ws(rng, out);
                out.push(']');
            }
        }
    }

    fn rng_str(rng: &mut Rng) -> &'static str {
        STRINGS[rng.below(STRINGS.len())]
    }

    /// An object with distinct keys (serde_json keeps the last duplicate, `json_fields` the first).
    fn json_object(rng: &mut Rng, depth: usize, out: &mut String) {
        out.push('{');
        let n = rng.below(6);
        let mut keys: Vec<&str> = KEYS.to_vec();
        for k in 0..n {
            let key = keys.swap_remove(rng.below(keys.len()));
            ws(rng, out);
            json_string(rng, key, out);
            ws(rng, out);
            out.push(':');
            ws(rng, out);
            json_value(rng, depth, out);
            ws(rng, out);
            if k + 1 < n {
                out.push(',');
            }
        }
        ws(rng, out);
        out.push('}');
    }

    /// Every path to a member of an object in `v`, below `prefix`.
    fn all_paths(v: &Json, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        if let Json::Object(map) = v {
            for (k, child) in map {
                prefix.push(k.clone());
                out.push(prefix.clone());
                all_paths(child, prefix, out);
                prefix.pop();
            }
        }
    }

    fn lookup<'v>(v: &'v Json, path: &[String]) -> Option<&'v Json> {
        let mut v = v;
        for key in path {
            v = v.as_object()?.get(key)?;
        }
        (!v.is_null()).then_some(v)
    }

    /// Runs `json_fields`, checking each path is reported at most once.
    fn extract<'t>(text: &'t [u8], paths: &[Vec<String>]) -> (bool, Vec<Option<Value<'t>>>) {
        let mut got = vec![None; paths.len()];
        let ok = json_fields(text, paths, |q, v| {
            assert!(got[q].is_none(), "path {q} reported twice");
            got[q] = Some(v);
        });
        (ok, got)
    }

    fn text_of(v: Value<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        v.write_to(&mut out);
        out
    }

    fn check_against_serde(text: &str, doc: &Json, paths: &[Vec<String>]) {
        let (ok, got) = extract(text.as_bytes(), paths);
        assert!(ok, "valid object rejected: {text:?}");
        for (path, got) in paths.iter().zip(got) {
            let want = lookup(doc, path);
            match (want, got) {
                (None, None) => {}
                (Some(Json::String(s)), Some(v)) => {
                    assert_eq!(
                        String::from_utf8(text_of(v)).unwrap(),
                        *s,
                        "{path:?} in {text:?}"
                    );
                }
                (Some(want), Some(v @ Value::Plain(raw))) => {
                    let parsed: Json = serde_json::from_slice(raw)
                        .unwrap_or_else(|e| panic!("{path:?} in {text:?}: {v:?}: {e}"));
                    assert_eq!(parsed, *want, "{path:?} in {text:?}");
                    assert!(!want.is_string());
                }
                (want, got) => panic!("{path:?} in {text:?}: want {want:?}, got {got:?}"),
            }
        }
    }

    #[test]
    fn json_matches_serde_json() {
        let mut rng = Rng(0x5EED_1234_ABCD_0001);
        let mut escaped_values = 0;
        for _ in 0..600 {
            let mut text = String::new();
            ws(&mut rng, &mut text);
            json_object(&mut rng, 0, &mut text);
            ws(&mut rng, &mut text);
            let doc: Json = serde_json::from_str(&text).unwrap();
            escaped_values += text.matches("\\").count();

            let mut paths = Vec::new();
            all_paths(&doc, &mut Vec::new(), &mut paths);
            // Absent paths, a path into an array or a scalar, and the whole object.
            paths.push(vec!["nope".into()]);
            paths.push(vec!["a".into(), "nope".into()]);
            paths.push(vec!["a".into(), "b".into(), "c".into()]);
            paths.push(vec!["b".into(), "0".into()]);
            paths.push(vec![]);
            check_against_serde(&text, &doc, &paths);

            // Small subsets, as a stage asks for them (they also stop early).
            for _ in 0..4 {
                let n = 1 + rng.below(3);
                let subset: Vec<Vec<String>> = (0..n)
                    .map(|_| paths[rng.below(paths.len())].clone())
                    .collect();
                check_against_serde(&text, &doc, &subset);
            }
        }
        assert!(escaped_values > 1000);
    }

    #[test]
    fn json_hand_written() {
        let paths = |ps: &[&[&str]]| -> Vec<Vec<String>> {
            ps.iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        let one = |text: &str, path: &[&str]| -> Option<Vec<u8>> {
            let mut got = None;
            json_fields(text.as_bytes(), &paths(&[path]), |_, v| {
                got = Some(text_of(v))
            });
            got
        };
        assert_eq!(one(r#"{"level":"info"}"#, &["level"]).unwrap(), b"info");
        assert_eq!(one(r#" {"lvl":1,"level":2} "#, &["level"]).unwrap(), b"2");
        assert_eq!(one(r#"{"levels":1,"level":2}"#, &["level"]).unwrap(), b"2");
        assert_eq!(one(r#"{"lev\u0065l":"x"}"#, &["level"]).unwrap(), b"x");
        assert_eq!(one(r#"{"k\"q":"x"}"#, &["k\"q"]).unwrap(), b"x");
        assert_eq!(one(r#"{"\ud83d\ude00":"x"}"#, &["😀"]).unwrap(), b"x");
        assert_eq!(
            one(r#"{"a":"\u00e9\n\"\\\/"}"#, &["a"]).unwrap(),
            "é\n\"\\/".as_bytes()
        );
        assert_eq!(one(r#"{"u":{"id":7}}"#, &["u", "id"]).unwrap(), b"7");
        assert_eq!(
            one(r#"{"u":{"id":[1, {"x":"]"}]}}"#, &["u", "id"]).unwrap(),
            br#"[1, {"x":"]"}]"#
        );
        assert_eq!(
            one(r#"{"u" : { "id" : 7 } }"#, &["u"]).unwrap(),
            br#"{ "id" : 7 }"#
        );
        assert_eq!(one(r#"{"a":-1.5e+3}"#, &["a"]).unwrap(), b"-1.5e+3");
        assert_eq!(one(r#"{"a":false}"#, &["a"]).unwrap(), b"false");
        assert_eq!(one(r#"{"a":null}"#, &["a"]), None);
        assert_eq!(one(r#"{"a":"x"}"#, &["a", "b"]), None);
        assert_eq!(one(r#"{"a":[{"b":1}]}"#, &["a", "b"]), None);
        assert_eq!(one(r#"{"a":1}"#, &[]).unwrap(), br#"{"a":1}"#);

        // First occurrence wins, along the whole path.
        assert_eq!(one(r#"{"a":1,"a":2}"#, &["a"]).unwrap(), b"1");
        assert_eq!(one(r#"{"a":null,"a":2}"#, &["a"]), None);
        assert_eq!(one(r#"{"a":{"b":1},"a":{"c":2}}"#, &["a", "c"]), None);
        assert_eq!(
            one(r#"{"a":{"b":1},"a":{"c":2}}"#, &["a", "b"]).unwrap(),
            b"1"
        );

        // Both a path and its prefix; Plain vs JsonEscaped.
        let text = br#"{"u":{"id":"a\"b","n":"x"},"m":"y"}"#;
        let (ok, got) = extract(text, &paths(&[&["u"], &["u", "id"], &["u", "n"], &["m"]]));
        assert!(ok);
        assert_eq!(got[0], Some(Value::Plain(br#"{"id":"a\"b","n":"x"}"#)));
        assert_eq!(got[1], Some(Value::JsonEscaped(br#"a\"b"#)));
        assert_eq!(got[2], Some(Value::Plain(b"x")));
        assert_eq!(got[3], Some(Value::Plain(b"y")));

        // Not an object: false, nothing found.
        for text in ["", "   ", "[1]", "\"a\"", "1", "null", "x{\"a\":1}"] {
            let (ok, got) = extract(text.as_bytes(), &paths(&[&["a"]]));
            assert!(!ok && got[0].is_none(), "{text:?}");
        }
        // Found, then malformed: kept, and false.
        let (ok, got) = extract(br#"{"a":1,"b" 2}"#, &paths(&[&["a"], &["b"]]));
        assert!(!ok);
        assert_eq!(got, [Some(Value::Plain(b"1")), None]);
        // ...unless everything was found before the error: the rest is not looked at.
        let (ok, got) = extract(br#"{"a":1, garbage"#, &paths(&[&["a"]]));
        assert!(ok);
        assert_eq!(got, [Some(Value::Plain(b"1"))]);
        // Trailing garbage seen by a full scan.
        assert!(!extract(br#"{"a":1} x"#, &paths(&[&["z"]])).0);
        assert!(extract(b"{\"a\":1} \r\n\t", &paths(&[&["z"]])).0);
        // A number the end cut short is not found.
        assert_eq!(extract(br#"{"a":12"#, &paths(&[&["a"]])).1, [None]);
        // Numbers that are not JSON numbers.
        for bad in [
            "01", "-", "1.", ".5", "1e", "+1", "1.e5", "0x10", "--1", "1ee5",
        ] {
            let text = format!(r#"{{"a":{bad}}}"#);
            let (ok, got) = extract(text.as_bytes(), &paths(&[&["a"]]));
            assert!(!ok && got[0].is_none(), "{text}");
        }
        // Mismatched brackets in a skipped value.
        assert!(!extract(br#"{"a":[1,2}, "b":1}"#, &paths(&[&["b"]])).0);
        assert!(!extract(br#"{"a":{"x":1], "b":1}"#, &paths(&[&["b"]])).0);
        // No paths: only the start is checked.
        assert!(json_fields(b"{ garbage", &[], |_, _| panic!()));
    }

    #[test]
    fn json_many_paths() {
        let mut text = String::from("{");
        for k in 0..150 {
            text.push_str(&format!(r#""k{k}":{k},"#));
        }
        text.push_str(r#""end":"x"}"#);
        let mut paths: Vec<Vec<String>> = (0..150).rev().map(|k| vec![format!("k{k}")]).collect();
        paths.push(vec!["end".into()]);
        paths.push(vec!["missing".into()]);
        let (ok, got) = extract(text.as_bytes(), &paths);
        assert!(ok);
        for (q, v) in got.iter().enumerate().take(150) {
            assert_eq!(*v, Some(Value::Plain(format!("{}", 149 - q).as_bytes())));
        }
        assert_eq!(got[150], Some(Value::Plain(b"x")));
        assert_eq!(got[151], None);
    }

    #[test]
    fn json_depth() {
        let nested = |depth: usize| -> (String, Vec<String>) {
            let mut text = String::new();
            for _ in 0..depth {
                text.push_str(r#"{"a":"#);
            }
            text.push('1');
            text.push_str(&"}".repeat(depth));
            (text, vec!["a".to_string(); depth])
        };
        // Top-level object at depth 1 .. the innermost at 128: found.
        let (text, path) = nested(128);
        assert_eq!(
            extract(text.as_bytes(), &[path]).1,
            [Some(Value::Plain(b"1"))]
        );
        let (text, path) = nested(129);
        assert_eq!(extract(text.as_bytes(), &[path]), (false, vec![None]));
        // Skipped: 128 fine, deeper is malformed.
        let (text, _) = nested(128);
        assert!(extract(text.as_bytes(), &[vec!["z".into()]]).0);
        let (text, _) = nested(129);
        assert!(!extract(text.as_bytes(), &[vec!["z".into()]]).0);
        // Far too deep, walked or skipped, and unbalanced: no stack overflow, no panic.
        let (text, path) = nested(100_000);
        assert!(!extract(text.as_bytes(), &[path]).0);
        let text = format!(r#"{{"a":{}"#, "[".repeat(100_000));
        assert!(!extract(text.as_bytes(), &[vec!["z".into()]]).0);
        let text = format!(r#"{{"a":{}1{}}}"#, "[".repeat(127), "]".repeat(127));
        assert!(extract(text.as_bytes(), &[vec!["z".into()]]).0);
    }

    #[test]
    fn json_truncated_and_mutated_never_panic() {
        let mut rng = Rng(0xDEAD_BEEF_0000_0042);
        let mut samples: Vec<String> = vec![
            r#"{"ts":"2024-05-01T12:00:00Z","level":"info","msg":"hi \"there\" \u00e9\ud83d\ude00","n":-1.5e3,"ok":true,"u":{"id":7,"tags":["a",{"b":null}]},"z":null}"#.into(),
        ];
        for _ in 0..40 {
            let mut text = String::new();
            ws(&mut rng, &mut text);
            json_object(&mut rng, 0, &mut text);
            ws(&mut rng, &mut text);
            samples.push(text);
        }
        for text in &samples {
            let doc: Json = serde_json::from_str(text).unwrap();
            let mut paths = Vec::new();
            all_paths(&doc, &mut Vec::new(), &mut paths);
            paths.push(vec!["never there".into()]);
            paths.push(vec![]);
            let bytes = text.as_bytes();
            let (_, full) = extract(bytes, &paths);
            let object_end = text.trim_end_matches([' ', '\t', '\n', '\r']).len();
            // Every prefix: false unless it holds the whole object; what it finds is right.
            for n in 0..=bytes.len() {
                let (ok, got) = extract(&bytes[..n], &paths);
                assert_eq!(ok, n >= object_end, "prefix {n} of {text:?}");
                for (g, f) in got.iter().zip(&full) {
                    if g.is_some() {
                        assert_eq!(g, f, "prefix {n} of {text:?}");
                    }
                }
            }
            // Random damage.
            for _ in 0..300 {
                let mut damaged = bytes.to_vec();
                for _ in 0..1 + rng.below(4) {
                    let at = rng.below(damaged.len());
                    damaged[at] = match rng.below(3) {
                        0 => rng.pick(b"{}[]\",:\\ u0e-"),
                        _ => rng.next() as u8,
                    };
                }
                let (_, got) = extract(&damaged, &paths);
                for v in got.into_iter().flatten() {
                    text_of(v);
                }
            }
        }
        // Random bytes, biased towards JSON punctuation.
        for _ in 0..20_000 {
            let len = rng.below(64);
            let mut bytes: Vec<u8> = (0..len)
                .map(|_| {
                    if rng.percent(60) {
                        rng.pick(b"{}[]\"\\:, aub01-tn")
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            if rng.percent(70) {
                bytes.insert(0, b'{');
            }
            let paths = [vec!["a".to_string()], vec!["a".into(), "b".into()], vec![]];
            let (_, got) = extract(&bytes, &paths);
            for v in got.into_iter().flatten() {
                text_of(v);
            }
        }
    }

    #[test]
    fn quote_scan_matches_naive() {
        let mut rng = Rng(3);
        for _ in 0..2_000 {
            let len = rng.below(200);
            let text: Vec<u8> = (0..len)
                .map(|_| match rng.below(40) {
                    0 => b'"',
                    1 => b'\\',
                    2 => 0x80 | rng.next() as u8,
                    _ => b'a' + rng.below(26) as u8,
                })
                .collect();
            for i in 0..=len + 1 {
                let naive = text
                    .iter()
                    .enumerate()
                    .skip(i)
                    .find(|(_, b)| matches!(b, b'"' | b'\\'))
                    .map(|(at, _)| at);
                assert_eq!(find_quote_or_backslash(&text, i), naive, "{i} in {text:?}");
            }
        }
    }

    #[test]
    fn json_path_lengths_around_the_small_stack() {
        for depth in [SHORT_PATH - 1, SHORT_PATH, SHORT_PATH + 1, 40] {
            let mut text = String::new();
            for k in 0..depth {
                text.push_str(&format!(r#"{{"x":0,"k{k}":"#));
            }
            text.push_str(r#""v""#);
            text.push_str(&"}".repeat(depth));
            let path: Vec<String> = (0..depth).map(|k| format!("k{k}")).collect();
            let mut prefix = path.clone();
            prefix.pop();
            let (ok, got) = extract(text.as_bytes(), &[path, prefix, vec!["k0".into()]]);
            assert!(ok);
            assert_eq!(got[0], Some(Value::Plain(b"v")));
            let inner = format!(r#"{{"x":0,"k{}":"v"}}"#, depth - 1);
            assert_eq!(got[1], Some(Value::Plain(inner.as_bytes())));
            assert_eq!(
                got[2].map(text_of),
                Some(text.as_bytes()[12..text.len() - 1].to_vec())
            );
        }
    }

    #[test]
    fn write_to_unescapes() {
        let json =
            |body: &str| String::from_utf8(text_of(Value::JsonEscaped(body.as_bytes()))).unwrap();
        assert_eq!(
            json(r#"a\"b\\c\/d\be\ff\ng\rh\ti"#),
            "a\"b\\c/d\u{8}e\u{c}f\ng\rh\ti"
        );
        assert_eq!(json(r"\u00e9\u00E9 \u65e5"), "éé 日");
        assert_eq!(json(r"\ud83d\ude00"), "😀");
        assert_eq!(json(r"\uD834\uDD1E!"), "𝄞!");
        // Lone surrogates.
        assert_eq!(json(r"\ud83d"), "\u{FFFD}");
        assert_eq!(json(r"\ud83dx"), "\u{FFFD}x");
        assert_eq!(json(r"\ude00\ud83d"), "\u{FFFD}\u{FFFD}");
        assert_eq!(json(r"\ud83d\u0041"), "\u{FFFD}A");
        assert_eq!(json(r"\ud83d\ud83d\ude00"), "\u{FFFD}😀");
        assert_eq!(json(r"\ud83d\uZZZZ"), "\u{FFFD}\\uZZZZ");
        // Invalid escapes are kept.
        assert_eq!(json(r"\x41 \u12G4 \u12"), r"\x41 \u12G4 \u12");
        assert_eq!(json("\\"), "\\");
        assert_eq!(json("ab\\"), "ab\\");
        assert_eq!(json("\\é"), "\\é");
        assert_eq!(json(r"\\\\"), r"\\");
        assert_eq!(json(""), "");
        // logfmt uses the same rules; Plain is taken as is.
        assert_eq!(
            text_of(Value::LogfmtEscaped(br#"say \"hi\" \\ \n"#)),
            b"say \"hi\" \\ \n"
        );
        assert_eq!(text_of(Value::Plain(br"a\nb")), br"a\nb");
        // Appends.
        let mut out = b"x=".to_vec();
        Value::JsonEscaped(br"\t").write_to(&mut out);
        assert_eq!(out, b"x=\t");
        // Valid UTF-8 in, valid UTF-8 out, whatever the escapes; never longer than the input.
        let mut rng = Rng(7);
        let pieces = [
            "\\", "u", "d83d", "DE00", "dc00", "00e9", "\"", "n", "é", "😀", "x", "0",
        ];
        for _ in 0..20_000 {
            let body: String = (0..rng.below(12)).map(|_| rng.pick(&pieces)).collect();
            let out = text_of(Value::JsonEscaped(body.as_bytes()));
            assert!(out.len() <= body.len());
            assert!(std::str::from_utf8(&out).is_ok(), "{body:?}");
        }
    }

    // --- logfmt -------------------------------------------------------------------------------

    fn logfmt(text: &str, keys: &[&str]) -> Vec<Option<String>> {
        let mut got = vec![None; keys.len()];
        logfmt_fields(text.as_bytes(), keys, |q, v| {
            assert!(got[q].is_none(), "key {q} reported twice");
            got[q] = Some(String::from_utf8(text_of(v)).unwrap());
        });
        got
    }

    fn some(values: &[&str]) -> Vec<Option<String>> {
        values.iter().map(|v| Some(v.to_string())).collect()
    }

    #[test]
    fn logfmt_pairs() {
        let line = r#"level=info msg="hello \"world\" \\ bye" dur=3ms flag empty= after=1"#;
        assert_eq!(
            logfmt(line, &["level", "msg", "dur", "flag", "empty", "after"]),
            some(&["info", "hello \"world\" \\ bye", "3ms", "", "", "1"])
        );
        // Prefixes of other keys, and keys that others are prefixes of.
        let line = "levels=x lvl=debug level=warn lev=1";
        assert_eq!(
            logfmt(line, &["level", "lvl", "le"]),
            [Some("warn".into()), Some("debug".into()), None]
        );
        // First occurrence wins.
        assert_eq!(logfmt("a=1 a=2 b= b=3", &["a", "b"]), some(&["1", ""]));
        // Plain vs escaped.
        let mut got = Vec::new();
        logfmt_fields(br#"a="x y" b="x\"y" c=x\y"#, &["a", "b", "c"], |q, v| {
            got.push((q, v))
        });
        assert_eq!(
            got,
            [
                (0, Value::Plain(b"x y")),
                (1, Value::LogfmtEscaped(br#"x\"y"#)),
                (2, Value::Plain(br"x\y"))
            ]
        );
        // Unicode keys and values; tabs and other whitespace.
        assert_eq!(
            logfmt("\tклюк=значение\t日本=\"語 😀\"\r\n", &["клюк", "日本"]),
            some(&["значение", "語 😀"])
        );
        // Go-style escapes in quoted values.
        assert_eq!(
            logfmt(r#"msg="a\nb\tc\u00e9""#, &["msg"]),
            some(&["a\nb\tcé"])
        );
        // Empty quoted value, quoted value right after another.
        assert_eq!(
            logfmt(r#"a="" b="q"c=1"#, &["a", "b", "c"]),
            some(&["", "q", "1"])
        );
        // Values holding = and ".
        assert_eq!(
            logfmt(r#"q=a=b w=x"y"#, &["q", "w"]),
            some(&["a=b", "x\"y"])
        );
        // Unterminated quoted value runs to the end.
        assert_eq!(
            logfmt(r#"a=1 msg="cut sho"#, &["msg", "a"]),
            some(&["cut sho", "1"])
        );
        assert_eq!(logfmt(r#"msg="cut\"#, &["msg"]), some(&["cut\\"]));
        // Garbage is skipped.
        assert_eq!(
            logfmt(
                r#"=x ="a b" "quoted words" here ab"cd ef" x"y=1 ok=yes"#,
                &["ok", "x", "ab", "here"]
            ),
            [Some("yes".into()), None, None, Some("".into())]
        );
        assert_eq!(
            logfmt(r#""a=1 b=2" "open a=1 b=2"#, &["a", "b"]),
            [Some("1".into()), Some("2".into())]
        );
        assert_eq!(logfmt("", &["a"]), [None]);
        assert_eq!(logfmt("   ", &["a"]), [None]);
        assert_eq!(logfmt("a", &["a", ""]), [Some("".into()), None]);
        assert_eq!(logfmt("a=1", &[]), Vec::<Option<String>>::new());
        // The same key asked twice is reported for both.
        assert_eq!(logfmt("a=1", &["a", "a"]), some(&["1", "1"]));
    }

    #[test]
    fn logfmt_stops_early_and_many_keys() {
        // Stops once all keys are found: a value after that is never looked at.
        let mut calls = 0;
        logfmt_fields(b"a=1 b=2 a=3", &["a"], |_, _| calls += 1);
        assert_eq!(calls, 1);
        let line: String = (0..100).map(|k| format!("k{k}={k} ")).collect();
        let keys: Vec<String> = (0..100).map(|k| format!("k{k}")).collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let got = logfmt(&line, &keys);
        for (k, v) in got.iter().enumerate() {
            assert_eq!(v.as_deref(), Some(k.to_string().as_str()));
        }
    }

    /// The shape of the stage pipeline's call: owned keys, one closure writing into a buffer.
    #[test]
    fn logfmt_fields_takes_owned_keys() {
        let keys: Vec<String> = vec!["msg".into(), "level".into()];
        let paths: Vec<Vec<String>> = vec![vec!["user".into(), "id".into()]];
        let mut buf = Vec::new();
        let mut spans = [None; 3];
        {
            let mut put = |j: usize, v: Value| {
                let start = buf.len();
                v.write_to(&mut buf);
                spans[j] = Some((start, buf.len()));
            };
            logfmt_fields(br#"level=warn msg="a \"b\"""#, &keys, &mut put);
            json_fields(br#"{"user":{"id":"x"}}"#, &paths, |_, v| put(2, v));
        }
        assert_eq!(buf, br#"warna "b"x"#);
        assert_eq!(spans, [Some((4, 9)), Some((0, 4)), Some((9, 10))]);
    }

    #[test]
    fn logfmt_garbage_never_panics() {
        let mut rng = Rng(99);
        for _ in 0..50_000 {
            let bytes: Vec<u8> = (0..rng.below(48))
                .map(|_| {
                    if rng.percent(70) {
                        rng.pick(b"ab= \"\\\t\xc3\xa9")
                    } else {
                        rng.next() as u8
                    }
                })
                .collect();
            logfmt_fields(&bytes, &["a", "b", "ab", "é"], |_, v| {
                text_of(v);
            });
        }
    }

    // --- ANSI ---------------------------------------------------------------------------------

    fn strip(text: &[u8]) -> Option<Vec<u8>> {
        let mut out = b"old".to_vec();
        if strip_ansi(text, &mut out) {
            Some(out)
        } else {
            assert_eq!(out, b"old");
            None
        }
    }

    #[test]
    fn strip_ansi_sequences() {
        assert_eq!(strip(b"plain text, no escapes"), None);
        assert_eq!(strip(b""), None);
        assert_eq!(strip("é 日本".as_bytes()), None);
        let cases: &[(&[u8], &[u8])] = &[
            (b"\x1b[31mred\x1b[0m", b"red"),
            (b"\x1b[1;32mbold green\x1b[m!", b"bold green!"),
            (b"\x1b[38;5;208morange\x1b[38;2;1;2;3m rgb", b"orange rgb"),
            (b"a\x1b[2Kb\x1b[10;20Hc\x1b[?25ld\x1b[1A", b"abcd"),
            (b"\x1b]0;title\x07text", b"text"),
            (b"\x1b]8;;http://x\x1b\\link\x1b]8;;\x1b\\", b"link"),
            (b"\x1bPq#0;2;0;0;0\x1b\\after", b"after"),
            (b"\x1b(B\x1b[mreset", b"reset"),
            (b"\x1b7saved\x1b8\x1bc", b"saved"),
            (b"\x1b=keypad\x1b>", b"keypad"),
            // Cut short at the end.
            (b"text\x1b", b"text"),
            (b"text\x1b[", b"text"),
            (b"text\x1b[31;1", b"text"),
            (b"text\x1b]0;half a title", b"text"),
            (b"text\x1b(", b"text"),
            // Cut short by something else.
            (b"\x1b[31\x1b[0mx", b"x"),
            (b"\x1b]0;t\x1b[1my", b"y"),
            (b"\x1b\x1b[1mz", b"z"),
            (b"a\x1b\tb", b"a\tb"),
            (b"\x1b[3\x7fz", b"\x7fz"),
        ];
        for (text, want) in cases {
            assert_eq!(
                strip(text).as_deref(),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(text)
            );
        }
        // UTF-8 right after or inside sequences survives whole.
        assert_eq!(
            strip("\x1b[1mé\x1bé\x1b[é\x1b]é\x07日".as_bytes()).unwrap(),
            "ééé日".as_bytes()
        );
        // Output replaced, not appended.
        let mut out = b"previous".to_vec();
        assert!(strip_ansi(b"\x1b[0mnew", &mut out));
        assert_eq!(out, b"new");
    }

    #[test]
    fn strip_ansi_keeps_utf8_and_removes_every_esc() {
        let mut rng = Rng(1234);
        let pieces = [
            "\x1b", "[", "]", "(", "1", ";", "m", "\x07", "\\", "é", "日", "😀", "a", " ",
        ];
        for _ in 0..50_000 {
            let text: String = (0..rng.below(16)).map(|_| rng.pick(&pieces)).collect();
            if let Some(out) = strip(text.as_bytes()) {
                assert!(std::str::from_utf8(&out).is_ok(), "{text:?}");
                assert!(!out.contains(&ESC));
                assert!(out.len() < text.len());
            }
        }
        for _ in 0..20_000 {
            let bytes: Vec<u8> = (0..rng.below(32))
                .map(|_| rng.next() as u8 | 0x10)
                .collect();
            strip(&bytes);
        }
    }

    // --- throughput ---------------------------------------------------------------------------

    /// Typical JSON and logfmt lines of ~200-400 bytes, about `total` bytes of them.
    fn corpus(rng: &mut Rng, total: usize, json: bool) -> Vec<Vec<u8>> {
        let levels = ["info", "debug", "warn", "error"];
        let msgs = [
            "request completed",
            "cache miss for key user:4411, falling back to the database",
            "upstream returned \"503 Service Unavailable\", retrying in 250ms",
            "connection reset by peer while reading the response body from the backend pool",
            "user signed in",
            "processed batch of 512 records in 38ms (12.3 MB/s), next offset 1844674407",
        ];
        let paths = [
            "/api/v1/users/12345",
            "/healthz",
            "/api/v2/orders?page=3&size=50",
            "/static/app.js",
        ];
        let mut lines = Vec::new();
        let mut size = 0;
        while size < total {
            let level = rng.pick(&levels);
            let msg = rng.pick(&msgs);
            let path = rng.pick(&paths);
            let trace = format!("{:016x}{:016x}", rng.next(), rng.next());
            let status = [200, 200, 200, 404, 500][rng.below(5)];
            let dur = rng.below(100_000) as f64 / 100.0;
            let line = if json {
                format!(
                    r#"{{"ts":"2024-05-01T12:34:{:02}.{:03}Z","level":"{level}","logger":"http.server","msg":"{}","method":"GET","path":"{path}","status":{status},"duration_ms":{dur},"bytes":{},"remote_addr":"10.0.{}.{}:54321","user":{{"id":{},"role":"member"}},"trace_id":"{trace}"}}"#,
                    rng.below(60),
                    rng.below(1000),
                    msg.replace('"', "\\\""),
                    rng.below(100_000),
                    rng.below(256),
                    rng.below(256),
                    rng.below(1_000_000),
                )
            } else {
                format!(
                    r#"ts=2024-05-01T12:34:{:02}.{:03}Z level={level} logger=http.server msg="{}" method=GET path={path} status={status} duration={dur}ms bytes={} remote_addr=10.0.{}.{}:54321 user_id={} trace_id={trace}"#,
                    rng.below(60),
                    rng.below(1000),
                    msg.replace('"', "\\\""),
                    rng.below(100_000),
                    rng.below(256),
                    rng.below(256),
                    rng.below(1_000_000),
                )
            };
            size += line.len();
            lines.push(line.into_bytes());
        }
        lines
    }

    /// MB/s (10^6 bytes) of `work` over `lines`, best of five rounds of about 64 MB each.
    fn measure(name: &str, lines: &[Vec<u8>], mut work: impl FnMut(&[u8]) -> usize) {
        let bytes: usize = lines.iter().map(Vec::len).sum();
        let rounds = (64 << 20) / bytes + 1;
        let mut best = f64::MAX;
        let mut sink = 0;
        for _ in 0..5 {
            let start = std::time::Instant::now();
            for _ in 0..rounds {
                for line in lines {
                    sink += work(std::hint::black_box(line));
                }
            }
            best = best.min(start.elapsed().as_secs_f64());
        }
        std::hint::black_box(sink);
        let avg = bytes / lines.len();
        println!(
            "{name:<58} {:>7.0} MB/s  (avg line {avg} B)",
            (bytes * rounds) as f64 / best / 1e6
        );
    }

    /// `cargo test --release -- --ignored --nocapture throughput`
    #[test]
    #[ignore = "throughput figures; run in release"]
    fn throughput() {
        let mut rng = Rng(42);
        let json = corpus(&mut rng, 4 << 20, true);
        let logfmt_lines = corpus(&mut rng, 4 << 20, false);
        let p = |ps: &[&[&str]]| -> Vec<Vec<String>> {
            ps.iter()
                .map(|p| p.iter().map(|s| s.to_string()).collect())
                .collect()
        };
        let mut out = Vec::with_capacity(512);
        for (name, paths) in [
            ("json_fields 2 (level, msg)", p(&[&["level"], &["msg"]])),
            (
                "json_fields 2 (level, trace_id: last key)",
                p(&[&["level"], &["trace_id"]]),
            ),
            (
                "json_fields 3 (level, msg, trace_id)",
                p(&[&["level"], &["msg"], &["trace_id"]]),
            ),
            (
                "json_fields 3 (level, user.id, trace_id)",
                p(&[&["level"], &["user", "id"], &["trace_id"]]),
            ),
            (
                "json_fields 2 (level, absent: full scan)",
                p(&[&["level"], &["absent"]]),
            ),
        ] {
            measure(name, &json, |line| {
                let mut n = 0;
                json_fields(line, &paths, |_, v| {
                    out.clear();
                    v.write_to(&mut out);
                    n += out.len();
                });
                n
            });
        }
        measure(
            "  reference: serde_json::from_slice::<Value>, 3 lookups",
            &json,
            |line| {
                let v: Json = serde_json::from_slice(line).unwrap();
                v["level"].as_str().map_or(0, str::len)
                    + v["msg"].as_str().map_or(0, str::len)
                    + v["trace_id"].as_str().map_or(0, str::len)
            },
        );
        for (name, keys) in [
            ("logfmt_fields 2 (level, msg)", &["level", "msg"][..]),
            (
                "logfmt_fields 3 (level, msg, trace_id)",
                &["level", "msg", "trace_id"][..],
            ),
            (
                "logfmt_fields 2 (level, absent: full scan)",
                &["level", "absent"][..],
            ),
        ] {
            measure(name, &logfmt_lines, |line| {
                let mut n = 0;
                logfmt_fields(line, keys, |_, v| {
                    out.clear();
                    v.write_to(&mut out);
                    n += out.len();
                });
                n
            });
        }
        measure("strip_ansi, no ESC (json lines)", &json, |line| {
            usize::from(strip_ansi(line, &mut out))
        });
        let coloured: Vec<Vec<u8>> = logfmt_lines
            .iter()
            .map(|line| {
                let text = String::from_utf8_lossy(line);
                let mut c = String::new();
                for (k, word) in text.split(' ').enumerate() {
                    let colour = [31, 32, 33, 36][k % 4];
                    c.push_str(&format!("\x1b[{colour};1m{word}\x1b[0m "));
                }
                c.into_bytes()
            })
            .collect();
        measure("strip_ansi, colours around every word", &coloured, |line| {
            strip_ansi(line, &mut out);
            out.len()
        });
    }
}
