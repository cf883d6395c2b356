//! The Xen lab's dom0 scripts (scripts/xen-lab.d), run here with a fake
//! `xl`: the logic that decides a guest is dead, which the lab's watchdogs
//! act on (xen-proof fails a run in seconds, dom0-init stops waiting for a
//! result, `lab-domu wait` creates the guest again), cannot be driven into
//! every state on real Xen (a domain that Xen keeps dying, say).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A directory with an `xl` that prints `list` for `xl list`, or fails
/// when `list` is `None`.
fn fake_xl(name: &str, list: Option<&str>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ivcom-fake-xl-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let body = match list {
        Some(l) => format!("#!/bin/sh\n[ \"$1\" = list ] || exit 1\ncat <<'LIST'\n{l}LIST\n"),
        None => "#!/bin/sh\necho 'libxl: error: cannot connect' >&2\nexit 1\n".to_string(),
    };
    let xl = dir.join("xl");
    std::fs::write(&xl, body).unwrap();
    std::fs::set_permissions(&xl, std::fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// `lab-domu gone ROLES...` with `xl` from `dir`: (exit status, stdout).
fn gone(dir: &Path, roles: &[&str]) -> (i32, String) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/xen-lab.d/lab-domu");
    let out = Command::new("sh")
        .arg(script)
        .arg("gone")
        .args(roles)
        .env("LAB_DOMU_PATH", dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).trim().to_string(),
    )
}

const HEAD: &str = "Name                                        ID   Mem VCPUs\tState\tTime(s)\n\
                    Domain-0                                     0  1024     1     r-----      10.0\n";

fn listing(a: &str, b: Option<&str>) -> String {
    let mut l = format!(
        "{HEAD}lab-a                                        1   512     1     {a}       5.0\n"
    );
    if let Some(b) = b {
        l += &format!(
            "lab-b                                        2   512     1     {b}       5.0\n"
        );
    }
    l
}

#[test]
fn lab_domu_gone_counts_unlisted_shut_down_crashed_and_dying_guests_as_dead() {
    let cases: [(&str, Option<&str>, i32, &str); 8] = [
        // running, blocked, paused: alive
        ("r-----", Some("-b----"), 1, ""),
        ("--p---", Some("-b----"), 1, ""),
        // b not listed
        ("-b----", None, 0, "b"),
        // b listed but shut down, crashed or dying (Xen keeps a domain
        // whose grants another domain still maps)
        ("-b----", Some("---s--"), 0, "b"),
        ("-b----", Some("----c-"), 0, "b"),
        ("-b----", Some("-----d"), 0, "b"),
        ("---sc-", Some("-b----"), 0, "a"),
        // the first dead role in the order asked
        ("-----d", None, 0, "a"),
    ];
    for (i, (a, b, status, who)) in cases.iter().enumerate() {
        let dir = fake_xl(&format!("case{i}"), Some(&listing(a, *b)));
        let (s, out) = gone(&dir, &["a", "b"]);
        assert_eq!((s, out.as_str()), (*status, *who), "lab-a {a}, lab-b {b:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
    // Only the roles asked about count.
    let dir = fake_xl("only", Some(&listing("-b----", None)));
    assert_eq!(gone(&dir, &["a"]), (1, String::new()));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn lab_domu_gone_takes_a_failing_xl_as_no_proof() {
    let dir = fake_xl("fails", None);
    let (s, out) = gone(&dir, &["a", "b"]);
    assert_eq!(out, "");
    assert_ne!(s, 0, "a failed xl list must not declare a guest dead");
    std::fs::remove_dir_all(&dir).unwrap();
}
