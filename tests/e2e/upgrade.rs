//! A spool written by the previous release (segment format 1, kept as a
//! fixture by the spool's tests) under this one: `queue list --json` and
//! `queue show` say what that release had recorded, with the same strings.

use std::path::Path;

use crate::harness::{BASE, config_in, run_cli};

#[test]
fn the_previous_release_s_spool_is_listed_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    let config = config_in(tmp.path(), BASE);
    let spool = tmp.path().join("spool");
    std::fs::create_dir_all(&spool).unwrap();
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../spool/tests/fixtures/spool-v1");
    for f in std::fs::read_dir(&fixture).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), spool.join(f.file_name())).unwrap();
    }
    let out = run_cli(&config, &["queue", "list", "--json"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let q: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let q = q.as_array().unwrap();
    assert_eq!(q.len(), 3, "{q:?}");

    assert_eq!(q[0]["id"], "0661A777641504");
    assert_eq!(q[0]["from"], "app@example.com");
    assert_eq!(q[0]["state"], "queued");
    assert_eq!(q[0]["attempts"], 0);
    assert_eq!(q[0]["size"], 46);
    assert_eq!(q[0]["created"], "2025-11-24T16:00:00Z");
    assert_eq!(
        q[0]["recipients"],
        serde_json::json!(["x@example.org", "y@example.org"])
    );

    assert_eq!(q[1]["state"], "held");
    assert_eq!(q[1]["attempts"], 2);
    assert_eq!(q[1]["recipients"], serde_json::json!(["p@example.org"]));
    assert_eq!(
        q[1]["last_error"],
        "451 4.3.0 Temporary System Problem. Try again later. - gsmtp"
    );
    assert_eq!(q[1]["next_attempt"], "2025-11-24T16:10:00Z");
    assert!(
        q[1]["held"]
            .as_str()
            .unwrap()
            .contains("needs authorization"),
        "{}",
        q[1]
    );

    assert_eq!(q[2]["from"], "");
    assert_eq!(q[2]["state"], "failed");
    assert_eq!(q[2]["recipients"], serde_json::json!([]));

    let out = run_cli(&config, &["queue", "show", "0661A777641EA2"], None);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("<d@example.org> delivered: 250 2.0.0 OK"),
        "{text}"
    );
    assert!(
        text.contains("<f@example.org> failed: 550 5.1.1 The email account"),
        "{text}"
    );
    assert!(text.contains("Account:      default"), "{text}");
}
