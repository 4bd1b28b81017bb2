//! The stage pipeline: any input through stages that strip colours, parse JSON and logfmt
//! fields into labels and structured metadata, rewrite the line and redact with every built-in
//! detector. No panic; bounded output; and a secret of each built-in shape, planted anywhere in
//! a line, a JSON or logfmt field that becomes a label or metadata, or a path label, never
//! reaches the encoded request.
#![no_main]

use std::path::Path;
use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use ztail::config::Config;
use ztail::loki::encode;
use ztail::metrics::Metrics;
use ztail::pipeline::{Batch, Chunk, Cursor, Entry, Position, Streams};
use ztail::stage::redact::SAMPLES;
use ztail::stage::{Pipeline, Runner};
use ztail::tail::config::SourceConfig;

const CONFIG: &str = r#"
state_dir = "/tmp/ztail-fuzz"
host_label = false
[identity]
source = "files"
cert = "c.crt"
key = "c.key"
bundle = "ca.crt"
[sink]
url = "https://loki:3100/loki/api/v1/push"
[sink.peer]
allowed_ids = ["spiffe://example.org/loki"]
[[sources]]
name = "fuzz"
include = ["/logs/*/*.log"]
path_labels = '^/logs/(?P<dir>[^/]+)/'
[[sources.stages]]
type = "decolorize"
[[sources.stages]]
type = "json"
fields = ["msg", "user", "level"]
[[sources.stages]]
type = "logfmt"
fields = ["k"]
[[sources.stages]]
type = "labels"
set = { lvl = "level", who = "user", kv = "k" }
max_values = 100000
[[sources.stages]]
type = "metadata"
set = { m = "msg", kk = "k" }
[[sources.stages]]
type = "template"
line = "{{ .Entry }} {{ .msg }}"
[[sources.stages]]
type = "redact"
"#;

fn source() -> &'static (SourceConfig, Arc<Pipeline>) {
    static SOURCE: OnceLock<(SourceConfig, Arc<Pipeline>)> = OnceLock::new();
    SOURCE.get_or_init(|| {
        let c = Config::parse(Path::new("/etc/ztail/fuzz.toml"), CONFIG).expect("a valid config");
        let src = c.sources.into_iter().next().expect("one source");
        let p = src.stages.clone().expect("stages");
        (src, p)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&[pick, place], rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let (_, secret_text, secret) = SAMPLES[pick as usize % SAMPLES.len()];
    // The filler may spell the secret out of its context (`s3cr3t` alone is no secret to any
    // rule); only the planted one, in context, must not get through.
    if memchr::memmem::find(rest, secret.as_bytes()).is_some() {
        return;
    }
    // Filler lines from the input; the secret is planted in one of them, in one of five places.
    let filler = String::from_utf8_lossy(rest).replace('\n', " ");
    let mut lines: Vec<String> = filler.split('\u{1}').map(str::to_owned).collect();
    let at = rest.first().map_or(0, |b| *b as usize % lines.len());
    let cut = lines[at]
        .char_indices()
        .map(|(i, _)| i)
        .nth(place as usize / 8)
        .unwrap_or(lines[at].len());
    let json = serde_json::to_string(secret_text).expect("a string serialises");
    // A path component cannot hold `/` or a line break: such a secret's context (a URL's
    // `://`, a PEM block's lines) would not survive in a path, so it is planted in the line.
    let place = if place % 5 == 4 && secret_text.contains(['/', '\n']) {
        place - 4
    } else {
        place
    };
    let planted = match place % 5 {
        0 => format!("{} {secret_text} {}", &lines[at][..cut], &lines[at][cut..]),
        1 => format!("{{\"msg\":{json},\"level\":\"info\"}}"),
        2 => format!("{{\"user\":{json},\"msg\":\"x\"}}"),
        3 => format!("a=1 k={json} b=2"),
        _ => lines[at].clone(),
    };
    lines[at] = planted;
    // In a path label when the place says so.
    let dir = if place % 5 == 4 {
        secret_text.replace('/', "_")
    } else {
        "d".to_owned()
    };
    let path = format!("/logs/{dir}/a.log");

    let (src, pipeline) = source();
    let streams = Streams::default();
    let bases: Vec<_> = ztail::tail::label_sets(src, Path::new(&path))
        .iter()
        .map(|s| streams.get(s, None))
        .collect();
    let metrics = Metrics::new();
    let mut runner = Runner::new(pipeline.clone(), &bases, &streams, 0, "fuzz", &metrics);
    let mut buf = Vec::new();
    let mut entries = Vec::new();
    for l in &lines {
        let start = buf.len();
        buf.extend_from_slice(l.as_bytes());
        entries.push(Entry::text(start, buf.len()));
        buf.push(b'\n');
    }
    let input_len = buf.len();
    let n = entries.len();
    let mut meta = Vec::new();
    runner.apply(&mut buf, &mut entries, &mut meta, &streams, 0);
    assert!(entries.len() <= n, "stages never add entries");
    // Bounded: a rewrite is at most the template over the line and one field, redaction
    // markers aside.
    assert!(
        buf.len() <= input_len * 8 + n * 64 + 4096,
        "output grew without bound"
    );

    let routes = runner.routes();
    let meta: Arc<[_]> = meta.into();
    let names: Arc<[String]> = src.meta_names().into();
    let cursor = Arc::new(Cursor::new(Position::default()));
    let data = bytes::Bytes::from(buf);
    let mut batch = Batch::new();
    for e in entries {
        batch.push(Chunk {
            stream: routes[e.sub as usize].clone(),
            cursor: cursor.clone(),
            data: data.clone(),
            entries: vec![e],
            meta: meta.clone(),
            meta_names: names.clone(),
            end: Position::default(),
            caught_up: false,
        });
    }
    let body = encode::protobuf_uncompressed(&batch, None);
    let escaped = secret
        .replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"");
    for needle in [secret.to_owned(), escaped] {
        assert!(
            memchr::memmem::find(&body, needle.as_bytes()).is_none(),
            "secret {needle:?} (place {}) reached the request",
            place % 5
        );
    }
});
