//! Processing stages: what happens to a source's entries between framing and batching.
//!
//! ## The seam
//! A source's [`Pipeline`] runs in each of its files' tailer tasks, on the framed entries of one
//! read, before the chunk is queued ([`Runner::apply`]). A stage may drop an entry, rewrite its
//! line, set labels, structured metadata and its tenant. It never moves a position: the chunk
//! keeps the file position the read ended at, whatever is left of its entries, so a chunk whose
//! entries were all dropped still travels the ack path and the checkpoint passes dropped lines.
//! A crash re-reads only what was not acknowledged, and the stages, being pure, decide the same
//! way again: a dropped line is never shipped later, a kept one never lost.
//!
//! Stages do no I/O and keep no state between entries except the cardinality guard of
//! `labels` and the buckets of `limit` (both per source). The common path allocates nothing
//! per line: field values, rewritten lines and metadata live in buffers reused across entries,
//! and an entry is copied into the chunk's data only when its line or metadata changed.
//!
//! ## Fail closed
//! Redaction is not positional: every `redact` stage of a source adds its rules to one
//! [`redact::Redactor`] that runs when an entry leaves the stages, over its final line, every
//! metadata value (the framing's too) and every label value (when a stream is first made).
//! No later stage can undo it and no path (a drop-free fast path, a limit, a parse failure)
//! skips it. A tenant is only ever one named in the tenant stage's map or its default.

pub mod config;
pub mod parse;
pub mod redact;
pub mod template;

pub mod dry_run;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use regex::bytes::Regex;

use crate::loki::labels::LabelSet;
use crate::metrics::Metrics;
use crate::pipeline::{Entry, Meta, Stream, Streams, lock};
use parse::Value;
use redact::Redactor;
use template::{Part, Template};

/// A field's index in its pipeline's field table.
pub type Field = u16;

/// A source's validated stages, shared by its files.
#[derive(Debug)]
pub struct Pipeline {
    /// Each stage with the number of parsers declared before it: a stage that rewrites the
    /// line first runs those of them that have not run yet (they parse the line as it was
    /// at their place).
    stages: Vec<(Stage, usize)>,
    parsers: Vec<Parser>,
    /// Field table: name and the parser producing it.
    fields: Vec<(String, usize)>,
    /// Labels set by `labels` stages.
    label_names: Vec<String>,
    /// Metadata names set by stages (after the framing's).
    meta_names: Vec<String>,
    /// Why an entry was dropped, by reason index.
    reasons: Vec<String>,
    redactor: Option<Redactor>,
    tenant: Option<TenantRule>,
    limit: Option<Limit>,
    /// Distinct values seen per stage label (the cardinality guard), shared by the files.
    seen: Mutex<Vec<HashSet<Box<[u8]>>>>,
}

#[derive(Debug)]
enum Stage {
    Drop(Cond),
    Keep(Cond),
    Labels {
        /// (label, field, metadata name for an overflowing value).
        set: Vec<(u16, Field, Option<u16>)>,
        max_values: usize,
        overflow: Option<String>,
    },
    Metadata(Vec<(u16, Field)>),
    Output(Field),
    Template(Template),
    Replace {
        re: Regex,
        with: String,
    },
    Decolorize,
    /// Where the tenant rule runs.
    Tenant,
}

#[derive(Debug)]
enum Target {
    Field(Field),
    Label(String),
}

/// A `drop`/`keep` condition: every part given must hold.
#[derive(Debug)]
struct Cond {
    line: Option<Regex>,
    target: Option<(Target, Regex)>,
    older_than: Option<i64>,
    longer_than: Option<usize>,
    reason: u16,
}

#[derive(Debug)]
enum ParserKind {
    /// The fields the source gives with each entry ([`Given`]), by their index in
    /// `declared`.
    Given,
    Json,
    Logfmt,
    Regex {
        re: Regex,
        source: Option<Field>,
    },
}

#[derive(Debug)]
struct Parser {
    kind: ParserKind,
    /// Every field the stage declares.
    declared: Vec<String>,
    /// The declared fields some later stage reads, with their ids: (index in `declared`,
    /// field). Only these are extracted.
    outputs: Vec<(usize, Field)>,
    /// JSON paths or logfmt keys of `outputs`, in the same order.
    paths: Vec<Vec<String>>,
    keys: Vec<String>,
    /// Regex capture group index of each output.
    groups: Vec<usize>,
}

impl Parser {
    fn new(kind: ParserKind, declared: Vec<String>) -> Parser {
        Parser {
            kind,
            declared,
            outputs: Vec::new(),
            paths: Vec::new(),
            keys: Vec::new(),
            groups: Vec::new(),
        }
    }
}

#[derive(Debug)]
enum TenantFrom {
    Field(Field),
    Label(String),
}

#[derive(Debug)]
struct TenantRule {
    from: TenantFrom,
    map: HashMap<Box<[u8]>, u16>,
    default: Option<u16>,
    tenants: Vec<Arc<str>>,
    reason: u16,
}

/// What a `limit` stage does with entries over the rate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitAction {
    /// Stop reading the file until the stream is under its rate again (nothing is lost).
    #[default]
    Hold,
    /// Drop the entries over the rate, counted.
    Drop,
}

#[derive(Debug)]
struct Limit {
    /// (rate per second, burst) for lines and bytes.
    lines: Option<(f64, f64)>,
    bytes: Option<(f64, f64)>,
    action: LimitAction,
    reason: u16,
    /// Token buckets by stream key, shared by the source's files.
    buckets: Mutex<HashMap<String, Bucket>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    lines: f64,
    bytes: f64,
    at: tokio::time::Instant,
}

impl Pipeline {
    fn empty() -> Pipeline {
        Pipeline {
            stages: Vec::new(),
            parsers: Vec::new(),
            fields: Vec::new(),
            label_names: Vec::new(),
            meta_names: Vec::new(),
            reasons: Vec::new(),
            redactor: None,
            tenant: None,
            limit: None,
            seen: Mutex::default(),
        }
    }

    /// The id of a field, registered on first use.
    fn field_id(&mut self, name: &str, parser: usize) -> Field {
        match self.fields.iter().position(|(n, _)| n == name) {
            Some(i) => i as Field,
            None => {
                self.fields.push((name.to_owned(), parser));
                (self.fields.len() - 1) as Field
            }
        }
    }

    /// Gives each parser the fields later stages read (nothing else is extracted).
    fn wire_parsers(&mut self, used: &HashSet<String>) {
        for parser in &mut self.parsers {
            parser.outputs.clear();
            for (j, name) in parser.declared.iter().enumerate() {
                if !used.contains(name) {
                    continue;
                }
                let Some(id) = self.fields.iter().position(|(n, _)| n == name) else {
                    continue;
                };
                parser.outputs.push((j, id as Field));
            }
            match &parser.kind {
                ParserKind::Given => {}
                ParserKind::Json => {
                    parser.paths = parser
                        .outputs
                        .iter()
                        .map(|&(j, _)| parser.declared[j].split('.').map(str::to_owned).collect())
                        .collect();
                }
                ParserKind::Logfmt => {
                    parser.keys = parser
                        .outputs
                        .iter()
                        .map(|&(j, _)| parser.declared[j].clone())
                        .collect();
                }
                ParserKind::Regex { re, .. } => {
                    parser.groups = parser
                        .outputs
                        .iter()
                        .filter_map(|&(j, _)| {
                            re.capture_names()
                                .position(|n| n == Some(parser.declared[j].as_str()))
                        })
                        .collect();
                }
            }
        }
    }

    /// Metadata names the stages set, appended to the framing's.
    /// The tenants its tenant stage may give an entry (none without one).
    pub fn tenants(&self) -> &[Arc<str>] {
        self.tenant.as_ref().map_or(&[], |t| &t.tenants)
    }

    pub fn meta_names(&self) -> &[String] {
        &self.meta_names
    }

    /// Redaction rule names, as counted in `ztail_redactions_total`.
    pub fn redaction_rules(&self) -> Vec<String> {
        self.redactor
            .as_ref()
            .map(|r| r.rule_names().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

/// A value's range in the work buffer.
type Span = (u32, u32);

/// Field values a source gives with the entries of one read (the journal's fields), for
/// stages to read like parsed fields: entry `i` has `values[starts[i]..starts[i + 1]]`, each
/// (index among the source's given field names, range in `buf`).
#[derive(Debug, Default)]
pub struct Given {
    pub buf: Vec<u8>,
    pub values: Vec<(u16, u32, u32)>,
    pub starts: Vec<u32>,
}

impl Given {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.values.clear();
        self.starts.clear();
        self.starts.push(0);
    }

    /// Ends the current entry's values.
    pub fn next_entry(&mut self) {
        self.starts.push(self.values.len() as u32);
    }

    /// Adds a value to the current entry.
    pub fn push(&mut self, field: u16, value: &[u8]) {
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(value);
        self.values.push((field, start, self.buf.len() as u32));
    }

    fn of(&self, i: usize) -> &[(u16, u32, u32)] {
        match (self.starts.get(i), self.starts.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.values[a as usize..b as usize],
            _ => &[],
        }
    }
}

/// The per-entry work area, reused across entries.
#[derive(Default)]
struct Work {
    /// Field values by field id.
    values: Vec<Option<Span>>,
    /// Parsers run for this entry (bit per parser).
    parsed: u64,
    /// Field and label values, metadata values, template output.
    buf: Vec<u8>,
    /// The line when a stage rewrote it.
    line: Vec<u8>,
    rewritten: bool,
    scratch: Vec<u8>,
    tmp: Vec<u8>,
    /// Secrets the rules found in the line as read: (rule, start, end) in `text`, then
    /// (rule, range in `secret_buf`).
    noted: Vec<(usize, usize, usize)>,
    secrets: Vec<(usize, u32, u32)>,
    secret_buf: Vec<u8>,
    labels: Vec<Option<Span>>,
    meta: Vec<(u16, Span)>,
    tenant: Option<u16>,
    /// The values the source gave with this entry, (given index, span in `buf`).
    given: Vec<(u16, Span)>,
}

impl Work {
    fn reset(&mut self, fields: usize, labels: usize) {
        self.values.clear();
        self.values.resize(fields, None);
        self.labels.clear();
        self.labels.resize(labels, None);
        self.parsed = 0;
        self.buf.clear();
        self.rewritten = false;
        self.meta.clear();
        self.tenant = None;
        self.given.clear();
    }

    fn line<'a>(&'a self, original: &'a [u8]) -> &'a [u8] {
        if self.rewritten { &self.line } else { original }
    }

    fn span(&self, s: Span) -> &[u8] {
        &self.buf[s.0 as usize..s.1 as usize]
    }

    fn set_line(&mut self, text: &[u8]) {
        self.line.clear();
        self.line.extend_from_slice(text);
        self.rewritten = true;
    }
}

/// What one entry came to.
enum Fate {
    Keep,
    Drop(u16),
}

/// The stages of one file: the pipeline, the file's streams and the work buffers.
pub struct Runner {
    pipeline: Arc<Pipeline>,
    /// Streams entries go to: the file's own first (an entry's framing `sub` indexes them),
    /// then those made for stage labels and tenants.
    routes: Vec<Arc<Stream>>,
    /// How many of `routes` are the file's own.
    base_routes: usize,
    /// A stream's place in `routes`, by its address (the `Arc`s in `routes` keep it alive).
    route_index: HashMap<usize, u16>,
    /// (framing sub, label values, tenant) → (route, labels whose value overflowed).
    route_of: HashMap<Box<[u8]>, (u16, u32)>,
    key: Vec<u8>,
    /// The last key looked up and its route.
    last_key: Vec<u8>,
    last_route: (u16, u32),
    work: Work,
    /// Index of the first stage metadata name in the chunk's `meta_names`.
    meta_base: u16,
    dropped: Vec<prometheus_client::metrics::counter::Counter>,
    redactions: Vec<prometheus_client::metrics::counter::Counter>,
    overflows: prometheus_client::metrics::counter::Counter,
    hits: Vec<u64>,
    /// Hits of a look that is repeated and counted right after.
    uncounted: Vec<u64>,
    /// Where in the read a built-in redaction rule could match ([`Redactor::screen`]).
    marks: Vec<u32>,
    drops: Vec<u64>,
    /// For `ztail try`: the reason of each entry dropped by the last `apply`, by its index.
    pub trace: Option<Vec<(usize, String)>>,
}

/// Most routes a file keeps; beyond, the route cache starts over (the streams stay).
const MAX_ROUTES: usize = 4096;

/// Most routes made within one read (below `u16::MAX`, the range of `Entry::sub`, with room
/// for a route per tenant and framing stream once it is reached).
const MAX_ROUTES_PER_READ: usize = 16_384;

impl Runner {
    /// `streams` are the file's streams, `meta_base` the number of the framing's metadata
    /// names.
    pub fn new(
        pipeline: Arc<Pipeline>,
        streams: &[Arc<Stream>],
        registry: &Streams,
        meta_base: usize,
        source: &str,
        metrics: &Metrics,
    ) -> Runner {
        let mut work = Work::default();
        // Label values of the file's own streams (path captures, file names) are redacted too.
        let routes: Vec<Arc<Stream>> = streams
            .iter()
            .map(|s| match &pipeline.redactor {
                Some(r) => {
                    let mut changed = false;
                    let mut pairs = Vec::new();
                    for (k, v) in &s.label_pairs {
                        if r.redact(v.as_bytes(), &mut work.scratch, &mut []) {
                            changed = true;
                            pairs.push((
                                k.clone(),
                                String::from_utf8_lossy(&work.scratch).into_owned(),
                            ));
                        } else {
                            pairs.push((k.clone(), v.clone()));
                        }
                    }
                    if changed {
                        registry.get(
                            &LabelSet::new(pairs.into_iter().collect()),
                            s.tenant.clone(),
                        )
                    } else {
                        s.clone()
                    }
                }
                None => s.clone(),
            })
            .collect();
        let dropped = pipeline
            .reasons
            .iter()
            .map(|r| metrics.stage_dropped(source, r))
            .collect();
        let redactions: Vec<_> = pipeline
            .redaction_rules()
            .iter()
            .map(|r| metrics.redaction(source, r))
            .collect();
        Runner {
            hits: vec![0; redactions.len()],
            uncounted: vec![0; redactions.len()],
            marks: Vec::new(),
            drops: vec![0; pipeline.reasons.len()],
            dropped,
            redactions,
            overflows: metrics.label_overflow(source),
            base_routes: routes.len(),
            route_index: routes
                .iter()
                .enumerate()
                .map(|(i, s)| (Arc::as_ptr(s) as usize, i as u16))
                .collect(),
            routes,
            route_of: HashMap::new(),
            key: Vec::new(),
            last_key: Vec::new(),
            last_route: (0, 0),
            work,
            meta_base: meta_base as u16,
            pipeline,
            trace: None,
        }
    }

    /// The streams entries' `sub` index after [`Runner::apply`].
    pub fn routes(&self) -> &[Arc<Stream>] {
        &self.routes
    }

    /// Runs the stages over the entries of one read: drops, rewrites (appended to `data`),
    /// metadata (appended to `meta`, names from `meta_base` on), and each entry's `sub` set to
    /// its route. Returns how long the file should wait before its next read (`limit` with
    /// `action = "hold"`).
    pub fn apply(
        &mut self,
        data: &mut Vec<u8>,
        entries: &mut Vec<Entry>,
        meta: &mut Vec<Meta>,
        registry: &Streams,
        now: i64,
    ) -> Duration {
        self.apply_given(data, entries, meta, registry, now, None)
    }

    /// [`Runner::apply`] for a source that gives field values with its entries.
    pub fn apply_given(
        &mut self,
        data: &mut Vec<u8>,
        entries: &mut Vec<Entry>,
        meta: &mut Vec<Meta>,
        registry: &Streams,
        now: i64,
        given: Option<&Given>,
    ) -> Duration {
        let p = self.pipeline.clone();
        let mut kept = 0;
        let mut hold = Duration::ZERO;
        let mut buckets = p.limit.as_ref().map(|l| lock(&l.buckets));
        let clock = tokio::time::Instant::now();
        let screened = match &p.redactor {
            Some(r) => r.screen(data, &mut self.marks),
            None => false,
        };
        // The route cache starts over between reads (never within one: entries already
        // routed index the table).
        if self.route_of.len() >= MAX_ROUTES || self.routes.len() >= MAX_ROUTES {
            self.route_of.clear();
            self.routes.truncate(self.base_routes);
            self.route_index
                .retain(|_, i| (*i as usize) < self.base_routes);
            self.last_key.clear();
        }
        if let Some(t) = &mut self.trace {
            t.clear();
        }
        for i in 0..entries.len() {
            let mut e = entries[i];
            self.work.reset(p.fields.len(), p.label_names.len());
            if let Some(g) = given {
                let w = &mut self.work;
                for &(field, a, b) in g.of(i) {
                    let start = w.buf.len() as u32;
                    w.buf.extend_from_slice(&g.buf[a as usize..b as usize]);
                    w.given.push((field, (start, w.buf.len() as u32)));
                }
            }
            let fate = {
                let original = &data[e.start as usize..e.end as usize];
                run_stages(&p, &mut self.work, original, &e, &self.routes, now)
            };
            if let Fate::Drop(reason) = fate {
                self.drop(i, reason);
                continue;
            }
            // Leaving the stages: redact what the entry carries, then route it.
            if let Some(r) = &p.redactor {
                let original = &data[e.start as usize..e.end as usize];
                // Screened per read: a line without a mark cannot hold a built-in's match.
                let clean_line = screened && {
                    let i = self.marks.partition_point(|&m| m < e.start);
                    self.marks.get(i).is_none_or(|&m| m >= e.end)
                };
                self.redact_entry(r, original, clean_line);
            }
            let (route, overflowed) = self.route(&p, &e, registry);
            e.sub = route;
            if overflowed != 0 {
                self.overflow_meta(&p, overflowed);
            }
            if let (Some(limit), Some(buckets)) = (&p.limit, buckets.as_mut()) {
                let len = if self.work.rewritten {
                    self.work.line.len()
                } else {
                    e.len()
                };
                let stream = &self.routes[route as usize];
                match take(limit, buckets, stream, len, clock) {
                    Ok(wait) => hold = hold.max(wait),
                    Err(()) => {
                        self.drop(i, limit.reason);
                        continue;
                    }
                }
            }
            self.write(data, meta, &mut e);
            entries[kept] = e;
            kept += 1;
        }
        entries.truncate(kept);
        drop(buckets);
        self.flush_counts();
        hold
    }

    /// Redacts the current entry: its line by the rules, and every secret the rules found in
    /// the line as read also wherever a stage copied it (a field parsed out of the line has
    /// lost the context its rule needs: `session=(?P<secret>\w+)` does not match `abc123`
    /// alone). Label and metadata values set by stages are scrubbed here; the rules run over
    /// them when a route is made and when the entry is written.
    fn redact_entry(&mut self, r: &Redactor, original: &[u8], clean_line: bool) {
        let w = &mut self.work;
        w.noted.clear();
        w.secrets.clear();
        w.secret_buf.clear();
        if clean_line {
            // Nothing to find in the line as read; a rewritten line is looked at in full.
            if w.rewritten && clean(r, w, Cleaned::Line, &mut self.hits) {
                std::mem::swap(&mut w.line, &mut w.scratch);
            }
            return;
        }
        // Unchanged, the line as read is what ships: its hits are the ones counted.
        let counted = if w.rewritten {
            &mut self.uncounted[..]
        } else {
            &mut self.hits[..]
        };
        let hit = r.redact_noting(original, &mut w.scratch, counted, &mut w.noted);
        for &(rule, a, b) in &w.noted {
            let start = w.secret_buf.len() as u32;
            w.secret_buf.extend_from_slice(&original[a..b]);
            w.secrets.push((rule, start, w.secret_buf.len() as u32));
        }
        if w.rewritten {
            if clean(r, w, Cleaned::Line, &mut self.hits) {
                std::mem::swap(&mut w.line, &mut w.scratch);
            }
        } else if hit {
            std::mem::swap(&mut w.line, &mut w.scratch);
            w.rewritten = true;
        }
        if w.secrets.is_empty() {
            return;
        }
        for j in 0..w.labels.len() {
            if let Some(s) = w.labels[j]
                && let Some(n) = scrub_span(r, w, s)
            {
                w.labels[j] = Some(n);
            }
        }
        for j in 0..w.meta.len() {
            if let Some(n) = scrub_span(r, w, w.meta[j].1) {
                w.meta[j].1 = n;
            }
        }
    }

    fn drop(&mut self, i: usize, reason: u16) {
        self.drops[reason as usize] += 1;
        if let Some(t) = &mut self.trace {
            t.push((i, self.pipeline.reasons[reason as usize].clone()));
        }
    }

    fn flush_counts(&mut self) {
        for (n, c) in self.drops.iter_mut().zip(&self.dropped) {
            if *n > 0 {
                c.inc_by(*n);
                *n = 0;
            }
        }
        for (n, c) in self.hits.iter_mut().zip(&self.redactions) {
            if *n > 0 {
                c.inc_by(*n);
                *n = 0;
            }
        }
    }

    /// The route of the current entry: its framing stream when no stage set a label or a
    /// tenant, else the stream of its base labels plus theirs.
    fn route(&mut self, p: &Pipeline, e: &Entry, registry: &Streams) -> (u16, u32) {
        let w = &self.work;
        if w.tenant.is_none() && w.labels.iter().all(Option::is_none) {
            return (e.sub, 0);
        }
        // Routes are indexed by `Entry::sub` (u16) and made within a read: past the cap, stage
        // labels overflow (their values go to metadata) and the entry keeps its tenant.
        let full = self.routes.len() >= MAX_ROUTES_PER_READ;
        self.key.clear();
        self.key.extend_from_slice(&e.sub.to_le_bytes());
        self.key
            .extend_from_slice(&w.tenant.map_or(u16::MAX, |t| t).to_le_bytes());
        self.key.push(full as u8);
        for l in &w.labels {
            match l {
                Some(_) if full => self.key.push(0),
                Some(s) => {
                    self.key.push(1);
                    self.key.extend_from_slice(w.span(*s));
                    self.key.push(0xff);
                }
                None => self.key.push(0),
            }
        }
        // Consecutive entries mostly share a route.
        if self.key == self.last_key {
            return self.last_route;
        }
        if let Some(&r) = self.route_of.get(&self.key[..]) {
            self.remember(r);
            return r;
        }
        let r = if full {
            let all = w
                .labels
                .iter()
                .enumerate()
                .filter(|(_, l)| l.is_some())
                .fold(0u32, |m, (i, _)| m | 1 << i);
            (self.new_route(p, e, registry, false).0, all)
        } else {
            self.new_route(p, e, registry, true)
        };
        self.route_of.insert(self.key.clone().into_boxed_slice(), r);
        self.remember(r);
        r
    }

    fn remember(&mut self, r: (u16, u32)) {
        self.last_key.clear();
        self.last_key.extend_from_slice(&self.key);
        self.last_route = r;
    }

    fn new_route(
        &mut self,
        p: &Pipeline,
        e: &Entry,
        registry: &Streams,
        with_labels: bool,
    ) -> (u16, u32) {
        let base = &self.routes[e.sub as usize];
        let mut pairs: std::collections::BTreeMap<String, String> =
            base.label_pairs.iter().cloned().collect();
        let mut overflowed = 0u32;
        let mut seen = lock(&p.seen);
        if seen.len() < p.label_names.len() {
            seen.resize_with(p.label_names.len(), HashSet::new);
        }
        let mut hits = vec![0u64; self.hits.len()];
        for (id, span) in self.work.labels.iter().enumerate() {
            let Some(span) = span.filter(|_| with_labels) else {
                continue;
            };
            let raw = self.work.span(span);
            let (max_values, overflow) = label_rule(p, id as u16);
            let known = seen[id].contains(raw);
            let value = if known || seen[id].len() < max_values {
                if !known {
                    seen[id].insert(raw.into());
                }
                Some(String::from_utf8_lossy(raw).into_owned())
            } else {
                overflowed |= 1 << id;
                overflow.map(str::to_owned)
            };
            if let Some(mut value) = value {
                if let Some(r) = &p.redactor
                    && r.redact(value.as_bytes(), &mut self.work.scratch, &mut hits)
                {
                    value = String::from_utf8_lossy(&self.work.scratch).into_owned();
                }
                if crate::loki::labels::validate_value(&value).is_ok() {
                    pairs.insert(p.label_names[id].clone(), value);
                }
            }
        }
        drop(seen);
        for (n, h) in self.hits.iter_mut().zip(hits) {
            *n += h;
        }
        let tenant = match self.work.tenant {
            Some(t) => p.tenant.as_ref().map(|r| r.tenants[t as usize].clone()),
            None => base.tenant.clone(),
        };
        let stream = registry.get(&LabelSet::new(pairs), tenant);
        let key = Arc::as_ptr(&stream) as usize;
        let idx = match self.route_index.get(&key) {
            Some(&i) => i,
            None => {
                self.routes.push(stream);
                let i = (self.routes.len() - 1) as u16;
                self.route_index.insert(key, i);
                i
            }
        };
        (idx, overflowed)
    }

    /// Moves the values of overflowing labels to metadata (named like the label), unless the
    /// label's stage replaces them with a fixed value.
    fn overflow_meta(&mut self, p: &Pipeline, overflowed: u32) {
        for (stage, _) in &p.stages {
            if let Stage::Labels { set, .. } = stage {
                for (label, _, meta) in set {
                    if overflowed & (1 << label) != 0 {
                        self.overflows.inc();
                        if let (Some(m), Some(s)) = (meta, self.work.labels[*label as usize]) {
                            self.work.meta.push((*m, s));
                        }
                    }
                }
            }
        }
    }

    /// Writes the entry's rewritten line and its metadata into the chunk.
    fn write(&mut self, data: &mut Vec<u8>, meta: &mut Vec<Meta>, e: &mut Entry) {
        let w = &mut self.work;
        if w.rewritten {
            e.start = data.len() as u32;
            data.extend_from_slice(&w.line);
            e.end = data.len() as u32;
        }
        let redactor = self.pipeline.redactor.as_ref();
        // The framing's metadata values are redacted like the stages'.
        let mut framing_changed = false;
        if let Some(r) = redactor {
            let range = e.meta_start as usize..e.meta_start as usize + e.meta_len as usize;
            for m in &meta[range] {
                let v = &data[m.start as usize..m.end as usize];
                if clean(r, w, Cleaned::Text(v), &mut self.uncounted) {
                    framing_changed = true;
                    break;
                }
            }
        }
        if w.meta.is_empty() && !framing_changed {
            return;
        }
        let start = meta.len();
        for j in 0..e.meta_len as usize {
            let m = meta[e.meta_start as usize + j];
            meta.push(m);
        }
        for &(name, span) in &w.meta {
            let begin = data.len() as u32;
            data.extend_from_slice(&w.buf[span.0 as usize..span.1 as usize]);
            meta.push(Meta {
                name: (self.meta_base + name) as u8,
                start: begin,
                end: data.len() as u32,
            });
        }
        if let Some(r) = redactor {
            for m in &mut meta[start..] {
                let v = &data[m.start as usize..m.end as usize];
                if clean(r, w, Cleaned::Text(v), &mut self.hits) {
                    m.start = data.len() as u32;
                    data.extend_from_slice(&w.scratch);
                    m.end = data.len() as u32;
                }
            }
        }
        e.meta_start = start as u32;
        e.meta_len = (meta.len() - start) as u16;
    }
}

/// What [`clean`] reads.
enum Cleaned<'a> {
    /// The work area's line.
    Line,
    Text(&'a [u8]),
}

/// Redacts a value by the rules and scrubs the entry's noted secrets from it. True when it
/// changed; the result is then in `w.scratch`.
fn clean(r: &Redactor, w: &mut Work, value: Cleaned, hits: &mut [u64]) -> bool {
    let mut tmp = std::mem::take(&mut w.tmp);
    let text: &[u8] = match value {
        Cleaned::Line => &w.line,
        Cleaned::Text(t) => t,
    };
    let ruled = r.redact(text, &mut tmp, hits);
    let src: &[u8] = if ruled { &tmp } else { text };
    let changed = if scrub(r, &w.secrets, &w.secret_buf, src, &mut w.scratch) {
        true
    } else if ruled {
        std::mem::swap(&mut w.scratch, &mut tmp);
        true
    } else {
        false
    };
    w.tmp = tmp;
    changed
}

/// Scrubs the entry's noted secrets from a value in the work buffer; its new span if it
/// changed.
fn scrub_span(r: &Redactor, w: &mut Work, s: Span) -> Option<Span> {
    let value = &w.buf[s.0 as usize..s.1 as usize];
    if !scrub(r, &w.secrets, &w.secret_buf, value, &mut w.scratch) {
        return None;
    }
    let start = w.buf.len() as u32;
    w.buf.extend_from_slice(&w.scratch);
    Some((start, w.buf.len() as u32))
}

/// Replaces every occurrence of the noted secrets (at least [`MIN_SCRUBBED`] bytes) in
/// `text` by its rule's marker; true (result in `out`) when one occurred.
fn scrub(
    r: &Redactor,
    secrets: &[(usize, u32, u32)],
    secret_buf: &[u8],
    text: &[u8],
    out: &mut Vec<u8>,
) -> bool {
    let mut first = None;
    for (j, &(_, a, b)) in secrets.iter().enumerate() {
        let secret = &secret_buf[a as usize..b as usize];
        if secret.len() >= MIN_SCRUBBED
            && let Some(at) = memchr::memmem::find(text, secret)
            && first.is_none_or(|(_, f)| at < f)
        {
            first = Some((j, at));
        }
    }
    let Some(_) = first else {
        // A secret too short to look for inside values still replaces a value that is
        // exactly it (a field parsed out of `pin=123` is `123`).
        for &(rule, a, b) in secrets {
            if text == &secret_buf[a as usize..b as usize] && !text.is_empty() {
                out.clear();
                out.extend_from_slice(r.marker(rule));
                return true;
            }
        }
        return false;
    };
    out.clear();
    let mut at = 0;
    'scan: while at < text.len() {
        for &(rule, a, b) in secrets {
            let secret = &secret_buf[a as usize..b as usize];
            if secret.len() >= MIN_SCRUBBED && text[at..].starts_with(secret) {
                out.extend_from_slice(r.marker(rule));
                at += secret.len();
                continue 'scan;
            }
        }
        out.push(text[at]);
        at += 1;
    }
    true
}

/// Secrets shorter than this are not scrubbed from derived values (a one-letter match would
/// blank every occurrence of the letter).
const MIN_SCRUBBED: usize = 4;

fn label_rule(p: &Pipeline, id: u16) -> (usize, Option<&str>) {
    for (stage, _) in &p.stages {
        if let Stage::Labels {
            set,
            max_values,
            overflow,
        } = stage
            && set.iter().any(|(l, _, _)| *l == id)
        {
            return (*max_values, overflow.as_deref());
        }
    }
    (usize::MAX, None)
}

/// Takes an entry's tokens from its stream's bucket: `Ok(wait)` to keep it (a non-zero wait
/// when holding put the bucket in debt), `Err` to drop it.
fn take(
    limit: &Limit,
    buckets: &mut HashMap<String, Bucket>,
    stream: &Stream,
    len: usize,
    now: tokio::time::Instant,
) -> Result<Duration, ()> {
    let b = match buckets.get_mut(&stream.key) {
        Some(b) => b,
        None => buckets.entry(stream.key.clone()).or_insert(Bucket {
            lines: limit.lines.map_or(0.0, |l| l.1),
            bytes: limit.bytes.map_or(0.0, |b| b.1),
            at: now,
        }),
    };
    let secs = now.saturating_duration_since(b.at).as_secs_f64();
    b.at = now;
    if let Some((rate, burst)) = limit.lines {
        b.lines = (b.lines + rate * secs).min(burst);
    }
    if let Some((rate, burst)) = limit.bytes {
        b.bytes = (b.bytes + rate * secs).min(burst);
    }
    let lines_ok = limit.lines.is_none() || b.lines >= 1.0;
    let bytes_ok = limit.bytes.is_none() || b.bytes >= len as f64;
    if limit.action == LimitAction::Drop && !(lines_ok && bytes_ok) {
        return Err(());
    }
    let mut wait: f64 = 0.0;
    if let Some((rate, _)) = limit.lines {
        b.lines -= 1.0;
        wait = wait.max(-b.lines / rate);
    }
    if let Some((rate, _)) = limit.bytes {
        b.bytes -= len as f64;
        wait = wait.max(-b.bytes / rate);
    }
    Ok(Duration::try_from_secs_f64(wait.max(0.0)).unwrap_or(Duration::MAX))
}

/// Runs every stage over one entry.
fn run_stages(
    p: &Pipeline,
    w: &mut Work,
    original: &[u8],
    e: &Entry,
    routes: &[Arc<Stream>],
    now: i64,
) -> Fate {
    for (stage, before) in &p.stages {
        let before = *before;
        match stage {
            Stage::Drop(c) => {
                if holds(p, w, original, e, routes, c, now) {
                    return Fate::Drop(c.reason);
                }
            }
            Stage::Keep(c) => {
                if !holds(p, w, original, e, routes, c, now) {
                    return Fate::Drop(c.reason);
                }
            }
            Stage::Labels { set, .. } => {
                for &(label, field, _) in set {
                    if let Some(s) = get(p, w, original, field) {
                        w.labels[label as usize] = Some(s);
                    }
                }
            }
            Stage::Metadata(set) => {
                for &(name, field) in set {
                    if let Some(s) = get(p, w, original, field) {
                        w.meta.push((name, s));
                    }
                }
            }
            Stage::Output(field) => {
                if let Some(s) = get(p, w, original, *field) {
                    settle(p, w, original, before);
                    let (a, b) = (s.0 as usize, s.1 as usize);
                    w.line.clear();
                    w.line.extend_from_slice(&w.buf[a..b]);
                    w.rewritten = true;
                }
            }
            Stage::Template(t) => {
                let mut out = std::mem::take(&mut w.scratch);
                out.clear();
                for part in &t.parts {
                    match part {
                        Part::Text(s) => out.extend_from_slice(s.as_bytes()),
                        Part::Line => out.extend_from_slice(w.line(original)),
                        Part::Field(f) => {
                            if let Some(s) = get(p, w, original, *f) {
                                out.extend_from_slice(w.span(s));
                            }
                        }
                    }
                }
                settle(p, w, original, before);
                std::mem::swap(&mut w.line, &mut out);
                w.scratch = out;
                w.rewritten = true;
            }
            Stage::Replace { re, with } => {
                let replaced = match re.replace_all(w.line(original), with.as_bytes()) {
                    std::borrow::Cow::Borrowed(_) => None,
                    std::borrow::Cow::Owned(o) => Some(o),
                };
                if let Some(o) = replaced {
                    settle(p, w, original, before);
                    w.set_line(&o);
                }
            }
            Stage::Decolorize => {
                let mut out = std::mem::take(&mut w.scratch);
                if parse::strip_ansi(w.line(original), &mut out) {
                    settle(p, w, original, before);
                    std::mem::swap(&mut w.line, &mut out);
                    w.rewritten = true;
                }
                w.scratch = out;
            }
            Stage::Tenant => {
                let Some(rule) = &p.tenant else { continue };
                let mapped = match &rule.from {
                    TenantFrom::Field(f) => {
                        get(p, w, original, *f).and_then(|s| rule.map.get(w.span(s)).copied())
                    }
                    TenantFrom::Label(l) => {
                        label_value(p, w, e, routes, l).and_then(|v| rule.map.get(v).copied())
                    }
                };
                match mapped.or(rule.default) {
                    Some(t) => w.tenant = Some(t),
                    None => return Fate::Drop(rule.reason),
                }
            }
        }
    }
    Fate::Keep
}

/// Runs the parsers that have not run yet, before a stage rewrites the line they read.
fn settle(p: &Pipeline, w: &mut Work, original: &[u8], before: usize) {
    for i in 0..before {
        if w.parsed & (1 << i) == 0 && !p.parsers[i].outputs.is_empty() {
            run_parser(p, w, original, i);
        }
    }
}

/// A field's value, running its parser on first use.
fn get(p: &Pipeline, w: &mut Work, original: &[u8], field: Field) -> Option<Span> {
    let parser = p.fields[field as usize].1;
    if w.parsed & (1 << parser) == 0 {
        run_parser(p, w, original, parser);
    }
    w.values[field as usize]
}

fn run_parser(p: &Pipeline, w: &mut Work, original: &[u8], i: usize) {
    w.parsed |= 1 << i;
    let parser = &p.parsers[i];
    if let ParserKind::Given = parser.kind {
        for &(j, field) in &parser.outputs {
            if let Some(&(_, span)) = w.given.iter().find(|(g, _)| *g as usize == j) {
                w.values[field as usize] = Some(span);
            }
        }
        return;
    }
    // A regex stage may read a field (whose own parser runs first) instead of the line.
    let from_field = match &parser.kind {
        ParserKind::Regex {
            source: Some(f), ..
        } => match get(p, w, original, *f) {
            Some(s) => Some(s),
            None => return,
        },
        _ => None,
    };
    let mut src = std::mem::take(&mut w.scratch);
    let text: &[u8] = match from_field {
        Some((a, b)) => {
            src.clear();
            src.extend_from_slice(&w.buf[a as usize..b as usize]);
            &src
        }
        None if w.rewritten => &w.line,
        None => original,
    };
    let (values, buf) = (&mut w.values, &mut w.buf);
    let mut put = |j: usize, v: Value| {
        let start = buf.len() as u32;
        v.write_to(buf);
        values[parser.outputs[j].1 as usize] = Some((start, buf.len() as u32));
    };
    match &parser.kind {
        ParserKind::Json => {
            parse::json_fields(text, &parser.paths, put);
        }
        ParserKind::Given => {}
        ParserKind::Logfmt => parse::logfmt_fields(text, &parser.keys, put),
        ParserKind::Regex { re, .. } => {
            if let Some(caps) = re.captures(text) {
                for (j, &g) in parser.groups.iter().enumerate() {
                    if let Some(m) = caps.get(g) {
                        put(j, Value::Plain(m.as_bytes()));
                    }
                }
            }
        }
    }
    w.scratch = src;
}

/// A label's value for a condition or the tenant: set by a stage, else the entry's stream's.
fn label_value<'a>(
    p: &Pipeline,
    w: &'a Work,
    e: &Entry,
    routes: &'a [Arc<Stream>],
    name: &str,
) -> Option<&'a [u8]> {
    if let Some(id) = p.label_names.iter().position(|l| l == name)
        && let Some(s) = w.labels[id]
    {
        return Some(w.span(s));
    }
    routes
        .get(e.sub as usize)?
        .label_pairs
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_bytes())
}

fn holds(
    p: &Pipeline,
    w: &mut Work,
    original: &[u8],
    e: &Entry,
    routes: &[Arc<Stream>],
    c: &Cond,
    now: i64,
) -> bool {
    if let Some(n) = c.longer_than
        && w.line(original).len() <= n
    {
        return false;
    }
    if let Some(age) = c.older_than {
        // An entry without a timestamp of its own is stamped with the read time: never old.
        if e.ts == 0 || e.ts >= now.saturating_sub(age) {
            return false;
        }
    }
    if let Some(re) = &c.line
        && !re.is_match(w.line(original))
    {
        return false;
    }
    if let Some((target, re)) = &c.target {
        let value = match target {
            Target::Field(f) => get(p, w, original, *f).map(|s| w.span(s)),
            Target::Label(l) => label_value(p, w, e, routes, l),
        };
        match value {
            Some(v) if re.is_match(v) => {}
            _ => return false,
        }
    }
    true
}

/// A pipeline from `[[sources.stages]]` tables (TOML), for tests elsewhere in the crate.
#[cfg(test)]
pub(crate) fn test_pipeline(stages: &str) -> Arc<Pipeline> {
    let text = format!(
        "state_dir = \"/tmp/s\"\n[identity]\nsource = \"files\"\ncert = \"c\"\nkey = \"k\"\nbundle = \"b\"\n[sink]\nurl = \"https://l/\"\n[sink.peer]\nallowed_ids = [\"spiffe://x/l\"]\n[[sources]]\nname = \"t\"\ninclude = [\"/t/*\"]\n{stages}"
    );
    crate::config::Config::parse(std::path::Path::new("/t.toml"), &text)
        .unwrap_or_else(|e| panic!("{e}"))
        .sources
        .remove(0)
        .stages
        .expect("stages")
}

#[cfg(test)]
mod tests;
