//! Secret redaction for the `redact` stage: finds secrets in log text and replaces each one with
//! `<redacted:NAME>`, NAME being the rule that found it, before the text leaves the node.
//!
//! This module owns the rules (the built-in detectors and an operator's regexes), their
//! compilation and validation at config load, and the per-text [`Redactor::redact`] call. It
//! does not own the stage's configuration format, where in the pipeline the stage runs, or the
//! metrics: the caller keeps one `hits` counter per rule (see [`Redactor::rule_names`]) and
//! exports them. It fails closed: a rule that does not compile is a config error, never a rule
//! that is skipped. It never logs, and nothing it returns holds matched text: error reasons say
//! what is wrong with a regex without quoting it, and `Debug` shows rule names only.
//!
//! # Built-in detectors
//!
//! In rule order (at one start position the first rule wins):
//!
//! | name | finds | replaced |
//! | --- | --- | --- |
//! | `bearer` | `Bearer`/`bearer`/`BEARER`, blanks (or `%20`), a token of 8+ `[A-Za-z0-9._~+/-]` and `=` padding | token |
//! | `jwt` | a JWS: `eyJ…` `.eyJ…` `.signature` in base64url | token |
//! | `aws_access_key` | `AKIA`/`ASIA`/`ABIA`/`ACCA` and 16 `[A-Z0-9]` | key id |
//! | `aws_secret_key` | 40 base64 chars after `aws_secret_access_key`, `AWS_SECRET_ACCESS_KEY`, `SecretAccessKey`, `secretAccessKey` and `=`/`:` | value |
//! | `gcp_api_key` | `AIza` and 35 `[0-9A-Za-z_-]` | key |
//! | `gcp_oauth_token` | `ya29.` and 20+ `[0-9A-Za-z_-]` | token |
//! | `azure_storage_key` | 40+ base64 chars after `AccountKey=` (connection strings) | value |
//! | `azure_sas` | the `sig=` value of a SAS query (`?sig=`, `&sig=`, JSON's `\u0026sig=`) | signature |
//! | `github_token` | `ghp_`/`gho_`/`ghu_`/`ghs_`/`ghr_` and 36+ alphanumerics; `github_pat_…` | token |
//! | `gitlab_token` | `glpat-` and 20+ `[0-9A-Za-z_-]` | token |
//! | `slack_token` | `xoxb-`, `xoxp-`, `xoxe-`, `xoxa-`, `xoxr-`, `xoxs-`, `xoxo-` tokens | token |
//! | `slack_webhook` | `hooks.slack.com/services/…` (also `workflows/`, `triggers/`) | URL after the scheme |
//! | `stripe_key` | `sk_live_`/`sk_test_`/`rk_live_`/`rk_test_` keys | key |
//! | `npm_token` | `npm_` and 36 alphanumerics | token |
//! | `pypi_token` | `pypi-AgEIcHlwaS5vcmc…` upload tokens | token |
//! | `openai_key` | `sk-…T3BlbkFJ…` keys (`sk-proj-`, `sk-svcacct-`, `sk-admin-`, legacy) | key |
//! | `anthropic_key` | `sk-ant-api03-…`, `sk-ant-admin01-…` keys | key |
//! | `private_key` | `-----BEGIN … PRIVATE KEY-----` through its `-----END … PRIVATE KEY-----` across newlines (real or JSON's `\n`), or to the end of the text when the END is not in it | whole block |
//! | `basic_auth` | `Authorization: Basic <base64>` (`authorization` too; any `:`/`=` key-value form) | credentials |
//! | `url_password` | `scheme://user:password@host` (also JSON's `:\/\/`) | password |
//! | `password` | `password`/`passwd` (lower, Title, UPPER) then `=`/`:` and a value | value |
//!
//! Key-value detectors accept `key=v`, `key: v`, `"key":"v"`, `'key' => 'v'` and JSON-escaped
//! `\"key\":\"v\"`. A key counts only when the separator follows it at once: `password_hash=`
//! is no match, `db_password=` is.
//!
//! # Known limits
//!
//! False negatives: a secret split across texts (only a PEM block is followed to the end of its
//! text); `bEaReR` in mixed case; a PEM body line logged without its BEGIN line; a JWE, or a JWS
//! whose payload does not start `{"`; AWS key ids with other prefixes (`A3T…`, `AGPA…`),
//! `secret-access-key=` (dashes); GitLab's `glptt-`/`gldt-`/`glrt-`, Slack's `xapp-`, Stripe's
//! `whsec_` and SendGrid's `SG.` keys; `AUTHORIZATION: Basic` in capitals; a `url_password`
//! holding `"`, `'`, `/`, `?`, `#` or whitespace; a `password` value holding whitespace (redacted
//! up to it); credentials under other keys (`token=`, `api_key=`, `client_secret=`: add a custom
//! rule). Most of these are left out to keep the screen below at 32 literals; each costs a few
//! ns per text to add. False positives: the word after `Bearer` in prose ("Bearer
//! authentication failed"), after `password:` in prose ("password: too short"), and
//! `http://host:8080,x@y`. Those cost readability, not safety.
//!
//! # How it searches
//!
//! Nothing is allocated and no automaton runs for a text that cannot hold a secret, which is
//! nearly every text. Each built-in detector names what every match of it contains: a few 4-byte
//! literals (`arer` for `bearer`, `AKIA`…, `.eyJ`, `IVAT` for `PRIVATE KEY`), or a short
//! substring (`xox`), or for `url_password` a `://` followed by `:` and `@`. The literals of all
//! detectors make one exact alternation, which the regex crate runs as a plain vectorised
//! (Teddy) search; the rest are memchr/memmem searches. Custom rules are screened by their
//! combined regex: the alternation `(?:r0)|(?:r1)|…` of their patterns with groups made
//! non-capturing, one prefiltered search for all of them. The screens yield the candidate rules,
//! usually none. Only those are then searched, each with its own small regex, and their matches
//! merged exactly as one alternation of all rules would take them: leftmost first, the first rule
//! at a tie, the search going on after each match. The winner's own regex resolves its `secret`
//! group.
//!
//! (One combined regex over every rule, the first design, ran at ~600 MB/s on the test corpus:
//! its ~60 literal prefixes made a slow Teddy, and every `://` or `github.com` candidate dragged
//! the lazy DFA byte by byte through the rest of the line. Resolving the winner's groups in it
//! cost 1-7 µs per secret, the backtracker clearing a visited set sized for 1,500 NFA states.)
//!
//! A custom regex that begins with a character class or `.` has no literal prefix, so its
//! screen scans with an automaton; one with a Unicode `\b` makes the regex crate fall back to a
//! slower engine on non-ASCII text (`(?-u:\b)` does not).

use std::fmt;

use memchr::memmem;
use regex::bytes::{Regex, RegexBuilder};

/// The separator between a key and its value in the key-value detectors: optional (JSON-escaped)
/// closing quote, `:`, `=` or `=>` with blanks around, optional opening quote.
macro_rules! kv_sep {
    () => {
        r#"\\?["']?[ \t]*(?:[:=]|=>)[ \t]*\\?["']?"#
    };
}

/// What every match of a built-in detector contains, so a text without it is skipped unsearched.
#[derive(Clone, Copy)]
enum Needs {
    /// One of these literals, 4 bytes each: all detectors' together make one Teddy search.
    Any(&'static [&'static str]),
    /// This substring, searched on its own (memmem): for needs shorter than 4 bytes.
    Substring(&'static str),
    /// `://` or `:\/\/`, then a `:` and an `@` before any `/` or space.
    UrlUserinfo,
}

/// A built-in detector. A pattern with a group named `secret` has only that group replaced.
/// `needs` must hold for every match of `pattern`, or the screen would hide it: each pattern
/// spells its needs out in every branch (`screen_literals` checks they appear, and
/// `screened_and_unscreened_agree` that screened and unscreened results never differ).
struct Detector {
    name: &'static str,
    needs: Needs,
    pattern: &'static str,
}

const DETECTORS: &[Detector] = &[
    Detector {
        name: "bearer",
        needs: Needs::Any(&["arer", "ARER"]),
        pattern: r"(?-u:\b)(?:[Bb]earer|BEARER)(?:[ \t]+|%20)(?P<secret>[A-Za-z0-9._~+/-]{8,}=*)",
    },
    // A JWS: its payload is a JSON object, so the second segment starts with `eyJ` too.
    Detector {
        name: "jwt",
        needs: Needs::Any(&[".eyJ"]),
        pattern: r"eyJ[A-Za-z0-9_-]{4,}={0,2}\.eyJ[A-Za-z0-9_-]*={0,2}\.[A-Za-z0-9_-]*={0,2}",
    },
    Detector {
        name: "aws_access_key",
        needs: Needs::Any(&["AKIA", "ASIA", "ABIA", "ACCA"]),
        pattern: r"(?:AKIA|ASIA|ABIA|ACCA)[A-Z0-9]{16}",
    },
    Detector {
        name: "aws_secret_key",
        needs: Needs::Any(&["ss_k", "SS_K", "ssKe"]),
        pattern: concat!(
            "(?:secret_access_key|SECRET_ACCESS_KEY|secretAccessKey|SecretAccessKey)",
            kv_sep!(),
            r"(?P<secret>[A-Za-z0-9/+]{40})"
        ),
    },
    Detector {
        name: "gcp_api_key",
        needs: Needs::Any(&["AIza"]),
        pattern: r"AIza[0-9A-Za-z_-]{35}",
    },
    Detector {
        name: "gcp_oauth_token",
        needs: Needs::Any(&["ya29"]),
        pattern: r"ya29\.[0-9A-Za-z_-]{20,}",
    },
    Detector {
        name: "azure_storage_key",
        needs: Needs::Any(&["ntKe"]),
        pattern: concat!(
            "AccountKey",
            kv_sep!(),
            r"(?P<secret>[A-Za-z0-9+/]{40,}={0,2})"
        ),
    },
    Detector {
        name: "azure_sas",
        needs: Needs::Any(&["sig="]),
        pattern: r"(?:[?&]|\\u0026)sig=(?P<secret>[A-Za-z0-9%+/=_-]{16,})",
    },
    Detector {
        name: "github_token",
        needs: Needs::Any(&["ghp_", "gho_", "ghu_", "ghs_", "ghr_", "pat_"]),
        pattern: r"(?:ghp_|gho_|ghu_|ghs_|ghr_)[A-Za-z0-9]{36,}|github_pat_[A-Za-z0-9_]{22,}",
    },
    Detector {
        name: "gitlab_token",
        needs: Needs::Any(&["lpat"]),
        pattern: r"glpat-[0-9A-Za-z_-]{20,}",
    },
    Detector {
        name: "slack_token",
        needs: Needs::Substring("xox"),
        pattern: r"xox[abeoprs]-[0-9A-Za-z-]{10,}",
    },
    Detector {
        name: "slack_webhook",
        needs: Needs::Any(&["s.sl"]),
        pattern: r"hooks\.slack\.com/(?:services|workflows|triggers)/[A-Za-z0-9/_+-]{16,}",
    },
    Detector {
        name: "stripe_key",
        needs: Needs::Any(&["k_li", "k_te"]),
        pattern: r"(?:sk_live_|sk_test_|rk_live_|rk_test_)[0-9A-Za-z]{16,}",
    },
    Detector {
        name: "npm_token",
        needs: Needs::Any(&["npm_"]),
        pattern: r"npm_[A-Za-z0-9]{36}",
    },
    Detector {
        name: "pypi_token",
        needs: Needs::Any(&["AgEI"]),
        pattern: r"pypi-AgEIcHlwaS5vcmc[A-Za-z0-9_-]{50,}",
    },
    Detector {
        name: "openai_key",
        // Every OpenAI key holds "T3BlbkFJ" (base64 of "OpenAI").
        needs: Needs::Any(&["T3Bl"]),
        pattern: r"sk-[A-Za-z0-9_-]{20,}T3BlbkFJ[A-Za-z0-9_-]{20,}",
    },
    Detector {
        name: "anthropic_key",
        needs: Needs::Any(&["-ant"]),
        pattern: r"sk-ant-(?:api|admin)[0-9]{2}-[A-Za-z0-9_-]{20,}",
    },
    // Any byte up to the first END (`(?s-u:.)`: invalid UTF-8 must not end a key early), or to
    // the end of the text. The END marker is ASCII, so the match ends on a char boundary.
    Detector {
        name: "private_key",
        needs: Needs::Any(&["IVAT"]),
        pattern: r"-----BEGIN[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----(?s-u:.)*?(?:-----END[ A-Z0-9]{0,40}PRIVATE KEY(?: BLOCK)?-----|\z)",
    },
    Detector {
        name: "basic_auth",
        // Not `thor`: "unauthorized" and "authority" are common words.
        needs: Needs::Any(&["riza"]),
        pattern: concat!(
            "[Aa]uthorization",
            kv_sep!(),
            r"(?:[Bb]asic|BASIC)[ \t]+(?P<secret>[A-Za-z0-9+/]{4,}={0,2})"
        ),
    },
    // `://` first. The password is greedy up to the last `@` before the end of the authority,
    // so an unescaped `@` in it is covered. Byte classes (`-u`) keep the automata small; they
    // stop only at ASCII bytes, so never inside a char.
    Detector {
        name: "url_password",
        needs: Needs::UrlUserinfo,
        pattern: r#"(?:://|:\\/\\/)(?-u:[^\s:@/?#"'\\])*:(?P<secret>(?-u:[^\s/?#"'])+)@"#,
    },
    Detector {
        name: "password",
        needs: Needs::Any(&["assw", "ASSW"]),
        pattern: concat!(
            "(?:password|passwd|Password|Passwd|PASSWORD|PASSWD)",
            kv_sep!(),
            r#"(?P<secret>(?-u:[^\s"'\\&,;])+)"#
        ),
    },
];

/// The order of the `Needs::Any` literals in the screen's alternation. It changes no result,
/// only speed: the regex crate's Teddy puts literals into 8 buckets by their order, and a bucket
/// whose literals differ much lets many other 4-byte strings through to a check. This order was
/// found by simulating that bucketing (aho-corasick 1.1) over the test corpus, dpkg/apt logs and
/// English prose: it lets 0.007-0.03% of positions through, nearly all true `assw` hits, against
/// 0.12-0.25% in `DETECTORS` order (~15% of the hot path's time).
const SCREEN_ORDER: &[&str] = &[
    "ghs_", "assw", "ntKe", "ASSW", "T3Bl", "sig=", "k_li", "gho_", "ghr_", "ACCA", ".eyJ", "ASIA",
    "AgEI", "AIza", "k_te", "pat_", "ARER", "s.sl", "ABIA", "-ant", "ya29", "riza", "lpat", "ghp_",
    "npm_", "SS_K", "AKIA", "arer", "ssKe", "IVAT", "ss_k", "ghu_",
];

const BUILTIN_NAMES: [&str; DETECTORS.len()] = {
    let mut names = [""; DETECTORS.len()];
    let mut i = 0;
    while i < DETECTORS.len() {
        names[i] = DETECTORS[i].name;
        i += 1;
    }
    names
};

/// Names of the built-in detectors.
pub const BUILTIN: &[&str] = &BUILTIN_NAMES;

/// One realistic example secret per built-in detector, (detector name, text containing it, the
/// exact secret substring that must not survive). The values are fake or publicly documented
/// examples (AWS's `AKIAIOSFODNN7EXAMPLE`, Azurite's well-known key, jwt.io's token, RFC
/// examples) in the real shapes. Used by tests and fuzzing.
pub const SAMPLES: &[(&str, &str, &str)] = &[
    (
        "bearer",
        r#"level=debug msg="upstream request" authorization="Bearer mF_9.B5f-4.1JqM" path=/v1/me"#,
        "mF_9.B5f-4.1JqM",
    ),
    (
        "jwt",
        r#"{"level":"info","msg":"session started","jwt":"eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"}"#,
        "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ),
    (
        "aws_access_key",
        "GET /bucket/key?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request HTTP/1.1",
        "AKIAIOSFODNN7EXAMPLE",
    ),
    (
        "aws_secret_key",
        "loaded profile default: aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
        "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
    ),
    (
        "gcp_api_key",
        "GET https://maps.googleapis.com/maps/api/geocode/json?address=Paris&key=AIzaFAKE-EXAMPLE-KEY_0123456789abcdefgh 200",
        "AIzaFAKE-EXAMPLE-KEY_0123456789abcdefgh",
    ),
    (
        "gcp_oauth_token",
        "refreshed credentials, new access ya29.FAKE-example_0123456789abcdefghij expires in 3599s",
        "ya29.FAKE-example_0123456789abcdefghij",
    ),
    (
        "azure_storage_key",
        "conn=DefaultEndpointsProtocol=https;AccountName=devstoreaccount1;AccountKey=Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==;EndpointSuffix=core.windows.net",
        "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",
    ),
    (
        "azure_sas",
        "PUT https://myaccount.blob.core.windows.net/sascontainer/sasblob.txt?sv=2019-02-02&st=2019-04-29T22%3A18%3A26Z&se=2019-04-30T02%3A23%3A26Z&sr=b&sp=rw&spr=https&sig=Z%2FRHIX5Xcg0Mq2rqI3OlWTjEg2tYkboXr1P9ZUXDtkk%3D 201",
        "Z%2FRHIX5Xcg0Mq2rqI3OlWTjEg2tYkboXr1P9ZUXDtkk%3D",
    ),
    (
        "github_token",
        "git push failed: credential ghp_FAKEexampleTOKEN0123456789abcdefghij was rejected",
        "ghp_FAKEexampleTOKEN0123456789abcdefghij",
    ),
    (
        "gitlab_token",
        "runner registered with glpat-FAKEexample0123456789 for project 42",
        "glpat-FAKEexample0123456789",
    ),
    (
        "slack_token",
        "slack client init bot=xoxb-0000000000-0000000000000-FAKEexampleTOKENabcdefgh",
        "xoxb-0000000000-0000000000000-FAKEexampleTOKENabcdefgh",
    ),
    (
        "slack_webhook",
        r#"{"msg":"posting alert","url":"https://hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX"}"#,
        "hooks.slack.com/services/T00000000/B00000000/XXXXXXXXXXXXXXXXXXXXXXXX",
    ),
    (
        "stripe_key",
        "stripe client configured with sk_test_FAKEexample0123456789abcdef",
        "sk_test_FAKEexample0123456789abcdef",
    ),
    (
        "npm_token",
        "//registry.npmjs.org/:_authToken npm_FAKEexampleTOKEN0123456789abcdefghij",
        "npm_FAKEexampleTOKEN0123456789abcdefghij",
    ),
    (
        "pypi_token",
        "twine upload using pypi-AgEIcHlwaS5vcmcFAKEexampleFAKEexampleFAKEexampleFAKEexample0123456789",
        "pypi-AgEIcHlwaS5vcmcFAKEexampleFAKEexampleFAKEexampleFAKEexample0123456789",
    ),
    (
        "openai_key",
        "llm client: using sk-proj-FAKEexample0123456789abT3BlbkFJFAKEexample0123456789ab for org default",
        "sk-proj-FAKEexample0123456789abT3BlbkFJFAKEexample0123456789ab",
    ),
    (
        "anthropic_key",
        "llm client: using sk-ant-api03-FAKEexample0123456789abcdefghij-AA for org default",
        "sk-ant-api03-FAKEexample0123456789abcdefghij-AA",
    ),
    (
        "private_key",
        "loaded key:\n-----BEGIN RSA PRIVATE KEY-----\nMIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEXAMPLEFAKEKEYFAKEKEYFAKEKEYFAKE\nKUpRKfFLfRYC9AIKjbJTWit+CqvjWYzvQwECAwEAAQ==\n-----END RSA PRIVATE KEY-----\ndone",
        "MIIBOgIBAAJBAKj34GkxFhD90vcNLYLInFEXAMPLEFAKEKEYFAKEKEYFAKEKEYFAKE",
    ),
    (
        "basic_auth",
        "> GET /private HTTP/1.1\r\n> Authorization: Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==\r\n",
        "QWxhZGRpbjpvcGVuIHNlc2FtZQ==",
    ),
    (
        "url_password",
        "connecting to postgres://app:s3cr3t-Pa55@db.internal:5432/orders?sslmode=require",
        "s3cr3t-Pa55",
    ),
    (
        "password",
        "user=bob password=hunter2 action=login",
        "hunter2",
    ),
];

/// Size limit of one rule's compiled regex (the regex crate's default).
const RULE_SIZE_LIMIT: usize = 10 << 20;
/// Size limit of the custom rules' combined regex.
const COMBINED_SIZE_LIMIT: usize = 64 << 20;
/// Lazy DFA cache of the custom rules' combined regex, per thread that searches with it.
const COMBINED_DFA_LIMIT: usize = 4 << 20;

/// One redaction rule: a built-in detector or an operator's regex.
#[derive(Clone)]
pub struct Rule {
    name: String,
    regex: Regex,
    /// Index of the group named `secret`, if the regex has one.
    secret: Option<usize>,
    /// `<redacted:NAME>`.
    marker: Box<[u8]>,
}

impl Rule {
    /// The rule's name, as in `<redacted:NAME>`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The rule's own regex, the one the redactor searches with.
    pub fn regex(&self) -> &Regex {
        &self.regex
    }

    /// Index of the capture group named `secret`: when set, only that group is replaced.
    pub fn secret_group(&self) -> Option<usize> {
        self.secret
    }
}

impl fmt::Debug for Rule {
    // The pattern may hold a literal secret (an operator redacting a known value): name only.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rule")
            .field("name", &self.name)
            .field("secret_group", &self.secret)
            .finish_non_exhaustive()
    }
}

/// The rules of one `redact` stage, compiled once at config load.
#[derive(Clone)]
pub struct Redactor {
    rules: Vec<Rule>,
    /// `None` when there are no rules.
    search: Option<Search>,
}

/// How the rules are searched.
#[derive(Clone)]
struct Search {
    /// The built-in detectors' screen, when they are in (as rules `0..DETECTORS.len()`).
    builtin: Option<Screen>,
    /// The custom rules' screen, when there are any: their alternation `(?:r0)|(?:r1)|…` with
    /// groups made non-capturing, one prefiltered search for all of them.
    custom: Option<Regex>,
    /// Index of the first custom rule.
    first_custom: usize,
}

/// Tells, without running an automaton, which built-in detectors a text may hold a match of.
#[derive(Clone)]
struct Screen {
    /// Every `Needs::Any` literal, as one exact alternation: the regex crate runs it as a Teddy
    /// search with nothing behind it. All are 4 bytes: Teddy compares as many leading bytes as
    /// the shortest literal has, and with 3 it stops at common trigrams (`are`, `tho`) far more
    /// often. At most 32: more, and it switches to "fat" Teddy, a quarter slower.
    literals: Regex,
    /// Per literal, the detectors (bit i: `DETECTORS[i]`) that need it.
    owners: Vec<([u8; 4], u64)>,
    /// The `Needs::Substring` substrings, each with the detectors that need it.
    substrings: Vec<(memmem::Finder<'static>, u64)>,
    /// The `Needs::UrlUserinfo` detectors.
    url_owners: u64,
    /// `://` and `:\/\/`, for `Needs::UrlUserinfo`.
    scheme: memmem::Finder<'static>,
    scheme_json: memmem::Finder<'static>,
}

impl Screen {
    fn new() -> Screen {
        let mut owners: Vec<([u8; 4], u64)> = Vec::new();
        let mut substrings: Vec<(memmem::Finder<'static>, u64)> = Vec::new();
        let mut url_owners = 0;
        for (i, detector) in DETECTORS.iter().enumerate() {
            match detector.needs {
                Needs::Any(needs) => {
                    for literal in needs {
                        // 4 bytes each (`screen_literals` checks): `try_into` cannot fail.
                        let Ok(key) = <[u8; 4]>::try_from(literal.as_bytes()) else {
                            continue;
                        };
                        match owners.iter_mut().find(|(k, _)| *k == key) {
                            Some((_, mask)) => *mask |= 1 << i,
                            None => owners.push((key, 1 << i)),
                        }
                    }
                }
                Needs::Substring(needle) => {
                    match substrings
                        .iter_mut()
                        .find(|(f, _)| f.needle() == needle.as_bytes())
                    {
                        Some((_, mask)) => *mask |= 1 << i,
                        None => substrings.push((memmem::Finder::new(needle), 1 << i)),
                    }
                }
                Needs::UrlUserinfo => url_owners |= 1 << i,
            }
        }
        owners.sort_by_key(|(key, _)| {
            SCREEN_ORDER
                .iter()
                .position(|literal| literal.as_bytes() == key)
                .unwrap_or(usize::MAX)
        });
        let alternation: Vec<String> = owners
            .iter()
            .map(|(key, _)| regex::escape(&String::from_utf8_lossy(key)))
            .collect();
        Screen {
            // A constant alternation of escaped literals (`screen_literals` tests its shape).
            literals: Regex::new(&alternation.join("|")).expect("screen literals compile"),
            owners,
            substrings,
            url_owners,
            scheme: memmem::Finder::new(b"://"),
            scheme_json: memmem::Finder::new(br":\/\/"),
        }
    }

    /// The detectors (bit i: `DETECTORS[i]`) whose needs `text` meets; 0 for most texts, found
    /// with one Teddy search, two memmem and one memchr.
    fn candidates(&self, text: &[u8]) -> u64 {
        let mut found = 0;
        let mut at = 0;
        // Every occurrence, overlapping ones too (one literal may hide inside another's match).
        while let Some(m) = self.literals.find_at(text, at) {
            if let Some((_, mask)) = self.owners.iter().find(|(key, _)| key == m.as_bytes()) {
                found |= mask;
            }
            at = m.start() + 1;
        }
        for (finder, mask) in &self.substrings {
            if finder.find(text).is_some() {
                found |= mask;
            }
        }
        if self.url_owners != 0 && self.userinfo_url(text) {
            found |= self.url_owners;
        }
        found
    }

    /// Appends to `marks` the start of every occurrence in `data` of a literal, substring or
    /// scheme some built-in detector needs. A text without one inside it has no match.
    fn marks(&self, data: &[u8], marks: &mut Vec<u32>) {
        let mut at = 0;
        while let Some(m) = self.literals.find_at(data, at) {
            marks.push(m.start() as u32);
            at = m.start() + 1;
        }
        for (finder, _) in &self.substrings {
            marks.extend(finder.find_iter(data).map(|i| i as u32));
        }
        if self.url_owners != 0 {
            marks.extend(self.scheme.find_iter(data).map(|i| i as u32));
            marks.extend(self.scheme_json.find_iter(data).map(|i| i as u32));
        }
    }

    /// Whether some `://` (or `:\/\/`) is followed by a `:` and then an `@` before any `/` or
    /// space: neither can be in a URL's user or password.
    fn userinfo_url(&self, text: &[u8]) -> bool {
        if memchr::memchr(b'@', text).is_none() {
            return false;
        }
        [&self.scheme, &self.scheme_json].into_iter().any(|scheme| {
            scheme.find_iter(text).any(|at| {
                let rest = &text[at + scheme.needle().len()..];
                memchr::memchr3(b'@', b'/', b' ', rest)
                    .is_some_and(|i| rest[i] == b'@' && memchr::memchr(b':', &rest[..i]).is_some())
            })
        })
    }
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redactor")
            .field("rules", &self.rule_names().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl Redactor {
    /// `builtin`: include every built-in detector. `custom`: (name, regex) pairs from the operator.
    /// A custom regex with a capture group named `secret` has only that group replaced; otherwise the
    /// whole match is. Errors: (index into `custom`, reason) — reason suitable for a config error
    /// message, e.g. "invalid regex: ...", "matches the empty string", "name must be 1 to 64 of [A-Za-z0-9_-]".
    pub fn new(builtin: bool, custom: &[(String, String)]) -> Result<Redactor, (usize, String)> {
        let mut rules = Vec::with_capacity(DETECTORS.len() + custom.len());
        if builtin {
            for detector in DETECTORS {
                // The built-in patterns are constants, each compiled by the tests
                // (`builtins_compile`): failing here is a bug in this file, not in a config.
                rules.push(
                    compile(detector.name, detector.pattern)
                        .expect("built-in detector pattern compiles"),
                );
            }
        }
        let first_custom = rules.len();
        // Each custom rule's pattern with every group made non-capturing.
        let mut plain: Vec<String> = Vec::with_capacity(custom.len());
        for (index, (name, pattern)) in custom.iter().enumerate() {
            let fail = |reason: String| Err((index, reason));
            if !valid_name(name) {
                return fail("name must be 1 to 64 of [A-Za-z0-9_-]".into());
            }
            if rules.iter().any(|rule: &Rule| rule.name == *name) {
                return fail(format!("name {name:?} is already used by another rule"));
            }
            let rule = match compile(name, pattern) {
                Ok(rule) => rule,
                Err(reason) => return fail(reason),
            };
            if matches_empty(&rule.regex) {
                return fail("matches the empty string".into());
            }
            let Some(stripped) = strip_groups(&rule, pattern) else {
                return fail(
                    "unsupported regex: its groups could not be made non-capturing".into(),
                );
            };
            rules.push(rule);
            plain.push(stripped);
        }
        if rules.is_empty() {
            return Ok(Redactor {
                rules,
                search: None,
            });
        }
        let custom_screen = if plain.is_empty() {
            None
        } else {
            let Some(regex) = combine(&plain) else {
                // Every rule compiled alone and was rewritten without changing its groups, so
                // what is left is the size of the rules together.
                return Err((
                    custom.len() - 1,
                    format!(
                        "the custom rules together exceed the compiled regex size limit ({} MiB)",
                        COMBINED_SIZE_LIMIT >> 20
                    ),
                ));
            };
            Some(regex)
        };
        Ok(Redactor {
            rules,
            search: Some(Search {
                builtin: builtin.then(Screen::new),
                custom: custom_screen,
                first_custom,
            }),
        })
    }

    /// Rule names, in rule index order (built-ins first, then custom).
    pub fn rule_names(&self) -> impl Iterator<Item = &str> {
        self.rules.iter().map(|rule| rule.name.as_str())
    }

    /// The rules, in rule index order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Redacts `text`. Returns false (and leaves `out` untouched) when nothing matched. Otherwise
    /// clears `out`, writes the redacted text into it, adds 1 to `hits[rule_index]` per replaced
    /// secret (`hits.len()` == number of rules), and returns true.
    /// Each secret is replaced by `<redacted:NAME>` where NAME is the rule name.
    /// Text is arbitrary bytes (usually UTF-8); output must stay valid UTF-8 if input was.
    ///
    /// Matches are taken as one alternation of all rules would find them: leftmost first, and at
    /// one start the first rule in order, with that rule's own (leftmost-first) end; the search
    /// goes on after the match. A match whose `secret` group did not take part, or matched
    /// nothing, replaces nothing and counts no hit; if no match replaced anything the result is
    /// false, as for no match.
    pub fn redact(&self, text: &[u8], out: &mut Vec<u8>, hits: &mut [u64]) -> bool {
        self.redact_screened(text, out, hits, None, true)
    }

    /// [`Redactor::redact`], also appending to `noted` the (rule index, start, end) of each
    /// replaced span of `text`, so that the same secrets can be found where the text was copied.
    /// What `noted` points at is secret: never log it.
    pub fn redact_noting(
        &self,
        text: &[u8],
        out: &mut Vec<u8>,
        hits: &mut [u64],
        noted: &mut Vec<(usize, usize, usize)>,
    ) -> bool {
        self.redact_screened(text, out, hits, Some(noted), true)
    }

    /// Screens a whole read at once: fills `marks` (sorted) with the places in `data` where
    /// a built-in detector could match, so that a text of `data` without a mark inside it
    /// need not be redacted at all (one search per read instead of one per line). False when
    /// the rules cannot be screened this way (custom rules, whose matches may cross lines):
    /// then every text must go through [`Redactor::redact`].
    pub fn screen(&self, data: &[u8], marks: &mut Vec<u32>) -> bool {
        marks.clear();
        let Some(search) = &self.search else {
            return true;
        };
        if search.custom.is_some() {
            return false;
        }
        if let Some(screen) = &search.builtin {
            screen.marks(data, marks);
            marks.sort_unstable();
        }
        true
    }

    /// The replacement for rule `rule`'s secrets, `<redacted:NAME>` (`<redacted>` for an index
    /// past the rules).
    pub fn marker(&self, rule: usize) -> &[u8] {
        self.rules
            .get(rule)
            .map_or(b"<redacted>", |rule| &rule.marker)
    }

    /// [`Redactor::redact_noting`], with the screens skipped when `screen` is false (for tests:
    /// the result must be the same).
    fn redact_screened(
        &self,
        text: &[u8],
        out: &mut Vec<u8>,
        hits: &mut [u64],
        mut noted: Option<&mut Vec<(usize, usize, usize)>>,
        screen: bool,
    ) -> bool {
        let Some(search) = &self.search else {
            return false;
        };
        // The hot path: most texts stop here, after one Teddy search, a memmem and a memchr (and
        // one search of the custom rules' alternation, if any).
        let builtins = match &search.builtin {
            Some(screen_) if screen => screen_.candidates(text),
            // Every built-in detector (there are fewer than 64: `builtins_compile`).
            Some(_) => u64::MAX >> (64 - DETECTORS.len()),
            None => 0,
        };
        let customs = search
            .custom
            .as_ref()
            .is_some_and(|custom| !screen || custom.is_match(text));
        if builtins == 0 && !customs {
            return false;
        }
        // The candidate rules, in rule order (which breaks ties), each with its next match.
        let count = builtins.count_ones() as usize
            + if customs {
                self.rules.len() - search.first_custom
            } else {
                0
            };
        // Inline up to 16 (more, e.g. many custom rules, allocate).
        let mut inline = [(0, Next::Unknown); 16];
        let mut heap = Vec::new();
        let candidates: &mut [(usize, Next)] = if count <= inline.len() {
            &mut inline[..count]
        } else {
            heap.resize(count, (0, Next::Unknown));
            &mut heap
        };
        let custom_rules = if customs {
            search.first_custom..self.rules.len()
        } else {
            0..0
        };
        let rule_order = (0..search.first_custom)
            .filter(|&i| builtins >> i & 1 == 1)
            .chain(custom_rules);
        for (slot, rule) in candidates.iter_mut().zip(rule_order) {
            slot.0 = rule;
        }
        // text[..copied] is in `out` already (once `wrote`).
        let mut copied = 0;
        let mut wrote = false;
        let mut at = 0;
        while at <= text.len() {
            // The leftmost match from `at` of any candidate rule, the first rule at a tie.
            let mut best: Option<(usize, usize, usize)> = None;
            for (i, next) in candidates.iter_mut() {
                let (start, end) = match *next {
                    Next::Gone => continue,
                    Next::At(start, end) if start >= at => (start, end),
                    _ => match self.rules[*i].regex.find_at(text, at) {
                        Some(m) => (m.start(), m.end()),
                        None => {
                            *next = Next::Gone;
                            continue;
                        }
                    },
                };
                *next = Next::At(start, end);
                if best.is_none_or(|(_, best_start, _)| start < best_start) {
                    best = Some((*i, start, end));
                }
            }
            let Some((i, start, end)) = best else {
                break;
            };
            if start == end {
                // Validated rules do not match the empty string, but that check probes; an empty
                // match replaces nothing and the search moves past it, one whole char on.
                at = ceil_char(text, start + 1);
                continue;
            }
            let rule = &self.rules[i];
            let secret = match rule.secret {
                None => Some((start, end)),
                Some(group) => {
                    // The rule's match from `start` is the one found: leftmost is `start`.
                    let mut locs = rule.regex.capture_locations();
                    rule.regex
                        .captures_read_at(&mut locs, text, start)
                        .and_then(|_| locs.get(group))
                }
            };
            if let Some((from, to)) = secret.filter(|(from, to)| from < to) {
                // Replace whole chars only, even for a byte-level (`(?-u)`) custom rule.
                let from = floor_char(text, from, copied);
                let to = ceil_char(text, to).max(from);
                if from < to {
                    if !wrote {
                        out.clear();
                        out.reserve(text.len() + 32);
                        wrote = true;
                    }
                    out.extend_from_slice(&text[copied..from]);
                    out.extend_from_slice(&rule.marker);
                    if let Some(noted) = noted.as_deref_mut() {
                        noted.push((i, from, to));
                    }
                    copied = to;
                    if let Some(count) = hits.get_mut(i) {
                        *count += 1;
                    }
                }
            }
            at = end.max(copied);
        }
        if wrote {
            out.extend_from_slice(&text[copied..]);
        }
        wrote
    }
}

/// A rule's next match in [`Redactor::redact`]'s merge.
#[derive(Clone, Copy)]
enum Next {
    /// Not searched yet.
    Unknown,
    /// Its leftmost match from some earlier position.
    At(usize, usize),
    /// No match from some earlier position, so none later either.
    Gone,
}

/// Compiles one rule alone, with the regex crate's defaults (Unicode on).
fn compile(name: &str, pattern: &str) -> Result<Rule, String> {
    let regex = RegexBuilder::new(pattern)
        .size_limit(RULE_SIZE_LIMIT)
        .build()
        .map_err(|err| regex_error(&err))?;
    let secret = regex.capture_names().position(|n| n == Some("secret"));
    Ok(Rule {
        name: name.to_owned(),
        regex,
        secret,
        marker: format!("<redacted:{name}>").into_bytes().into_boxed_slice(),
    })
}

/// `(?:p0)|(?:p1)|…`, `None` if too big or (a rewrite gone wrong) not free of capture groups.
fn combine(patterns: &[String]) -> Option<Regex> {
    let mut combined = String::with_capacity(patterns.iter().map(|p| p.len() + 5).sum());
    for (i, pattern) in patterns.iter().enumerate() {
        if i > 0 {
            combined.push('|');
        }
        combined.push_str("(?:");
        combined.push_str(pattern);
        combined.push(')');
    }
    RegexBuilder::new(&combined)
        .size_limit(COMBINED_SIZE_LIMIT)
        .dfa_size_limit(COMBINED_DFA_LIMIT)
        .build()
        .ok()
        .filter(|regex| regex.captures_len() == 1)
}

/// A config-error reason for a regex that does not compile. The regex crate's message quotes the
/// pattern, which may hold a secret (an operator redacting a known literal): only its last line,
/// what is wrong, is kept.
fn regex_error(err: &regex::Error) -> String {
    match err {
        regex::Error::Syntax(msg) => {
            let what = msg
                .lines()
                .rev()
                .find_map(|line| line.strip_prefix("error:"))
                .map_or("syntax error", str::trim);
            format!("invalid regex: {what}")
        }
        regex::Error::CompiledTooBig(limit) => {
            format!("invalid regex: compiled size exceeds the limit of {limit} bytes")
        }
        _ => "invalid regex".into(),
    }
}

/// 1 to 64 of `[A-Za-z0-9_-]`.
fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `regex` produces an empty match anywhere in a set of probes that put every kind of
/// neighbour on both sides of a position (text edges, ASCII and non-ASCII word and non-word
/// chars, line breaks), which is what assertions like `\b`, `^` and `$` look at.
fn matches_empty(regex: &Regex) -> bool {
    const CHARS: &[&str] = &[
        "", "a", "Z", "0", "_", " ", "\t", "\n", "\r", "-", ".", "/", ":", "=", "\"", "é", "€",
        "\u{2028}",
    ];
    let mut probe = String::with_capacity(8);
    for a in CHARS {
        for b in CHARS {
            probe.clear();
            probe.push_str(a);
            probe.push_str(b);
            let hay = probe.as_bytes();
            for at in [0, a.len(), hay.len()] {
                if regex.find_at(hay, at).is_some_and(|m| m.is_empty()) {
                    return true;
                }
            }
        }
    }
    false
}

/// The rule's pattern with every group made non-capturing, for the custom rules' combined regex
/// (where two rules' `secret` groups would clash, and groups would only cost). `None` if the rewrite did not find exactly the groups
/// the regex crate found, i.e. it misread the pattern.
fn strip_groups(rule: &Rule, pattern: &str) -> Option<String> {
    let (plain, found) = rewrite_groups(pattern)?;
    (found + 1 == rule.regex.captures_len()).then_some(plain)
}

/// Rewrites a pattern that compiles so that none of its groups capture. Returns the new pattern
/// and the number of capture groups seen, or `None` on syntax it does not follow. It tracks what
/// the regex crate's parser does to find groups: escapes, bracketed classes (nested, `]` first,
/// and in verbose mode comments), flag groups, and the verbose (`x`) flag's comments and blanks,
/// with its scoping. Comments outside classes are dropped, so a trailing one cannot swallow the
/// `)` that closes the rule in a combined regex.
fn rewrite_groups(pattern: &str) -> Option<(String, usize)> {
    let p = pattern.as_bytes();
    // Bytes are copied whole and cut only at ASCII bytes, so the result stays UTF-8.
    let mut out: Vec<u8> = Vec::with_capacity(p.len() + 16);
    let mut verbose = false;
    // The verbose flag at each open group, restored at its `)`.
    let mut stack: Vec<bool> = Vec::new();
    let mut groups = 0;
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'\\' => {
                let end = skip_escape(p, i);
                out.extend_from_slice(&p[i..end]);
                i = end;
            }
            b'#' if verbose => i = skip_comment(p, i),
            b'[' => {
                let end = skip_class(pattern, i, verbose)?;
                out.extend_from_slice(&p[i..end]);
                i = end;
            }
            b'(' => {
                let j = if verbose {
                    skip_blanks(pattern, i + 1)
                } else {
                    i + 1
                };
                let rest = &p[j..];
                let name_at = if rest.starts_with(b"?P<") {
                    Some(j + 3)
                } else if rest.starts_with(b"?<") {
                    Some(j + 2)
                } else {
                    None
                };
                if let Some(name_at) = name_at {
                    // A named group.
                    let close = name_at + p[name_at..].iter().position(|&b| b == b'>')?;
                    groups += 1;
                    out.extend_from_slice(b"(?:");
                    stack.push(verbose);
                    i = close + 1;
                } else if rest.first() == Some(&b'?') {
                    // Flags: `(?flags)` sets them for the rest of the enclosing group,
                    // `(?flags:` for the new group.
                    let end = j + 1 + p[j + 1..].iter().position(|&b| b == b':' || b == b')')?;
                    let mut negate = false;
                    let mut flag_verbose = verbose;
                    for &flag in &p[j + 1..end] {
                        match flag {
                            b'-' => negate = true,
                            b'x' => flag_verbose = !negate,
                            _ => {}
                        }
                    }
                    out.push(b'(');
                    out.extend_from_slice(&p[j..=end]);
                    if p[end] == b':' {
                        stack.push(verbose);
                    }
                    verbose = flag_verbose;
                    i = end + 1;
                } else {
                    // A numbered group.
                    groups += 1;
                    out.extend_from_slice(b"(?:");
                    stack.push(verbose);
                    i = j;
                }
            }
            b')' => {
                verbose = stack.pop()?;
                out.push(b')');
                i += 1;
            }
            byte => {
                out.push(byte);
                i += 1;
            }
        }
    }
    if !stack.is_empty() {
        return None;
    }
    String::from_utf8(out).ok().map(|out| (out, groups))
}

/// End of the escape at `p[i] == b'\\'`: the backslash, the next byte, and a `{…}` right after
/// (`\x{…}`, `\p{…}`, `\b{…}`; after any other escape a `{…}` is a repetition, which holds no
/// group or class either). Later bytes of a multi-byte escaped char are copied as ordinary bytes.
fn skip_escape(p: &[u8], i: usize) -> usize {
    let mut end = (i + 2).min(p.len());
    if p.get(end) == Some(&b'{')
        && let Some(close) = p[end..].iter().position(|&b| b == b'}')
    {
        end += close + 1;
    }
    end
}

/// End of the verbose-mode comment at `p[i] == b'#'`: up to its newline, which is left.
fn skip_comment(p: &[u8], i: usize) -> usize {
    p[i..]
        .iter()
        .position(|&b| b == b'\n')
        .map_or(p.len(), |n| i + n)
}

/// Skips verbose-mode blanks (Unicode whitespace, as the regex crate's parser) and comments.
fn skip_blanks(pattern: &str, mut i: usize) -> usize {
    loop {
        let Some(c) = pattern.get(i..).and_then(|rest| rest.chars().next()) else {
            return i;
        };
        if c == '#' {
            i = skip_comment(pattern.as_bytes(), i);
        } else if c.is_whitespace() {
            i += c.len_utf8();
        } else {
            return i;
        }
    }
}

/// End of the bracketed class at `pattern[i] == '['`: nested classes (`[a[bc]]`, `[[:alpha:]]`),
/// `]` or `^]` first as a literal, escapes, and in verbose mode blanks and comments.
fn skip_class(pattern: &str, mut i: usize, verbose: bool) -> Option<usize> {
    let p = pattern.as_bytes();
    let blanks = |i: usize| if verbose { skip_blanks(pattern, i) } else { i };
    let mut depth = 0usize;
    // At an opening `[`: its `^`, leading `-`s, and a `]` right after `[` or `[^`.
    let open = |mut i: usize| {
        i = blanks(i + 1);
        if p.get(i) == Some(&b'^') {
            i = blanks(i + 1);
        }
        let mut dashes = false;
        while p.get(i) == Some(&b'-') {
            dashes = true;
            i = blanks(i + 1);
        }
        if !dashes && p.get(i) == Some(&b']') {
            i += 1;
        }
        i
    };
    loop {
        i = blanks(i);
        match *p.get(i)? {
            b'[' => {
                depth += 1;
                i = open(i);
            }
            b']' => {
                depth = depth.checked_sub(1)?;
                i += 1;
                if depth == 0 {
                    return Some(i);
                }
            }
            b'\\' => i = skip_escape(p, i),
            _ => i += 1,
        }
    }
}

fn is_continuation(byte: u8) -> bool {
    byte & 0xC0 == 0x80
}

/// `at`, moved back (not below `min`, at most 3 bytes) to the start of the UTF-8 char it is in.
fn floor_char(text: &[u8], at: usize, min: usize) -> usize {
    let mut at = at.min(text.len());
    let stop = at.saturating_sub(3).max(min);
    while at > stop && text.get(at).copied().is_some_and(is_continuation) {
        at -= 1;
    }
    at
}

/// `at`, moved on (at most 3 bytes) to the end of the UTF-8 char it is in.
fn ceil_char(text: &[u8], at: usize) -> usize {
    let mut at = at;
    let stop = at.saturating_add(3).min(text.len());
    while at < stop && text.get(at).copied().is_some_and(is_continuation) {
        at += 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor(custom: &[(&str, &str)]) -> Redactor {
        let custom: Vec<(String, String)> = custom
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
        Redactor::new(true, &custom).expect("valid rules")
    }

    fn custom_only(custom: &[(&str, &str)]) -> Result<Redactor, (usize, String)> {
        let custom: Vec<(String, String)> = custom
            .iter()
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
        Redactor::new(false, &custom)
    }

    /// Redacts and returns (output or the input when nothing matched, hits).
    fn run(r: &Redactor, text: &str) -> (String, Vec<u64>) {
        let mut out = b"stale".to_vec();
        let mut hits = vec![0; r.rules().len()];
        let matched = r.redact(text.as_bytes(), &mut out, &mut hits);
        if !matched {
            assert_eq!(out, b"stale", "out untouched when nothing matched");
            assert!(hits.iter().all(|&h| h == 0));
            return (text.to_string(), hits);
        }
        (String::from_utf8(out).expect("valid UTF-8 out"), hits)
    }

    fn index(r: &Redactor, name: &str) -> usize {
        r.rule_names().position(|n| n == name).expect("rule exists")
    }

    #[test]
    fn builtins_compile() {
        assert_eq!(BUILTIN.len(), DETECTORS.len());
        assert!(
            (1..64).contains(&DETECTORS.len()),
            "a u64 holds one bit per detector"
        );
        for detector in DETECTORS {
            let name = detector.name;
            assert!(valid_name(name), "{name}");
            let rule = compile(name, detector.pattern).expect(name);
            assert!(strip_groups(&rule, detector.pattern).is_some(), "{name}");
            assert!(!matches_empty(&rule.regex), "{name}");
        }
        let r = Redactor::new(true, &[]).expect("builtins");
        assert_eq!(r.rule_names().collect::<Vec<_>>(), BUILTIN);
    }

    #[test]
    fn screen_literals() {
        // 4 bytes each keeps the alternation exact (the regex crate trims longer literals of big
        // sets to 4 bytes, making them inexact and putting an automaton behind them) and Teddy's
        // fingerprints 4 bytes long; at most 32 keeps it "slim" Teddy.
        let mut count = 0;
        for detector in DETECTORS {
            let plain = detector.pattern.replace('\\', "");
            match detector.needs {
                Needs::Any(needs) => {
                    assert!(!needs.is_empty(), "{}", detector.name);
                    for literal in needs {
                        assert_eq!(literal.len(), 4, "{literal}");
                        // Spelled out in the pattern (escaped or not).
                        assert!(plain.contains(literal), "{} lacks {literal}", detector.name);
                        count += 1;
                    }
                }
                Needs::Substring(needle) => assert!(plain.starts_with(needle), "{needle}"),
                Needs::UrlUserinfo => assert!(detector.pattern.contains("(?:://|")),
            }
        }
        assert!(count <= 32, "{count} screen literals");
        let mut order = SCREEN_ORDER.to_vec();
        order.sort_unstable();
        let mut literals: Vec<&str> = DETECTORS
            .iter()
            .flat_map(|d| match d.needs {
                Needs::Any(needs) => needs.to_vec(),
                _ => Vec::new(),
            })
            .collect();
        literals.sort_unstable();
        assert_eq!(order, literals, "SCREEN_ORDER lists every literal once");
        let screen = Screen::new();
        let bit = |name: &str| 1u64 << BUILTIN.iter().position(|n| *n == name).expect(name);
        for (name, text, _) in SAMPLES {
            assert_ne!(screen.candidates(text.as_bytes()) & bit(name), 0, "{name}");
        }
        let url = bit("url_password");
        assert_eq!(
            screen.candidates(b"GET https://example.com/a?b=c 200 user@example.com"),
            0
        );
        assert_eq!(
            screen.candidates(b"ssh://git@github.com/ex/repo.git img=web@sha256:0f"),
            0
        );
        assert_eq!(
            screen.candidates(b"x https://a.com/ https://u:p@example.com/"),
            url
        );
        assert_eq!(screen.candidates(br"x https:\/\/u:p@example.com\/"), url);
        // Overlapping literals are all found (`ss_k` and `k_te` share a `k`).
        assert_eq!(
            screen.candidates(b"xss_k_test_"),
            bit("aws_secret_key") | bit("stripe_key")
        );
        assert_eq!(
            screen.candidates(b"a.eyJ b xox"),
            bit("jwt") | bit("slack_token")
        );
    }

    #[test]
    fn every_sample_is_redacted_by_its_detector() {
        let r = redactor(&[]);
        let mut covered: Vec<&str> = SAMPLES.iter().map(|s| s.0).collect();
        covered.sort_unstable();
        let mut names = BUILTIN.to_vec();
        names.sort_unstable();
        assert_eq!(covered, names, "one sample per detector");
        for (name, text, secret) in SAMPLES {
            assert!(text.contains(secret), "{name}: sample holds its secret");
            let (out, hits) = run(&r, text);
            assert!(!out.contains(secret), "{name}: {out}");
            let marker = format!("<redacted:{name}>");
            assert!(out.contains(&marker), "{name}: {out}");
            assert_eq!(hits[index(&r, name)], 1, "{name}: {out}");
            assert_eq!(hits.iter().sum::<u64>(), 1, "{name}: {out}");
            // The secret is all that went: the text around it is kept.
            let at = text.find(secret).expect("secret in sample");
            let (before, after) = (&text[..at], &text[at + secret.len()..]);
            if *name != "private_key" {
                assert_eq!(out, format!("{before}{marker}{after}"), "{name}");
            }
        }
    }

    #[test]
    fn secret_alone_at_start_and_at_end() {
        let r = redactor(&[]);
        for (name, _, secret) in SAMPLES {
            // A bare secret is the whole text for detectors that match the secret itself.
            let value_only = [
                "jwt",
                "aws_access_key",
                "gcp_api_key",
                "gcp_oauth_token",
                "github_token",
                "gitlab_token",
                "slack_token",
                "stripe_key",
                "npm_token",
                "pypi_token",
                "openai_key",
                "anthropic_key",
            ];
            if !value_only.contains(name) {
                continue;
            }
            let marker = format!("<redacted:{name}>");
            assert_eq!(run(&r, secret).0, marker, "{name} whole");
            assert_eq!(run(&r, &format!("{secret} x")).0, format!("{marker} x"));
            assert_eq!(run(&r, &format!("x {secret}")).0, format!("x {marker}"));
        }
        assert_eq!(
            run(&r, "Bearer abcdefgh12345").0,
            "Bearer <redacted:bearer>"
        );
    }

    #[test]
    fn context_is_preserved() {
        let r = redactor(&[]);
        assert_eq!(
            run(
                &r,
                "user=bob token=ghp_FAKEexampleTOKEN0123456789abcdefghij action=push"
            )
            .0,
            "user=bob token=<redacted:github_token> action=push"
        );
        assert_eq!(
            run(&r, "dsn=redis://:pw0rd@cache:6379/0 ok").0,
            "dsn=redis://:<redacted:url_password>@cache:6379/0 ok"
        );
        assert_eq!(
            run(&r, r#"{"url":"https:\/\/bob:pa@ss@example.com\/x"}"#).0,
            r#"{"url":"https:\/\/bob:<redacted:url_password>@example.com\/x"}"#
        );
        assert_eq!(
            run(&r, "Authorization: bearer abc.def-ghi_jkl==; next").0,
            "Authorization: bearer <redacted:bearer>; next"
        );
        assert_eq!(
            run(&r, r#"{\"password\":\"p4ss\",\"user\":\"bob\"}"#).0,
            r#"{\"password\":\"<redacted:password>\",\"user\":\"bob\"}"#
        );
        assert_eq!(
            run(&r, "GET /x?sv=2020&sig=abcdefghijklmnop%3D&se=1 200").0,
            "GET /x?sv=2020&sig=<redacted:azure_sas>&se=1 200"
        );
        assert_eq!(
            run(&r, r#"{"u":"https://a.blob.core.windows.net/c?sv=1\u0026sig=abcdefghijklmnop%3D\u0026x=1"}"#).0,
            r#"{"u":"https://a.blob.core.windows.net/c?sv=1\u0026sig=<redacted:azure_sas>\u0026x=1"}"#
        );
    }

    #[test]
    fn two_secrets_and_hits_per_rule() {
        let r = redactor(&[]);
        let text = "k1=AKIAIOSFODNN7EXAMPLE k2=ASIAIOSFODNN7EXAMPL2 jwt eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0. end";
        let (out, hits) = run(&r, text);
        assert_eq!(
            out,
            "k1=<redacted:aws_access_key> k2=<redacted:aws_access_key> jwt <redacted:jwt> end"
        );
        assert_eq!(hits[index(&r, "aws_access_key")], 2);
        assert_eq!(hits[index(&r, "jwt")], 1);
        assert_eq!(hits.iter().sum::<u64>(), 3);
        // Adjacent secrets, no separator between their matches.
        let (out, hits) = run(&r, "AKIAIOSFODNN7EXAMPLEAKIAIOSFODNN7EXAMPL2");
        assert_eq!(out, "<redacted:aws_access_key><redacted:aws_access_key>");
        assert_eq!(hits[index(&r, "aws_access_key")], 2);
        // Hits add up across calls.
        let mut hits = vec![0; r.rules().len()];
        let mut out = Vec::new();
        for _ in 0..3 {
            assert!(r.redact(b"password=x", &mut out, &mut hits));
        }
        assert_eq!(hits[index(&r, "password")], 3);
        assert_eq!(out, b"password=<redacted:password>");
    }

    #[test]
    fn private_key_forms() {
        let r = redactor(&[]);
        let body = "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7";
        // JSON-escaped newlines.
        let text = format!(
            r#"{{"key":"-----BEGIN PRIVATE KEY-----\n{body}\n-----END PRIVATE KEY-----\n","k":1}}"#
        );
        assert_eq!(
            run(&r, &text).0,
            r#"{"key":"<redacted:private_key>\n","k":1}"#
        );
        // One line of a block: the rest of the text goes.
        assert_eq!(
            run(
                &r,
                &format!("key: -----BEGIN OPENSSH PRIVATE KEY----- {body}")
            )
            .0,
            "key: <redacted:private_key>"
        );
        // Two blocks, each to its own END; PGP's form; invalid UTF-8 inside a block.
        let text = format!(
            "a -----BEGIN EC PRIVATE KEY-----\n{body}\n-----END EC PRIVATE KEY----- b -----BEGIN PGP PRIVATE KEY BLOCK-----\n\u{FF}{body}\n-----END PGP PRIVATE KEY BLOCK----- c"
        );
        let (out, hits) = run(&r, &text);
        assert_eq!(out, "a <redacted:private_key> b <redacted:private_key> c");
        assert_eq!(hits[index(&r, "private_key")], 2);
        let mut bytes =
            b"-----BEGIN PRIVATE KEY-----\nabc\xFF\xFEdef\n-----END PRIVATE KEY----- tail".to_vec();
        let mut out = Vec::new();
        let mut hits = vec![0; r.rules().len()];
        assert!(r.redact(&bytes, &mut out, &mut hits));
        assert_eq!(out, b"<redacted:private_key> tail");
        // A certificate is not a private key.
        bytes = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----".to_vec();
        assert!(!r.redact(&bytes, &mut out, &mut hits));
    }

    #[test]
    fn custom_rules_with_and_without_secret_group() {
        let r = redactor(&[
            ("ticket", r"TKT-[0-9]{6}"),
            ("session", r"sessionid=(?P<secret>[a-f0-9]{16})"),
            ("pin", r"(?i)pin(?:code)?[ :=]+(?P<secret>\d{4,8})"),
        ]);
        let n = BUILTIN.len();
        assert_eq!(
            r.rule_names().skip(n).collect::<Vec<_>>(),
            ["ticket", "session", "pin"]
        );
        let (out, hits) = run(
            &r,
            "ref TKT-123456 sessionid=0123456789abcdef PINCODE: 123456 done",
        );
        assert_eq!(
            out,
            "ref <redacted:ticket> sessionid=<redacted:session> PINCODE: <redacted:pin> done"
        );
        assert_eq!(&hits[n..], [1, 1, 1]);
        assert_eq!(r.rules()[n + 1].secret_group(), Some(1));
        assert_eq!(r.rules()[n].secret_group(), None);
    }

    #[test]
    fn custom_groups_in_every_syntax() {
        // Each: (pattern, text, expected). Groups named `secret` in several rules, other groups
        // numbered and named, classes holding parens, escaped parens, verbose mode with comments
        // that hold `(`, `[` and `)`, and a trailing comment with no newline.
        let cases: &[(&str, &str, &str)] = &[
            (r"(a)(?P<x>b)(?<secret>c+)(d)", "abcccd", "ab<redacted:r0>d"),
            (r"\((?P<secret>[()]+)\)", "((()))", "(<redacted:r0>)"),
            (
                r"[(\[](?P<secret>[^\]\s]+)[]]",
                "x[abc]y",
                "x[<redacted:r0>]y",
            ),
            (
                "(?x) key \\# (?P<secret> [0-9]+ ) # a comment ( [ )",
                "key#123",
                "key#<redacted:r0>",
            ),
            (
                "(?x) ( ?P<secret> z+ ) # note: (\n (?-x: end)",
                "zz end",
                "<redacted:r0> end",
            ),
            (
                "(?x:a [ # comment ] (\n b ] (?P<secret>c) )",
                "abc",
                "ab<redacted:r0>",
            ),
            (
                r"(?i:q)(?P<secret>[[:digit:]&&[^9]]+)",
                "Q1239",
                "Q<redacted:r0>9",
            ),
            (r"w(?P<secret>[]x]+)", "w]x]", "w<redacted:r0>"),
            (r"v(?P<secret>[^]v]+)", "vab]", "v<redacted:r0>]"),
            (r"\x{28}(?P<secret>\pL+)\x{29}", "(abc)", "(<redacted:r0>)"),
        ];
        for (pattern, text, expected) in cases {
            // Twice, so the secret group's index differs from its rule's own regex.
            let r = custom_only(&[("r0", pattern), ("r1", r"(?P<secret>zzzz)")])
                .unwrap_or_else(|e| panic!("{pattern:?}: {e:?}"));
            assert_eq!(run(&r, text).0, *expected, "{pattern:?}");
            let r = custom_only(&[("r1", r"(q)(?P<secret>Q{9})"), ("r0", pattern)])
                .unwrap_or_else(|e| panic!("{pattern:?}: {e:?}"));
            assert_eq!(run(&r, text).0, *expected, "{pattern:?}");
        }
    }

    #[test]
    fn rewrite_counts_groups() {
        for (pattern, groups) in [
            ("a(b)(?:c)(?i)(?P<n>d)(?<m>e)", 3),
            (r"\(\)[()](x)", 1),
            ("(?x) # (a)\n (b)", 1),
            ("(?x: # (a)\n (b)) # (c)", 2),
            ("(?x)[ a # ]\n ] (a)", 1),
            ("(?-x) # (a)", 1),
        ] {
            let (plain, found) = rewrite_groups(pattern).expect(pattern);
            assert_eq!(found, groups, "{pattern:?}");
            let regex = Regex::new(&plain).expect(&plain);
            assert_eq!(regex.captures_len(), 1, "{plain:?}");
        }
    }

    #[test]
    fn optional_or_empty_secret_group_replaces_nothing() {
        let r = custom_only(&[("opt", r"user=\w+(?: pass=(?P<secret>\S*))?")]).expect("valid");
        assert_eq!(run(&r, "user=bob").0, "user=bob");
        assert_eq!(run(&r, "user=bob pass=").0, "user=bob pass=");
        let (out, hits) = run(&r, "user=bob pass=x y");
        assert_eq!(out, "user=bob pass=<redacted:opt> y");
        assert_eq!(hits, [1]);
    }

    #[test]
    fn first_rule_wins_at_a_start() {
        let r = custom_only(&[("short", "abc"), ("long", "abcdef")]).expect("valid");
        assert_eq!(run(&r, "abcdef").0, "<redacted:short>def");
        let r = custom_only(&[("long", "abcdef"), ("short", "abc")]).expect("valid");
        assert_eq!(run(&r, "abcdef abc").0, "<redacted:long> <redacted:short>");
        // An earlier start wins over rule order.
        let r = custom_only(&[("b", "bcd"), ("a", "abc")]).expect("valid");
        assert_eq!(run(&r, "abcd").0, "<redacted:a>d");
    }

    #[test]
    fn invalid_rules_are_config_errors() {
        let err = |rules: &[(&str, &str)]| custom_only(rules).expect_err("must fail");
        let (i, reason) = err(&[("ok", "fine"), ("bad", "(hunter2")]);
        assert_eq!(i, 1);
        assert!(reason.starts_with("invalid regex: "), "{reason}");
        assert!(
            !reason.contains("hunter2"),
            "never echoes the pattern: {reason}"
        );
        assert!(err(&[("bad", r"a\")]).1.starts_with("invalid regex: "));
        assert!(err(&[("bad", r"(?=x)")]).1.starts_with("invalid regex: "));
        let big = err(&[("big", r"\w{1000}\w{1000}")]).1;
        assert!(big.contains("size"), "{big}");
        for empty in [
            "a*",
            r"\b",
            "x?|y",
            "(?m)^",
            "$",
            "(?:)",
            "a|",
            r"(?-u:\b)",
            r"\B",
        ] {
            assert_eq!(
                err(&[("e", empty)]),
                (0, "matches the empty string".to_string()),
                "{empty:?}"
            );
        }
        for name in ["", "has space", "dot.ted", "é", &"n".repeat(65)] {
            assert_eq!(
                err(&[("ok", "x"), (name, "y")]),
                (1, "name must be 1 to 64 of [A-Za-z0-9_-]".to_string()),
                "{name:?}"
            );
        }
        assert!(custom_only(&[(&"n".repeat(64), "x")]).is_ok());
        assert_eq!(err(&[("a", "x"), ("a", "y")]).0, 1);
        let custom = [("jwt".to_string(), "y".to_string())];
        assert_eq!(Redactor::new(true, &custom).expect_err("taken").0, 0);
        assert!(Redactor::new(false, &custom).is_ok());
    }

    #[test]
    fn no_rules_match_nothing() {
        let r = Redactor::new(false, &[]).expect("no rules");
        assert_eq!(r.rule_names().count(), 0);
        let mut out = Vec::new();
        assert!(!r.redact(b"password=x AKIAIOSFODNN7EXAMPLE", &mut out, &mut []));
    }

    #[test]
    fn ordinary_lines_do_not_match() {
        let r = redactor(&[]);
        let lines = [
            r#"{"ts":"2024-05-01T12:34:56.789Z","level":"info","msg":"request completed","method":"GET","path":"/api/v1/users/12345","status":200,"duration_ms":12.5}"#,
            "trace_id=4bf92f3577b34da6a3ce929d0e0e4736 span_id=00f067aa0ba902b7 request_id=0b7c4e2a-93f1-4d4c-9a53-3c1f0e9d6b21",
            "pulled image sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 in 1.2s",
            r#"10.1.2.3 - - [01/May/2024:12:34:56 +0000] "GET https://shop.example.com/search?q=shoes&page=2 HTTP/1.1" 200 5123 "https://www.example.org/" "Mozilla/5.0 (X11; Linux x86_64)""#,
            "ssh://git@github.com/example/repo.git fetched; http://localhost:8080/healthz ok; mailto user@example.com",
            "payload=eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIn0 (base64 JSON without dots) size=52",
            "data=SGVsbG8sIFdvcmxkISBUaGlzIGlzIGEgbm9ybWFsIGJhc2U2NCBzdHJpbmcu==",
            "    at com.example.billing.InvoiceService.render(InvoiceService.java:214)",
            r#"  File "/app/handlers/auth.py", line 88, in verify_token"#,
            "goroutine 17 [running]:\ngithub.com/example/api/internal/auth.(*Verifier).Check(0xc0001a2000)",
            "password reset requested for user 1234; token expired after 3600s; secret rotation scheduled",
            "max_tokens=512 tokens_used=87 password_policy=strict secretName=db-creds",
            "Bearer token missing; WWW-Authenticate: Bearer realm=\"api\"",
            "-----BEGIN CERTIFICATE-----",
            "ACCESS LOG: GET /v1/accounts?limit=50&offset=100 — 200 OK (café, 東京)",
            "[::1]:8080 -> http://[2001:db8::1]:443/path connected",
        ];
        for line in lines {
            assert_eq!(run(&r, line).0, line, "false positive");
        }
    }

    #[test]
    fn utf8_is_kept_and_bytes_never_panic() {
        // A byte-level custom rule matching half of "é" replaces the whole char.
        let r = custom_only(&[("half", r"(?-u:\xA9)")]).expect("valid");
        let (out, hits) = run(&r, "caf\u{e9} ok \u{a9}");
        assert_eq!(out, "caf<redacted:half> ok <redacted:half>");
        assert_eq!(hits, [2]);
        let r = custom_only(&[("lead", r"(?-u:\xC3)"), ("two", r"(?-u:\xA9\xC3)")]).expect("valid");
        let (out, hits) = run(&r, "\u{e9}\u{e9}");
        assert_eq!(out, "<redacted:lead><redacted:lead>");
        assert_eq!(hits, [2, 0]);

        // Mutated samples, invalid UTF-8 and stray bytes: no panic, valid UTF-8 stays valid.
        let r = redactor(&[
            ("any", r"(?-u:[\x80-\xFF]{2})"),
            ("sec", r"s(?P<secret>(?-u:.))"),
        ]);
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut out = Vec::new();
        let mut hits = vec![0; r.rules().len()];
        for round in 0..3000 {
            let (_, text, _) = SAMPLES[round % SAMPLES.len()];
            let mut bytes = text.as_bytes().to_vec();
            for _ in 0..rand() % 4 {
                let at = (rand() as usize) % (bytes.len() + 1);
                let junk: &[u8] = match rand() % 5 {
                    0 => b"\xFF",
                    1 => "é".as_bytes(),
                    2 => b"\xE2\x82",
                    3 => b"-----BEGIN PRIVATE KEY-----",
                    _ => b"://u:p@",
                };
                bytes.splice(at..at, junk.iter().copied());
            }
            if rand() % 3 == 0 {
                let cut = (rand() as usize) % (bytes.len() + 1);
                bytes.truncate(cut);
            }
            if r.redact(&bytes, &mut out, &mut hits) && std::str::from_utf8(&bytes).is_ok() {
                assert!(std::str::from_utf8(&out).is_ok(), "{bytes:?} -> {out:?}");
            }
        }
        // A large text full of secrets.
        let line = "x AKIAIOSFODNN7EXAMPLE password=hunter2 é\n";
        let big = line.repeat(20_000);
        let mut hits = vec![0; r.rules().len()];
        assert!(r.redact(big.as_bytes(), &mut out, &mut hits));
        for name in ["aws_access_key", "password", "any"] {
            assert_eq!(hits[index(&r, name)], 20_000, "{name}");
        }
        assert_eq!(hits.iter().sum::<u64>(), 60_000);
        // A wrong-sized `hits` is tolerated.
        assert!(r.redact(big.as_bytes(), &mut out, &mut []));
    }

    #[test]
    fn screened_and_unscreened_agree() {
        // The screens only skip work: with and without them every text comes out the same.
        let r = redactor(&[
            ("ticket", r"TKT-[0-9]{6}"),
            ("pin", r"(?i)\bpin=(?P<secret>\d+)"),
        ]);
        let mut seed = 0x0DDB_1A5E_5BAD_5EEDu64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let pieces: Vec<&str> = SAMPLES
            .iter()
            .flat_map(|(_, text, secret)| [*text, *secret])
            .chain([
                "Bearer ",
                "bearer\t",
                "BEARER%20",
                "abcdefgh1234",
                "eyJ",
                ".",
                "AKIA",
                "ASIA",
                "0123456789ABCDEF",
                "secret_access_key",
                "SecretAccessKey: ",
                "=",
                ":",
                "\"",
                "\\\"",
                "AccountKey=",
                "&sig=",
                "\\u0026sig=",
                "ghp_",
                "github_pat_",
                "glpat-",
                "xoxb-",
                "xapp-",
                "hooks.slack.com/services/",
                "sk_live_",
                "whsec_",
                "npm_",
                "pypi-AgEIcHlwaS5vcmc",
                "sk-proj-",
                "T3BlbkFJ",
                "sk-ant-api03-",
                "SG.",
                "eyJhbGciOiJub25lIn0.",
                ".eyJzdWIiOiIxIn0.",
                "-----BEGIN PRIVATE KEY-----",
                "-----END PRIVATE KEY-----",
                "\n",
                "\\n",
                "Authorization: Basic ",
                "://",
                r":\/\/",
                "user:",
                "pa55",
                "@",
                "host/",
                "password=",
                "PASSWD: ",
                "TKT-123456",
                "pin=42",
                "é",
                "\u{FFFD}",
                " ",
                "x",
                "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ",
            ])
            .collect();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut hits_a = vec![0; r.rules().len()];
        let mut hits_b = hits_a.clone();
        let mut redacted = 0;
        for _ in 0..20_000 {
            let mut text = Vec::new();
            for _ in 0..1 + rand() % 6 {
                let piece = pieces[(rand() as usize) % pieces.len()].as_bytes();
                // Sometimes only part of a piece, cut anywhere (even inside a char).
                let (from, to) = match rand() % 4 {
                    0 => {
                        let from = (rand() as usize) % (piece.len() + 1);
                        (from, from + (rand() as usize) % (piece.len() - from + 1))
                    }
                    _ => (0, piece.len()),
                };
                text.extend_from_slice(&piece[from..to]);
            }
            a.clear();
            b.clear();
            let with = r.redact(&text, &mut a, &mut hits_a);
            let without = r.redact_screened(&text, &mut b, &mut hits_b, None, false);
            assert_eq!(
                (with, &a),
                (without, &b),
                "{:?}",
                String::from_utf8_lossy(&text)
            );
            redacted += usize::from(with);
        }
        assert_eq!(hits_a, hits_b);
        assert!(redacted > 5_000, "{redacted}");
    }

    #[test]
    fn noting_lists_the_replaced_spans() {
        let r = redactor(&[("ticket", r"TKT-[0-9]{6}")]);
        let text = "a password=hunter2 b TKT-123456 c";
        let mut out = Vec::new();
        let mut hits = vec![0; r.rules().len()];
        let mut noted = Vec::new();
        assert!(r.redact_noting(text.as_bytes(), &mut out, &mut hits, &mut noted));
        let (password, ticket) = (index(&r, "password"), index(&r, "ticket"));
        assert_eq!(noted, [(password, 11, 18), (ticket, 21, 31)]);
        assert_eq!(&text[11..18], "hunter2");
        assert_eq!(r.marker(ticket), b"<redacted:ticket>");
        assert_eq!(r.marker(usize::MAX), b"<redacted>");
        noted.clear();
        assert!(!r.redact_noting(b"nothing here", &mut out, &mut hits, &mut noted));
        assert!(noted.is_empty());
    }

    #[test]
    fn debug_shows_names_only() {
        let r = redactor(&[("known", "hunter2")]);
        let shown = format!("{r:?} {:?}", r.rules().last());
        assert!(
            shown.contains("known") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    /// Deterministic log entries without secrets, ~220 bytes on average (the brief's 5 million
    /// lines per GiB): JSON, logfmt, access logs with URLs, klog, plain messages, short lines, and
    /// Java, Go and Python stack traces as one multi-line entry each.
    fn corpus(target: usize) -> Vec<String> {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let words = [
            "request",
            "completed",
            "cache",
            "miss",
            "user",
            "order",
            "payment",
            "retry",
            "connection",
            "reset",
            "timeout",
            "upstream",
            "shard",
            "leader",
            "elected",
            "café",
            "naïve",
            "東京",
            "queue",
            "drained",
            "scheduler",
            "pod",
            "node",
            "volume",
            "mounted",
            "session",
            "refreshed",
            "invoice",
            "rendered",
            "compaction",
            "finished",
            "author",
            "unauthorized",
            "authority",
            "password",
            "reset",
        ];
        let paths = [
            "/api/v1/users",
            "/healthz",
            "/static/app.js",
            "/search",
            "/v2/orders",
        ];
        let hosts = [
            "shop.example.com",
            "api.internal",
            "10.0.3.7:8443",
            "cdn.example.net",
        ];
        let mut entries = Vec::new();
        let mut size = 0;
        while size < target {
            let r = rand();
            let w = |k: u64| words[(k % words.len() as u64) as usize];
            let hex = |k: u64| format!("{:016x}{:016x}", k, k.rotate_left(29) ^ 0x5bd1_e995);
            let uuid = |k: u64| {
                format!(
                    "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
                    k as u32,
                    (k >> 32) as u16,
                    (k >> 40) % 4096,
                    (k >> 44) % 4096,
                    k & 0xFFFF_FFFF_FFFF
                )
            };
            let entry = match r % 100 {
                0..30 => format!(
                    r#"{{"ts":"2024-05-01T12:{:02}:{:02}.{:03}Z","level":"info","logger":"http.server","msg":"{} {}","method":"GET","path":"{}/{}","status":200,"bytes":{},"duration_ms":{}.{},"trace_id":"{}","span_id":"{:016x}","user_id":"{}"}}"#,
                    r % 60,
                    (r >> 8) % 60,
                    (r >> 16) % 1000,
                    w(r >> 3),
                    w(r >> 7),
                    paths[(r >> 11) as usize % paths.len()],
                    r % 100_000,
                    r % 9000,
                    (r >> 20) % 500,
                    r % 10,
                    hex(r),
                    r.rotate_left(7),
                    uuid(r),
                ),
                30..50 => format!(
                    "time=2024-05-01T12:34:{:02}.{:06}Z level=warn msg=\"{} {} {}\" key=user:{} shard={} attempt={} latency={}.{}ms caller=cache/lru.go:{} req_id={}",
                    r % 60,
                    r % 1_000_000,
                    w(r >> 5),
                    w(r >> 9),
                    w(r >> 13),
                    r % 100_000,
                    r % 16,
                    r % 5,
                    r % 50,
                    r % 10,
                    r % 400,
                    uuid(r >> 3),
                ),
                50..70 => format!(
                    r#"10.{}.{}.{} - - [01/May/2024:12:34:56 +0000] "GET https://{}{}?q={}&page={} HTTP/1.1" {} {} "https://www.example.org/ref/{}" "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36""#,
                    r % 256,
                    (r >> 8) % 256,
                    (r >> 16) % 256,
                    hosts[(r >> 3) as usize % hosts.len()],
                    paths[(r >> 7) as usize % paths.len()],
                    w(r >> 11),
                    r % 20,
                    [200, 301, 404, 500][(r >> 13) as usize % 4],
                    r % 90_000,
                    r % 1000,
                ),
                70..80 => format!(
                    "I0501 12:34:56.{:06}       1 controller.go:{}] \"Reconciling\" pod=\"default/web-{:x}-{:05x}\" image=\"registry.example.com/web@sha256:{}{}\" node=\"{}\"",
                    r % 1_000_000,
                    r % 400,
                    r % 0xFFF_FFFF,
                    (r >> 30) % 0xF_FFFF,
                    hex(r),
                    hex(r >> 3),
                    w(r >> 17),
                ),
                80..92 => format!(
                    "{} {} {} id={} digest={} size={} ok",
                    w(r),
                    w(r >> 4),
                    w(r >> 8),
                    uuid(r),
                    hex(r),
                    r % 10_000,
                ),
                92..97 => format!(
                    "GET {} {} {}ms",
                    paths[r as usize % paths.len()],
                    200,
                    r % 90
                ),
                97 => {
                    let mut e = format!(
                        "java.lang.IllegalStateException: {} {} failed\n",
                        w(r),
                        w(r >> 5)
                    );
                    for k in 0..8 + r % 8 {
                        e.push_str(&format!(
                            "\tat com.example.{}.{}Service.handle{}({}Service.java:{})\n",
                            w(r >> k),
                            w(r >> (k + 6)),
                            k,
                            w(r >> (k + 6)),
                            (r >> k) % 900
                        ));
                    }
                    e
                }
                98 => {
                    let mut e = format!(
                        "panic: runtime error: index out of range [{}] with length {}\n\ngoroutine {} [running]:\n",
                        r % 9,
                        r % 5,
                        r % 500
                    );
                    for k in 0..4 + r % 5 {
                        e.push_str(&format!(
                            "github.com/example/{}/internal/{}.(*Handler).Serve(0xc000{:06x}, 0x{:x})\n\t/go/src/github.com/example/{}/handler.go:{} +0x{:x}\n",
                            w(r >> k), w(r >> (k + 3)), (r >> k) % 0xFF_FFFF, r >> 24, w(r >> k), (r >> k) % 900, r % 0xFFF
                        ));
                    }
                    e
                }
                _ => {
                    let mut e = "Traceback (most recent call last):\n".to_string();
                    for k in 0..3 + r % 4 {
                        e.push_str(&format!(
                            "  File \"/app/{}/{}.py\", line {}, in {}\n    result = self.{}(request)\n",
                            w(r >> k), w(r >> (k + 2)), (r >> k) % 400, w(r >> (k + 4)), w(r >> (k + 1))
                        ));
                    }
                    e.push_str(&format!("KeyError: '{}'", w(r >> 9)));
                    e
                }
            };
            size += entry.len() + 1;
            entries.push(entry);
        }
        entries
    }

    /// Throughput of the hot path: texts laid out one after another in one buffer, as a read
    /// chunk is, each redacted on its own. Prints MB/s (best of three passes);
    /// `cargo test --release -- --nocapture` runs it on ~100 MB, a debug build on 1 MB (there it
    /// checks the corpus for false positives).
    #[test]
    fn throughput() {
        fn lay_out(texts: &[String]) -> (Vec<u8>, Vec<(usize, usize)>) {
            let mut buf = Vec::with_capacity(texts.iter().map(|t| t.len() + 1).sum());
            let mut spans = Vec::with_capacity(texts.len());
            for text in texts {
                spans.push((buf.len(), buf.len() + text.len()));
                buf.extend_from_slice(text.as_bytes());
                buf.push(b'\n');
            }
            (buf, spans)
        }
        /// Texts redacted and the fastest of three passes' seconds (the machine may be shared).
        fn pass(r: &Redactor, buf: &[u8], spans: &[(usize, usize)]) -> (usize, f64) {
            let mut out = Vec::with_capacity(4096);
            let mut hits = vec![0; r.rules().len()];
            let mut fastest = f64::MAX;
            let mut matched = 0;
            for _ in 0..3 {
                let started = std::time::Instant::now();
                matched = 0;
                for &(from, to) in spans {
                    matched += usize::from(r.redact(&buf[from..to], &mut out, &mut hits));
                }
                fastest = fastest.min(started.elapsed().as_secs_f64());
            }
            (matched, fastest)
        }
        let target = if cfg!(debug_assertions) {
            1 << 20
        } else {
            100 << 20
        };
        let r = redactor(&[]);
        let lines = corpus(target);
        let (clean, clean_spans) = lay_out(&lines);
        let screen = Screen::new();
        let screened = clean_spans
            .iter()
            .filter(|&&(from, to)| screen.candidates(&clean[from..to]) != 0)
            .count();
        let (matched, clean_secs) = pass(&r, &clean, &clean_spans);
        assert_eq!(matched, 0, "false positives in the corpus");

        // The same lines, each with one sample (a secret and its context) in the middle.
        let dirty_lines: Vec<String> = lines
            .iter()
            .enumerate()
            .map(|(i, line)| {
                let (_, sample, _) = SAMPLES[i % SAMPLES.len()];
                let cut = line.len() / 2;
                let cut = (0..=cut)
                    .rev()
                    .find(|&c| line.is_char_boundary(c))
                    .unwrap_or(0);
                format!("{} {sample} {}", &line[..cut], &line[cut..])
            })
            .collect();
        let (dirty, dirty_spans) = lay_out(&dirty_lines);
        let (matched, dirty_secs) = pass(&r, &dirty, &dirty_spans);
        assert_eq!(matched, dirty_lines.len());

        let mbps = |bytes: usize, secs: f64| bytes as f64 / 1e6 / secs;
        println!(
            "redact, no match: {:.0} MB/s ({} texts, {:.1} MB, {:.0} ns/text, {:.2} CPU-s/GiB, \
             screen passed {screened}); one secret per text: {:.0} MB/s ({:.0} ns/text)",
            mbps(clean.len(), clean_secs),
            lines.len(),
            clean.len() as f64 / 1e6,
            clean_secs * 1e9 / lines.len() as f64,
            clean_secs * (1u64 << 30) as f64 / clean.len() as f64,
            mbps(dirty.len(), dirty_secs),
            dirty_secs * 1e9 / dirty_lines.len() as f64,
        );
    }
}
