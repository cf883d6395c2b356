//! Reading OSU tables and turning repeated runs of several configurations
//! into medians, ratios, a CSV file and an SVG plot.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

/// Parses an OSU table: `(size, first value)` for every data row. Header
/// and comment lines start with `#`; anything else that is not a row makes
/// the parse fail (so a truncated or garbled output is noticed).
pub fn parse_table(text: &str) -> Result<Vec<(usize, f64)>, String> {
    let mut rows = Vec::new();
    for line in text.lines() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut it = l.split_whitespace();
        let size = it
            .next()
            .and_then(|s| s.parse::<usize>().ok())
            .ok_or_else(|| format!("not an OSU row: {line:?}"))?;
        let v = it
            .next()
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("not an OSU row: {line:?}"))?;
        rows.push((size, v));
    }
    if rows.is_empty() {
        return Err("no rows".into());
    }
    Ok(rows)
}

/// Sum of a `key=value` counter over the component's `[ivcom] stats` lines.
pub fn stats_sum(stderr: &str, key: &str) -> u64 {
    stderr
        .lines()
        .filter(|l| l.contains("[ivcom] stats "))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
        .sum()
}

/// The `[ivcom] path ... path=<p> reason="<r>"` lines of a run's stderr as
/// `(path, reason)` pairs.
pub fn path_lines(stderr: &str) -> Vec<(String, String)> {
    stderr
        .lines()
        .filter_map(|l| {
            let rest = &l[l.find("[ivcom] path ")? + 13..];
            let path = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("path="))?
                .to_string();
            let reason = rest
                .split_once("reason=")
                .map(|x| x.1.trim().trim_matches('"').to_string())
                .unwrap_or_default();
            Some((path, reason))
        })
        .collect()
}

/// A path line's reason without the queue slots it names ("; slot 3 of
/// ours, 5 of theirs"), which differ from pair to pair: the report counts
/// the pairs that took each kind of path for each reason.
pub fn reason_without_slots(reason: &str) -> String {
    let mut out = reason.to_string();
    while let Some(at) = out.find("; slot ") {
        let end = out[at + 2..]
            .find([';', ')'])
            .map_or(out.len(), |e| at + 2 + e);
        out.replace_range(at..end, "");
    }
    out
}

/// Median of a non-empty slice.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// True for benchmarks where lower is better: the latency tests and the
/// collectives (their tables give the mean time of one call, in µs).
pub fn is_latency(bench: &str) -> bool {
    bench.contains("lat") || matches!(bench, "osu_alltoall" | "osu_allreduce")
}

/// All samples: bench -> config -> size -> values.
pub type Samples = BTreeMap<String, BTreeMap<String, BTreeMap<usize, Vec<f64>>>>;

/// Every run by its repetition: bench -> config -> repetition -> size ->
/// value. The configurations of one repetition of one benchmark ran one
/// after the other (`scripts/compare`), so they pair up.
pub type Runs = ByRun<BTreeMap<usize, f64>>;

/// What the files of one run say, by the run: bench -> config ->
/// repetition -> value (files `<bench>__<config>__<rep>.<kind>` of a
/// comparison's raw/).
pub type ByRun<V> = BTreeMap<String, BTreeMap<String, BTreeMap<String, V>>>;

/// Puts `v` in `m` for one run.
pub fn insert_run<V>(m: &mut ByRun<V>, bench: &str, cfg: &str, rep: &str, v: V) {
    m.entry(bench.into())
        .or_default()
        .entry(cfg.into())
        .or_default()
        .insert(rep.into(), v);
}

/// The `<bench>__<config>__<rep><suffix>` files of `dir`, each as `read`
/// makes it (its name and path; `None`: left out; an error ends the
/// reading).
fn read_by_run<V>(
    dir: &Path,
    suffix: &str,
    mut read: impl FnMut(&str, &Path) -> Result<Option<V>, String>,
) -> Result<ByRun<V>, String> {
    let mut m = ByRun::new();
    let rd = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for ent in rd.flatten() {
        let name = ent.file_name().to_string_lossy().into_owned();
        let Some(stem) = name.strip_suffix(suffix) else {
            continue;
        };
        let parts: Vec<&str> = stem.split("__").collect();
        if parts.len() != 3 {
            continue;
        }
        if let Some(v) = read(&name, &ent.path())? {
            insert_run(&mut m, parts[0], parts[1], parts[2], v);
        }
    }
    Ok(m)
}

/// Reads `<bench>__<config>__<rep>.txt` files of `dir`.
pub fn load(dir: &Path) -> Result<Samples, String> {
    load_runs(dir).map(|r| samples(&r))
}

/// All values of `runs` per size, the repetitions pooled.
pub fn samples(runs: &Runs) -> Samples {
    let mut s = Samples::new();
    for (bench, cfgs) in runs {
        for (cfg, reps) in cfgs {
            let per = s
                .entry(bench.clone())
                .or_default()
                .entry(cfg.clone())
                .or_default();
            for rows in reps.values() {
                for (&size, &v) in rows {
                    per.entry(size).or_default().push(v);
                }
            }
        }
    }
    s
}

/// Reads `<bench>__<config>__<rep>.txt` files of `dir`, by repetition.
pub fn load_runs(dir: &Path) -> Result<Runs, String> {
    read_by_run(dir, ".txt", |name, path| {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let rows = parse_table(&text).map_err(|e| format!("{name}: {e}"))?;
        Ok(Some(rows.into_iter().collect()))
    })
}

/// Medians: bench -> config -> size -> (median, min, max, n).
pub type Medians = BTreeMap<String, BTreeMap<String, BTreeMap<usize, (f64, f64, f64, usize)>>>;

/// Medians of all samples.
pub fn medians(s: &Samples) -> Medians {
    s.iter()
        .map(|(b, cfgs)| {
            let c = cfgs
                .iter()
                .map(|(cfg, sizes)| {
                    let m = sizes
                        .iter()
                        .map(|(&size, vals)| {
                            let mut v = vals.clone();
                            let med = median(&mut v);
                            (size, (med, v[0], v[v.len() - 1], v.len()))
                        })
                        .collect();
                    (cfg.clone(), m)
                })
                .collect();
            (b.clone(), c)
        })
        .collect()
}

fn order(cfg: &str) -> usize {
    match cfg {
        "ivcom" => 0,
        "ivcom-mt" => 1,
        "ivcom-base" | "ivcom-queue" => 2,
        "tcp" => 3,
        "vader" | "sm" => 4,
        "vader-mt" | "sm-mt" => 5,
        _ => 6,
    }
}

/// The ratios printed beside the figures, when both configurations ran:
/// ivcom against Open MPI's TCP and shared memory (vader in 4.1, sm in
/// 5.0) and against ivcom as built at an earlier revision
/// (`IVCOM_COMPARE_BASELINE`); ivcom's queue path (`ivcom-queue`:
/// `btl_ivcom_queue_size`) against the shared memory and against ivcom's
/// rings; and what `MPI_THREAD_MULTIPLE` costs with one thread
/// communicating (`-mt`: the benchmark ran with `-T`), for ivcom and for
/// the shared-memory BTL under the same ob1.
pub const RATIOS: [(&str, &str); 10] = [
    ("ivcom", "tcp"),
    ("ivcom", "vader"),
    ("ivcom", "sm"),
    ("ivcom", "ivcom-base"),
    ("ivcom-queue", "vader"),
    ("ivcom-queue", "sm"),
    ("ivcom-queue", "ivcom"),
    ("ivcom-mt", "ivcom"),
    ("vader-mt", "vader"),
    ("sm-mt", "sm"),
];

/// The comparison table as text.
pub fn table(m: &Medians) -> String {
    let mut out = String::new();
    for (bench, cfgs) in m {
        let mut names: Vec<&String> = cfgs.keys().collect();
        names.sort_by_key(|c| (order(c), (*c).clone()));
        let unit = if is_latency(bench) {
            "us, median"
        } else {
            "MB/s, median"
        };
        // osu_mbw_mr runs twice: 4 ranks (two pairs) and, as osu_mbw_mr-2,
        // 2 ranks (one pair); scripts/compare
        let ranks = match bench.as_str() {
            "osu_mbw_mr" | "osu_mbw_mr-F" => "; 4 ranks, two pairs",
            "osu_mbw_mr-2" => "; 2 ranks, one pair",
            _ => "",
        };
        let _ = writeln!(out, "\n## {bench} ({unit}{ranks})");
        let mut hdr = format!("{:>10}", "size");
        for c in &names {
            let _ = write!(hdr, "{:>14}", c);
        }
        let has = |c: &str| cfgs.contains_key(c);
        let ratios: Vec<(&str, &str)> = RATIOS
            .into_iter()
            .filter(|(a, b)| has(a) && has(b))
            .collect();
        for (a, b) in &ratios {
            hdr.push_str(&format!("{:>17}", format!("{a}/{b}")));
        }
        let _ = writeln!(out, "{hdr}");
        let sizes: std::collections::BTreeSet<usize> =
            cfgs.values().flat_map(|s| s.keys().copied()).collect();
        for size in sizes {
            let mut line = format!("{size:>10}");
            for c in &names {
                match cfgs[*c].get(&size) {
                    Some(v) => {
                        let _ = write!(line, "{:>14.3}", v.0);
                    }
                    None => line.push_str(&format!("{:>14}", "-")),
                }
            }
            let get = |c: &str| cfgs.get(c).and_then(|s| s.get(&size)).map(|v| v.0);
            for (a, b) in &ratios {
                match (get(a), get(b)) {
                    (Some(a), Some(b)) if b > 0.0 => {
                        let _ = write!(line, "{:>17.3}", a / b);
                    }
                    _ => line.push_str(&format!("{:>17}", "-")),
                }
            }
            let _ = writeln!(out, "{line}");
        }
    }
    out
}

/// CSV of the medians.
pub fn csv(m: &Medians) -> String {
    let mut out = String::from("benchmark,config,size_bytes,median,min,max,runs,unit\n");
    for (bench, cfgs) in m {
        let unit = if is_latency(bench) { "us" } else { "MB/s" };
        for (cfg, sizes) in cfgs {
            for (size, (med, lo, hi, n)) in sizes {
                let _ = writeln!(
                    out,
                    "{bench},{cfg},{size},{med:.4},{lo:.4},{hi:.4},{n},{unit}"
                );
            }
        }
    }
    out
}

/// One line of the targets summary.
pub struct Target {
    pub what: String,
    pub value: Option<f64>,
    pub goal: String,
    pub met: Option<bool>,
    /// For a goal read at one size: the larger spread (slowest run over
    /// fastest) of the two configurations' runs there. A spread of
    /// several times means the median is a draw between modes, not a
    /// measurement (`SPREAD_UNRESOLVED`).
    pub spread: Option<f64>,
    /// The same ratio from runs paired by repetition (see [`add_paired`]);
    /// `None` until then, and for goals that are not a ratio.
    pub paired: Option<f64>,
    /// The goal read on [`Target::paired`].
    pub paired_met: Option<bool>,
    /// The paired figure of the repetitions whose two runs found the
    /// host's CPUs in one placement, per placement (see
    /// [`add_paired_by_placement`]): (placement, ratio, repetitions).
    pub by_placement: Vec<(Placement, f64, usize)>,
    ok: fn(f64) -> bool,
    /// What the ratio compares.
    key: Option<Compared>,
}

/// What a ratio goal compares: `cfg` over `base` in `bench`, over
/// `sizes`, read at the worst of them.
struct Compared {
    bench: String,
    cfg: String,
    base: String,
    sizes: std::ops::RangeInclusive<usize>,
    /// Bandwidth (the lowest ratio is the worst), else time.
    higher_is_better: bool,
}

impl Compared {
    /// Whether ratio `a` is worse than `than`.
    fn worse(&self, a: f64, than: f64) -> bool {
        if self.higher_is_better {
            a < than
        } else {
            a > than
        }
    }
}

/// Fills in [`Target::paired`]: at each size, the median over the
/// repetitions in which both configurations ran of the ratio between
/// their two runs (run one after the other), then the worst size of the
/// goal's range. The ratio of the medians pools each configuration's runs
/// first; on a machine whose speed jumps between modes from one run to
/// the next (this project's: 2 virtual cores whose host places them now
/// on one core's threads, now on two cores), the two medians can come
/// from different modes, and their ratio then measures the host. A pair
/// of runs a few seconds apart mostly shares one mode. The verdicts stay
/// those of the medians; the paired figure is printed beside them.
pub fn add_paired(targets: &mut [Target], runs: &Runs) {
    for t in targets.iter_mut() {
        let Some(c) = &t.key else {
            continue;
        };
        t.paired = paired_worst(runs, c);
        t.paired_met = t.paired.map(t.ok);
    }
}

/// The worst over `c`'s sizes of the paired ratio (the median over
/// repetitions at each size).
fn paired_worst(runs: &Runs, c: &Compared) -> Option<f64> {
    paired_worst_of(runs, c, |_| true).0
}

/// [`paired_worst`] over the repetitions that `keep` accepts; also how
/// many repetitions paired up.
fn paired_worst_of(runs: &Runs, c: &Compared, keep: impl Fn(&str) -> bool) -> (Option<f64>, usize) {
    let runs_of = |cfg: &str| runs.get(&c.bench)?.get(cfg);
    let (Some(a), Some(b)) = (runs_of(&c.cfg), runs_of(&c.base)) else {
        return (None, 0);
    };
    let mut per_size: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    let mut reps = 0;
    for (rep, rows) in a {
        let Some(brows) = b.get(rep) else { continue };
        if !keep(rep) {
            continue;
        }
        reps += 1;
        for (size, v) in rows.range(c.sizes.clone()) {
            if let Some(w) = brows.get(size).filter(|w| **w > 0.0) {
                per_size.entry(*size).or_default().push(v / w);
            }
        }
    }
    let worst = per_size
        .into_values()
        .map(|mut v| median(&mut v))
        .reduce(|x, y| if c.worse(y, x) { y } else { x });
    (worst, reps)
}

/// The cache line round trips between the 2 CPUs measured just before
/// and just after each run (`<bench>__<config>__<rep>.probe`, written by
/// `line_probe`), in ns: bench -> config -> repetition -> figures.
pub type Probes = ByRun<Vec<f64>>;

/// Reads the `.probe` files of `dir` (every `line_rtt_ns` figure in each;
/// files that hold none, or cannot be read, are left out; no directory,
/// no probes).
pub fn load_probes(dir: &Path) -> Probes {
    read_by_run(dir, ".probe", |_, path| {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let ns: Vec<f64> = text
            .lines()
            .filter_map(|l| l.strip_prefix("line_rtt_ns "))
            .filter_map(|v| v.trim().parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v > 0.0)
            .collect();
        Ok((!ns.is_empty()).then_some(ns))
    })
    .unwrap_or_default()
}

/// Where the host had put the 2 CPUs for a run: sharing a cache (a short
/// round trip of a cache line between them) or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placement {
    Near,
    Far,
}

impl Placement {
    pub fn name(self) -> &'static str {
        match self {
            Placement::Near => "near",
            Placement::Far => "far",
        }
    }
}

/// The probes' two placements, when they show two: the round trip that
/// separates them (the geometric mean of the shortest and the longest),
/// with the range of each side, or `None` when the longest probe is
/// within 2x of the shortest (one placement throughout).
pub fn placement_split(p: &Probes) -> Option<PlacementSplit> {
    let all: Vec<f64> = p
        .values()
        .flat_map(|c| c.values())
        .flat_map(|r| r.values().flatten().copied())
        .collect();
    let lo = all.iter().copied().reduce(f64::min)?;
    let hi = all.iter().copied().reduce(f64::max)?;
    if hi < 2.0 * lo {
        return None;
    }
    let at = (lo * hi).sqrt();
    let side = |far: bool| {
        let v: Vec<f64> = all.iter().copied().filter(|&x| (x > at) == far).collect();
        (
            v.iter().copied().fold(f64::INFINITY, f64::min),
            v.iter().copied().fold(0.0, f64::max),
            v.len(),
        )
    };
    Some(PlacementSplit {
        at,
        near: side(false),
        far: side(true),
    })
}

/// See [`placement_split`]: the split and each side's (shortest, longest,
/// probes).
pub struct PlacementSplit {
    pub at: f64,
    pub near: (f64, f64, usize),
    pub far: (f64, f64, usize),
}

/// Fills in [`Target::by_placement`]: for each placement, the paired
/// figure over the repetitions in which both runs found it in every probe,
/// before and after (a run whose probes disagree, or a pair whose runs
/// straddle a change, counts in neither), read with `split`, the probes'
/// [`placement_split`]. Nothing when that is `None` (one placement).
pub fn add_paired_by_placement(
    targets: &mut [Target],
    runs: &Runs,
    probes: &Probes,
    split: Option<&PlacementSplit>,
) {
    let Some(split) = split else {
        return;
    };
    let side = |ns: f64| {
        if ns > split.at {
            Placement::Far
        } else {
            Placement::Near
        }
    };
    let of = |bench: &str, cfg: &str, rep: &str| {
        let ns = probes.get(bench)?.get(cfg)?.get(rep)?;
        let first = side(*ns.first()?);
        ns.iter().all(|&v| side(v) == first).then_some(first)
    };
    for t in targets.iter_mut() {
        let Some(c) = &t.key else {
            continue;
        };
        for want in [Placement::Near, Placement::Far] {
            let keep = |rep: &str| {
                of(&c.bench, &c.cfg, rep) == Some(want) && of(&c.bench, &c.base, rep) == Some(want)
            };
            if let (Some(r), n) = paired_worst_of(runs, c, keep) {
                t.by_placement.push((want, r, n));
            }
        }
    }
}

/// Whether `t`'s goal holds for `ratio`.
pub fn goal_holds(t: &Target, ratio: f64) -> bool {
    (t.ok)(ratio)
}

/// A spread of runs above which a goal's median is reported as unresolved:
/// osu_mt_mr with 8 threads on 2 cores ran either at about 30,000 or at
/// about 3,000,000 messages per second, run by run, for every BTL (Open
/// MPI's waiting threads sleep on condition variables and wake when the
/// scheduler lets them).
pub const SPREAD_UNRESOLVED: f64 = 3.0;

/// Evaluates the project's speed goals on the medians. Goals against a
/// baseline that was not run at all (no configuration of that name in `m`,
/// e.g. vader in the real-Xen runs) are left out; goals whose figures are
/// missing otherwise stay in as "not measured".
pub fn targets(m: &Medians, doorbells_per_msg: Option<f64>) -> Vec<Target> {
    let at = |b: &str, c: &str, s: usize| m.get(b)?.get(c)?.get(&s).copied();
    let get = |b: &str, c: &str, s: usize| at(b, c, s).map(|v| v.0);
    // slowest over fastest run (both orders of "slow": latency or rate)
    let spread = |b: &str, c: &str, s: usize| {
        at(b, c, s).map(|v| if v.1 > 0.0 { v.2 / v.1 } else { f64::INFINITY })
    };
    let ran = |c: &str| m.values().any(|b| b.contains_key(c));
    let mut out = Vec::new();
    let mut goal = |what: &str,
                    value: Option<f64>,
                    spread: Option<f64>,
                    goal: &str,
                    ok: fn(f64) -> bool,
                    key: Option<Compared>| {
        out.push(Target {
            what: what.into(),
            value,
            goal: goal.into(),
            met: value.map(ok),
            spread,
            paired: None,
            paired_met: None,
            by_placement: Vec::new(),
            ok,
            key,
        })
    };
    // The shared-memory baseline: vader (Open MPI 4.1) or sm (5.0).
    let shm = if ran("sm") && !ran("vader") {
        "sm"
    } else {
        "vader"
    };
    // (what, benchmark, measured, baseline, size, goal, test)
    type Goal = (
        &'static str,
        &'static str,
        &'static str,
        &'static str,
        usize,
        &'static str,
        fn(f64) -> bool,
    );
    let ratios: [Goal; 8] = [
        (
            "8 B latency",
            "osu_latency",
            "ivcom",
            shm,
            8,
            "<= 1.1",
            |v| v <= 1.1,
        ),
        (
            "8 B latency",
            "osu_latency",
            "ivcom",
            "tcp",
            8,
            "<= 0.1",
            |v| v <= 0.1,
        ),
        (
            "1 MiB bandwidth",
            "osu_bw",
            "ivcom",
            shm,
            1 << 20,
            ">= 0.7",
            |v| v >= 0.7,
        ),
        (
            "1 MiB bandwidth",
            "osu_bw",
            "ivcom",
            "tcp",
            1 << 20,
            ">= 3",
            |v| v >= 3.0,
        ),
        // A change measured against the revision before it: small
        // messages may not get more than 5 % dearer.
        (
            "8 B latency",
            "osu_latency",
            "ivcom",
            "ivcom-base",
            8,
            "<= 1.05",
            |v| v <= 1.05,
        ),
        (
            "8 B bandwidth",
            "osu_bw",
            "ivcom",
            "ivcom-base",
            8,
            ">= 0.95",
            |v| v >= 0.95,
        ),
        // MPI_THREAD_MULTIPLE requested, one thread communicating.
        (
            "8 B latency",
            "osu_latency",
            "ivcom-mt",
            "ivcom",
            8,
            "<= 1.1",
            |v| v <= 1.1,
        ),
        // Threads per rank streaming at once, against shared memory.
        (
            "8 B threaded msg rate",
            "osu_mt_mr",
            "ivcom",
            shm,
            8,
            ">= 0.9",
            |v| v >= 0.9,
        ),
    ];
    for (what, bench, cfg, base, size, g, ok) in ratios {
        if ran(cfg) && ran(base) {
            let r = get(bench, cfg, size)
                .zip(get(bench, base, size))
                .map(|(a, b)| a / b);
            let sp = spread(bench, cfg, size)
                .zip(spread(bench, base, size))
                .map(|(a, b)| a.max(b));
            let key = Compared {
                bench: bench.into(),
                cfg: cfg.into(),
                base: base.into(),
                sizes: size..=size,
                higher_is_better: !is_latency(bench),
            };
            goal(&format!("{what} {cfg}/{base}"), r, sp, g, ok, Some(key));
        }
    }
    // Goals over a range of sizes, read at the worst size: latency at
    // most 1.3x the shared memory from 16 KiB to 1 MiB, bandwidth at least
    // 0.9x at every size. The same figures with fresh data (`-F`) when
    // those programs ran.
    type Range = (
        &'static str,
        &'static str,
        usize,
        usize,
        bool,
        &'static str,
        fn(f64) -> bool,
    );
    let ranges: [Range; 6] = [
        (
            "16K-1M",
            "osu_latency",
            16 << 10,
            1 << 20,
            false,
            "<= 1.3",
            |v| v <= 1.3,
        ),
        ("all sizes", "osu_bw", 1, usize::MAX, true, ">= 0.9", |v| {
            v >= 0.9
        }),
        // The goal: two ranks, one pair (osu_mbw_mr-2).
        (
            "all sizes",
            "osu_mbw_mr-2",
            1,
            usize::MAX,
            true,
            ">= 0.9",
            |v| v >= 0.9,
        ),
        // Held to the same bar: 4 ranks, two pairs, on the 2 cores.
        (
            "all sizes",
            "osu_mbw_mr",
            1,
            usize::MAX,
            true,
            ">= 0.9",
            |v| v >= 0.9,
        ),
        (
            "16K-1M",
            "osu_latency-F",
            16 << 10,
            1 << 20,
            false,
            "<= 1.3",
            |v| v <= 1.3,
        ),
        (
            "all sizes",
            "osu_bw-F",
            1,
            usize::MAX,
            true,
            ">= 0.9",
            |v| v >= 0.9,
        ),
    ];
    if ran("ivcom") && ran(shm) {
        for (what, bench, lo, hi, higher_is_better, g, ok) in ranges {
            let fresh = bench.ends_with("-F");
            if fresh && !m.contains_key(bench) {
                continue;
            }
            let key = Compared {
                bench: bench.into(),
                cfg: "ivcom".into(),
                base: shm.into(),
                sizes: lo..=hi,
                higher_is_better,
            };
            let w = worst_ratio(m, &key);
            let at = w.map_or(String::new(), |(_, size)| {
                format!(" ({})", human_size(size as f64))
            });
            let name = format!("{bench} {what} ivcom/{shm}, worst{at}");
            goal(&name, w.map(|(r, _)| r), None, g, ok, Some(key));
        }
    }
    goal(
        "doorbells per message (bw)",
        doorbells_per_msg,
        None,
        "<= 0.01",
        |v| v <= 0.01,
        None,
    );
    out
}

/// The worst ratio of the medians that `c` compares, over its sizes where
/// both configurations ran, with its size (see [`Compared::worse`]).
fn worst_ratio(m: &Medians, c: &Compared) -> Option<(f64, usize)> {
    let medians_of = |cfg: &str| m.get(&c.bench)?.get(cfg);
    let (a, b) = (medians_of(&c.cfg)?, medians_of(&c.base)?);
    a.iter()
        .filter(|(size, _)| c.sizes.contains(size))
        .filter_map(|(size, v)| {
            let w = b.get(size)?;
            (w.0 > 0.0).then(|| (v.0 / w.0, *size))
        })
        .reduce(|x, y| if c.worse(y.0, x.0) { y } else { x })
}

/// `1536` -> `1.5K`, `1048576` -> `1M`.
pub fn human_size(x: f64) -> String {
    let (v, unit) = if x >= 1048576.0 {
        (x / 1048576.0, "M")
    } else if x >= 1024.0 {
        (x / 1024.0, "K")
    } else {
        (x, "")
    };
    if (v - v.round()).abs() < 1e-9 {
        format!("{}{unit}", v.round())
    } else {
        format!("{v:.1}{unit}")
    }
}

/// The plotted benchmarks: latency and bandwidth with OSU's unchanged
/// buffer, and with fresh data (`-F`) when the run has them.
const PLOTTED: [(&str, &str, &str); 4] = [
    (
        "osu_latency",
        "latency (us)",
        "ivcom vs Open MPI's transports",
    ),
    (
        "osu_bw",
        "bandwidth (MB/s)",
        "ivcom vs Open MPI's transports",
    ),
    ("osu_latency-F", "latency (us)", "fresh data (-F)"),
    ("osu_bw-F", "bandwidth (MB/s)", "fresh data (-F)"),
];

/// An SVG with latency and bandwidth against message size (log scales):
/// one row for OSU's method, and one for fresh data when it ran.
pub fn plot(m: &Medians, path: &Path) -> Result<(), String> {
    use plotters::prelude::*;
    let rows = if m.contains_key(PLOTTED[2].0) || m.contains_key(PLOTTED[3].0) {
        2
    } else {
        1
    };
    let root = SVGBackend::new(path, (1400, 560 * rows)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let areas = root.split_evenly((rows as usize, 2));
    let colors = [RED, BLUE, GREEN, MAGENTA, CYAN, BLACK];
    for (area, (bench, ylabel, what)) in areas.iter().zip(PLOTTED) {
        let Some(cfgs) = m.get(bench) else { continue };
        let pts: Vec<(String, Vec<(f64, f64)>)> = cfgs
            .iter()
            .map(|(c, s)| {
                (
                    c.clone(),
                    s.iter()
                        .filter(|(size, v)| **size > 0 && v.0 > 0.0)
                        .map(|(size, v)| ((*size as f64).log2(), v.0))
                        .collect(),
                )
            })
            .collect();
        // x: log2 of the size on a linear axis, labelled with sizes.
        let all: Vec<&(f64, f64)> = pts.iter().flat_map(|p| p.1.iter()).collect();
        if all.is_empty() {
            continue;
        }
        let xmax = all.iter().map(|p| p.0).fold(1.0, f64::max) + 0.5;
        let ymin = all.iter().map(|p| p.1).fold(f64::MAX, f64::min) / 1.5;
        let ymax = all.iter().map(|p| p.1).fold(0.0, f64::max) * 1.5;
        let mut chart = ChartBuilder::on(area)
            .caption(format!("{bench}: {what}"), ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5..xmax, (ymin..ymax).log_scale())
            .map_err(|e| e.to_string())?;
        chart
            .configure_mesh()
            .x_desc("message size (bytes)")
            .y_desc(ylabel)
            .x_labels(((xmax + 0.5) / 2.0) as usize + 1)
            .x_label_formatter(&|x| human_size(2f64.powf(*x)))
            .y_label_formatter(&|y| format!("{y}"))
            .label_style(("sans-serif", 14))
            .axis_desc_style(("sans-serif", 16))
            .draw()
            .map_err(|e| e.to_string())?;
        for (i, (cfg, p)) in pts.iter().enumerate() {
            let col = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(p.iter().copied(), col.stroke_width(2)))
                .map_err(|e| e.to_string())?
                .label(cfg.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], col.stroke_width(2))
                });
            chart
                .draw_series(p.iter().map(|&(x, y)| Circle::new((x, y), 3, col.filled())))
                .map_err(|e| e.to_string())?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| e.to_string())?;
    }
    root.present().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_osu_tables_and_rejects_garbage() {
        let t = "# OSU MPI Latency Test\n# Size          Latency (us)\n0                       0.25\n8                       0.27\n";
        assert_eq!(parse_table(t).unwrap(), vec![(0, 0.25), (8, 0.27)]);
        assert!(parse_table("# only a header\n").is_err());
        // the collectives report a time too
        assert!(is_latency("osu_alltoall") && is_latency("osu_allreduce"));
        assert!(!is_latency("osu_bw") && !is_latency("osu_mbw_mr"));
        assert!(parse_table("0 0.2\nsegfault\n").is_err());
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_size(1.0), "1");
        assert_eq!(human_size(1536.0), "1.5K");
        assert_eq!(human_size(4194304.0), "4M");
    }

    #[test]
    fn reads_path_lines() {
        let e = "[vm1:1] [ivcom] path rank=0 peer=1 path=ring reason=\"ring: co-resident\"\nnoise\n[vm2:2] [ivcom] path rank=1 peer=0 path=tcp reason=\"another host\"\n";
        assert_eq!(
            path_lines(e),
            vec![
                ("ring".to_string(), "ring: co-resident".to_string()),
                ("tcp".to_string(), "another host".to_string())
            ]
        );
        assert_eq!(
            reason_without_slots(
                "queue: co-resident (xen:domain 3; queues of 128 KiB; slot 2 of ours, 4 of theirs; \
                 pool over 16 queues)"
            ),
            "queue: co-resident (xen:domain 3; queues of 128 KiB; pool over 16 queues)"
        );
        assert_eq!(
            reason_without_slots("queue: co-resident (host:x; slot 0 of ours, 1 of theirs)"),
            "queue: co-resident (host:x)"
        );
        assert_eq!(
            reason_without_slots("ring: co-resident"),
            "ring: co-resident"
        );
        assert_eq!(
            stats_sum(
                "[ivcom] stats rank=0 tx_msgs=3\n[ivcom] stats rank=1 tx_msgs=4\n",
                "tx_msgs"
            ),
            7
        );
    }

    #[test]
    fn medians_and_ratios() {
        let mut s = Samples::new();
        let b = s.entry("osu_latency".into()).or_default();
        b.entry("ivcom".into())
            .or_default()
            .insert(8, vec![0.3, 0.2, 0.25]);
        b.entry("vader".into())
            .or_default()
            .insert(8, vec![0.2, 0.2, 0.2]);
        b.entry("tcp".into()).or_default().insert(8, vec![5.0, 6.0]);
        let m = medians(&s);
        assert_eq!(m["osu_latency"]["ivcom"][&8].0, 0.25);
        assert_eq!(m["osu_latency"]["tcp"][&8].0, 5.5);
        let tg = targets(&m, Some(0.0));
        assert!((tg[0].value.unwrap() - 1.25).abs() < 1e-9);
        assert_eq!(tg[0].met, Some(false));
        assert_eq!(tg[1].met, Some(true));
        assert!(table(&m).contains("ivcom/vader"));
        assert!(csv(&m).lines().count() == 4);
        // bandwidth never ran: its goals stay, as not measured (and the
        // threaded message rate, whose configurations ran elsewhere, and
        // the goals over a range of sizes: latency, bandwidth, mbw_mr of
        // 2 and of 4 ranks)
        assert_eq!(tg.len(), 10);
        assert_eq!(tg[2].met, None);
        assert!(tg[5..9].iter().all(|t| t.met.is_none()));
        // spread: the larger of the two configurations' (0.3 / 0.2)
        assert!((tg[0].spread.unwrap() - 1.5).abs() < 1e-9);
    }

    #[test]
    fn paired_figures_per_placement_of_the_cpus() {
        // osu_bw at 8 B: repetitions 1 and 2 ran with the CPUs near (a
        // line round trip of 50-60 ns), 3 and 4 far (390-410 ns), and 5
        // straddled a move (ivcom near, vader far).
        let mut r = Runs::new();
        let mut p = Probes::new();
        for (cfg, rep, v8, ns) in [
            ("ivcom", "1", 180.0, 50.0),
            ("vader", "1", 200.0, 55.0),
            ("ivcom", "2", 170.0, 60.0),
            ("vader", "2", 170.0, 52.0),
            ("ivcom", "3", 57.0, 400.0),
            ("vader", "3", 76.0, 410.0),
            ("ivcom", "4", 60.0, 390.0),
            ("vader", "4", 78.0, 395.0),
            ("ivcom", "5", 180.0, 50.0),
            ("vader", "5", 70.0, 400.0),
        ] {
            insert_run(&mut r, "osu_bw", cfg, rep, [(8, v8)].into_iter().collect());
            insert_run(&mut p, "osu_bw", cfg, rep, vec![ns, ns + 1.0]);
        }
        // a sixth repetition whose ivcom run moved during the run (near
        // before, far after): it counts in neither placement
        for (cfg, v8, ns) in [
            ("ivcom", 10.0, vec![50.0, 400.0]),
            ("vader", 100.0, vec![50.0]),
        ] {
            insert_run(&mut r, "osu_bw", cfg, "6", [(8, v8)].into_iter().collect());
            insert_run(&mut p, "osu_bw", cfg, "6", ns);
        }
        let sp = placement_split(&p).unwrap();
        assert_eq!((sp.near.2, sp.far.2), (12, 11));
        assert_eq!(
            (sp.near.0, sp.near.1, sp.far.0, sp.far.1),
            (50.0, 61.0, 390.0, 411.0)
        );
        let mut tg = targets(&medians(&samples(&r)), None);
        add_paired_by_placement(&mut tg, &r, &p, Some(&sp));
        let bw = tg
            .iter()
            .find(|t| t.what.starts_with("osu_bw all sizes ivcom/vader"))
            .unwrap();
        assert_eq!(bw.by_placement.len(), 2);
        let (near, far) = (bw.by_placement[0], bw.by_placement[1]);
        assert_eq!(
            (near.0, near.2, far.0, far.2),
            (Placement::Near, 2, Placement::Far, 2)
        );
        // near: 0.9 and 1.0 -> 0.95; far: 0.75 and 0.769 -> 0.760
        assert!((near.1 - 0.95).abs() < 1e-9, "{near:?}");
        assert!(
            (far.1 - (57.0 / 76.0 + 60.0 / 78.0) / 2.0).abs() < 1e-9,
            "{far:?}"
        );
        assert!(goal_holds(bw, near.1) && !goal_holds(bw, far.1));
        // one placement throughout: no split, nothing per placement
        let mut one = p.clone();
        for c in one.get_mut("osu_bw").unwrap().values_mut() {
            for v in c.values_mut() {
                *v = vec![100.0, 110.0];
            }
        }
        assert!(placement_split(&one).is_none());
        let mut tg = targets(&medians(&samples(&r)), None);
        add_paired_by_placement(&mut tg, &r, &one, placement_split(&one).as_ref());
        assert!(tg.iter().all(|t| t.by_placement.is_empty()));
    }

    #[test]
    fn probes_are_read_from_their_files() {
        let d = std::env::temp_dir().join(format!("ivcom-probes-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join("osu_bw__ivcom__1.probe"),
            "line_rtt_ns 93.5\nline_rtt_ns 401.0\n",
        )
        .unwrap();
        std::fs::write(d.join("osu_bw__vader__1.probe"), "").unwrap();
        std::fs::write(d.join("osu_bw__tcp__1.probe"), "line_rtt_ns nan\n").unwrap();
        std::fs::write(d.join("odd.probe"), "line_rtt_ns 5\n").unwrap();
        let p = load_probes(&d);
        assert_eq!(p["osu_bw"]["ivcom"]["1"], vec![93.5, 401.0]);
        assert_eq!(p["osu_bw"].len(), 1);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn paired_ratios_compare_the_runs_of_one_repetition() {
        // osu_bw at 8 B and 64 B over three repetitions; in the second, the
        // machine ran vader fast and ivcom slow: the medians come from
        // different modes, the pairs do not.
        let mut r = Runs::new();
        for (cfg, rep, v8, v64) in [
            ("ivcom", "1", 21.0, 100.0),
            ("ivcom", "2", 8.5, 40.0),
            ("ivcom", "3", 8.4, 50.0),
            ("vader", "1", 24.0, 100.0),
            ("vader", "2", 23.9, 50.0),
            ("vader", "3", 9.5, 50.0),
            // a repetition whose baseline run is missing pairs with nothing
            ("ivcom", "4", 1.0, 1.0),
        ] {
            let rows = [(8, v8), (64, v64)].into_iter().collect();
            insert_run(&mut r, "osu_bw", cfg, rep, rows);
        }
        let s = samples(&r);
        assert_eq!(s["osu_bw"]["ivcom"][&8].len(), 4);
        let mut tg = targets(&medians(&s), None);
        add_paired(&mut tg, &r);
        let bw = tg
            .iter()
            .find(|t| t.what.starts_with("osu_bw all sizes ivcom/vader"))
            .unwrap();
        // medians: ivcom 8.45 (four runs), vader 23.9
        assert!((bw.value.unwrap() - 8.45 / 23.9).abs() < 1e-9);
        assert_eq!(bw.met, Some(false));
        // pairs at 8 B: 0.875, 0.356, 0.884 -> 0.875; at 64 B: 1, 0.8, 1 -> 1
        assert!(
            (bw.paired.unwrap() - 21.0 / 24.0).abs() < 1e-9,
            "{:?}",
            bw.paired
        );
        assert_eq!(bw.paired_met, Some(false));
        // a goal that is not a ratio has no paired figure
        let bells = tg.iter().find(|t| t.what.starts_with("doorbells")).unwrap();
        assert_eq!(bells.paired, None);
        // a latency goal takes the highest paired ratio
        let mut r = Runs::new();
        for (cfg, rep, v16k, v1m) in [("ivcom", "1", 2.0, 50.0), ("vader", "1", 1.0, 100.0)] {
            let rows = [(16384, v16k), (1 << 20, v1m)].into_iter().collect();
            insert_run(&mut r, "osu_latency", cfg, rep, rows);
        }
        let mut tg = targets(&medians(&samples(&r)), None);
        add_paired(&mut tg, &r);
        let lat = tg
            .iter()
            .find(|t| t.what.starts_with("osu_latency 16K-1M"))
            .unwrap();
        assert_eq!((lat.paired, lat.paired_met), (Some(2.0), Some(false)));
    }

    #[test]
    fn a_goal_whose_runs_spread_by_modes_says_so() {
        let mut s = Samples::new();
        let b = s.entry("osu_mt_mr".into()).or_default();
        b.entry("ivcom".into())
            .or_default()
            .insert(8, vec![0.2, 0.25, 24.0]);
        b.entry("vader".into())
            .or_default()
            .insert(8, vec![0.3, 0.2, 0.25]);
        let tg = targets(&medians(&s), None);
        let t = tg
            .iter()
            .find(|t| t.what.starts_with("8 B threaded msg rate"))
            .unwrap();
        assert_eq!(t.met, Some(true));
        assert!((t.spread.unwrap() - 120.0).abs() < 1e-9);
        assert!(t.spread.unwrap() > SPREAD_UNRESOLVED);
    }

    #[test]
    fn range_goals_read_the_worst_size() {
        let mut s = Samples::new();
        for (bench, sizes) in [
            (
                "osu_latency",
                [(8, 0.5, 0.4), (16384, 6.0, 4.0), (1 << 20, 120.0, 100.0)],
            ),
            (
                "osu_bw",
                [
                    (8, 40.0, 50.0),
                    (16384, 9000.0, 6000.0),
                    (1 << 20, 9000.0, 9000.0),
                ],
            ),
            (
                "osu_bw-F",
                [
                    (8, 40.0, 40.0),
                    (16384, 9000.0, 3000.0),
                    (1 << 20, 6000.0, 3000.0),
                ],
            ),
            (
                "osu_mbw_mr-2",
                [
                    (8, 45.0, 50.0),
                    (16384, 9000.0, 6000.0),
                    (1 << 20, 9000.0, 9000.0),
                ],
            ),
        ] {
            let b = s.entry(bench.into()).or_default();
            for (size, ivcom, vader) in sizes {
                b.entry("ivcom".into())
                    .or_default()
                    .insert(size, vec![ivcom]);
                b.entry("vader".into())
                    .or_default()
                    .insert(size, vec![vader]);
            }
        }
        let tg = targets(&medians(&s), None);
        let find = |w: &str| tg.iter().find(|t| t.what.starts_with(w)).unwrap();
        // latency: 16 KiB is the worst in 16K-1M (8 B is outside the range)
        let lat = find("osu_latency 16K-1M ivcom/vader");
        assert_eq!(lat.what, "osu_latency 16K-1M ivcom/vader, worst (16K)");
        assert!((lat.value.unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(lat.met, Some(false));
        // bandwidth: the lowest ratio at any size (8 B)
        let bw = find("osu_bw all sizes ivcom/vader");
        assert_eq!(bw.what, "osu_bw all sizes ivcom/vader, worst (8)");
        assert!((bw.value.unwrap() - 0.8).abs() < 1e-9);
        assert_eq!(bw.met, Some(false));
        let fresh = find("osu_bw-F all sizes ivcom/vader");
        assert!((fresh.value.unwrap() - 1.0).abs() < 1e-9);
        assert_eq!(fresh.met, Some(true));
        // two ranks' mbw_mr: its own figures (8 B, 0.9), met
        let pair = find("osu_mbw_mr-2 all sizes ivcom/vader");
        assert_eq!(pair.what, "osu_mbw_mr-2 all sizes ivcom/vader, worst (8)");
        assert!((pair.value.unwrap() - 0.9).abs() < 1e-9);
        assert_eq!(pair.met, Some(true));
        // fresh latency did not run: no line; mbw_mr of 4 ranks did not
        // run: not measured
        assert!(!tg.iter().any(|t| t.what.contains("osu_latency-F")));
        assert_eq!(find("osu_mbw_mr all sizes").met, None);
    }

    #[test]
    fn open_mpi_5_shared_memory_is_sm() {
        // Open MPI 5's comparison has sm where 4.1's has vader.
        let mut s = Samples::new();
        let b = s.entry("osu_latency".into()).or_default();
        b.entry("ivcom".into()).or_default().insert(8, vec![0.3]);
        b.entry("sm".into()).or_default().insert(8, vec![0.2]);
        b.entry("tcp".into()).or_default().insert(8, vec![6.0]);
        let m = medians(&s);
        let t = table(&m);
        assert!(t.contains("ivcom/sm") && !t.contains("vader"), "{t}");
        // sm sits after tcp, before anything else
        let hdr = t.lines().find(|l| l.contains("size")).unwrap();
        assert!(hdr.find("tcp").unwrap() < hdr.find(" sm").unwrap(), "{hdr}");
        let tg = targets(&m, None);
        assert_eq!(tg[0].what, "8 B latency ivcom/sm");
        assert!((tg[0].value.unwrap() - 1.5).abs() < 1e-9);
        assert_eq!(tg[0].met, Some(false));
        assert!(tg.iter().all(|t| !t.what.contains("vader")));
    }

    #[test]
    fn goals_against_a_baseline_never_run_are_left_out() {
        let mut s = Samples::new();
        let b = s.entry("osu_latency".into()).or_default();
        b.entry("ivcom".into()).or_default().insert(8, vec![0.3]);
        b.entry("tcp".into()).or_default().insert(8, vec![6.0]);
        let tg = targets(&medians(&s), None);
        let names: Vec<&str> = tg.iter().map(|t| t.what.as_str()).collect();
        assert_eq!(
            names,
            [
                "8 B latency ivcom/tcp",
                "1 MiB bandwidth ivcom/tcp",
                "doorbells per message (bw)"
            ]
        );
        assert_eq!(tg[0].met, Some(true));
    }

    #[test]
    fn thread_multiple_cost_is_a_ratio_to_the_single_threaded_run() {
        let mut s = Samples::new();
        let b = s.entry("osu_latency".into()).or_default();
        b.entry("ivcom".into()).or_default().insert(8, vec![0.5]);
        b.entry("ivcom-mt".into()).or_default().insert(8, vec![0.6]);
        b.entry("vader".into()).or_default().insert(8, vec![0.4]);
        b.entry("vader-mt".into()).or_default().insert(8, vec![0.5]);
        let m = medians(&s);
        let t = table(&m);
        assert!(
            t.contains("ivcom-mt/ivcom") && t.contains("vader-mt/vader"),
            "{t}"
        );
        let tg = targets(&m, None);
        let mt = tg
            .iter()
            .find(|t| t.what == "8 B latency ivcom-mt/ivcom")
            .unwrap();
        assert!((mt.value.unwrap() - 1.2).abs() < 1e-9);
        assert_eq!(mt.met, Some(false));
    }
}
