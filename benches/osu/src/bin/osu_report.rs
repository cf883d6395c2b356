//! `osu-report DIR`: medians, ratios and targets of a comparison run.
//! Reads `DIR/raw/<bench>__<config>__<rep>.txt` (OSU tables) and, for the
//! doorbell count, `DIR/raw/osu_bw__ivcom__<rep>.err` (the component's
//! stats lines) and `DIR/raw/*.probe` (line_probe's figures before and
//! after each run: the paired figures per placement of the host's CPUs);
//! writes `DIR/results.csv` and `DIR/plot.svg`, prints the table and the
//! targets.
use ivcom_osu::report::*;
use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| {
        eprintln!("usage: osu-report DIR");
        std::process::exit(2)
    }));
    let raw = dir.join("raw");
    let runs = match load_runs(&raw) {
        Ok(s) if !s.is_empty() => s,
        Ok(_) => {
            eprintln!("osu-report: no results in {}", raw.display());
            std::process::exit(1)
        }
        Err(e) => {
            eprintln!("osu-report: {e}");
            std::process::exit(1)
        }
    };
    let m = medians(&samples(&runs));
    // Doorbells per message over all ivcom bandwidth runs, and the paths
    // the ivcom runs took.
    let (mut bells, mut msgs) = (0u64, 0u64);
    let mut paths: std::collections::BTreeMap<(String, String), usize> = Default::default();
    if let Ok(rd) = std::fs::read_dir(&raw) {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if !n.ends_with(".err") || !n.contains("__ivcom__") {
                continue;
            }
            let t = std::fs::read_to_string(e.path()).unwrap_or_default();
            for (p, why) in path_lines(&t) {
                *paths.entry((p, reason_without_slots(&why))).or_default() += 1;
            }
            if n.starts_with("osu_bw__ivcom__") {
                bells += stats_sum(&t, "tx_doorbells") + stats_sum(&t, "rx_doorbells");
                msgs += stats_sum(&t, "tx_msgs");
            }
        }
    }
    let per_msg = (msgs > 0).then(|| bells as f64 / msgs as f64);
    print!("{}", table(&m));
    println!("\n## targets (benchmark goals, from the medians above)");
    println!("(paired: the median over repetitions of the ratio between the two runs of one");
    println!(" repetition, which ran one after the other; see add_paired in report.rs)");
    let mut tg = targets(&m, per_msg);
    add_paired(&mut tg, &runs);
    let probes = load_probes(&raw);
    let split = placement_split(&probes);
    if let Some(sp) = &split {
        println!("(the host moved the 2 CPUs between runs: a cache line went from one to the");
        println!(
            " other and back in {:.0}-{:.0} ns in {} probes (near: they share a cache) and in",
            sp.near.0, sp.near.1, sp.near.2
        );
        println!(
            " {:.0}-{:.0} ns in {} (far), probed before and after each run; \"near\"/\"far\": the",
            sp.far.0, sp.far.1, sp.far.2
        );
        println!(" paired figure of the repetitions whose two runs found that placement before");
        println!(" and after, with how many there were)");
    }
    add_paired_by_placement(&mut tg, &runs, &probes, split.as_ref());
    for t in tg {
        let v = t.value.map_or("n/a".to_string(), |v| format!("{v:.4}"));
        let s = match t.met {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "not measured",
        };
        let unresolved = match t.spread {
            Some(sp) if sp > SPREAD_UNRESOLVED && t.met.is_some() => {
                format!(" (unresolved: runs spread {sp:.0}x at this size)")
            }
            _ => String::new(),
        };
        let paired = match (t.paired, t.paired_met) {
            (Some(p), Some(ok)) => {
                format!("; paired {p:.4} {}", if ok { "met" } else { "MISSED" })
            }
            _ => String::new(),
        };
        println!(
            "{:<48} {:>10}   goal {:<8} {s}{unresolved}{paired}",
            t.what, v, t.goal
        );
        if !t.by_placement.is_empty() {
            let parts: Vec<String> = t
                .by_placement
                .iter()
                .map(|(pl, r, n)| {
                    let ok = if goal_holds(&t, *r) { "met" } else { "MISSED" };
                    format!("{} {r:.4} {ok} ({n})", pl.name())
                })
                .collect();
            println!("{:<48} {:>10}   {}", "", "", parts.join("; "));
        }
    }
    if msgs > 0 {
        println!("(doorbells: {bells} over {msgs} messages in the ivcom bw runs)");
    }
    if !paths.is_empty() {
        println!("\n## paths the ivcom runs chose (rank -> peer, all runs)");
        for ((p, why), n) in &paths {
            println!("{n:>6} x {p:<5} {why}");
        }
        if paths.keys().any(|(p, _)| p != "ring" && p != "queue") {
            println!(
                "WARNING: some ivcom pairs used neither a ring nor a queue; their figures measure TCP"
            );
        }
    }
    let csv_path = dir.join("results.csv");
    std::fs::write(&csv_path, csv(&m)).expect("write results.csv");
    let svg = dir.join("plot.svg");
    match plot(&m, &svg) {
        Ok(()) => println!("\nwrote {} and {}", csv_path.display(), svg.display()),
        Err(e) => eprintln!("osu-report: plot failed: {e}"),
    }
}
