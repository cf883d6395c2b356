//! `ivcom-hostile`: an outsider attacks ivcom nodes' TCP ports.
//!
//! ```text
//! ivcom-hostile [--flood N] [--hold SECS] ADDR...
//! ```
//! For every address: a made-up card, a handshake recorded between two
//! nodes of another job and replayed, garbage, huge lengths and forged data
//! frames (one connection each), then `--flood` idle connections (default
//! 1000) held for `--hold` seconds (default 3). Prints one `HOSTILE` line
//! per attack and a `FLOOD` line per address; exits 0 when every attempt
//! was refused or closed, 1 when any got further.

use ivcom_tests::hostile;
use std::net::SocketAddr;
use std::time::Duration;

fn main() {
    let mut flood = 1000usize;
    let mut hold = 3u64;
    let mut targets: Vec<SocketAddr> = Vec::new();
    let mut a = std::env::args().skip(1);
    while let Some(x) = a.next() {
        match x.as_str() {
            "--flood" => flood = a.next().and_then(|v| v.parse().ok()).expect("--flood N"),
            "--hold" => hold = a.next().and_then(|v| v.parse().ok()).expect("--hold SECS"),
            t => targets.push(t.parse().unwrap_or_else(|_| panic!("bad address {t}"))),
        }
    }
    assert!(
        !targets.is_empty(),
        "usage: ivcom-hostile [--flood N] [--hold SECS] ADDR..."
    );
    let recorded = hostile::record_handshake();
    let mut holes = 0;
    for &t in &targets {
        for r in hostile::attack_all(t, &recorded) {
            println!("{r}");
            if !r.outcome.refused() {
                holes += 1;
            }
        }
        if flood > 0 {
            let f = hostile::idle_flood(t, flood, Duration::from_secs(hold));
            println!(
                "FLOOD target={t} opened={} failed={} closed_by_target={}",
                f.opened, f.failed, f.closed
            );
        }
    }
    println!("HOSTILE SUMMARY targets={} holes={holes}", targets.len());
    std::process::exit(if holes == 0 { 0 } else { 1 });
}
