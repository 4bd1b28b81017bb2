//! Model-based tests of the whole tailer: discovery, rotation, deletion, restarts and crashes,
//! with real files and inotify, in process. Each case runs random actions: writes (whole lines
//! and lines split across writes), rename rotation (also to a name outside the glob, followed
//! at once by a restart or a crash), copytruncate of a drained file, deletion of
//! a drained rotated or active file, re-creation, graceful restarts and crashes (the runtime is
//! dropped mid-flight, so no final checkpoint is written). The sink stores and acknowledges
//! every chunk at once or a little later (a crash loses the acknowledgements in flight). At the
//! end every line written must have arrived whole; without a crash, exactly once and in order;
//! with crashes, each file rewinds at most once per crash.
//!
//! Two cases in three run the source with stages: a `drop` of the lines whose number ends in
//! a random set of digits, and in one of those a `template` that rewrites every kept line.
//! Then a dropped line must never arrive (not even after a crash), every kept line arrives
//! rewritten, and the checkpoints pass dropped lines (else a restart would send kept ones
//! twice).
//!
//! `ZTAIL_TAILER_CASES=10000 ZTAIL_TAILER_JOBS=16 cargo test --lib tailer_model` runs the long
//! mode (cases mostly sleep, so they run 16 at a time); each case prints its seed on failure,
//! and `ZTAIL_TAILER_SEED=<n>[,<n>...]` replays them.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::Tailer;
use super::checkpoint::StateDir;
use super::format::Framing;
use crate::loki::labels::LabelSet;
use crate::metrics::Metrics;
use crate::pipeline::ack::AckTracker;
use crate::pipeline::{Batch, Chunk};
use crate::tail::config::{SourceConfig, StartAt, TailConfig};

/// Lines stored by the sink, with the order in which their chunks were read (a counter over
/// all instances): Loki orders a stream by timestamp, which follows read order.
type Received = Arc<Mutex<Vec<(u64, String)>>>;

static READ_ORDER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// copytruncates done by all cases, to show the generator reaches them.
static COPYTRUNCATES: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Rotations to a name outside the glob, each followed at once by a restart or a crash.
static ROTATED_OUTSIDE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The distinct lines stored so far.
fn arrived(received: &Received) -> HashSet<String> {
    received
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.1.clone())
        .collect()
}

/// One ztail "process": its own runtime, so a crash can drop everything at once.
struct Instance {
    rt: tokio::runtime::Runtime,
    cancel: CancellationToken,
    run: tokio::task::JoinHandle<()>,
    checkpoints: tokio::task::JoinHandle<()>,
    sink: tokio::task::JoinHandle<()>,
}

/// The stages a case runs, and what they do to a line.
#[derive(Clone, Default)]
struct Stages {
    /// Lines whose number ends in one of these digits are dropped.
    drop_digits: String,
    /// Kept lines become `<line>`.
    wrap: bool,
}

impl Stages {
    fn of_seed(seed: u64) -> Stages {
        let mut rng = fastrand::Rng::with_seed(seed ^ 0x57a6e);
        match seed % 3 {
            0 => Stages::default(),
            mode => Stages {
                drop_digits: (0..rng.usize(1..4))
                    .map(|_| char::from(b'0' + rng.u8(0..10)))
                    .collect(),
                wrap: mode == 2,
            },
        }
    }

    fn pipeline(&self) -> Option<Arc<crate::stage::Pipeline>> {
        if self.drop_digits.is_empty() {
            return None;
        }
        let mut toml = format!(
            "[[sources.stages]]\ntype = \"drop\"\nline = 'n\\d{{5}}[{}]$'\nreason = \"model\"\n",
            self.drop_digits
        );
        if self.wrap {
            toml.push_str("[[sources.stages]]\ntype = \"template\"\nline = \"<{{ .Entry }}>\"\n");
        }
        Some(crate::stage::test_pipeline(&toml))
    }

    /// What a written line arrives as, or `None` when it is dropped.
    fn ships(&self, line: &str) -> Option<String> {
        if line.ends_with(|c| self.drop_digits.contains(c)) {
            return None;
        }
        Some(if self.wrap {
            format!("<{line}>")
        } else {
            line.to_owned()
        })
    }
}

/// A raw source over `dir/app.log*` (the rotation tests use it too).
pub(super) fn source(dir: &Path) -> SourceConfig {
    SourceConfig {
        name: "model".into(),
        include: vec![format!("{}/app.log*", dir.display())],
        exclude: globset::GlobSet::empty(),
        start_at: StartAt::Beginning,
        labels: LabelSet::default(),
        partial_line_timeout: Duration::from_secs(30),
        rotate_wait: Duration::from_millis(200),
        framing: Arc::new(Framing::raw(1 << 16)),
        path_labels: None,
        follow_symlinks_under: Vec::new(),
        stages: None,
        kubernetes: false,
        formats: Vec::new(),
        journal: None,
        sinks: Vec::new(),
    }
}

fn start(dir: &Path, state: &Path, received: &Received, seed: u64) -> Instance {
    let mut src = source(dir);
    src.stages = Stages::of_seed(seed).pipeline();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // A crashed instance's lock goes away with its last task; wait for it.
    let deadline = Instant::now() + Duration::from_secs(10);
    let state_dir = loop {
        match StateDir::open(state) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => panic!("seed {seed}: state dir: {e:#}"),
        }
    };
    let cancel = CancellationToken::new();
    let tailer = Tailer::new(
        vec![src],
        TailConfig {
            rescan_interval: Duration::from_millis(100),
            checkpoint_interval: Duration::from_millis(30),
            read_buffer: 64 + (seed as usize % 512),
            max_rotated_hold: None,
        },
        Arc::new(state_dir),
        Arc::new(Metrics::new()),
        cancel.clone(),
        None,
        super::Lane::default(),
    );
    let (tx, mut rx) = mpsc::channel::<Chunk>(8);
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let run = rt.spawn(tailer.clone().run(tx));
    let checkpoints = rt.spawn(tailer.clone().checkpoint_loop(async {
        let _ = done_rx.await;
    }));
    let received = received.clone();
    let sink = rt.spawn(async move {
        let tracker = Arc::new(AckTracker::default());
        let mut rng = fastrand::Rng::with_seed(seed);
        // Deliveries answered later, waited for at a graceful stop as the real sink drains.
        let in_flight = tokio_util::task::TaskTracker::new();
        while let Some(chunk) = rx.recv().await {
            // Loki stores the lines when it answers: a crash before the answer loses the
            // request (ztail must send it again), never the lines.
            let order = READ_ORDER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let lines: Vec<(u64, String)> = (0..chunk.entries.len())
                .map(|i| (order, String::from_utf8_lossy(chunk.line(i)).into_owned()))
                .collect();
            let mut batch = Batch::new();
            batch.push(chunk);
            let seq = tracker.register(batch.positions());
            let store = {
                let (tracker, received) = (tracker.clone(), received.clone());
                move || {
                    received.lock().unwrap().extend(lines);
                    tracker.ack(seq);
                }
            };
            if rng.bool() {
                store();
            } else {
                let delay = Duration::from_millis(rng.u64(1..40));
                in_flight.spawn(async move {
                    tokio::time::sleep(delay).await;
                    store();
                });
            }
        }
        // Acknowledgements still in flight land before the final checkpoint. (A fixed 60 ms
        // wait here let a loaded machine checkpoint first: 24 duplicates without a crash in one
        // long-mode case, a flaw of the model, not of ztail.)
        in_flight.close();
        in_flight.wait().await;
        let _ = done_tx.send(());
    });
    Instance {
        rt,
        cancel,
        run,
        checkpoints,
        sink,
    }
}

impl Instance {
    /// SIGTERM: stop reading, let the sink drain, write the final checkpoint.
    fn stop(self) {
        self.cancel.cancel();
        self.rt.block_on(async {
            let _ = self.run.await;
            let _ = self.sink.await;
            let _ = self.checkpoints.await;
        });
        self.rt.shutdown_timeout(Duration::from_secs(5));
    }

    /// SIGKILL: everything stops where it is.
    fn kill(self) {
        self.rt.shutdown_background();
    }
}

/// What was written, per file generation (`gen`), in order.
struct Writer {
    dir: PathBuf,
    next: u64,
    generation: u64,
    rotated: u32,
    /// Generation of each rotated file `app.log.N`.
    rotated_gens: HashMap<u32, u64>,
    /// A line written without its newline yet.
    partial: Option<String>,
    written: HashMap<u64, Vec<String>>,
    /// What the case did, for the failure message.
    log: Vec<String>,
    started: Instant,
    stages: Stages,
}

impl Writer {
    fn note(&mut self, what: impl std::fmt::Display) {
        let at = self.started.elapsed().as_millis();
        self.log.push(format!("{at:>6} ms  {what}"));
    }

    /// The actions so far, one per line.
    fn trace(&self) -> String {
        self.log.join("\n")
    }

    fn line(&mut self) -> String {
        self.next += 1;
        format!("g{} n{:06}", self.generation, self.next)
    }

    fn append(&mut self, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("app.log"))
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn write_lines(&mut self, n: usize) {
        let mut text = String::new();
        if let Some(p) = self.partial.take() {
            text.push_str(&p[p.len() / 2..]);
            text.push('\n');
            self.written.entry(self.generation).or_default().push(p);
        }
        for _ in 0..n {
            let l = self.line();
            text.push_str(&l);
            text.push('\n');
            self.written.entry(self.generation).or_default().push(l);
        }
        self.append(&text);
        self.note(format!(
            "write up to g{} n{:06} ({} bytes)",
            self.generation,
            self.next,
            text.len()
        ));
    }

    fn write_partial(&mut self) {
        if self.partial.is_some() {
            return;
        }
        let l = self.line();
        self.append(&l[..l.len() / 2]);
        self.note(format!("write half of {l}"));
        self.partial = Some(l);
    }

    /// Rename rotation: the current file becomes `app.log.N` (still matched and followed); the
    /// next write creates a new generation.
    fn rotate(&mut self) {
        if self.partial.is_some() {
            self.write_lines(0);
        }
        if !self.dir.join("app.log").exists() {
            return;
        }
        self.rotated += 1;
        std::fs::rename(
            self.dir.join("app.log"),
            self.dir.join(format!("app.log.{}", self.rotated)),
        )
        .unwrap();
        self.rotated_gens.insert(self.rotated, self.generation);
        self.note(format!(
            "rotate g{} to app.log.{}",
            self.generation, self.rotated
        ));
        self.generation += 1;
    }

    /// Rename rotation to a name outside the glob (the kubelet's `0.log.<timestamp>`): the
    /// file is only found again through its checkpoint after a restart or crash.
    /// Only once a persisted checkpoint names the file as it is now (its inode, and the hash of
    /// its first bytes): a file ztail never saw, or saw only before a copytruncate gave its
    /// inode new content, cannot be confirmed and is not read outside the glob. In life a file
    /// sits at its path for a while before it is rotated.
    fn rotate_outside(&mut self, state: &Path) {
        if self.partial.is_some() {
            self.write_lines(0);
        }
        let active = self.dir.join("app.log");
        let Ok(meta) = std::fs::metadata(&active) else {
            return;
        };
        let ino = std::os::unix::fs::MetadataExt::ino(&meta);
        let known = || -> bool {
            let text = std::fs::read_to_string(state.join("checkpoints.jsonl")).unwrap_or_default();
            text.lines()
                .filter_map(super::checkpoint::parse_line)
                .any(|e| {
                    e.ino == ino
                        && std::fs::File::open(&active)
                            .and_then(|f| super::reader::read_head(&f, e.head_len as usize))
                            .is_ok_and(|head| {
                                head.len() == e.head_len as usize
                                    && super::reader::hash(&head) == e.head_hash
                                    && e.head_len > 0
                            })
                })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !known() {
            if Instant::now() > deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.rotated += 1;
        let name = format!("rotated-{}", self.rotated);
        std::fs::rename(self.dir.join("app.log"), self.dir.join(&name)).unwrap();
        self.note(format!(
            "rotate g{} to {name} (outside the glob)",
            self.generation
        ));
        ROTATED_OUTSIDE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.generation += 1;
    }

    /// copytruncate (logrotate's): copy the file out of the glob's reach, then truncate it in
    /// place; the next lines are a new generation in the same file. Only once the file is
    /// drained: lines written before the truncation and not yet read are lost by design (they
    /// are in the copy), which is why ztail's docs prefer rename rotation.
    fn copytruncate(&mut self, received: &Received) {
        if self.partial.is_some() {
            self.write_lines(0);
        }
        let active = self.dir.join("app.log");
        if !active.exists() {
            return;
        }
        // logrotate runs when it runs; here it waits until ztail has caught up.
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.drained(self.generation, received) {
            if Instant::now() > deadline {
                return; // the final check reports what never arrived
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.rotated += 1;
        let copies = self.dir.with_file_name("copies");
        std::fs::create_dir_all(&copies).unwrap();
        std::fs::copy(&active, copies.join(format!("app.log.{}", self.rotated))).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&active)
            .unwrap()
            .set_len(0)
            .unwrap();
        self.note(format!("copytruncate g{}", self.generation));
        COPYTRUNCATES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.generation += 1;
    }

    /// True once every line of `generation` has arrived (the file may then be deleted without
    /// loss, as a real rotation scheme deletes only long-drained files).
    fn drained(&self, generation: u64, received: &Received) -> bool {
        let got = arrived(received);
        self.written.get(&generation).is_none_or(|lines| {
            lines
                .iter()
                .filter_map(|l| self.stages.ships(l))
                .all(|l| got.contains(&l))
        })
    }
}

fn run_case(seed: u64) -> usize {
    let mut rng = fastrand::Rng::with_seed(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("logs");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&dir).unwrap();
    let received: Received = Arc::default();
    let mut w = Writer {
        dir: dir.clone(),
        next: 0,
        generation: 0,
        rotated: 0,
        rotated_gens: HashMap::new(),
        partial: None,
        written: HashMap::new(),
        log: Vec::new(),
        started: Instant::now(),
        stages: Stages::of_seed(seed),
    };
    let mut inst = Some(start(&dir, &state, &received, seed));
    let mut crashes = 0;
    for _ in 0..rng.usize(5..25) {
        match rng.u8(0..24) {
            0..=8 => w.write_lines(rng.usize(1..200)),
            9 | 10 => w.write_partial(),
            11 | 12 => w.rotate(),
            13 => {
                // Delete the oldest rotated file once drained.
                let oldest = (1..=w.rotated).find(|n| dir.join(format!("app.log.{n}")).exists());
                if let Some(n) = oldest
                    && w.drained(w.rotated_gens[&n], &received)
                {
                    std::fs::remove_file(dir.join(format!("app.log.{n}"))).unwrap();
                    w.note(format!("delete app.log.{n}"));
                }
            }
            // Delete the active file once drained; the next write re-creates it.
            19 if w.partial.is_none()
                && dir.join("app.log").exists()
                && w.drained(w.generation, &received) =>
            {
                std::fs::remove_file(dir.join("app.log")).unwrap();
                w.note(format!("delete app.log (g{})", w.generation));
                w.generation += 1;
            }
            20 | 21 => w.copytruncate(&received),
            // Rotated outside the glob, then at once a restart or a crash: what was not yet
            // read or acknowledged is found again through its checkpoint.
            22 => {
                w.rotate_outside(&state);
                inst.take().unwrap().stop();
                w.note("restart");
                inst = Some(start(&dir, &state, &received, seed));
            }
            23 => {
                w.rotate_outside(&state);
                std::thread::sleep(Duration::from_millis(rng.u64(0..40)));
                inst.take().unwrap().kill();
                crashes += 1;
                w.note("crash");
                inst = Some(start(&dir, &state, &received, seed));
            }
            14 | 15 => {
                inst.take().unwrap().stop();
                w.note("restart");
                inst = Some(start(&dir, &state, &received, seed));
            }
            16 | 17 => {
                inst.take().unwrap().kill();
                crashes += 1;
                w.note("crash");
                inst = Some(start(&dir, &state, &received, seed));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(rng.u64(0..60)));
    }
    w.write_lines(1);

    // Every line arrives (every line the stages keep, as they rewrite it).
    let want: HashSet<String> = w
        .written
        .values()
        .flatten()
        .filter_map(|l| w.stages.ships(l))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = arrived(&received);
        let missing: Vec<&String> = want.iter().filter(|l| !got.contains(*l)).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "seed {seed}: {} lines never arrived, e.g. {:?}; the case did:\n{}\nfiles now:\n{}checkpoints now:\n{}",
            missing.len(),
            &missing[..missing.len().min(3)],
            w.trace(),
            listing(&dir),
            std::fs::read_to_string(state.join("checkpoints.jsonl")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(100));
    inst.take().unwrap().stop();
    let mut got = received.lock().unwrap().clone();
    got.sort_by_key(|r| r.0);
    let got: Vec<String> = got.into_iter().map(|r| r.1).collect();
    for l in &got {
        assert!(
            want.contains(l),
            "seed {seed}: {l:?} was never written whole or was dropped by the stages ({:?}); the case did:\n{}",
            w.stages.drop_digits,
            w.trace()
        );
    }
    if crashes == 0 {
        assert_eq!(
            got.len(),
            want.len(),
            "seed {seed}: duplicates without a crash; the case did:\n{}",
            w.trace()
        );
    }
    // In order per file generation. Without a crash, exactly the written sequence. A crash
    // may lose acknowledgements of requests Loki stored, so the file rewinds to its last
    // checkpoint: at most one rewind per crash, and every line still arrives.
    for (generation, lines) in &w.written {
        let lines: Vec<String> = lines.iter().filter_map(|l| w.stages.ships(l)).collect();
        let prefix = match w.stages.wrap {
            true => format!("<g{generation} "),
            false => format!("g{generation} "),
        };
        let arrived: Vec<&String> = got.iter().filter(|l| l.starts_with(&prefix)).collect();
        if crashes == 0 {
            let want: Vec<&String> = lines.iter().collect();
            assert!(
                arrived == want,
                "seed {seed}: generation {generation} out of order ({} lines); the case did:\n{}",
                arrived.len(),
                w.trace()
            );
        } else {
            let rewinds = arrived.windows(2).filter(|p| p[1] <= p[0]).count();
            assert!(
                rewinds <= crashes,
                "seed {seed}: generation {generation} rewound {rewinds} times for {crashes} crashes; the case did:\n{}",
                w.trace()
            );
        }
    }
    crashes
}

/// Each file of `dir` with its inode, size and first line, for a failure message.
fn listing(dir: &Path) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let meta = e.metadata().unwrap();
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        out.push_str(&format!(
            "  {:?} ino {} size {} first {:?} last {:?}\n",
            e.file_name(),
            std::os::unix::fs::MetadataExt::ino(&meta),
            meta.len(),
            text.lines().next().unwrap_or(""),
            text.lines().last().unwrap_or("")
        ));
    }
    out
}

fn seeds() -> Vec<u64> {
    if let Ok(list) = std::env::var("ZTAIL_TAILER_SEED") {
        return list
            .split(',')
            .map(|s| {
                s.trim()
                    .parse()
                    .expect("ZTAIL_TAILER_SEED: seeds separated by commas")
            })
            .collect();
    }
    let n = std::env::var("ZTAIL_TAILER_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    (0..n).collect()
}

#[test]
fn tailer_model_rotation_deletion_restarts_and_crashes_lose_nothing() {
    // Cases mostly sleep; the long mode runs ZTAIL_TAILER_JOBS of them at once.
    let jobs: usize = std::env::var("ZTAIL_TAILER_JOBS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
        .max(1);
    let seeds = seeds();
    let next = std::sync::atomic::AtomicUsize::new(0);
    // A failing case does not stop the others: the long mode reports every failing seed.
    let failed = Mutex::new(Vec::new());
    let crashes: usize = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..jobs)
            .map(|_| {
                scope.spawn(|| {
                    let mut crashes = 0;
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(&seed) = seeds.get(i) else { break };
                        match std::panic::catch_unwind(|| run_case(seed)) {
                            Ok(n) => crashes += n,
                            Err(_) => failed.lock().unwrap().push(seed),
                        }
                    }
                    crashes
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).sum()
    });
    let failed = failed.into_inner().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} cases failed (seeds {failed:?}); each printed what it did above",
        failed.len(),
        seeds.len()
    );
    let copytruncates = COPYTRUNCATES.load(std::sync::atomic::Ordering::Relaxed);
    let outside = ROTATED_OUTSIDE.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{} cases: {crashes} crashes, {copytruncates} copytruncates, {outside} rotations outside the glob",
        seeds.len()
    );
    assert!(
        std::env::var("ZTAIL_TAILER_SEED").is_ok()
            || (crashes > 0 && copytruncates > 0 && outside > 0),
        "the generator must exercise crashes ({crashes}), copytruncate ({copytruncates}) and rotation outside the glob ({outside})"
    );
}
